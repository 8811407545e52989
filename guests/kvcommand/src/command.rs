//! Decoding of command bytes, shared by `apply` and `query`.
//!
//! Two forms are accepted. The text lines `get-K`, `set-K-V` and `delete-K` are
//! recognised by their prefix (their grammar is in [`crate::text`]); everything else is a
//! protobuf [`proto::Command`]. The two cannot be confused: `g`, `s` and `d` as a first
//! byte would be protobuf tags with wire types 7, 3 and 4, none of which a `Command` can
//! start with.

use prost::Message;

use crate::{proto, text};

/// How many bytes of a bad command an error message quotes: enough to recognise it,
/// without replicating a huge payload back in every error.
const QUOTE_LIMIT: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Get { key: String },
    Set { key: String, value: Vec<u8> },
    Delete { key: String },
}

impl Command {
    pub fn key(&self) -> &str {
        match self {
            Command::Get { key } | Command::Set { key, .. } | Command::Delete { key } => key,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Get { .. } => "get",
            Command::Set { .. } => "set",
            Command::Delete { .. } => "delete",
        }
    }
}

pub fn parse(bytes: &[u8]) -> Result<Command, String> {
    if let Some(text) = text::parse_command(bytes) {
        return text;
    }
    if looks_like_text(bytes) {
        return Err(unknown(bytes));
    }
    let decoded = proto::Command::decode(bytes)
        .map_err(|e| format!("malformed command: not a text command nor a protobuf Command: {e}"))?;
    let op = proto::Op::try_from(decoded.op)
        .map_err(|_| format!("malformed command: unknown protobuf op {}", decoded.op))?;
    if decoded.key.is_empty() {
        return Err("malformed command: empty key".to_string());
    }
    let key = decoded.key;
    Ok(match op {
        proto::Op::Get => Command::Get { key },
        proto::Op::Set => Command::Set { key, value: decoded.value },
        proto::Op::Delete => Command::Delete { key },
    })
}

/// A meaningful protobuf `Command` always holds one of the tag bytes 0x08, 0x12 or 0x1a,
/// which are control characters; so printable UTF-8 is a mistyped text command and
/// deserves a hint rather than a protobuf decoding error.
fn looks_like_text(bytes: &[u8]) -> bool {
    match std::str::from_utf8(bytes) {
        Ok(text) => !text.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\r' | '\n')),
        Err(_) => false,
    }
}

fn unknown(bytes: &[u8]) -> String {
    format!("unknown command {}: expected get-KEY, set-KEY-VALUE, delete-KEY or a protobuf Command", quote(bytes))
}

/// The key a read-only request asks for: of the commands, only `get` may be a query.
pub fn query_key(request: &[u8]) -> Result<String, String> {
    match parse(request)? {
        Command::Get { key } => Ok(key),
        other => Err(format!(
            "query is read-only: {} {} must be proposed as a command",
            other.name(),
            quote(other.key().as_bytes())
        )),
    }
}

