//! `--discovery kubernetes` against a stand-in API server: real `host` processes on
//! loopback find each other through pod lists served in the API server's JSON shape
//! (`PodList` with names, labels, `status.podIP`, the `Ready` condition) to the kube
//! client.
//!
//! Every pod's IP is 127.0.0.1; pods tell their admin ports apart by the container port
//! named `admin` in their spec, which discovery reads (in a cluster every pod has the same
//! one, from the StatefulSet). The test changes the list as it starts, stops and restarts
//! the processes, as the kubelet would.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use axum::{Json, Router};
use common::*;
use serde_json::{json, Value};

const NAMESPACE: &str = "kv-test";
const SELECTOR: &str = "app=kv";

/// One pod as the stand-in server lists it.
#[derive(Clone)]
struct PodEntry {
    app: String,
    admin_port: u16,
    ready: bool,
}

#[derive(Default)]
struct ApiState {
    pods: BTreeMap<String, PodEntry>,
    lists: usize,
}

/// The stand-in API server, and a decoy that answers `/status` as a member of another
/// cluster and counts every request it gets: a pod that must never be used as a seed
/// points at it.
struct StandIn {
    url: String,
    state: Arc<Mutex<ApiState>>,
    decoy_port: u16,
    decoy_hits: Arc<AtomicUsize>,
}

impl StandIn {
    fn start() -> StandIn {
        let api = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the stand-in API server");
        let decoy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the decoy");
        let url = format!("http://{}", api.local_addr().expect("api address"));
        let decoy_port = decoy.local_addr().expect("decoy address").port();
        let state = Arc::new(Mutex::new(ApiState::default()));
        let decoy_hits = Arc::new(AtomicUsize::new(0));
        let (s, hits) = (state.clone(), decoy_hits.clone());
        // Lives as long as the test process (nextest runs each test in its own).
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                api.set_nonblocking(true).expect("nonblocking");
                decoy.set_nonblocking(true).expect("nonblocking");
                let api = tokio::net::TcpListener::from_std(api).expect("api listener");
                let decoy = tokio::net::TcpListener::from_std(decoy).expect("decoy listener");
                let api_app = Router::new().route("/api/v1/namespaces/{ns}/pods", get(list_pods)).with_state(s);
                let decoy_app = Router::new().fallback(any(decoy_answer)).with_state(hits);
                let a = tokio::spawn(async move { axum::serve(api, api_app).await });
                let d = tokio::spawn(async move { axum::serve(decoy, decoy_app).await });
                let _ = tokio::join!(a, d);
            });
        });
        StandIn { url, state, decoy_port, decoy_hits }
    }

    fn set_pod(&self, name: &str, app: &str, admin_port: u16, ready: bool) {
        let entry = PodEntry { app: app.to_string(), admin_port, ready };
        self.state.lock().expect("stand-in state").pods.insert(name.to_string(), entry);
    }

    fn lists(&self) -> usize {
        self.state.lock().expect("stand-in state").lists
    }
}

async fn list_pods(
    State(state): State<Arc<Mutex<ApiState>>>,
    UrlPath(ns): UrlPath<String>,
    uri: Uri,
) -> axum::response::Response {
    let query = uri.query().unwrap_or_default().replace("%3D", "=");
    if query.contains("watch=") {
        return (StatusCode::BAD_REQUEST, "this stand-in serves lists only").into_response();
    }
    let selector = query.split('&').find_map(|kv| kv.strip_prefix("labelSelector="));
    let Some(app) = selector.and_then(|s| s.strip_prefix("app=")) else {
        return (StatusCode::BAD_REQUEST, format!("expected a labelSelector app=..., got {query:?}")).into_response();
    };
    if ns != NAMESPACE {
        let status = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound",
            "message": format!("namespace {ns} not found"), "code": 404});
        return (StatusCode::NOT_FOUND, Json(status)).into_response();
    }
    let mut st = state.lock().expect("stand-in state");
    st.lists += 1;
    let items: Vec<Value> = st.pods.iter().filter(|(_, p)| p.app == app).map(|(name, p)| pod_json(name, p)).collect();
    Json(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": st.lists.to_string()},
        "items": items}))
    .into_response()
}

