//! The protobuf form of a key/value command, declared by hand so that building a guest
//! needs no `protoc`. Rust clients use this module (`kv` and `loadgen` do); others
//! should mirror:
//!
//! ```proto
//! syntax = "proto3";
//! message Command { Op op = 1; string key = 2; bytes value = 3; }
//! enum Op { GET = 0; SET = 1; DELETE = 2; }
//! ```

/// One command: `value` is read only by [`Op::Set`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    #[prost(enumeration = "Op", tag = "1")]
    pub op: i32,
    #[prost(string, tag = "2")]
    pub key: String,
    #[prost(bytes = "vec", tag = "3")]
    pub value: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Op {
    Get = 0,
    Set = 1,
    Delete = 2,
}

/// Encode a command for `apply` (set, delete) or `query` (get).
pub fn encode(op: Op, key: &str, value: &[u8]) -> Vec<u8> {
    prost::Message::encode_to_vec(&Command { op: op as i32, key: key.to_string(), value: value.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn encoding_matches_the_proto_declaration() {
        let command = Command { op: Op::Set as i32, key: "k".into(), value: b"v".to_vec() };
        // Field 1 varint, field 2 bytes, field 3 bytes: the wire form other languages produce.
        assert_eq!(command.encode_to_vec(), [0x08, 0x01, 0x12, 0x01, b'k', 0x1a, 0x01, b'v']);
        let decoded = Command::decode(&[0x08, 0x02, 0x12, 0x01, b'z'][..]).expect("decodes");
        assert_eq!(decoded.op(), Op::Delete);
        assert_eq!(decoded.key, "z");
        assert!(decoded.value.is_empty());
    }
}
