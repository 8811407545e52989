//! Admin HTTP: `GET /status`, `GET /metrics`, `POST /join` (handled by `join::policy`),
//! and the membership operations in `members` (`GET /members`, `POST /members/remove`,
//! `/members/demote`, `/members/promote`, `/leader/transfer`), and `GET /recover` (state
//! transfer to `recovery`, in `recover`).

pub mod guard;
pub mod members;
pub mod operator;
pub mod recover;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::api::App;

pub use status::{current_status, MemberStatus, Status};

pub const TOKEN_HEADER: &str = "x-cluster-token";

/// Admin connections served at once: operators, probes and joining members.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A request's head must arrive within this, or the connection is closed (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body: a join request is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

pub async fn serve(listener: TcpListener, app: Arc<App>) {
    let router = Router::new()
        .route("/status", get(status::handle))
        .route("/metrics", get(metrics))
        .route("/join", post(crate::join::policy::handle))
        .route("/members", get(members::list))
        .route("/members/remove", post(members::remove))
        .route("/members/demote", post(members::demote))
        .route("/members/promote", post(members::promote))
        .route("/leader/transfer", post(members::transfer))
        .route("/leader/elect", post(members::elect))
        .route("/removed", post(members::removed))
        .route("/recover", get(recover::handle))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(app);
    serve_router(listener, router).await;
}

/// Serves `router` as an admin port (the host's and the logger's): HTTP/1.1, at most
/// [`MAX_ADMIN_CONNECTIONS`] at once, a request head within [`HEADER_READ_TIMEOUT`].
pub async fn serve_router(listener: TcpListener, router: Router) {
    crate::net::accept_loop(listener, "admin", MAX_ADMIN_CONNECTIONS, move |stream| {
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection closed");
            }
        }
    })
    .await;
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let raft = app.raft.metrics().borrow().clone();
    let page = crate::metrics::render(&raft, &app.metrics);
    ([("content-type", "text/plain; version=0.0.4")], page).into_response()
}
