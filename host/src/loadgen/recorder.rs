//! What the clients measured: per-client counts and latency histograms (HDR, merged at
//! the end), the per-second series of the measured period, and the latency samples for
//! `--latency-out`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::driver::Answer;

const SIGNIFICANT_DIGITS: u8 = 3;

pub fn histogram() -> Histogram<u64> {
    Histogram::new(SIGNIFICANT_DIGITS).expect("3 significant digits are within the supported 0..=5")
}

/// `saturating_record` never resizes, so it would clamp every latency above the
/// histogram's initial range; only values beyond what auto-resizing reaches are clamped.
pub fn record(h: &mut Histogram<u64>, value: u64) {
    if h.record(value).is_err() {
        h.saturating_record(value);
    }
}

pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    into.add(from).expect("auto-resizing histograms accept any recorded value");
}

/// The value at percentile `p` (0..=100), in the unit recorded; 0 when nothing was.
pub fn percentile(h: &Histogram<u64>, p: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_percentile(p)
    }
}

/// Keeps 1 in `every` of the latencies offered to it, across all clients.
pub struct Sampler {
    every: u64,
    seen: AtomicU64,
}

impl Sampler {
    pub fn new(every: u64) -> Sampler {
        Sampler { every: every.max(1), seen: AtomicU64::new(0) }
    }

    pub fn keep(&self) -> bool {
        self.seen.fetch_add(1, Ordering::Relaxed).is_multiple_of(self.every)
    }
}

/// Which second of the measured period `at` (time since the run started) falls in;
/// `None` during the warm-up.
pub fn measured_second(at: Duration, warmup: Duration) -> Option<usize> {
    at.checked_sub(warmup).map(|m| m.as_secs() as usize)
}

struct Bucket {
    ops: u64,
    errors: u64,
    hist: Histogram<u64>,
}

impl Bucket {
    fn new() -> Bucket {
        Bucket { ops: 0, errors: 0, hist: histogram() }
    }
}

/// Per-second totals of all clients. Clients keep only their current second and hand
/// it over when it ends, so memory grows with seconds, not with clients × seconds.
#[derive(Default)]
pub struct Series {
    buckets: Vec<Bucket>,
}

impl Series {
    fn add(&mut self, second: usize, b: &Bucket) {
        while self.buckets.len() <= second {
            self.buckets.push(Bucket::new());
        }
        let into = &mut self.buckets[second];
        into.ops += b.ops;
        into.errors += b.errors;
        merge(&mut into.hist, &b.hist);
    }

    /// The `--series-out` file: `second,ops,errors,p50_us,p99_us`, where `errors` counts
    /// errors and unknown outcomes. Seconds of the measured period without any
    /// completion are listed with zeros: a stall must show.
    pub fn csv(&self, measured_seconds: f64) -> String {
        let rows = self.buckets.len().max(measured_seconds.ceil() as usize);
        let mut out = String::from("second,ops,errors,p50_us,p99_us\n");
        let empty = Bucket::new();
        for s in 0..rows {
            let b = self.buckets.get(s).unwrap_or(&empty);
            out.push_str(&format!(
                "{s},{},{},{},{}\n",
                b.ops,
                b.errors,
                percentile(&b.hist, 50.0),
                percentile(&b.hist, 99.0)
            ));
        }
        out
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub ops: u64,
    pub guest_errors: u64,
    pub errors: u64,
    pub unknown_outcomes: u64,
    pub warmup_ops: u64,
    pub warmup_errors: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.ops += o.ops;
        self.guest_errors += o.guest_errors;
        self.errors += o.errors;
        self.unknown_outcomes += o.unknown_outcomes;
        self.warmup_ops += o.warmup_ops;
        self.warmup_errors += o.warmup_errors;
    }
}

