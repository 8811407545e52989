//! A recorded client history and its check, for tests that run clients while members
//! crash and restart.
//!
//! The workload makes the check simple and exact: every key has one writer, which
//! writes 1, 2, 3, ... in turn, so each value is written at most once and a key's values
//! only grow. For such registers, linearizability comes down to these rules, checked for
//! every key:
//!
//! - a read returns at least the last value whose write was acknowledged before the read
//!   started (nothing acknowledged is lost, no stale read);
//! - a read returns a value whose write started before the read ended and was not
//!   definitely rejected (nothing invented, nothing from the future);
//! - a read that starts after another read ended returns at least what that one did (no
//!   read goes back in time);
//! - the final state holds at least the last acknowledged value, and a value that was
//!   attempted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How a write ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// May or may not have taken effect (timeout, connection lost, leadership lost).
    Unknown,
    /// Definitely did not take effect.
    Failed,
}

#[derive(Debug, Clone)]
pub enum Op {
    Write {
        value: u64,
        outcome: Outcome,
    },
    /// A successful linearizable read; 0 stands for "no value yet".
    Read {
        value: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Event {
    pub key: String,
    pub op: Op,
    pub start: Instant,
    pub end: Instant,
}

/// Everything the clients did.
#[derive(Debug, Default, Clone)]
pub struct History {
    pub events: Vec<Event>,
}

impl History {
    pub fn record(&mut self, key: &str, op: Op, start: Instant, end: Instant) {
        self.events.push(Event { key: key.to_string(), op, start, end });
    }

    pub fn merge(&mut self, other: History) {
        self.events.extend(other.events);
    }

    pub fn acknowledged_writes(&self) -> usize {
        self.events.iter().filter(|e| matches!(e.op, Op::Write { outcome: Outcome::Ok, .. })).count()
    }

    pub fn reads(&self) -> usize {
        self.events.iter().filter(|e| matches!(e.op, Op::Read { .. })).count()
    }

    fn by_key(&self) -> BTreeMap<&str, Vec<&Event>> {
        let mut keys: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for e in &self.events {
            keys.entry(e.key.as_str()).or_default().push(e);
        }
        keys
    }

    /// Every violation of the rules above; `finals` holds each key's value read from the
    /// converged cluster at the end (0 for none).
    pub fn violations(&self, finals: &BTreeMap<String, u64>) -> Vec<String> {
        let mut found = Vec::new();
        for (key, events) in self.by_key() {
            let writes: Vec<(u64, Outcome, Instant, Instant)> = events
                .iter()
                .filter_map(|e| match e.op {
                    Op::Write { value, outcome } => Some((value, outcome, e.start, e.end)),
                    Op::Read { .. } => None,
                })
                .collect();
            let reads: Vec<(u64, Instant, Instant)> = events
                .iter()
                .filter_map(|e| match e.op {
                    Op::Read { value } => Some((value, e.start, e.end)),
                    Op::Write { .. } => None,
                })
                .collect();
            let acked_before =
                |t: Instant| writes.iter().filter(|w| w.1 == Outcome::Ok && w.3 < t).map(|w| w.0).max().unwrap_or(0);
            let possible = |value: u64, by: Instant| {
                value == 0 || writes.iter().any(|w| w.0 == value && w.1 != Outcome::Failed && w.2 < by)
            };
            for &(value, start, end) in &reads {
                let floor = acked_before(start);
                if value < floor {
                    found.push(format!("{key}: a read returned {value}, but {floor} was acknowledged before it began"));
                }
                if !possible(value, end) {
                    found.push(format!("{key}: a read returned {value}, which no write that could succeed had begun"));
                }
            }
            for &(earlier, _, end) in &reads {
                for &(later, start, _) in &reads {
                    if start > end && later < earlier {
                        found.push(format!(
                            "{key}: a read returned {later} after an earlier read had returned {earlier}"
                        ));
                    }
                }
            }
            // The final read comes after every operation.
            let after_all = events.iter().map(|e| e.end).max().unwrap_or_else(Instant::now) + Duration::from_secs(1);
            let last = acked_before(after_all);
            let fin = finals.get(key).copied().unwrap_or(0);
            if fin < last {
                found.push(format!("{key}: the cluster ended at {fin}, but {last} was acknowledged"));
            }
            if !possible(fin, after_all) {
                found.push(format!("{key}: the cluster ended at {fin}, which was never written or was rejected"));
            }
        }
        found
    }
}
