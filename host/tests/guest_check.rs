//! `host check`: the shipped guests pass with their command files, a guest that breaks the
//! contract fails naming the check, and bad input is refused with exit 2.
//!
//! Needs the release binaries and guests from `scripts/build.sh`.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

fn check(guest: &str, commands: &Path, extra: &[&str]) -> Output {
    let mut cmd = clean_command(&host_exe());
    cmd.arg("check").arg("--fsm").arg(common::guest(guest)).arg("--commands").arg(commands).args(extra);
    run_with_timeout(cmd, Duration::from_secs(120)).unwrap_or_else(|e| panic!("host check {guest}: {e}"))
}

fn commands_of(guest: &str) -> std::path::PathBuf {
    workspace_root().join("guests").join(guest).join("commands.txt")
}

fn lines(out: &Output, prefix: &str) -> Vec<String> {
    stdout_of(out).lines().filter(|l| l.starts_with(prefix)).map(str::to_string).collect()
}

#[test]
fn t10_the_shipped_guests_pass_with_their_command_files() {
    for (guest, extra) in [("kvstore", &[][..]), ("diskstorage", &["--fsm-config", "file-size=1M"][..])] {
        let out = check(guest, &commands_of(guest), extra);
        assert_eq!(out.status.code(), Some(0), "{guest}:\n{}\n{}", stdout_of(&out), stderr_of(&out));
        assert_eq!(lines(&out, "PASS").len(), 8, "{guest}: every check passes\n{}", stdout_of(&out));
        assert!(lines(&out, "FAIL").is_empty());
    }
}

/// The same commands as `[u32 BE length][bytes]` records.
#[test]
fn t20_binary_command_files_are_read_too() {
    let text = std::fs::read_to_string(commands_of("kvstore")).expect("commands");
    let mut binary = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        binary.extend_from_slice(&(line.len() as u32).to_be_bytes());
        binary.extend_from_slice(line.as_bytes());
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("commands.bin");
    std::fs::write(&path, &binary).expect("write");
    let out = check("kvstore", &path, &["--binary"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout_of(&out), stderr_of(&out));

    // Cut inside a record: the file is refused, naming what is wrong.
    std::fs::write(&path, &binary[..binary.len() - 1]).expect("write");
    let out = check("kvstore", &path, &["--binary"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("claims"), "{}", stderr_of(&out));
}

/// The `faulty` test guest accepts any setting and restores any stream without checking
/// it: two broken promises, each named, and a non-zero exit.
#[test]
fn t30_a_guest_that_breaks_the_contract_fails_naming_the_checks() {
    let out = check("faulty", &commands_of("kvstore"), &[]);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", stdout_of(&out), stderr_of(&out));
    let failed = lines(&out, "FAIL");
    assert!(failed.iter().any(|l| l.contains("init rejects an unknown setting")), "{failed:?}");
    assert!(failed.iter().any(|l| l.contains("restore refuses") && l.contains("flipped")), "{failed:?}");
    assert!(stdout_of(&out).contains("not safe to replicate"));
}

#[test]
fn t40_bad_input_is_refused_with_exit_2() {
    let out = check("notfsm", &commands_of("kvstore"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("does not implement the wasm-raft:fsm"), "{}", stderr_of(&out));

    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.txt");
    let out = check("kvstore", &missing, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("nope.txt"), "{}", stderr_of(&out));

    let one = dir.path().join("one.txt");
    std::fs::write(&one, "set-a-1\n").expect("write");
    let out = check("kvstore", &one, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("fewer than 2 commands"), "{}", stderr_of(&out));

    // A setting the guest refuses: it cannot start, which is not a check failing.
    let out = check("kvstore", &commands_of("kvstore"), &["--fsm-config", "preload-keys=many"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("does not start"), "{}", stderr_of(&out));

    let out = check("kvstore", &commands_of("kvstore"), &["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
}
