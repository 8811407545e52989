//! The replicated state: an ordered map plus a digest kept up to date on every change.

use std::collections::btree_map::{self, BTreeMap};

use xxhash_rust::xxh3::Xxh3;

use crate::command::{self, Command};
use crate::settings::Settings;
pub use kvcommand::digest::Digest;

/// The key length goes first so that ("ab", "c") and ("a", "bc") hash differently.
fn pair_hash(key: &str, value: &[u8]) -> u128 {
    // Keys never exceed u32::MAX bytes on wasm32; saturating only matters natively.
    let key_len = u32::try_from(key.len()).unwrap_or(u32::MAX);
    let mut hasher = Xxh3::new();
    hasher.update(&key_len.to_le_bytes());
    hasher.update(key.as_bytes());
    hasher.update(value);
    hasher.digest128()
}

/// The contents a snapshot carries: the map and its digest, changed only together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    map: BTreeMap<String, Vec<u8>>,
    digest: Digest,
}

impl Table {
    pub fn map(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.map
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn get(&self, key: &str) -> Option<&Vec<u8>> {
        self.map.get(key)
    }

    pub fn insert(&mut self, key: String, value: Vec<u8>) {
        let added = pair_hash(&key, &value);
        match self.map.entry(key) {
            btree_map::Entry::Occupied(mut entry) => {
                let old = entry.insert(value);
                self.digest.remove(pair_hash(entry.key(), &old));
                self.digest.add(added);
            }
            btree_map::Entry::Vacant(entry) => {
                entry.insert(value);
                self.digest.add(added);
            }
        }
    }

    pub fn remove(&mut self, key: &str) {
        if let Some((key, value)) = self.map.remove_entry(key) {
            self.digest.remove(pair_hash(&key, &value));
        }
    }
}

#[derive(Debug)]
pub struct Store {
    table: Table,
    max_value_size: u32,
    /// Changes on every mutation, so an open snapshot can tell that the state it is
    /// streaming moved under it instead of emitting a mix of two states.
    generation: u64,
}

/// The state before `init`: the default settings, so that it already behaves as
/// configured rather than with a zero size limit.
impl Default for Store {
    fn default() -> Self {
        Store::new(&Settings::default())
    }
}

impl Store {
    pub fn new(settings: &Settings) -> Store {
        let mut table = Table::default();
        let value = vec![b'x'; settings.preload_value_size as usize];
        for i in 0..settings.preload_keys {
            table.insert(i.to_string(), value.clone());
        }
        Store { table, max_value_size: settings.max_value_size, generation: 0 }
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn digest(&self) -> [u8; Digest::LEN] {
        self.table.digest.to_bytes()
    }

    /// Replaces the contents with a restored table, keeping this instance's settings.
    pub fn replace_table(&mut self, table: Table) {
        self.table = table;
        self.generation += 1;
    }

    pub fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
        match command::parse(command)? {
            Command::Get { key } => self.get(&key),
            Command::Set { key, value } => {
                if value.len() > self.max_value_size as usize {
                    return Err(format!(
                        "value too large for key {key:?}: {} bytes, max-value-size is {}",
                        value.len(),
                        self.max_value_size
                    ));
                }
                self.table.insert(key, value);
                self.generation += 1;
                Ok(Vec::new())
            }
            Command::Delete { key } => {
                self.table.remove(&key);
                self.generation += 1;
                Ok(Vec::new())
            }
        }
    }

