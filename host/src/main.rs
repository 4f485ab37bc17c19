//! The `stepscope` binary: parses the command line and runs the chosen command.

use anyhow::Context;
use clap::Parser;
use std::process::ExitCode;
use std::sync::Arc;
use stepscope::cli::{BenchCommand, Cli, Command, PolicyCommand};
use stepscope::policy::{
    PolicyCounters, PolicyLimits, PolicyModule, PolicyRuntime, PolicySource, conformance,
};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
        Command::Serve(_) => {
            eprintln!(
                "stepscope serve is not yet available: the serving issue has not landed yet."
            );
            Ok(ExitCode::from(2))
        }
        Command::Policy(PolicyCommand::Check(args)) => {
            let source = PolicySource::File(args.file.clone());
            let module = PolicyModule::load(&source, PolicyLimits::default())?;
            let suite = conformance::SuiteParams {
                params: stepscope::cli::policy_params(
                    args.sample_rate,
                    args.rich_subsample_rate,
                    &args.args,
                ),
                seed: args.seed,
                steps: args.steps,
            };
            let report = conformance::check(&module, &suite)?;
            println!("{report}");
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Policy(PolicyCommand::Run(args)) => {
            let source = if args.file == "builtin:default" {
                PolicySource::BuiltinDefault
            } else {
                PolicySource::File(args.file.clone().into())
            };
            let module = PolicyModule::load(&source, PolicyLimits::default())?;
            let params = stepscope::cli::policy_params(
                args.sample_rate,
                args.rich_subsample_rate,
                &args.args,
            );
            let counters = Arc::new(PolicyCounters::default());
            let mut runtime = PolicyRuntime::new(module, params, counters.clone())
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
                args.sample_rate
            );
            println!(
                "rich-sampled: {} (rate {:.6}; configured product {:.6})",
                report.rich,
                report.rich_rate(),
                args.sample_rate * args.rich_subsample_rate
            );
            println!(
                "faults: {}, steps skipped in back-off: {}",
                report.faults, report.backing_off
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Scheduler { running }) => {
            for row in stepscope::engine::bench::scheduler_bench(&running) {
                println!("{row}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Policy { policy, iterations }) => {
            let source = PolicySource::from_option(policy.as_deref());
            let rows = stepscope::bench::policy::run(&source, iterations.max(100))?;
            print!("{}", stepscope::bench::policy::render(&rows));
            Ok(ExitCode::SUCCESS)
        }
    }
}
