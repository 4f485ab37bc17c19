//! `stepscope serve`: the OpenAI-compatible HTTP server (axum on tokio).
//!
//! [`run`] resolves the model (the positional MODEL, else the default SmolLM2 directory), starts
//! the step tracer from the step-tracing flags, launches the engine with the tracer as its step
//! observer, and serves [`routes::router`] through [`http::serve`] (TCP_NODELAY, read timeouts
//! for slow clients, a body size limit; `GET /openapi.json` describes the API). Requests
//! flow one way: handler → [`serving`] (the pipeline both OpenAI endpoints share) →
//! [`generation::Generation`] (a `TextStream` on the engine) → JSON or
//! SSE ([`sse`]). Bad input is a 4xx with an OpenAI error body ([`errors`]); a full waiting queue
//! is a 503. On SIGINT/SIGTERM ([`shutdown`]) the listener closes, in-flight requests finish (or,
//! past `--shutdown-timeout`, are aborted with a `server_shutdown` error), the engine shuts down,
//! the trace exporter flushes, and the process exits 0.

pub mod admin;
pub mod auth;
pub mod body_limit;
pub mod collector;
pub mod errors;
pub mod generation;
pub mod http;
pub mod journey;
pub mod logprobs;
pub mod metrics;
pub mod openai_types;
pub mod openapi;
pub mod params;
pub mod prompts;
pub mod request_stats;
pub mod routes;
pub mod serving;
pub mod shutdown;
pub mod sse;
pub mod state;
pub mod unsupported;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::launch::LaunchConfig;
use crate::step_tracing::StepTracer;
use crate::step_tracing::StepTracingConfig;

use self::collector::CacheSettings;
use self::http::HttpConfig;
use self::metrics::{MetricsIdentity, ServerMetrics, TracingInfo};
use self::state::AppState;

/// Where the default model lives, relative to the current directory.
pub const DEFAULT_MODEL_DIR: &str = ".cache/models/SmolLM2-135M-Instruct";
/// Overrides [`DEFAULT_MODEL_DIR`].
pub const DEFAULT_MODEL_ENV: &str = "STEPSCOPE_DEFAULT_MODEL_DIR";
/// The command that sets the default model up.
pub const SETUP_COMMAND: &str = "./scripts/setup-default-model.sh";

/// The model spec to serve: `model` if given, else the default model directory (which must be
/// set up).
pub fn resolve_model_spec(
    model: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<String> {
    if let Some(model) = model {
        return Ok(model.to_string());
    }
    let dir = env(DEFAULT_MODEL_ENV)
        .filter(|d| !d.trim().is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_MODEL_DIR), PathBuf::from);
    if dir.join("config.json").is_file() {
        return Ok(dir.display().to_string());
    }
    bail!(
        "no MODEL given, and the default model (SmolLM2-135M-Instruct) is not set up at {}: \
         run `{SETUP_COMMAND}` first (or serve the built-in test model: `stepscope serve builtin:tiny`)",
        dir.display()
    )
}

/// Everything `serve` runs with, typed: the CLI turns its flags into this before the library
/// sees them.
pub struct ServeConfig {
    /// The positional MODEL (default: the SmolLM2 directory, see [`resolve_model_spec`]).
    pub model: Option<String>,
    /// `--host`, `--port`.
    pub host: String,
    pub port: u16,
    /// `--served-model-name` (empty: the model's own name).
    pub served_model_name: Vec<String>,
    /// `--api-key` / `VLLM_API_KEY` (empty: no authentication).
    pub api_keys: Vec<String>,
    /// `--admin-host`, `--admin-port` (none: no admin API).
    pub admin_listen: Option<(String, u16)>,
    /// `--step-tracing-policy`, re-read on SIGHUP.
    pub policy_path: Option<PathBuf>,
    /// `--shutdown-timeout` (none: drain without a bound).
    pub shutdown_timeout: Option<Duration>,
    /// `--http-read-timeout`, `--max-request-body-bytes`, `--health-stall-timeout`.
    pub http: http::HttpConfig,
    /// The engine flags with the device resolved.
    pub launch: LaunchConfig,
    /// `--gpu-memory-utilization`, as `vllm:cache_config_info` reports it.
    pub gpu_memory_utilization: f64,
    /// The step-tracing flags with the `OTEL_*` environment.
    pub tracing: StepTracingConfig,
}

