//! A test-only policy that tries to stall the engine through the WASI calls a sandboxed guest
//! can make, or is merely slow. The host must contain every mode: the call traps (`blocked`,
//! `host_limit` or `timeout`), or returns at once, and the engine goes on.
//!
//! `configure` takes `mode=…` and, optionally, `after=N` (behave for the first N `decide` calls
//! of an instance, then misbehave on every call) and `spin=N` (iterations of the `slow` loop);
//! `block-in-configure=1` waits on a clock in `configure`; `fail=TEXT` makes it refuse with a 256 KiB error full of terminal escapes and forged log
//! lines.
//! Modes, all acting in `decide`:
//!
//! - `ok`: samples every step (batch and rich), like the default at rates 1/1;
//! - `sleep`: `monotonic-clock.subscribe-duration(300 ms)` then `pollable.block`;
//! - `sleep-forever`: `subscribe-instant(u64::MAX)` then `block`;
//! - `poll`: `poll` on a one-hour deadline;
//! - `poll-ready`: `poll` on a zero-length deadline (ready at once: must not fault);
//! - `random-huge`: one `get-random-bytes(8 MiB)`;
//! - `random-loop`: `get-random-bytes(64 KiB)` forever (CPU spent in host calls, not fuel);
//! - `insecure-random-huge`: one `get-insecure-random-bytes(8 MiB)`;
//! - `stdin`: `blocking-read` of 1 MiB from stdin and `block` on its pollable (stdin is closed:
//!   both return at once, no fault);
//! - `stdout-loop`: `blocking-write-and-flush` of 4 KiB to stdout forever;
//! - `stdout-huge`: one `write` of 256 KiB to stdout, past its 64 KiB `check-write` permit;
//! - `network`: creates a TCP socket and looks a name up (both refused at once, no fault);
//! - `resource-flood`: creates clock pollables forever without dropping them;
//! - `slow`: a busy loop of `spin` iterations (default 800,000: about a millisecond), legal but slow.
//!
//! The answer records what happened in an extra attribute `probe`.

wit_bindgen::generate!({
    path: "wit",
    world: "stall-policy",
    generate_all,
});

use exports::stepscope::policy::policy::{
    ExtraAttribute, Guest, RequestViews, RichPlan, SnapshotAttributes, StepDecision, StepSummary,
};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use wasi::clocks::monotonic_clock;
use wasi::io::poll;

#[derive(Clone, Copy, PartialEq)]
#[repr(u32)]
enum Mode {
    Ok = 0,
    Sleep,
    SleepForever,
    Poll,
    PollReady,
    RandomHuge,
    RandomLoop,
    InsecureRandomHuge,
    Stdin,
    StdoutLoop,
    StdoutHuge,
    Network,
    ResourceFlood,
    Slow,
}

const MODES: [(&str, Mode); 14] = [
    ("ok", Mode::Ok),
    ("sleep", Mode::Sleep),
    ("sleep-forever", Mode::SleepForever),
    ("poll", Mode::Poll),
    ("poll-ready", Mode::PollReady),
    ("random-huge", Mode::RandomHuge),
    ("random-loop", Mode::RandomLoop),
    ("insecure-random-huge", Mode::InsecureRandomHuge),
    ("stdin", Mode::Stdin),
    ("stdout-loop", Mode::StdoutLoop),
    ("stdout-huge", Mode::StdoutHuge),
    ("network", Mode::Network),
    ("resource-flood", Mode::ResourceFlood),
    ("slow", Mode::Slow),
];

static MODE: AtomicU32 = AtomicU32::new(Mode::Ok as u32);
static AFTER: AtomicU64 = AtomicU64::new(0);
static SPIN: AtomicU64 = AtomicU64::new(800_000);
static CALLS: AtomicU64 = AtomicU64::new(0);

fn mode() -> Mode {
    MODES[MODE.load(Ordering::Relaxed) as usize].1
}

fn number(key: &str, value: &str) -> Result<u64, String> {
    value
        .parse()
        .map_err(|_| format!("{key}={value} is not a number"))
}

