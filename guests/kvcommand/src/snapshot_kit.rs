//! Properties every key/value guest's snapshot stream must have, checked natively over
//! its store: one kit, so `kvstore` and `diskstorage` are held to the same promises of
//! `wit/fsm.wit` (snapshot and restore give the same state, whatever the chunk sizes on
//! either side; taking a snapshot changes nothing; a stream cut anywhere, damaged, or from
//! another guest is refused; a reader outliving a change fails instead of mixing two
//! states). Each guest implements [`Subject`] in its tests and calls [`check_all`];
//! format details (byte layout, what a corrupt record says) stay in the guest's own tests.

/// What the checks need from a guest's store.
pub trait Subject: Sized {
    /// A store with a varied state: several records, odd sizes, non-ASCII where allowed.
    fn sample() -> Self;
    /// Applies a command the way the guest's `apply` does, `Err` being a guest error result.
    fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String>;
    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String>;
    fn digest(&self) -> Vec<u8>;
    /// A reader over the store's state now, as `snapshot` creates one.
    fn reader(&self) -> Box<dyn Reader<Self>>;
    /// Restores `chunks`, written in that order, into a fresh store with this store's
    /// settings and an unrelated state of its own; returns it, or the restore's error.
    fn restore_beside(&self, chunks: &[&[u8]]) -> Result<Self, String>;
    /// A command that changes the state (for the reader-after-change and the
    /// keep-applying checks).
    fn a_change(n: u32) -> Vec<u8>;
}

/// The guest's snapshot reader over a borrowed store (the store may change in between).
pub trait Reader<S> {
    fn read(&mut self, store: &S, max: usize) -> Result<Vec<u8>, String>;
}

/// Runs every check; panics naming the first that fails.
pub fn check_all<S: Subject>() {
    read_sizes_do_not_change_the_stream::<S>();
    restore_gives_the_same_state_whatever_the_chunks::<S>();
    restored_and_original_stay_equal_as_commands_follow::<S>();
    taking_a_snapshot_changes_nothing::<S>();
    a_reader_fails_once_the_state_changes::<S>();
    zero_max_bytes_is_an_error_not_the_end::<S>();
    a_stream_cut_anywhere_or_damaged_is_refused::<S>();
    another_stream_is_refused::<S>();
}

/// Reads a whole stream in chunks of at most `max` bytes, checking the bound.
pub fn read_all<S: Subject>(store: &S, max: usize) -> Vec<Vec<u8>> {
    let mut reader = store.reader();
    let mut chunks = Vec::new();
    loop {
        let chunk = reader.read(store, max).unwrap_or_else(|e| panic!("read (max {max}): {e}"));
        assert!(chunk.len() <= max, "a chunk of {} bytes for max {max}", chunk.len());
        if chunk.is_empty() {
            return chunks;
        }
        chunks.push(chunk);
    }
}

fn stream_of<S: Subject>(store: &S) -> Vec<u8> {
    read_all(store, 1 << 20).concat()
}

pub fn read_sizes_do_not_change_the_stream<S: Subject>() {
    let store = S::sample();
    let whole = stream_of(&store);
    for max in [1, 2, 3, 7, 8, 9, 13, 64, 117, 1000, 4096] {
        let chunks = read_all(&store, max);
        assert_eq!(chunks.concat(), whole, "max {max}: another stream");
        // Only the last chunk may be short: the rest fill their budget.
        for chunk in &chunks[..chunks.len().saturating_sub(1)] {
            assert_eq!(chunk.len(), max, "max {max}: a short chunk before the last");
        }
    }
}

pub fn restore_gives_the_same_state_whatever_the_chunks<S: Subject>() {
    let store = S::sample();
    let stream = stream_of(&store);
    for chunk_size in [1, 3, 5, 7, 11, 4096, stream.len().max(1)] {
        let chunks: Vec<&[u8]> = stream.chunks(chunk_size).collect();
        let restored = store.restore_beside(&chunks).unwrap_or_else(|e| panic!("chunks of {chunk_size}: {e}"));
        assert_eq!(restored.digest(), store.digest(), "chunks of {chunk_size}: another digest");
        assert_eq!(stream_of(&restored), stream, "chunks of {chunk_size}: another state");
    }
    // Empty chunks are harmless.
    let cut = stream.len().min(2);
    let restored = store.restore_beside(&[b"", &stream[..cut], b"", &stream[cut..], b""]).expect("empty chunks");
    assert_eq!(restored.digest(), store.digest());
}

pub fn restored_and_original_stay_equal_as_commands_follow<S: Subject>() {
    let mut store = S::sample();
    let mut restored = store.restore_beside(&[&stream_of(&store)]).expect("restore");
    for n in 0..50 {
        let command = S::a_change(n);
        assert_eq!(restored.apply(&command), store.apply(&command), "result of command {n}");
        assert_eq!(restored.digest(), store.digest(), "digest after command {n}");
    }
    assert_eq!(stream_of(&restored), stream_of(&store));
}

pub fn taking_a_snapshot_changes_nothing<S: Subject>() {
    let mut store = S::sample();
    let mut twin = S::sample();
    let digest = store.digest();
    read_all(&store, 5);
    assert_eq!(store.digest(), digest, "reading a snapshot changed the digest");
    // ... and nothing a later command sees.
    for n in 0..10 {
        let command = S::a_change(n);
        assert_eq!(store.apply(&command), twin.apply(&command), "command {n} after a snapshot");
    }
    assert_eq!(store.digest(), twin.digest());
}

pub fn a_reader_fails_once_the_state_changes<S: Subject>() {
    let mut store = S::sample();
    let mut reader = store.reader();
    assert!(reader.read(&store, 10).is_ok());
    store.apply(&S::a_change(0)).expect("a change");
    assert!(reader.read(&store, 10).is_err(), "a reader went on over a changed state");
}

pub fn zero_max_bytes_is_an_error_not_the_end<S: Subject>() {
    let store = S::sample();
    let mut reader = store.reader();
    assert!(reader.read(&store, 0).is_err(), "max 0 must not read as the end of the stream");
    let first = reader.read(&store, 4).expect("then a real read");
    assert_eq!(first, stream_of(&store)[..4].to_vec());
}

pub fn a_stream_cut_anywhere_or_damaged_is_refused<S: Subject>() {
    let store = S::sample();
    let stream = stream_of(&store);
    // Every cut of a small stream; of a larger one the ends and a stride through it.
    // Record boundaries included: a stream must say where it ends (see `seal`).
    let every = (stream.len() / 2048).max(1);
    let cuts = (0..stream.len()).filter(|&c| c < 256 || c + 256 > stream.len() || c % every == 0);
    for cut in cuts {
        if let Ok(restored) = store.restore_beside(&[&stream[..cut]]) {
            panic!(
                "a stream cut at byte {cut} of {} was restored (digest {:?}, the whole one's {:?})",
                stream.len(),
                restored.digest(),
                store.digest()
            );
        }
    }
    for at in (0..stream.len()).filter(|&c| c < 64 || c + 64 > stream.len() || c % every == 0) {
        let mut damaged = stream.clone();
        damaged[at] ^= 0x04;
        assert!(store.restore_beside(&[&damaged]).is_err(), "a stream with byte {at} flipped was restored");
    }
}

pub fn another_stream_is_refused<S: Subject>() {
    let store = S::sample();
    for garbage in [&b"X"[..], b"not a snapshot at all", &[0u8; 64]] {
        assert!(store.restore_beside(&[garbage]).is_err(), "{garbage:?} was restored");
    }
}
