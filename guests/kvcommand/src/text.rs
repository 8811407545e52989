//! The seed's text protocol, one command or answer per line: requests `get-K`,
//! `set-K-V`, `delete-K`; answers `OK: <value>` and `ERR: <why>`, with
//! `ERR: unknown outcome: <why>` when the command may have been applied.
//!
//! The guests (through [`crate::command::parse`]), the host's text port and the clients
//! (`loadgen --text`) all read and write these lines through this module, so the three
//! cannot drift apart. Lines are handled without their line ending: the reader strips it,
//! the writer adds `\n`.

use crate::command::{quote, Command};
use crate::proto::Op;

pub const GET: &str = "get-";
pub const SET: &str = "set-";
pub const DELETE: &str = "delete-";
/// Starts a successful answer; the value follows after a space.
pub const OK: &str = "OK:";
/// Starts a failed answer; the reason follows after a space.
pub const ERR: &str = "ERR:";
/// Starts the reason of a failed answer whose command may have taken effect.
pub const UNKNOWN_OUTCOME: &str = "unknown outcome";
/// Starts the key/value guests' error result for a key that holds nothing.
pub const KEY_NOT_FOUND: &str = "key not found";

/// How many characters of a refused line its error quotes.
const SHOWN_CHARS: usize = 64;

/// The text form of a command, if `bytes` has one of the three prefixes: `None` for
/// anything else (which may still be a protobuf command), else the command or why it is
/// malformed.
///
/// A `get-`/`delete-` key is the whole rest of the line, so keys containing `-` (which
/// only the protobuf form can set) stay reachable from the text form; a `set-` key ends
/// at the first `-` and the value is the whole rest. Line endings are part of the key or
/// value: the host strips them before proposing, so one that arrives here was meant.
pub fn parse_command(bytes: &[u8]) -> Option<Result<Command, String>> {
    if let Some(rest) = bytes.strip_prefix(GET.as_bytes()) {
        return Some(key_of(bytes, rest).map(|key| Command::Get { key }));
    }
    if let Some(rest) = bytes.strip_prefix(DELETE.as_bytes()) {
        return Some(key_of(bytes, rest).map(|key| Command::Delete { key }));
    }
    let rest = bytes.strip_prefix(SET.as_bytes())?;
    let Some(dash) = rest.iter().position(|&b| b == b'-') else {
        return Some(Err(format!("malformed command {}: expected set-K-V", quote(bytes))));
    };
    Some(key_of(bytes, &rest[..dash]).map(|key| Command::Set { key, value: rest[dash + 1..].to_vec() }))
}

fn key_of(command: &[u8], key: &[u8]) -> Result<String, String> {
    if key.is_empty() {
        return Err(format!("malformed command {}: empty key", quote(command)));
    }
    String::from_utf8(key.to_vec()).map_err(|_| format!("malformed command {}: key is not UTF-8", quote(command)))
}

/// A request line as the host's text port takes it (without its line ending). Stricter
/// than [`parse_command`]: a key may not start with `-` either, so a doubled separator
/// (`get--1`) is refused at the port instead of reaching the log as a command on the
/// key `-1`. Anything refused gets the same message, naming the three forms.
pub fn parse_request(line: &str) -> Result<Command, String> {
    match parse_command(line.as_bytes()) {
        Some(Ok(cmd)) if !cmd.key().starts_with('-') => Ok(cmd),
        _ => {
            let shown: String = line.chars().take(SHOWN_CHARS).collect();
            Err(format!("unknown command {shown:?} (expected set-K-V, get-K or delete-K)"))
        }
    }
}

/// The request line (without its line ending) for a command, or why it has none: the
/// key must be one [`parse_request`] gives back whole (not empty, no leading `-`, no `-`
/// at all in a `set`), and nothing may break the line.
pub fn format_request(op: Op, key: &str, value: &[u8]) -> Result<String, String> {
    let breaks_line = |b: &[u8]| b.iter().any(|&c| c == b'\n' || c == b'\r');
    if key.is_empty() || key.starts_with('-') || breaks_line(key.as_bytes()) {
        return Err(format!("key {} has no text form", quote(key.as_bytes())));
    }
    Ok(match op {
        Op::Get => format!("{GET}{key}"),
        Op::Delete => format!("{DELETE}{key}"),
        Op::Set => {
            if key.contains('-') {
                return Err(format!("key {} has no text form in a set: it contains '-'", quote(key.as_bytes())));
            }
            let value = std::str::from_utf8(value)
                .ok()
                .filter(|v| !breaks_line(v.as_bytes()))
                .ok_or_else(|| format!("value {} has no text form", quote(value)))?;
            format!("{SET}{key}-{value}")
        }
    })
}

/// A line break inside an answer would end it early and shift every later answer.
fn one_line(s: &str) -> String {
    s.replace('\n', "\\n").replace('\r', "\\r")
}

/// `OK: <value>`, the value read as UTF-8 (lossily) and kept on one line.
pub fn format_ok(value: &[u8]) -> String {
    format!("{OK} {}", one_line(&String::from_utf8_lossy(value)))
}

/// `ERR: <why>`, kept on one line.
pub fn format_err(why: &str) -> String {
    format!("{ERR} {}", one_line(why))
}

/// `ERR: unknown outcome: <why>`, kept on one line.
pub fn format_unknown(why: &str) -> String {
    format_err(&format!("{UNKNOWN_OUTCOME}: {why}"))
}