fn pod_json(name: &str, p: &PodEntry) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": p.app}, "uid": format!("uid-{name}")},
        "spec": {"containers": [{"name": "host", "image": "wasm-raft/host:latest", "ports": [
            {"name": "client", "containerPort": 11000, "protocol": "TCP"},
            {"name": "admin", "containerPort": p.admin_port, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": if p.ready { "True" } else { "False" }}]}
    })
}

async fn decoy_answer(State(hits): State<Arc<AtomicUsize>>) -> Json<Value> {
    hits.fetch_add(1, Ordering::SeqCst);
    Json(json!({"ok": true, "id": 99, "cluster_id": "decoy-cluster", "message": "decoy", "members": []}))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("no port in {addr}"))
}

/// The pods of one test: `kv-N` runs as node id N + 1 in `dir`.
struct Pods {
    api: StandIn,
    fsm: PathBuf,
    nodes: BTreeMap<u64, Node>,
    // After `nodes`, so the processes are gone before their files are removed.
    dir: tempfile::TempDir,
}

impl Pods {
    fn new() -> Pods {
        let dir = tempfile::Builder::new().prefix("host-discovery-").tempdir().expect("temporary directory");
        Pods { api: StandIn::start(), fsm: guest("kvstore"), nodes: BTreeMap::new(), dir }
    }

    /// Starts pod `kv-<ordinal>` (on fresh ports, with the data dir it had before, if any)
    /// and lists it as ready.
    fn start(&mut self, ordinal: u64) -> &Node {
        let extra: Vec<String> = [
            "--discovery",
            "kubernetes",
            "--discovery-selector",
            SELECTOR,
            "--discovery-namespace",
            NAMESPACE,
            "--discovery-api-url",
            &self.api.url,
            "--pod-name",
            &format!("kv-{ordinal}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let node = Node::start(ordinal + 1, self.dir.path(), &self.fsm, &extra, None);
        self.api.set_pod(&format!("kv-{ordinal}"), "kv", port_of(&node.admin_addr), true);
        self.nodes.insert(ordinal, node);
        &self.nodes[&ordinal]
    }

    fn node(&self, ordinal: u64) -> &Node {
        &self.nodes[&ordinal]
    }

    fn wait<T>(&self, why: &str, check: impl FnMut() -> Result<T, String>) -> T {
        poll_until(TIMEOUT, check).unwrap_or_else(|last| {
            let logs: Vec<String> = self.nodes.values().map(Node::log_tail).collect();
            panic!("timed out waiting for {why}: {last}\n{}", logs.join("\n"))
        })
    }

    /// Waits until the pods at `ordinals` are the voters, all in one cluster with one
    /// leader; returns the leader's status.
    fn wait_cluster(&self, ordinals: &[u64]) -> Value {
        let want: Vec<u64> = ordinals.iter().map(|o| o + 1).collect();
        self.wait(&format!("nodes {want:?} to form one cluster"), || {
            let statuses =
                ordinals.iter().map(|o| try_status(&self.node(*o).admin_addr)).collect::<Result<Vec<_>, _>>()?;
            let leader = statuses.iter().find(|s| s["state"] == "Leader").ok_or("no leader yet")?;
            if voter_ids(leader) != want {
                return Err(format!("voters {:?}", voter_ids(leader)));
            }
            for s in &statuses {
                if s["cluster_id"] != leader["cluster_id"] || s["leader_id"] != leader["id"] {
                    return Err(format!(
                        "node {} sees cluster {} and leader {}",
                        s["id"], s["cluster_id"], s["leader_id"]
                    ));
                }
            }
            Ok(leader.clone())
        })
    }

    fn leader_status(&self) -> Result<Value, String> {
        let statuses = self.nodes.values().filter_map(|n| try_status(&n.admin_addr).ok());
        statuses.into_iter().find(|s| s["state"] == "Leader").ok_or_else(|| "no leader".to_string())
    }

    fn client_addrs(&self) -> String {
        self.nodes.values().map(|n| n.client_addr.clone()).collect::<Vec<_>>().join(",")
    }
}

fn bootstrapped(node: &Node) -> bool {
    node.log().contains("bootstrapping a one-node cluster")
}

/// Waits until `node`'s own state (a stale read on it alone) holds `key = value`.
fn wait_holds(pods: &Pods, node: &Node, key: &str, value: &str) {
    pods.wait(&format!("node {} to hold {key}", node.id), || {
        let out = kv(&node.client_addr, &["get", "--stale", key]);
        let got = stdout_of(&out);
        if out.status.success() && got.trim() == value {
            Ok(())
        } else {
            Err(format!("{got} {}", stderr_of(&out)))
        }
    });
}

/// The first start of three pods in any order: the others wait (saying why) until pod 0
/// has founded the cluster, then join it; only pod 0 bootstraps, and a ready pod outside
/// the selector (the decoy) is never asked.
#[test]
fn t10_first_start_pod_zero_founds_and_the_others_join() {
    let mut pods = Pods::new();
    pods.api.set_pod("web-0", "web", pods.api.decoy_port, true);
    pods.start(2);
    pods.start(1);
    pods.wait("pods 1 and 2 to wait for pod 0", || {
        let waiting = [1, 2].iter().all(|o| pods.node(*o).log().contains("discovery: waiting"));
        waiting.then_some(()).ok_or_else(|| "not waiting yet".to_string())
    });
    for o in [1, 2] {
        let s = pods.node(o).status();
        assert!(s["cluster_id"].is_null(), "pod {o} is in a cluster before pod 0 started: {s}");
    }
    pods.start(0);
    let leader = pods.wait_cluster(&[0, 1, 2]);
    assert!(leader["cluster_id"].is_string(), "{leader}");
    assert!(bootstrapped(pods.node(0)), "pod 0 did not found the cluster:\n{}", pods.node(0).log_tail());
    for o in [1, 2] {
        assert!(!bootstrapped(pods.node(o)), "pod {o} founded a cluster of its own");
        assert!(pods.node(o).log().contains("joined the cluster"), "{}", pods.node(o).log_tail());
    }
    assert_eq!(pods.api.decoy_hits.load(Ordering::SeqCst), 0, "a pod outside the selector was asked");
    assert!(pods.api.lists() >= 3, "the pods were found through the API server");
    set_acknowledged(&pods.client_addrs(), "k", "v");
    for o in [0, 1, 2] {
        wait_holds(&pods, pods.node(o), "k", "v");
    }
}

/// A pod restarted with its volume on a new address (here: new ports) comes back as the
/// same member: the membership records its new addresses, with the same member uid, and
/// it receives entries there.
#[test]
fn t20_a_pod_restarted_on_a_new_address_rejoins_as_itself() {
    let mut pods = Pods::new();
    pods.start(0);
    pods.start(1);
    pods.start(2);
    let before = pods.wait_cluster(&[0, 1, 2]);
    let record = |s: &Value| members(s).iter().find(|m| m["id"] == 2).cloned().expect("member 2 on record");
    let old = record(&before);
    set_acknowledged(&pods.client_addrs(), "before", "1");
    wait_holds(&pods, pods.node(1), "before", "1");

    pods.nodes.get_mut(&1).expect("pod 1").kill9();
    let (old_raft, old_admin) = (pods.node(1).raft_addr.clone(), pods.node(1).admin_addr.clone());
    let node = pods.start(1);
    let (new_raft, new_admin) = (node.raft_addr.clone(), node.admin_addr.clone());
    assert_ne!((&old_raft, &old_admin), (&new_raft, &new_admin), "the restart should move the pod");

    let after = pods.wait("the membership to record pod 1's new addresses", || {
        let leader = pods.leader_status()?;
        let m = record(&leader);
        if m["raft_addr"] == new_raft.as_str() && m["admin_addr"] == new_admin.as_str() {
            Ok(m)
        } else {
            Err(format!("member 2 on record: {m}"))
        }
    });
    assert_eq!(after["uid"], old["uid"], "the pod came back as another member");
    assert_eq!(after["voter"], true, "{after}");
    assert!(!bootstrapped(pods.node(1)), "the restarted pod founded a cluster");
    // Entries reach it at its new raft address.
    set_acknowledged(&pods.client_addrs(), "after", "2");
    wait_holds(&pods, pods.node(1), "after", "2");
    wait_holds(&pods, pods.node(1), "before", "1");
}

/// A pod that never becomes ready is never asked, even one claiming to be a member of a
/// cluster: pod 0 founds the cluster regardless, and pod 2 joins pod 0.
#[test]
fn t30_a_pod_that_never_becomes_ready_is_no_seed() {
    let mut pods = Pods::new();
    pods.api.set_pod("kv-1", "kv", pods.api.decoy_port, false);
    pods.start(2);
    pods.wait("pod 2 to wait for pod 0", || {
        let waiting = pods.node(2).log().contains("discovery: waiting");
        waiting.then_some(()).ok_or_else(|| "not waiting yet".to_string())
    });
    pods.start(0);
    pods.wait_cluster(&[0, 2]);
    assert!(bootstrapped(pods.node(0)), "{}", pods.node(0).log_tail());
    assert!(!bootstrapped(pods.node(2)), "pod 2 founded a cluster of its own");
    assert_eq!(pods.api.decoy_hits.load(Ordering::SeqCst), 0, "the pod that is not ready was asked");
}
