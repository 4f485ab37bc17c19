//! `stepscope trace summary`: what a sampled step trace says about every step of the run.
//!
//! [`Summary::of`] re-weights the traced steps by their recorded probabilities (see
//! [`estimate`](super::estimate)) into population estimates with 95% intervals for the batch
//! size, tokens per step, prefill share, KV usage, queue depths, preemptions and step duration,
//! weighted percentiles of each, the slowest steps and the steps that preempted. Where the file
//! holds request journeys (`--enable-journey-tracing`), their `llm_request` spans are re-weighted
//! the same way by `sampling.journey_probability` into the request count, failures, latencies
//! (end to end, time to first token, time in queue) and token counts ([`RequestSummary`]). It
//! serialises as `--json` prints it, and [`Summary::render`] writes the terminal report.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Serialize;

use super::estimate::{self, Estimate};
use super::load::{TraceFile, TracedRequest, TracedStep};

/// Percentiles reported for every quantity.
pub const PERCENTILES: [f64; 4] = [0.5, 0.9, 0.99, 1.0];

/// Slow steps and preempting steps listed at most.
const LISTED: usize = 10;

/// One per-step quantity across the population.
#[derive(Debug, Clone, Serialize)]
pub struct Quantity {
    pub name: &'static str,
    pub unit: &'static str,
    /// Population mean (Hájek; for `prefill_share`, total prefill tokens / total tokens).
    pub mean: Estimate,
    /// Population total (Horvitz–Thompson), where a total means something.
    pub total: Option<Estimate>,
    /// p50, p90, p99 and max of the re-weighted distribution.
    pub percentiles: [f64; 4],
}

impl Quantity {
    /// The estimates of `ys` over steps traced with probabilities `pis` (a total too when
    /// `with_total`).
    fn of(
        name: &'static str,
        unit: &'static str,
        ys: &[f64],
        pis: &[f64],
        with_total: bool,
    ) -> Self {
        Quantity {
            name,
            unit,
            mean: estimate::mean(ys, pis),
            total: with_total.then(|| estimate::total(ys, pis)),
            percentiles: to_array(estimate::percentiles(ys, pis, &PERCENTILES)),
        }
    }
}

/// A slow step: `step_id` took `duration_us` (reported by the next step, which was traced).
#[derive(Debug, Clone, Serialize)]
pub struct SlowStep {
    pub step_id: u64,
    pub duration_us: u64,
    pub batch_size: u64,
    pub scheduled_tokens: u64,
}

/// A traced step that preempted requests.
#[derive(Debug, Clone, Serialize)]
pub struct PreemptingStep {
    pub step_id: u64,
    pub num_preempted: u64,
    pub kv_usage: f64,
    pub waiting_depth: u64,
}

/// What the traced request journeys say about every request of the run.
#[derive(Debug, Clone, Serialize)]
pub struct RequestSummary {
    /// `llm_request` spans in the file.
    pub traced: u64,
    /// Requests in the run: Σ 1/π over the traced ones (Horvitz–Thompson).
    pub estimated: Estimate,
    /// Requests whose span ended in error (aborted or failed), estimated the same way (with a
    /// rule-of-three upper bound where none traced failed: [`estimate::event_count`]).
    pub failed: Estimate,
    /// Whether every traced journey had probability 1 (exact numbers, if every request was
    /// traced: see [`REQUEST_NOTE`]).
    pub census: bool,
    /// What the request estimates assume.
    pub note: &'static str,
    /// Per request: `e2e_latency`, `time_to_first_token` and `time_in_queue` (seconds; the last
    /// two over the requests that got that far), `input_tokens` and `output_tokens` (with
    /// totals).
    pub quantities: Vec<Quantity>,
}