/// What an answer line says. The text protocol has no separate code for the guest's own
/// error results: they are `Err`, told apart by their reason (e.g. [`KEY_NOT_FOUND`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<'a> {
    /// The command took effect (or the read succeeded); the value as sent.
    Ok(&'a str),
    /// The command did not take effect.
    Err(&'a str),
    /// The command may or may not have taken effect.
    UnknownOutcome(&'a str),
    /// Not an answer line.
    Malformed,
}

/// Reads an answer line, with or without its line ending.
pub fn parse_answer(line: &str) -> Answer<'_> {
    let line = line.trim_end_matches(['\n', '\r']);
    if let Some(rest) = line.strip_prefix(OK) {
        return Answer::Ok(after_space(rest));
    }
    let Some(why) = line.strip_prefix(ERR).map(after_space) else {
        return Answer::Malformed;
    };
    match why.strip_prefix(UNKNOWN_OUTCOME) {
        Some(rest) => Answer::UnknownOutcome(rest.strip_prefix(':').map_or(rest, after_space)),
        None => Answer::Err(why),
    }
}

fn after_space(rest: &str) -> &str {
    rest.strip_prefix(' ').unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_the_port_takes() {
        let get = |k: &str| Command::Get { key: k.into() };
        assert_eq!(parse_request("get-1"), Ok(get("1")));
        assert_eq!(parse_request("get-a-b"), Ok(get("a-b")));
        assert_eq!(parse_request("delete-x"), Ok(Command::Delete { key: "x".into() }));
        assert_eq!(parse_request("set-1-a"), Ok(Command::Set { key: "1".into(), value: b"a".to_vec() }));
        assert_eq!(parse_request("set-k-"), Ok(Command::Set { key: "k".into(), value: Vec::new() }));
        assert_eq!(parse_request("set-k-a-b"), Ok(Command::Set { key: "k".into(), value: b"a-b".to_vec() }));
        for bad in ["hello", "get-", "set-1", "set--v", "put-1-2", "delete-", "", "get--1", "delete--"] {
            let err = parse_request(bad).expect_err(bad);
            assert!(err.starts_with("unknown command") && err.contains("set-K-V, get-K or delete-K"), "{err}");
        }
        let long = format!("get-{}", "-".repeat(1000));
        assert!(parse_request(&long).expect_err("leading dash").len() < 200);
    }

    #[test]
    fn parse_command_sees_only_the_text_forms() {
        assert_eq!(parse_command(b"\x08\x01"), None);
        assert_eq!(parse_command(b"hello"), None);
        // Unlike the port, the guest takes any non-empty key, so a protobuf-set key that
        // starts with '-' can be read back as text.
        assert_eq!(parse_command(b"get--1"), Some(Ok(Command::Get { key: "-1".into() })));
        assert!(parse_command(b"set-a").expect("a text form").is_err());
    }

    #[test]
    fn formatted_requests_parse_back() {
        for (op, key, value, expected) in [
            (Op::Get, "7", &b""[..], Command::Get { key: "7".into() }),
            (Op::Delete, "a-b", b"", Command::Delete { key: "a-b".into() }),
            (Op::Set, "k", b"v-w x", Command::Set { key: "k".into(), value: b"v-w x".to_vec() }),
        ] {
            let line = format_request(op, key, value).expect("has a text form");
            assert_eq!(parse_request(&line), Ok(expected));
        }
        assert_eq!(format_request(Op::Set, "1", b"vv"), Ok("set-1-vv".to_string()));
        assert_eq!(format_request(Op::Get, "1", b""), Ok("get-1".to_string()));
        for (op, key, value) in [
            (Op::Get, "", &b""[..]),
            (Op::Get, "-1", b""),
            (Op::Set, "a-b", b"v"),
            (Op::Set, "a", b"v\n"),
            (Op::Set, "a", b"\xff"),
            (Op::Delete, "a\r", b""),
        ] {
            assert!(format_request(op, key, value).is_err(), "{op:?} {key:?} {value:?}");
        }
    }

    #[test]
    fn answers_stay_on_one_line_and_parse_back() {
        assert_eq!(format_ok(b"a\nb"), "OK: a\\nb");
        assert_eq!(format_ok(b""), "OK: ");
        assert_eq!(format_err("key not found: 1"), "ERR: key not found: 1");
        assert_eq!(format_err("x\r\ny"), "ERR: x\\r\\ny");
        assert_eq!(format_unknown("timeout"), "ERR: unknown outcome: timeout");

        assert_eq!(parse_answer(&format_ok(b"vvv")), Answer::Ok("vvv"));
        assert_eq!(parse_answer("OK: \n"), Answer::Ok(""));
        assert_eq!(parse_answer("OK:x"), Answer::Ok("x"));
        assert_eq!(parse_answer("ERR: key not found: 12\r\n"), Answer::Err("key not found: 12"));
        assert_eq!(parse_answer(&format_unknown("connection lost")), Answer::UnknownOutcome("connection lost"));
        assert_eq!(parse_answer("ERR: unknown outcome"), Answer::UnknownOutcome(""));
        assert_eq!(
            parse_answer("ERR: no leader available, retry later"),
            Answer::Err("no leader available, retry later")
        );
        assert_eq!(parse_answer("hello"), Answer::Malformed);
        assert_eq!(parse_answer(""), Answer::Malformed);
    }
}
