//! Pauses between retries: doubling from a first pause up to a cap, never past a
//! deadline when one is given.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { next: first.min(max), max }
    }

    /// The pause to take now; the one after it is twice as long, up to the cap.
    pub fn next_pause(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    /// Like [`Backoff::next_pause`], cut short so that it ends by `deadline`.
    pub fn next_pause_within(&mut self, deadline: Instant) -> Duration {
        self.next_pause().min(deadline.saturating_duration_since(Instant::now()))
    }

    /// Sleeps for the next pause.
    pub async fn sleep(&mut self) {
        tokio::time::sleep(self.next_pause()).await;
    }

    /// Sleeps for the next pause, ending by `deadline` at the latest.
    pub async fn sleep_within(&mut self, deadline: Instant) {
        tokio::time::sleep(self.next_pause_within(deadline)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_end_by_the_deadline() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let pauses: Vec<u128> = (0..4).map(|_| b.next_pause().as_millis()).collect();
        assert_eq!(pauses, vec![100, 200, 350, 350]);
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(b.next_pause_within(soon) <= Duration::from_millis(50));
        assert_eq!(b.next_pause_within(Instant::now()), Duration::ZERO);
    }
}