    pub fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        self.get(&command::query_key(request)?)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, String> {
        self.table.get(key).cloned().ok_or_else(|| format!("key not found: {key}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use prost::Message;

    fn store() -> Store {
        Store::default()
    }

    fn encode(op: proto::Op, key: &str, value: &[u8]) -> Vec<u8> {
        proto::Command { op: op as i32, key: key.into(), value: value.to_vec() }.encode_to_vec()
    }

    #[test]
    fn apply_results() {
        let mut s = store();
        assert_eq!(s.apply(b"get-a"), Err("key not found: a".to_string()));
        assert_eq!(s.apply(b"set-a-1"), Ok(vec![]));
        assert_eq!(s.apply(b"get-a"), Ok(b"1".to_vec()));
        assert_eq!(s.apply(b"set-a-2-3"), Ok(vec![]));
        assert_eq!(s.apply(b"get-a"), Ok(b"2-3".to_vec()));
        assert_eq!(s.apply(b"set-b-"), Ok(vec![]));
        assert_eq!(s.apply(b"get-b"), Ok(vec![]));
        assert_eq!(s.apply(b"delete-a"), Ok(vec![]));
        assert_eq!(s.apply(b"get-a"), Err("key not found: a".to_string()));
        assert_eq!(s.apply(b"delete-never-there"), Ok(vec![]));
        assert_eq!(s.table().map().len(), 1);
    }

    #[test]
    fn apply_protobuf() {
        let mut s = store();
        assert_eq!(s.apply(&encode(proto::Op::Set, "k", b"\x00\xff")), Ok(vec![]));
        assert_eq!(s.apply(b"get-k"), Ok(b"\x00\xff".to_vec()));
        assert_eq!(s.apply(&encode(proto::Op::Get, "k", b"")), Ok(b"\x00\xff".to_vec()));
        assert_eq!(s.apply(&encode(proto::Op::Delete, "k", b"")), Ok(vec![]));
        assert!(s.apply(&encode(proto::Op::Get, "k", b"")).is_err());
    }

    #[test]
    fn bad_commands_leave_the_state_alone() {
        let mut s = store();
        s.apply(b"set-a-1").expect("set");
        let before = s.digest();
        for bad in [&b"put-1-2"[..], b"hello", b"get-", b"\x12\x05a"] {
            assert!(s.apply(bad).is_err(), "{bad:?}");
        }
        assert_eq!(s.digest(), before);
    }

    #[test]
    fn oversized_values_are_refused() {
        let mut s = Store::new(&Settings { max_value_size: 3, ..Settings::default() });
        assert_eq!(s.apply(b"set-a-123"), Ok(vec![]));
        let err = s.apply(b"set-a-1234").expect_err("too large");
        assert!(err.contains("max-value-size is 3"), "{err}");
        assert_eq!(s.apply(b"get-a"), Ok(b"123".to_vec()));
        assert!(s.apply(&encode(proto::Op::Set, "b", b"1234")).is_err());
    }

    #[test]
    fn query_is_read_only() {
        let mut s = store();
        s.apply(b"set-a-1").expect("set");
        let generation = s.generation();
        assert_eq!(s.query(b"get-a"), Ok(b"1".to_vec()));
        assert_eq!(s.query(b"get-b"), Err("key not found: b".to_string()));
        for write in [
            b"set-a-2".to_vec(),
            b"delete-a".to_vec(),
            encode(proto::Op::Set, "a", b"2"),
            encode(proto::Op::Delete, "a", b""),
        ] {
            let err = s.query(&write).expect_err("write in query");
            assert!(err.starts_with("query is read-only"), "{err}");
        }
        assert!(s.query(b"hello").expect_err("unknown").starts_with("unknown command"));
        assert_eq!(s.query(b"get-a"), Ok(b"1".to_vec()));
        assert_eq!(s.generation(), generation);
    }

    #[test]
    fn digest_depends_only_on_content() {
        let mut one = store();
        for c in [&b"set-a-1"[..], b"set-b-2", b"delete-a"] {
            one.apply(c).expect("apply");
        }
        let mut two = store();
        two.apply(b"set-b-2").expect("apply");
        assert_eq!(one.digest(), two.digest());

        let mut three = store();
        for c in [&b"set-b-9"[..], b"set-c-3", b"set-b-2", b"delete-c"] {
            three.apply(c).expect("apply");
        }
        assert_eq!(one.digest(), three.digest());

        assert_eq!(&one.digest()[..8], &1u64.to_le_bytes());
    }

    #[test]
    fn digest_tells_contents_apart() {
        let digest_of = |commands: &[&[u8]]| {
            let mut s = store();
            for c in commands {
                s.apply(c).expect("apply");
            }
            s.digest()
        };
        let empty = digest_of(&[]);
        assert_eq!(empty, [0; 24]);
        let a1 = digest_of(&[b"set-a-1"]);
        assert_ne!(a1, empty);
        assert_ne!(a1, digest_of(&[b"set-a-2"]));
        assert_ne!(a1, digest_of(&[b"set-b-1"]));
        // Moving bytes between key and value must change the digest.
        assert_ne!(digest_of(&[b"set-ab-c"]), digest_of(&[b"set-a-bc"]));
        assert_eq!(digest_of(&[b"set-a-1", b"delete-a"]), empty);
    }

    #[test]
    fn digest_matches_a_full_recount() {
        let mut s = store();
        for i in 0..50u32 {
            let key = (i % 7).to_string();
            if i % 5 == 0 {
                s.apply(format!("delete-{key}").as_bytes()).expect("delete");
            } else {
                s.apply(format!("set-{key}-{i}").as_bytes()).expect("set");
            }
        }
        let mut recount = Table::default();
        for (k, v) in s.table().map() {
            recount.insert(k.clone(), v.clone());
        }
        assert_eq!(s.table().digest(), recount.digest());
    }

    #[test]
    fn default_store_uses_default_settings() {
        let mut s = store();
        let max = Settings::default().max_value_size as usize;
        assert_eq!(s.apply(&[b"set-a-".as_slice(), &vec![b'v'; max]].concat()), Ok(vec![]));
        assert!(s.apply(&[b"set-a-".as_slice(), &vec![b'v'; max + 1]].concat()).is_err());
        assert_eq!(s.table().map().len(), 1);
    }

    #[test]
    fn preload() {
        let s = Store::new(&Settings { preload_keys: 3, preload_value_size: 5, ..Settings::default() });
        let keys: Vec<&str> = s.table().map().keys().map(String::as_str).collect();
        assert_eq!(keys, ["0", "1", "2"]);
        assert_eq!(s.query(b"get-2"), Ok(b"xxxxx".to_vec()));
        assert!(s.query(b"get-3").is_err());
        assert_eq!(&s.digest()[..8], &3u64.to_le_bytes());

        let mut written = store();
        for i in 0..3 {
            written.apply(format!("set-{i}-xxxxx").as_bytes()).expect("set");
        }
        assert_eq!(s.digest(), written.digest());
    }
}
