//! `broker pub TOPIC [BODY | -] [-H KEY=VALUE]... [--count N]`: publishes one message N times.
//!
//! Over the http backend a message waits in this process until a subscriber takes it, and
//! `disconnect` delivers what it can before the command exits; what found no subscriber by then
//! is discarded, and the command says so (from the backend's counters).

use std::io::{IsTerminal, Read};

use clap::Args;
use micro_broker::{Message, PublishOptions};

use crate::cli::BrokerArgs;
use crate::error::CliError;

/// Arguments of `broker pub`.
#[derive(Debug, Args)]
pub(crate) struct PubArgs {
    /// The topic to publish to.
    topic: String,
    /// The message body; `-` or nothing reads it from standard input (any bytes).
    body: Option<String>,
    /// A message header, as KEY=VALUE (repeat for more).
    #[arg(short = 'H', long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Publish the message this many times.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
}

/// Parses `KEY=VALUE` (the value may be empty and may contain `=`; the key may not be empty).
pub(crate) fn parse_header(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, _)) if key.trim().is_empty() => {
            Err(format!("header {value:?} has an empty name; expected KEY=VALUE"))
        }
        Some((key, val)) => Ok((key.trim().to_string(), val.to_string())),
        None => Err(format!("header {value:?} has no '='; expected KEY=VALUE")),
    }
}

/// Reads the body, connects, publishes `count` times, disconnects.
pub(crate) fn run(broker_args: &BrokerArgs, args: PubArgs) -> Result<(), CliError> {
    // Everything that can fail without I/O fails before standard input is read.
    let (broker, http) = broker_args.build_with_http_stats()?;
    micro_broker::validate_topic(&args.topic)?;
    let body = match args.body.as_deref() {
        None | Some("-") => read_stdin()?,
        Some(text) => text.as_bytes().to_vec(),
    };
    let mut message = Message::new(body);
    message.headers.extend(args.headers);
    let backend = broker.name();
    crate::block_on(async {
        broker.connect().await?;
        let mut published = Ok(());
        for _ in 0..args.count {
            published = broker.publish(&args.topic, message.clone(), PublishOptions::default()).await;
            if published.is_err() {
                break;
            }
        }
        let disconnected = broker.disconnect().await;
        published.and(disconnected)
    })??;
    let plural = if args.count == 1 { "" } else { "s" };
    eprintln!("published {} message{plural} to {:?} over {backend}", args.count, args.topic);
    if let Some(http) = http {
        for note in http_notes(&args.topic, http.stats()) {
            eprintln!("{note}");
        }
    }
    if backend == "memory" {
        eprintln!("note: the memory backend keeps messages inside this process: no other process receives them");
    }
    Ok(())
}

/// What became of the messages over http, when not all of them reached a subscriber.
fn http_notes(topic: &str, stats: micro_broker::http::HttpStats) -> Vec<String> {
    let mut notes = Vec::new();
    if stats.inbox_dropped > 0 {
        notes.push(format!(
            "note: {} message(s) found no subscriber of {topic:?} before this process ended and were discarded \
             (the http backend keeps a waiting message only in the memory of the process that published it)",
            stats.inbox_dropped
        ));
    }
    if stats.delivery_dropped > 0 {
        notes.push(format!(
            "note: {} deliveries were given up (a subscriber refused them or stayed unreachable)",
            stats.delivery_dropped
        ));
    }
    notes
}

fn read_stdin() -> Result<Vec<u8>, CliError> {
    let mut stdin = std::io::stdin().lock();
    if stdin.is_terminal() {
        eprintln!("reading the message body from standard input (end it with Ctrl-D)");
    }
    let mut body = Vec::new();
    stdin.read_to_end(&mut body).map_err(|e| CliError::io("cannot read the message body from standard input", e))?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert_eq!(parse_header("a=b").unwrap(), ("a".into(), "b".into()));
        assert_eq!(parse_header("trace=x=y").unwrap(), ("trace".into(), "x=y".into()));
        assert_eq!(parse_header("empty=").unwrap(), ("empty".into(), String::new()));
        assert!(parse_header("nokey").unwrap_err().contains("no '='"));
        assert!(parse_header("=v").unwrap_err().contains("empty name"));
    }

    #[test]
    fn http_notes_only_when_something_was_lost() {
        let stats = micro_broker::http::HttpStats { delivered: 3, inbox_dropped: 0, delivery_dropped: 0 };
        assert!(http_notes("t", stats).is_empty());
        let stats = micro_broker::http::HttpStats { delivered: 0, inbox_dropped: 2, delivery_dropped: 1 };
        let notes = http_notes("t", stats);
        assert_eq!(notes.len(), 2);
        assert!(notes[0].starts_with("note: 2 message(s) found no subscriber of \"t\""), "{notes:?}");
    }
}
