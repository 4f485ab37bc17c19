//! `stepscope bench policy`: the cost of asking a policy, Wasm vs native.
//!
//! Measures, in one run: the embedded default policy's `decide` vs the same logic as a native
//! Rust function; `decide` with the wall-clock deadline alone (an engine with no fuel metering)
//! and with the default and a tight fuel bound; and `plan-rich` with 64 and 256 request views.
//!
//! With `--language NAME=FILE.wasm` (repeatable) it instead compares the same logic built in
//! several languages (the templates under `policies/templates/` implement the default policy):
//! `decide` and `plan-rich` over 64 request views for each, side by side with the native
//! function, all under the given fuel bound (default none: the deadline alone) and memory cap.

use super::{LatencyStats, format_ns};
use crate::policy::{
    PolicyCounters, PolicyLimits, PolicyModule, PolicyParams, PolicyRuntime, PolicySource,
    devkit::{conformance, native, synthetic},
};
use std::sync::Arc;
use std::time::Instant;

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub stats: LatencyStats,
}

/// Runs the policy benchmark and returns its rows (printing is the caller's job).
pub fn run(source: &PolicySource, iterations: u64) -> anyhow::Result<Vec<Row>> {
    let params = PolicyParams::rates(0.5, 0.5).to_configure();
    let seed = 0;
    let mut rows = vec![native_row(seed, iterations)?];
    for (label, fuel) in [
        ("decide: Wasm default policy, deadline only (no fuel)", 0),
        ("decide: Wasm default policy, fuel bound 20M", 20_000_000),
        ("decide: Wasm default policy, fuel bound 10k", 10_000),
    ] {
        let limits = PolicyLimits {
            fuel_per_call: fuel,
            ..PolicyLimits::default()
        };
        let mut runtime = runtime(source, limits, &params)?;
        rows.push(Row {
            name: label.into(),
            stats: conformance::measure_decide(&mut runtime, seed, iterations)
                .ok_or_else(|| anyhow::anyhow!("the policy faulted during {label}"))?,
        });
    }

    let mut runtime = runtime(source, PolicyLimits::default(), &params)?;
    for requests in [64usize, 256] {
        rows.push(Row {
            name: format!("plan-rich: Wasm, {requests} request views"),
            stats: conformance::measure_rich(&mut runtime, seed, requests, iterations / 10 + 1)
                .ok_or_else(|| anyhow::anyhow!("the policy faulted during plan-rich"))?,
        });
    }
    Ok(rows)
}

/// The cross-language comparison: for each `(name, source)`, `decide` and `plan-rich` (64
/// views) latency, after the native baseline.
pub fn run_languages(
    languages: &[(String, PolicySource)],
    iterations: u64,
    fuel: u64,
) -> anyhow::Result<Vec<Row>> {
    let limits = PolicyLimits {
        fuel_per_call: fuel,
        ..PolicyLimits::default()
    };
    let params = PolicyParams::rates(0.5, 0.5).to_configure();
    let seed = 0;
    let mut rows = vec![native_row(seed, iterations)?];
    let mut runtimes = instances(languages, &params, limits)?;
    // Decide rows first, then plan-rich rows, so the table reads as two comparisons.
    for (name, runtime) in &mut runtimes {
        rows.push(Row {
            name: format!("decide: {name}"),
            stats: conformance::measure_decide(runtime, seed, iterations)
                .ok_or_else(|| anyhow::anyhow!("{name}: the policy faulted during decide"))?,
        });
    }
    // Fresh instances for plan-rich: a StarlingMonkey (JavaScript) instance's heap only grows,
    // and after ~10^5 calls it reaches the memory cap (a counted `memory` fault in a server).
    let mut runtimes = instances(languages, &params, limits)?;
    for (name, runtime) in &mut runtimes {
        rows.push(Row {
            name: format!("plan-rich (64 requests): {name}"),
            stats: conformance::measure_rich(runtime, seed, 64, iterations / 10 + 1)
                .ok_or_else(|| anyhow::anyhow!("{name}: the policy faulted during plan-rich"))?,
        });
    }
    Ok(rows)
}

/// The native Rust twin of the default policy's `decide`, over `iterations` synthetic steps.
fn native_row(seed: u64, iterations: u64) -> anyhow::Result<Row> {
    let summaries: Vec<_> = (1..=iterations)
        .map(|s| synthetic::step_summary(seed, s))
        .collect();
    let mut samples = Vec::with_capacity(summaries.len());
    let mut sink = 0u64;
    for summary in &summaries {
        let started = Instant::now();
        let decision = native::default_decide(0.5, 0.5, std::hint::black_box(summary));
        samples.push(started.elapsed().as_nanos() as u64);
        sink += u64::from(decision.emit_batch);
    }
    std::hint::black_box(sink);
    Ok(Row {
        name: "decide: native Rust function".into(),
        stats: stats(samples)?,
    })
}

/// One configured instance per language, under `limits`.
fn instances<'a>(
    languages: &'a [(String, PolicySource)],
    params: &[(String, String)],
    limits: PolicyLimits,
) -> anyhow::Result<Vec<(&'a String, PolicyRuntime)>> {
    languages
        .iter()
        .map(|(name, source)| {
            let runtime =
                runtime(source, limits, params).map_err(|e| anyhow::anyhow!("{name}: {e:#}"))?;
            Ok((name, runtime))
        })
        .collect()
}

fn runtime(
    source: &PolicySource,
    limits: PolicyLimits,
    params: &[(String, String)],
) -> anyhow::Result<PolicyRuntime> {
    let module = PolicyModule::load(source, limits)?;
    Ok(PolicyRuntime::new(
        module,
        params.to_vec(),
        Arc::new(PolicyCounters::default()),
    )?)
}

fn stats(samples: Vec<u64>) -> anyhow::Result<LatencyStats> {
    LatencyStats::from_nanos(samples).ok_or_else(|| anyhow::anyhow!("no samples"))
}

/// Formats the rows as a table with the ratio to the first row.
pub fn render(rows: &[Row]) -> String {
    let base = rows
        .first()
        .map(|r| r.stats.median_ns)
        .unwrap_or(1.0)
        .max(1.0);
    let mut out = format!(
        "{:<48} {:>12} {:>12} {:>10}\n",
        "case", "median", "p99", "vs native"
    );
    for row in rows {
        out.push_str(&format!(
            "{:<48} {:>12} {:>12} {:>9.1}x\n",
            row.name,
            format_ns(row.stats.median_ns),
            format_ns(row.stats.p99_ns),
            row.stats.median_ns / base
        ));
    }
    out
}
