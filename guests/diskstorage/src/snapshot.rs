//! The snapshot stream: `DSK2`, u64 LE file size, u32 LE value size, then for each run of
//! non-zero bytes in increasing offset order `[u64 LE offset][u32 LE len][bytes]`, then
//! the end mark of `kvcommand::seal` (length and checksum of everything before it).
//! Streams of the previous format, `DSK1` without the mark, still restore (snapshots
//! written by an older release).
//!
//! Zero ranges are left out, so a mostly empty (sparse) file gives a small stream and a
//! restore into a fresh sparse file reproduces it byte for byte.

use kvcommand::seal::{Opening, Seal, Unseal};

use crate::dirty::DirtyBlocks;
use crate::disk::{is_zero, Disk};
use crate::settings::{Settings, SyncMode};
use crate::store::{Store, SCAN_BLOCK};

pub const MAGIC: &[u8; 4] = b"DSK2";
/// The format before the end mark.
pub const MAGIC_UNSEALED: &[u8; 4] = b"DSK1";
const HEADER_LEN: usize = 16;
const RECORD_HEADER_LEN: usize = 12;
/// Runs are found at this granularity and then trimmed to exact bytes; a zero gap of a
/// whole chunk already costs more to copy than a record header costs to split.
const CHUNK: usize = 16;

fn header(settings: &Settings) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&settings.file_size.to_le_bytes());
    header.extend_from_slice(&settings.value_size.to_le_bytes());
    header
}

/// Streams the live file instead of a copy: the host reads a snapshot to the end before
/// it applies anything else, so scanning on from the cursor sees the state the snapshot
/// was created on. Blocks never written are known to be zero and not read.
#[derive(Debug)]
pub struct SnapshotReader {
    generation: u64,
    file_size: u64,
    /// Encoded bytes not yet returned: the header, or the records of the last block
    /// scanned that did not fit in a read.
    pending: Vec<u8>,
    pending_pos: usize,
    /// The next offset to scan: always the start of a block.
    cursor: u64,
    seal: Seal,
}

impl SnapshotReader {
    pub fn new<D: Disk>(store: &Store<D>) -> SnapshotReader {
        SnapshotReader {
            generation: store.generation(),
            file_size: store.settings().file_size,
            pending: header(store.settings()),
            pending_pos: 0,
            cursor: 0,
            seal: Seal::default(),
        }
    }

    /// Returns at most `max` bytes; an empty result means the end of the stream.
    pub fn read<D: Disk>(&mut self, store: &Store<D>, max: usize) -> Result<Vec<u8>, String> {
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
    fn records<D: Disk>(&mut self, store: &Store<D>, max: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(max.min(2 * SCAN_BLOCK));
        loop {
            let take = (self.pending.len() - self.pending_pos).min(max - out.len());
            out.extend_from_slice(&self.pending[self.pending_pos..self.pending_pos + take]);
            self.pending_pos += take;
            if out.len() == max {
                return Ok(out);
            }
            let block_size = SCAN_BLOCK as u64;
            match store.dirty().next_dirty(self.cursor / block_size) {
                Some(next) => self.cursor = self.cursor.max(next * block_size),
                None => self.cursor = self.file_size,
            }
            if self.cursor >= self.file_size {
                return Ok(out);
            }
            // `pending` is used up: scan the next block into it.
            let len = (self.file_size - self.cursor).min(SCAN_BLOCK as u64) as usize;
            let block = store.disk().read_at(self.cursor, len).map_err(|e| format!("cannot read snapshot: {e}"))?;
            self.pending.clear();
            self.pending_pos = 0;
            encode_runs(&mut self.pending, self.cursor, &block);
            self.cursor += len as u64;
        }
    }
}

/// Appends a record for each run of non-zero bytes in `block`, which starts at `base`.
fn encode_runs(out: &mut Vec<u8>, base: u64, block: &[u8]) {
    if is_zero(block) {
        return;
    }
    let chunk = |i: usize| &block[i * CHUNK..((i + 1) * CHUNK).min(block.len())];
    let chunks = block.len().div_ceil(CHUNK);
    let mut i = 0;
    while i < chunks {
        if is_zero(chunk(i)) {
            i += 1;
            continue;
        }
        let first = i;
        while i < chunks && !is_zero(chunk(i)) {
            i += 1;
        }
        let run = &block[first * CHUNK..(i * CHUNK).min(block.len())];
        // The first and last chunks are non-zero, so both ends exist.
        let start = run.iter().position(|&b| b != 0).unwrap_or(0);
        let end = run.iter().rposition(|&b| b != 0).map_or(run.len(), |last| last + 1);
        let offset = base + (first * CHUNK + start) as u64;
        // A run lies within one block, far below 4 GiB.
        let len = (end - start) as u32;
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&run[start..end]);
    }
}

