"""No policy can stall the engine: the `stall` test policy (policies/testing/stall) in `serve`.

For every way the sandbox's WASI could wait or burn time (a clock deadline with `block`, a
`poll` that never becomes ready, CPU spent in random-byte or stdout host calls, hoarding
pollables, oversized random requests) and for a legal but slow policy, `stepscope serve
builtin:tiny` runs with that policy at batch rate 1 under 16 concurrent streams of the official
`openai` SDK. Checked, per mode:

- every request is answered with the same greedy text as under the built-in default policy;
- `/metrics` counts the fault by kind (`blocked`, `timeout`, `host_limit`), or, for the slow
  policy, the degradation to the built-in default;
- SIGTERM ends the process within `--shutdown-timeout` plus a few seconds.

`policy check` gives each mode a verdict within its time limit, and a policy that behaves for
longer than the pre-swap check and then blocks is swapped in under load: serving goes on.
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import BINARY, ROOT, Server, free_port
from test_policy_swap import Load, component_dir_for, info_digest

PROMPTS = [f"request {i}: the quick brown fox jumps over the lazy dog" for i in range(16)]
SHUTDOWN_TIMEOUT = 3
# Modes of the stall policy and what /metrics must show for each.
MODES = {
    "sleep": ("faults", "blocked"),
    "sleep-forever": ("faults", "blocked"),
    "poll": ("faults", "blocked"),
    "random-loop": ("faults", "timeout"),
    "stdout-loop": ("faults", "timeout"),
    "random-huge": ("faults", "host_limit"),
    "resource-flood": ("faults", "host_limit"),
    "stdout-huge": ("faults", "host_limit"),
    "slow": ("degraded", None),
}


def completions(server: Server) -> list[str]:
    """16 concurrent greedy completions; their texts in prompt order."""
    client = server.client(max_retries=0, timeout=120)

    def one(prompt: str) -> str:
        response = client.completions.create(
            model="builtin:tiny", prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        assert response.choices[0].finish_reason == "length"
        return response.choices[0].text

    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


@pytest.fixture(scope="module")
def reference():
    """The greedy texts under the built-in default policy, and the components directory."""
    server = Server("builtin:tiny", "--step-tracing-enabled", "--step-tracing-sample-rate", "1")
    try:
        digest = info_digest(server)
        texts = completions(server)
    finally:
        server.stop()
    return texts, component_dir_for(digest)


def fault_count(samples: dict[str, float], kind: str) -> float:
    return samples.get(f'stepscope_policy_faults_total{{kind="{kind}"}}', 0.0)


@pytest.mark.parametrize("mode", list(MODES))
def test_serving_goes_on_with_the_same_text_and_the_fault_is_counted(reference, mode):
    texts, components = reference
    what, kind = MODES[mode]
    args = ["--step-tracing-policy-arg", f"mode={mode}"]
    if mode == "slow":
        args += ["--step-tracing-policy-arg", "spin=800000"]
    server = Server(
        "builtin:tiny",
        "--step-tracing-enabled",
        "--step-tracing-sample-rate", "1",
        "--step-tracing-policy", str(components / "stall.wasm"),
        *args,
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
    )
    try:
        assert completions(server) == texts, server.log_text()
        samples = server.metrics()
        if what == "faults":
            assert fault_count(samples, kind) >= 1, samples
            others = [k for k in ("trap", "memory", "malformed", "instantiate") if fault_count(samples, k)]
            assert not others, samples
        else:
            assert samples["stepscope_policy_degradations_total"] >= 1, samples
            assert samples["stepscope_policy_fallback_steps_total"] >= 1, samples
            assert samples["stepscope_policy_degraded"] == 1, samples
            assert "over its step budget" in server.log_text()
        # Health still answers, and SIGTERM ends the process in bounded time.
        assert requests.get(server.base_url + "/health", timeout=10).status_code == 200
        started = time.monotonic()
        assert server.terminate(timeout=SHUTDOWN_TIMEOUT + 30) == 0, server.log_text()
        assert time.monotonic() - started < SHUTDOWN_TIMEOUT + 10, server.log_text()
        assert "panicked" not in server.log_text()
    finally:
        server.stop()


def policy_check(component, *args: str, time_limit: int = 20) -> tuple[int, str, float]:
    started = time.monotonic()
    out = subprocess.run(
        [str(BINARY), "policy", "check", str(component), "--steps", "2000", "--time-limit-s", str(time_limit), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    return out.returncode, out.stdout + out.stderr, time.monotonic() - started


@pytest.mark.parametrize("mode", [m for m in MODES if m != "slow"])
def test_policy_check_gives_a_verdict_for_each_stalling_mode(reference, mode):
    _, components = reference
    code, output, elapsed = policy_check(components / "stall.wasm", "--arg", f"mode={mode}")
    assert code == 1, output
    assert "verdict: FAIL" in output, output
    assert f": {MODES[mode][1]} (" in output, output  # the fault kind, with its explanation
    assert elapsed < 60, f"{elapsed:.1f} s"


def test_policy_check_warns_about_a_slow_policy_and_stops_at_its_time_limit(reference):
    _, components = reference
    code, output, _ = policy_check(components / "stall.wasm", "--arg", "mode=slow", "--arg", "spin=400000")
    assert "[warn] step budget" in output, output
    # ~30 ms per call against a 2 s limit: the check stops early and says why.
    code, output, elapsed = policy_check(
        components / "stall.wasm", "--arg", "mode=slow", "--arg", "spin=20000000",
        "--deadline-ms", "1000", "--fuel", "0", time_limit=2,
    )
    assert code == 1, output
    assert "[FAIL] time limit" in output and "ran past its 2 s limit" in output, output
    assert elapsed < 60, f"{elapsed:.1f} s"


def test_a_policy_that_blocks_after_the_pre_swap_check_is_contained_under_load(reference):
    """Good for 2,500 calls per instance (more than the 2,000-step pre-swap check), then it
    blocks; swapped in through the admin API under load, it faults as `blocked`, is
    re-instantiated after back-off, and every request still completes."""
    _, components = reference
    admin_port = free_port()
    server = Server(
        "builtin:tiny",
        "--admin-port", str(admin_port),
        "--step-tracing-enabled",
        "--step-tracing-sample-rate", "1",
        "--step-tracing-rich-subsample-rate", "0",
    )
    admin = f"http://127.0.0.1:{admin_port}/admin/policy"
    stall = (components / "stall.wasm").read_bytes()
    try:
        with Load(server, threads=8) as load:
            swapped = requests.post(
                admin, params={"name": "stall", "arg": ["mode=sleep-forever", "after=2500"]}, data=stall, timeout=120
            )
            assert swapped.status_code == 200, swapped.text
            assert swapped.json()["digest"] == "sha256:" + hashlib.sha256(stall).hexdigest()
            samples = server.wait_metrics(lambda s: fault_count(s, "blocked") >= 2, timeout=120)
            done = load.count()
            deadline = time.monotonic() + 60
            while load.count() < done + 16:
                assert time.monotonic() < deadline, "serving stopped after the policy blocked"
                assert not load.errors, load.errors
                time.sleep(0.05)
        assert not load.errors, load.errors
        assert samples["stepscope_policy_instantiations_total"] >= 3, samples
        # A hostile configure error comes back as a bounded, escaped 400.
        refused = requests.post(admin, params={"name": "evil", "arg": "fail=zz-marker:"}, data=stall, timeout=120)
        assert refused.status_code == 400, refused.text[:2000]
        message = refused.json()["error"]["message"]
        assert "zz-marker:\\n2026-12-06" in message and "more bytes cut]" in message, message
        assert len(message) < 2048 and "\x1b" not in message and "\n" not in message, message
        # A later, valid swap is not held up by the ones before.
        default = (components / "default.wasm").read_bytes()
        back = requests.post(admin, params={"name": "default"}, data=default, timeout=120)
        assert back.status_code == 200, back.text
        assert server.terminate(timeout=60) == 0
        assert "panicked" not in server.log_text()
    finally:
        server.stop()


def test_a_hostile_configure_error_is_printed_once_bounded_and_escaped(reference):
    _, components = reference
    out = subprocess.run(
        [str(BINARY), "serve", "builtin:tiny", "--port", str(free_port()), "--step-tracing-enabled",
         "--step-tracing-policy", str(components / "stall.wasm"), "--step-tracing-policy-arg", "fail=zz-marker:"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "\x1b" not in text and "\r" not in text, repr(text[:2000])
    assert text.count("zz-marker:") == 1, text
    assert "forged line" in text and "more bytes cut]" in text, text
    assert len(text) < 4096, len(text)
    assert not any(line.startswith("2026-12-06T00:00:00.000000Z ERROR") for line in text.splitlines()), text
