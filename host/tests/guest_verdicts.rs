//! How a guest's failures are sorted, one instance at a time: a trap that does not depend
//! on the heap (a panic, `unreachable`) is a result every member shares; running out of
//! fuel, memory or stack, and the guest's report that its environment failed, are this
//! member's own and stop it. In a query, only the guest's report is.

mod common;

use std::sync::OnceLock;

use host::fsm::{ApplyOutcome, GuestModule, Instance, Limits};

/// The `faulty` test guest.
fn faulty() -> &'static GuestModule {
    static MODULE: OnceLock<GuestModule> = OnceLock::new();
    MODULE.get_or_init(|| {
        GuestModule::load(
            &common::guest("faulty"),
            Limits { fuel_per_entry: 20_000_000, fuel_per_query: 2_000_000, memory_bytes: 64 << 20 },
        )
        .expect("load faulty")
    })
}

fn apply(dir: &tempfile::TempDir, command: &str) -> ApplyOutcome {
    let mut inst = Instance::new(faulty(), &[], Some(dir.path()), 1).expect("instance");
    inst.apply(1, 1, command.as_bytes())
}

fn member_failure(outcome: ApplyOutcome) -> String {
    match outcome {
        ApplyOutcome::MemberFailure(why) => why,
        other => panic!("expected a member failure, got {other:?}"),
    }
}

#[test]
fn reported_environment_failure_is_the_members_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(apply(&dir, "env-check"), ApplyOutcome::Result(Ok(ok)) if ok == b"ok"));
    std::fs::write(dir.path().join("broken-disk"), b"").expect("marker");
    let why = member_failure(apply(&dir, "env-check"));
    assert!(why.contains("environment failed") && why.contains("broken-disk"), "{why}");
}

#[test]
fn running_out_of_fuel_is_the_members_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let why = member_failure(apply(&dir, "spin"));
    assert!(why.contains("ran out of fuel") && why.contains("20000000"), "{why}");
}

#[test]
fn refused_memory_is_the_members_own_whether_the_guest_traps_or_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let why = member_failure(apply(&dir, "grow"));
    assert!(why.contains("memory could not grow") && why.contains("trapped"), "{why}");
    let why = member_failure(apply(&dir, "try-grow"));
    assert!(why.contains("memory could not grow") && why.contains("returned a result"), "{why}");
}

/// How deep the stack may go depends on the compiled code's frame sizes.
#[test]
fn stack_overflow_is_the_members_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let why = member_failure(apply(&dir, "recurse"));
    assert!(why.contains("overflowed its stack"), "{why}");
}

#[test]
fn a_panic_is_a_trap_every_member_shares() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(apply(&dir, "add-then-trap-1"), ApplyOutcome::Trap(why) if why.contains("unreachable")));
    assert!(matches!(apply(&dir, "fail"), ApplyOutcome::Result(Err(e)) if e == "requested failure"));
}

/// A query's answer goes to one client and is never replicated: running out of fuel
/// there only fails it. The guest's own report still stops the member.
#[test]
fn in_a_query_only_the_guests_report_is_the_members_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut inst = Instance::new(faulty(), &[], Some(dir.path()), 1).expect("instance");
    let e = inst.query(b"spin").expect_err("out of fuel");
    assert!(e.is_trap() && !e.is_member_failure() && e.to_string().contains("2000000 per query"), "{e}");
    std::fs::write(dir.path().join("broken-disk"), b"").expect("marker");
    let mut inst = Instance::new(faulty(), &[], Some(dir.path()), 1).expect("instance");
    let e = inst.query(b"env-check").expect_err("environment failure");
    assert!(e.is_member_failure() && e.to_string().contains("broken-disk"), "{e}");
}
