//! The snapshot stream: `KVS2`, then per pair in key order
//! `[u32 LE key len][key][u32 LE value len][value]`, then the end mark of
//! `kvcommand::seal` (length and checksum of everything before it). Streams of the
//! previous format, `KVS1` without the mark, still restore (a snapshot written by an
//! older release); they cannot tell a cut at a record boundary from their end.

use std::ops::Bound;

use kvcommand::seal::{Opening, Seal, Unseal};

use crate::store::{Store, Table};

pub const MAGIC: &[u8; 4] = b"KVS2";
/// The format before the end mark.
pub const MAGIC_UNSEALED: &[u8; 4] = b"KVS1";

/// Streams the live map instead of a copy: the host reads a snapshot to the end before
/// it applies anything else, so resuming after the last emitted key sees the state the
/// snapshot was created on.
#[derive(Debug)]
pub struct SnapshotReader {
    generation: u64,
    /// Encoded bytes not yet returned: the magic, or the rest of a record that did not
    /// fit in a read.
    pending: Vec<u8>,
    pending_pos: usize,
    /// The last key encoded (into the output or `pending`); the next record follows it.
    last_key: Option<String>,
    keys_exhausted: bool,
    seal: Seal,
}

impl SnapshotReader {
    pub fn new(store: &Store) -> SnapshotReader {
        SnapshotReader {
            generation: store.generation(),
            pending: MAGIC.to_vec(),
            pending_pos: 0,
            last_key: None,
            keys_exhausted: false,
            seal: Seal::default(),
        }
    }

    /// Returns at most `max` bytes; an empty result means the end of the stream.
    pub fn read(&mut self, store: &Store, max: usize) -> Result<Vec<u8>, String> {
        if store.generation() != self.generation {
            return Err("the state changed while a snapshot of it was being read".to_string());
        }
        if max == 0 {
            // An empty list would read as the end of the stream.
            return Err("snapshot read needs max-bytes of at least 1".to_string());
        }
        let mut seal = std::mem::take(&mut self.seal);
        let out = seal.read(max, |max| self.records(store, max));
        self.seal = seal;
        out
    }

    /// The header and records, at most `max` bytes; empty once all were returned.
    fn records(&mut self, store: &Store, max: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(max.min(64 * 1024));
        self.drain_pending(&mut out, max);
        if out.len() == max || self.keys_exhausted {
            return Ok(out);
        }

        let map = store.table().map();
        let start = match &self.last_key {
            Some(key) => Bound::Excluded(key.as_str()),
            None => Bound::Unbounded,
        };
        let mut last = None;
        for (key, value) in map.range::<str, _>((start, Bound::Unbounded)) {
            last = Some(key);
            let record_len = 8 + key.len() + value.len();
            if out.len() + record_len <= max {
                encode_record(&mut out, key, value)?;
            } else {
                // Split the record: a read never returns more than it was asked for.
                self.pending.clear();
                self.pending_pos = 0;
                encode_record(&mut self.pending, key, value)?;
                self.drain_pending(&mut out, max);
            }
            if out.len() == max {
                break;
            }
        }
        match last {
            Some(key) => self.last_key = Some(key.clone()),
            None => self.keys_exhausted = true,
        }
        Ok(out)
    }

    fn drain_pending(&mut self, out: &mut Vec<u8>, max: usize) {
        let take = (self.pending.len() - self.pending_pos).min(max - out.len());
        out.extend_from_slice(&self.pending[self.pending_pos..self.pending_pos + take]);
        self.pending_pos += take;
    }
}

fn encode_record(out: &mut Vec<u8>, key: &str, value: &[u8]) -> Result<(), String> {
    for field in [key.as_bytes(), value] {
        let len =
            u32::try_from(field.len()).map_err(|_| format!("cannot snapshot key {key:?}: a field exceeds 4 GiB"))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(field);
    }
    Ok(())
}

/// Parses a stream incrementally into a new table, leaving the live state untouched.
#[derive(Debug, Default)]
pub struct Restorer {
    /// Received bytes not yet parsed: at most one incomplete record (or magic).
    buf: Vec<u8>,
    /// Which format the stream is in, from its first bytes.
    opening: Opening,
    unseal: Unseal,
    magic_seen: bool,
    table: Table,
    /// After the first error every later call repeats it: a stream with a hole in it
    /// must never finish.
    failed: Option<String>,
}