/// Writes a stream, as it arrives, into a staging disk created empty at the file size;
/// the live file stays untouched until the caller swaps the result in.
#[derive(Debug)]
pub struct Restorer<D: Disk> {
    settings: Settings,
    staging: D,
    dirty: DirtyBlocks,
    /// Received bytes of the stream header, or of a record header, not yet complete.
    partial: Vec<u8>,
    header_seen: bool,
    /// The record being copied: where its next byte goes and how many remain.
    record: Option<(u64, u32)>,
    /// Records must not overlap or go backwards: where the previous one ended.
    next_offset: u64,
    /// After the first error every later call repeats it: a stream with a hole in it
    /// must never finish.
    failed: Option<String>,
    /// Which format the stream is in, from its first bytes.
    opening: Opening,
    unseal: Unseal,
}

impl<D: Disk> Restorer<D> {
    /// `settings` are this instance's: the stream must have been taken with the same
    /// file and value size. `staging` must be zero-filled at the file size.
    pub fn new(settings: Settings, staging: D) -> Result<Restorer<D>, String> {
        Ok(Restorer {
            settings,
            staging,
            dirty: DirtyBlocks::new(settings.file_size)?,
            partial: Vec::with_capacity(HEADER_LEN),
            header_seen: false,
            record: None,
            next_offset: 0,
            failed: None,
            opening: Opening::default(),
            unseal: Unseal::default(),
        })
    }

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
        self.parse(&records)
    }

    /// The staged disk, complete and (with `sync=each-write`) durable, and the blocks
    /// the stream wrote: the only ones that can hold data in a fresh sparse file.
    pub fn finish(mut self) -> Result<(D, DirtyBlocks), String> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        match self.opening.sealed() {
            Some(true) => std::mem::take(&mut self.unseal).finish()?,
            _ => {
                let held = std::mem::take(&mut self.unseal).into_held();
                self.parse(&held)?;
            }
        }
        if !self.header_seen {
            return Err(format!(
                "snapshot is truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
                self.partial.len()
            ));
        }
        if let Some((offset, remaining)) = self.record {
            let end = offset + u64::from(remaining);
            return Err(format!("snapshot is truncated: {remaining} bytes missing from the record ending at {end}"));
        }
        if !self.partial.is_empty() {
            return Err(format!("snapshot is truncated: {} bytes of an incomplete record header", self.partial.len()));
        }
        if self.settings.sync == SyncMode::EachWrite {
            self.staging.sync().map_err(|e| format!("cannot sync the restored file: {e}"))?;
        }
        Ok((self.staging, self.dirty))
    }

    fn parse(&mut self, mut chunk: &[u8]) -> Result<(), String> {
        while !chunk.is_empty() {
            if let Some((offset, remaining)) = self.record {
                let take = chunk.len().min(remaining as usize);
                self.staging
                    .write_at(offset, &chunk[..take])
                    .map_err(|e| format!("cannot write the restored file: {e}"))?;
                chunk = &chunk[take..];
                let remaining = remaining - take as u32;
                self.record = (remaining > 0).then_some((offset + take as u64, remaining));
                continue;
            }
            let want = if self.header_seen { RECORD_HEADER_LEN } else { HEADER_LEN };
            let take = chunk.len().min(want - self.partial.len());
            self.partial.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if !self.header_seen {
                let have = self.partial.len().min(MAGIC.len());
                if self.partial[..have] != MAGIC[..have] && self.partial[..have] != MAGIC_UNSEALED[..have] {
                    return Err(not_ours());
                }
            }
            if self.partial.len() < want {
                continue;
            }
            if self.header_seen {
                self.start_record()?;
            } else {
                self.check_header()?;
                self.header_seen = true;
            }
            self.partial.clear();
        }
        Ok(())
    }

    fn check_header(&self) -> Result<(), String> {
        let file_size = u64::from_le_bytes(le_bytes(&self.partial[4..12]));
        let value_size = u32::from_le_bytes(le_bytes(&self.partial[12..16]));
        if file_size != self.settings.file_size || value_size != self.settings.value_size {
            return Err(format!(
                "snapshot is of a file with file-size {file_size} and value-size {value_size}, \
                 but this instance has file-size {} and value-size {}",
                self.settings.file_size, self.settings.value_size
            ));
        }
        Ok(())
    }

    fn start_record(&mut self) -> Result<(), String> {
        let offset = u64::from_le_bytes(le_bytes(&self.partial[..8]));
        let len = u32::from_le_bytes(le_bytes(&self.partial[8..12]));
        if len == 0 {
            return Err(format!("corrupt snapshot: empty record at offset {offset}"));
        }
        if offset < self.next_offset {
            return Err(format!(
                "corrupt snapshot: record at offset {offset} starts before the previous one ended ({})",
                self.next_offset
            ));
        }
        // Slots are the only bytes a store ever writes; a record past them would hold data
        // that no digest accounts for.
        let slots_end = self.settings.slots() * u64::from(self.settings.value_size);
        let end = offset.checked_add(u64::from(len)).filter(|&end| end <= slots_end).ok_or_else(|| {
            format!("corrupt snapshot: record at offset {offset} of {len} bytes runs past the last slot ({slots_end})")
        })?;
        self.record = Some((offset, len));
        self.next_offset = end;
        self.dirty.mark(offset, u64::from(len));
        Ok(())
    }
}