/// Does what `mode` says; returns a word about the outcome for the `probe` attribute.
fn misbehave(mode: Mode, step: u64) -> String {
    match mode {
        Mode::Ok => "ok".into(),
        Mode::Sleep => {
            monotonic_clock::subscribe_duration(300_000_000).block();
            "slept".into()
        }
        Mode::SleepForever => {
            monotonic_clock::subscribe_instant(u64::MAX).block();
            "woke".into()
        }
        Mode::Poll => {
            let later = monotonic_clock::subscribe_duration(3_600_000_000_000);
            format!("polled {:?}", poll::poll(&[&later]))
        }
        Mode::PollReady => {
            let now = monotonic_clock::subscribe_duration(0);
            let ready = poll::poll(&[&now]);
            now.block();
            format!("ready {ready:?}")
        }
        Mode::RandomHuge => {
            format!("{} bytes", wasi::random::random::get_random_bytes(8 << 20).len())
        }
        Mode::RandomLoop => {
            let mut sum = 0u64;
            loop {
                let bytes = wasi::random::random::get_random_bytes(64 << 10);
                sum = sum.wrapping_add(u64::from(bytes[step as usize % bytes.len()]));
                std::hint::black_box(sum);
            }
        }
        Mode::InsecureRandomHuge => format!(
            "{} bytes",
            wasi::random::insecure::get_insecure_random_bytes(8 << 20).len()
        ),
        Mode::Stdin => {
            let stdin = wasi::cli::stdin::get_stdin();
            let read = stdin.blocking_read(1 << 20);
            stdin.subscribe().block();
            format!("stdin {}", if read.is_ok() { "read" } else { "closed" })
        }
        Mode::StdoutLoop => {
            let stdout = wasi::cli::stdout::get_stdout();
            let chunk = vec![b'x'; 4096];
            loop {
                if stdout.blocking_write_and_flush(&chunk).is_err() {
                    return "stdout closed".into();
                }
            }
        }
        Mode::StdoutHuge => {
            let stdout = wasi::cli::stdout::get_stdout();
            format!("wrote {:?}", stdout.write(&vec![b'x'; 256 << 10]).is_ok())
        }
        Mode::Network => {
            use wasi::sockets::network::IpAddressFamily;
            let tcp = wasi::sockets::tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv4);
            let network = wasi::sockets::instance_network::instance_network();
            let lookup = wasi::sockets::ip_name_lookup::resolve_addresses(&network, "localhost");
            format!("tcp {} lookup {}", tcp.is_ok(), lookup.is_ok())
        }
        Mode::ResourceFlood => {
            let mut held = Vec::new();
            loop {
                held.push(monotonic_clock::subscribe_duration(1));
                std::hint::black_box(&held);
            }
        }
        Mode::Slow => {
            let mut x = step;
            for _ in 0..SPIN.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            format!("spun {}", x % 10)
        }
    }
}

struct Stall;

impl Guest for Stall {
    fn configure(params: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in params {
            match key.as_str() {
                "mode" => {
                    let (index, _) = MODES
                        .iter()
                        .enumerate()
                        .find(|(_, (name, _))| *name == value)
                        .ok_or_else(|| format!("unknown mode `{value}`"))?;
                    MODE.store(index as u32, Ordering::Relaxed);
                }
                "after" => AFTER.store(number(&key, &value)?, Ordering::Relaxed),
                "spin" => SPIN.store(number(&key, &value)?, Ordering::Relaxed),
                // A 256 KiB error with terminal escapes and a forged log line: the host must
                // print it bounded and escaped.
                "fail" => {
                    let forged = "\n2026-12-06T00:00:00.000000Z ERROR stepscope: forged line\x1b[2J\x1b[31m";
                    return Err(format!("{value}{}", forged.repeat(256 * 1024 / forged.len() + 1)));
                }
                // Blocks inside configure: the host must refuse the policy at start-up.
                "block-in-configure" => {
                    monotonic_clock::subscribe_duration(1_000_000_000).block();
                }
                // The host passes the step-tracing rates; this policy samples everything.
                "sample_rate" | "rich_subsample_rate" => {}
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        Ok(())
    }

    fn decide(summary: StepSummary) -> StepDecision {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed);
        let probe = if calls < AFTER.load(Ordering::Relaxed) {
            "ok".to_string()
        } else {
            misbehave(mode(), summary.step_id)
        };
        StepDecision {
            emit_batch: true,
            emit_rich: true,
            batch_probability: 1.0,
            rich_probability: 1.0,
            extra: vec![ExtraAttribute {
                key: "probe".into(),
                value: probe.chars().take(100).collect(),
            }],
        }
    }

    fn plan_rich(_summary: StepSummary, requests: RequestViews) -> RichPlan {
        RichPlan {
            requests: (0..requests.request_id.len() as u32).collect(),
            attributes: SnapshotAttributes::all(),
            extra: Vec::new(),
        }
    }
}

export!(Stall);
