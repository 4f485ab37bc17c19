//! `stepscope policy check` and `policy run` as a user runs them, on the real binary.

use stepscope_tests::{TempDir, stepscope};

fn write(dir: &TempDir, name: &str, bytes: &[u8]) -> String {
    let path = dir.path(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

fn guest(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(stepscope::policy::GUEST_COMPONENT_DIR).join(format!("{name}.wasm")),
    )
    .unwrap()
}

#[test]
fn check_passes_the_default_policy() {
    let dir = TempDir::new("check-default");
    let file = write(&dir, "default.wasm", stepscope::policy::DEFAULT_POLICY_WASM);
    let out = stepscope(&["policy", "check", &file, "--steps", "2000"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verdict: PASS"), "{stdout}");
    assert!(
        stdout.contains("deterministic") && stdout.contains("decide latency"),
        "{stdout}"
    );
}

#[test]
fn check_fails_a_policy_that_loops() {
    let dir = TempDir::new("check-loop");
    let file = write(&dir, "hostile.wasm", &guest("hostile"));
    let out = stepscope(&[
        "policy",
        "check",
        &file,
        "--arg",
        "mode=loop",
        "--steps",
        "50",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("verdict: FAIL") && stdout.contains("timeout"),
        "{stdout}"
    );
}

#[test]
fn check_refuses_non_wasm_and_wrong_world_with_one_line() {
    let dir = TempDir::new("check-bad");
    for (name, bytes, needle) in [
        ("notes.txt", b"hello".to_vec(), "not a WebAssembly file"),
        (
            "other.wasm",
            guest("wrong-world"),
            "does not export `stepscope:policy/policy@0.2.0` or `stepscope:policy/policy@0.1.0`",
        ),
    ] {
        let file = write(&dir, name, &bytes);
        let out = stepscope(&["policy", "check", &file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected one line: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle) && lines[0].contains(name),
            "{stderr}"
        );
    }
}

#[test]
fn run_prints_rates_near_the_configured_ones() {
    let out = stepscope(&[
        "policy",
        "run",
        "builtin:default",
        "--steps",
        "200000",
        "--sample-rate",
        "0.1",
        "--rich-subsample-rate",
        "0.5",
        "--seed",
        "4",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let rate = |label: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{stdout}"));
        let after = line.split("(rate ").nth(1).unwrap();
        after.split(';').next().unwrap().parse().unwrap()
    };
    // 4 standard deviations of a binomial over 200k steps.
    let (batch, rich) = (rate("batch-sampled"), rate("rich-sampled"));
    assert!(
        (batch - 0.1).abs() < 4.0 * (0.1f64 * 0.9 / 200_000.0).sqrt(),
        "{batch}"
    );
    assert!(
        (rich - 0.05).abs() < 4.0 * (0.05f64 * 0.95 / 200_000.0).sqrt(),
        "{rich}"
    );
}

#[test]
fn out_of_range_rates_are_refused_by_the_cli() {
    let out = stepscope(&["policy", "run", "builtin:default", "--sample-rate", "1.5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside [0, 1]"));
}

#[test]
fn check_passes_the_pressure_example() {
    let dir = TempDir::new("check-pressure");
    let file = write(&dir, "pressure.wasm", &guest("pressure"));
    let out = stepscope(&[
        "policy",
        "check",
        &file,
        "--steps",
        "2000",
        "--arg",
        "kv_usage_threshold=0.8",
        "--arg",
        "rich_top_k=4",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("verdict: PASS"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn record_steps_captures_every_step_for_replay() {
    let dir = TempDir::new("record-steps");
    let recorded = dir.path("steps.jsonl").display().to_string();
    // Sampling nothing: the recording still holds every step.
    let out = stepscope(&[
        "generate",
        "builtin:tiny",
        "--prompt",
        "record every step",
        "--max-tokens",
        "40",
        "--ignore-eos",
        "--json",
        "--step-tracing-enabled",
        "--step-tracing-sample-rate",
        "0",
        "--record-steps",
        &recorded,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&recorded).unwrap();
    let ids: Vec<u64> = text
        .lines()
        .map(|line| {
            let json: serde_json::Value = serde_json::from_str(line).unwrap();
            json["step.id"].as_u64().unwrap()
        })
        .collect();
    assert!(ids.len() >= 40, "{} steps recorded", ids.len());
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "every step, in order"
    );

    let replay = stepscope(&[
        "policy",
        "replay",
        "builtin:default",
        "--steps",
        &recorded,
        "--sample-rate",
        "0.5",
        "--summary-only",
    ]);
    let stdout = String::from_utf8_lossy(&replay.stdout);
    assert!(replay.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("replayed {} recorded steps", ids.len())),
        "{stdout}"
    );
    // The same seed and rate give the same decisions as the draws the engine used.
    let sampled: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("batch-sampled: "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    let expected = (1..=ids.len() as u64)
        .filter(|&id| stepscope::policy::random::step_draws(0, id).0 < 0.5)
        .count() as u64;
    assert_eq!(sampled, expected, "{stdout}");

    // Without step tracing there is nothing to record: refused at parse time.
    let refused = stepscope(&[
        "generate",
        "builtin:tiny",
        "--prompt",
        "x",
        "--record-steps",
        &recorded,
    ]);
    assert!(!refused.status.success());
}
