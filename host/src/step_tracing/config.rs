//! Step-tracing configuration: the command-line flags and the standard `OTEL_*` variables,
//! resolved once into an [`StepTracingConfig`] that the tracer runs with (and exposes).
//!
//! Precedence, per setting: a flag wins over the signal-specific variable
//! (`OTEL_EXPORTER_OTLP_TRACES_*`), which wins over the generic one (`OTEL_EXPORTER_OTLP_*`),
//! which wins over the default. Endpoints follow the OTLP rules: a traces endpoint (the flag or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is used as given, except that an HTTP endpoint without a
//! path gets `/v1/traces`; the generic `OTEL_EXPORTER_OTLP_ENDPOINT` is a base URL to which HTTP
//! appends `/v1/traces`. The protocol defaults to gRPC (as in vLLM, whose flag spellings we keep).
//! Without any endpoint, nothing goes to a collector (the JSON-lines file may still be written).
//! An `https://` endpoint is reached over TLS, with the `…_CERTIFICATE`, `…_CLIENT_CERTIFICATE`
//! and `…_CLIENT_KEY` files read here, at start-up (see [`super::tls`]).

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use super::tls::OtlpTls;
use crate::policy::budget::BudgetConfig;
use crate::policy::{PolicyError, PolicyLimits, PolicyParams, PolicySource};

/// `OTEL_EXPORTER_OTLP_ENDPOINT`: base URL for every signal.
pub const ENV_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the traces endpoint, used as given.
pub const ENV_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` or `http/protobuf`.
pub const ENV_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
/// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`: `grpc` or `http/protobuf`.
pub const ENV_OTLP_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
/// `OTEL_EXPORTER_OTLP_HEADERS`: `key=value,key2=value2` (values percent-encoded).
pub const ENV_OTLP_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
/// `OTEL_EXPORTER_OTLP_TRACES_HEADERS`: like `OTEL_EXPORTER_OTLP_HEADERS`, for traces only.
pub const ENV_OTLP_TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
/// `OTEL_EXPORTER_OTLP_TIMEOUT`: bound on one export, in milliseconds.
pub const ENV_OTLP_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
/// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`: like `OTEL_EXPORTER_OTLP_TIMEOUT`, for traces only.
pub const ENV_OTLP_TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`: PEM file of the CA certificates to trust over TLS.
pub const ENV_OTLP_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
/// `OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`: like `OTEL_EXPORTER_OTLP_CERTIFICATE`, for traces.
pub const ENV_OTLP_TRACES_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE";
/// `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`: PEM file of the client certificate (mutual TLS).
pub const ENV_OTLP_CLIENT_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE";
/// `OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE`: the same, for traces only.
pub const ENV_OTLP_TRACES_CLIENT_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE";
/// `OTEL_EXPORTER_OTLP_CLIENT_KEY`: PEM file of the client's private key (mutual TLS).
pub const ENV_OTLP_CLIENT_KEY: &str = "OTEL_EXPORTER_OTLP_CLIENT_KEY";
/// `OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY`: the same, for traces only.
pub const ENV_OTLP_TRACES_CLIENT_KEY: &str = "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY";
/// `OTEL_SERVICE_NAME`: the `service.name` resource attribute.
pub const ENV_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";

/// `service.name` when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "stepscope";
/// Records the step loop may queue for the exporter thread before it starts dropping them.
pub const DEFAULT_QUEUE_CAPACITY: usize = 2048;
/// Events one span may carry: 65 536 snapshots plus the batch summary. The OpenTelemetry SDK
/// keeps 128 by default, which would silently truncate any rich step with more than 127 running
/// requests; this constant is far above any realistic `--max-num-seqs`.
pub const DEFAULT_MAX_EVENTS_PER_SPAN: u32 = 65_537;

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (default port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (default port 4318).
    #[value(name = "http", alias = "http/protobuf")]
    HttpProtobuf,
}

impl OtlpProtocol {
    fn parse_env(name: &str, value: &str) -> Result<Self, StepTracingError> {
        match value.trim() {
            "grpc" => Ok(OtlpProtocol::Grpc),
            "http/protobuf" | "http" => Ok(OtlpProtocol::HttpProtobuf),
            other => Err(StepTracingError::Config(format!(
                "{name}={other:?} is not supported (use `grpc` or `http/protobuf`)"
            ))),
        }
    }
}

/// Where and how spans go to a collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// Full URL: for HTTP the traces URL (`…/v1/traces`), for gRPC the server address.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// Extra request headers (gRPC metadata), from `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`.
    pub headers: Vec<(String, String)>,
    /// Roots and client identity for an `https://` endpoint (defaults for `http://`).
    pub tls: OtlpTls,
}

