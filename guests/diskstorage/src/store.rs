//! The replicated state: one file of fixed-size slots, plus a digest kept up to date on
//! every change.

use xxhash_rust::xxh3::Xxh3;

use crate::command::{self, Command};
use crate::dirty::DirtyBlocks;
use crate::disk::{is_zero, trim_zeros, Disk};
use crate::settings::{Settings, SyncMode};
pub use kvcommand::digest::Digest;

/// How much a full scan reads at a time: large enough that the per-call cost of crossing
/// into the host vanishes, small enough not to matter for the guest's memory.
pub const SCAN_BLOCK: usize = 64 * 1024;

/// Accounts in `digest` for slot `key` changing from `old` to `new` (trimmed values;
/// empty = blank, which the digest does not count).
fn account(digest: &mut Digest, key: u64, old: &[u8], new: &[u8]) {
    if !old.is_empty() {
        digest.remove(slot_hash(key, old));
    }
    if !new.is_empty() {
        digest.add(slot_hash(key, new));
    }
}

/// The key has a fixed width, so no two (key, value) pairs hash the same bytes.
fn slot_hash(key: u64, value: &[u8]) -> u128 {
    let mut hasher = Xxh3::new();
    hasher.update(&key.to_le_bytes());
    hasher.update(value);
    hasher.digest128()
}

/// The digest of whatever `disk` holds, by reading every slot that overlaps a block in
/// `dirty`: what the incremental digest must always equal.
pub fn recount<D: Disk>(disk: &D, settings: &Settings, dirty: &DirtyBlocks) -> Result<Digest, String> {
    let value_size = u64::from(settings.value_size);
    let slots_per_read = (SCAN_BLOCK as u64 / value_size).max(1);
    let slots = settings.slots();
    let block = SCAN_BLOCK as u64;
    let mut digest = Digest::default();
    let mut key = 0;
    while key < slots {
        let Some(next) = dirty.next_dirty(key * value_size / block) else {
            break;
        };
        // The slot holding the dirty block's first byte, which may have started in the
        // clean block before it.
        key = key.max(next * block / value_size);
        let n = slots_per_read.min(slots.saturating_sub(key));
        if n == 0 {
            break;
        }
        // At most max(SCAN_BLOCK, value_size) bytes, which fit in memory.
        let bytes = disk.read_at(key * value_size, (n * value_size) as usize)?;
        if !is_zero(&bytes) {
            for (slot_key, slot) in (key..).zip(bytes.chunks_exact(value_size as usize)) {
                account(&mut digest, slot_key, b"", trim_zeros(slot));
            }
        }
        key += n;
    }
    Ok(digest)
}

#[derive(Debug)]
pub struct Store<D: Disk> {
    disk: D,
    settings: Settings,
    digest: Digest,
    dirty: DirtyBlocks,
    /// Changes on every mutation, so an open snapshot can tell that the file it is
    /// streaming moved under it instead of emitting a mix of two states.
    generation: u64,
}

/// This member's file failed (an I/O error reading, writing or syncing it during `apply`):
/// not the command's fault, so never its result. Another member's file did not fail, and
/// the command's result there is the real one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentFailure(pub String);

/// Why `apply` produced no value.
enum Failure {
    /// The command is wrong (malformed, key out of range, value too large, key not
    /// found): its `err` result, the same on every member.
    Command(String),
    Environment(EnvironmentFailure),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Command(e)
    }
}

impl From<EnvironmentFailure> for Failure {
    fn from(e: EnvironmentFailure) -> Self {
        Failure::Environment(e)
    }
}

/// A key's slot: its number and where it starts in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    key: u64,
    offset: u64,
}

