//! Policies in four languages, built from source with the toolchains
//! `scripts/setup-policy-toolchains.sh` installs, checked and run by the real binary:
//!
//! - the templates (`policies/templates/{rust,c,python,js}`) each build with one command
//!   (`build.sh OUT`) and pass `stepscope policy check`; being the same logic, they sample exactly
//!   the same steps in `policy run`; `bench policy --language …` measures all four side by side;
//! - the examples `rate-limited` (Python) and `tail-latency` (JavaScript) build, pass the check,
//!   and behave as documented when replayed over a recorded step stream (`policy replay`).
//!
//! Without the toolchains these tests say so and skip, unless `STEPSCOPE_REQUIRE_POLICY_TOOLCHAINS=1`
//! (set by `scripts/test.sh`, so CI always runs them). Compiled Python/JS components are cached in a
//! per-test directory (`STEPSCOPE_POLICY_CACHE`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use stepscope_tests::{TempDir, stepscope_bin};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// `Some(reason)` when a toolchain is missing.
fn missing_toolchain() -> Option<String> {
    let root = repo();
    let needed = [
        root.join(".cache/tools/bin/wit-bindgen"),
        root.join(".cache/tools/bin/wasm-tools"),
        root.join(".cache/policy-venv/bin/componentize-py"),
        root.join("policies/node_modules/@bytecodealliance/componentize-js/package.json"),
        PathBuf::from("/usr/bin/clang"),
    ];
    needed
        .iter()
        .find(|path| !path.exists())
        .map(|path| format!("{} is missing", path.display()))
}