pub fn quote(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(QUOTE_LIMIT)];
    let mut quoted = format!("{:?}", String::from_utf8_lossy(shown));
    if bytes.len() > QUOTE_LIMIT {
        quoted.push_str("...");
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(key: &str) -> Command {
        Command::Get { key: key.into() }
    }

    fn set(key: &str, value: &[u8]) -> Command {
        Command::Set { key: key.into(), value: value.to_vec() }
    }

    fn delete(key: &str) -> Command {
        Command::Delete { key: key.into() }
    }

    fn parse_err(bytes: &[u8]) -> String {
        parse(bytes).expect_err("must be rejected")
    }

    fn encode(op: proto::Op, key: &str, value: &[u8]) -> Vec<u8> {
        proto::Command { op: op as i32, key: key.into(), value: value.to_vec() }.encode_to_vec()
    }

    #[test]
    fn text_commands() {
        assert_eq!(parse(b"get-a"), Ok(get("a")));
        assert_eq!(parse(b"set-1-2"), Ok(set("1", b"2")));
        assert_eq!(parse(b"delete-x"), Ok(delete("x")));
        assert_eq!(parse("set-ключ-значение".as_bytes()), Ok(set("ключ", "значение".as_bytes())));
    }

    #[test]
    fn set_value_is_the_whole_rest() {
        assert_eq!(parse(b"set-1-"), Ok(set("1", b"")));
        assert_eq!(parse(b"set-a-b-c"), Ok(set("a", b"b-c")));
        assert_eq!(parse(b"set-a--"), Ok(set("a", b"-")));
        assert_eq!(parse(b"set-a-\xff\x00"), Ok(set("a", b"\xff\x00")));
    }

    #[test]
    fn get_and_delete_keys_may_contain_dashes() {
        assert_eq!(parse(b"get-a-b"), Ok(get("a-b")));
        assert_eq!(parse(b"delete-a-"), Ok(delete("a-")));
    }

    #[test]
    fn empty_keys_are_rejected() {
        assert!(parse_err(b"get-").contains("empty key"));
        assert!(parse_err(b"delete-").contains("empty key"));
        assert!(parse_err(b"set--v").contains("empty key"));
        assert!(parse_err(&encode(proto::Op::Delete, "", b"")).contains("empty key"));
        assert!(parse_err(&encode(proto::Op::Set, "", b"v")).contains("empty key"));
        // GET of an empty key encodes to no bytes at all, which reads as an empty command.
        assert!(parse_err(&encode(proto::Op::Get, "", b"")).starts_with("unknown command"));
    }

    #[test]
    fn set_without_value_separator_is_rejected() {
        assert!(parse_err(b"set-a").contains("expected set-K-V"));
        assert!(parse_err(b"set-").contains("expected set-K-V"));
    }

    #[test]
    fn line_endings_stay_in_the_key() {
        assert_eq!(parse(b"get-a\n"), Ok(get("a\n")));
        assert_eq!(parse(b"delete-a\r\n"), Ok(delete("a\r\n")));
        assert_eq!(parse(b"set-a-b\n"), Ok(set("a", b"b\n")));
    }

    #[test]
    fn non_utf8_key_is_rejected() {
        assert!(parse_err(b"get-\xff").contains("not UTF-8"));
        assert!(parse_err(b"set-\xff-1").contains("not UTF-8"));
    }

    #[test]
    fn unknown_text_names_the_accepted_forms() {
        for bytes in [&b"put-1-2"[..], b"hello", b"hi", b"GET-a", b"get", b"hello\n", b""] {
            let err = parse_err(bytes);
            assert!(err.starts_with("unknown command"), "{bytes:?}: {err}");
            assert!(err.contains("set-KEY-VALUE"), "{err}");
        }
    }

    #[test]
    fn protobuf_commands() {
        assert_eq!(parse(&encode(proto::Op::Get, "k", b"")), Ok(get("k")));
        assert_eq!(parse(&encode(proto::Op::Set, "k", b"v")), Ok(set("k", b"v")));
        assert_eq!(parse(&encode(proto::Op::Set, "k", b"")), Ok(set("k", b"")));
        assert_eq!(parse(&encode(proto::Op::Delete, "k-1", b"")), Ok(delete("k-1")));
        // A key that would read as a text command's prefix is fine inside protobuf.
        assert_eq!(parse(&encode(proto::Op::Get, "get-x", b"")), Ok(get("get-x")));
    }

    #[test]
    fn malformed_protobuf_is_an_error() {
        // Field 2 (key) claims 5 bytes but only 1 follows.
        assert!(parse_err(&[0x12, 0x05, b'a']).starts_with("malformed command"));
        // Key bytes that are not UTF-8.
        assert!(parse_err(&[0x12, 0x01, 0xff]).starts_with("malformed command"));
        // Op 7 does not exist.
        let err = parse_err(&[0x08, 0x07, 0x12, 0x01, b'a']);
        assert!(err.contains("unknown protobuf op 7"), "{err}");
    }

    #[test]
    fn quotes_are_truncated() {
        let long = vec![b'z'; 1000];
        let err = parse_err(&long);
        assert!(err.len() < 200, "{err}");
        assert!(err.contains("..."));
    }
}
