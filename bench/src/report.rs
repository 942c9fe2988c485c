//! What a benchmark run measured, and its report in etcd benchmark's text layout (Summary,
//! response time histogram, latency distribution, error distribution, per-second samples) or as
//! JSON.
//!
//! Latencies go into an hdrhistogram (nanoseconds, 3 significant digits), so memory does not grow
//! with the number of requests; each client records into its own [`Recorder`] and the recorders
//! are merged at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::json;

/// The percentiles of the latency distribution, as etcd's benchmark prints them.
pub const PERCENTILES: [f64; 8] = [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9];

/// Latencies of one second (for `--sample`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Second {
    pub count: u64,
    pub min: Duration,
    pub max: Duration,
    pub sum: Duration,
}

/// Results of some requests: latencies, errors by message, and per-second samples if asked.
#[derive(Debug, Clone)]
pub struct Recorder {
    hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    seconds: Option<BTreeMap<u64, Second>>,
}

impl Recorder {
    /// An empty recorder; `sample` keeps per-second figures.
    pub fn new(sample: bool) -> Recorder {
        Recorder {
            // 1 ns to 1 h, 3 significant digits (about 350 KiB).
            hist: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds"),
            errors: BTreeMap::new(),
            seconds: sample.then(BTreeMap::new),
        }
    }

    /// A request that succeeded after `latency`, started at `start`.
    pub fn success(&mut self, start: SystemTime, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.hist.saturating_record(nanos);
        if let Some(seconds) = &mut self.seconds {
            let sec = start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let s = seconds.entry(sec).or_insert(Second {
                count: 0,
                min: latency,
                max: latency,
                sum: Duration::ZERO,
            });
            s.count += 1;
            s.min = s.min.min(latency);
            s.max = s.max.max(latency);
            s.sum += latency;
        }
    }

    /// A request that failed with `message`.
    pub fn error(&mut self, message: impl Into<String>) {
        *self.errors.entry(message.into()).or_default() += 1;
    }

    /// Adds another recorder's results.
    pub fn merge(&mut self, other: &Recorder) {
        self.hist
            .add(&other.hist)
            .expect("histograms with the same bounds merge");
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        if let (Some(mine), Some(theirs)) = (&mut self.seconds, &other.seconds) {
            for (sec, t) in theirs {
                mine.entry(*sec)
                    .and_modify(|s| {
                        s.count += t.count;
                        s.min = s.min.min(t.min);
                        s.max = s.max.max(t.max);
                        s.sum += t.sum;
                    })
                    .or_insert(*t);
            }
        }
    }

    /// Successful requests.
    pub fn successes(&self) -> u64 {
        self.hist.len()
    }

    /// Failed requests.
    pub fn failures(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The figures of a finished run.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Wall time of the run.
    pub total: Duration,
    pub requests: u64,
    pub failures: u64,
    /// Successful requests per second of wall time.
    pub rps: f64,
    /// Latencies in seconds.
    pub fastest: f64,
    pub slowest: f64,
    pub average: f64,
    pub stddev: f64,
    /// (percentile, latency in seconds) for each of [`PERCENTILES`].
    pub percentiles: Vec<(f64, f64)>,
    /// 11 (upper bound in seconds, count) buckets: 10 equal steps from fastest to slowest.
    pub histogram: Vec<(f64, u64)>,
    pub errors: BTreeMap<String, u64>,
    pub seconds: Option<BTreeMap<u64, Second>>,
}

const NANOS: f64 = 1e9;

impl Stats {
    /// The figures of `r` for a run that took `total`.
    pub fn new(r: &Recorder, total: Duration) -> Stats {
        let h = &r.hist;
        let n = h.len();
        let secs = |v: u64| v as f64 / NANOS;
        let (fastest, slowest) = if n > 0 {
            // Values as the histogram holds them: the middle of their bucket.
            (
                secs(h.median_equivalent(h.min())),
                secs(h.median_equivalent(h.max())),
            )
        } else {
            (0.0, 0.0)
        };
        let percentiles = PERCENTILES
            .iter()
            .map(|&p| {
                (
                    p,
                    if n > 0 {
                        secs(h.value_at_quantile(p / 100.0))
                    } else {
                        0.0
                    },
                )
            })
            .collect();
        let mut histogram: Vec<(f64, u64)> = (0..=10)
            .map(|i| {
                let bound = if i == 10 {
                    slowest
                } else {
                    fastest + (slowest - fastest) / 10.0 * f64::from(i)
                };
                (bound, 0)
            })
            .collect();
        for v in h.iter_recorded() {
            let value = secs(h.median_equivalent(v.value_iterated_to())).clamp(fastest, slowest);
            let bucket = histogram
                .iter()
                .position(|(bound, _)| value <= *bound)
                .unwrap_or(10);
            histogram[bucket].1 += v.count_at_value();
        }
        Stats {
            total,
            requests: n,
            failures: r.failures(),
            rps: if total.is_zero() {
                0.0
            } else {
                n as f64 / total.as_secs_f64()
            },
            fastest,
            slowest,
            average: if n > 0 { h.mean() / NANOS } else { 0.0 },
            stddev: if n > 0 { h.stdev() / NANOS } else { 0.0 },
            percentiles,
            histogram,
            errors: r.errors.clone(),
            seconds: r.seconds.clone(),
        }
    }

