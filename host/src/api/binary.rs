//! The binary client protocol: length-delimited `ClientRequest` frames in, `ClientResponse`
//! frames out, matched by id. Requests on one connection run concurrently (bounded), so
//! a client can pipeline.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::{App, Outcome, Reply};
use crate::codec::{encode_frame, read_frame, FrameError};
use crate::proto::{ClientRequest, ClientResponse, Code, RequestKind};

/// Requests in flight per connection before the server stops reading from it.
const MAX_IN_FLIGHT: usize = 1024;

pub async fn serve(listener: TcpListener, app: Arc<App>) {
    crate::net::accept_loop(listener, "client", move |stream| serve_conn(stream, app.clone())).await;
}

async fn serve_conn(stream: TcpStream, app: Arc<App>) {
    let peer = stream.peer_addr().ok();
    let (rd, mut wr) = stream.into_split();
    // One response per in-flight slot, plus the last word on a bad frame: a reply can
    // always be queued without waiting (see `Reply::send`).
    let (tx, mut rx) = mpsc::channel::<ClientResponse>(MAX_IN_FLIGHT + 1);
    let writer = tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(resp) = rx.recv().await {
            out.clear();
            encode_frame(&resp, &mut out);
            // Coalesce whatever else is ready into the same write.
            while let Ok(more) = rx.try_recv() {
                encode_frame(&more, &mut out);
            }
            if wr.write_all(&out).await.is_err() {
                break;
            }
        }
    });
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let req: ClientRequest = match read_frame(&mut rd, app.max_frame, &mut buf).await {
            Ok(r) => r,
            Err(FrameError::Closed) => break,
            Err(e) => {
                // The stream is out of step (or hostile): say why, then hang up.
                app.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?peer, error = %e, "bad frame from client");
                let _ = tx
                    .send(ClientResponse { code: Code::BadRequest as i32, error: e.to_string(), ..Default::default() })
                    .await;
                break;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        // The common cases answer straight into the writer's queue, without a task per
        // request: proposals (from the batch's responder) and queries that need no read
        // barrier (from the state-machine thread).
        if req.kind == RequestKind::Propose as i32 {
            app.submit(req.payload, Reply::Frame { id: req.id, to: tx.clone(), permit }).await;
            continue;
        }
        if req.kind == RequestKind::Query as i32 && app.may_answer_now(req.stale_ok) {
            app.answer_now(req.payload, Reply::Frame { id: req.id, to: tx.clone(), permit });
            continue;
        }
        let app = app.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let resp = handle(&app, req).await;
            let _ = tx.send(resp).await;
            drop(permit);
        });
    }
    drop(tx);
    let _ = writer.await;
}

async fn handle(app: &App, req: ClientRequest) -> ClientResponse {
    let outcome = match RequestKind::try_from(req.kind) {
        // Normally answered by `serve_conn` without a task of its own.
        Ok(RequestKind::Propose) => app.propose(req.payload).await,
        Ok(RequestKind::Query) => app.query(req.payload, req.stale_ok).await,
        Err(_) => {
            app.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
            return ClientResponse {
                id: req.id,
                code: Code::BadRequest as i32,
                error: format!("unknown request kind {}", req.kind),
                ..Default::default()
            };
        }
    };
    Outcome::into_response(outcome, req.id)
}