fn not_ours() -> String {
    format!("not a diskstorage snapshot: expected header {:?}", String::from_utf8_lossy(MAGIC))
}

/// `bytes` always has the length of `N`: the callers slice fixed ranges of a complete
/// header.
fn le_bytes<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut array = [0; N];
    array.copy_from_slice(bytes);
    array
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;
    use crate::store::recount;

    fn all_dirty(file_size: u64) -> DirtyBlocks {
        let mut dirty = DirtyBlocks::new(file_size).expect("dirty");
        dirty.mark(0, file_size);
        dirty
    }

    fn settings(file_size: u64, value_size: u32) -> Settings {
        Settings { file_size, value_size, sync: SyncMode::None }
    }

    fn store_with(settings: Settings, commands: &[String]) -> Store<MemDisk> {
        let mut store = Store::create(settings, MemDisk::default()).expect("create");
        for c in commands {
            store.run(c.as_bytes()).expect(c);
        }
        store
    }

    fn commands(list: &[&str]) -> Vec<String> {
        list.iter().map(|c| c.to_string()).collect()
    }

    /// Values spread over several scan blocks, straddling block boundaries, with zero gaps
    /// of every size around the chunk granularity, and a full last slot.
    fn sample() -> Store<MemDisk> {
        let value_size = 1000;
        let mut list = Vec::new();
        for key in [0u64, 1, 3, 65, 66, 130, 131, 199] {
            let len = 50 + (key as usize * 37) % (value_size - 50);
            let value: String = (0..len).map(|i| if i % 23 < 17 { 'x' } else { '\0' }).collect();
            list.push(format!("set-{key}-{}y", &value[..len - 1]));
        }
        list.push(format!("set-200-{}", "z".repeat(value_size)));
        list.push("set-2-\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0a".to_string());
        store_with(settings(201 * 1000 + 7, 1000), &list)
    }

    fn read_all(store: &Store<MemDisk>, max: usize) -> Vec<Vec<u8>> {
        let mut reader = SnapshotReader::new(store);
        let mut chunks = Vec::new();
        loop {
            let chunk = reader.read(store, max).expect("read");
            assert!(chunk.len() <= max);
            if chunk.is_empty() {
                return chunks;
            }
            chunks.push(chunk);
        }
    }

    fn restore_into(settings: Settings, chunks: &[&[u8]]) -> Result<MemDisk, String> {
        restore_with_dirty(settings, chunks).map(|(disk, _)| disk)
    }

    fn restore_with_dirty(settings: Settings, chunks: &[&[u8]]) -> Result<(MemDisk, DirtyBlocks), String> {
        let mut staging = MemDisk::default();
        staging.set_len(settings.file_size).expect("len");
        let mut restorer = Restorer::new(settings, staging)?;
        for chunk in chunks {
            restorer.write(chunk)?;
        }
        restorer.finish()
    }

    /// Decodes a stream without the restorer, to check the format independently.
    /// `data` with the end mark a reader puts after it.
    fn sealed(data: &[u8]) -> Vec<u8> {
        let mut seal = Seal::default();
        let mut rest = Some(data.to_vec());
        let mut out = Vec::new();
        loop {
            let chunk = seal.read(1 << 20, |_| Ok(rest.take().unwrap_or_default())).expect("seal");
            if chunk.is_empty() {
                return out;
            }
            out.extend(chunk);
        }
    }

    /// Decodes a sealed stream's records.
    fn records(stream: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let stream = &stream[..stream.len() - kvcommand::seal::MARK_LEN];
        let mut records = Vec::new();
        let mut pos = HEADER_LEN;
        while pos < stream.len() {
            let offset = u64::from_le_bytes(le_bytes(&stream[pos..pos + 8]));
            let len = u32::from_le_bytes(le_bytes(&stream[pos + 8..pos + 12])) as usize;
            records.push((offset, stream[pos + 12..pos + 12 + len].to_vec()));
            pos += 12 + len;
        }
        assert_eq!(pos, stream.len());
        records
    }

    #[test]
    fn stream_format() {
        let store = store_with(settings(100, 10), &commands(&["set-5-ab", "set-1-q\0\0r", "set-2-s"]));
        let stream = read_all(&store, 1 << 16).concat();
        let mut expected = b"DSK2".to_vec();
        expected.extend_from_slice(&100u64.to_le_bytes());
        expected.extend_from_slice(&10u32.to_le_bytes());
        // Slots 1 and 2 lie in adjacent non-zero 16-byte chunks, so they share a record;
        // slot 5 is after a zero chunk.
        expected.extend_from_slice(&10u64.to_le_bytes());
        expected.extend_from_slice(&11u32.to_le_bytes());
        expected.extend_from_slice(b"q\0\0r\0\0\0\0\0\0s");
        expected.extend_from_slice(&50u64.to_le_bytes());
        expected.extend_from_slice(&2u32.to_le_bytes());
        expected.extend_from_slice(b"ab");
        assert_eq!(stream, sealed(&expected));

        let empty = store_with(settings(100, 10), &[]);
        assert_eq!(read_all(&empty, 100).concat(), sealed(&expected[..HEADER_LEN]));
    }

    #[test]
    fn records_cover_exactly_the_non_zero_bytes() {
        let store = sample();
        let stream = read_all(&store, 1 << 20).concat();
        let mut rebuilt = vec![0u8; store.disk().bytes().len()];
        let mut last_end = 0;
        for (offset, bytes) in records(&stream) {
            let offset = offset as usize;
            assert!(offset >= last_end, "records in increasing order");
            assert_ne!(bytes.first(), Some(&0), "trimmed at {offset}");
            assert_ne!(bytes.last(), Some(&0), "trimmed at {offset}");
            // No record crosses a scan block.
            assert_eq!(offset / SCAN_BLOCK, (offset + bytes.len() - 1) / SCAN_BLOCK);
            rebuilt[offset..offset + bytes.len()].copy_from_slice(&bytes);
            last_end = offset + bytes.len();
        }
        assert_eq!(rebuilt, store.disk().bytes());
    }

    #[test]
    fn restore_replaces_the_state_and_the_digest() {
        let source = sample();
        let stream = read_all(&source, 100).concat();
        let mut target = store_with(*source.settings(), &commands(&["set-5-old", "set-0-other"]));
        let (disk, dirty) = restore_with_dirty(*target.settings(), &[&stream]).expect("restore");
        target.replace_disk(disk, dirty, Ok).expect("replace");
        assert!(target.disk().bytes() == source.disk().bytes());
        assert_eq!(target.digest(), source.digest());
        let everything = all_dirty(source.settings().file_size);
        assert_eq!(target.digest(), recount(source.disk(), source.settings(), &everything).expect("recount"));
        // The restored store's own record of written blocks is enough for the next
        // snapshot to see everything.
        assert_eq!(read_all(&target, 1 << 20), read_all(&source, 1 << 20));
        assert!(target.query(b"get-5").is_err());
        assert_eq!(target.query(b"get-200"), Ok(vec![b'z'; 1000]));
    }

    /// Counts the bytes read, to show which blocks a scan skips.
    #[derive(Debug, Default)]
    struct CountingDisk {
        inner: MemDisk,
        read: std::cell::Cell<u64>,
    }

    impl Disk for CountingDisk {
        fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
            self.read.set(self.read.get() + len as u64);
            self.inner.read_at(offset, len)
        }

        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
            self.inner.write_at(offset, data)
        }

        fn set_len(&mut self, len: u64) -> Result<(), String> {
            self.inner.set_len(len)
        }

        fn sync(&mut self) -> Result<(), String> {
            self.inner.sync()
        }
    }

    #[test]
    fn sparse_store_gives_a_small_stream() {
        let mut store = Store::create(settings(64 << 20, 1024), CountingDisk::default()).expect("create");
        for i in 0..10u64 {
            store.run(format!("set-{}-{}", i * 6553 + 17, "v".repeat(1000)).as_bytes()).expect("set");
        }
        let mut reader = SnapshotReader::new(&store);
        let read_before = store.disk().read.get();
        let mut chunks = Vec::new();
        loop {
            let chunk = reader.read(&store, 1 << 16).expect("read");
            if chunk.is_empty() {
                break;
            }
            chunks.push(chunk);
        }
        let len: usize = chunks.iter().map(Vec::len).sum();
        assert!(len < 100 * 1024, "{len} bytes");
        assert_eq!(len, HEADER_LEN + 10 * (RECORD_HEADER_LEN + 1000) + kvcommand::seal::MARK_LEN);
        // Only the ten written blocks are read, not the 1024 of the file.
        assert_eq!(store.disk().read.get() - read_before, 10 * SCAN_BLOCK as u64);

        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let (disk, dirty) = restore_with_dirty(*store.settings(), &refs).expect("restore");
        assert!(disk.bytes() == store.disk().inner.bytes());
        let mut target = Store::create(*store.settings(), CountingDisk::default()).expect("create");
        target.replace_disk(CountingDisk { inner: disk, ..CountingDisk::default() }, dirty, Ok).expect("replace");
        assert_eq!(target.digest(), store.digest());
        // The recount after a restore reads only the blocks the stream wrote.
        assert!(target.disk().read.get() <= 10 * (SCAN_BLOCK + 1024) as u64, "{:?}", target.disk().read);
    }

    #[test]
    fn truncated_streams_are_refused() {
        let store = sample();
        let stream = read_all(&store, 1 << 20).concat();
        let first_record_len = RECORD_HEADER_LEN + records(&stream)[0].1.len();
        for cut in [0, 3, 4, 15, HEADER_LEN + 1, HEADER_LEN + 11, HEADER_LEN + 12, HEADER_LEN + 13, stream.len() - 1] {
            let err = restore_into(*store.settings(), &[&stream[..cut]]).expect_err("truncated");
            assert!(err.contains("truncated"), "cut {cut}: {err}");
        }
        // A cut at a record boundary too: the end mark says where the stream ends.
        let at_boundary = &stream[..HEADER_LEN + first_record_len];
        assert!(restore_into(*store.settings(), &[at_boundary]).expect_err("boundary").contains("truncated"));
    }

    /// Snapshots written before the end mark (`DSK1`) still restore.
    #[test]
    fn unsealed_streams_of_the_previous_format_restore() {
        let store = sample();
        let stream = read_all(&store, 1 << 20).concat();
        let mut old = stream[..stream.len() - kvcommand::seal::MARK_LEN].to_vec();
        old[..4].copy_from_slice(b"DSK1");
        for chunk in [1, 7, 4096] {
            let chunks: Vec<&[u8]> = old.chunks(chunk).collect();
            let disk = restore_into(*store.settings(), &chunks).expect("DSK1");
            assert!(disk.bytes() == store.disk().bytes());
        }
    }

    #[test]
    fn bad_magic_is_refused_early_and_for_good() {
        let s = *sample().settings();
        let mut staging = MemDisk::default();
        staging.set_len(s.file_size).expect("len");
        let mut restorer = Restorer::new(s, staging).expect("restorer");
        assert!(restorer.write(b"DS").is_ok());
        let err = restorer.write(b"X2").expect_err("bad magic");
        assert!(err.contains("not a diskstorage snapshot"), "{err}");
        assert!(restorer.write(b"").is_err());
        assert!(restorer.finish().is_err());

        assert!(restore_into(s, &[b"X"]).is_err());
        assert!(restore_into(s, &[b"KVS1"]).expect_err("kvstore").contains("not a diskstorage snapshot"));
    }

    #[test]
    fn mismatched_settings_are_refused() {
        let store = sample();
        let stream = read_all(&store, 1 << 20).concat();
        let s = *store.settings();
        for other in [
            Settings { file_size: s.file_size + 1, ..s },
            Settings { value_size: s.value_size + 1, ..s },
            settings(1 << 20, 1024),
        ] {
            let err = restore_into(other, &[&stream]).expect_err("mismatch");
            assert!(err.contains("this instance has"), "{err}");
        }
        // The sync mode is local to each member and may differ.
        assert!(restore_into(Settings { sync: SyncMode::EachWrite, ..s }, &[&stream]).is_ok());
    }

    #[test]
    fn corrupt_records_are_refused() {
        let s = settings(100, 10);
        let header = read_all(&store_with(s, &[]), 100).concat()[..HEADER_LEN].to_vec();
        let record = |offset: u64, bytes: &[u8]| {
            let mut r = offset.to_le_bytes().to_vec();
            r.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            r.extend_from_slice(bytes);
            r
        };
        let stream = |records: &[Vec<u8>]| sealed(&[header.clone(), records.concat()].concat());
        let err = |records: &[Vec<u8>]| restore_into(s, &[&stream(records)]).expect_err("corrupt");

        assert!(err(&[record(10, b"a"), record(5, b"b")]).contains("before the previous one ended"));
        assert!(err(&[record(10, b"ab"), record(11, b"b")]).contains("before the previous one ended"));
        assert!(err(&[record(10, b"")]).contains("empty record"));
        assert!(err(&[record(99, b"ab")]).contains("past the last slot"));
        assert!(err(&[record(u64::MAX, b"a")]).contains("past the last slot"));
        assert!(restore_into(s, &[&stream(&[record(10, b"ab"), record(12, b"c"), record(99, b"d")])]).is_ok());
        // Slots end at 100 here; with a tail, bytes in it belong to no slot.
        let tailed = settings(105, 10);
        let tailed_header = read_all(&store_with(tailed, &[]), 100).concat()[..HEADER_LEN].to_vec();
        let tail = sealed(&[tailed_header, record(100, b"t")].concat());
        assert!(restore_into(tailed, &[&tail]).expect_err("tail").contains("past the last slot"));
    }

    #[test]
    fn reading_after_a_change_fails() {
        let mut store = sample();
        let mut reader = SnapshotReader::new(&store);
        assert!(reader.read(&store, 10).is_ok());
        store.run(b"set-7-new").expect("set");
        assert!(reader.read(&store, 10).expect_err("changed").contains("changed"));
        // A failed command changes nothing, so it does not spoil a snapshot.
        let mut reader = SnapshotReader::new(&store);
        assert!(store.run(b"set-7-").is_err());
        assert!(reader.read(&store, 10).is_ok());
    }

    #[test]
    fn snapshot_does_not_change_state() {
        let store = sample();
        let (bytes, digest, generation) = (store.disk().clone(), store.digest(), store.generation());
        read_all(&store, 5);
        assert!(store.disk() == &bytes);
        assert_eq!(store.digest(), digest);
        assert_eq!(store.generation(), generation);
    }

    impl kvcommand::snapshot_kit::Reader<Store<MemDisk>> for SnapshotReader {
        fn read(&mut self, store: &Store<MemDisk>, max: usize) -> Result<Vec<u8>, String> {
            SnapshotReader::read(self, store, max)
        }
    }

    impl kvcommand::snapshot_kit::Subject for Store<MemDisk> {
        fn sample() -> Self {
            sample()
        }
        fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
            self.run(command)
        }
        fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
            Store::query(self, request)
        }
        fn digest(&self) -> Vec<u8> {
            Store::digest(self).to_bytes().to_vec()
        }
        fn reader(&self) -> Box<dyn kvcommand::snapshot_kit::Reader<Self>> {
            Box::new(SnapshotReader::new(self))
        }
        fn restore_beside(&self, chunks: &[&[u8]]) -> Result<Self, String> {
            let mut target = store_with(*self.settings(), &commands(&["set-5-old", "set-0-other"]));
            let (disk, dirty) = restore_with_dirty(*self.settings(), chunks)?;
            target.replace_disk(disk, dirty, Ok)?;
            Ok(target)
        }
        fn a_change(n: u32) -> Vec<u8> {
            match n % 3 {
                0 => format!("set-{}-v{n}", n % 201).into_bytes(),
                1 => format!("set-7-{}", "w".repeat(n as usize * 13 % 1000 + 1)).into_bytes(),
                _ => b"delete-3".to_vec(),
            }
        }
    }

    #[test]
    fn the_shared_snapshot_properties_hold() {
        kvcommand::snapshot_kit::check_all::<Store<MemDisk>>();
    }
}