impl<D: Disk> Store<D> {
    /// Empties `disk` and sizes it for `settings`: the host rebuilds a state as snapshot
    /// plus log replayed into a fresh instance, so whatever the file held before must go.
    pub fn create(settings: Settings, mut disk: D) -> Result<Store<D>, String> {
        let dirty = DirtyBlocks::new(settings.file_size)?;
        disk.set_len(0)?;
        disk.set_len(settings.file_size)?;
        Ok(Store { disk, settings, digest: Digest::default(), dirty, generation: 0 })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn disk(&self) -> &D {
        &self.disk
    }

    pub fn dirty(&self) -> &DirtyBlocks {
        &self.dirty
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Replaces the file with `staged` (a restored copy whose written blocks are
    /// `dirty`), keeping this instance's settings. `commit` puts the staged file in the
    /// place of the live one and returns it; nothing changes if it or the recount fails.
    pub fn replace_disk(
        &mut self,
        staged: D,
        dirty: DirtyBlocks,
        commit: impl FnOnce(D) -> Result<D, String>,
    ) -> Result<(), String> {
        let digest = recount(&staged, &self.settings, &dirty)?;
        self.disk = commit(staged)?;
        self.digest = digest;
        self.dirty = dirty;
        self.generation += 1;
        Ok(())
    }

    /// The command's result, or `Err` if this member's file failed. After an
    /// environment failure the store is not to be used again: the slot may be half written
    /// and the digest no longer follows the file.
    pub fn apply(&mut self, command: &[u8]) -> Result<Result<Vec<u8>, String>, EnvironmentFailure> {
        match self.try_apply(command) {
            Ok(value) => Ok(Ok(value)),
            Err(Failure::Command(e)) => Ok(Err(e)),
            Err(Failure::Environment(e)) => Err(e),
        }
    }

    fn try_apply(&mut self, command: &[u8]) -> Result<Vec<u8>, Failure> {
        match command::parse(command)? {
            Command::Get { key } => self.get(&key),
            Command::Set { key, value } => {
                let slot = self.slot(&key)?;
                self.check_value(&key, &value)?;
                let mut bytes = value;
                bytes.resize(self.settings.value_size as usize, 0);
                self.write_slot(slot, &bytes)?;
                Ok(Vec::new())
            }
            Command::Delete { key } => {
                let slot = self.slot(&key)?;
                self.write_slot(slot, &vec![0; self.settings.value_size as usize])?;
                Ok(Vec::new())
            }
        }
    }

    /// A read that fails here is only this client's error: nothing is replicated.
    pub fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        self.get(&command::query_key(request)?).map_err(|e| match e {
            Failure::Command(e) | Failure::Environment(EnvironmentFailure(e)) => e,
        })
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, Failure> {
        let slot = self.slot(key)?;
        let bytes = self.read_slot(slot)?;
        let value = trim_zeros(&bytes);
        if value.is_empty() {
            return Err(Failure::Command(format!("key not found: {key}")));
        }
        Ok(value.to_vec())
    }

    fn slot(&self, key: &str) -> Result<Slot, String> {
        // `u64::from_str` would also take a leading `+`.
        if !key.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("key must be an unsigned decimal integer, got {}", command::quote(key.as_bytes())));
        }
        let value_size = u64::from(self.settings.value_size);
        key.parse::<u64>()
            .ok()
            .and_then(|number| {
                let offset = number.checked_mul(value_size)?;
                let end = offset.checked_add(value_size)?;
                (end <= self.settings.file_size).then_some(Slot { key: number, offset })
            })
            .ok_or_else(|| format!("key {key} out of range (file holds {} values)", self.settings.slots()))
    }

    fn check_value(&self, key: &str, value: &[u8]) -> Result<(), String> {
        if value.is_empty() {
            return Err(format!("empty value for key {key}: a blank slot reads as not found (delete-{key} blanks it)"));
        }
        if value.len() > self.settings.value_size as usize {
            return Err(format!(
                "value too large for key {key}: {} bytes, value-size is {}",
                value.len(),
                self.settings.value_size
            ));
        }
        if value.last() == Some(&0) {
            return Err(format!(
                "value for key {key} ends in a NUL byte: slots are padded with NULs, so it could not be read back"
            ));
        }
        Ok(())
    }

    /// The file holds every slot (`create` sized it), so any error is the file's.
    fn read_slot(&self, slot: Slot) -> Result<Vec<u8>, EnvironmentFailure> {
        self.disk
            .read_at(slot.offset, self.settings.value_size as usize)
            .map_err(|e| EnvironmentFailure(format!("cannot read key {}: {e}", slot.key)))
    }

    /// Overwrites the whole slot, so that no byte of a longer old value survives.
    fn write_slot(&mut self, slot: Slot, bytes: &[u8]) -> Result<(), EnvironmentFailure> {
        let old = self.read_slot(slot)?;
        self.generation += 1;
        self.dirty.mark(slot.offset, bytes.len() as u64);
        self.disk
            .write_at(slot.offset, bytes)
            .map_err(|e| EnvironmentFailure(format!("cannot write key {}: {e}", slot.key)))?;
        account(&mut self.digest, slot.key, trim_zeros(&old), trim_zeros(bytes));
        if self.settings.sync == SyncMode::EachWrite {
            self.disk
                .sync()
                .map_err(|e| EnvironmentFailure(format!("cannot sync after writing key {}: {e}", slot.key)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;
    use crate::proto;
    use prost::Message;

    fn settings(file_size: u64, value_size: u32) -> Settings {
        Settings { file_size, value_size, sync: SyncMode::None }
    }

    fn store_of(file_size: u64, value_size: u32) -> Store<MemDisk> {
        Store::create(settings(file_size, value_size), MemDisk::default()).expect("create")
    }

    /// Ten slots of eight bytes and a four-byte tail.
    fn store() -> Store<MemDisk> {
        store_of(84, 8)
    }

    /// A recount that reads every slot, whatever the store believes was written.
    fn full_recount<D: Disk>(disk: &D, settings: &Settings) -> Digest {
        let mut everything = DirtyBlocks::new(settings.file_size).expect("dirty");
        everything.mark(0, settings.file_size);
        recount(disk, settings, &everything).expect("recount")
    }

    fn encode(op: proto::Op, key: &str, value: &[u8]) -> Vec<u8> {
        proto::Command { op: op as i32, key: key.into(), value: value.to_vec() }.encode_to_vec()
    }

    impl<D: Disk> Store<D> {
        /// `apply` where the disk is not expected to fail.
        pub fn run(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
            self.apply(command)
                .unwrap_or_else(|e| panic!("{:?}: the disk failed: {e:?}", String::from_utf8_lossy(command)))
        }
    }

    fn apply_all(store: &mut Store<MemDisk>, commands: &[&[u8]]) {
        for c in commands {
            store.run(c).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(c)));
        }
    }

    #[test]
    fn create_sizes_and_blanks_the_disk() {
        let mut used = MemDisk::default();
        used.write_at(0, &[7; 200]).expect("write");
        let s = Store::create(settings(84, 8), used).expect("create");
        assert_eq!(s.disk().bytes(), &[0; 84][..]);
        assert_eq!(s.digest(), Digest::default());
    }

    #[test]
    fn set_get_delete() {
        let mut s = store();
        assert_eq!(s.run(b"get-3"), Err("key not found: 3".to_string()));
        assert_eq!(s.run(b"set-3-abc"), Ok(vec![]));
        assert_eq!(s.run(b"get-3"), Ok(b"abc".to_vec()));
        assert_eq!(&s.disk().bytes()[24..32], b"abc\0\0\0\0\0");
        // A shorter value leaves nothing of the longer one behind.
        assert_eq!(s.run(b"set-3-12345678"), Ok(vec![]));
        assert_eq!(s.run(b"set-3-x-y"), Ok(vec![]));
        assert_eq!(s.run(b"get-3"), Ok(b"x-y".to_vec()));
        assert_eq!(&s.disk().bytes()[24..32], b"x-y\0\0\0\0\0");
        assert_eq!(s.run(b"delete-3"), Ok(vec![]));
        assert_eq!(s.run(b"get-3"), Err("key not found: 3".to_string()));
        assert_eq!(s.run(b"delete-3"), Ok(vec![]));
        assert_eq!(s.disk().bytes(), &[0; 84][..]);
    }

    #[test]
    fn slots_are_at_key_times_value_size() {
        let mut s = store();
        apply_all(&mut s, &[b"set-0-a", b"set-9-12345678", b"set-5-\0b"]);
        let bytes = s.disk().bytes();
        assert_eq!(bytes[0], b'a');
        assert_eq!(&bytes[72..80], b"12345678");
        assert_eq!(&bytes[40..42], b"\0b");
        assert_eq!(bytes.iter().filter(|&&b| b != 0).count(), 1 + 8 + 1);
        assert_eq!(s.run(b"get-5"), Ok(b"\0b".to_vec()));
        // Leading zeros name the same slot.
        assert_eq!(s.run(b"get-009"), Ok(b"12345678".to_vec()));
    }

    #[test]
    fn protobuf_commands() {
        let mut s = store();
        assert_eq!(s.run(&encode(proto::Op::Set, "2", b"\xff\x00\x01")), Ok(vec![]));
        assert_eq!(s.run(b"get-2"), Ok(b"\xff\x00\x01".to_vec()));
        assert_eq!(s.query(&encode(proto::Op::Get, "2", b"")), Ok(b"\xff\x00\x01".to_vec()));
        assert_eq!(s.run(&encode(proto::Op::Delete, "2", b"")), Ok(vec![]));
        assert!(s.run(&encode(proto::Op::Get, "2", b"")).is_err());
        assert!(s.run(&encode(proto::Op::Set, "k", b"v")).expect_err("key").contains("unsigned decimal"));
    }

    #[test]
    fn keys_must_be_unsigned_integers() {
        let mut s = store();
        for command in [&b"get-a"[..], b"set-x-1", b"delete-1a", b"get--1", b"get-+1", b"get-1 ", b"get- 1", b"get-1.0"]
        {
            let err = s.run(command).expect_err("bad key");
            assert!(err.contains("unsigned decimal integer"), "{command:?}: {err}");
        }
    }

    #[test]
    fn keys_out_of_range() {
        let mut s = store();
        assert_eq!(s.run(b"set-9-a"), Ok(vec![]));
        for key in ["10", "11", "18446744073709551615", "18446744073709551616", "99999999999999999999999"] {
            for command in [format!("get-{key}"), format!("set-{key}-a"), format!("delete-{key}")] {
                let err = s.run(command.as_bytes()).expect_err("range");
                assert_eq!(err, format!("key {key} out of range (file holds 10 values)"), "{command}");
            }
        }
        // K * value-size overflows u64 for this key: it must be refused, not wrap to slot 0.
        let mut wide = store_of(1 << 20, 1 << 19);
        let err = wide.run(b"set-36028797018963968-a").expect_err("overflow");
        assert!(err.contains("out of range (file holds 2 values)"), "{err}");
        assert_eq!(wide.run(b"set-1-a"), Ok(vec![]));
        assert_eq!(wide.disk().bytes()[1 << 19], b'a');
        assert_eq!(wide.disk().bytes()[0], 0);
    }

    #[test]
    fn bad_values() {
        let mut s = store();
        assert_eq!(s.run(b"set-1-12345678"), Ok(vec![]));
        let err = s.run(b"set-1-123456789").expect_err("long");
        assert!(err.contains("value too large for key 1: 9 bytes, value-size is 8"), "{err}");
        let err = s.run(b"set-1-").expect_err("empty");
        assert!(err.contains("empty value"), "{err}");
        for value in [&b"\0"[..], b"a\0", b"\0\0\0"] {
            let err = s.run(&encode(proto::Op::Set, "1", value)).expect_err("nul");
            assert!(err.contains("ends in a NUL byte"), "{value:?}: {err}");
        }
        assert_eq!(s.run(b"get-1"), Ok(b"12345678".to_vec()));
    }

    #[test]
    fn bad_commands_leave_the_state_alone() {
        let mut s = store();
        apply_all(&mut s, &[b"set-1-a"]);
        let (bytes, digest, generation) = (s.disk().clone(), s.digest(), s.generation());
        for bad in [&b"put-1-2"[..], b"hello", b"get-", b"\x12\x05a", b"set-1-", b"set-99-a", b"delete-x", b"set-a-1"] {
            assert!(s.run(bad).is_err(), "{bad:?}");
        }
        assert_eq!(s.disk(), &bytes);
        assert_eq!(s.digest(), digest);
        assert_eq!(s.generation(), generation);
    }

    #[test]
    fn query_is_read_only() {
        let mut s = store();
        apply_all(&mut s, &[b"set-1-a"]);
        let generation = s.generation();
        assert_eq!(s.query(b"get-1"), Ok(b"a".to_vec()));
        assert_eq!(s.query(b"get-2"), Err("key not found: 2".to_string()));
        for write in [
            b"set-1-b".to_vec(),
            b"delete-1".to_vec(),
            encode(proto::Op::Set, "1", b"b"),
            encode(proto::Op::Delete, "1", b""),
        ] {
            let err = s.query(&write).expect_err("write in query");
            assert!(err.starts_with("query is read-only"), "{err}");
        }
        assert_eq!(s.query(b"get-1"), Ok(b"a".to_vec()));
        assert_eq!(s.generation(), generation);
    }

    #[test]
    fn sync_each_write() {
        let mut s = Store::create(Settings { sync: SyncMode::EachWrite, ..settings(84, 8) }, MemDisk::default())
            .expect("create");
        apply_all(&mut s, &[b"set-1-a", b"get-1", b"delete-1", b"delete-2"]);
        assert!(s.run(b"set-1-").is_err());
        assert_eq!(s.disk().syncs, 3);
        let mut unsynced = store();
        apply_all(&mut unsynced, &[b"set-1-a", b"delete-1"]);
        assert_eq!(unsynced.disk().syncs, 0);
    }

    #[test]
    fn digest_depends_only_on_content() {
        let mut one = store();
        apply_all(&mut one, &[b"set-1-a", b"set-2-b", b"delete-1"]);
        let mut two = store();
        apply_all(&mut two, &[b"set-2-b"]);
        assert_eq!(one.digest(), two.digest());
        let mut three = store();
        apply_all(&mut three, &[b"set-2-longer", b"set-3-c", b"set-2-b", b"delete-3", b"delete-7"]);
        assert_eq!(one.digest(), three.digest());
        assert_eq!(one.digest().count(), 1);
        assert_eq!(&one.digest().to_bytes()[..8], &1u64.to_le_bytes());
    }

    #[test]
    fn digest_tells_contents_apart() {
        let digest_of = |commands: &[&[u8]]| {
            let mut s = store();
            apply_all(&mut s, commands);
            s.digest().to_bytes()
        };
        let empty = digest_of(&[]);
        assert_eq!(empty, [0; 24]);
        let a1 = digest_of(&[b"set-1-a"]);
        assert_ne!(a1, empty);
        assert_ne!(a1, digest_of(&[b"set-1-b"]));
        assert_ne!(a1, digest_of(&[b"set-2-a"]));
        assert_ne!(digest_of(&[b"set-1-ab"]), digest_of(&[b"set-1-a"]));
        assert_eq!(digest_of(&[b"set-1-a", b"delete-1"]), empty);
    }

    #[test]
    fn digest_matches_a_full_recount() {
        // Value size 100 does not divide the scan block, so slots straddle read boundaries
        // only if the recount gets its block arithmetic wrong.
        let mut s = store_of(1 << 20, 100);
        for i in 0..500u64 {
            let key = (i * 7919) % 10_000;
            if i % 5 == 0 {
                s.run(format!("delete-{}", (i * 13) % 10_000).as_bytes()).expect("delete");
            }
            let value = "v".repeat((i % 100 + 1) as usize);
            s.run(format!("set-{key}-{value}").as_bytes()).expect("set");
        }
        let recounted = full_recount(s.disk(), s.settings());
        assert_eq!(s.digest(), recounted);
        assert_eq!(recount(s.disk(), s.settings(), s.dirty()), Ok(recounted));
        assert!(recounted.count() > 400, "{recounted:?}");
    }

    #[test]
    fn replace_disk_recounts_and_keeps_the_old_state_on_failure() {
        let mut source = store();
        apply_all(&mut source, &[b"set-1-a", b"set-9-z"]);
        let mut s = store();
        apply_all(&mut s, &[b"set-2-b"]);
        let (old_digest, generation) = (s.digest(), s.generation());

        let err = s.replace_disk(source.disk().clone(), source.dirty().clone(), |_| Err("rename failed".to_string()));
        assert_eq!(err, Err("rename failed".to_string()));
        assert_eq!(s.digest(), old_digest);
        assert_eq!(s.query(b"get-2"), Ok(b"b".to_vec()));

        s.replace_disk(source.disk().clone(), source.dirty().clone(), Ok).expect("replace");
        assert_eq!(s.digest(), source.digest());
        assert_ne!(s.generation(), generation);
        assert_eq!(s.query(b"get-9"), Ok(b"z".to_vec()));
        assert!(s.query(b"get-2").is_err());
    }

    /// Writes only the first `write_limit` bytes of each write, then fails, like a disk
    /// running full mid-write.
    #[derive(Debug, Default)]
    struct FailingDisk {
        inner: MemDisk,
        write_limit: Option<usize>,
        fail_sync: bool,
        fail_read: bool,
    }

    impl Disk for FailingDisk {
        fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
            if self.fail_read {
                return Err("read failed".to_string());
            }
            self.inner.read_at(offset, len)
        }

        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
            match self.write_limit {
                Some(limit) => {
                    self.inner.write_at(offset, &data[..limit.min(data.len())])?;
                    Err("disk full".to_string())
                }
                None => self.inner.write_at(offset, data),
            }
        }

        fn set_len(&mut self, len: u64) -> Result<(), String> {
            self.inner.set_len(len)
        }

        fn sync(&mut self) -> Result<(), String> {
            if self.fail_sync {
                return Err("sync failed".to_string());
            }
            self.inner.sync()
        }
    }

    #[test]
    fn io_errors_stop_the_member_and_are_never_results() {
        let failing = |break_it: fn(&mut FailingDisk)| {
            let mut s =
                Store::create(Settings { sync: SyncMode::EachWrite, ..settings(84, 8) }, FailingDisk::default())
                    .expect("create");
            s.run(b"set-1-abcdef").expect("set");
            break_it(&mut s.disk);
            s
        };
        let mut s = failing(|d| d.write_limit = Some(2));
        let err = s.apply(b"set-1-XYZ").expect_err("a failing write is this member's failure");
        assert!(err.0.contains("cannot write key 1: disk full"), "{err:?}");

        let mut s = failing(|d| d.fail_sync = true);
        let err = s.apply(b"set-2-q").expect_err("a failing sync is this member's failure");
        assert!(err.0.contains("cannot sync after writing key 2: sync failed"), "{err:?}");

        let mut s = failing(|d| d.fail_read = true);
        for command in [&b"get-1"[..], b"set-1-a", b"delete-1"] {
            let err = s.apply(command).expect_err("a failing read is this member's failure");
            assert!(err.0.contains("cannot read key 1: read failed"), "{err:?}");
        }
        // A query is answered to one client only: a failed read is just its error.
        assert_eq!(s.query(b"get-1"), Err("cannot read key 1: read failed".to_string()));
        // Commands that are wrong in themselves stay results, whatever the disk does.
        let err = s.apply(b"set-99-a").expect("a bad key is a result").expect_err("out of range");
        assert!(err.contains("out of range"), "{err}");
        let err = s.apply(b"set-1-").expect("an empty value is a result").expect_err("empty");
        assert!(err.contains("empty value"), "{err}");
    }
}
