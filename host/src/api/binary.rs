//! The binary client protocol: length-delimited `ClientRequest` frames in, `ClientResponse`
//! frames out, matched by id. Requests on one connection run concurrently (bounded), so
//! a client can pipeline.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};

use super::{App, Held, Outcome, Reply};
use crate::codec::{encode_frame, gather, read_body_budgeted, read_len_within, skip_frame, FrameError};
use crate::proto::{ClientRequest, ClientResponse, Code, RequestKind};

/// Requests in flight per connection, counted until their answers are written: past it
/// the server stops reading from the connection, so a client that never reads its
/// answers holds at most this many.
pub const MAX_IN_FLIGHT: usize = 1024;
/// A connection with nothing in flight that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Once a frame's length has arrived, its body must follow within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Answers gathered into one write at most: past it the writer writes and starts again,
/// rather than copying everything a slow reader has let pile up into one buffer.
const MAX_WRITE: usize = 256 * 1024;
/// Answers queued on a connection, in bytes, past which no further request is read from
/// it until the client reads.
pub const MAX_BACKLOG: usize = 8 << 20;
/// Answers queued on a connection past which the member hangs up on it and drops them:
/// requests already read when the client stopped reading (up to [`MAX_IN_FLIGHT`]) can
/// still be answered past [`MAX_BACKLOG`], and this bounds them. A client that reads its
/// answers never gets here; one that does not is not waited for.
pub const MAX_BACKLOG_HARD: usize = 64 << 20;

/// Bytes of a connection's answers that are queued and not yet written.
#[derive(Default)]
pub struct Backlog {
    bytes: AtomicUsize,
    drained: Notify,
    /// The writer has stopped: nothing will drain, and the reader must not wait for it.
    closed: AtomicBool,
}

impl Backlog {
    /// Counts `resp` as queued; returns its size, which the writer uncounts once it is
    /// written.
    pub fn add(&self, resp: &ClientResponse) -> usize {
        let n = prost::Message::encoded_len(resp);
        if self.bytes.fetch_add(n, Ordering::Relaxed) + n > MAX_BACKLOG_HARD {
            self.close();
        }
        n
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    async fn until_closed(&self) {
        loop {
            let woken = self.drained.notified();
            if self.is_closed() {
                return;
            }
            woken.await;
        }
    }

    fn written(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.drained.notify_waiters();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.drained.notify_waiters();
    }

    async fn below(&self, max: usize) {
        loop {
            // Made before the check, so a drain in between is not missed.
            let drained = self.drained.notified();
            if self.bytes.load(Ordering::Relaxed) <= max || self.is_closed() {
                return;
            }
            drained.await;
        }
    }
}

pub async fn serve(listener: TcpListener, app: Arc<App>) {
    crate::net::accept_loop(listener, "client", app.max_connections, move |stream| serve_conn(stream, app.clone()))
        .await;
}

/// What the writer sends: an answer and what its request held until it is written.
pub type Answer = (ClientResponse, Option<Held>);

async fn serve_conn(stream: TcpStream, app: Arc<App>) {
    let peer = stream.peer_addr().ok();
    let (rd, mut wr) = stream.into_split();
    // One answer per in-flight slot, plus the last word on a bad frame: an answer can
    // always be queued without waiting (see `Reply::send`).
    let (tx, mut rx) = mpsc::channel::<Answer>(MAX_IN_FLIGHT + 1);
    let backlog = Arc::new(Backlog::default());
    let drained = backlog.clone();
    let writer = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut written = Vec::new();
        while let Some(first) = rx.recv().await {
            out.clear();
            let mut counted = 0;
            gather(
                first,
                || rx.try_recv().ok(),
                MAX_WRITE,
                &mut out,
                |(resp, held): Answer, out| {
                    encode_frame(&resp, out);
                    counted += held.as_ref().map_or(0, |h| h.queued);
                    written.push(held);
                },
            );
            let wrote = tokio::select! {
                r = wr.write_all(&out) => r.is_ok(),
                // Past the hard limit: hang up instead of finishing a write the client
                // is not reading.
                () = drained.until_closed() => false,
            };
            if !wrote || drained.is_closed() {
                drained.close();
                if drained.bytes.load(Ordering::Relaxed) > MAX_BACKLOG_HARD {
                    tracing::info!("closing a client connection that does not read its answers");
                }
                break;
            }
            // Only now are these requests done with: their slots and bytes are free.
            written.clear();
            drained.written(counted);
            if out.capacity() > MAX_WRITE * 2 {
                out = Vec::new();
            }
        }
    });
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let len = match read_len_within(&mut rd, IDLE_TIMEOUT).await {
            Ok(len) => len,
            Err(FrameError::Closed | FrameError::TimedOut(_)) => break,
            Err(e) => {
                tracing::debug!(?peer, error = %e, "client connection failed");
                break;
            }
        };
        // Every request takes a slot until its answer is written, refused ones too: the
        // answer queue then always has room (see `Reply::send`).
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        if len > app.max_frame {
            // A definite failure of that one request: the stream stays in step, so what
            // the client pipelined behind it is still answered.
            app.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
            let error = FrameError::TooLarge { len, max: app.max_frame }.to_string();
            let id = match skip_frame(&mut rd, len, BODY_TIMEOUT).await {
                Ok(Some(id)) => id,
                _ => {
                    let bad = ClientResponse { code: Code::BadRequest as i32, error, ..Default::default() };
                    let _ = tx.send((bad, None)).await;
                    break;
                }
            };
            let bad = ClientResponse { id, code: Code::BadRequest as i32, error, ..Default::default() };
            let mut held = Held { _slot: slot, _bytes: None, backlog: backlog.clone(), queued: 0 };
            held.queued = backlog.add(&bad);
            if tx.send((bad, Some(held))).await.is_err() {
                break;
            }
            continue;
        }
        backlog.below(MAX_BACKLOG).await;
        if backlog.is_closed() {
            break;
        }
        // Requests count against the member's budget for client requests from their first
        // byte until their answer is written, so connections together never hold more.
        let body = read_body_budgeted(&mut rd, len, app.max_frame, &mut buf, BODY_TIMEOUT, &app.request_budget);
        let (req, bytes): (ClientRequest, _) = match body.await {
            Ok(r) => r,
            Err(e) => {
                // The stream is out of step (or hostile): say why, then hang up.
                app.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?peer, error = %e, "bad frame from client");
                let bad = ClientResponse { code: Code::BadRequest as i32, error: e.to_string(), ..Default::default() };
                let _ = tx.send((bad, None)).await;
                break;
            }
        };
        let held = Held { _slot: slot, _bytes: Some(bytes), backlog: backlog.clone(), queued: 0 };
        // The common cases answer straight into the writer's queue, without a task per
        // request: proposals (from the batch's responder) and queries that need no read
        // barrier (from the state-machine thread).
        if req.kind == RequestKind::Propose as i32 {
            app.submit(req.payload, Reply::Frame { id: req.id, to: tx.clone(), held }).await;
            continue;
        }
        if req.kind == RequestKind::Query as i32 && app.may_answer_now(req.stale_ok) {
            app.answer_now(req.payload, Reply::Frame { id: req.id, to: tx.clone(), held });
            continue;
        }
        let app = app.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let resp = handle(&app, req).await;
            let mut held = held;
            held.queued = held.backlog.add(&resp);
            let _ = tx.send((resp, Some(held))).await;
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
