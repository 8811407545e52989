//! How a client sends one request and what came of it: over the binary protocol (a
//! shared [`Client`]) or the text protocol (a connection of its own per client).

use std::sync::Arc;
use std::time::Duration;

use kvcommand::proto::{encode, Op};
use kvcommand::text;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::workload::Request;
use crate::client::{Client, ClientError};

/// How long a text request may wait for its answer (the binary client's own deadline
/// is 20 s too).
const TEXT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a text connection may take to open.
const TEXT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest accepted answer line: the server's longest value plus its prefix.
const MAX_TEXT_LINE: u64 = (1 << 20) + 1024;

/// How one request ended (see the [module documentation](super)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    GuestError,
    Error,
    Unknown,
}

pub fn classify_binary(res: &Result<Vec<u8>, ClientError>) -> Answer {
    match res {
        Ok(_) => Answer::Ok,
        Err(ClientError::Guest(_)) => Answer::GuestError,
        Err(ClientError::UnknownOutcome(_)) => Answer::Unknown,
        Err(_) => Answer::Error,
    }
}

/// The text protocol has no separate code for the guest's error result; the only one
/// the key/value guests give to this workload's requests is `key not found`.
pub fn classify_text(line: &str) -> Answer {
    match text::parse_answer(line) {
        text::Answer::Ok(_) => Answer::Ok,
        text::Answer::Err(why) if why.starts_with(text::KEY_NOT_FOUND) => Answer::GuestError,
        text::Answer::UnknownOutcome(_) => Answer::Unknown,
        text::Answer::Err(_) | text::Answer::Malformed => Answer::Error,
    }
}

/// One client's connection to the text protocol. It moves to the next address
/// (round-robin) whenever its connection fails; the caller pauses before retrying.
pub struct TextDriver {
    addrs: Vec<String>,
    next: usize,
    conn: Option<BufReader<TcpStream>>,
    /// The value every set writes: only `v`s, which the text form carries as they are.
    value: Vec<u8>,
    request: Vec<u8>,
    line: Vec<u8>,
}

impl TextDriver {
    pub fn new(addrs: Vec<String>, first: usize, value_size: usize) -> TextDriver {
        TextDriver {
            addrs,
            next: first,
            conn: None,
            value: vec![b'v'; value_size],
            request: Vec::new(),
            line: Vec::new(),
        }
    }

    pub async fn call(&mut self, req: Request) -> Answer {
        let (formatted, is_write) = match req {
            Request::Get(k) => (text::format_request(Op::Get, &k.to_string(), b""), false),
            Request::Set(k) => (text::format_request(Op::Set, &k.to_string(), &self.value), true),
        };
        let Ok(formatted) = formatted else {
            // A numeric key and a value of `v`s always have a text form.
            return Answer::Error;
        };
        self.request.clear();
        self.request.extend_from_slice(formatted.as_bytes());
        self.request.push(b'\n');
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let addr = &self.addrs[self.next % self.addrs.len()];
                match tokio::time::timeout(TEXT_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        self.conn.insert(BufReader::new(s))
                    }
                    // Nothing was sent: it cannot have taken effect.
                    _ => {
                        self.next = self.next.wrapping_add(1);
                        return Answer::Error;
                    }
                }
            }
        };
        let line = &mut self.line;
        line.clear();
        let request = &self.request;
        let exchange = async {
            conn.get_mut().write_all(request).await?;
            let n = (&mut *conn).take(MAX_TEXT_LINE).read_until(b'\n', line).await?;
            if n == 0 || line.last() != Some(&b'\n') {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no complete answer line"));
            }
            Ok(())
        };
        match tokio::time::timeout(TEXT_TIMEOUT, exchange).await {
            Ok(Ok(())) => classify_text(&String::from_utf8_lossy(line)),
            _ => {
                self.conn = None;
                self.next = self.next.wrapping_add(1);
                // A write may have reached the server before the connection broke.
                if is_write {
                    Answer::Unknown
                } else {
                    Answer::Error
                }
            }
        }
    }
}

pub enum Driver {
    Binary { client: Arc<Client>, value: Arc<[u8]> },
    Text(TextDriver),
}

impl Driver {
    pub async fn call(&mut self, req: Request) -> Answer {
        match self {
            Driver::Binary { client, value } => {
                let res = match req {
                    Request::Get(k) => client.query(encode(Op::Get, &k.to_string(), b""), false).await,
                    Request::Set(k) => client.propose(encode(Op::Set, &k.to_string(), value)).await,
                };
                classify_binary(&res)
            }
            Driver::Text(t) => t.call(req).await,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn text_answers() {
        assert_eq!(classify_text("OK: vvv"), Answer::Ok);
        assert_eq!(classify_text("OK: "), Answer::Ok);
        assert_eq!(classify_text("OK: vvv\n"), Answer::Ok);
        assert_eq!(classify_text("ERR: key not found: 12"), Answer::GuestError);
        assert_eq!(classify_text("ERR: unknown outcome: connection lost"), Answer::Unknown);
        assert_eq!(classify_text("ERR: no leader available, retry later"), Answer::Error);
        assert_eq!(classify_text("hello"), Answer::Error);
        assert_eq!(classify_binary(&Ok(vec![])), Answer::Ok);
        assert_eq!(classify_binary(&Err(ClientError::Guest("key not found: 1".into()))), Answer::GuestError);
        assert_eq!(classify_binary(&Err(ClientError::UnknownOutcome("x".into()))), Answer::Unknown);
        assert_eq!(classify_binary(&Err(ClientError::Unavailable("x".into()))), Answer::Error);
    }

    /// A text server answering like the kvstore cluster: sets succeed, `get-0` finds
    /// nothing, `get-1` has an unknown outcome, anything else is refused.
    pub(in crate::loadgen) async fn fake_text_server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (rd, mut wr) = s.into_split();
                    let mut lines = BufReader::new(rd).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        let set_value = l.strip_prefix("set-").and_then(|r| r.split_once('-')).map(|(_, v)| v);
                        let reply = if set_value.is_some_and(|v| !v.contains('-')) {
                            "OK: ".to_string()
                        } else if l == "get-0" {
                            "ERR: key not found: 0".into()
                        } else if l == "get-1" {
                            "ERR: unknown outcome: test".into()
                        } else {
                            format!("ERR: refused {l}")
                        };
                        if wr.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    pub(in crate::loadgen) async fn closed_port() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").to_string()
    }

    #[tokio::test]
    async fn text_driver_classifies_answers_and_moves_on_from_dead_members() {
        let good = fake_text_server().await;
        let dead = closed_port().await;
        let mut d = TextDriver::new(vec![dead, good], 0, 4);
        assert_eq!(d.call(Request::Set(5)).await, Answer::Error, "connection refused");
        assert_eq!(d.call(Request::Set(5)).await, Answer::Ok, "next address");
        assert_eq!(d.call(Request::Get(0)).await, Answer::GuestError);
        assert_eq!(d.call(Request::Get(1)).await, Answer::Unknown);
        assert_eq!(d.call(Request::Get(2)).await, Answer::Error);
        assert_eq!(d.call(Request::Set(6)).await, Answer::Ok, "same connection keeps working");
    }
}
