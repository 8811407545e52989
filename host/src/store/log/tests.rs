//! The log store against its files: reopen after appends, torn tails, purges, truncation,
//! preallocated and recycled segments, gaps, the vote and the committed hint.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use super::record::encode_record;
use super::segments::segment_name;
use super::spare::Spare;
use super::*;
use crate::types::Request;
use openraft::{CommittedLeaderId, EntryPayload};
use std::collections::BTreeSet;

fn entry(term: u64, index: u64, cmd: &str) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(Request::commands(vec![cmd.as_bytes().to_vec()])),
    }
}

#[tokio::test]
async fn records_survive_reopen_and_torn_tail_is_zeroed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut data = Vec::new();
    // From index 0: openraft's first entry (the initial membership) has index 0.
    for i in 0..5 {
        encode_record(&entry(1, i, &format!("set-{i}-x")), &mut data).expect("encode");
    }
    let full = data.len();
    // A torn tail: half of a sixth record.
    let mut sixth = Vec::new();
    encode_record(&entry(1, 5, "set-5-x"), &mut sixth).expect("encode");
    data.extend_from_slice(&sixth[..sixth.len() / 2]);
    fs::write(dir.path().join(segment_name(0)), &data).expect("write");

    let mut store = LogStore::open(dir.path(), true).expect("open");
    let got = store.try_get_log_entries(..).await.expect("read");
    assert_eq!(got.len(), 5);
    assert_eq!(got[0], entry(1, 0, "set-0-x"));
    assert_eq!(got[4], entry(1, 4, "set-4-x"));
    let data = fs::read(dir.path().join(segment_name(0))).expect("read");
    assert!(data[full..].iter().all(|b| *b == 0), "the torn record was zeroed");
}

#[tokio::test]
async fn corruption_in_an_older_segment_fails_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = Vec::new();
    encode_record(&entry(1, 1, "a"), &mut a).expect("encode");
    let last = a.len() - 1;
    a[last] ^= 0xff;
    fs::write(dir.path().join(segment_name(1)), &a).expect("write");
    let mut b = Vec::new();
    encode_record(&entry(1, 2, "b"), &mut b).expect("encode");
    fs::write(dir.path().join(segment_name(2)), &b).expect("write");
    let err = LogStore::open(dir.path(), true).err().expect("must fail");
    assert!(err.to_string().contains("records end at index 1, the next segment starts at 2"), "{err}");
}

#[tokio::test]
async fn truncate_and_purge_persist() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
        // Three segments of 10 entries each, written through the writer itself.
        for seg in 0..3u64 {
            let mut records = Vec::new();
            for i in 1..=10 {
                encode_record(&entry(1, seg * 10 + i, "x"), &mut records).expect("encode");
            }
            w.append(&records, seg * 10 + 1, seg * 10 + 10).expect("append");
            w.segments.last_mut().expect("segment").len = SEGMENT_BYTES;
        }
        w.truncate(25).expect("truncate");
        w.purge(LogId::new(CommittedLeaderId::new(1, 1), 12)).expect("purge");
        assert_eq!(w.segments.len(), 2, "segment 1..10 is gone");
    }
    let mut store = LogStore::open(dir.path(), true).expect("reopen");
    let state = store.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(12));
    assert_eq!(state.last_log_id.map(|l| l.index), Some(24));
    let got = store.try_get_log_entries(..).await.expect("read");
    assert_eq!(got.first().map(|e| e.log_id.index), Some(13));
    assert_eq!(got.len(), 12);
}

fn records(range: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for i in range {
        encode_record(&entry(1, i, &format!("set-{i}-x")), &mut out).expect("encode");
    }
    out
}

