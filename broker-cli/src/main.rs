//! `broker`: publish, subscribe and run the demo over any micro-broker backend.
//!
//! The backend is picked as in Go Micro: `--broker NAME` (or `MICRO_BROKER`, default `http`)
//! and `--broker-address ADDRS` (or `MICRO_BROKER_ADDRESS`, comma-separated). Each command is one
//! module under `commands/`; the demo's two services are under `demo/`.
//!
//! Exit status: 0 success, 1 error, 2 bad command line, 3 `sub --timeout` expired, 130 / 143
//! `sub` interrupted by SIGINT / SIGTERM (after unsubscribing).
//! Every error is one line on standard error: `broker: <error>`.
//!
//! `RUST_LOG` (e.g. `RUST_LOG=broker_registry=debug`) shows the library's diagnostics, such as
//! retried or dropped deliveries, on standard error; without it nothing else is printed there.

mod cli;
mod commands;
mod demo;
mod error;
mod output;

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::CliError;

fn main() -> ExitCode {
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return error::report_clap(err),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => error::report(&err),
    }
}

/// Logs to standard error when `RUST_LOG` is set (a filter that does not parse is reported and
/// ignored); silent otherwise, so that scripts reading the output see only the command's own.
fn init_logging() {
    let Some(filter) = std::env::var_os(tracing_subscriber::EnvFilter::DEFAULT_ENV) else { return };
    match tracing_subscriber::EnvFilter::try_new(filter.to_string_lossy()) {
        Ok(filter) => {
            let colors = std::io::stderr().is_terminal();
            let logger =
                tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colors).with_writer(std::io::stderr);
            let _ = logger.try_init();
        }
        Err(e) => eprintln!("broker: ignoring RUST_LOG ({e})"),
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::List(args) => commands::list::run(&args),
        Command::Pub(args) => commands::publish::run(&cli.broker, args),
        Command::Sub(args) => commands::subscribe::run(&cli.broker, args),
        Command::Demo(args) => demo::run(&cli.broker, args),
        Command::Bench(args) => commands::bench::run(&cli.broker, args),
    }
}

/// Runs `future` to completion on a small multi-threaded runtime.
pub(crate) fn block_on<F: Future>(future: F) -> Result<F::Output, CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::io("cannot start the async runtime", e))?;
    Ok(runtime.block_on(future))
}
