//! The CLI's errors, their exit status, and how they are reported: one line on standard error.

use std::process::ExitCode;

/// What can make a command fail.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The broker (or the plugin registry) reported an error.
    #[error(transparent)]
    Broker(#[from] micro_broker::Error),
    /// Reading standard input, writing standard output, or starting the runtime failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// `sub --timeout` expired.
    #[error("{0}")]
    Timeout(String),
    /// The command ran but did not achieve what it checks (the demo's exactly-once delivery).
    #[error("{0}")]
    Failed(String),
    /// `sub` was stopped by a signal (after it unsubscribed): the message, and the exit status
    /// (128 + the signal number, as shells report it).
    #[error("{0}")]
    Interrupted(String, u8),
}

impl CliError {
    /// An I/O error with what was being done.
    pub(crate) fn io(what: &'static str, source: std::io::Error) -> Self {
        CliError::Io { what, source }
    }

    /// The process exit status for this error.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            CliError::Timeout(_) => 3,
            CliError::Interrupted(_, code) => *code,
            _ => 1,
        }
    }

    /// True for a closed standard output (`broker sub t | head -1`): not worth a message.
    fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// Prints `err` as one line, `broker: <error>`, and returns its exit status.
pub(crate) fn report(err: &CliError) -> ExitCode {
    if err.is_broken_pipe() {
        return ExitCode::SUCCESS;
    }
    eprintln!("broker: {}", one_line(&error_chain(err)));
    ExitCode::from(err.exit_code())
}

/// The error and its sources, each source appended unless the text already says it.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// Collapses every run of whitespace (newlines included) into one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reports a command-line error: help and version as clap prints them, any other error as
/// one line `broker: <what was wrong> (see --help)` with exit status 2.
pub(crate) fn report_clap(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Printing help can only fail on a closed stream: nothing left to tell anyone.
            let _ = err.print();
            ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2))
        }
        _ => {
            eprintln!("broker: {} (see --help)", clap_summary(&err.to_string()));
            ExitCode::from(2)
        }
    }
}

/// The first paragraph of clap's error text, without the `error: ` prefix, on one line.
fn clap_summary(rendered: &str) -> String {
    let first = rendered.split("\n\n").next().unwrap_or(rendered);
    one_line(first.trim().strip_prefix("error:").unwrap_or(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_become_one_line() {
        let text = "error: the following required arguments were not provided:\n  <TOPIC>\n\nUsage: broker sub <TOPIC>\n\nFor more information, try '--help'.\n";
        assert_eq!(clap_summary(text), "the following required arguments were not provided: <TOPIC>");
        let text = "error: unexpected argument '--nope' found\n\n  tip: to pass '--nope' as a value, use '-- --nope'\n";
        assert_eq!(clap_summary(text), "unexpected argument '--nope' found");
    }

    #[test]
    fn sources_are_appended_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let err = CliError::from(
            micro_broker::Error::new(micro_broker::ErrorKind::Connection, "cannot reach 127.0.0.1:1").with_source(io),
        );
        assert_eq!(error_chain(&err), "connection error: cannot reach 127.0.0.1:1: connection refused");
        let err = CliError::io("cannot read standard input", std::io::Error::other("boom"));
        assert_eq!(error_chain(&err), "cannot read standard input: boom");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(CliError::Timeout("t".into()).exit_code(), 3);
        assert_eq!(CliError::Failed("f".into()).exit_code(), 1);
        assert_eq!(CliError::Interrupted("i".into(), 130).exit_code(), 130);
        assert!(CliError::io("w", std::io::ErrorKind::BrokenPipe.into()).is_broken_pipe());
    }
}