#[tokio::test]
async fn preallocated_segments_hold_records_and_zero_torn_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let second = dir.path().join(segment_name(11));
    {
        let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
        w.append(&records(1..=10), 1, 10).expect("append");
        // As if the first segment were full: the next append starts the spare and
        // moves on to it.
        w.segments.last_mut().expect("segment").len = SEGMENT_BYTES;
        w.append(&records(11..=20), 11, 20).expect("append");
        assert_eq!(fs::metadata(&second).expect("meta").len(), SEGMENT_BYTES, "the spare became segment 11");
    }
    let valid = records(11..=20).len();
    {
        let mut store = LogStore::open(dir.path(), true).expect("reopen");
        let got = store.try_get_log_entries(..).await.expect("read");
        assert_eq!(got.len(), 20);
        assert_eq!(got[19], entry(1, 20, "set-20-x"));
        assert_eq!(fs::metadata(&second).expect("meta").len(), SEGMENT_BYTES, "zeros are not a torn tail");
    }
    // A crash in the middle of writing record 21 into the zeroed space.
    let torn = records(21..=21);
    let f = OpenOptions::new().write(true).open(&second).expect("open");
    f.write_all_at(&torn[..torn.len() / 2], valid as u64).expect("write");
    drop(f);
    let mut store = LogStore::open(dir.path(), true).expect("reopen after the torn write");
    let got = store.try_get_log_entries(..).await.expect("read");
    assert_eq!(got.len(), 20, "the torn record is gone");
    let data = fs::read(&second).expect("read");
    assert_eq!(data.len() as u64, SEGMENT_BYTES, "still written in full");
    assert!(data[valid..].iter().all(|b| *b == 0), "the torn record was zeroed");
}

#[tokio::test]
async fn purged_segments_are_reused_and_their_old_records_never_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = dir.path().join(segment_name(1));
    let third = dir.path().join(segment_name(21));
    {
        let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
        // Segment 1..=10 is written in full (records, then filler a full segment
        // would have), so it can be reused.
        w.append(&records(1..=10), 1, 10).expect("append");
        let seg = w.segments.last_mut().expect("segment");
        seg.file.write_all_at(&[7u8; 64], seg.len).expect("filler");
        seg.len = SEGMENT_BYTES;
        w.append(&records(11..=20), 11, 20).expect("append");
        w.segments.last_mut().expect("segment").len = SEGMENT_BYTES;
        w.purge(LogId::new(CommittedLeaderId::new(1, 1), 10)).expect("purge");
        assert!(!first.exists() && matches!(w.spare, Some(Spare::Recycled(_))), "kept as the spare");
        // Fewer bytes than segment 1 held: its records 4..=10 are still in the file.
        w.append(&records(21..=23), 21, 23).expect("append");
        assert!(third.exists());
    }
    let old = records(1..=10);
    let data = fs::read(&third).expect("read");
    assert!(data.len() >= old.len() && data[records(21..=23).len()..old.len()].iter().any(|b| *b != 0));
    let mut store = LogStore::open(dir.path(), true).expect("reopen");
    let got = store.try_get_log_entries(..).await.expect("read");
    let indices: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indices, (11..=23).collect::<Vec<_>>(), "no record of the file's earlier use");
    let data = fs::read(&third).expect("read");
    assert!(data[records(21..=23).len()..].iter().all(|b| *b == 0), "the old records were zeroed");
}

/// An intact record that does not decode is not a torn tail: zeroing from there would
/// throw away every entry after it.
#[tokio::test]
async fn an_intact_record_that_does_not_decode_fails_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut data = records(1..=3);
    // A record of another format: valid length and checksum, not an `Entry`.
    encode_record(&"not an entry", &mut data).expect("encode");
    data.extend_from_slice(&records(5..=6));
    fs::write(dir.path().join(segment_name(1)), &data).expect("write");
    let err = LogStore::open(dir.path(), true).err().expect("must fail");
    assert!(err.to_string().contains("intact but cannot be decoded"), "{err}");
    assert_eq!(fs::read(dir.path().join(segment_name(1))).expect("read"), data, "nothing was zeroed");
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

async fn indices(dir: &Path) -> (Option<u64>, Vec<u64>) {
    let mut store = LogStore::open(dir, true).expect("reopen");
    let state = store.get_log_state().await.expect("state");
    let got = store.try_get_log_entries(..).await.expect("read");
    (state.last_purged_log_id.map(|l| l.index), got.iter().map(|e| e.log_id.index).collect())
}