impl Restorer {
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), String> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let result = self.take(chunk);
        if let Err(err) = &result {
            self.failed = Some(err.clone());
        }
        result
    }

    fn take(&mut self, chunk: &[u8]) -> Result<(), String> {
        if !self.opening.take(chunk, MAGIC, MAGIC_UNSEALED) {
            return Err(not_ours());
        }
        let records = self.unseal.pass(chunk);
        self.buf.extend_from_slice(&records);
        self.parse()
    }

    pub fn finish(mut self) -> Result<Table, String> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        match self.opening.sealed() {
            Some(true) => self.unseal.finish()?,
            _ => {
                let held = self.unseal.into_held();
                self.unseal = Unseal::default();
                self.buf.extend_from_slice(&held);
                self.parse()?;
            }
        }
        if !self.magic_seen {
            return Err(format!(
                "snapshot is truncated: {} bytes, shorter than the {:?} header",
                self.buf.len(),
                String::from_utf8_lossy(MAGIC)
            ));
        }
        if !self.buf.is_empty() {
            return Err(format!("snapshot is truncated: {} bytes of an incomplete record at the end", self.buf.len()));
        }
        Ok(self.table)
    }

    fn parse(&mut self) -> Result<(), String> {
        let mut pos = 0;
        if !self.magic_seen {
            let have = self.buf.len().min(MAGIC.len());
            if self.buf[..have] != MAGIC[..have] && self.buf[..have] != MAGIC_UNSEALED[..have] {
                return Err(not_ours());
            }
            if have < MAGIC.len() {
                return Ok(());
            }
            self.magic_seen = true;
            pos = MAGIC.len();
        }
        while let Some((key, value, end)) = next_record(&self.buf, pos) {
            let key = std::str::from_utf8(key).map_err(|_| "corrupt snapshot: a key is not UTF-8".to_string())?;
            if let Some((last, _)) = self.table.map().last_key_value() {
                if key <= last.as_str() {
                    return Err(format!("corrupt snapshot: key {key:?} does not sort after {last:?}"));
                }
            }
            self.table.insert(key.to_string(), value.to_vec());
            pos = end;
        }
        self.buf.drain(..pos);
        Ok(())
    }
}

fn not_ours() -> String {
    format!("not a kvstore snapshot: expected header {:?}", String::from_utf8_lossy(MAGIC))
}

/// The record starting at `pos`, if all of it has arrived: key, value, end offset.
fn next_record(buf: &[u8], pos: usize) -> Option<(&[u8], &[u8], usize)> {
    let (key, pos) = next_field(buf, pos)?;
    let (value, pos) = next_field(buf, pos)?;
    Some((key, value, pos))
}

