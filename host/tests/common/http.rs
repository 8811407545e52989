//! The admin port over HTTP, through the host's own client (`host::http_client`), and
//! the fields of a `/status` document.

use std::cell::RefCell;
use std::time::Duration;

use host::http_client::HttpClient;
use serde_json::Value;

/// One admin call, connect to last byte of the answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

thread_local! {
    /// Tests are synchronous; each thread that calls the admin port keeps one small
    /// runtime for it rather than building one per call (tests poll every 50 ms).
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread tokio runtime")
        });
        rt.block_on(f)
    })
}

/// One HTTP request (`GET`, or `POST` with a JSON body); returns the status code and body.
pub fn http_request(addr: &str, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, String), String> {
    let http = HttpClient::new(HTTP_TIMEOUT);
    let answer = match (method, body) {
        ("GET", None) => block_on(http.get(addr, path)),
        ("POST", body) => block_on(http.post_json(addr, path, body.unwrap_or_default(), &[])),
        _ => panic!("the test kit sends GET without a body or POST, not {method}"),
    };
    answer.map(|r| (r.status, r.text())).map_err(|e| e.to_string())
}

pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    http_request(addr, "GET", path, None)
}

/// `GET /status` of the node whose admin port is `admin_addr`.
pub fn try_status(admin_addr: &str) -> Result<Value, String> {
    let (code, body) = http_get(admin_addr, "/status")?;
    if code != 200 {
        return Err(format!("GET /status on {admin_addr}: HTTP {code}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET /status on {admin_addr}: not JSON ({e}): {body}"))
}

/// An integer field of a `/status` document.
pub fn field_u64(status: &Value, field: &str) -> u64 {
    status[field].as_u64().unwrap_or_else(|| panic!("/status field {field:?} is not an unsigned integer: {status}"))
}

pub fn field_str<'a>(status: &'a Value, field: &str) -> &'a str {
    status[field].as_str().unwrap_or_else(|| panic!("/status field {field:?} is not a string: {status}"))
}

pub fn members(status: &Value) -> &Vec<Value> {
    status["members"].as_array().unwrap_or_else(|| panic!("/status field \"members\" is not a list: {status}"))
}

pub fn voter_ids(status: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> =
        members(status).iter().filter(|m| m["voter"].as_bool() == Some(true)).map(|m| field_u64(m, "id")).collect();
    ids.sort_unstable();
    ids
}
