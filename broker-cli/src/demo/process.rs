//! The email service as a child process of the user service: starting it, reading its output,
//! and waiting for it, always with a bound.
//!
//! The child is this same program, `broker demo --role email-service --run-id ID ...`, with the
//! parent's environment and its backend named explicitly. Its standard output carries its
//! welcome-email lines, which the parent prints as they come, and two protocol lines, which the
//! parent reads: [`READY`] once it is subscribed, [`REPORT`] with its counts at the end. Its
//! standard error is printed by the parent, each line prefixed with `email-service: `.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use micro_broker::{ENV_BROKER, ENV_BROKER_ADDRESS};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Deliveries, DemoArgs};
use crate::cli::BrokerArgs;
use crate::error::CliError;
use crate::output::say;

/// The line the email service prints once it is subscribed.
pub(crate) const READY: &str = "demo-protocol: ready";
/// The start of the line with the email service's counts, followed by JSON.
pub(crate) const REPORT: &str = "demo-protocol: report ";
/// How long the email service may take, after its last wait, to unsubscribe, report and exit.
pub(crate) const EXIT_MARGIN: Duration = Duration::from_secs(5);

/// What the parent learns from the child's standard output.
enum FromChild {
    Ready,
    Report(Result<Deliveries, String>),
}

/// A running email service process. Dropping it kills the process.
pub(crate) struct EmailProcess {
    child: tokio::process::Child,
    pid: u32,
    from_child: mpsc::UnboundedReceiver<FromChild>,
    forwarders: Vec<JoinHandle<()>>,
}