    /// The latency at percentile `p` (one of [`PERCENTILES`]), in seconds.
    pub fn percentile(&self, p: f64) -> f64 {
        self.percentiles
            .iter()
            .find(|(q, _)| *q == p)
            .map_or(0.0, |(_, v)| *v)
    }

    /// etcd benchmark's text report; `precise` prints every digit instead of 4 decimals.
    pub fn text(&self, precise: bool) -> String {
        let num = |v: f64| {
            if precise {
                format!("{v}")
            } else {
                format!("{v:.4}")
            }
        };
        let mut s = String::new();
        if self.requests > 0 {
            s += "\nSummary:\n";
            let _ = writeln!(s, "  Total:\t{} secs.", num(self.total.as_secs_f64()));
            let _ = writeln!(s, "  Slowest:\t{} secs.", num(self.slowest));
            let _ = writeln!(s, "  Fastest:\t{} secs.", num(self.fastest));
            let _ = writeln!(s, "  Average:\t{} secs.", num(self.average));
            let _ = writeln!(s, "  Stddev:\t{} secs.", num(self.stddev));
            let _ = writeln!(s, "  Requests/sec:\t{}", num(self.rps));
            s += "\nResponse time histogram:\n";
            let max = self.histogram.iter().map(|b| b.1).max().unwrap_or(0).max(1);
            for (bound, count) in &self.histogram {
                let bar = "∎".repeat((count * 40 / max) as usize);
                let _ = writeln!(s, "  {} [{count}]\t|{bar}", num(*bound));
            }
            s += "\nLatency distribution:\n";
            for (p, v) in &self.percentiles {
                if *v > 0.0 {
                    let _ = writeln!(s, "  {p}% in {} secs.", num(*v));
                }
            }
            if let Some(seconds) = &self.seconds {
                s += "\nSample in one second (unix latency throughput):\n";
                s += "UNIX-SECOND,MIN-LATENCY-MS,AVG-LATENCY-MS,MAX-LATENCY-MS,AVG-THROUGHPUT\n";
                for (sec, x) in seconds {
                    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                    let avg = ms(x.sum) / x.count as f64;
                    let _ = writeln!(
                        s,
                        "{sec},{:.3},{avg:.3},{:.3},{}",
                        ms(x.min),
                        ms(x.max),
                        x.count
                    );
                }
            }
        }
        if !self.errors.is_empty() {
            s += "\nError distribution:\n";
            for (e, n) in &self.errors {
                let _ = writeln!(s, "  [{n}]\t{e}");
            }
        }
        s
    }

