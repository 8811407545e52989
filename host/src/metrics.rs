//! Everything exported on `GET /metrics` (Prometheus text format): Raft's own figures
//! (term, indexes), taken from openraft's metrics at render time, and this member's
//! counters and apply-latency histogram.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::{RaftMetrics, ServerState};

use crate::types::{Member, NodeId};

/// The whole `/metrics` page.
pub fn render(raft: &RaftMetrics<NodeId, Member>, ours: &Metrics) -> String {
    let mut out = String::new();
    render_raft(raft, &mut out);
    ours.render(&mut out);
    out
}

fn render_raft(m: &RaftMetrics<NodeId, Member>, out: &mut String) {
    let gauges: [(&str, &str, u64); 6] = [
        ("term", "Current Raft term", m.current_term),
        ("last_log_index", "Index of the last log entry", m.last_log_index.unwrap_or(0)),
        ("applied_index", "Index of the last applied entry", m.last_applied.map_or(0, |l| l.index)),
        ("snapshot_index", "Last index in the current snapshot", m.snapshot.map_or(0, |l| l.index)),
        ("is_leader", "1 on the leader", u64::from(m.state == ServerState::Leader)),
        ("members", "Members in the current configuration", m.membership_config.membership().nodes().count() as u64),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP wasm_raft_{name} {help}\n# TYPE wasm_raft_{name} gauge\nwasm_raft_{name} {v}");
    }
}

/// Upper bounds (µs) of the apply-latency histogram buckets.
const APPLY_BUCKETS_US: [u64; 10] = [1, 2, 5, 10, 25, 50, 100, 500, 1_000, 10_000];

#[derive(Default)]
pub struct Metrics {
    pub proposals: AtomicU64,
    /// Proposals answered (any outcome): `proposals` minus this is what is in flight.
    pub proposals_answered: AtomicU64,
    pub proposal_errors: AtomicU64,
    pub queries: AtomicU64,
    pub query_errors: AtomicU64,
    pub lease_reads: AtomicU64,
    pub redirects: AtomicU64,
    pub bad_requests: AtomicU64,
    pub guest_errors: AtomicU64,
    pub guest_traps: AtomicU64,
    pub guest_rebuilds: AtomicU64,
    pub snapshots_built: AtomicU64,
    pub snapshots_installed: AtomicU64,
    /// Leaders' checkpoints this member compared with its own state and found equal.
    pub checkpoints_verified: AtomicU64,
    apply_buckets: [AtomicU64; APPLY_BUCKETS_US.len()],
    apply_count: AtomicU64,
    apply_sum_ns: AtomicU64,
}

impl Metrics {
    pub fn observe_apply(&self, d: Duration) {
        let us = d.as_micros() as u64;
        for (i, le) in APPLY_BUCKETS_US.iter().enumerate() {
            if us <= *le {
                self.apply_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.apply_count.fetch_add(1, Ordering::Relaxed);
        self.apply_sum_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn applied_commands(&self) -> u64 {
        self.apply_count.load(Ordering::Relaxed)
    }

    /// This member's counters and histogram (the whole page is [`render`]).
    pub fn render(&self, out: &mut String) {
        let counters: [(&str, &str, &AtomicU64); 13] = [
            ("proposals_total", "Commands proposed through this member", &self.proposals),
            ("proposal_errors_total", "Proposals that failed (not guest errors)", &self.proposal_errors),
            ("queries_total", "Read queries served", &self.queries),
            ("query_errors_total", "Read queries that failed", &self.query_errors),
            (
                "lease_reads_total",
                "Linearizable reads answered under the leader lease, without a quorum round",
                &self.lease_reads,
            ),
            ("redirects_total", "Requests answered with the leader's address", &self.redirects),
            ("bad_requests_total", "Malformed frames or requests received", &self.bad_requests),
            ("guest_errors_total", "Entries for which the guest returned an error result", &self.guest_errors),
            ("guest_traps_total", "Guest traps (including out of fuel)", &self.guest_traps),
            ("guest_rebuilds_total", "Guest instances rebuilt after a trap", &self.guest_rebuilds),
            ("snapshots_built_total", "Snapshots built from the local guest", &self.snapshots_built),
            (
                "snapshots_installed_total",
                "Snapshots received from the leader and installed",
                &self.snapshots_installed,
            ),
            (
                "checkpoints_verified_total",
                "Leader checkpoints compared with this member's state and found equal",
                &self.checkpoints_verified,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP wasm_raft_{name} {help}\n# TYPE wasm_raft_{name} counter");
            let _ = writeln!(out, "wasm_raft_{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP wasm_raft_apply_seconds Time the guest took to apply one entry\n# TYPE wasm_raft_apply_seconds histogram"
        );
        for (i, le) in APPLY_BUCKETS_US.iter().enumerate() {
            let _ = writeln!(
                out,
                "wasm_raft_apply_seconds_bucket{{le=\"{}\"}} {}",
                *le as f64 / 1e6,
                self.apply_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.apply_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "wasm_raft_apply_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "wasm_raft_apply_seconds_sum {}", self.apply_sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "wasm_raft_apply_seconds_count {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe_apply(Duration::from_micros(3));
        m.observe_apply(Duration::from_micros(30));
        let mut s = String::new();
        m.render(&mut s);
        assert!(s.contains("wasm_raft_apply_seconds_bucket{le=\"0.000002\"} 0"), "{s}");
        assert!(s.contains("wasm_raft_apply_seconds_bucket{le=\"0.000005\"} 1"), "{s}");
        assert!(s.contains("wasm_raft_apply_seconds_bucket{le=\"0.00005\"} 2"), "{s}");
        assert!(s.contains("wasm_raft_apply_seconds_count 2"), "{s}");
    }
}