/// A follower that installs a snapshot ahead of its log purges past its last entry,
/// then appends from the snapshot on: those entries must survive a restart.
#[tokio::test]
async fn entries_appended_after_a_purge_past_the_end_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut store = LogStore::open(dir.path(), true).expect("open");
        store.write_entries((1..=10).map(|i| entry(1, i, "x")).collect()).expect("append");
        store.purge(log_id(20)).await.expect("purge");
        store.write_entries((21..=25).map(|i| entry(1, i, "y")).collect()).expect("append");
    }
    assert_eq!(indices(dir.path()).await, (Some(20), (21..=25).collect()));
    // And again after more appends and a second restart, through a reused segment.
    {
        let mut store = LogStore::open(dir.path(), true).expect("open");
        store.write_entries((26..=30).map(|i| entry(1, i, "z")).collect()).expect("append");
        store.purge(log_id(40)).await.expect("purge");
        store.write_entries((41..=42).map(|i| entry(1, i, "w")).collect()).expect("append");
    }
    assert_eq!(indices(dir.path()).await, (Some(40), vec![41, 42]));
}

/// A purge past the end recorded, then a crash before the old segment was removed:
/// the gap before the new segment is all purged, so start-up accepts it. A gap with
/// entries missing that were never purged is corruption.
#[tokio::test]
async fn start_up_accepts_a_gap_exactly_when_it_is_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join(segment_name(1)), records(1..=10)).expect("write");
    fs::write(dir.path().join(segment_name(21)), records(21..=25)).expect("write");
    write_small(&dir.path().join("purged"), &log_id(20)).expect("purged");
    assert_eq!(indices(dir.path()).await, (Some(20), (21..=25).collect()));

    write_small(&dir.path().join("purged"), &log_id(19)).expect("purged");
    let err = LogStore::open(dir.path(), true).err().expect("entry 20 is missing and not purged");
    assert!(err.to_string().contains("records end at index 11, the next segment starts at 21"), "{err}");
}

/// Every segment a purge covers goes, the last one too, and an append that does not
/// follow the last segment starts a new one; an append into the log is refused.
#[tokio::test]
async fn appends_that_do_not_follow_on_start_a_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
    w.append(&records(1..=10), 1, 10).expect("append");
    w.purge(log_id(20)).expect("purge");
    assert!(w.segments.is_empty(), "segment 1..=10 is entirely purged");
    assert!(!dir.path().join(segment_name(1)).exists());
    w.append(&records(21..=22), 21, 22).expect("append");
    // What start-up relies on after a crash between recording a purge and removing the
    // segments it covers (openraft's storage suite also appends with gaps).
    w.append(&records(30..=31), 30, 31).expect("append");
    let firsts: Vec<u64> = w.segments.iter().map(|s| s.first).collect();
    assert_eq!(firsts, vec![21, 30]);
    let err = w.append(&records(31..=31), 31, 31).expect_err("31 is already there");
    assert!(err.to_string().contains("overlaps"), "{err}");
}

/// openraft purges for an installed snapshot while the install still runs: the purge
/// must not reach the disk before the snapshot does, nor at all if the install fails.
#[tokio::test]
async fn purge_waits_for_a_snapshot_on_disk_that_covers_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path(), true).expect("open").purge_behind_snapshots();
    let cover = store.snapshot_cover().expect("purges wait for snapshots");
    store.write_entries((0..=10).map(|i| entry(1, i, "x")).collect()).expect("append");
    cover.advance(Some(4));
    store.clone().purge(log_id(4)).await.expect("covered already");

    let purge = tokio::spawn({
        let mut store = store.clone();
        async move { store.purge(log_id(30)).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!purge.is_finished(), "no snapshot covers 30 yet");
    assert_eq!(read_small::<LogId>(&dir.path().join("purged")).expect("read"), Some(log_id(4)));
    assert_eq!(indices(dir.path()).await, (Some(4), (5..=10).collect()), "the log is intact on disk");
    cover.advance(Some(30));
    purge.await.expect("join").expect("purged once covered");
    assert_eq!(read_small::<LogId>(&dir.path().join("purged")).expect("read"), Some(log_id(30)));

    let purge = tokio::spawn({
        let mut store = store.clone();
        async move { store.purge(log_id(50)).await }
    });
    cover.fail("guest restore failed".into());
    assert!(purge.await.expect("join").is_err(), "the install failed: nothing to purge behind");
    assert_eq!(read_small::<LogId>(&dir.path().join("purged")).expect("read"), Some(log_id(30)));
}

/// A store that takes `entries` as openraft's append does, without its callback.
fn store_with_vote(dir: &Path, vote: Vote) -> LogStore {
    let store = LogStore::open(dir, true).expect("open").leader_writes_ahead(1).expect("writes ahead");
    *store.vote.lock().expect("vote") = Some(vote);
    store
}

fn leader_entry(term: u64, node: u64, index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, node), index),
        payload: EntryPayload::Normal(Request::commands(vec![b"x".to_vec()])),
    }
}

