//! What one request's whole path through the server costs, for `bench tracing` to set the cost
//! of an untraced request's journey decision against.
//!
//! [`request_path_ns`] serves `builtin:tiny` on a loopback port through the real server (the
//! HTTP/1 accept loop, the body limit, the axum routes, the OpenAI pipeline, tokenization, the
//! engine thread, detokenization and the JSON answer) and times `requests` sequential
//! `POST /v1/completions` with `max_tokens: 1` over one keep-alive connection from a plain TCP
//! client: the mean wall time of a request, first byte sent to last byte received. Journey
//! tracing is off, so the figure is the path an untraced request takes whatever the decision.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::engine::{EngineConfig, NoopStepObserver};
use crate::launch::{LaunchConfig, launch};
use crate::server::metrics::{MetricsIdentity, ServerMetrics, TracingInfo};
use crate::server::state::AppState;
use crate::server::{http, routes};
use crate::step_tracing::{StepTracer, StepTracingConfig};

/// Requests sent before timing starts (connection set-up, allocator, caches).
const WARM_UP: usize = 20;

/// The mean wall time of one request through the server, in ns (see the module doc).
pub fn request_path_ns(requests: usize) -> anyhow::Result<f64> {
    let config = LaunchConfig::cpu(EngineConfig::default())?;
    let launched = launch("builtin:tiny", config, Box::new(NoopStepObserver))?;
    let (_, tracer) = StepTracer::start(StepTracingConfig::default())?;
    let metrics = Arc::new(ServerMetrics::new(
        launched.engine.clone(),
        tracer.metrics_handle(),
        TracingInfo { switch: None },
        MetricsIdentity::for_model(&launched.model.name, &launched.engine),
    ));
    let state = AppState::new(
        launched.engine.clone(),
        launched.model.clone(),
        Vec::new(),
        "builtin:tiny",
        metrics,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(http::serve(
        listener,
        routes::router(state),
        Duration::from_secs(30),
        1 << 20,
        async {
            let _ = stopped.await;
        },
    ));
    let timed = time_requests(address, requests);
    let _ = stop.send(());
    let _ = runtime.block_on(server);
    launched.engine.shutdown()?;
    timed
}

fn time_requests(address: std::net::SocketAddr, requests: usize) -> anyhow::Result<f64> {
    let body = r#"{"prompt":"hello","max_tokens":1}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let stream = TcpStream::connect(address)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut one = |reader: &mut BufReader<TcpStream>| -> anyhow::Result<()> {
        writer.write_all(request.as_bytes())?;
        read_response(reader)
    };
    for _ in 0..WARM_UP {
        one(&mut reader)?;
    }
    let requests = requests.max(1);
    let started = Instant::now();
    for _ in 0..requests {
        one(&mut reader)?;
    }
    Ok(started.elapsed().as_nanos() as f64 / requests as f64)
}

/// Reads one HTTP/1.1 response with a `Content-Length` body; anything but a 200 is an error.
fn read_response(reader: &mut BufReader<TcpStream>) -> anyhow::Result<()> {
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("the server answered {}", status.trim());
    }
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("the connection closed inside the headers");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = Some(value.trim().parse::<usize>()?);
        }
    }
    let Some(length) = length else {
        bail!("no Content-Length in the answer");
    };
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_server_path_bench_serves_requests_end_to_end() {
        let ns = super::request_path_ns(5).expect("bench");
        assert!(ns > 0.0);
    }
}
