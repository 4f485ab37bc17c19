//! Command-line interface (clap): `serve`, `policy check|run`, `bench`.
//!
//! Flag names follow vLLM where one exists, and the step-tracing flags keep the spelling of
//! the original feature (`--step-tracing-enabled`, `--step-tracing-sample-rate`, …) because
//! users' scripts depend on them.

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::backend::cuda::CudaError;
use crate::backend::{DEFAULT_CPU_KV_BLOCKS, Device, ModelDtype};
use crate::engine::{DEFAULT_MAX_PROMPT_LOGPROBS_TOKENS, EngineConfig};
use crate::launch::{KvPoolSize, LaunchConfig};
use crate::model::hub::HubSettings;

#[derive(Debug, Parser)]
#[command(
    name = "stepscope",
    version,
    about = "An LLM inference server whose scheduler is observable step by step"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Generate a completion for one prompt and print it.
    Generate(GenerateArgs),
    /// Develop step-tracing policies: check a component, or run it over synthetic steps.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Benchmarks that print side-by-side measurements.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Look at step traces (`--step-tracing-file`, `--record-steps`): population estimates,
    /// an HTML report, a Perfetto timeline.
    #[command(subcommand)]
    Trace(TraceCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model to serve: a Hugging Face id (`org/name`, see --revision), a Hugging Face model
    /// directory, or `builtin:tiny`. Default: SmolLM2-135M-Instruct.
    pub model: Option<String>,
    /// Address to listen on. The default is loopback (reachable from this machine only), which
    /// is safer for a server without TLS; `0.0.0.0` or `::` listen on every interface, as
    /// `vllm serve` does by default (add `--api-key`).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start-up).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Model name(s) the API answers to and `/v1/models` lists, the first reported by default:
    /// several after one flag (`--served-model-name a b`, as vLLM) or the flag repeated.
    /// Default: the model's name, e.g. `SmolLM2-135M-Instruct` or `builtin:tiny`.
    #[arg(long, value_name = "NAME", num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// API key(s): every `/v1` request must send `Authorization: Bearer <key>` (else 401
    /// `invalid_api_key`); `/health`, `/metrics` and `/tokenize` stay open. Several after one
    /// flag are all accepted. Default: the `VLLM_API_KEY` environment variable; unset, no key.
    #[arg(long, value_name = "KEY", num_args = 1.., env = "VLLM_API_KEY", hide_env_values = true)]
    pub api_key: Vec<String>,
    /// Serve the admin API (`GET`/`POST /admin/policy`: hot swap of the step-tracing policy)
    /// on this port (0: any free port, printed at start-up). Off unless given.
    #[arg(long, value_name = "PORT")]
    pub admin_port: Option<u16>,
    /// Address of the admin API listener (loopback unless configured otherwise).
    #[arg(long, default_value = "127.0.0.1", requires = "admin_port")]
    pub admin_host: String,
    /// How long a SIGINT/SIGTERM drain waits for requests in flight (seconds, fractions allowed).
    /// Past it the engine aborts them, their clients get a 503 `server_shutdown` error (an error
    /// event in a stream), the step traces are flushed and the process exits 0. Set it below the
    /// orchestrator's kill timeout. Default: wait until every request has finished.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub shutdown_timeout: Option<std::time::Duration>,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub step_tracing: StepTracingArgs,
}

/// How `serve` treats HTTP clients, and what `/health` checks (`server::http::HttpConfig`).
#[derive(Debug, Clone, Copy, Args)]
pub struct HttpArgs {
    /// Seconds a client has to send a request head (after connecting, or between requests on a
    /// kept-alive connection; the connection is closed past it), and again its body (a 408
    /// past it). Slow or stalled clients are cut off and never reach the engine.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_positive_seconds)]
    pub http_read_timeout: std::time::Duration,
    /// The largest request body of the API, in bytes (a 413 above it). The admin API's policy
    /// uploads have their own limit of 64 MiB.
    #[arg(long, value_name = "BYTES", default_value_t = crate::server::http::DEFAULT_MAX_BODY_BYTES,
          value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    pub max_request_body_bytes: usize,
    /// `GET /health` answers 503 when requests are waiting or running and the engine has not
    /// completed a step for this many seconds. Keep it above the slowest legitimate step (a full
    /// prefill batch on CPU).
    #[arg(long, value_name = "SECONDS", default_value = "20", value_parser = parse_positive_seconds)]
    pub health_stall_timeout: std::time::Duration,
}