/// The step-tracing settings as the command line gives them, typed (the CLI converts its flags
/// into this); [`StepTracingConfig::resolve`] adds the `OTEL_*` environment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepTracingSettings {
    /// `--step-tracing-enabled`.
    pub enabled: bool,
    /// `--step-tracing-policy` (default: the built-in default policy).
    pub policy: PolicySource,
    /// `--step-tracing-sample-rate`, `--step-tracing-rich-subsample-rate`,
    /// `--step-tracing-policy-arg`.
    pub policy_params: PolicyParams,
    /// `--step-tracing-policy-{fuel,memory-mib,deadline-ms,configure-deadline-ms}`.
    pub policy_limits: PolicyLimits,
    /// `--step-tracing-policy-budget-{us,share}`.
    pub policy_budget: BudgetConfig,
    /// `--otlp-traces-endpoint`.
    pub otlp_traces_endpoint: Option<String>,
    /// `--otlp-protocol`.
    pub otlp_protocol: Option<OtlpProtocol>,
    /// `--step-tracing-file`.
    pub step_tracing_file: Option<PathBuf>,
    /// `--record-steps`.
    pub record_steps: Option<PathBuf>,
    /// `--journey-tracing-sample-rate` with `--enable-journey-tracing`; `None`: journeys off.
    pub journey_sample_rate: Option<f64>,
}

/// Everything the step tracer runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTracingConfig {
    /// `--step-tracing-enabled`.
    pub step_tracing_enabled: bool,
    /// `--step-tracing-policy` (default: the built-in default policy).
    pub policy: PolicySource,
    /// The rates (defaults 0.01 and 0.001) and `--step-tracing-policy-arg key=value`s the
    /// policy's `configure` receives.
    pub policy_params: PolicyParams,
    /// `--step-tracing-policy-fuel`, `--step-tracing-policy-memory-mib`,
    /// `--step-tracing-policy-deadline-ms`, `--step-tracing-policy-configure-deadline-ms`.
    pub policy_limits: PolicyLimits,
    /// `--step-tracing-policy-budget-us`, `--step-tracing-policy-budget-share`.
    pub policy_budget: BudgetConfig,
    /// The engine seed: the policy's per-step draws are `random::step_draws(seed, step_id)`.
    pub seed: u64,
    /// `--otlp-traces-endpoint` / `--otlp-protocol` / `OTEL_EXPORTER_OTLP_*`; `None`: no collector.
    pub otlp: Option<OtlpConfig>,
    /// `service.name` (`OTEL_SERVICE_NAME`, default `stepscope`).
    pub service_name: String,
    /// `--step-tracing-file`: also write every traced step as one JSON line.
    pub step_tracing_file: Option<PathBuf>,
    /// `--record-steps`: write every step's summary as one JSON line (for `policy replay`).
    pub record_steps: Option<PathBuf>,
    /// `--enable-journey-tracing` at `--journey-tracing-sample-rate`; `None`: journeys off.
    pub journey_sample_rate: Option<f64>,
    /// Bound of the step-loop → exporter queue, in records (sampled steps).
    pub queue_capacity: usize,
    /// Span limit on events (see [`DEFAULT_MAX_EVENTS_PER_SPAN`]).
    pub max_events_per_span: u32,
    /// Spans per OTLP export request.
    pub export_batch_size: usize,
    /// Longest time a sampled step waits on the exporter thread before it is exported.
    pub export_interval: Duration,
    /// Bound on one OTLP export call, retries included (`OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`,
    /// in ms; default 10 s).
    pub export_timeout: Duration,
    /// Bound on the final flush in [`TracerHandle::shutdown`](super::TracerHandle::shutdown).
    pub shutdown_timeout: Duration,
}

