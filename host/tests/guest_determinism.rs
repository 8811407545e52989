//! What a guest can observe through WASI must be the same on every member: file times,
//! metadata hashes, directory order and timers. Runs the `faulty` guest's probes on
//! instances whose `/data` directories are different host directories, as two members'
//! are.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host::fsm::{ApplyOutcome, GuestModule, Instance, Limits};

fn faulty() -> GuestModule {
    GuestModule::load(
        &common::guest("faulty"),
        Limits { fuel_per_entry: 20_000_000, fuel_per_query: 2_000_000, memory_bytes: 64 << 20 },
    )
    .expect("load faulty")
}

/// One member's instance on its own guest directory.
struct Member {
    dir: tempfile::TempDir,
    inst: Instance,
}

impl Member {
    fn new(module: &GuestModule) -> Member {
        let dir = tempfile::tempdir().expect("tempdir");
        let inst = Instance::new(module, &[], Some(dir.path()), 1).expect("instance");
        Member { dir, inst }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&mut self, command: &str) -> String {
        match self.inst.apply(1, 1, command.as_bytes()) {
            ApplyOutcome::Result(Ok(bytes)) => String::from_utf8(bytes).expect("utf8"),
            other => panic!("{command}: {other:?}"),
        }
    }
}

fn write(path: &Path, data: &str) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[test]
fn file_times_are_the_frozen_epoch() {
    let mut m = Member::new(&faulty());
    assert_eq!(m.run("write-/data/f-hello"), "");
    write(&m.path("g"), "made by the host");
    std::fs::create_dir(m.path("sub")).expect("mkdir");
    let epoch = "0.000000000 0.000000000 0.000000000";
    for probe in ["stat-/data/f", "fstat-/data/f", "stat-/data/g", "fstat-/data/g", "stat-/data/sub", "stat-/data/."] {
        assert_eq!(m.run(probe), epoch, "{probe}");
    }
}

#[test]
fn metadata_hash_is_the_same_on_every_member_and_after_recreating() {
    let module = faulty();
    let mut one = Member::new(&module);
    let mut two = Member::new(&module);
    for m in [&mut one, &mut two] {
        write(&m.path("f"), "same bytes");
        write(&m.path("g"), "other file");
    }
    let hash = one.run("hash-/data/f");
    assert_eq!(hash.len(), 32, "{hash}");
    assert_eq!(two.run("hash-/data/f"), hash, "same file, other inode and device");
    assert_eq!(one.run("fhash-/data/f"), hash, "through an opened descriptor");
    assert_eq!(two.run("fhash-/data/f"), hash);
    std::fs::create_dir(one.path("sub")).expect("mkdir");
    assert_eq!(one.run("hash-/data/./sub/../f"), hash, "another spelling of the same path");
    assert_ne!(one.run("hash-/data/g"), hash, "another file");

    // Recreated with the same contents: a new inode and new times, the same hash.
    std::fs::remove_file(one.path("f")).expect("remove");
    write(&one.path("spacer"), "takes the old inode, if the file system reuses it");
    write(&one.path("f"), "same bytes");
    assert_eq!(one.run("hash-/data/f"), hash);
    assert_eq!(one.run("fhash-/data/f"), hash);
}

#[test]
fn directory_listings_are_sorted_by_name() {
    let mut m = Member::new(&faulty());
    let names = ["m", "c", "x", "a", "q", "b", "zz", "k", "d", "y", "e", "p", "f", "o", "g", "n", "h", "l", "i", "j"];
    for name in names {
        write(&m.path(name), name);
    }
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort_unstable();
    assert_eq!(m.run("list"), sorted.join(","));
}

#[test]
fn timers_fire_at_once() {
    let mut m = Member::new(&faulty());
    let started = Instant::now();
    let answer = m.run("sleep");
    assert!(answer.starts_with("slept"), "{answer}");
    // The probe waits on three 10 s timers; a real clock would take 30 s.
    assert!(started.elapsed() < Duration::from_secs(2), "sleep took {:?}", started.elapsed());
}