impl ServeArgs {
    /// The typed configuration `serve` runs with: the engine flags with the device resolved,
    /// and the step-tracing flags with the `OTEL_*` environment.
    pub fn to_config(&self) -> anyhow::Result<crate::server::ServeConfig> {
        Ok(crate::server::ServeConfig {
            model: self.model.clone(),
            host: self.host.clone(),
            port: self.port,
            served_model_name: self.served_model_name.clone(),
            api_keys: self.api_key.clone(),
            admin_listen: self.admin_port.map(|port| (self.admin_host.clone(), port)),
            policy_path: self.step_tracing.step_tracing_policy.clone(),
            shutdown_timeout: self.shutdown_timeout,
            http: self.http.config(),
            launch: LaunchConfig::try_from(&self.engine)?,
            gpu_memory_utilization: self.engine.gpu_memory_utilization,
            tracing: self.step_tracing.to_config(self.engine.seed)?,
        })
    }
}

impl HttpArgs {
    /// The typed configuration the server takes.
    pub fn config(&self) -> crate::server::http::HttpConfig {
        crate::server::http::HttpConfig {
            read_timeout: self.http_read_timeout,
            max_body_bytes: self.max_request_body_bytes,
            health_stall_timeout: self.health_stall_timeout,
        }
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a Hugging Face id (`org/name`, see --revision), a Hugging Face model directory, or
    /// `builtin:tiny`.
    pub model: String,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 means greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of this request's sampling (default: derived from the engine `--seed`).
    #[arg(long = "sampling-seed")]
    pub sampling_seed: Option<u64>,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// OpenAI presence penalty, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// OpenAI frequency penalty, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// vLLM repetition penalty (> 0; 1 is off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// EOS, stop tokens and stop strings are held back until this many tokens were generated.
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
    /// With --json: add each token's log-probability and this many top alternatives (0-20).
    #[arg(long, value_name = "N")]
    pub logprobs: Option<usize>,
    /// Stop at this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object `{"token_ids": [...], "text": "..."}` instead of streaming text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub step_tracing: StepTracingArgs,
}

/// Where the model runs (`--device`); [`DeviceArg::resolve`] turns it into the backend's
/// [`Device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    /// CUDA when a usable device is present, else CPU.
    #[default]
    Auto,
}

impl DeviceArg {
    /// Decides the device: `cpu` is always the CPU; `cuda` is CUDA or an error saying why not;
    /// `auto` is CUDA when usable, else the CPU with the reason (for a log line).
    pub fn resolve(self) -> Result<(Device, Option<String>), CudaError> {
        match self {
            DeviceArg::Cpu => Ok((Device::Cpu, None)),
            DeviceArg::Cuda => Device::cuda().map(|d| (d, None)),
            DeviceArg::Auto => {
                let (device, line) = Device::cuda_or_cpu();
                Ok((device, Some(line)))
            }
        }
    }
}

/// Case-insensitive, with `gpu` for `cuda` (clap parses `--device` itself, case-sensitively).
impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" | "gpu" => Ok(DeviceArg::Cuda),
            "auto" => Ok(DeviceArg::Auto),
            other => Err(format!(
                "unknown device `{other}` (expected cpu, cuda or auto)"
            )),
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceArg::Cpu => "cpu",
            DeviceArg::Cuda => "cuda",
            DeviceArg::Auto => "auto",
        })
    }
}

