//! Latency statistics (median, p99, mean of nanosecond samples) and their formatting, shared by
//! the benchmarks ([`crate::bench`]) and the policy dev kit's measurements (`policy check`).

/// Median / p99 / mean of a set of latency samples, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyStats {
    pub samples: usize,
    pub median_ns: f64,
    pub p99_ns: f64,
    pub mean_ns: f64,
}

impl LatencyStats {
    /// `None` for an empty sample set.
    pub fn from_nanos(mut samples: Vec<u64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let n = samples.len();
        let pick = |q: f64| samples[((n as f64 - 1.0) * q).round() as usize] as f64;
        Some(Self {
            samples: n,
            median_ns: pick(0.5),
            p99_ns: pick(0.99),
            mean_ns: samples.iter().map(|&s| s as f64).sum::<f64>() / n as f64,
        })
    }
}

impl std::fmt::Display for LatencyStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {} p99 {} (n={})",
            format_ns(self.median_ns),
            format_ns(self.p99_ns),
            self.samples
        )
    }
}

/// `812 ns`, `3.41 µs`, `12.0 ms`.
pub fn format_ns(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_set() {
        let stats = LatencyStats::from_nanos((1..=100).collect()).unwrap();
        assert_eq!(stats.median_ns, 51.0);
        assert_eq!(stats.p99_ns, 99.0);
        assert_eq!(stats.mean_ns, 50.5);
        assert!(LatencyStats::from_nanos(vec![]).is_none());
    }
}