/// True when the tests may run; panics when they must run but cannot.
fn toolchains_ready(test: &str) -> bool {
    match missing_toolchain() {
        None => true,
        Some(reason)
            if std::env::var("STEPSCOPE_REQUIRE_POLICY_TOOLCHAINS").as_deref() == Ok("1") =>
        {
            panic!("{test}: {reason}; run ./scripts/setup-policy-toolchains.sh")
        }
        Some(reason) => {
            eprintln!(
                "SKIPPED {test}: {reason} (run ./scripts/setup-policy-toolchains.sh; \
                 STEPSCOPE_REQUIRE_POLICY_TOOLCHAINS=1 makes this a failure)"
            );
            false
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Builds `policies/<dir>` with its one command into `out`.
fn build(dir: &str, out: &Path) {
    let script = repo().join("policies").join(dir).join("build.sh");
    let result = Command::new("bash")
        .arg(&script)
        .arg(out)
        .output()
        .expect("run build.sh");
    assert!(
        result.status.success(),
        "{dir}/build.sh failed:\n{}",
        text(&result)
    );
    assert!(out.is_file(), "{dir}/build.sh wrote no {}", out.display());
}

/// Runs the binary with the compile cache in `cache`.
fn run(cache: &TempDir, args: &[&str]) -> Output {
    Command::new(stepscope_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .env("STEPSCOPE_POLICY_CACHE", cache.path("compile-cache"))
        .output()
        .expect("spawn stepscope")
}

fn check(cache: &TempDir, file: &Path, extra: &[&str]) -> String {
    let file = file.display().to_string();
    let mut args = vec!["policy", "check", &file, "--steps", "3000"];
    args.extend_from_slice(extra);
    let out = run(cache, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "policy check {file}:\n{}", text(&out));
    assert!(stdout.contains("verdict: PASS"), "{stdout}");
    stdout
}

/// The `batch-sampled:` and `rich-sampled:` lines of `policy run`.
fn sampled_counts(cache: &TempDir, file: &Path) -> Vec<String> {
    let file = file.display().to_string();
    let out = run(
        cache,
        &[
            "policy",
            "run",
            &file,
            "--steps",
            "20000",
            "--sample-rate",
            "0.3",
            "--rich-subsample-rate",
            "0.5",
            "--seed",
            "7",
        ],
    );
    assert!(out.status.success(), "policy run {file}:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.starts_with("batch-sampled:")
                || l.starts_with("rich-sampled:")
                || l.starts_with("faults:")
        })
        .map(str::to_string)
        .collect()
}

const TEMPLATES: [&str; 4] = ["rust", "c", "python", "js"];

#[test]
fn templates_in_four_languages_build_pass_the_check_and_agree() {
    if !toolchains_ready("templates_in_four_languages_build_pass_the_check_and_agree") {
        return;
    }
    let dir = TempDir::new("templates");
    let built: Vec<(&str, PathBuf)> = TEMPLATES
        .iter()
        .map(|lang| {
            let out = dir.path(&format!("{lang}.wasm"));
            build(&format!("templates/{lang}"), &out);
            (*lang, out)
        })
        .collect();
    let mut reference: Option<Vec<String>> = None;
    let mut journeys_reference: Option<String> = None;
    for (lang, file) in &built {
        let report = check(&dir, file, &["--arg", "journey_sample_rate=0.3"]);
        assert!(report.contains("decide latency"), "{lang}: {report}");
        // Contract 0.2: decide-request answers, the same in every language.
        assert!(
            report.contains("stepscope:policy/policy@0.2.0"),
            "{lang}: {report}"
        );
        let journeys = report
            .lines()
            .find(|l| l.contains("decide-request"))
            .expect("a decide-request line")
            .to_string();
        assert!(journeys.contains("0 faults"), "{lang}: {journeys}");
        match &journeys_reference {
            None => journeys_reference = Some(journeys),
            Some(expected) => {
                assert_eq!(&journeys, expected, "{lang} decides journeys differently")
            }
        }
        let counts = sampled_counts(&dir, file);
        assert_eq!(counts.len(), 3, "{lang}: {counts:?}");
        assert!(counts[2].starts_with("faults: 0,"), "{lang}: {counts:?}");
        match &reference {
            None => reference = Some(counts),
            Some(expected) => assert_eq!(&counts, expected, "{lang} samples differently from rust"),
        }
    }
    // The default policy's rates at 0.3 / 0.5 over 20 000 steps: far from 0 and from all.
    let batch: u64 = reference.as_ref().unwrap()[0]
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("batch count");
    assert!((5_400..6_600).contains(&batch), "{batch}");

    // The cross-language benchmark runs on all four (its numbers are printed, not asserted).
    let languages: Vec<String> = built
        .iter()
        .map(|(lang, file)| format!("{lang}={}", file.display()))
        .collect();
    let mut args = vec!["bench", "policy", "--iterations", "2000"];
    for language in &languages {
        args.extend_from_slice(&["--language", language]);
    }
    let out = run(&dir, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    for lang in TEMPLATES {
        assert!(stdout.contains(&format!("decide: {lang} ")), "{stdout}");
        assert!(
            stdout.contains(&format!("plan-rich (64 requests): {lang} ")),
            "{stdout}"
        );
    }
}

#[test]
fn a_template_refuses_unknown_parameters_in_every_language() {
    if !toolchains_ready("a_template_refuses_unknown_parameters_in_every_language") {
        return;
    }
    let dir = TempDir::new("templates-params");
    // C and Python: the fastest non-Rust builds; Rust and JS are covered by the test above
    // accepting their parameters, and by the examples below refusing theirs.
    for lang in ["c", "python"] {
        let out = dir.path(&format!("{lang}.wasm"));
        build(&format!("templates/{lang}"), &out);
        let file = out.display().to_string();
        let result = run(
            &dir,
            &[
                "policy", "check", &file, "--arg", "bogus=1", "--steps", "10",
            ],
        );
        assert!(
            !result.status.success(),
            "{lang} accepted bogus=1:\n{}",
            text(&result)
        );
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(
            stderr.contains("configure refused the parameters") && stderr.contains("bogus"),
            "{lang}: {stderr}"
        );
    }
}

/// Records every step of a short, bursty generation run as JSON lines.
fn record_steps(dir: &TempDir) -> PathBuf {
    let file = dir.path("recorded.jsonl");
    let out = stepscope_tests::stepscope(&[
        "generate",
        "builtin:tiny",
        "--prompt",
        "record every step of this generation for an offline policy replay",
        "--max-tokens",
        "200",
        "--ignore-eos",
        "--json",
        "--step-tracing-enabled",
        "--step-tracing-sample-rate",
        "1",
        "--step-tracing-rich-subsample-rate",
        "1",
        "--step-tracing-file",
        &file.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    file
}

/// The step ids the tail-latency example triggers on for the recorded steps, computed here
/// independently of its JavaScript: each non-zero `step.last_step_duration_us` is compared with
/// the nearest-rank `percentile` of the earlier ones (default window 1024, refreshed when
/// warm-up ends and every 32 recorded durations), then recorded.
fn tail_latency_triggers(steps: &Path, percentile: f64, min_samples: usize) -> Vec<u64> {
    const WINDOW: usize = 1024;
    const RECOMPUTE_EVERY: usize = 32;
    let text = std::fs::read_to_string(steps).expect("recorded steps");
    let mut rows: Vec<(u64, u64)> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|v| v["name"] == "scheduler.step")
        .map(|v| {
            let field = |k: &str| {
                v[k].as_u64()
                    .unwrap_or_else(|| panic!("no integer `{k}` in {v}"))
            };
            (field("step.id"), field("step.last_step_duration_us"))
        })
        .collect();
    rows.sort_unstable();
    let (mut recent, mut threshold, mut since) = (Vec::<u64>::new(), None::<u64>, 0usize);
    let mut triggered = Vec::new();
    for (id, duration) in rows {
        if duration == 0 {
            continue;
        }
        if threshold.is_some_and(|t| duration > t) {
            triggered.push(id);
        }
        if recent.len() == WINDOW {
            recent.remove(0);
        }
        recent.push(duration);
        since += 1;
        if recent.len() >= min_samples && (threshold.is_none() || since >= RECOMPUTE_EVERY) {
            let mut sorted = recent.clone();
            sorted.sort_unstable();
            let rank = ((percentile * sorted.len() as f64).ceil() as usize).max(1);
            threshold = Some(sorted[rank - 1]);
            since = 0;
        }
    }
    triggered
}

fn replay(dir: &TempDir, policy: &str, steps: &Path, extra: &[&str]) -> String {
    let steps = steps.display().to_string();
    let mut args = vec!["policy", "replay", policy, "--steps", &steps];
    args.extend_from_slice(extra);
    let out = run(dir, &args);
    assert!(
        out.status.success(),
        "policy replay {policy}:\n{}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn count_after(report: &str, prefix: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{report}"))
}

#[test]
fn python_and_javascript_examples_build_check_and_replay() {
    if !toolchains_ready("python_and_javascript_examples_build_check_and_replay") {
        return;
    }
    let dir = TempDir::new("examples");
    let rate_limited = dir.path("rate-limited.wasm");
    let tail_latency = dir.path("tail-latency.wasm");
    build("examples/rate-limited", &rate_limited);
    build("examples/tail-latency", &tail_latency);
    check(&dir, &rate_limited, &["--arg", "max_steps_per_second=100"]);
    check(&dir, &tail_latency, &[]);

    let steps = record_steps(&dir);
    // Every recorded step: the default policy at rate 1 samples them all.
    let all = replay(
        &dir,
        "builtin:default",
        &steps,
        &["--sample-rate", "1", "--summary-only"],
    );
    let recorded = count_after(&all, "replayed ");
    assert!(recorded >= 200, "{all}");
    assert_eq!(count_after(&all, "batch-sampled: "), recorded, "{all}");

    // rate-limited: at most `burst` + rate × elapsed step time, whatever the step rate.
    let limited = replay(
        &dir,
        &rate_limited.display().to_string(),
        &steps,
        &[
            "--sample-rate",
            "1",
            "--arg",
            "max_steps_per_second=50",
            "--arg",
            "burst=5",
            "--summary-only",
        ],
    );
    let span_seconds: f64 = limited
        .lines()
        .find(|l| l.starts_with("replayed "))
        .and_then(|l| l.split_once(", ").map(|(_, r)| r))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no span in:\n{limited}"));
    let sampled = count_after(&limited, "batch-sampled: ");
    let bound = 5.0 + 50.0 * span_seconds + 1.0;
    assert!(
        sampled >= 5 && (sampled as f64) <= bound,
        "{sampled} > {bound}:\n{limited}"
    );
    assert!(sampled < recorded, "{limited}");
    assert!(limited.contains("by reason: rate_limited="), "{limited}");

    // tail-latency with base rates 0: only steps slower than the estimated p50 are sampled,
    // each with its reason and threshold.
    let tail = replay(
        &dir,
        &tail_latency.display().to_string(),
        &steps,
        &[
            "--sample-rate",
            "0",
            "--arg",
            "percentile=0.5",
            "--arg",
            "min_samples=16",
        ],
    );
    let sampled = count_after(&tail, "batch-sampled: ");
    // Which steps trigger depends on this machine's step times (they drift upward as the
    // context grows, so far more than half may lie above the running median): the replay must
    // pick exactly the steps the nearest-rank rule picks on the recorded durations.
    assert!(
        tail.contains("faults: 0,"),
        "the replay must run without faults:\n{tail}"
    );
    let expected = tail_latency_triggers(&steps, 0.5, 16);
    let picked: Vec<u64> = tail
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|id| {
            id.parse()
                .unwrap_or_else(|_| panic!("step id `{id}` in:\n{tail}"))
        })
        .collect();
    assert_eq!(picked, expected, "{tail}");
    assert_eq!(sampled, expected.len() as u64, "{tail}");
    assert!(
        sampled > 0 && sampled < recorded,
        "{sampled} of {recorded}:\n{tail}"
    );
    for line in tail.lines().filter(|l| l.starts_with("step ")) {
        assert!(line.contains("reason=tail_latency"), "{line}");
        let value = |key: &str| -> f64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line}"))
        };
        assert!(value("duration_us=") > value("threshold_us="), "{line}");
    }
}