impl RequestSummary {
    /// `None` when the file holds no `llm_request` span.
    fn of(requests: &[TracedRequest]) -> Option<Self> {
        if requests.is_empty() {
            return None;
        }
        let pis: Vec<f64> = requests.iter().map(|r| r.journey_probability).collect();
        let column =
            |f: &dyn Fn(&TracedRequest) -> f64| requests.iter().map(f).collect::<Vec<f64>>();
        let some = |f: &dyn Fn(&TracedRequest) -> Option<f64>| -> (Vec<f64>, Vec<f64>) {
            requests
                .iter()
                .filter_map(|r| f(r).map(|v| (v, r.journey_probability)))
                .unzip()
        };
        let mut quantities = vec![Quantity::of(
            "e2e_latency",
            "s",
            &column(&|r| r.e2e_s),
            &pis,
            false,
        )];
        for (name, (ys, ps)) in [
            ("time_to_first_token", some(&|r| r.ttft_s)),
            ("time_in_queue", some(&|r| r.queue_s)),
        ] {
            if !ys.is_empty() {
                quantities.push(Quantity::of(name, "s", &ys, &ps, false));
            }
        }
        let input: &dyn Fn(&TracedRequest) -> f64 = &|r| r.input_tokens as f64;
        let output: &dyn Fn(&TracedRequest) -> f64 = &|r| r.output_tokens as f64;
        for (name, tokens) in [("input_tokens", input), ("output_tokens", output)] {
            quantities.push(Quantity::of(name, "tokens", &column(tokens), &pis, true));
        }
        Some(RequestSummary {
            traced: requests.len() as u64,
            estimated: estimate::count(&pis),
            failed: estimate::event_count(
                &requests.iter().map(|r| r.failed).collect::<Vec<_>>(),
                &pis,
            ),
            census: pis.iter().all(|&p| p >= 1.0),
            quantities,
            note: REQUEST_NOTE,
        })
    }

    /// The quantity called `name`.
    pub fn quantity(&self, name: &str) -> Option<&Quantity> {
        self.quantities.iter().find(|q| q.name == name)
    }
}

/// The whole summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub file: String,
    pub policies: Vec<String>,
    /// Lines traced (sampled steps).
    pub steps_traced: u64,
    /// Traced steps with request snapshots, and the snapshots.
    pub steps_rich: u64,
    pub snapshots: u64,
    pub journey_spans: u64,
    /// The last line, when it was cut short mid-JSON and left out (see [`TraceFile`]).
    pub truncated_last_line: Option<usize>,
    /// Steps in the run: at least the last traced step id (steps are numbered from 1) ...
    pub steps_seen_at_least: u64,
    /// ... and the Horvitz–Thompson estimate Σ 1/π.
    pub steps_estimated: Estimate,
    /// Whether every traced step had probability 1 (a census: exact numbers).
    pub census: bool,
    /// Smallest and largest recorded batch probability.
    pub batch_probability_range: (f64, f64),
    pub quantities: Vec<Quantity>,
    pub slowest_steps: Vec<SlowStep>,
    /// Traced steps that preempted, in step order (the first few).
    pub preempting_steps: Vec<PreemptingStep>,
    pub preempting_steps_traced: u64,
    /// The request journeys in the file, if any.
    pub requests: Option<RequestSummary>,
    /// What the estimates assume.
    pub note: &'static str,
}

const NOTE: &str = "Estimates re-weight each traced step by 1/π, its recorded sampling.batch_probability \
(Horvitz-Thompson totals, Hajek means, normal 95% intervals). They are unbiased when π is the \
probability the step really had of being traced, whether a constant rate or a policy's rule; \
steps whose policy faulted or backed off are not in the file and are not represented.";

/// What [`RequestSummary`]'s estimates assume.
pub const REQUEST_NOTE: &str = "Requests re-weight each traced llm_request span by 1/π, its recorded \
sampling.journey_probability (a caller's sampled traceparent gives π = 1). Not represented: requests \
whose caller's traceparent was not sampled (never drawn), spans the exporter dropped, and requests \
refused before they reached the engine.";