#[tokio::test]
async fn only_the_leaders_own_entries_are_reported_before_their_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut leading = Vote::new(2, 1);
    leading.commit();
    let store = store_with_vote(dir.path(), leading);
    let durable = store.durable();

    // Node 1 leads term 2: its entries are written ahead and synced by the thread.
    store.write_entries(vec![leader_entry(2, 1, 1), leader_entry(2, 1, 2)]).expect("write");
    assert_eq!(durable.written_ahead(), Some(2));
    durable.wait_for(2).await.expect("synced");
    assert_eq!(durable.upto().map(|l| l.index), Some(2));

    // A membership change is synced before it is reported.
    let membership = Entry {
        log_id: LogId::new(CommittedLeaderId::new(2, 1), 3),
        payload: EntryPayload::Membership(openraft::Membership::new(vec![BTreeSet::from([1])], None)),
    };
    store.write_entries(vec![membership]).expect("write");
    assert_eq!(durable.upto().map(|l| l.index), Some(3));
    assert_eq!(durable.written_ahead(), Some(2));

    // Entries of an earlier term of its own, received as a follower of node 2.
    let mut following = Vote::new(3, 2);
    following.commit();
    let store = store_with_vote(dir.path(), following);
    let durable = store.durable();
    store.write_entries(vec![leader_entry(2, 1, 4)]).expect("write");
    assert_eq!(durable.written_ahead(), None);
    assert_eq!(durable.upto().map(|l| l.index), Some(4), "synced before it was reported");

    // A vote that is not committed yet (a candidate) never writes ahead either.
    let store = store_with_vote(dir.path(), Vote::new(4, 1));
    store.write_entries(vec![leader_entry(4, 1, 5)]).expect("write");
    assert_eq!(store.durable().written_ahead(), None);
}

#[tokio::test]
async fn committed_hint_survives_reopen_unless_its_entry_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut data = Vec::new();
    for i in 60..=66 {
        encode_record(&entry(3, i, "x"), &mut data).expect("encode");
    }
    fs::write(dir.path().join(segment_name(60)), &data).expect("write");
    let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
    let c = LogId::new(CommittedLeaderId::new(3, 1), 66);
    w.write_committed(Some(c)).expect("write");
    let mut store = LogStore::open(dir.path(), true).expect("open");
    assert_eq!(store.read_committed().await.expect("read"), Some(c));

    // The hint names an entry the log no longer has (a crash took it before its
    // sync): replaying up to it would fail.
    let mut w = Writer::new(dir.path(), Vec::new(), BTreeMap::new(), true);
    w.write_committed(Some(LogId::new(CommittedLeaderId::new(3, 1), 67))).expect("write");
    let mut store = LogStore::open(dir.path(), true).expect("open");
    assert_eq!(store.read_committed().await.expect("read"), None);
}

#[tokio::test]
async fn vote_is_durable_and_comes_back_uncommitted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vote = Vote::new(3, 2);
    {
        let mut store = LogStore::open(dir.path(), true).expect("open");
        store.save_vote(&vote).await.expect("save");
    }
    let mut store = LogStore::open(dir.path(), true).expect("reopen");
    assert_eq!(store.read_vote().await.expect("read"), Some(vote));

    // A leadership restored as committed would lead again without a new term.
    let mut leading = Vote::new(4, 2);
    leading.commit();
    store.save_vote(&leading).await.expect("save");
    assert_eq!(store.read_vote().await.expect("read"), Some(leading));
    let mut store = LogStore::open(dir.path(), true).expect("reopen");
    let back = store.read_vote().await.expect("read").expect("a vote");
    assert_eq!((back.leader_id, back.committed), (leading.leader_id, false));
}