impl Default for StepTracingConfig {
    /// Tracing off, the flags' defaults.
    fn default() -> Self {
        Self {
            step_tracing_enabled: false,
            policy: PolicySource::BuiltinDefault,
            policy_params: PolicyParams::default(),
            policy_limits: PolicyLimits::default(),
            policy_budget: BudgetConfig::default(),
            seed: 0,
            otlp: None,
            service_name: DEFAULT_SERVICE_NAME.to_string(),
            step_tracing_file: None,
            record_steps: None,
            journey_sample_rate: None,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_events_per_span: DEFAULT_MAX_EVENTS_PER_SPAN,
            export_batch_size: 512,
            export_interval: Duration::from_secs(1),
            export_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the tracer could not be configured or started. Each message fits on one line.
#[derive(Debug, Error)]
pub enum StepTracingError {
    #[error("step tracing: {0}")]
    Config(String),
    /// The message includes the policy error's; it is not also a `source`, so an error chain
    /// (`{:#}`) prints it once.
    #[error("step tracing policy refused: {0}")]
    Policy(PolicyError),
    #[error("step tracing: cannot open {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("step tracing: cannot set up the OTLP exporter: {0}")]
    Otlp(String),
    #[error("step tracing: cannot start the exporter thread: {0}")]
    Spawn(String),
}

impl From<PolicyError> for StepTracingError {
    fn from(error: PolicyError) -> Self {
        StepTracingError::Policy(error)
    }
}

impl StepTracingConfig {
    /// The configuration for `args`, reading the `OTEL_*` variables from the process environment.
    pub fn from_settings(args: StepTracingSettings, seed: u64) -> Result<Self, StepTracingError> {
        Self::resolve(args, seed, |name| std::env::var(name).ok())
    }

    /// Like [`from_settings`](Self::from_settings), with the environment given as a lookup
    /// function (tests pass a map instead of mutating the process environment).
    pub fn resolve(
        args: StepTracingSettings,
        seed: u64,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, StepTracingError> {
        let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        if let Some(rate) = args.journey_sample_rate
            && !(0.0..=1.0).contains(&rate)
        {
            return Err(StepTracingError::Config(format!(
                "--journey-tracing-sample-rate {rate} is not a probability in [0, 1]"
            )));
        }
        let protocol = match args.otlp_protocol {
            Some(protocol) => protocol,
            None => match env(ENV_OTLP_TRACES_PROTOCOL) {
                Some(value) => OtlpProtocol::parse_env(ENV_OTLP_TRACES_PROTOCOL, &value)?,
                None => match env(ENV_OTLP_PROTOCOL) {
                    Some(value) => OtlpProtocol::parse_env(ENV_OTLP_PROTOCOL, &value)?,
                    None => OtlpProtocol::Grpc,
                },
            },
        };
        let endpoint = match &args.otlp_traces_endpoint {
            Some(url) if !url.trim().is_empty() => {
                Some(signal_endpoint("--otlp-traces-endpoint", url, protocol)?)
            }
            _ => match env(ENV_OTLP_TRACES_ENDPOINT) {
                Some(url) => Some(signal_endpoint(ENV_OTLP_TRACES_ENDPOINT, &url, protocol)?),
                None => match env(ENV_OTLP_ENDPOINT) {
                    Some(url) => Some(base_endpoint(ENV_OTLP_ENDPOINT, &url, protocol)?),
                    None => None,
                },
            },
        };
        let headers = match env(ENV_OTLP_TRACES_HEADERS) {
            Some(value) => parse_headers(ENV_OTLP_TRACES_HEADERS, &value)?,
            None => match env(ENV_OTLP_HEADERS) {
                Some(value) => parse_headers(ENV_OTLP_HEADERS, &value)?,
                None => Vec::new(),
            },
        };
        let https = endpoint
            .as_deref()
            .is_some_and(|url| url.starts_with("https://"));
        let tls = if https {
            // The signal-specific variable wins, as for every other setting.
            let pick = |traces: &'static str, generic: &'static str| {
                env(traces)
                    .map(|path| (traces, path))
                    .or_else(|| env(generic).map(|path| (generic, path)))
            };
            // The client certificate and key come as a pair from one level, so a traces-only
            // certificate is never matched with the generic key.
            let traces_identity = env(ENV_OTLP_TRACES_CLIENT_CERTIFICATE).is_some()
                || env(ENV_OTLP_TRACES_CLIENT_KEY).is_some();
            let (cert_var, key_var) = if traces_identity {
                (
                    ENV_OTLP_TRACES_CLIENT_CERTIFICATE,
                    ENV_OTLP_TRACES_CLIENT_KEY,
                )
            } else {
                (ENV_OTLP_CLIENT_CERTIFICATE, ENV_OTLP_CLIENT_KEY)
            };
            OtlpTls::read(
                pick(ENV_OTLP_TRACES_CERTIFICATE, ENV_OTLP_CERTIFICATE),
                env(cert_var).map(|path| (cert_var, path)),
                env(key_var).map(|path| (key_var, path)),
            )?
        } else {
            OtlpTls::default()
        };
        let export_timeout = match env(ENV_OTLP_TRACES_TIMEOUT)
            .map(|v| (ENV_OTLP_TRACES_TIMEOUT, v))
            .or_else(|| env(ENV_OTLP_TIMEOUT).map(|v| (ENV_OTLP_TIMEOUT, v)))
        {
            Some((name, value)) => match value.trim().parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    return Err(StepTracingError::Config(format!(
                        "{name}={value:?} is not a positive number of milliseconds"
                    )));
                }
            },
            None => Self::default().export_timeout,
        };
        Ok(Self {
            step_tracing_enabled: args.enabled,
            policy: args.policy,
            policy_params: args.policy_params,
            policy_limits: args.policy_limits,
            policy_budget: args.policy_budget,
            seed,
            otlp: endpoint.map(|endpoint| OtlpConfig {
                endpoint,
                protocol,
                headers,
                tls,
            }),
            service_name: env(ENV_SERVICE_NAME)
                .map(|name| name.trim().to_string())
                .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string()),
            step_tracing_file: args.step_tracing_file,
            record_steps: args.record_steps,
            journey_sample_rate: args.journey_sample_rate,
            export_timeout,
            ..Self::default()
        })
    }

    /// A configuration with tracing on at the given rates and nothing else set (tests, benches).
    pub fn enabled_with_rates(sample_rate: f64, rich_subsample_rate: f64, seed: u64) -> Self {
        Self {
            step_tracing_enabled: true,
            policy_params: PolicyParams::rates(sample_rate, rich_subsample_rate),
            seed,
            ..Self::default()
        }
    }
}

/// Checks a URL's scheme and authority; returns `(scheme, authority, path)`.
fn split_url<'a>(
    source: &str,
    url: &'a str,
) -> Result<(&'a str, &'a str, &'a str), StepTracingError> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(StepTracingError::Config(format!(
            "{source}: `{url}` is not a URL (expected http://host:port)"
        )));
    };
    match scheme {
        "http" | "https" => {}
        other => {
            return Err(StepTracingError::Config(format!(
                "{source}: `{url}`: unsupported scheme `{other}` (expected http or https)"
            )));
        }
    }
    let (authority, path) = match rest.find('/') {
        Some(index) => rest.split_at(index),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(StepTracingError::Config(format!(
            "{source}: `{url}` has no host"
        )));
    }
    if url.parse::<http::Uri>().is_err() {
        return Err(StepTracingError::Config(format!(
            "{source}: `{url}` is not a valid URL"
        )));
    }
    Ok((scheme, authority, path))
}