impl Summary {
    /// Summarises `trace`, read from `file`.
    pub fn of(trace: &TraceFile, file: &str) -> Self {
        let steps = &trace.steps;
        let pis: Vec<f64> = steps.iter().map(|s| s.batch_probability).collect();
        let column = |f: &dyn Fn(&TracedStep) -> f64| steps.iter().map(f).collect::<Vec<f64>>();
        let quantity =
            |name, unit, ys: Vec<f64>, with_total| Quantity::of(name, unit, &ys, &pis, with_total);
        let tokens = column(&|s| s.scheduled_tokens as f64);
        let prefill = column(&|s| s.prefill_tokens as f64);
        let shares: Vec<f64> = steps
            .iter()
            .map(|s| {
                if s.scheduled_tokens == 0 {
                    0.0
                } else {
                    s.prefill_tokens as f64 / s.scheduled_tokens as f64
                }
            })
            .collect();
        let mut quantities = vec![
            quantity(
                "batch_size",
                "requests",
                column(&|s| s.batch_size() as f64),
                false,
            ),
            quantity("tokens_per_step", "tokens", tokens.clone(), true),
            Quantity {
                mean: estimate::ratio(&prefill, &tokens, &pis),
                ..quantity("prefill_share", "of tokens", shares, false)
            },
            quantity("kv_usage", "of blocks", column(&|s| s.kv_usage), false),
            quantity(
                "running_depth",
                "requests",
                column(&|s| s.running_depth as f64),
                false,
            ),
            quantity(
                "waiting_depth",
                "requests",
                column(&|s| s.waiting_depth as f64),
                false,
            ),
            quantity(
                "preemptions_per_step",
                "requests",
                column(&|s| s.num_preempted as f64),
                true,
            ),
            quantity(
                "finished_per_step",
                "requests",
                column(&|s| s.num_finished as f64),
                true,
            ),
        ];
        // `last_step_duration_us` is the previous step's; the first step reports none.
        let (durations, duration_pis): (Vec<f64>, Vec<f64>) = steps
            .iter()
            .filter(|s| s.step_id > 1)
            .map(|s| (s.last_step_duration_us as f64, s.batch_probability))
            .unzip();
        if !durations.is_empty() {
            quantities.push(Quantity::of(
                "step_duration",
                "us",
                &durations,
                &duration_pis,
                true,
            ));
        }
        let mut slow: Vec<&TracedStep> = steps.iter().filter(|s| s.step_id > 1).collect();
        slow.sort_by(|a, b| {
            b.last_step_duration_us
                .cmp(&a.last_step_duration_us)
                .then(a.step_id.cmp(&b.step_id))
        });
        let preempting: Vec<&TracedStep> = steps.iter().filter(|s| s.num_preempted > 0).collect();
        let min_pi = pis.iter().copied().fold(f64::INFINITY, f64::min);
        let max_pi = pis.iter().copied().fold(0.0, f64::max);
        Summary {
            file: file.to_string(),
            policies: steps
                .iter()
                .map(|s| s.policy.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            steps_traced: steps.len() as u64,
            steps_rich: steps.iter().filter(|s| !s.snapshots.is_empty()).count() as u64,
            snapshots: steps.iter().map(|s| s.snapshots.len() as u64).sum(),
            journey_spans: trace.journey_spans,
            truncated_last_line: trace.truncated_last_line,
            steps_seen_at_least: steps.iter().map(|s| s.step_id).max().unwrap_or(0),
            steps_estimated: estimate::count(&pis),
            census: min_pi >= 1.0,
            batch_probability_range: (min_pi, max_pi),
            quantities,
            slowest_steps: slow
                .iter()
                .take(LISTED)
                .map(|s| SlowStep {
                    step_id: s.step_id - 1,
                    duration_us: s.last_step_duration_us,
                    batch_size: s.batch_size(),
                    scheduled_tokens: s.scheduled_tokens,
                })
                .collect(),
            preempting_steps: preempting
                .iter()
                .take(LISTED)
                .map(|s| PreemptingStep {
                    step_id: s.step_id,
                    num_preempted: s.num_preempted,
                    kv_usage: s.kv_usage,
                    waiting_depth: s.waiting_depth,
                })
                .collect(),
            preempting_steps_traced: preempting.len() as u64,
            requests: RequestSummary::of(&trace.requests),
            note: NOTE,
        }
    }

    /// The quantity called `name`.
    pub fn quantity(&self, name: &str) -> Option<&Quantity> {
        self.quantities.iter().find(|q| q.name == name)
    }

    /// The terminal report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "step trace {}", self.file);
        let _ = writeln!(out, "  policies        {}", self.policies.join(", "));
        let (lo, hi) = self.batch_probability_range;
        let sampling = if self.census {
            "every step (probability 1): exact".to_string()
        } else if lo == hi {
            format!("probability {lo}")
        } else {
            format!("probabilities {lo} to {hi}")
        };
        let _ = writeln!(
            out,
            "  steps traced    {} ({sampling}); rich {} with {} snapshots; {} journey spans",
            self.steps_traced, self.steps_rich, self.snapshots, self.journey_spans
        );
        if let Some(line) = self.truncated_last_line {
            let _ = writeln!(
                out,
                "  left out        line {line}: cut short mid-JSON (the writer stopped mid-line)"
            );
        }
        let n = self.steps_estimated;
        let _ = writeln!(
            out,
            "  steps in run    at least {} (last traced id); estimated {:.0} [{:.0}, {:.0}]",
            self.steps_seen_at_least, n.value, n.ci95_low, n.ci95_high
        );
        let _ = writeln!(out);
        table(&mut out, "per step", &self.quantities);
        if let Some(r) = &self.requests {
            let _ = writeln!(out);
            let how = if r.census {
                "every traced journey had probability 1".to_string()
            } else {
                "re-weighted by sampling.journey_probability".to_string()
            };
            let _ = writeln!(
                out,
                "  requests        {} journeys traced ({how}); requests in run {}; failed {}",
                r.traced,
                interval(&r.estimated),
                interval(&r.failed)
            );
            table(&mut out, "per request", &r.quantities);
            let _ = writeln!(out, "  {}", r.note);
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "  slowest steps (duration reported by the next step):");
        for s in &self.slowest_steps {
            let _ = writeln!(
                out,
                "    step {:>8}  {:>9} us  batch {:>4}  tokens {:>6}",
                s.step_id, s.duration_us, s.batch_size, s.scheduled_tokens
            );
        }
        let _ = writeln!(
            out,
            "  traced steps that preempted: {} (first {} shown)",
            self.preempting_steps_traced,
            self.preempting_steps.len()
        );
        for s in &self.preempting_steps {
            let _ = writeln!(
                out,
                "    step {:>8}  preempted {:>3}  kv {:>5.1}%  waiting {:>4}",
                s.step_id,
                s.num_preempted,
                s.kv_usage * 100.0,
                s.waiting_depth
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "  {}", self.note);
        out
    }
}

/// A header and one line per quantity: mean and total with their intervals, percentiles.
fn table(out: &mut String, what: &str, quantities: &[Quantity]) {
    let _ = writeln!(
        out,
        "  {:<34} {:>28}  {:>34}  {:>9} {:>9} {:>9} {:>9}",
        what, "mean [95% CI]", "total [95% CI]", "p50", "p90", "p99", "max"
    );
    for q in quantities {
        let mean = interval(&q.mean);
        let total = q.total.as_ref().map_or_else(String::new, interval);
        let [p50, p90, p99, max] = q.percentiles;
        let _ = writeln!(
            out,
            "  {:<34} {:>28}  {:>34}  {:>9} {:>9} {:>9} {:>9}",
            format!("{} ({})", q.name, q.unit),
            mean,
            total,
            short(p50),
            short(p90),
            short(p99),
            short(max)
        );
    }
}

fn to_array(values: Vec<f64>) -> [f64; 4] {
    let mut out = [f64::NAN; 4];
    for (slot, v) in out.iter_mut().zip(values) {
        *slot = v;
    }
    out
}

fn short(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn interval(e: &Estimate) -> String {
    format!(
        "{} [{}, {}]",
        short(e.value),
        short(e.ci95_low),
        short(e.ci95_high)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal step line and `llm_request` lines (journeys traced at probability 0.25, one
    /// aborted before its first token).
    fn trace() -> TraceFile {
        let request = |e2e: f64, ttft: Option<f64>, out: u64, error: bool| {
            let mut line = serde_json::json!({
                "name": "llm_request", "sampling.journey_probability": 0.25,
                "gen_ai.latency.e2e": e2e, "gen_ai.latency.time_in_queue": 0.01,
                "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": out, "events": []
            });
            if let Some(t) = ttft {
                line["gen_ai.latency.time_to_first_token"] = t.into();
            }
            if error {
                line["status"] = "ERROR".into();
            }
            line.to_string()
        };
        let text = [
            step_line(1),
            request(1.0, Some(0.1), 20, false),
            request(2.0, Some(0.3), 40, false),
            request(3.0, None, 0, true),
            serde_json::json!({"name": "llm_core"}).to_string(),
        ]
        .join("\n");
        TraceFile::parse(std::io::Cursor::new(text), "t.jsonl").unwrap()
    }

    #[test]
    fn journeys_are_reweighted_by_their_probability() {
        let trace = trace();
        assert_eq!(trace.journey_spans, 4);
        let s = Summary::of(&trace, "t.jsonl");
        let r = s.requests.as_ref().expect("requests");
        assert_eq!(r.traced, 3);
        assert!(!r.census);
        assert_eq!(r.estimated.value, 12.0);
        assert_eq!(r.failed.value, 4.0);
        let q = |name| r.quantity(name).expect(name);
        assert!((q("e2e_latency").mean.value - 2.0).abs() < 1e-12);
        assert_eq!(q("e2e_latency").percentiles[3], 3.0);
        // Over the two requests that got a first token.
        assert!((q("time_to_first_token").mean.value - 0.2).abs() < 1e-12);
        assert_eq!(
            q("output_tokens").total.as_ref().map(|t| t.value),
            Some(240.0)
        );
        assert_eq!(
            q("input_tokens").total.as_ref().map(|t| t.value),
            Some(120.0)
        );
        let text = s.render();
        assert!(text.contains("3 journeys traced"), "{text}");
        assert!(text.contains("time_to_first_token (s)"), "{text}");
    }

    /// A step line as the tracer writes it, `id` its step id.
    fn step_line(id: u64) -> String {
        serde_json::json!({
            "name": "scheduler.step", "step.id": id, "start_time_unix_nano": 1,
            "end_time_unix_nano": 2, "sampling.batch_probability": 1.0,
            "events": [{"name": "step.BATCH_SUMMARY", "attributes": {
                "queue.running_depth": 1, "queue.waiting_depth": 0, "batch.num_prefill_reqs": 1,
                "batch.num_decode_reqs": 0, "batch.scheduled_tokens": 4, "batch.prefill_tokens": 4,
                "batch.decode_tokens": 0, "batch.num_preempted": 0, "batch.num_finished": 0,
                "kv.usage_gpu_ratio": 0.5, "step.duration_us": 10}}]
        })
        .to_string()
    }

    #[test]
    fn a_last_line_cut_short_is_left_out_and_reported_but_a_broken_line_is_refused() {
        let whole = format!("{}\n{}\n", step_line(1), step_line(2));
        let cut = step_line(3);
        let cut = &cut[..cut.len() / 2];

        // The writer stopped mid-line: the two whole steps are read, line 3 reported.
        let trace =
            TraceFile::parse(std::io::Cursor::new(format!("{whole}{cut}")), "t.jsonl").unwrap();
        assert_eq!(trace.steps.len(), 2);
        assert_eq!(trace.truncated_last_line, Some(3));
        let text = Summary::of(&trace, "t.jsonl").render();
        assert!(text.contains("left out        line 3"), "{text}");

        // A whole file reports nothing.
        let trace = TraceFile::parse(std::io::Cursor::new(whole.clone()), "t.jsonl").unwrap();
        assert_eq!((trace.steps.len(), trace.truncated_last_line), (2, None));
        assert!(!Summary::of(&trace, "t.jsonl").render().contains("left out"));

        // The same half line with its newline, or followed by more lines, is malformed.
        for text in [format!("{whole}{cut}\n"), format!("{cut}\n{whole}")] {
            let err = TraceFile::parse(std::io::Cursor::new(text), "t.jsonl").unwrap_err();
            assert!(err.to_string().contains("not JSON"), "{err}");
        }
        // So is a last line that is wrong rather than short.
        let text = format!("{whole}{{\"name\": 5]");
        let err = TraceFile::parse(std::io::Cursor::new(text), "t.jsonl").unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn a_journey_without_its_probability_is_refused_by_line() {
        let text = "{\"name\": \"llm_request\", \"gen_ai.latency.e2e\": 1.0}";
        let err = TraceFile::parse(std::io::Cursor::new(text), "t.jsonl").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(
            err.to_string().contains("sampling.journey_probability"),
            "{err}"
        );
    }
}
