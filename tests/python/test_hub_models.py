"""`serve org/name`: models by Hugging Face id, offline first (issue 15 §3).

- A fixture laid out as a real Hugging Face hub cache (`models--org--name/{blobs,snapshots,refs}`,
  snapshot files as relative symlinks into `blobs/`) holding SmolLM2-135M-Instruct is found
  through `HF_HOME` with `HF_HUB_OFFLINE=1`, by `refs/main` and by `--revision <commit>`; the
  model is reported under its id.
- Offline, a missing model is a one-line error naming the cache path that was tried.
- Online, a missing model is downloaded by the `hf-hub` crate into the cache, then served
  offline from it. The real hub cannot be reached from here, so `HF_ENDPOINT` points at a local
  server speaking the hub's download protocol (the metadata API and `resolve/` URLs with the
  `x-repo-commit`, `etag` and `content-range` headers the crate reads).
- A hub that stops sending mid-file is given up after `HF_HUB_DOWNLOAD_TIMEOUT` with an error
  naming it, and the next run resumes the partial file from where it stopped.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import BINARY, ROOT, Server, free_port

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMMIT = "12fd25f77366fa6b3b4b768ec3050bf629380bac"
FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"]


@pytest.fixture()
def scratch():
    # Under target/, on the same file system as .cache/, so blobs can be hard links.
    (ROOT / "target").mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="hub-test-", dir=ROOT / "target"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def link_or_copy(source: Path, target: Path):
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def hub_cache(model_dir: Path, home: Path) -> Path:
    """`home/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct` as huggingface_hub lays it out."""
    repo = home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in FILES:
        blob = hashlib.sha256(name.encode() + str((model_dir / name).stat().st_size).encode()).hexdigest()
        link_or_copy(model_dir / name, repo / "blobs" / blob)
        (snapshot / name).symlink_to(Path("../../blobs") / blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo


def serve_and_ask(model: str, env: dict, *args: str) -> str:
    server = Server(model, *args, env=env, startup_timeout=180)
    try:
        client = server.client()
        [listed] = client.models.list().data
        done = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
        assert done.usage.completion_tokens == 4
        return listed.id
    finally:
        server.stop()


def test_a_hub_id_is_served_from_the_cache_offline_by_ref_and_by_commit(smollm_dir, scratch):
    repo = hub_cache(smollm_dir, scratch)
    assert (repo / "snapshots" / COMMIT / "model.safetensors").is_symlink()
    env = {"HF_HOME": str(scratch), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": ""}
    assert serve_and_ask(HUB_ID, env) == HUB_ID
    assert serve_and_ask(HUB_ID, env, "--revision", COMMIT) == HUB_ID
    # HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub.
    moved = scratch / "elsewhere"
    shutil.move(str(scratch / "hub"), moved)
    assert serve_and_ask(HUB_ID, {"HF_HUB_CACHE": str(moved), "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent"}) == HUB_ID


def fails_to_start(model: str, env: dict, *args: str) -> str:
    out = subprocess.run([str(BINARY), "serve", model, "--port", str(free_port()), *args],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **env})
    assert out.returncode != 0, out.stderr
    return out.stderr


def test_a_missing_model_offline_is_one_line_naming_the_cache_path(scratch):
    tried = scratch / "hub" / "models--org--absent" / "snapshots"
    stderr = fails_to_start("org/absent", {"HF_HOME": str(scratch), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": ""})
    errors = [line for line in stderr.splitlines() if str(tried) in line]
    assert len(errors) == 1 and "HF_HUB_OFFLINE" in errors[0], stderr
    # A branch the cache has no ref for is missing too.
    stderr = fails_to_start("org/absent", {"HF_HOME": str(scratch), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": ""},
                            "--revision", "v9")
    assert "revision v9" in stderr and str(tried) in stderr, stderr
    # --revision means nothing for a model that is not a hub id: refused, not ignored.
    stderr = fails_to_start("builtin:tiny", {}, "--revision", "main")
    assert "--revision main: a revision applies to a Hugging Face id" in stderr, stderr


class LocalHub(http.server.ThreadingHTTPServer):
    """The hub's download protocol for one repository, served from a model directory."""

    def __init__(self, model_dir: Path, stall_after: int | None = None):
        self.model_dir = model_dir
        self.requests: list[str] = []
        self.ranges: list[str] = []
        # With `stall_after`, a download of model.safetensors from its start sends that many
        # bytes and then nothing, holding the connection until `release` is set.
        self.stall_after = stall_after
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), HubHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        hub: LocalHub = self.server  # type: ignore[assignment]
        hub.requests.append(self.path)
        if self.path == f"/api/models/{HUB_ID}/revision/main":
            body = json.dumps({"sha": COMMIT, "siblings": [{"rfilename": f} for f in FILES + ["README.md"]]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        match = re.fullmatch(rf"/{re.escape(HUB_ID)}/resolve/main/([\w.]+)", self.path)
        if not match or match.group(1) not in FILES:
            self.send_error(404)
            return
        data = (hub.model_dir / match.group(1)).read_bytes()
        start, end = 0, len(data) - 1
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = int(ranged.group(2)) if ranged.group(2) else end
            hub.ranges.append(f"{match.group(1)} {self.headers['range']}")
        chunk = data[start:end + 1]
        self.send_response(206 if ranged else 200)
        self.send_header("etag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("x-repo-commit", COMMIT)
        self.send_header("content-range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("content-length", str(len(chunk)))
        self.end_headers()
        if hub.stall_after is not None and match.group(1) == "model.safetensors" and start == 0 and len(chunk) > 1:
            self.wfile.write(chunk[:hub.stall_after])
            self.wfile.flush()
            hub.release.wait(timeout=300)
            return
        self.wfile.write(chunk)


def test_a_missing_model_is_downloaded_into_the_cache_then_served_offline(smollm_dir, scratch):
    hub = LocalHub(smollm_dir)
    try:
        env = {"HF_HOME": str(scratch), "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": "", "HF_HUB_OFFLINE": "0"}
        assert serve_and_ask(HUB_ID, env) == HUB_ID
        fetched = {p.rsplit("/", 1)[-1] for p in hub.requests if "/resolve/" in p}
        assert fetched == set(FILES), hub.requests
        snapshot = scratch / "hub" / ("models--" + HUB_ID.replace("/", "--")) / "snapshots" / COMMIT
        for name in FILES:
            assert (snapshot / name).is_symlink(), name
            assert (snapshot / name).read_bytes() == (smollm_dir / name).read_bytes(), name
        # Now in the cache: served with the network off, without a request to the hub.
        before = len(hub.requests)
        assert serve_and_ask(HUB_ID, {**env, "HF_HUB_OFFLINE": "1"}) == HUB_ID
        assert len(hub.requests) == before
    finally:
        hub.shutdown()
        hub.server_close()
    # The hub gone and the model not cached: a one-line error naming the cache path.
    stderr = fails_to_start("org/other", {"HF_HOME": str(scratch), "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": ""})
    line = [x for x in stderr.splitlines() if "cannot be reached" in x]
    assert len(line) == 1 and str(scratch / "hub" / "models--org--other" / "snapshots") in line[0], stderr


def test_a_download_that_stalls_is_given_up_by_name_and_resumed_next_time(smollm_dir, scratch):
    size = (smollm_dir / "model.safetensors").stat().st_size
    sent = 3 << 20
    stalling = LocalHub(smollm_dir, stall_after=sent)
    env = {"HF_HOME": str(scratch), "HF_HUB_CACHE": "", "HF_HUB_OFFLINE": "0", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    try:
        stderr = fails_to_start(HUB_ID, {**env, "HF_ENDPOINT": stalling.url})
    finally:
        stalling.release.set()
        stalling.shutdown()
        stalling.server_close()
    line = [x for x in stderr.splitlines() if "nothing arrived from the Hugging Face hub for 2 s" in x]
    assert len(line) == 1 and "HF_HUB_DOWNLOAD_TIMEOUT" in line[0], stderr
    blobs = scratch / "hub" / ("models--" + HUB_ID.replace("/", "--")) / "blobs"
    [part] = [p for p in blobs.iterdir() if p.suffix == ".part"]
    assert part.stat().st_size == sent

    # A hub that answers: the download resumes at the byte where the last one stopped.
    hub = LocalHub(smollm_dir)
    try:
        assert serve_and_ask(HUB_ID, {**env, "HF_ENDPOINT": hub.url}) == HUB_ID
        assert f"model.safetensors bytes={sent}-" in hub.ranges, hub.ranges
    finally:
        hub.shutdown()
        hub.server_close()
    snapshot = blobs.parent / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").stat().st_size == size
    assert (snapshot / "model.safetensors").read_bytes() == (smollm_dir / "model.safetensors").read_bytes()
