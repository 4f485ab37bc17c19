//! The `stepscope` binary: parses the command line and runs the chosen command.

use anyhow::Context;
use clap::Parser;
use std::process::ExitCode;
use std::sync::Arc;
use stepscope::cli::{BenchCommand, Cli, Command, PolicyCommand, TraceCommand};
use stepscope::policy::{
    PolicyCounters, PolicyModule, PolicyParams, PolicyRuntime, PolicySource, devkit::conformance,
};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and pipes get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Serve(args) => stepscope::server::run(args.to_config()?),
        Command::Trace(command) => run_trace(command),
        Command::Policy(PolicyCommand::Check(args)) => {
            let source = PolicySource::File(args.file.clone());
            let module = PolicyModule::load(&source, args.limits.limits())?;
            let suite = conformance::SuiteParams {
                params: args
                    .params
                    .params(PolicyParams::rates(0.5, 0.5))
                    .to_configure(),
                seed: args.seed,
                steps: args.steps,
                measure_latency: true,
                time_limit: std::time::Duration::from_secs(args.time_limit_s),
            };
            let report = conformance::check(&module, &suite)?;
            println!("{report}");
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Policy(PolicyCommand::Replay(args)) => run_replay(args),
        Command::Policy(PolicyCommand::Run(args)) => {
            let source = if args.file == "builtin:default" {
                PolicySource::BuiltinDefault
            } else {
                PolicySource::File(args.file.clone().into())
            };
            let module = PolicyModule::load(&source, args.limits.limits())?;
            let params = args.params.params(PolicyParams::default());
            let counters = Arc::new(PolicyCounters::default());
            let mut runtime = PolicyRuntime::new(module, params.to_configure(), counters.clone())
                .context("starting the policy")?;
            let report = conformance::run(&mut runtime, args.seed, args.steps);
            println!(
                "policy {} ({})",
                runtime.module().name(),
                runtime.module().digest()
            );
            println!("steps: {}", report.steps);
            println!(
                "batch-sampled: {} (rate {:.6}; configured {})",
                report.batch,
                report.batch_rate(),
                params.sample_rate
            );
            println!(
                "rich-sampled: {} (rate {:.6}; configured product {:.6})",
                report.rich,
                report.rich_rate(),
                params.sample_rate * params.rich_subsample_rate
            );
            println!(
                "faults: {}, steps skipped in back-off: {}",
                report.faults, report.backing_off
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Model {
            model,
            batch,
            dtype,
            json,
        }) => {
            let model = model.unwrap_or_else(|| {
                stepscope::bench::model::default_bench_model(std::path::Path::new("."))
            });
            let storage = stepscope::backend::cpu_matrix_storage(
                &stepscope::backend::Device::Cpu,
                dtype.into(),
            );
            stepscope::bench::model::cpu_throughput_bench(&model, &batch, storage, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Scheduler { running }) => {
            for row in stepscope::bench::scheduler::scheduler_bench(&running) {
                println!("{row}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Tracing {
            requests,
            output_tokens,
            rounds,
        }) => {
            use stepscope::bench::step_tracing;
            let rows = step_tracing::run(requests, output_tokens, rounds)?;
            let costs = step_tracing::JourneyCosts {
                untraced_decision_ns: step_tracing::unsampled_journey_decision_ns(200_000)?,
                server_path_ns: stepscope::bench::server_path::request_path_ns(500)?,
            };
            print!(
                "{}",
                step_tracing::render(&rows, (requests, output_tokens, rounds), Some(costs))
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Budget {
            policy,
            args,
            requests,
            output_tokens,
            max_num_seqs,
            rounds,
        }) => {
            use stepscope::bench::budget as budget_bench;
            let slow_policy = policy.unwrap_or_else(|| {
                std::path::Path::new(stepscope::policy::GUEST_COMPONENT_DIR).join("stall.wasm")
            });
            anyhow::ensure!(
                slow_policy.is_file(),
                "{}: no such policy; pass --policy PATH.wasm",
                slow_policy.display()
            );
            let slow_args = if args.is_empty() {
                vec![
                    ("mode".to_string(), "slow".to_string()),
                    ("spin".to_string(), "800000".to_string()),
                ]
            } else {
                args
            };
            let params = budget_bench::BudgetBenchParams {
                slow_policy,
                slow_args,
                requests,
                output_tokens,
                max_num_seqs,
                rounds: rounds.max(1),
            };
            let rows = budget_bench::run(&params)?;
            print!("{}", budget_bench::render(&rows, &params));
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Policy {
            policy,
            languages,
            iterations,
            fuel,
        }) if !languages.is_empty() => {
            let _ = policy;
            let languages: Vec<_> = languages
                .into_iter()
                .map(|(name, file)| {
                    let source = if file == "builtin:default" {
                        PolicySource::BuiltinDefault
                    } else {
                        PolicySource::File(file.into())
                    };
                    (name, source)
                })
                .collect();
            let rows =
                stepscope::bench::policy::run_languages(&languages, iterations.max(100), fuel)?;
            print!("{}", stepscope::bench::policy::render(&rows));
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Policy {
            policy, iterations, ..
        }) => {
            let source = PolicySource::from_option(policy.as_deref());
            let rows = stepscope::bench::policy::run(&source, iterations.max(100))?;
            print!("{}", stepscope::bench::policy::render(&rows));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `stepscope generate`: one prompt through the real engine, streamed to stdout (or as JSON).
fn run_generate(args: stepscope::cli::GenerateArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    use stepscope::engine::SamplingParams;
    use stepscope::model::{ChatMessage, DetokenizerOptions};
    use stepscope::step_tracing::{
        RequestInfo, RequestOutcome, RequestSpanRecord, Stamp, StepTracer,
    };
    use stepscope::textgen::TextStream;

    // The same step tracer as `serve`, from the same flags (off unless --step-tracing-enabled).
    let tracing_config = args.step_tracing.to_config(args.engine.seed)?;
    let (observer, mut tracer) = StepTracer::start(tracing_config)?;
    let launched = stepscope::launch::launch(&args.model, &args.engine, Box::new(observer))?;
    let model = &launched.model;
    let prompt_ids = if args.chat {
        model.encode_chat(&[ChatMessage::new("user", args.prompt.clone())])?
    } else {
        model.tokenizer.encode(&args.prompt, true)?
    };
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.sampling_seed,
        ignore_eos: args.ignore_eos,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        repetition_penalty: args.repetition_penalty,
        min_tokens: args.min_tokens,
        logprobs: args.logprobs,
        ..SamplingParams::default()
    };
    let detokenizer = DetokenizerOptions {
        stop: args.stop.clone(),
        min_tokens: args.min_tokens,
        ..DetokenizerOptions::default()
    };
    // With --enable-journey-tracing the prompt is one journey: `llm_request` (operation
    // `generate`) from here to the last token, and its `llm_core`.
    let journey = tracer.journey_sink().map(|sink| {
        let ticket = stepscope::engine::journey::JourneyTicket::new(None, 1);
        (sink, ticket, Stamp::now())
    });
    let mut request = launched.engine.validate(prompt_ids, params.clone())?;
    let request_id = format!("generate-{}", std::process::id());
    request = request.with_external_id(Arc::from(request_id.as_str()));
    if let Some((_, ticket, _)) = &journey {
        request = request.with_journey(Arc::clone(ticket));
    }
    let handoff = Stamp::now();
    let mut stream = TextStream::submit(&launched.engine, model, request, detokenizer)?;
    let mut first_response = None;
    let mut token_ids = Vec::new();
    let mut stdout = std::io::stdout().lock();
    let mut finish_reason = None;
    let mut logprobs = Vec::new();
    while let Some(delta) = stream.blocking_next() {
        first_response.get_or_insert_with(Stamp::now);
        token_ids.extend_from_slice(&delta.token_ids);
        logprobs.extend(delta.logprobs);
        if !args.json {
            stdout.write_all(delta.text.as_bytes())?;
            stdout.flush()?;
        }
        finish_reason = delta.finish_reason.or(finish_reason);
    }
    let text = stream.text().to_string();
    if let Some((sink, ticket, arrived)) = journey {
        let record = RequestSpanRecord {
            info: RequestInfo {
                operation: "generate",
                request_id: request_id.clone(),
                response_id: request_id,
                model: model.name.clone(),
                max_tokens: Some(params.max_tokens as u64),
                temperature: f64::from(params.temperature),
                top_p: f64::from(params.top_p),
                n: 1,
            },
            input_tokens: stream.num_prompt_tokens() as u64,
            output_tokens: stream.num_output_tokens() as u64,
            queue_time_s: stream.queue_time().map(|d| d.as_secs_f64()),
            arrived,
            handoff: Some(handoff),
            first_response,
            end: Stamp::now(),
            outcome: RequestOutcome::Departed,
        };
        ticket.when_traced(move |decision| sink.send(decision, record));
    }
    drop(stream);
    if args.json {
        let finish_reason = finish_reason.map(|r| r.as_str());
        let mut out = serde_json::json!({ "token_ids": token_ids, "text": text, "finish_reason": finish_reason });
        if args.logprobs.is_some() {
            // One entry per token: its log-probability, rank and the top alternatives.
            out["logprobs"] = logprobs
                .iter()
                .map(|lp| {
                    serde_json::json!({
                        "token_id": lp.token_id,
                        "logprob": lp.logprob,
                        "rank": lp.rank,
                        "top": lp.top.iter().map(|&(t, l)| serde_json::json!([t, l])).collect::<Vec<_>>(),
                    })
                })
                .collect();
        }
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout)?;
    }
    launched.engine.shutdown()?;
    tracer.shutdown();
    Ok(ExitCode::SUCCESS)
}

fn run_replay(args: stepscope::cli::PolicyReplayArgs) -> anyhow::Result<ExitCode> {
    let source = if args.file == "builtin:default" {
        PolicySource::BuiltinDefault
    } else {
        PolicySource::File(args.file.clone().into())
    };
    let module = PolicyModule::load(&source, args.limits.limits())?;
    let file = std::fs::File::open(&args.steps)
        .with_context(|| format!("cannot open {}", args.steps.display()))?;
    let steps = stepscope::step_tracing::jsonl::read_recorded_steps(
        std::io::BufReader::new(file),
        args.seed,
    )
    .with_context(|| format!("reading recorded steps from {}", args.steps.display()))?;
    if steps.is_empty() {
        anyhow::bail!("{} holds no recorded steps", args.steps.display());
    }
    let params = args.params.params(PolicyParams::default());
    let counters = Arc::new(PolicyCounters::default());
    let mut runtime = PolicyRuntime::new(module, params.to_configure(), counters)
        .context("starting the policy")?;
    let report = stepscope::policy::devkit::replay::replay(&mut runtime, &steps);
    println!(
        "policy {} ({})",
        runtime.module().name(),
        runtime.module().digest()
    );
    if !args.summary_only {
        for step in &report.sampled {
            let mut line = format!(
                "step {:>8}  {}  p={:.4}",
                step.step_id,
                if step.rich {
                    "batch+rich"
                } else {
                    "batch     "
                },
                step.batch_probability
            );
            if let Some(n) = step.rich_requests {
                line.push_str(&format!("  snapshots={n}"));
            }
            for (key, value) in &step.extra {
                line.push_str(&format!("  {key}={value}"));
            }
            println!("{line}");
        }
    }
    println!(
        "replayed {} recorded steps (step ids {}..={}, {:.3} s of step time)",
        report.steps,
        report.first_step.unwrap_or(0),
        report.last_step.unwrap_or(0),
        report.span_seconds
    );
    let per_second = report.sampled_per_second().map_or(String::new(), |r| {
        format!(", {r:.2} per second of step time")
    });
    println!(
        "batch-sampled: {} (rate {:.6}{per_second})",
        report.sampled.len(),
        report.batch_rate()
    );
    println!(
        "rich-sampled: {} (rate {:.6})",
        report.rich,
        report.rich_rate()
    );
    let reasons: Vec<String> = report
        .reasons
        .iter()
        .map(|(reason, n)| format!("{reason}={n}"))
        .collect();
    println!(
        "by reason: {}",
        if reasons.is_empty() {
            "-".to_string()
        } else {
            reasons.join(" ")
        }
    );
    println!(
        "faults: {}, steps skipped in back-off: {}",
        report.faults, report.backing_off
    );
    // Request arrivals (a --record-steps file written with journey tracing on).
    let file = std::fs::File::open(&args.steps)
        .with_context(|| format!("cannot open {}", args.steps.display()))?;
    let arrivals =
        stepscope::step_tracing::jsonl::read_recorded_arrivals(std::io::BufReader::new(file))
            .with_context(|| format!("reading request arrivals from {}", args.steps.display()))?;
    if !arrivals.is_empty() {
        let journeys = stepscope::policy::devkit::replay::replay_arrivals(&mut runtime, &arrivals);
        if journeys.no_decide_request {
            println!(
                "journeys: {} recorded arrivals; the policy is built against contract 0.1 (no \
                 decide-request): the host decides its journeys by --journey-tracing-sample-rate",
                journeys.arrivals
            );
        } else {
            let reasons: Vec<String> = journeys
                .reasons
                .iter()
                .map(|(reason, n)| format!("{reason}={n}"))
                .collect();
            println!(
                "journeys: {} of {} recorded arrivals traced (rate {:.4}); by reason: {}; \
                 faults: {}, skipped in back-off: {}",
                journeys.traced,
                journeys.arrivals,
                journeys.traced as f64 / journeys.arrivals.max(1) as f64,
                if reasons.is_empty() {
                    "-".to_string()
                } else {
                    reasons.join(" ")
                },
                journeys.faults,
                journeys.backing_off
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `stepscope trace …`: reads a step-trace file and prints or writes what was asked.
fn run_trace(command: TraceCommand) -> anyhow::Result<ExitCode> {
    use stepscope::trace_tools::{Summary, TraceFile, perfetto, report};
    let read = |file: &std::path::Path| -> anyhow::Result<(TraceFile, Summary)> {
        let trace = TraceFile::read(file)?;
        if let Some(line) = trace.truncated_last_line {
            eprintln!(
                "{}: line {line} stops mid-JSON (the writer stopped mid-line); left out",
                file.display()
            );
        }
        let summary = Summary::of(&trace, &file.display().to_string());
        Ok((trace, summary))
    };
    let write = |output: &std::path::Path, text: &str| {
        std::fs::write(output, text).with_context(|| format!("writing {}", output.display()))
    };
    match command {
        TraceCommand::Summary { file, json } => {
            let (_, summary) = read(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", summary.render());
            }
        }
        TraceCommand::Report { file, output } => {
            let (trace, summary) = read(&file)?;
            write(&output, &report::render(&trace, &summary)?)?;
            eprintln!(
                "wrote {} ({} traced steps)",
                output.display(),
                trace.steps.len()
            );
        }
        TraceCommand::Perfetto { file, output } => {
            let (trace, _) = read(&file)?;
            write(&output, &serde_json::to_string(&perfetto::export(&trace))?)?;
            eprintln!(
                "wrote {}: open it in https://ui.perfetto.dev or chrome://tracing",
                output.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
