//! A small HTTP/1.1 client on hyper, for the few calls a member or a test makes to an
//! admin port (a join, `/status`, `/metrics`): one request per connection, a deadline on
//! the whole exchange, and a bound on the answer's size, so a peer that stalls or
//! answers without end cannot hold the caller.
//!
//! ```no_run
//! # async fn join() -> Result<(), host::http_client::HttpError> {
//! use std::time::Duration;
//! use host::http_client::HttpClient;
//!
//! let http = HttpClient::new(Duration::from_secs(10)); // answers up to DEFAULT_MAX_BODY
//! let status = http.get("127.0.0.1:13000", "/status").await?;
//! assert_eq!(status.status, 200);
//! let reply = http
//!     .post_json("127.0.0.1:13000", "/join", br#"{"id":2}"#, &[("x-cluster-token", "secret")])
//!     .await?;
//! println!("{} {}", reply.status, reply.text());
//! # Ok(()) }
//! ```
//!
//! Any status is a [`Response`]: what a 4xx or 5xx means is the caller's business. An
//! [`HttpError`] means no complete answer arrived (cannot connect, timed out, broken or
//! malformed exchange, an answer over the size bound). Bodies may come with a
//! `Content-Length` or chunked; hyper decodes both.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest answer body accepted unless [`HttpClient::with_max_body`] says otherwise:
/// far above any `/status`, `/metrics` or join answer, far below what would hurt.
pub const DEFAULT_MAX_BODY: usize = 16 << 20;

/// An answer: its status code and its whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

impl Response {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why no complete answer arrived. Each names the request (`METHOD path on addr`).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{request}: cannot build the request: {source}")]
    Request { request: String, source: hyper::http::Error },
    #[error("{request}: cannot connect: {source}")]
    Connect { request: String, source: std::io::Error },
    #[error("{request}: {source}")]
    Exchange { request: String, source: hyper::Error },
    #[error("{request}: no complete answer within {timeout:?}")]
    Timeout { request: String, timeout: Duration },
    #[error("{request}: answer body longer than {limit} bytes")]
    TooLarge { request: String, limit: usize },
}

/// The client's settings; cheap to copy, holds no connection.
#[derive(Debug, Clone, Copy)]
pub struct HttpClient {
    timeout: Duration,
    max_body: usize,
}

impl HttpClient {
    /// A client whose every request (connect, send, whole answer) ends within `timeout`.
    pub fn new(timeout: Duration) -> HttpClient {
        HttpClient { timeout, max_body: DEFAULT_MAX_BODY }
    }

    /// Refuse answers whose body is longer than `bytes`.
    pub fn with_max_body(self, bytes: usize) -> HttpClient {
        HttpClient { max_body: bytes, ..self }
    }

    /// `GET path` on `addr` (`host:port`).
    pub async fn get(&self, addr: &str, path: &str) -> Result<Response, HttpError> {
        self.send(Method::GET, addr, path, Bytes::new(), None, &[]).await
    }

    /// `POST path` on `addr` with a JSON `body` and extra `headers` (name, value).
    pub async fn post_json(
        &self,
        addr: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<Response, HttpError> {
        let body = Bytes::copy_from_slice(body);
        self.send(Method::POST, addr, path, body, Some("application/json"), headers).await
    }

    async fn send(
        &self,
        method: Method,
        addr: &str,
        path: &str,
        body: Bytes,
        content_type: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Response, HttpError> {
        let request = format!("{method} {path} on {addr}");
        let req = build(method, addr, path, body, content_type, headers)
            .map_err(|source| HttpError::Request { request: request.clone(), source })?;
        match tokio::time::timeout(self.timeout, self.exchange(addr, req, &request)).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout { request, timeout: self.timeout }),
        }
    }

    async fn exchange(&self, addr: &str, req: Request<Full<Bytes>>, request: &str) -> Result<Response, HttpError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| HttpError::Connect { request: request.to_string(), source })?;
        let _ = stream.set_nodelay(true);
        let exchange_err = |source| HttpError::Exchange { request: request.to_string(), source };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(exchange_err)?;
        // The connection is driven here, beside the request, rather than on a spawned
        // task: when the caller gives up (the timeout drops this future) nothing is left
        // running and the socket closes.
        let limit = self.max_body;
        let answer = async {
            let resp = sender.send_request(req).await.map_err(exchange_err)?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), limit).collect().await.map_err(|e| {
                match e.downcast::<hyper::Error>() {
                    Ok(source) => exchange_err(*source),
                    // The only other error `Limited` yields is its own length limit.
                    Err(_) => HttpError::TooLarge { request: request.to_string(), limit },
                }
            })?;
            Ok(Response { status, body: body.to_bytes() })
        };
        tokio::pin!(answer);
        tokio::pin!(conn);
        tokio::select! {
            result = &mut answer => result,
            ended = &mut conn => {
                // The server may close right after the last byte of its answer: what was
                // read is still delivered.
                ended.map_err(exchange_err)?;
                answer.await
            }
        }
    }
}

