//! Leader lease: lets the leader answer linearizable reads from its own state machine,
//! without a quorum round per read, while no other leader can exist.
//!
//! # Why it is safe
//!
//! A follower that accepts an AppendEntries from leader `L` refuses to vote for anyone
//! else for openraft's `leader_lease` (the maximum election timeout) after it received
//! it, and it received it after `L` sent it. So once a majority of each voter set has
//! accepted AppendEntries that `L` sent at or after `t`, no other leader can be elected
//! before `t + leader_lease` without `L`'s own vote. This module:
//!
//! - records, for each follower, the send time of the latest AppendEntries it accepted
//!   from this member as leader ([`Lease::acked`], called by the peer client);
//! - voids every recorded acknowledgement when a vote request or another leader's
//!   request arrives ([`Lease::revoke`], called by the peer server before openraft sees
//!   the request), which covers this member granting its own vote;
//! - grants a read only while `t + lease` lies ahead, with `lease` shorter than the
//!   followers' promise (the minimum election timeout, less a margin for clock rate
//!   differences);
//! - makes a restarted member refuse votes for one `leader_lease` after it starts
//!   ([`Lease::may_vote`]), and not campaign either (its own candidacy is a vote for
//!   itself; `node` turns openraft's elections off for [`Lease::hold_left`]): openraft
//!   forgets a follower's promise across a restart, and a promise made just before a
//!   crash must still hold.
//!
//! The lease is measured on `CLOCK_MONOTONIC` (`Instant`), which stops while the machine
//! is suspended: a leader suspended past its lease and resumed would still count time
//! from before the suspend. Members are not expected to run on machines that suspend.
//!
//! The read must also see every write acknowledged before it. Writes acknowledged by this
//! leader were applied here before the acknowledgement; writes acknowledged by earlier
//! leaders are committed before this leader's first entry, so the caller also requires
//! that an entry of the current leadership has been applied.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::types::NodeId;

/// Which leadership an acknowledgement belongs to: openraft's (term, node) leader id.
pub type Leadership = openraft::LeaderId<NodeId>;

pub struct Lease {
    duration: Duration,
    vote_hold: Duration,
    started: Instant,
    state: Mutex<State>,
}

struct State {
    leadership: Option<Leadership>,
    /// Follower -> send time of the latest AppendEntries it accepted from `leadership`.
    acked: HashMap<NodeId, Instant>,
    /// Acknowledgements of requests sent before this instant do not count.
    revoked_at: Instant,
}

impl Lease {
    /// `duration`: how long an acknowledgement keeps the lease, which must be shorter
    /// than the time a follower refuses other candidates. `vote_hold`: how long after
    /// start-up this member refuses to vote (the followers' promise, openraft's
    /// `leader_lease`).
    pub fn new(duration: Duration, vote_hold: Duration) -> Self {
        let now = Instant::now();
        Lease {
            duration,
            vote_hold,
            started: now,
            state: Mutex::new(State { leadership: None, acked: HashMap::new(), revoked_at: now }),
        }
    }