/// Engine and KV-cache sizing (vLLM's flag names).
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Most requests in one batch [default, as vLLM's `serve`: 128 on the CPU; on CUDA 1024 with
    /// 70 GiB or more of device memory (not an A100), else 256].
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Most tokens computed in one step [default, as vLLM's `serve`: 8192 on CUDA with 70 GiB
    /// or more (not an A100), else 2048].
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV blocks in the pool [default: 2048 on the CPU; on CUDA as many as fit in
    /// --gpu-memory-utilization of the device's memory].
    #[arg(long)]
    pub num_kv_blocks: Option<usize>,
    /// Share of the GPU's memory for the weights and the KV cache; sizes the KV pool with
    /// `--device cuda` (unless --num-kv-blocks is given). On the CPU the pool is --num-kv-blocks.
    #[arg(long, default_value_t = 0.9, value_parser = parse_memory_share)]
    pub gpu_memory_utilization: f64,
    /// What the weights are held in: auto (float32 on the CPU; bfloat16 on CUDA with compute
    /// capability 8.0+, else float16), float32 (CPU), bfloat16 or float16 (CUDA; on the CPU
    /// the matrices stay in half precision, f32 accumulation). A GGUF file keeps its formats.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    /// Longest prompt + output (default: the model's).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Requests allowed to wait for admission before new ones are refused.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting_requests: usize,
    /// Reuse the KV blocks of identical prompt prefixes (on by default; as vLLM's flag pair,
    /// the last of `--enable-prefix-caching` / `--no-enable-prefix-caching` wins).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Turn prefix caching off.
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// Where the model runs: auto (a usable CUDA device, else the CPU; the log says which and
    /// why), cpu, or cuda.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Never replay decode steps as CUDA graphs (vLLM's flag; graphs are on by default on
    /// CUDA for decode batches of up to 512 tokens). The CPU backend always runs eagerly.
    #[arg(long)]
    pub enforce_eager: bool,
    /// Engine seed: request sampling streams and step-tracing draws derive from it.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// For a MODEL given as a Hugging Face id (`org/name`): the branch, tag or commit to use
    /// [default: main]. The model is looked up in the Hugging Face cache (HF_HUB_CACHE, else
    /// $HF_HOME/hub, else ~/.cache/huggingface/hub) and downloaded into it when missing, unless
    /// HF_HUB_OFFLINE=1.
    #[arg(long)]
    pub revision: Option<String>,
}

/// `--dtype`, vLLM's spellings (`half` and `float` as its aliases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    Auto,
    #[value(alias = "float")]
    Float32,
    Bfloat16,
    #[value(alias = "half")]
    Float16,
}

impl From<DtypeArg> for ModelDtype {
    fn from(arg: DtypeArg) -> Self {
        match arg {
            DtypeArg::Auto => ModelDtype::Auto,
            DtypeArg::Float32 => ModelDtype::Float32,
            DtypeArg::Bfloat16 => ModelDtype::BFloat16,
            DtypeArg::Float16 => ModelDtype::Float16,
        }
    }
}

impl EngineArgs {
    /// The engine configuration the flags ask for on `device`.
    pub fn engine_config(&self, device: &Device) -> EngineConfig {
        let (seqs, tokens) = device.vllm_batch_defaults();
        let max_num_batched_tokens = self.max_num_batched_tokens.unwrap_or(tokens);
        EngineConfig {
            block_size: self.block_size,
            num_kv_blocks: self.num_kv_blocks.unwrap_or(DEFAULT_CPU_KV_BLOCKS),
            // As vLLM: the default never exceeds the step's token budget.
            max_num_seqs: self
                .max_num_seqs
                .unwrap_or(seqs.min(max_num_batched_tokens)),
            max_num_batched_tokens,
            max_prompt_logprobs_tokens: DEFAULT_MAX_PROMPT_LOGPROBS_TOKENS,
            max_model_len: self.max_model_len,
            max_waiting_requests: self.max_waiting_requests,
            enable_prefix_caching: !self.no_enable_prefix_caching,
            seed: self.seed,
        }
    }
}

/// The engine flags as the library takes them: the engine configuration and the resolved
/// device (resolving probes for CUDA, so a bad `--device` fails here).
impl TryFrom<&EngineArgs> for LaunchConfig {
    type Error = anyhow::Error;

    fn try_from(args: &EngineArgs) -> anyhow::Result<LaunchConfig> {
        let (device, device_note) = args.device.resolve().context("--device")?;
        Ok(LaunchConfig {
            engine: args.engine_config(&device),
            device,
            device_note,
            dtype: args.dtype.into(),
            enforce_eager: args.enforce_eager,
            kv_pool: match args.num_kv_blocks {
                Some(_) => KvPoolSize::AsConfigured,
                None => KvPoolSize::DeviceMemoryShare(args.gpu_memory_utilization),
            },
            hub: HubSettings::from_env(|name| std::env::var(name).ok(), args.revision.clone())?,
        })
    }
}

/// The step-tracing flags (shared by `serve` and `generate`).
#[derive(Debug, Clone, Args)]
pub struct StepTracingArgs {
    /// Trace scheduler steps (off by default).
    #[arg(
        long,
        default_value_t = false,
        overrides_with = "no_step_tracing_enabled"
    )]
    pub step_tracing_enabled: bool,
    /// Do not trace scheduler steps (the default; the last of the pair wins, so a copied
    /// command line can turn tracing back off).
    #[arg(long, overrides_with = "step_tracing_enabled")]
    pub no_step_tracing_enabled: bool,
    /// Probability that a step's batch summary is traced.
    #[arg(long, default_value_t = 0.01, value_parser = parse_rate)]
    pub step_tracing_sample_rate: f64,
    /// Probability that a batch-sampled step also gets per-request snapshots.
    #[arg(long, default_value_t = 0.001, value_parser = parse_rate)]
    pub step_tracing_rich_subsample_rate: f64,
    /// A policy component (.wasm); default: the built-in default policy.
    #[arg(long, value_name = "PATH.wasm")]
    pub step_tracing_policy: Option<PathBuf>,
    /// A `key=value` parameter for the policy's `configure` (repeatable).
    #[arg(long = "step-tracing-policy-arg", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub step_tracing_policy_args: Vec<(String, String)>,
    /// Fuel (≈ Wasm instructions) one policy call may use before it is stopped as a timeout,
    /// a deterministic bound on top of the wall-clock deadline (0, the default: no fuel
    /// metering; the deadline bounds every call).
    #[arg(long, default_value_t = crate::policy::DEFAULT_FUEL_PER_CALL)]
    pub step_tracing_policy_fuel: u64,
    /// Linear-memory cap of a policy instance, in MiB.
    #[arg(long, default_value_t = 64)]
    pub step_tracing_policy_memory_mib: u64,
    /// Wall-clock deadline of one policy call (`decide`, `plan-rich`), in milliseconds; time
    /// spent in host calls counts. A call past it is stopped as a `timeout` fault.
    #[arg(long, default_value_t = crate::policy::DEFAULT_CALL_DEADLINE_MS, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub step_tracing_policy_deadline_ms: u64,
    /// Wall-clock deadline of a policy's instantiation plus `configure`, in milliseconds.
    #[arg(long, default_value_t = crate::policy::DEFAULT_CONFIGURE_DEADLINE_MS, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub step_tracing_policy_configure_deadline_ms: u64,
    /// Smallest per-step budget of the policy, in µs: a policy whose p99 cost per step passes
    /// the budget is set aside for the built-in default until it is fast again (0 with
    /// `--step-tracing-policy-budget-share 0`: no budget).
    #[arg(long, default_value_t = crate::policy::budget::BudgetConfig::DEFAULT_FLOOR_US)]
    pub step_tracing_policy_budget_us: u64,
    /// The policy's per-step budget as a share of the engine's own step time (the budget is
    /// the larger of this and `--step-tracing-policy-budget-us`).
    #[arg(long, default_value_t = crate::policy::budget::BudgetConfig::DEFAULT_SHARE, value_parser = parse_share)]
    pub step_tracing_policy_budget_share: f64,
    /// OTLP collector for step traces, e.g. `http://localhost:4317` (gRPC) or
    /// `http://localhost:4318` (HTTP; `/v1/traces` is appended when the URL has no path).
    /// Default: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[arg(long, value_name = "URL")]
    pub otlp_traces_endpoint: Option<String>,
    /// OTLP transport: `grpc` or `http` (HTTP/protobuf). Default:
    /// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, then `OTEL_EXPORTER_OTLP_PROTOCOL`, then grpc.
    #[arg(long, value_enum, value_name = "grpc|http")]
    pub otlp_protocol: Option<crate::step_tracing::OtlpProtocol>,
    /// Also write every traced step as one JSON object per line to this file (truncated at
    /// start), for use without a collector and for `policy replay`.
    #[arg(long, value_name = "PATH")]
    pub step_tracing_file: Option<PathBuf>,
    /// Record every step's summary (sampled or not) as JSON lines to this file (truncated at
    /// start), in the `--step-tracing-file` format, for `stepscope policy replay`.
    #[arg(long, value_name = "PATH", requires = "step_tracing_enabled")]
    pub record_steps: Option<PathBuf>,
    /// Trace request journeys: per traced request, a `llm_request` span (the API side) and a
    /// `llm_core` span (the engine side) in one trace, the caller's when it sends a
    /// `traceparent`. Exported like the step spans (collector and `--step-tracing-file`).
    #[arg(long, default_value_t = false)]
    pub enable_journey_tracing: bool,
    /// Probability that a request's journey is traced; a request whose `traceparent` is
    /// sampled always is, one whose `traceparent` is not sampled never is (ParentBased).
    #[arg(long, default_value_t = 1.0, value_parser = parse_rate, requires = "enable_journey_tracing")]
    pub journey_tracing_sample_rate: f64,
}