/// One client's measurements.
pub struct Recorder {
    warmup: Duration,
    counts: Counts,
    hist: Histogram<u64>,
    current: Option<(usize, Bucket)>,
    series: Arc<Mutex<Series>>,
    sampler: Arc<Sampler>,
    /// `None` when no latency file was asked for.
    samples: Option<Vec<u64>>,
}

/// What one client measured, once it stopped.
pub struct Recorded {
    pub counts: Counts,
    pub hist: Histogram<u64>,
    pub samples: Vec<u64>,
}

impl Recorder {
    pub fn new(warmup: Duration, series: Arc<Mutex<Series>>, sampler: Arc<Sampler>, keep_samples: bool) -> Recorder {
        Recorder {
            warmup,
            counts: Counts::default(),
            hist: histogram(),
            current: None,
            series,
            sampler,
            samples: keep_samples.then(Vec::new),
        }
    }

    /// Record a request that completed `at` after the run started.
    pub fn record(&mut self, at: Duration, latency_us: u64, answer: Answer) {
        let answered = matches!(answer, Answer::Ok | Answer::GuestError);
        let Some(second) = measured_second(at, self.warmup) else {
            if answered {
                self.counts.warmup_ops += 1;
            } else {
                self.counts.warmup_errors += 1;
            }
            return;
        };
        if self.current.as_ref().is_some_and(|(s, _)| *s != second) {
            self.flush();
        }
        let (_, bucket) = self.current.get_or_insert_with(|| (second, Bucket::new()));
        match answer {
            Answer::Ok | Answer::GuestError => {
                self.counts.ops += 1;
                self.counts.guest_errors += u64::from(answer == Answer::GuestError);
                record(&mut self.hist, latency_us);
                bucket.ops += 1;
                record(&mut bucket.hist, latency_us);
                if let Some(samples) = &mut self.samples {
                    if self.sampler.keep() {
                        samples.push(latency_us);
                    }
                }
            }
            Answer::Error => {
                self.counts.errors += 1;
                bucket.errors += 1;
            }
            Answer::Unknown => {
                self.counts.unknown_outcomes += 1;
                bucket.errors += 1;
            }
        }
    }

    fn flush(&mut self) {
        if let Some((second, bucket)) = self.current.take() {
            self.series.lock().unwrap_or_else(|p| p.into_inner()).add(second, &bucket);
        }
    }

    pub fn finish(mut self) -> Recorded {
        self.flush();
        Recorded { counts: self.counts, hist: self.hist, samples: self.samples.unwrap_or_default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist_of(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = histogram();
        for v in values {
            record(&mut h, v);
        }
        h
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_on_known_data() {
        let h = hist_of(1..=100);
        assert_eq!(percentile(&h, 50.0), 50);
        assert_eq!(percentile(&h, 90.0), 90);
        assert_eq!(percentile(&h, 99.0), 99);
        assert_eq!(percentile(&h, 100.0), 100);
        assert_eq!(percentile(&histogram(), 50.0), 0);
        assert_eq!(percentile(&hist_of([7]), 99.0), 7);
        // Above 2048 values share buckets: 3 significant digits means within 0.1 %.
        let h = hist_of((1..=100_000).map(|v| v * 10));
        for (p, exact) in [(50.0, 500_000.0), (90.0, 900_000.0), (99.0, 990_000.0)] {
            let got = percentile(&h, p) as f64;
            assert!((got - exact).abs() / exact <= 0.001, "p{p}: {got} vs {exact}");
        }
    }

    #[test]
    fn merged_histograms_give_the_percentiles_of_the_union() {
        let mut all = hist_of(1..=50);
        merge(&mut all, &hist_of(51..=100));
        assert_eq!(all.len(), 100);
        assert_eq!(percentile(&all, 50.0), 50);
        assert_eq!(percentile(&all, 99.0), 99);
        assert_eq!(all.max(), 100);
    }

    #[test]
    fn sampler_keeps_ceil_n_over_k() {
        for (n, k) in [(0u64, 1u64), (1, 1), (10, 1), (10, 3), (9, 3), (100, 10), (101, 10), (7, 100), (1, 100)] {
            let s = Sampler::new(k);
            let kept = (0..n).filter(|_| s.keep()).count() as u64;
            assert_eq!(kept, n.div_ceil(k), "n={n} k={k}");
        }
        // Shared by concurrent clients, the count is still exact.
        let s = Arc::new(Sampler::new(7));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || (0..2_500).filter(|_| s.keep()).count())
            })
            .collect();
        let kept: usize = threads.into_iter().map(|t| t.join().expect("sampler thread")).sum();
        assert_eq!(kept, 10_000usize.div_ceil(7));
    }