impl EmailProcess {
    /// Starts `broker demo --role email-service` over `backend`, for run `run_id`.
    pub(crate) fn start(
        broker_args: &BrokerArgs,
        backend: &str,
        args: &DemoArgs,
        run_id: &str,
    ) -> Result<Self, CliError> {
        let program = std::env::current_exe()
            .map_err(|e| CliError::io("cannot find this program's path to start the email service", e))?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(child_args(broker_args, backend, args, run_id))
            // The backend and its address are given on the command line (see `child_args`).
            .env_remove(ENV_BROKER)
            .env_remove(ENV_BROKER_ADDRESS)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|e| CliError::io("cannot start the email service process", e))?;
        let pid = child.id().unwrap_or_default();
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(CliError::Failed("the email service process has no output pipes".into()));
        };
        let (tx, from_child) = mpsc::unbounded_channel();
        let forwarders = vec![
            tokio::spawn(read_stdout(stdout, tx)),
            tokio::spawn(forward_lines(stderr, |line| eprintln!("email-service: {line}"))),
        ];
        Ok(EmailProcess { child, pid, from_child, forwarders })
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits up to `timeout` for the child to say it is subscribed; kills it if it does not.
    pub(crate) async fn wait_ready(&mut self, timeout: Duration) -> Result<(), CliError> {
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.from_child.recv()).await {
                Ok(Some(FromChild::Ready)) => return Ok(()),
                Ok(Some(FromChild::Report(_))) => {}
                Ok(None) => {
                    let status = self.exit_status(deadline).await?;
                    return Err(CliError::Failed(format!(
                        "the email service (pid {}) exited before it subscribed ({status})",
                        self.pid
                    )));
                }
                Err(_elapsed) => {
                    self.kill().await;
                    return Err(CliError::Failed(format!(
                        "the email service (pid {}) did not subscribe within {timeout:?}; killed it",
                        self.pid
                    )));
                }
            }
        }
    }

    /// Waits up to `limit` for the child's report and exit; kills it if it takes longer.
    pub(crate) async fn finish(mut self, limit: Duration) -> Result<Deliveries, CliError> {
        let deadline = Instant::now() + limit;
        let mut report = None;
        loop {
            match tokio::time::timeout_at(deadline, self.from_child.recv()).await {
                Ok(Some(FromChild::Report(counts))) => report = Some(counts),
                Ok(Some(FromChild::Ready)) => {}
                // Standard output closed: the child is exiting.
                Ok(None) => break,
                Err(_elapsed) => {
                    self.kill().await;
                    return Err(CliError::Failed(format!(
                        "the email service (pid {}) did not finish within {limit:?}; killed it",
                        self.pid
                    )));
                }
            }
        }
        let status = self.exit_status(deadline).await?;
        // Its standard error is closed too now: let the last lines be printed.
        for forwarder in self.forwarders.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(1), forwarder).await;
        }
        match report {
            Some(Ok(counts)) if status.success() => Ok(counts),
            Some(Err(error)) => Err(CliError::Failed(format!("the email service's report is unreadable: {error}"))),
            _ if !status.success() => {
                Err(CliError::Failed(format!("the email service (pid {}) failed ({status})", self.pid)))
            }
            _ => Err(CliError::Failed(format!("the email service (pid {}) exited without its report", self.pid))),
        }
    }

    /// The child's exit status, waiting until `deadline` at most (then killing it).
    async fn exit_status(&mut self, deadline: Instant) -> Result<ExitStatus, CliError> {
        match tokio::time::timeout_at(deadline, self.child.wait()).await {
            Ok(status) => status.map_err(|e| CliError::io("cannot wait for the email service process", e)),
            Err(_elapsed) => {
                self.kill().await;
                Err(CliError::Failed(format!("the email service (pid {}) did not exit in time; killed it", self.pid)))
            }
        }
    }

    /// Kills the child (SIGKILL to its pid) and reaps it.
    async fn kill(&mut self) {
        // Fails only if it already exited, which is what we want anyway.
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

impl Drop for EmailProcess {
    fn drop(&mut self) {
        for forwarder in &self.forwarders {
            forwarder.abort();
        }
    }
}

/// `demo --role email-service ...` with this run's settings and the backend named explicitly.
/// The address of the http and grpc backends is where a process listens, so the email service does not get the
/// user service's one (unless it is a port-0 address: any free port).
fn child_args(broker_args: &BrokerArgs, backend: &str, args: &DemoArgs, run_id: &str) -> Vec<String> {
    let mut child_args = vec![
        "demo".to_string(),
        "--role".into(),
        "email-service".into(),
        "--run-id".into(),
        run_id.into(),
        "--users".into(),
        args.users.to_string(),
        "--timeout".into(),
        args.timeout.as_secs_f64().to_string(),
        "--broker".into(),
        backend.into(),
    ];
    let address = broker_args.address.as_deref().map(str::trim).filter(|a| !a.is_empty());
    let shareable = |address: &str| {
        !crate::cli::is_peer_to_peer(backend) || address.parse::<std::net::SocketAddr>().is_ok_and(|a| a.port() == 0)
    };
    if let Some(address) = address.filter(|a| shareable(a)) {
        child_args.extend(["--broker-address".into(), address.into()]);
    }
    child_args
}

/// Reads the child's standard output: protocol lines go to `tx`, the others are printed.
async fn read_stdout(stdout: impl AsyncRead + Unpin, tx: mpsc::UnboundedSender<FromChild>) {
    forward_lines(stdout, |line| {
        let message = if line == READY {
            Some(FromChild::Ready)
        } else {
            line.strip_prefix(REPORT)
                .map(|json| FromChild::Report(serde_json::from_str(json).map_err(|e| format!("{e}: {json}"))))
        };
        match message {
            // The receiver is gone only once the demo is over.
            Some(message) => {
                let _ = tx.send(message);
            }
            None => say!("{line}"),
        }
    })
    .await
}

/// Calls `each` on every line of `pipe` (any bytes, shown lossily) until it closes or fails.
async fn forward_lines(pipe: impl AsyncRead + Unpin, mut each: impl FnMut(&str)) {
    let mut lines = BufReader::new(pipe).split(b'\n');
    while let Ok(Some(line)) = lines.next_segment().await {
        let line = String::from_utf8_lossy(&line);
        each(line.strip_suffix('\r').unwrap_or(&line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parsed(argv: &[&str]) -> (BrokerArgs, DemoArgs) {
        match crate::cli::Cli::try_parse_from(argv).unwrap() {
            crate::cli::Cli { broker, command: crate::cli::Command::Demo(demo) } => (broker, demo),
            other => panic!("not a demo: {other:?}"),
        }
    }

    #[test]
    fn child_gets_the_run_and_the_backend() {
        let (broker, demo) = parsed(&["broker", "demo", "--users", "3", "--timeout", "2.5"]);
        let args = child_args(&broker, "http", &demo, "abc123");
        assert_eq!(
            args,
            [
                "demo",
                "--role",
                "email-service",
                "--run-id",
                "abc123",
                "--users",
                "3",
                "--timeout",
                "2.5",
                "--broker",
                "http"
            ]
        );
        // The child's arguments parse.
        let mut argv = vec!["broker".to_string()];
        argv.extend(args);
        crate::cli::Cli::try_parse_from(argv).unwrap();
    }

    #[test]
    fn http_listen_addresses_are_not_shared() {
        let (broker, demo) = parsed(&["broker", "--broker-address", "127.0.0.1:8080", "demo"]);
        assert!(!child_args(&broker, "http", &demo, "r").contains(&"--broker-address".to_string()));
        let (broker, demo) = parsed(&["broker", "--broker-address", "0.0.0.0:0", "demo"]);
        assert!(child_args(&broker, "http", &demo, "r").ends_with(&["--broker-address".into(), "0.0.0.0:0".into()]));
        let (broker, demo) = parsed(&["broker", "--broker-address", "nats://a:4222,nats://b:4222", "demo"]);
        assert!(child_args(&broker, "nats", &demo, "r").contains(&"nats://a:4222,nats://b:4222".to_string()));
    }
}
