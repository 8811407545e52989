//! Every call to the Kubernetes API server: list the pods matching the selector, and read
//! what discovery needs of each (name, address, readiness).

use k8s_openapi::api::core::v1::Pod as K8sPod;
use kube::api::{Api, ListParams};
use kube::{Client, Config};

use super::{DiscoveryError, Pod};

/// Where a pod's service account finds its namespace.
const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// The container port that names a pod's admin server (the StatefulSet's `admin` port).
const ADMIN_PORT_NAME: &str = "admin";

/// The namespace this pod runs in: `POD_NAMESPACE` (the downward API), else the service
/// account's namespace file.
pub fn own_namespace() -> Result<String, String> {
    if let Ok(ns) = std::env::var("POD_NAMESPACE") {
        if !ns.is_empty() {
            return Ok(ns);
        }
    }
    std::fs::read_to_string(NAMESPACE_FILE)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("no --discovery-namespace, no POD_NAMESPACE, and {NAMESPACE_FILE}: {e}"))
}

pub struct PodLister {
    api: Api<K8sPod>,
    selector: String,
    default_admin_port: u16,
}

impl PodLister {
    /// A client for `api_url` (plain http allowed), or, without one, the in-cluster
    /// settings (service account token and CA) or a kubeconfig.
    pub async fn new(
        api_url: Option<&str>,
        namespace: String,
        selector: String,
        default_admin_port: u16,
    ) -> Result<Self, DiscoveryError> {
        let client_err = |e: &dyn std::fmt::Display| DiscoveryError::Client(e.to_string());
        let config = match api_url {
            Some(url) => {
                let uri: axum::http::Uri =
                    url.parse().map_err(|e| DiscoveryError::Settings(format!("--discovery-api-url {url:?}: {e}")))?;
                Config::new(uri)
            }
            None => Config::infer().await.map_err(|e| client_err(&e))?,
        };
        let client = Client::try_from(config).map_err(|e| client_err(&e))?;
        Ok(PodLister { api: Api::namespaced(client, &namespace), selector, default_admin_port })
    }

    pub async fn list(&self) -> Result<Vec<Pod>, kube::Error> {
        let pods = self.api.list(&ListParams::default().labels(&self.selector)).await?;
        Ok(pods.items.iter().map(|p| pod(p, self.default_admin_port)).collect())
    }
}

/// What discovery needs of a pod. Its admin port is the container port named `admin`
/// when it has one (so pods need not share a port, as on one test machine), else the
/// default.
fn pod(p: &K8sPod, default_admin_port: u16) -> Pod {
    let status = p.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let port = p
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|port| port.name.as_deref() == Some(ADMIN_PORT_NAME))
        .and_then(|port| u16::try_from(port.container_port).ok())
        .unwrap_or(default_admin_port);
    let admin_addr = status.and_then(|s| s.pod_ip.as_deref()).filter(|ip| !ip.is_empty()).map(|ip| {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    });
    Pod { name: p.metadata.name.clone().unwrap_or_default(), admin_addr, ready }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_read_from_its_json() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "kv-1", "labels": {"app": "kv"}},
            "spec": {"containers": [{"name": "host", "ports": [
                {"name": "raft", "containerPort": 12000}, {"name": "admin", "containerPort": 13001}]}]},
            "status": {"podIP": "10.1.2.3", "conditions": [
                {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}
        });
        let p: K8sPod = serde_json::from_value(json).expect("pod json");
        assert_eq!(pod(&p, 13000), Pod { name: "kv-1".into(), admin_addr: Some("10.1.2.3:13001".into()), ready: true });

        let json = serde_json::json!({
            "metadata": {"name": "kv-2"},
            "spec": {"containers": [{"name": "host"}]},
            "status": {"podIP": "fd00::7", "conditions": [{"type": "Ready", "status": "False"}]}
        });
        let p: K8sPod = serde_json::from_value(json).expect("pod json");
        assert_eq!(
            pod(&p, 13000),
            Pod { name: "kv-2".into(), admin_addr: Some("[fd00::7]:13000".into()), ready: false }
        );

        let pending: K8sPod = serde_json::from_value(serde_json::json!({"metadata": {"name": "kv-3"}})).expect("json");
        assert_eq!(pod(&pending, 13000), Pod { name: "kv-3".into(), admin_addr: None, ready: false });
    }
}