impl StepTracingArgs {
    /// The flags, typed, for the library ([`StepTracingConfig::resolve`] adds the `OTEL_*`
    /// environment).
    ///
    /// [`StepTracingConfig::resolve`]: crate::step_tracing::StepTracingConfig::resolve
    pub fn settings(&self) -> crate::step_tracing::StepTracingSettings {
        crate::step_tracing::StepTracingSettings {
            enabled: self.step_tracing_enabled,
            policy: crate::policy::PolicySource::from_option(self.step_tracing_policy.as_deref()),
            policy_params: self.policy_params(),
            policy_limits: self.policy_limits(),
            policy_budget: self.policy_budget(),
            otlp_traces_endpoint: self.otlp_traces_endpoint.clone(),
            otlp_protocol: self.otlp_protocol,
            step_tracing_file: self.step_tracing_file.clone(),
            record_steps: self.record_steps.clone(),
            journey_sample_rate: self
                .enable_journey_tracing
                .then_some(self.journey_tracing_sample_rate),
        }
    }

    /// The tracer's configuration: these flags plus the process's `OTEL_*` environment.
    pub fn to_config(
        &self,
        seed: u64,
    ) -> Result<crate::step_tracing::StepTracingConfig, crate::step_tracing::StepTracingError> {
        crate::step_tracing::StepTracingConfig::from_settings(self.settings(), seed)
    }

    /// The rates and the `--step-tracing-policy-arg`s, typed.
    pub fn policy_params(&self) -> crate::policy::PolicyParams {
        crate::policy::PolicyParams {
            sample_rate: self.step_tracing_sample_rate,
            rich_subsample_rate: self.step_tracing_rich_subsample_rate,
            journey_sample_rate: self.journey_tracing_sample_rate,
            args: self.step_tracing_policy_args.clone(),
        }
    }

