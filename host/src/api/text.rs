//! The original project's text protocol: one command per line (`set-K-V`, `get-K`,
//! `delete-K`), each proposed through the log and answered on the same connection, in
//! order, with `OK: <value>` or `ERR: <why>` (`ERR: unknown outcome: <why>` when the
//! command may have been applied). Usable with `nc`. The grammar of the lines is
//! `kvcommand::text`, shared with the guests and the clients.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvcommand::text;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::{App, Outcome};

/// Longest accepted line: a 1 MiB value plus the command around it.
const MAX_LINE: usize = (1 << 20) + 1024;

pub async fn serve(listener: TcpListener, app: Arc<App>) {
    crate::net::accept_loop(listener, "text", app.max_connections, move |stream| serve_conn(stream, app.clone())).await;
}

/// Whether a line is one of the three commands; anything else never reaches the log.
pub fn validate(line: &str) -> Result<(), String> {
    text::parse_request(line).map(drop)
}

/// Render an outcome as one response line (without the newline).
pub fn render(outcome: Outcome) -> String {
    match outcome {
        Outcome::Ok(v) => text::format_ok(&v),
        Outcome::GuestError(e) | Outcome::Rejected(e) => text::format_err(&e),
        Outcome::Unknown(e) => text::format_unknown(&e),
        Outcome::NotLeader(_) => text::format_err("no leader available, retry later"),
    }
}

async fn serve_conn(stream: TcpStream, app: Arc<App>) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    loop {
        if line.capacity() > 64 * 1024 {
            // One long line must not stay allocated for the connection's life.
            line = Vec::new();
        }
        line.clear();
        // Idle between lines, or trickling one, for longer than this: hang up.
        let mut limited = (&mut rd).take(MAX_LINE as u64 + 1);
        let n = match tokio::time::timeout(super::binary::IDLE_TIMEOUT, limited.read_until(b'\n', &mut line)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if line.last() != Some(&b'\n') {
            if n > MAX_LINE {
                app.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
                let refusal = text::format_err(&format!("line longer than {MAX_LINE} bytes"));
                let _ = wr.write_all(format!("{refusal}\n").as_bytes()).await;
            }
            // Otherwise the connection ended in the middle of a line: a command cut short
            // (a value missing its end) must not be applied.
            return;
        }
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if line.is_empty() {
            continue;
        }
        // Commands are answered strictly in order: a client's pipelined set then get on
        // one connection must observe each other.
        let reply = match std::str::from_utf8(&line)
            .map_err(|_| "line is not UTF-8".to_string())
            .and_then(|l| validate(l).map(|()| l))
        {
            Ok(cmd) => render(app.propose_or_forward(cmd.as_bytes().to_vec()).await),
            Err(why) => {
                app.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
                text::format_err(&why)
            }
        };
        let mut out = reply.into_bytes();
        out.push(b'\n');
        if wr.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_the_three_forms() {
        for ok in ["set-1-a", "set-k-", "set-k-a-b", "get-1", "delete-x"] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
        for bad in ["hello", "get-", "set-1", "set--v", "put-1-2", "delete-", ""] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn renders_outcomes_on_one_line() {
        assert_eq!(render(Outcome::Ok(b"a\nb".to_vec())), "OK: a\\nb");
        assert_eq!(render(Outcome::GuestError("key not found: 1".into())), "ERR: key not found: 1");
        assert_eq!(render(Outcome::Unknown("timeout".into())), "ERR: unknown outcome: timeout");
    }
}
