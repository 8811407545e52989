//! `--discovery kubernetes`: how a member with an empty data dir finds its cluster among
//! the pods of its StatefulSet.
//!
//! The pods matching `--discovery-selector` in the pod's namespace are listed through the
//! API server ([`kube`]); the ready ones with an address, other than this pod, are asked
//! for their `/status`. Those that answer as members of a cluster are the seeds to join
//! through; when none does, the pod with ordinal 0 founds the cluster and the others wait.
//! Waiting is a loop with backoff that logs why: a member never exits to be restarted
//! while its peers are still starting. The decision itself is [`decide`], a pure function.
//!
//! A member whose data dir already holds a cluster does not come here: it restarts as
//! itself (see `node`), and asks the cluster to take its new addresses if they changed.

pub mod kube;

use std::time::Duration;

use crate::backoff::Backoff;
use crate::config::Opts;
use crate::http_client::HttpClient;

/// A `/status` answer is small; a peer that sends more is not one of ours.
const MAX_STATUS: usize = 1 << 20;
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(10);

/// What discovery needs of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    /// `ip:port` of its admin server; `None` until it has an IP.
    pub admin_addr: Option<String>,
    /// Its `Ready` condition is `True`.
    pub ready: bool,
}

/// How this member starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Found a one-member cluster.
    Bootstrap,
    /// Ask these admin addresses (members of a cluster) to add this member.
    Join(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Start(Plan),
    /// Nothing to start with yet; why, for the log.
    Wait(String),
}

/// The pods worth asking: ready, with an address, and not this one. A pod that is not
/// ready may be starting, stopping or failing its probes; it is never a seed.
pub fn candidates(pods: &[Pod], me: &str) -> Vec<String> {
    pods.iter().filter(|p| p.ready && p.name != me).filter_map(|p| p.admin_addr.clone()).collect()
}

/// The decision, from this pod's ordinal, whether `node.json` already binds it to a
/// cluster (then it never founds one), how many candidates there were, and which of them
/// answered as members of a cluster.
pub fn decide(ordinal: u64, bound: Option<&str>, candidates: usize, members: Vec<String>) -> Step {
    if !members.is_empty() {
        return Step::Start(Plan::Join(members));
    }
    if let Some(cluster) = bound {
        return Step::Wait(format!(
            "this member belongs to cluster {cluster} and none of the {candidates} ready pods answers as a member \
             of a cluster yet"
        ));
    }
    if ordinal == 0 {
        return Step::Start(Plan::Bootstrap);
    }
    Step::Wait(if candidates == 0 {
        "no other ready pod matches the selector yet; the pod with ordinal 0 founds the cluster".to_string()
    } else {
        format!(
            "none of the {candidates} ready pods answers as a member of a cluster yet; the pod with ordinal 0 \
             founds the cluster"
        )
    })
}

/// The ordinal of a StatefulSet pod, from its name (`name-N`).
pub fn ordinal(pod_name: &str) -> Option<u64> {
    pod_name.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("--discovery kubernetes: {0}")]
    Settings(String),
    #[error("--discovery kubernetes: cannot set up the Kubernetes client: {0}")]
    Client(String),
}

/// Discovery of this pod's peers, ready to run.
pub struct Discovery {
    pods: kube::PodLister,
    pod_name: String,
    ordinal: u64,
    http: HttpClient,
}