    pub fn policy_limits(&self) -> crate::policy::PolicyLimits {
        crate::policy::PolicyLimits {
            fuel_per_call: self.step_tracing_policy_fuel,
            memory_bytes: (self.step_tracing_policy_memory_mib.min(4096) as usize) << 20,
            call_deadline: Duration::from_millis(self.step_tracing_policy_deadline_ms),
            configure_deadline: Duration::from_millis(
                self.step_tracing_policy_configure_deadline_ms,
            ),
            ..crate::policy::PolicyLimits::default()
        }
    }

    pub fn policy_budget(&self) -> crate::policy::budget::BudgetConfig {
        crate::policy::budget::BudgetConfig {
            floor: Duration::from_micros(self.step_tracing_policy_budget_us),
            share: self.step_tracing_policy_budget_share,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a component against the contract and run the conformance suite.
    Check(PolicyCheckArgs),
    /// Run a policy over synthetic step summaries and print the observed rates.
    Run(PolicyRunArgs),
    /// Run a policy over steps recorded by `--step-tracing-file` and print which it would have
    /// sampled, why, and the rates.
    Replay(PolicyReplayArgs),
}

#[derive(Debug, Args)]
pub struct PolicyReplayArgs {
    /// The policy component (.wasm), or `builtin:default`.
    pub file: String,
    /// The recorded steps: a JSON-lines trace (record every step with
    /// `--step-tracing-sample-rate 1`).
    #[arg(long, value_name = "recorded.jsonl")]
    pub steps: PathBuf,
    /// The `--seed` of the recording server (the per-step draws derive from it).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The rates (default 0.01 and 0.001, as `serve`) and the policy's `--arg`s.
    #[command(flatten)]
    pub params: PolicyParamArgs,
    /// Print only the totals, not one line per sampled step.
    #[arg(long)]
    pub summary_only: bool,
    #[command(flatten)]
    pub limits: PolicyLimitArgs,
}

/// What the `policy` subcommands pass to `configure`, as `serve`'s
/// `--step-tracing-sample-rate`, `--step-tracing-rich-subsample-rate` and
/// `--step-tracing-policy-arg` do. Each subcommand has its own default rates.
#[derive(Debug, Clone, Args)]
pub struct PolicyParamArgs {
    /// Batch sample rate passed to `configure` (default: see the subcommand).
    #[arg(long, value_parser = parse_rate)]
    pub sample_rate: Option<f64>,
    /// Rich subsample rate passed to `configure` (default: see the subcommand).
    #[arg(long, value_parser = parse_rate)]
    pub rich_subsample_rate: Option<f64>,
    /// A `key=value` parameter for `configure` (repeatable).
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub args: Vec<(String, String)>,
}

impl PolicyParamArgs {
    /// The typed parameters, with `defaults` for the rates not given.
    pub fn params(&self, defaults: crate::policy::PolicyParams) -> crate::policy::PolicyParams {
        crate::policy::PolicyParams {
            sample_rate: self.sample_rate.unwrap_or(defaults.sample_rate),
            rich_subsample_rate: self
                .rich_subsample_rate
                .unwrap_or(defaults.rich_subsample_rate),
            journey_sample_rate: defaults.journey_sample_rate,
            args: self.args.clone(),
        }
    }
}

/// The policy sandbox's bounds, as `serve` sets them with `--step-tracing-policy-fuel`,
/// `--step-tracing-policy-memory-mib` and the two `--step-tracing-policy-*deadline-ms`.
#[derive(Debug, Clone, Copy, Args)]
pub struct PolicyLimitArgs {
    /// Fuel one policy call may use (0, the default: no fuel metering; the deadline bounds
    /// every call).
    #[arg(long, default_value_t = crate::policy::DEFAULT_FUEL_PER_CALL)]
    pub fuel: u64,
    /// Linear-memory cap of a policy instance, in MiB.
    #[arg(long, default_value_t = 64)]
    pub memory_mib: u64,
    /// Wall-clock deadline of one policy call, in milliseconds.
    #[arg(long, default_value_t = crate::policy::DEFAULT_CALL_DEADLINE_MS, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub deadline_ms: u64,
    /// Wall-clock deadline of instantiation plus `configure`, in milliseconds.
    #[arg(long, default_value_t = crate::policy::DEFAULT_CONFIGURE_DEADLINE_MS, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub configure_deadline_ms: u64,
}

impl PolicyLimitArgs {
    pub fn limits(&self) -> crate::policy::PolicyLimits {
        crate::policy::PolicyLimits {
            fuel_per_call: self.fuel,
            memory_bytes: (self.memory_mib.min(4096) as usize) << 20,
            call_deadline: Duration::from_millis(self.deadline_ms),
            configure_deadline: Duration::from_millis(self.configure_deadline_ms),
            ..crate::policy::PolicyLimits::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct PolicyCheckArgs {
    /// The policy component (.wasm).
    pub file: PathBuf,
    /// The rates (default 0.5 and 0.5, so that `plan-rich` runs often) and the `--arg`s.
    #[command(flatten)]
    pub params: PolicyParamArgs,
    /// Synthetic steps to run.
    #[arg(long, default_value_t = 20_000)]
    pub steps: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Wall-clock limit of the whole check, in seconds: a policy that makes it run longer
    /// fails with a verdict saying so.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub time_limit_s: u64,
    #[command(flatten)]
    pub limits: PolicyLimitArgs,
}

#[derive(Debug, Args)]
pub struct PolicyRunArgs {
    /// The policy component (.wasm), or `builtin:default`.
    pub file: String,
    #[arg(long, default_value_t = 100_000)]
    pub steps: u64,
    /// The rates (default 0.01 and 0.001, as `serve`) and the policy's `--arg`s.
    #[command(flatten)]
    pub params: PolicyParamArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub limits: PolicyLimitArgs,
}

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// What the sampled steps say about every step: estimates re-weighted by each step's
    /// recorded sampling probability, with 95% intervals, percentiles, slow and preempting steps.
    Summary {
        /// A step-trace JSON-lines file.
        file: PathBuf,
        /// Print the same numbers as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One self-contained HTML file (no network fetch) with charts, request swimlanes and the
    /// summary table.
    Report {
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_name = "report.html")]
        output: PathBuf,
    },
    /// Chrome trace event JSON, for the Perfetto UI (ui.perfetto.dev) or chrome://tracing.
    Perfetto {
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_name = "trace.json")]
        output: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// CPU model throughput: prefill and decode tokens/s at several batch sizes.
    Model {
        /// Model directory, GGUF file or `builtin:tiny` (default: SmolLM2 when set up, else
        /// builtin:tiny).
        #[arg(long)]
        model: Option<String>,
        /// Batch sizes to measure.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16])]
        batch: Vec<usize>,
        /// What a checkpoint's matrices are held in (as `serve --dtype` on the CPU).
        #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
        dtype: DtypeArg,
        /// One JSON object per batch size (scripts/bench-vs-llamacpp.sh reads them).
        #[arg(long)]
        json: bool,
    },
    /// Scheduler CPU time per step (median, p99) at several running-queue sizes.
    Scheduler {
        /// Running-queue sizes to measure.
        #[arg(long, value_delimiter = ',', default_values_t = [16usize, 64, 256])]
        running: Vec<usize>,
    },
    /// Policy call latency: Wasm default vs native, CPU bound, rich plans.
    Policy {
        /// A policy component to measure instead of the built-in default.
        #[arg(long, conflicts_with = "languages")]
        policy: Option<PathBuf>,
        /// Compare the same policy built in several languages: `NAME=FILE.wasm` (repeatable;
        /// `NAME=builtin:default` for the embedded one). See scripts/bench-policy-languages.sh.
        #[arg(long = "language", value_name = "NAME=FILE.wasm", value_parser = parse_key_value)]
        languages: Vec<(String, String)>,
        #[arg(long, default_value_t = 200_000)]
        iterations: u64,
        /// Fuel per call for the `--language` comparison (0, the default: no fuel metering,
        /// the wall-clock deadline alone bounds a call).
        #[arg(long, default_value_t = crate::policy::DEFAULT_FUEL_PER_CALL, requires = "languages")]
        fuel: u64,
    },
    /// Step-tracing overhead: end-to-end tokens/s and step time with tracing off, at the
    /// default rates, at 1.0/0 and at 1.0/1.0 (JSON lines to /dev/null; and 1.0/1.0 without a
    /// sink), plus the step-loop cost per sampled step and per snapshot (deterministic model).
    Tracing {
        /// Concurrent requests (all running at once).
        #[arg(long, default_value_t = 256)]
        requests: usize,
        /// Tokens generated per request.
        #[arg(long, default_value_t = 256)]
        output_tokens: usize,
        /// Runs of each configuration (interleaved; the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// The step budget: p50/p99 step time of `builtin:tiny` with the default policy, with a
    /// slow policy under the budget, and with the budget off, side by side.
    Budget {
        /// The slow policy (default: the test policy `stall` of this build, when present).
        #[arg(long, value_name = "PATH.wasm")]
        policy: Option<PathBuf>,
        /// A `key=value` parameter for the slow policy (default: `mode=slow spin=800000`, about 1.1 ms per call).
        #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        args: Vec<(String, String)>,
        /// Requests per round.
        #[arg(long, default_value_t = 192)]
        requests: usize,
        /// Tokens generated per request.
        #[arg(long, default_value_t = 48)]
        output_tokens: usize,
        /// Most requests running at once.
        #[arg(long, default_value_t = 16)]
        max_num_seqs: usize,
        /// Interleaved rounds.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

/// Parses a probability in [0, 1].
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is outside [0, 1]"))
    }
}

/// Parses `--gpu-memory-utilization`: a number in (0, 1].
fn parse_memory_share(text: &str) -> Result<f64, String> {
    let share = parse_rate(text)?;
    if share > 0.0 {
        Ok(share)
    } else {
        Err("0 leaves no memory for the model; give a share in (0, 1]".to_string())
    }
}

/// Parses a share of the step: a finite number in [0, 1].
pub fn parse_share(text: &str) -> Result<f64, String> {
    parse_rate(text)
}

pub use crate::policy::params::parse_key_value;

/// Parses a positive, finite number of seconds (`30`, `2.5`).
fn parse_positive_seconds(text: &str) -> Result<std::time::Duration, String> {
    match parse_seconds(text)? {
        std::time::Duration::ZERO => {
            Err(format!("`{text}`: the number of seconds must be above 0"))
        }
        seconds => Ok(seconds),
    }
}

/// Parses a non-negative, finite number of seconds (`30`, `2.5`, `0`).
fn parse_seconds(text: &str) -> Result<std::time::Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    std::time::Duration::try_from_secs_f64(seconds)
        .map_err(|_| format!("`{text}`: the number of seconds must be finite and not negative"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from([&["stepscope", "serve"], args].concat()).unwrap();
        let Command::Serve(serve) = cli.command else {
            panic!("not serve")
        };
        serve
    }

    #[test]
    fn vllm_flag_pairs_turn_features_on_and_off_the_last_one_winning() {
        let caching = |args: &[&str]| {
            serve(args)
                .engine
                .engine_config(&Device::Cpu)
                .enable_prefix_caching
        };
        assert!(caching(&[]));
        assert!(caching(&["--enable-prefix-caching"]));
        assert!(!caching(&["--no-enable-prefix-caching"]));
        assert!(caching(&[
            "--no-enable-prefix-caching",
            "--enable-prefix-caching"
        ]));
        assert!(!caching(&[
            "--enable-prefix-caching",
            "--no-enable-prefix-caching"
        ]));
        let tracing = |args: &[&str]| serve(args).step_tracing.settings().enabled;
        assert!(!tracing(&[]));
        assert!(tracing(&["--step-tracing-enabled"]));
        assert!(!tracing(&["--no-step-tracing-enabled"]));
        assert!(!tracing(&[
            "--step-tracing-enabled",
            "--no-step-tracing-enabled"
        ]));
        assert!(tracing(&[
            "--no-step-tracing-enabled",
            "--step-tracing-enabled"
        ]));
        // A flag that only tunes vLLM's internals is refused, not ignored.
        let refused = Cli::try_parse_from(["stepscope", "serve", "--tensor-parallel-size", "2"]);
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("--tensor-parallel-size")
        );
        // The device is chosen automatically unless asked; --enforce-eager turns CUDA graphs off.
        assert_eq!(serve(&[]).engine.device, DeviceArg::Auto);
        assert!(!serve(&[]).engine.enforce_eager);
        let eager = LaunchConfig::try_from(&serve(&["--enforce-eager", "--device", "cpu"]).engine)
            .expect("launch config");
        assert!(eager.enforce_eager);
    }

    #[test]
    fn batch_defaults_follow_vllms_serve_per_device_and_flags_override_them() {
        let gpu = |name: &str, gib: usize| {
            Device::Cuda(crate::backend::cuda::DeviceSummary {
                num_devices: 1,
                name: name.to_string(),
                compute_capability: (9, 0),
                total_memory_bytes: gib << 30,
                driver_version: 13000,
                nvrtc_version: (13, 0),
            })
        };
        let config = |args: &[&str], device: &Device| {
            let c = serve(args).engine.engine_config(device);
            (c.max_num_seqs, c.max_num_batched_tokens, c.num_kv_blocks)
        };
        assert_eq!(
            config(&[], &Device::Cpu),
            (128, 2048, DEFAULT_CPU_KV_BLOCKS)
        );
        assert_eq!(config(&[], &gpu("NVIDIA H100 80GB HBM3", 80)).0, 1024);
        assert_eq!(config(&[], &gpu("NVIDIA H100 80GB HBM3", 80)).1, 8192);
        assert_eq!(config(&[], &gpu("NVIDIA A100-SXM4-80GB", 80)).0, 256);
        assert_eq!(config(&[], &gpu("NVIDIA L4", 24)).0, 256);
        // As vLLM, the default number of sequences never exceeds the step's token budget.
        assert_eq!(
            config(&["--max-num-batched-tokens", "64"], &Device::Cpu).0,
            64
        );
        assert_eq!(
            config(
                &[
                    "--max-num-seqs",
                    "7",
                    "--max-num-batched-tokens",
                    "300",
                    "--num-kv-blocks",
                    "9"
                ],
                &Device::Cpu
            ),
            (7, 300, 9)
        );
        // --num-kv-blocks is an override; without it the pool is sized from GPU memory.
        let kv_pool = |args: &[&str]| {
            LaunchConfig::try_from(&serve(&[args, &["--device", "cpu"]].concat().to_vec()).engine)
                .map(|l| l.kv_pool)
                .unwrap()
        };
        assert_eq!(kv_pool(&[]), KvPoolSize::DeviceMemoryShare(0.9));
        assert_eq!(
            kv_pool(&["--gpu-memory-utilization", "0.5"]),
            KvPoolSize::DeviceMemoryShare(0.5)
        );
        assert_eq!(
            kv_pool(&["--num-kv-blocks", "10"]),
            KvPoolSize::AsConfigured
        );
        for bad in ["0", "1.5", "-1", "x"] {
            let refused =
                Cli::try_parse_from(["stepscope", "serve", "--gpu-memory-utilization", bad]);
            assert!(refused.is_err(), "{bad} accepted");
        }
        let dtype = |value: &str| ModelDtype::from(serve(&["--dtype", value]).engine.dtype);
        assert_eq!(dtype("half"), ModelDtype::Float16);
        assert_eq!(dtype("bfloat16"), ModelDtype::BFloat16);
        assert_eq!(dtype("float"), ModelDtype::Float32);
        assert!(Cli::try_parse_from(["stepscope", "serve", "--dtype", "fp8"]).is_err());
    }

    #[test]
    fn an_unknown_otlp_protocol_is_refused() {
        assert!(
            Cli::try_parse_from(["stepscope", "serve", "--otlp-protocol", "udp"]).is_err(),
            "unknown protocol accepted"
        );
    }

    #[test]
    fn rates_outside_unit_interval_are_refused() {
        for bad in ["1.5", "-0.1", "NaN", "abc"] {
            let result =
                Cli::try_parse_from(["stepscope", "serve", "--step-tracing-sample-rate", bad]);
            assert!(result.is_err(), "{bad} accepted");
        }
        let err = Cli::try_parse_from([
            "stepscope",
            "serve",
            "--step-tracing-rich-subsample-rate",
            "2",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("outside [0, 1]"), "{err}");
    }

    #[test]
    fn policy_args_reach_the_configure_parameters() {
        let cli = Cli::try_parse_from([
            "stepscope",
            "serve",
            "--step-tracing-sample-rate",
            "0.25",
            "--step-tracing-rich-subsample-rate",
            "0.5",
            "--step-tracing-policy-arg",
            "threshold=0.9",
            "--step-tracing-policy-arg",
            "mode=x=y",
        ])
        .unwrap();
        let Command::Serve(serve) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(
            serve.step_tracing.policy_params().to_configure(),
            vec![
                ("sample_rate".into(), "0.25".into()),
                ("rich_subsample_rate".into(), "0.5".into()),
                ("journey_sample_rate".into(), "1".into()),
                ("threshold".into(), "0.9".into()),
                ("mode".into(), "x=y".into()),
            ]
        );
        assert!(parse_key_value("novalue").is_err());
    }

    #[test]
    fn shutdown_timeout_takes_seconds() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["stepscope", "serve"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Serve(serve) => serve.shutdown_timeout,
                _ => panic!("not serve"),
            })
        };
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(
            parse(&["--shutdown-timeout", "2.5"]).unwrap(),
            Some(std::time::Duration::from_millis(2500))
        );
        assert_eq!(
            parse(&["--shutdown-timeout", "0"]).unwrap(),
            Some(std::time::Duration::ZERO)
        );
        for bad in ["-1", "inf", "NaN", "soon"] {
            assert!(
                parse(&["--shutdown-timeout", bad]).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn http_flags_reach_the_server_config() {
        use crate::server::http::HttpConfig;
        use std::time::Duration;
        let parse = |args: &[&str]| {
            let mut argv = vec!["stepscope", "serve"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Serve(serve) => serve.http.config(),
                _ => panic!("not serve"),
            })
        };
        assert_eq!(parse(&[]).unwrap(), HttpConfig::default());
        assert_eq!(
            parse(&[
                "--http-read-timeout",
                "2.5",
                "--max-request-body-bytes",
                "1024",
                "--health-stall-timeout",
                "7"
            ])
            .unwrap(),
            HttpConfig {
                read_timeout: Duration::from_millis(2500),
                max_body_bytes: 1024,
                health_stall_timeout: Duration::from_secs(7),
            }
        );
        for bad in [
            ["--http-read-timeout", "0"],
            ["--health-stall-timeout", "-1"],
            ["--max-request-body-bytes", "0"],
            ["--max-request-body-bytes", "lots"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn device_arg_parses() {
        assert_eq!("cpu".parse::<DeviceArg>(), Ok(DeviceArg::Cpu));
        assert_eq!("CUDA".parse::<DeviceArg>(), Ok(DeviceArg::Cuda));
        assert_eq!("auto".parse::<DeviceArg>(), Ok(DeviceArg::Auto));
        assert!(
            "tpu"
                .parse::<DeviceArg>()
                .unwrap_err()
                .contains("cpu, cuda or auto")
        );
        assert_eq!(DeviceArg::default().to_string(), "auto");
    }
}
