"""Step traces reach a collector over TLS (`https://` endpoints), with mutual TLS.

oteltest's `otelsink` receivers (gRPC and HTTP/protobuf) listen in plain text behind a TLS
terminator written here with Python's `ssl` module: it presents a server certificate issued by a
throwaway CA (`trustme`), requires a client certificate from the same CA, offers ALPN `h2` and
`http/1.1`, and forwards the decrypted bytes to the sink. `stepscope generate` exports to
`https://localhost:PORT` with `OTEL_EXPORTER_OTLP_CERTIFICATE` (the CA), and
`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` / `_CLIENT_KEY`: the spans must arrive. Without the CA
the server's certificate is not trusted (the built-in roots are Mozilla's), and without a client
certificate the terminator refuses the handshake: no span arrives, the failure is logged, and
generation is unaffected.
"""

import asyncio
import logging
import os
import ssl
import subprocess
import threading

import pytest
import trustme
from oteltest.sink import GrpcSink, HttpSink

from conftest import BINARY, ROOT, free_port
from test_otelsink import Collect, spans_of


class TlsTerminator:
    """Accepts TLS on `port` and pipes each connection to `127.0.0.1:target_port`."""

    def __init__(self, context: ssl.SSLContext, target_port: int):
        self.context = context
        self.target_port = target_port
        self.port = free_port()
        self.connections = 0  # completed handshakes
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10), "TLS terminator did not start"
        return self

    def __exit__(self, *exc):
        async def stop():
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), self.loop)
        self.thread.join(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.context))
        self.ready.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()

    async def _handle(self, client_reader, client_writer):
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))


def export(protocol: str, port: int, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BINARY), "generate", "builtin:tiny", "--prompt", "tls please", "--max-tokens", "8",
         "--ignore-eos", "--json", "--step-tracing-enabled", "--step-tracing-sample-rate", "1",
         "--otlp-traces-endpoint", f"https://localhost:{port}", "--otlp-protocol", protocol],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **env},
    )


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_traces_reach_a_tls_collector_with_client_certificates(tmp_path, protocol):
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost")
    client_cert = ca.issue_cert("stepscope-client")
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    client_pem = tmp_path / "client.pem"
    client_cert.cert_chain_pems[0].write_to_path(str(client_pem))
    client_key = tmp_path / "client.key"
    client_cert.private_key_pem.write_to_path(str(client_key))

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2", "http/1.1"])

    handler = Collect()
    sink_port = free_port()
    logger = logging.getLogger("otelsink")
    sink = GrpcSink(handler, logger, port=sink_port) if protocol == "grpc" else HttpSink(
        handler, logger, port=sink_port)
    sink.start()
    mutual = {
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca_pem),
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(client_pem),
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(client_key),
    }
    try:
        with TlsTerminator(context, sink_port) as terminator:
            # The built-in roots do not trust the throwaway CA.
            untrusted = export(protocol, terminator.port, {})
            assert untrusted.returncode == 0, untrusted.stderr
            assert "export failed" in untrusted.stderr, untrusted.stderr
            # The warning names the cause, for HTTP too (whose exporter says only "network error").
            assert "UnknownIssuer" in untrusted.stderr, untrusted.stderr
            assert not handler.requests

            # Trusted, but no client certificate: the terminator refuses the handshake.
            anonymous = export(protocol, terminator.port, {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca_pem)})
            assert anonymous.returncode == 0, anonymous.stderr
            assert "export failed" in anonymous.stderr, anonymous.stderr
            assert not handler.requests

            trusted = export(protocol, terminator.port, mutual)
            assert trusted.returncode == 0, trusted.stderr
            assert "export failed" not in trusted.stderr, trusted.stderr
            assert terminator.connections >= 1
    finally:
        sink.stop()
    spans = spans_of(handler.requests)
    assert spans, f"no span reached the {protocol} sink through TLS"
    events = {event.name for _, span in spans for event in span.events}
    assert "step.BATCH_SUMMARY" in events


def test_bad_tls_files_refuse_the_start(tmp_path):
    missing = tmp_path / "missing.pem"
    out = export("grpc", 9, {"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(missing)})
    assert out.returncode != 0
    assert "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE=" in out.stderr and "cannot read" in out.stderr, out.stderr
    key_only = tmp_path / "key.pem"
    key_only.write_text("not a key\n")
    out = export("http", 9, {"OTEL_EXPORTER_OTLP_CLIENT_KEY": str(key_only)})
    assert out.returncode != 0
    assert "not its pair" in out.stderr, out.stderr