fn build(
    method: Method,
    addr: &str,
    path: &str,
    body: Bytes,
    content_type: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr)
        // One request per connection: the server need not keep it open for another.
        .header(CONNECTION, "close");
    if let Some(content_type) = content_type {
        builder = builder.header(CONTENT_TYPE, content_type);
    }
    for (name, value) in headers {
        builder = builder.header(HeaderName::try_from(*name)?, HeaderValue::try_from(*value)?);
    }
    builder.body(Full::new(body))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    async fn axum_server() -> String {
        let app = axum::Router::new()
            .route("/status", get(|| async { axum::Json(serde_json::json!({"state": "Leader"})) }))
            .route(
                "/echo",
                post(|headers: HeaderMap, body: Bytes| async move {
                    let token = headers.get("x-cluster-token").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    let kind = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    (axum::http::StatusCode::ACCEPTED, format!("{token}|{kind}|{}", String::from_utf8_lossy(&body)))
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// A server that reads a request head and answers with `answer` as it is, then
    /// (unless `hold`) closes.
    async fn raw_server(answer: &'static [u8], hold: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(answer).await;
                    if hold {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn content_length_bodies_and_statuses() {
        let addr = axum_server().await;
        let http = HttpClient::new(5 * SECOND);
        let r = http.get(&addr, "/status").await.expect("GET /status");
        assert_eq!((r.status, r.text()), (200, r#"{"state":"Leader"}"#.to_string()));
        let r = http.get(&addr, "/nothing-here").await.expect("a 404 is an answer");
        assert_eq!(r.status, 404);
        let r = http.post_json(&addr, "/echo", b"{\"id\":2}", &[("x-cluster-token", "t0k")]).await.expect("POST");
        assert_eq!((r.status, r.text()), (202, "t0k|application/json|{\"id\":2}".to_string()));
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded() {
        let addr = raw_server(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n",
            false,
        )
        .await;
        let r = HttpClient::new(5 * SECOND).get(&addr, "/").await.expect("chunked answer");
        assert_eq!((r.status, r.text()), (200, "hello, world".to_string()));
    }

    #[tokio::test]
    async fn a_body_ending_at_close_is_read_whole() {
        let addr = raw_server(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", false).await;
        let r = HttpClient::new(5 * SECOND).get(&addr, "/").await.expect("answer");
        assert_eq!(r.text(), "until the end");
    }

    #[tokio::test]
    async fn bodies_over_the_bound_are_refused() {
        let addr = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n0123456789a", false).await;
        let http = HttpClient::new(5 * SECOND).with_max_body(10);
        let e = http.get(&addr, "/").await.expect_err("over the bound");
        assert!(matches!(e, HttpError::TooLarge { limit: 10, .. }), "{e}");
        let chunked = raw_server(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n8\r\n89abcdef\r\n0\r\n\r\n",
            false,
        )
        .await;
        let e = http.get(&chunked, "/").await.expect_err("over the bound");
        assert!(matches!(e, HttpError::TooLarge { .. }), "{e}");
        assert_eq!(
            HttpClient::new(5 * SECOND).with_max_body(16).get(&chunked, "/").await.expect("fits").text(),
            "0123456789abcdef"
        );
    }

    #[tokio::test]
    async fn a_stalled_answer_times_out() {
        // The head arrives, the promised body never does.
        let addr = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart", true).await;
        let started = std::time::Instant::now();
        let e = HttpClient::new(Duration::from_millis(300)).get(&addr, "/status").await.expect_err("stalls");
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("GET /status on 127.0.0.1:"), "{e}");
        assert!(started.elapsed() < 5 * SECOND, "{:?}", started.elapsed());
        // A server that accepts and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let silent_addr = silent.local_addr().expect("addr").to_string();
        let e = HttpClient::new(Duration::from_millis(300)).get(&silent_addr, "/").await.expect_err("silent");
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn refused_connections_and_bad_answers_are_errors() {
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr")
        };
        let e = HttpClient::new(5 * SECOND).get(&closed.to_string(), "/").await.expect_err("nothing listens");
        assert!(matches!(e, HttpError::Connect { .. }), "{e}");
        let garbage = raw_server(b"not http at all\r\n\r\n", false).await;
        let e = HttpClient::new(5 * SECOND).get(&garbage, "/").await.expect_err("not HTTP");
        assert!(matches!(e, HttpError::Exchange { .. }), "{e}");
        let cut = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart", false).await;
        let e = HttpClient::new(5 * SECOND).get(&cut, "/").await.expect_err("cut short");
        assert!(matches!(e, HttpError::Exchange { .. }), "{e}");
        let e = HttpClient::new(5 * SECOND).post_json(&garbage, "/", b"", &[("bad header", "x")]).await;
        assert!(matches!(e, Err(HttpError::Request { .. })), "{e:?}");
    }
}
