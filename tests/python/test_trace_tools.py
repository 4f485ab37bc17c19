"""`stepscope trace summary | report | perfetto` on traces of real runs (issue 16).

- Estimator: `serve` on `builtin:tiny` records every step (`--record-steps`, the ground truth)
  and, in the same run, samples steps at 0.05 (rich 0.2) into `--step-tracing-file`, while the
  openai SDK drives traffic that preempts. `trace summary --json` on the sampled file must put
  the true preemption count, mean batch size and mean KV usage inside its 95% intervals; over
  20 engine seeds, each must be covered at least 16 times. The same again with the `pressure`
  policy, whose probabilities vary (1 on pressure steps, the base rate otherwise).
- Report: Debian's chromium opens the HTML headless with the network off, driven over the
  DevTools protocol: no console error or exception, every chart's SVG has real content, and the
  screenshot is not blank (kept as target/trace-report.png; docs/trace-report.png is one).
- Perfetto: the JSON has the trace event format's required fields and phases, timestamps that
  never go back on a track, and a slice per traced step. No real consumer runs here: Perfetto's
  Python `trace_processor` downloads its binary at run time, and this machine is offline.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import math
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import pytest

from conftest import BINARY, ROOT, Server

SEEDS = range(20)
REQUESTS = 128
OUTPUT_TOKENS = 200


def pressure_component() -> Path:
    built = sorted((ROOT / "target" / "release" / "build").glob("stepscope-*/out/components/pressure.wasm"),
                   key=lambda p: p.stat().st_mtime)
    if not built:
        pytest.fail("no built pressure.wasm under target/release/build (cargo build --release builds it)")
    return built[-1]


def traced_run(workdir: Path, seed: int, *policy: str) -> tuple[Path, Path]:
    """One run: every step recorded, and sampled at 0.05 / 0.2, under preempting traffic."""
    sampled, everything = workdir / f"sampled-{seed}.jsonl", workdir / f"all-{seed}.jsonl"
    server = Server("builtin:tiny", "--served-model-name", "tiny", "--seed", str(seed),
                    "--num-kv-blocks", "24", "--block-size", "16", "--max-num-seqs", "8",
                    "--max-num-batched-tokens", "256", "--step-tracing-enabled",
                    "--step-tracing-sample-rate", "0.05", "--step-tracing-rich-subsample-rate", "0.2",
                    "--step-tracing-file", str(sampled), "--record-steps", str(everything), *policy)
    try:
        client = server.client(max_retries=0, timeout=120)

        def one(i: int):
            client.completions.create(model="tiny", prompt=f"request {i} " + "lorem ipsum " * (i % 6),
                                      max_tokens=OUTPUT_TOKENS, temperature=0, extra_body={"ignore_eos": True})

        with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(one, range(REQUESTS)))
    finally:
        server.stop()
    return sampled, everything


def truth(everything: Path) -> dict:
    steps = [json.loads(line) for line in everything.read_text().splitlines()
             if line.strip() and json.loads(line).get("name") == "scheduler.step"]
    batch = [next(e for e in s["events"] if e["name"] == "step.BATCH_SUMMARY")["attributes"] for s in steps]
    assert all(s["sampling.batch_probability"] == 1.0 for s in steps)
    n = len(batch)
    return {
        "steps": n,
        "preemptions": sum(b["batch.num_preempted"] for b in batch),
        "batch_size": sum(b["batch.num_prefill_reqs"] + b["batch.num_decode_reqs"] for b in batch) / n,
        "kv_usage": sum(b["kv.usage_gpu_ratio"] for b in batch) / n,
    }


def summary(path: Path) -> dict:
    out = subprocess.run([str(BINARY), "trace", "summary", str(path), "--json"], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout)


def quantity(s: dict, name: str) -> dict:
    return next(q for q in s["quantities"] if q["name"] == name)


def covers(estimate: dict, value: float) -> bool:
    return estimate["ci95_low"] <= value <= estimate["ci95_high"]


def coverage(policy: tuple[str, ...]) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="stepscope-trace-"))
    covered = {"preemptions": 0, "batch_size": 0, "kv_usage": 0}
    try:
        for seed in SEEDS:
            sampled, everything = traced_run(workdir, seed, *policy)
            true = truth(everything)
            assert true["steps"] >= 1500 and true["preemptions"] >= 60, true
            census = summary(everything)
            # The census is exact: the same numbers, zero-width intervals.
            assert census["census"] and census["steps_traced"] == true["steps"]
            assert abs(quantity(census, "kv_usage")["mean"]["value"] - true["kv_usage"]) < 1e-9
            s = summary(sampled)
            assert not s["census"] and 0 < s["steps_traced"] < true["steps"]
            covered["preemptions"] += covers(quantity(s, "preemptions_per_step")["total"], true["preemptions"])
            covered["batch_size"] += covers(quantity(s, "batch_size")["mean"], true["batch_size"])
            covered["kv_usage"] += covers(quantity(s, "kv_usage")["mean"], true["kv_usage"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return covered


def test_sampled_estimates_cover_the_recorded_truth_over_20_seeds():
    covered = coverage(())
    print("default policy, intervals covering the truth in 20 runs:", covered)
    assert all(c >= 16 for c in covered.values()), covered


def test_pressure_policy_probabilities_are_reweighted_too():
    policy = ("--step-tracing-policy", str(pressure_component()),
              "--step-tracing-policy-arg", "sample_rate=0.05", "--step-tracing-policy-arg", "rich_subsample_rate=0.2",
              "--step-tracing-policy-arg", "kv_usage_threshold=0.97")
    covered = coverage(policy)
    print("pressure policy, intervals covering the truth in 20 runs:", covered)
    assert all(c >= 16 for c in covered.values()), covered


@pytest.fixture(scope="module")
def one_trace():
    workdir = Path(tempfile.mkdtemp(prefix="stepscope-trace-one-"))
    sampled, everything = traced_run(workdir, 101)
    yield sampled, everything
    shutil.rmtree(workdir, ignore_errors=True)


def test_summary_prints_the_report_a_person_reads(one_trace):
    sampled, _ = one_trace
    out = subprocess.run([str(BINARY), "trace", "summary", str(sampled)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for needle in ("steps traced", "probability 0.05", "batch_size", "kv_usage", "preemptions_per_step",
                   "step_duration", "slowest steps", "traced steps that preempted", "Horvitz-Thompson"):
        assert needle in out, (needle, out)
    bad = subprocess.run([str(BINARY), "trace", "summary", str(ROOT / "Cargo.toml")], capture_output=True, text=True)
    assert bad.returncode != 0 and "line 1" in bad.stderr


def test_perfetto_export_is_valid_trace_event_json(one_trace, tmp_path):
    sampled, _ = one_trace
    out = tmp_path / "trace.json"
    subprocess.run([str(BINARY), "trace", "perfetto", str(sampled), "-o", str(out)], check=True, timeout=60)
    doc = json.loads(out.read_text())
    events = doc["traceEvents"]
    steps = [json.loads(line) for line in sampled.read_text().splitlines()
             if line.strip() and json.loads(line).get("name") == "scheduler.step"]
    required = {"X": {"name", "ph", "ts", "dur", "pid", "tid"}, "i": {"name", "ph", "ts", "pid", "tid", "s"},
                "C": {"name", "ph", "ts", "pid", "args"}, "M": {"name", "ph", "pid", "args"}}
    last_ts: dict = {}
    for e in events:
        assert e["ph"] in required, e
        assert required[e["ph"]] <= e.keys(), e
        if e["ph"] == "M":
            continue
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        track = (e["pid"], e.get("tid"), e["name"] if e["ph"] == "C" else None)
        assert e["ts"] >= last_ts.get(track, 0), ("time went back on", track)
        last_ts[track] = e["ts"]
        if e["ph"] == "X":
            assert e["dur"] >= 0
    slices = [e for e in events if e["ph"] == "X" and e.get("cat") == "step"]
    assert len(slices) == len(steps)
    assert sum(e["ph"] == "i" for e in events) == len(steps)
    rich = {s["events"][i]["attributes"]["request.id"] for s in steps for i in range(1, len(s["events"]))}
    tracks = [e for e in events if e["name"] == "thread_name" and e["args"]["name"].startswith("request ")]
    assert len(tracks) == len(rich) > 0


# ---- the HTML report in a real browser -------------------------------------------------------

def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        message = "chromium is not installed (./scripts/setup-test-env.sh installs Debian's chromium)"
        if os.environ.get("STEPSCOPE_REQUIRE_CHROMIUM") is not None:
            pytest.fail(message)
        pytest.skip(message)
    return found


class DevTools:
    """A headless chromium on a page, driven over the DevTools protocol."""

    def __init__(self, binary: str, profile: Path):
        import websocket  # websocket-client, installed by setup-test-env.sh

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1100,1400",
             "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        import urllib.request

        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if e.get("method") == method:
                    return e
            self.events.append(json.loads(self.ws.recv()))
        raise AssertionError(f"no {method}")

    def close(self):
        self.ws.close()
        self.proc.kill()
        self.proc.wait(timeout=30)


def png_is_not_blank(png: bytes) -> bool:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, data = 8, b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            data += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    pixels = zlib.decompress(data)
    return len(set(pixels)) > 32


def test_report_opens_offline_in_chromium_with_charts(one_trace, tmp_path):
    binary = chromium()
    sampled, _ = one_trace
    report = tmp_path / "report.html"
    subprocess.run([str(BINARY), "trace", "report", str(sampled), "-o", str(report)], check=True, timeout=60)
    html = report.read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    browser = DevTools(binary, tmp_path / "profile")
    try:
        browser.call("Runtime.enable")
        browser.call("Log.enable")
        browser.call("Network.enable")
        browser.call("Network.emulateNetworkConditions", offline=True, latency=0, downloadThroughput=-1,
                     uploadThroughput=-1)
        browser.call("Page.enable")
        browser.call("Page.navigate", url=report.as_uri())
        browser.wait_for("Page.loadEventFired")
        counts = browser.call("Runtime.evaluate", returnByValue=True, expression="""
            Array.from(document.querySelectorAll('section.chart svg')).map(svg => ({
              shapes: svg.querySelectorAll('path, polyline, polygon, rect, circle, line').length,
              texts: svg.querySelectorAll('text').length,
              width: svg.getBoundingClientRect().width}))""")["result"]["value"]
        assert len(counts) == 5, counts
        rows = browser.call("Runtime.evaluate", returnByValue=True,
                            expression="document.querySelectorAll('section.chart table tr').length")
        assert rows["result"]["value"] > 1, "no per-request table under the swimlanes"
        for chart in counts:
            assert chart["shapes"] >= 10 and chart["texts"] >= 4 and chart["width"] > 300, counts
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        png = base64.b64decode(shot["data"])
        assert png_is_not_blank(png)
        errors = [e for e in browser.events
                  if e.get("method") in ("Runtime.exceptionThrown",)
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        assert not errors, errors
        requests = [e for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
        assert [r["params"]["request"]["url"] for r in requests] == [report.as_uri()], requests
        # The README's picture comes from here (target/ is not committed).
        (ROOT / "target").mkdir(exist_ok=True)
        (ROOT / "target" / "trace-report.png").write_bytes(png)
    finally:
        browser.close()


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_summary_estimates_requests_from_their_journeys(tmp_path, rate):
    """`serve` with journey tracing: `trace summary` counts the `llm_request` spans it finds and
    re-weights them by `sampling.journey_probability`. Traced at 1.0 the numbers are exact: every
    request, its token counts as the API returned them, its latencies as the spans carry them
    (mean and max). At 0.5 the request count is the Horvitz-Thompson 2 × traced, and no traced
    failure still leaves room for up to ln 0.05 / ln 0.5 unseen ones."""
    path = tmp_path / f"journeys-{rate}.jsonl"
    server = Server("builtin:tiny", "--served-model-name", "tiny", "--step-tracing-enabled",
                    "--step-tracing-sample-rate", "1.0", "--step-tracing-file", str(path),
                    "--enable-journey-tracing", "--journey-tracing-sample-rate", str(rate))
    usages = []
    try:
        client = server.client(max_retries=0, timeout=120)
        for i in range(24):
            c = client.completions.create(model="tiny", prompt=f"journey {i} " + "x " * (i % 5), max_tokens=2 + i % 7,
                                          temperature=0, extra_body={"ignore_eos": True})
            usages.append((c.usage.prompt_tokens, c.usage.completion_tokens))
    finally:
        server.stop()
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    spans = [line for line in lines if line["name"] == "llm_request"]
    s = summary(path)["requests"]
    assert s["traced"] == len(spans)
    e2e = quantity(s, "e2e_latency")
    if rate == 1.0:
        assert s["census"] and len(spans) == 24 and s["estimated"]["value"] == 24
        assert quantity(s, "output_tokens")["total"]["value"] == sum(u[1] for u in usages)
        assert quantity(s, "input_tokens")["total"]["value"] == sum(u[0] for u in usages)
        latencies = [line["gen_ai.latency.e2e"] for line in spans]
        assert abs(e2e["mean"]["value"] - sum(latencies) / 24) < 1e-9
        assert math.isclose(e2e["percentiles"][3], max(latencies), rel_tol=1e-12)
        ttft = quantity(s, "time_to_first_token")
        assert ttft["percentiles"][3] <= e2e["percentiles"][3]
        assert s["failed"]["value"] == 0
        # The HTML report carries the same table.
        html = tmp_path / "report.html"
        subprocess.run([str(BINARY), "trace", "report", str(path), "-o", str(html)], check=True, timeout=120)
        page = html.read_text()
        assert "<th>per request</th>" in page and "24 request journeys traced" in page
        assert "time_to_first_token (s)" in page
    else:
        assert not s["census"] and 0 < len(spans) < 24
        # None failed: zero, with the rule-of-three upper bound ln 0.05 / ln 0.5 (not [0, 0]).
        assert s["failed"]["value"] == 0 and math.isclose(s["failed"]["ci95_high"], math.log(0.05) / math.log(0.5))
        assert s["estimated"]["value"] == 2 * len(spans)
        assert s["estimated"]["ci95_low"] < s["estimated"]["value"] < s["estimated"]["ci95_high"]