fn next_field(buf: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let len_bytes: [u8; 4] = buf.get(pos..pos + 4)?.try_into().ok()?;
    let start = pos + 4;
    let end = start.checked_add(u32::from_le_bytes(len_bytes) as usize)?;
    Some((buf.get(start..end)?, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    fn store_with(commands: &[&str]) -> Store {
        let mut store = Store::new(&Settings::default());
        for c in commands {
            store.apply(c.as_bytes()).expect(c);
        }
        store
    }

    fn read_all(store: &Store, max: usize) -> Vec<Vec<u8>> {
        let mut reader = SnapshotReader::new(store);
        let mut chunks = Vec::new();
        loop {
            let chunk = reader.read(store, max).expect("read");
            assert!(chunk.len() <= max, "{} > {max}", chunk.len());
            if chunk.is_empty() {
                return chunks;
            }
            chunks.push(chunk);
        }
    }

    fn restore(chunks: &[&[u8]]) -> Result<Table, String> {
        let mut restorer = Restorer::default();
        for chunk in chunks {
            restorer.write(chunk)?;
        }
        restorer.finish()
    }

    fn sample() -> Store {
        let big = format!("set-big-{}", "v".repeat(100));
        store_with(&["set-b-2", "set-a-1", "set-c-", "set-k-e-y", &big, "set-ключ-x"])
    }

    #[test]
    fn stream_format() {
        let store = store_with(&["set-b-22", "set-a-1"]);
        let stream = read_all(&store, 1 << 16).concat();
        let mut expected = b"KVS2".to_vec();
        expected.extend_from_slice(&[1, 0, 0, 0, b'a', 1, 0, 0, 0, b'1']);
        expected.extend_from_slice(&[1, 0, 0, 0, b'b', 2, 0, 0, 0, b'2', b'2']);
        let (records, mark) = stream.split_at(stream.len() - kvcommand::seal::MARK_LEN);
        assert_eq!(records, expected);
        // The end mark: the length before it, a checksum, "SEND".
        assert_eq!(mark[..8], 25u64.to_le_bytes());
        assert_eq!(&mark[16..], b"SEND");
        assert_eq!(read_all(&Store::default(), 100).concat().len(), 4 + kvcommand::seal::MARK_LEN);
    }

    /// Snapshots written before the end mark (`KVS1`) still restore.
    #[test]
    fn unsealed_streams_of_the_previous_format_restore() {
        let mut old = b"KVS1".to_vec();
        old.extend_from_slice(&[1, 0, 0, 0, b'a', 1, 0, 0, 0, b'1']);
        old.extend_from_slice(&[1, 0, 0, 0, b'b', 2, 0, 0, 0, b'2', b'2']);
        for chunk in [1, 3, 30] {
            let chunks: Vec<&[u8]> = old.chunks(chunk).collect();
            let table = restore(&chunks).expect("KVS1");
            assert_eq!(table, *store_with(&["set-b-22", "set-a-1"]).table());
        }
        assert!(restore(&[&old[..old.len() - 1]]).expect_err("cut").contains("truncated"));
    }

    #[test]
    fn roundtrip_preloaded() {
        let store = Store::new(&Settings { preload_keys: 200, preload_value_size: 33, ..Settings::default() });
        let chunks = read_all(&store, 100);
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let table = restore(&refs).expect("restore");
        assert_eq!(&table, store.table());

        let mut target = store_with(&["set-old-1"]);
        target.replace_table(table);
        assert_eq!(target.digest(), store.digest());
        assert!(target.query(b"get-old").is_err());
        assert_eq!(target.query(b"get-199"), Ok(vec![b'x'; 33]));
    }

    #[test]
    fn truncated_streams_are_refused() {
        let stream = read_all(&sample(), 1 << 20).concat();
        // Record boundaries included: the end mark says where the stream ends.
        for cut in [0, 2, 3, 4, 5, 8, 9, 12, stream.len() - 21, stream.len() - 20, stream.len() - 1] {
            let err = restore(&[&stream[..cut]]).expect_err("truncated");
            assert!(err.contains("truncated"), "cut {cut}: {err}");
        }
    }

    #[test]
    fn bad_magic_is_refused_early_and_for_good() {
        let mut restorer = Restorer::default();
        assert!(restorer.write(b"KV").is_ok());
        let err = restorer.write(b"X2").expect_err("bad magic");
        assert!(err.contains("not a kvstore snapshot"), "{err}");
        assert!(restorer.write(b"").is_err());
        assert!(restorer.finish().is_err());

        assert!(restore(&[b"X"]).is_err());
        assert!(restore(&[b"kvs1"]).is_err());
    }

    #[test]
    fn corrupt_records_are_refused() {
        let mut unordered = b"KVS1".to_vec();
        unordered.extend_from_slice(&[1, 0, 0, 0, b'b', 0, 0, 0, 0]);
        unordered.extend_from_slice(&[1, 0, 0, 0, b'a', 0, 0, 0, 0]);
        assert!(restore(&[&unordered]).expect_err("order").contains("sort after"));

        let mut duplicate = b"KVS1".to_vec();
        duplicate.extend_from_slice(&[1, 0, 0, 0, b'a', 0, 0, 0, 0]);
        duplicate.extend_from_slice(&[1, 0, 0, 0, b'a', 0, 0, 0, 0]);
        assert!(restore(&[&duplicate]).is_err());

        let mut not_utf8 = b"KVS1".to_vec();
        not_utf8.extend_from_slice(&[1, 0, 0, 0, 0xff, 0, 0, 0, 0]);
        assert!(restore(&[&not_utf8]).expect_err("utf8").contains("UTF-8"));

        // A length that runs past the data is just an incomplete record.
        let mut huge = b"KVS1".to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, b'a']);
        assert!(restore(&[&huge]).expect_err("huge").contains("truncated"));
    }

    impl kvcommand::snapshot_kit::Reader<Store> for SnapshotReader {
        fn read(&mut self, store: &Store, max: usize) -> Result<Vec<u8>, String> {
            SnapshotReader::read(self, store, max)
        }
    }

    impl kvcommand::snapshot_kit::Subject for Store {
        fn sample() -> Store {
            sample()
        }
        fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
            Store::apply(self, command)
        }
        fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
            Store::query(self, request)
        }
        fn digest(&self) -> Vec<u8> {
            Store::digest(self).to_vec()
        }
        fn reader(&self) -> Box<dyn kvcommand::snapshot_kit::Reader<Store>> {
            Box::new(SnapshotReader::new(self))
        }
        fn restore_beside(&self, chunks: &[&[u8]]) -> Result<Store, String> {
            let mut target = store_with(&["set-unrelated-1", "set-a-other"]);
            target.replace_table(restore(chunks)?);
            Ok(target)
        }
        fn a_change(n: u32) -> Vec<u8> {
            match n % 3 {
                0 => format!("set-k{n}-v{n}").into_bytes(),
                1 => format!("set-a-{n}").into_bytes(),
                _ => b"delete-b".to_vec(),
            }
        }
    }

    #[test]
    fn the_shared_snapshot_properties_hold() {
        kvcommand::snapshot_kit::check_all::<Store>();
    }
}