impl Discovery {
    /// Checks the settings and builds the client; nothing is asked of the API server yet.
    pub async fn from_opts(opts: &Opts) -> Result<Self, DiscoveryError> {
        let settings = |s: &str| DiscoveryError::Settings(s.to_string());
        let selector = opts.discovery_selector.clone().ok_or_else(|| settings("--discovery-selector is required"))?;
        let pod_name = match &opts.pod_name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .map_err(|e| DiscoveryError::Settings(format!("no --pod-name (POD_NAME) and no host name: {e}")))?,
        };
        let ordinal = ordinal(&pod_name).ok_or_else(|| {
            DiscoveryError::Settings(format!(
                "pod name {pod_name:?} does not end in a StatefulSet ordinal (name-N); set --pod-name (POD_NAME)"
            ))
        })?;
        let namespace = match &opts.discovery_namespace {
            Some(ns) => ns.clone(),
            None => kube::own_namespace().map_err(|e| DiscoveryError::Settings(e.to_string()))?,
        };
        let default_port = match opts.discovery_admin_port {
            Some(p) => p,
            None => opts
                .admin_addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .ok_or_else(|| settings("no port in --admin-addr; set --discovery-admin-port"))?,
        };
        let pods = kube::PodLister::new(opts.discovery_api_url.as_deref(), namespace, selector, default_port).await?;
        let http = HttpClient::new(STATUS_TIMEOUT).with_max_body(MAX_STATUS);
        Ok(Discovery { pods, pod_name, ordinal, http })
    }

    /// Lists and asks until there is a plan; `bound` is the cluster this member's
    /// `node.json` already names, if any.
    pub async fn plan(&self, bound: Option<&str>) -> Plan {
        let mut backoff = Backoff::new(FIRST_PAUSE, MAX_PAUSE);
        loop {
            let why = match self.pods.list().await {
                Err(e) => format!("cannot list pods: {e}"),
                Ok(pods) => {
                    let candidates = candidates(&pods, &self.pod_name);
                    let members = self.members_among(&candidates).await;
                    match decide(self.ordinal, bound, candidates.len(), members) {
                        Step::Start(plan) => {
                            tracing::info!(?plan, pods = pods.len(), "discovery: found how to start");
                            return plan;
                        }
                        Step::Wait(why) => why,
                    }
                }
            };
            let pause = backoff.next_pause();
            tracing::info!(%why, retry_in = ?pause, "discovery: waiting");
            tokio::time::sleep(pause).await;
        }
    }

    /// The candidates whose `/status` names a cluster.
    async fn members_among(&self, candidates: &[String]) -> Vec<String> {
        let asked = candidates.iter().map(|addr| async move {
            let answer = self.http.get(addr, "/status").await.ok()?;
            let status: serde_json::Value = serde_json::from_slice(answer.body.as_ref()).ok()?;
            status.get("cluster_id").and_then(|c| c.as_str()).map(|_| addr.clone())
        });
        futures::future::join_all(asked).await.into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, addr: Option<&str>, ready: bool) -> Pod {
        Pod { name: name.into(), admin_addr: addr.map(str::to_string), ready }
    }

    #[test]
    fn candidates_are_the_other_ready_pods_with_an_address() {
        let pods = [
            pod("kv-0", Some("10.0.0.1:13000"), true),
            pod("kv-1", Some("10.0.0.2:13000"), false),
            pod("kv-2", None, true),
            pod("kv-3", Some("10.0.0.4:13000"), true),
        ];
        assert_eq!(candidates(&pods, "kv-3"), vec!["10.0.0.1:13000".to_string()]);
        assert_eq!(candidates(&pods, "kv-9"), vec!["10.0.0.1:13000".to_string(), "10.0.0.4:13000".to_string()]);
    }

    #[test]
    fn ordinal_zero_founds_only_when_no_member_answers() {
        assert_eq!(decide(0, None, 0, vec![]), Step::Start(Plan::Bootstrap));
        assert_eq!(decide(0, None, 2, vec![]), Step::Start(Plan::Bootstrap), "peers still starting");
        let seeds = vec!["a:1".to_string()];
        assert_eq!(decide(0, None, 2, seeds.clone()), Step::Start(Plan::Join(seeds.clone())), "a cluster exists");
        assert_eq!(decide(2, None, 1, seeds.clone()), Step::Start(Plan::Join(seeds)));
    }

    #[test]
    fn the_others_wait_and_say_why() {
        let Step::Wait(why) = decide(1, None, 0, vec![]) else { panic!("ordinal 1 founded a cluster") };
        assert!(why.contains("no other ready pod"), "{why}");
        let Step::Wait(why) = decide(2, None, 2, vec![]) else { panic!("ordinal 2 founded a cluster") };
        assert!(why.contains("none of the 2 ready pods"), "{why}");
        // Bound to a cluster (accepted, stopped before any entry): never founds another.
        let Step::Wait(why) = decide(0, Some("c1"), 1, vec![]) else { panic!("a bound member founded a cluster") };
        assert!(why.contains("belongs to cluster c1"), "{why}");
    }

    #[test]
    fn ordinals_come_from_the_pod_name() {
        assert_eq!(ordinal("wasm-raft-0"), Some(0));
        assert_eq!(ordinal("kv-12"), Some(12));
        assert_eq!(ordinal("kv"), None);
        assert_eq!(ordinal("kv-x"), None);
    }
}