    /// The lease for openraft's timeouts: 90 % of the minimum election timeout, so that
    /// clocks running up to 10 % apart in rate cannot outlive a follower's promise.
    pub fn for_timeouts(election_timeout_min: Duration, election_timeout_max: Duration) -> Self {
        Lease::new(election_timeout_min.mul_f64(0.9), election_timeout_max)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `follower` accepted an AppendEntries that this member, as `leadership`, sent at `sent`.
    pub fn acked(&self, leadership: &Leadership, follower: NodeId, sent: Instant) {
        let mut s = self.lock();
        if s.leadership.as_ref() != Some(leadership) {
            s.leadership = Some(*leadership);
            s.acked.clear();
        }
        let t = s.acked.entry(follower).or_insert(sent);
        *t = (*t).max(sent);
    }

    /// Another member asks for votes or acts as leader: nothing acknowledged so far
    /// may be relied on.
    pub fn revoke(&self) {
        self.lock().revoked_at = Instant::now();
    }

    /// Whether this member may grant a vote: not during the first `vote_hold` after
    /// start-up, when it may still be bound by a promise it made before a restart.
    pub fn may_vote(&self) -> bool {
        self.started.elapsed() >= self.vote_hold
    }

    /// How much of the vote hold is left. A member votes for itself when it campaigns, so
    /// it holds its own candidacy as long.
    pub fn hold_left(&self) -> Duration {
        self.vote_hold.saturating_sub(self.started.elapsed())
    }

    /// Whether `me`, leading as `leadership`, holds the lease at `now`. `voter_sets` is
    /// the membership's voter sets (two during a joint change): each needs a majority.
    pub fn holds(&self, me: NodeId, leadership: &Leadership, voter_sets: &[BTreeSet<NodeId>], now: Instant) -> bool {
        let s = self.lock();
        if voter_sets.is_empty() {
            return false;
        }
        voter_sets.iter().all(|voters| {
            let mut times: Vec<Instant> = voters
                .iter()
                .filter_map(|v| {
                    if *v == me {
                        Some(now)
                    } else if s.leadership.as_ref() == Some(leadership) {
                        s.acked.get(v).copied().filter(|t| *t > s.revoked_at)
                    } else {
                        None
                    }
                })
                .collect();
            let majority = voters.len() / 2 + 1;
            if times.len() < majority {
                return false;
            }
            times.sort_unstable_by(|a, b| b.cmp(a));
            // The majority-th most recent acknowledgement: a majority acknowledged at or
            // after it.
            now < times[majority - 1] + self.duration
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(term: u64, node: NodeId) -> Leadership {
        openraft::LeaderId::new(term, node)
    }

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_majority_of_recent_acks_holds_the_lease_until_it_expires() {
        let lease = Lease::new(100 * MS, Duration::ZERO);
        let l = leader(2, 1);
        let voters = [set(&[1, 2, 3])];
        let t0 = Instant::now() + 10 * MS;
        assert!(!lease.holds(1, &l, &voters, t0), "no acknowledgement yet");
        lease.acked(&l, 2, t0);
        assert!(lease.holds(1, &l, &voters, t0 + 50 * MS));
        assert!(!lease.holds(1, &l, &voters, t0 + 100 * MS), "expired");
        // The newer of two acknowledgements from the same follower counts.
        lease.acked(&l, 2, t0 + 80 * MS);
        lease.acked(&l, 2, t0 + 20 * MS);
        assert!(lease.holds(1, &l, &voters, t0 + 150 * MS));
    }

    #[test]
    fn five_voters_need_two_followers_and_the_older_one_bounds_the_lease() {
        let lease = Lease::new(100 * MS, Duration::ZERO);
        let l = leader(1, 1);
        let voters = [set(&[1, 2, 3, 4, 5])];
        let t0 = Instant::now() + 10 * MS;
        lease.acked(&l, 2, t0 + 50 * MS);
        assert!(!lease.holds(1, &l, &voters, t0 + 60 * MS), "leader + 1 of 5 is no majority");
        lease.acked(&l, 3, t0);
        assert!(lease.holds(1, &l, &voters, t0 + 99 * MS));
        assert!(!lease.holds(1, &l, &voters, t0 + 100 * MS), "bounded by the older of the two");
    }

    #[test]
    fn revocation_voids_earlier_acknowledgements_only() {
        let lease = Lease::new(100 * MS, Duration::ZERO);
        let l = leader(1, 1);
        let voters = [set(&[1, 2, 3])];
        let before = Instant::now();
        lease.acked(&l, 2, before);
        lease.revoke();
        let now = Instant::now();
        assert!(!lease.holds(1, &l, &voters, now));
        let after = Instant::now() + MS;
        lease.acked(&l, 3, after);
        assert!(lease.holds(1, &l, &voters, after + MS));
    }

    #[test]
    fn acknowledgements_belong_to_one_leadership() {
        let lease = Lease::new(100 * MS, Duration::ZERO);
        let voters = [set(&[1, 2, 3])];
        let t0 = Instant::now() + 10 * MS;
        lease.acked(&leader(1, 1), 2, t0);
        assert!(!lease.holds(1, &leader(3, 1), &voters, t0), "acks of an older term");
        lease.acked(&leader(3, 1), 3, t0);
        assert!(!lease.holds(1, &leader(1, 1), &voters, t0), "the old term's acks are gone");
        assert!(lease.holds(1, &leader(3, 1), &voters, t0));
    }

    #[test]
    fn joint_membership_needs_a_majority_of_both_sets() {
        let lease = Lease::new(100 * MS, Duration::ZERO);
        let l = leader(1, 1);
        let joint = [set(&[1, 2, 3]), set(&[1, 4, 5])];
        let t0 = Instant::now() + 10 * MS;
        lease.acked(&l, 2, t0);
        assert!(!lease.holds(1, &l, &joint, t0));
        lease.acked(&l, 4, t0);
        assert!(lease.holds(1, &l, &joint, t0));
        // A leader outside a voter set does not count itself there.
        assert!(!lease.holds(1, &l, &[set(&[2, 3, 5])], t0), "only 2 of 2, 3, 5 acknowledged");
        assert!(lease.holds(1, &l, &[set(&[2, 3, 4])], t0));
    }

    #[test]
    fn a_fresh_member_does_not_vote_until_the_hold_passes() {
        let lease = Lease::new(100 * MS, 30 * MS);
        assert!(!lease.may_vote());
        std::thread::sleep(40 * MS);
        assert!(lease.may_vote());
    }
}