/// A traces endpoint (flag or `…_TRACES_ENDPOINT`): as given; HTTP without a path gets `/v1/traces`.
fn signal_endpoint(
    source: &str,
    url: &str,
    protocol: OtlpProtocol,
) -> Result<String, StepTracingError> {
    let (scheme, authority, path) = split_url(source, url)?;
    Ok(match protocol {
        OtlpProtocol::HttpProtobuf if path.is_empty() || path == "/" => {
            format!("{scheme}://{authority}/v1/traces")
        }
        _ => format!("{scheme}://{authority}{path}"),
    })
}

/// The generic `OTEL_EXPORTER_OTLP_ENDPOINT`: a base URL; HTTP appends `/v1/traces`.
fn base_endpoint(
    source: &str,
    url: &str,
    protocol: OtlpProtocol,
) -> Result<String, StepTracingError> {
    let (scheme, authority, path) = split_url(source, url)?;
    Ok(match protocol {
        OtlpProtocol::HttpProtobuf => {
            format!(
                "{scheme}://{authority}{}/v1/traces",
                path.trim_end_matches('/')
            )
        }
        OtlpProtocol::Grpc => format!("{scheme}://{authority}{path}"),
    })
}

/// Parses `key=value,key2=value2` (values percent-decoded), refusing what is not a valid
/// header, so a typo is reported at start-up instead of silently dropped.
fn parse_headers(source: &str, value: &str) -> Result<Vec<(String, String)>, StepTracingError> {
    let mut headers = Vec::new();
    for item in value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let Some((key, raw)) = item.split_once('=') else {
            return Err(StepTracingError::Config(format!(
                "{source}: `{item}` is not of the form key=value"
            )));
        };
        let key = key.trim().to_ascii_lowercase();
        let decoded = percent_decode(raw.trim()).ok_or_else(|| {
            StepTracingError::Config(format!("{source}: the value of `{key}` is badly encoded"))
        })?;
        if http::HeaderName::from_bytes(key.as_bytes()).is_err()
            || http::HeaderValue::from_str(&decoded).is_err()
        {
            return Err(StepTracingError::Config(format!(
                "{source}: `{key}` is not a valid header"
            )));
        }
        headers.push((key, decoded));
    }
    Ok(headers)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The settings for `--otlp-traces-endpoint URL` / `--otlp-protocol grpc|http` pairs (the
    /// CLI's own parsing of these flags is tested in `cli.rs` and `step_tracing/tests.rs`).
    fn args(extra: &[&str]) -> StepTracingSettings {
        let mut settings = StepTracingSettings::default();
        for pair in extra.chunks(2) {
            match pair {
                ["--otlp-traces-endpoint", url] => {
                    settings.otlp_traces_endpoint = Some(url.to_string())
                }
                ["--otlp-protocol", "grpc"] => settings.otlp_protocol = Some(OtlpProtocol::Grpc),
                ["--otlp-protocol", "http"] => {
                    settings.otlp_protocol = Some(OtlpProtocol::HttpProtobuf)
                }
                other => panic!("no such test flag: {other:?}"),
            }
        }
        settings
    }

    fn config(extra: &[&str], env: &[(&str, &str)]) -> Result<StepTracingConfig, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        StepTracingConfig::resolve(args(extra), 7, |name| env.get(name).cloned())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_mean_tracing_off_and_no_collector() {
        let config = config(&[], &[]).unwrap();
        assert!(!config.step_tracing_enabled);
        assert_eq!(config.policy_params, PolicyParams::rates(0.01, 0.001));
        assert_eq!(config.otlp, None);
        assert_eq!(config.service_name, "stepscope");
        assert_eq!(config.seed, 7);
        assert_eq!(config.max_events_per_span, DEFAULT_MAX_EVENTS_PER_SPAN);
    }

    #[test]
    fn flags_win_over_environment() {
        let env = [
            (ENV_OTLP_TRACES_ENDPOINT, "http://env-traces:4317"),
            (ENV_OTLP_PROTOCOL, "grpc"),
        ];
        let c = config(
            &[
                "--otlp-traces-endpoint",
                "http://flag:4318",
                "--otlp-protocol",
                "http",
            ],
            &env,
        )
        .unwrap();
        let otlp = c.otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://flag:4318/v1/traces");
        assert_eq!(otlp.protocol, OtlpProtocol::HttpProtobuf);
        // Without flags the environment applies.
        let otlp = config(&[], &env).unwrap().otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://env-traces:4317");
        assert_eq!(otlp.protocol, OtlpProtocol::Grpc);
    }

    #[test]
    fn environment_precedence_and_endpoint_rules() {
        // The signal-specific variables win over the generic ones.
        let c = config(
            &[],
            &[
                (ENV_OTLP_ENDPOINT, "http://generic:4318"),
                (ENV_OTLP_TRACES_PROTOCOL, "http/protobuf"),
                (ENV_OTLP_PROTOCOL, "grpc"),
                (ENV_OTLP_HEADERS, "a=1"),
                (ENV_OTLP_TRACES_HEADERS, "Api-Key=s%20e,x-team=infra"),
                (ENV_SERVICE_NAME, "my-server"),
                (ENV_OTLP_TIMEOUT, "2500"),
            ],
        )
        .unwrap();
        assert_eq!(c.export_timeout, Duration::from_millis(2500));
        let otlp = c.otlp.unwrap();
        // The generic endpoint is a base: HTTP appends the signal path.
        assert_eq!(otlp.endpoint, "http://generic:4318/v1/traces");
        assert_eq!(otlp.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(
            otlp.headers,
            vec![
                ("api-key".to_string(), "s e".to_string()),
                ("x-team".to_string(), "infra".to_string())
            ]
        );
        assert_eq!(c.service_name, "my-server");
        // A traces endpoint with a path is used as given.
        let c = config(
            &["--otlp-protocol", "http"],
            &[(ENV_OTLP_TRACES_ENDPOINT, "http://c:4318/custom/traces")],
        )
        .unwrap();
        assert_eq!(c.otlp.unwrap().endpoint, "http://c:4318/custom/traces");
        // gRPC endpoints are addresses.
        let c = config(&[], &[(ENV_OTLP_ENDPOINT, "http://g:4317")]).unwrap();
        assert_eq!(c.otlp.unwrap().endpoint, "http://g:4317");
    }

    #[test]
    fn bad_values_are_refused_with_a_clear_message() {
        for (flags, env, needle) in [
            (
                vec!["--otlp-traces-endpoint", "localhost:4317"],
                vec![],
                "not a URL",
            ),
            (
                vec!["--otlp-traces-endpoint", "ftp://x:4317"],
                vec![],
                "unsupported scheme `ftp`",
            ),
            (
                vec!["--otlp-traces-endpoint", "https://x:4317"],
                vec![(ENV_OTLP_CERTIFICATE, "/nonexistent/ca.pem")],
                "OTEL_EXPORTER_OTLP_CERTIFICATE=/nonexistent/ca.pem: cannot read",
            ),
            (
                vec!["--otlp-traces-endpoint", "https://x:4317"],
                vec![(ENV_OTLP_TRACES_CLIENT_KEY, "/nonexistent/key.pem")],
                "not its pair",
            ),
            (vec![], vec![(ENV_OTLP_PROTOCOL, "http/json")], "http/json"),
            (
                vec![],
                vec![(ENV_OTLP_HEADERS, "novalue")],
                "not of the form",
            ),
            (
                vec![],
                vec![(ENV_OTLP_HEADERS, "bad key=1")],
                "valid header",
            ),
        ] {
            let err = config(&flags, &env).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn tls_files_are_read_for_https_endpoints_only() {
        // https with no files: Mozilla's roots, no client identity.
        let c = config(
            &["--otlp-traces-endpoint", "https://collector.example:4317"],
            &[],
        )
        .unwrap();
        let otlp = c.otlp.unwrap();
        assert_eq!(otlp.endpoint, "https://collector.example:4317");
        assert!(!otlp.tls.is_customized());
        // http ignores the TLS variables (a missing file is not even opened).
        let c = config(
            &["--otlp-traces-endpoint", "http://c:4317"],
            &[(ENV_OTLP_CERTIFICATE, "/nonexistent/ca.pem")],
        )
        .unwrap();
        assert!(!c.otlp.unwrap().tls.is_customized());
        // The signal-specific variable wins over the generic one.
        let err = config(
            &["--otlp-traces-endpoint", "https://c:4317"],
            &[
                (ENV_OTLP_CERTIFICATE, "/nonexistent/generic.pem"),
                (ENV_OTLP_TRACES_CERTIFICATE, "/nonexistent/traces.pem"),
            ],
        )
        .unwrap_err();
        assert!(err.contains("traces.pem"), "{err}");
        // A traces-only client certificate is not paired with the generic key.
        let err = config(
            &["--otlp-traces-endpoint", "https://c:4317"],
            &[
                (ENV_OTLP_CLIENT_KEY, "/nonexistent/generic.key"),
                (
                    ENV_OTLP_TRACES_CLIENT_CERTIFICATE,
                    "/nonexistent/traces.pem",
                ),
            ],
        )
        .unwrap_err();
        assert!(
            err.contains("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE is set but not its pair"),
            "{err}"
        );
    }
}