    #[test]
    fn recorder_samples_only_measured_answers() {
        let series = Arc::new(Mutex::new(Series::default()));
        let mut r = Recorder::new(Duration::from_secs(1), series, Arc::new(Sampler::new(3)), true);
        r.record(Duration::from_millis(500), 1, Answer::Ok);
        for i in 0..10 {
            r.record(Duration::from_millis(1000 + i), 100 + i, Answer::Ok);
        }
        r.record(Duration::from_millis(1500), 999, Answer::Error);
        r.record(Duration::from_millis(1600), 1_000_000, Answer::Ok);
        let done = r.finish();
        assert_eq!(done.samples, vec![100, 103, 106, 109]);
        assert_eq!(done.counts.ops, 11);
        let max = done.hist.max() as f64;
        assert!((max - 1e6).abs() / 1e6 <= 0.001, "a 1 s latency is kept, not clamped: {max}");
        assert_eq!(done.counts.warmup_ops, 1);
    }

    #[test]
    fn series_buckets_by_measured_second_and_skips_warmup() {
        assert_eq!(measured_second(ms(1999), ms(2000)), None);
        assert_eq!(measured_second(ms(2000), ms(2000)), Some(0));
        assert_eq!(measured_second(ms(2999), ms(2000)), Some(0));
        assert_eq!(measured_second(ms(3000), ms(2000)), Some(1));
        assert_eq!(measured_second(ms(500), Duration::ZERO), Some(0));

        let series = Arc::new(Mutex::new(Series::default()));
        let sampler = Arc::new(Sampler::new(1));
        let mut a = Recorder::new(ms(2000), series.clone(), sampler.clone(), false);
        let mut b = Recorder::new(ms(2000), series.clone(), sampler, false);
        a.record(ms(1500), 7, Answer::Error);
        a.record(ms(1999), 5_000, Answer::Ok);
        a.record(ms(2000), 100, Answer::Ok);
        a.record(ms(2999), 300, Answer::GuestError);
        a.record(ms(3000), 0, Answer::Error);
        a.record(ms(3500), 50, Answer::Ok);
        a.record(ms(5200), 0, Answer::Unknown);
        b.record(ms(1000), 9_000, Answer::Ok);
        b.record(ms(2500), 200, Answer::Ok);
        let (ra, rb) = (a.finish(), b.finish());
        let mut counts = ra.counts;
        counts.add(&rb.counts);
        assert_eq!(
            counts,
            Counts { ops: 4, guest_errors: 1, errors: 1, unknown_outcomes: 1, warmup_ops: 2, warmup_errors: 1 }
        );
        let mut hist = ra.hist;
        merge(&mut hist, &rb.hist);
        assert_eq!(hist.max(), 300, "warm-up latencies are not in the summary");

        let csv = series.lock().expect("series").csv(3.3);
        assert_eq!(csv, "second,ops,errors,p50_us,p99_us\n0,3,0,200,300\n1,1,1,50,50\n2,0,0,0,0\n3,0,1,0,0\n", "{csv}");
        // A measured period longer than the last completion still lists its seconds.
        assert_eq!(series.lock().expect("series").csv(5.5).lines().count(), 1 + 6);
    }
}