/// Runs `stepscope serve` until SIGINT/SIGTERM and a complete drain.
pub fn run(args: ServeConfig) -> anyhow::Result<ExitCode> {
    let spec = resolve_model_spec(args.model.as_deref(), |name| std::env::var(name).ok())?;
    let http_config = args.http;
    match http::raise_open_file_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    let (observer, mut tracer) = StepTracer::start(args.tracing)?;
    let launched = crate::launch::launch(&spec, args.launch, Box::new(observer))?;
    let tracing_info = TracingInfo {
        switch: tracer.policy_switch(),
    };
    let admin = AdminConfig {
        state: admin::AdminState {
            switch: tracer.policy_switch(),
        },
        listen: args.admin_listen,
        policy_path: args.policy_path,
    };
    let identity = MetricsIdentity {
        model_name: args
            .served_model_name
            .first()
            .cloned()
            .unwrap_or_else(|| launched.model.name.clone()),
        max_model_len: launched.engine.max_model_len(),
        cache: CacheSettings {
            gpu_memory_utilization: args.gpu_memory_utilization,
        },
    };
    let metrics = Arc::new(ServerMetrics::new(
        launched.engine.clone(),
        tracer.metrics_handle(),
        tracing_info,
        identity,
    ));
    let mut state = AppState::new(
        launched.engine.clone(),
        launched.model.clone(),
        args.served_model_name,
        &spec,
        metrics,
    );
    state.health_stall_timeout = http_config.health_stall_timeout;
    state.journeys = tracer.journey_sink();
    state.api_keys = auth::ApiKeys::new(&args.api_keys);
    let limits = launched.engine.limits();
    tracing::info!(
        model = %launched.model.name,
        source = %launched.model.source,
        served_as = %state.served_names.join(","),
        device = ?launched.device,
        max_model_len = limits.max_model_len,
        kv_capacity_tokens = limits.kv_capacity_tokens,
        step_tracing = tracer.is_enabled(),
        "model loaded"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("stepscope-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let served = runtime.block_on(serve_http(
        state,
        (&args.host, args.port),
        http_config,
        admin,
        args.shutdown_timeout,
    ));
    // Drain the engine (requests still queued finish) and flush the traces, whatever happened.
    let engine_result = launched.engine.shutdown();
    let traced = tracer.shutdown();
    if tracer.is_enabled() {
        tracing::info!(
            steps_seen = traced.steps_seen,
            batch_sampled = traced.steps_batch_sampled,
            rich_sampled = traced.steps_rich_sampled,
            records_dropped = traced.records_dropped(),
            "step traces flushed"
        );
    }
    served?;
    engine_result.context("shutting the engine down")?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// The admin side of `serve`: the optional admin listener and the SIGHUP reload.
struct AdminConfig {
    state: admin::AdminState,
    /// `(host, port)` of the admin listener; `None`: no admin API.
    listen: Option<(String, u16)>,
    /// `--step-tracing-policy`, re-read on SIGHUP.
    policy_path: Option<PathBuf>,
}

/// How long connections may stay open after the drain deadline aborted their requests (time for
/// the error events to reach the clients) before the server stops waiting for them.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Binds, serves until the first signal, and returns once every connection has closed, or, with
/// a `shutdown_timeout`, once that long has passed since the signal (requests still in flight
/// then are aborted) and connections had [`CLOSE_GRACE`] to close.
async fn serve_http(
    state: AppState,
    (host, port): (&str, u16),
    config: HttpConfig,
    admin: AdminConfig,
    shutdown_timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let drain = shutdown::install().context("installing the SIGINT/SIGTERM handlers")?;
    admin::spawn_sighup_reload(admin.state.switch.clone(), admin.policy_path)
        .context("installing the SIGHUP handler")?;
    let admin_task = match admin.listen {
        Some((admin_host, admin_port)) => {
            // Bound before the API, so a bad admin address fails the start-up.
            let listener = admin::bind(&admin_host, admin_port).await?;
            let drained = drain.clone().wait();
            Some(tokio::spawn(admin::serve(
                listener,
                admin.state,
                config.read_timeout,
                drained,
            )))
        }
        None => None,
    };
    let listener = http::bind(host, port).await?;
    let address = listener
        .local_addr()
        .context("reading the listening address")?;
    tracing::info!("listening on http://{address}");
    let engine = state.engine.clone();
    let serving = http::serve(
        listener,
        routes::router(state),
        config.read_timeout,
        config.max_body_bytes,
        drain.clone().wait(),
    );
    let deadline = drain_deadline(drain, shutdown_timeout, engine);
    let closed = tokio::select! {
        served = serving => {
            served.context("serving HTTP")?;
            true
        }
        () = deadline => false,
    };
    if let Some(task) = admin_task {
        if closed {
            task.await.context("admin API task")??;
        } else {
            task.abort();
        }
    }
    if closed {
        tracing::info!("all connections closed");
    } else {
        tracing::warn!(
            "connections still open {CLOSE_GRACE:?} after the drain deadline: closing them"
        );
    }
    Ok(())
}

/// Resolves `CLOSE_GRACE` after the drain deadline, having aborted every request still in the
/// engine at the deadline; never resolves without a `shutdown_timeout`.
async fn drain_deadline(
    drain: shutdown::DrainSignal,
    shutdown_timeout: Option<Duration>,
    engine: crate::engine::EngineHandle,
) {
    let Some(timeout) = shutdown_timeout else {
        return std::future::pending().await;
    };
    drain.wait().await;
    tokio::time::sleep(timeout).await;
    let stats = engine.stats();
    let in_flight = stats.num_running + stats.num_waiting;
    tracing::warn!(
        in_flight,
        "the drain ran past --shutdown-timeout ({timeout:?}): aborting the requests in flight"
    );
    engine.abort_all();
    tokio::time::sleep(CLOSE_GRACE).await;
}