    /// The report as JSON (latencies in seconds).
    pub fn json(&self) -> serde_json::Value {
        let percentiles: serde_json::Map<String, serde_json::Value> = self
            .percentiles
            .iter()
            .map(|(p, v)| (format!("p{p}"), json!(v)))
            .collect();
        json!({
            "total_secs": self.total.as_secs_f64(),
            "requests": self.requests,
            "failures": self.failures,
            "requests_per_sec": self.rps,
            "fastest_secs": self.fastest,
            "slowest_secs": self.slowest,
            "average_secs": self.average,
            "stddev_secs": self.stddev,
            "percentiles_secs": percentiles,
            "histogram": self.histogram.iter().map(|(b, c)| json!({"le_secs": b, "count": c})).collect::<Vec<_>>(),
            "errors": self.errors,
            "seconds": self.seconds.as_ref().map(|s| s.iter().map(|(sec, x)| json!({
                "unix_second": sec,
                "count": x.count,
                "min_secs": x.min.as_secs_f64(),
                "avg_secs": x.sum.as_secs_f64() / x.count as f64,
                "max_secs": x.max.as_secs_f64(),
            })).collect::<Vec<_>>()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(r: &mut Recorder, us: u64) {
        r.success(
            UNIX_EPOCH + Duration::from_secs(100),
            Duration::from_micros(us),
        );
    }

    #[test]
    fn percentiles_rates_and_moments_of_a_known_distribution() {
        let mut r = Recorder::new(false);
        for us in 1..=1000 {
            micros(&mut r, us);
        }
        let s = Stats::new(&r, Duration::from_secs(2));
        assert_eq!(s.requests, 1000);
        assert!((s.rps - 500.0).abs() < 1e-9);
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.002;
        assert!(close(s.fastest, 1e-6), "{}", s.fastest);
        assert!(close(s.slowest, 1e-3), "{}", s.slowest);
        assert!(close(s.average, 500.5e-6), "{}", s.average);
        // Uniform over 1..1000: stddev = sqrt((n^2 - 1) / 12).
        assert!(close(s.stddev, 288.675e-6), "{}", s.stddev);
        for (p, want) in [
            (10.0, 100e-6),
            (50.0, 500e-6),
            (90.0, 900e-6),
            (99.9, 999e-6),
        ] {
            assert!(close(s.percentile(p), want), "p{p} = {}", s.percentile(p));
        }
    }

    #[test]
    fn histogram_has_eleven_buckets_holding_every_request() {
        let mut r = Recorder::new(false);
        for us in [100, 100, 100, 600, 1000] {
            micros(&mut r, us);
        }
        let s = Stats::new(&r, Duration::from_secs(1));
        assert_eq!(s.histogram.len(), 11);
        assert_eq!(s.histogram.iter().map(|b| b.1).sum::<u64>(), 5);
        assert_eq!(s.histogram[0].1, 3, "{:?}", s.histogram);
        assert_eq!(
            s.histogram[6].1, 1,
            "600 µs is in (550, 640]: {:?}",
            s.histogram
        );
        assert_eq!(s.histogram[10].1, 1);
        let text = s.text(false);
        assert!(text.contains("  Requests/sec:\t5.0000\n"), "{text}");
        assert!(
            text.contains("  0.0001 [3]\t|∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎\n"),
            "{text}"
        );
        assert!(text.contains("  50% in 0.0001 secs.\n"), "{text}");
    }

    #[test]
    fn merging_adds_latencies_errors_and_seconds() {
        let mut a = Recorder::new(true);
        let mut b = Recorder::new(true);
        micros(&mut a, 10);
        micros(&mut b, 30);
        b.success(
            UNIX_EPOCH + Duration::from_secs(101),
            Duration::from_micros(20),
        );
        a.error("etcdserver: request timed out");
        b.error("etcdserver: request timed out");
        b.error("connection refused");
        a.merge(&b);
        let s = Stats::new(&a, Duration::from_secs(1));
        assert_eq!((s.requests, s.failures), (3, 3));
        assert_eq!(s.errors["etcdserver: request timed out"], 2);
        let seconds = s.seconds.as_ref().unwrap();
        assert_eq!(seconds[&100].count, 2);
        assert_eq!(seconds[&100].min, Duration::from_micros(10));
        assert_eq!(seconds[&100].max, Duration::from_micros(30));
        assert_eq!(seconds[&101].count, 1);
        let text = s.text(true);
        assert!(
            text.contains("\nError distribution:\n  [1]\tconnection refused\n"),
            "{text}"
        );
        assert!(text.contains("100,0.010,0.020,0.030,2\n"), "{text}");
        let j = s.json();
        assert_eq!(j["requests"], 3);
        assert_eq!(j["errors"]["connection refused"], 1);
    }

    #[test]
    fn an_empty_run_reports_only_errors() {
        let mut r = Recorder::new(false);
        r.error("connection refused");
        let s = Stats::new(&r, Duration::from_secs(1));
        assert_eq!(s.rps, 0.0);
        assert_eq!(
            s.text(false),
            "\nError distribution:\n  [1]\tconnection refused\n"
        );
    }
}
