//! The command line: global broker flags (as Go Micro's) and the subcommands.

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use micro_broker::http::HttpBroker;
use micro_broker::{Broker, BrokerOptions, ENV_BROKER, ENV_BROKER_ADDRESS};

use crate::commands::{bench::BenchArgs, list::ListArgs, publish::PubArgs, subscribe::SubArgs};
use crate::demo::DemoArgs;
use crate::error::CliError;

const AFTER_HELP: &str = "\
Backend: --broker or MICRO_BROKER (default http); its addresses: --broker-address or
MICRO_BROKER_ADDRESS. The http backend finds subscribers through the registry named by
MICRO_REGISTRY (memory | local | etcd; default local) at MICRO_REGISTRY_ADDRESS.

Exit status: 0 on success, 1 on an error, 2 on a bad command line, 3 when `sub --timeout` expires,
130 / 143 when `sub` is interrupted (SIGINT / SIGTERM; it unsubscribes first).
Errors are reported as one line on standard error: `broker: <error>`.";

/// Publish, subscribe and run the demo over any micro-broker backend.
#[derive(Debug, Parser)]
#[command(name = "broker", version, after_help = AFTER_HELP)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// List the backends linked into this program, with their capabilities.
    List(ListArgs),
    /// Publish a message (the body from the command line or standard input).
    #[command(name = "pub")]
    Pub(PubArgs),
    /// Subscribe to a topic and print each message as one JSON line.
    Sub(SubArgs),
    /// Run the demo: a user service publishes `user.registered` events, an email service in a
    /// second process welcomes each user (one process over the memory backend).
    Demo(DemoArgs),
    /// Measure a backend: throughput, latency, memory, loss; with --baseline, against its raw client.
    Bench(BenchArgs),
}

/// A broker and, for the http backend, the same broker as an [`HttpBroker`] (for its counters).
pub(crate) type BrokerWithHttpStats = (Arc<dyn Broker>, Option<Arc<HttpBroker>>);

/// Which backend to use, and where it is: Go Micro's `--broker` and `--broker_address`.
#[derive(Debug, Args)]
pub(crate) struct BrokerArgs {
    /// Broker for pub/sub: the backend's name, see `broker list` [default: http]
    #[arg(long = "broker", value_name = "NAME", env = ENV_BROKER, global = true)]
    pub(crate) name: Option<String>,
    /// Comma-separated list of broker addresses (for http: the listen address) [default: the backend's own]
    #[arg(long = "broker-address", value_name = "ADDRS", env = ENV_BROKER_ADDRESS, global = true, hide_env_values = true)]
    pub(crate) address: Option<String>,
}

impl BrokerArgs {
    /// The backend name: the flag, else `MICRO_BROKER`, else the default; trimmed.
    pub(crate) fn backend_name(&self) -> String {
        micro_broker::backend_name(|key: &str| if key == ENV_BROKER { self.name.clone() } else { None })
    }

    /// The broker options: the address list, everything else the defaults.
    pub(crate) fn options(&self) -> BrokerOptions {
        let addresses = self.address.as_deref().map(micro_broker::parse_addresses).unwrap_or_default();
        BrokerOptions::new().with_addresses(addresses)
    }

    /// Builds the selected backend through the plugin registry (not connected yet).
    pub(crate) fn build(&self) -> Result<Arc<dyn Broker>, CliError> {
        Ok(micro_broker::from_name(&self.backend_name(), self.options())?)
    }

    /// Like [`BrokerArgs::build`], and for the http backend also the [`HttpBroker`] itself, whose
    /// counters say what was delivered and what was dropped.
    pub(crate) fn build_with_http_stats(&self) -> Result<BrokerWithHttpStats, CliError> {
        if self.backend_name() == micro_broker::http::NAME {
            let http = Arc::new(HttpBroker::with_options(self.options())?);
            return Ok((Arc::clone(&http) as Arc<dyn Broker>, Some(http)));
        }
        Ok((self.build()?, None))
    }
}

/// Whether `backend` has no server (`http`, `grpc`): each process listens on its own address,
/// finds subscribers through a registry, and keeps what waits for one in its inbox.
pub(crate) fn is_peer_to_peer(backend: &str) -> bool {
    matches!(backend, "http" | "grpc")
}

/// Parses a positive number of seconds, fractions allowed (`1`, `0.5`).
pub(crate) fn parse_seconds(value: &str) -> Result<Duration, String> {
    let secs: f64 = value.trim().parse().map_err(|_| format!("expected a number of seconds, got {value:?}"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("the number of seconds must be greater than zero, got {value:?}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{value:?} is not a usable number of seconds: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_pick_backend_and_addresses() {
        let cli =
            Cli::try_parse_from(["broker", "--broker", " memory ", "--broker-address", "a:1, b:2,", "list"]).unwrap();
        assert_eq!(cli.broker.backend_name(), "memory");
        assert_eq!(cli.broker.options().addresses, vec!["a:1", "b:2"]);
    }

    #[test]
    fn global_flags_also_work_after_the_subcommand() {
        let cli = Cli::try_parse_from(["broker", "list", "--broker", "nats"]).unwrap();
        assert_eq!(cli.broker.backend_name(), "nats");
    }

    #[test]
    fn blank_name_is_the_default() {
        let args = BrokerArgs { name: Some("  ".into()), address: None };
        assert_eq!(args.backend_name(), micro_broker::DEFAULT_BACKEND);
        let args = BrokerArgs { name: None, address: None };
        assert_eq!(args.backend_name(), micro_broker::DEFAULT_BACKEND);
        assert!(args.options().addresses.is_empty());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_seconds("0.25").unwrap(), Duration::from_millis(250));
        for bad in ["0", "-1", "x", "NaN", "inf", ""] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }
}
