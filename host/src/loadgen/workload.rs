//! What each closed-loop client asks for: keys drawn uniformly, a get/set mix and think
//! times, from a small deterministic generator seeded per client, so a run's requests
//! are reproducible.

use std::time::Duration;

/// A small deterministic generator (xorshift): the workload must not depend on a crate
/// the host does not otherwise need.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Zero is xorshift's fixed point: it would draw zero forever.
        Rng(if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0.0..1.0`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Get(u64),
    Set(u64),
}

pub struct Workload {
    rng: Rng,
    keys: u64,
    get_ratio: f64,
}

impl Workload {
    /// Keys in `0..keys` (at least one); `get_ratio` of the requests are gets.
    pub fn new(seed: u64, keys: u64, get_ratio: f64) -> Workload {
        Workload { rng: Rng::new(seed), keys: keys.max(1), get_ratio }
    }

    pub fn next_request(&mut self) -> Request {
        let key = self.rng.next_u64() % self.keys;
        if self.rng.unit() < self.get_ratio {
            Request::Get(key)
        } else {
            Request::Set(key)
        }
    }

    /// Uniform in 0..=max_ms milliseconds.
    pub fn think(&mut self, max_ms: u64) -> Duration {
        if max_ms == 0 {
            return Duration::ZERO;
        }
        let ms = match max_ms.checked_add(1) {
            Some(span) => self.rng.next_u64() % span,
            None => self.rng.next_u64(),
        };
        Duration::from_millis(ms)
    }
}

/// Client `c`'s seed: distinct per client, the same in every run.
pub fn client_seed(c: usize) -> u64 {
    0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_mix_and_key_range() {
        let keys = 1000;
        let mut w = Workload::new(client_seed(0), keys, 0.3);
        let mut gets = 0;
        let mut seen = vec![false; keys as usize];
        for _ in 0..100_000 {
            let key = match w.next_request() {
                Request::Get(k) => {
                    gets += 1;
                    k
                }
                Request::Set(k) => k,
            };
            assert!(key < keys, "key {key} outside 0..{keys}");
            seen[key as usize] = true;
        }
        assert!((29_000..=31_000).contains(&gets), "{gets} gets of 100000");
        assert!(seen.iter().all(|&s| s), "every key is drawn at some point");

        let mut only_sets = Workload::new(7, 10, 0.0);
        assert!((0..10_000).all(|_| matches!(only_sets.next_request(), Request::Set(_))));
        let mut only_gets = Workload::new(7, 10, 1.0);
        assert!((0..10_000).all(|_| matches!(only_gets.next_request(), Request::Get(_))));
        let mut one_key = Workload::new(0, 1, 0.5);
        assert!((0..1000).all(|_| matches!(one_key.next_request(), Request::Get(0) | Request::Set(0))));
    }

    #[test]
    fn the_same_seed_gives_the_same_requests() {
        let draw = |seed| {
            let mut w = Workload::new(seed, 100, 0.5);
            (0..100).map(|_| w.next_request()).collect::<Vec<_>>()
        };
        assert_eq!(draw(client_seed(3)), draw(client_seed(3)));
        assert_ne!(draw(client_seed(3)), draw(client_seed(4)));
    }

    #[test]
    fn think_time_is_uniform_in_the_closed_range() {
        let mut w = Workload::new(3, 10, 0.0);
        assert_eq!(w.think(0), Duration::ZERO);
        let mut hits = [0u32; 5];
        for _ in 0..10_000 {
            let d = w.think(4);
            assert!(d <= Duration::from_millis(4), "{d:?}");
            hits[d.as_millis() as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (1_800..=2_200).contains(&h)), "{hits:?}");
    }
}
