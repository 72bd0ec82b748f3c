//! `broker sub TOPIC [--queue Q] [--count N] [--timeout SECS]`: prints each message as a JSON line.
//!
//! A message is acknowledged only after its line was written to standard output. With `--count N`
//! the command exits 0 after N lines; a message that arrives after those is nacked (so a backend
//! with redelivery gives it to another subscriber). `--timeout SECS` is an overall deadline
//! counted from the moment the subscription is made: when it expires the command exits with
//! status 3, however many messages it printed. SIGINT (Ctrl-C) and SIGTERM unsubscribe and
//! disconnect before the command exits (status 130 / 143): over the http backend that takes the
//! subscription out of the registry, so that publishers stop sending to it.
//!
//! Where the subscription has an identity on the backend ([`Subscriber::id`]: the http backend's
//! registry node), one line on standard error says it, with the address the broker listens on.

use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use micro_broker::{Broker, Event, HandlerResult, SubscribeOptions, Subscriber, handler_fn};
use tokio::sync::mpsc;

use crate::cli::{BrokerArgs, parse_seconds};
use crate::error::CliError;
use crate::output::json_line;

/// Arguments of `broker sub`.
#[derive(Debug, Args)]
pub(crate) struct SubArgs {
    /// The topic to subscribe to.
    topic: String,
    /// Join this queue group: each message goes to one member of the group [default: broadcast].
    #[arg(short, long, value_name = "Q")]
    queue: Option<String>,
    /// Exit 0 after printing this many messages [default: run until interrupted].
    #[arg(short = 'n', long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Overall deadline in seconds, from the subscription on: when it expires, exit with status 3.
    #[arg(short, long, value_name = "SECS", value_parser = parse_seconds)]
    timeout: Option<Duration>,
}

/// Connects, subscribes, prints messages until `--count` or `--timeout`, then disconnects.
pub(crate) fn run(broker_args: &BrokerArgs, args: SubArgs) -> Result<(), CliError> {
    let broker = broker_args.build()?;
    crate::block_on(async {
        // Listen for signals before subscribing, so that an early Ctrl-C still unsubscribes.
        let signals = Signals::listen();
        broker.connect().await?;
        let printed =
            subscribe_and_print(broker.as_ref(), &args, Box::new(std::io::stdout()), signals.received()).await;
        let disconnected = broker.disconnect().await;
        printed?;
        Ok(disconnected?)
    })?
}

/// Subscribes and writes one JSON line per message to `out` until `--count`, `--timeout`, or
/// `interrupted` (which yields the signal's name and exit status).
async fn subscribe_and_print(
    broker: &dyn Broker,
    args: &SubArgs,
    out: Box<dyn Write + Send>,
    interrupted: impl Future<Output = (&'static str, u8)>,
) -> Result<(), CliError> {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    // Only the handler holds the sender: if the backend drops the subscription, `recv` ends.
    let printer = Arc::new(Printer::new(out, args.count, done_tx));
    let printed = Arc::clone(&printer.printed);
    let handler = handler_fn(move |event: Event| {
        let printer = Arc::clone(&printer);
        async move { printer.print(&event) }
    });
    let mut options = SubscribeOptions::new();
    if let Some(queue) = &args.queue {
        options = options.with_queue(queue.as_str());
    }
    let subscription = broker.subscribe(&args.topic, handler, options).await?;
    // Tells the user (and scripts waiting for it) that messages published from now on arrive.
    eprintln!("{}", announcement(subscription.as_ref(), broker));

    let deadline = async {
        match args.timeout {
            Some(deadline) => tokio::time::sleep(deadline).await,
            None => std::future::pending().await,
        }
    };
    let finished = tokio::select! {
        finished = done_rx.recv() => finished,
        () = deadline => {
            let deadline = args.timeout.unwrap_or_default();
            Some(Err(timed_out(&args.topic, deadline, printed.load(Ordering::SeqCst), args.count)))
        }
        (signal, code) = interrupted => {
            let printed = printed.load(Ordering::SeqCst);
            let printed = args.count.map_or(printed, |limit| printed.min(limit));
            let text = format!("interrupted by {signal} after {printed} messages on topic {:?}; unsubscribed", args.topic);
            Some(Err(CliError::Interrupted(text, code)))
        }
    };
    let outcome = match finished {
        Some(outcome) => outcome,
        None => Err(CliError::Failed(format!("the subscription to {:?} was ended by the broker", args.topic))),
    };
    let unsubscribed = subscription.unsubscribe().await;
    outcome?;
    Ok(unsubscribed?)
}

/// The line saying that the subscription is in place (see [`whereabouts`]).
fn announcement(subscription: &dyn Subscriber, broker: &dyn Broker) -> String {
    format!("broker: subscribed to {:?}{}", subscription.topic(), whereabouts(subscription, broker))
}

/// Where a subscription receives: ` (queue Q)`, then over http its registry node id and the
/// address the broker listens on, over a server backend the backend and its server (password
/// hidden).
pub(crate) fn whereabouts(subscription: &dyn Subscriber, broker: &dyn Broker) -> String {
    let queue = subscription.options().queue.as_deref().map(|q| format!(" (queue {q})")).unwrap_or_default();
    let address = micro_broker::redact_credentials(&broker.address());
    match subscription.id() {
        Some(id) if broker.name() == micro_broker::http::NAME => {
            format!("{queue} as node {id}, listening on {address}")
        }
        _ => format!("{queue} over {} at {address}", broker.name()),
    }
}

/// SIGINT and SIGTERM, listened for from the moment [`Signals::listen`] is called.
struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Starts listening; must run inside the runtime. Where signals cannot be listened for,
    /// [`Signals::received`] never completes (the command then ends as it did without this).
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let streams = match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
                (Ok(interrupt), Ok(terminate)) => Some((interrupt, terminate)),
                _ => None,
            };
            Signals { streams }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// The first signal received: its name and the exit status to report (128 + its number).
    async fn received(self) -> (&'static str, u8) {
        #[cfg(unix)]
        if let Some((mut interrupt, mut terminate)) = self.streams {
            return tokio::select! {
                _ = interrupt.recv() => ("SIGINT", 130),
                _ = terminate.recv() => ("SIGTERM", 143),
            };
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_ok() {
            return ("Ctrl-C", 130);
        }
        std::future::pending().await
    }
}

/// Prints events, counts them, and says when `--count` was reached or writing failed.
struct Printer {
    out: Mutex<Box<dyn Write + Send>>,
    printed: Arc<AtomicU64>,
    limit: Option<u64>,
    done: mpsc::UnboundedSender<Result<(), CliError>>,
}

impl Printer {
    fn new(out: Box<dyn Write + Send>, limit: Option<u64>, done: mpsc::UnboundedSender<Result<(), CliError>>) -> Self {
        Printer { out: Mutex::new(out), printed: Arc::new(AtomicU64::new(0)), limit, done }
    }

    fn print(&self, event: &Event) -> HandlerResult {
        let slot = self.printed.fetch_add(1, Ordering::SeqCst);
        if self.limit.is_some_and(|limit| slot >= limit) {
            // Not ours to print: fail it so that it is redelivered where the backend can.
            return Err("--count messages were already printed; this one is left for redelivery".into());
        }
        let line = json_line(event.topic(), event.message())?;
        let written = match self.out.lock() {
            Ok(mut out) => writeln!(out, "{line}").and_then(|()| out.flush()),
            Err(_poisoned) => Err(std::io::Error::other("the output lock is poisoned")),
        };
        if let Err(e) = written {
            let text = e.to_string();
            // The receiver is gone only once the command is finishing anyway.
            let _ = self.done.send(Err(CliError::io("cannot write to standard output", e)));
            return Err(text.into());
        }
        if self.limit == Some(slot + 1) {
            let _ = self.done.send(Ok(()));
        }
        Ok(())
    }
}

/// The error for an expired `--timeout`, saying how many messages came.
fn timed_out(topic: &str, deadline: Duration, printed: u64, limit: Option<u64>) -> CliError {
    let received = match limit {
        Some(limit) => format!("received {} of {limit} messages", printed.min(limit)),
        None => format!("received {printed} messages"),
    };
    CliError::Timeout(format!(
        "timed out after {}: {received} on topic {topic:?} (--timeout is an overall deadline)",
        humanize(deadline)
    ))
}

fn humanize(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs.fract() == 0.0 { format!("{secs:.0}s") } else { format!("{secs}s") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use micro_broker::{Message, PublishOptions};

    #[test]
    fn timeout_message_says_what_arrived() {
        let text = timed_out("t", Duration::from_secs(1), 0, Some(2)).to_string();
        assert_eq!(
            text,
            "timed out after 1s: received 0 of 2 messages on topic \"t\" (--timeout is an overall deadline)"
        );
        assert_eq!(humanize(Duration::from_millis(1500)), "1.5s");
    }

    /// A writer whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn args(count: Option<u64>, timeout_ms: u64) -> SubArgs {
        SubArgs { topic: "t".into(), queue: None, count, timeout: Some(Duration::from_millis(timeout_ms)) }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prints_count_messages_then_stops() {
        let broker = Arc::new(micro_broker::MemoryBroker::new());
        broker.connect().await.unwrap();
        let out = Shared::default();
        let publisher = Arc::clone(&broker);
        let publishing = tokio::spawn(async move {
            // Wait for the subscription, then publish more than --count.
            tokio::time::sleep(Duration::from_millis(200)).await;
            for body in [&b"one"[..], &[0xff, 0xfe][..], &b"three"[..]] {
                publisher.publish("t", Message::new(body.to_vec()), PublishOptions::default()).await.unwrap();
            }
        });
        subscribe_and_print(broker.as_ref(), &args(Some(2), 5_000), Box::new(out.clone()), std::future::pending())
            .await
            .unwrap();
        publishing.await.unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "{\"topic\":\"t\",\"headers\":{},\"body\":\"one\"}\n{\"topic\":\"t\",\"headers\":{},\"body\":{\"base64\":\"//4=\"}}\n"
        );
        broker.disconnect().await.unwrap();
    }

    #[tokio::test]
    async fn nothing_published_times_out() {
        let broker = micro_broker::MemoryBroker::new();
        broker.connect().await.unwrap();
        let err = subscribe_and_print(&broker, &args(None, 50), Box::new(std::io::sink()), std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 3);
        assert!(err.to_string().contains("received 0 messages"), "{err}");
    }

    #[tokio::test]
    async fn a_signal_unsubscribes_and_says_so() {
        let broker = micro_broker::MemoryBroker::new();
        broker.connect().await.unwrap();
        let interrupted = async { ("SIGINT", 130) };
        let err = subscribe_and_print(&broker, &args(Some(3), 5_000), Box::new(std::io::sink()), interrupted)
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 130);
        assert_eq!(err.to_string(), "interrupted by SIGINT after 0 messages on topic \"t\"; unsubscribed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscriptions_announce_their_node_or_their_server() {
        let options = micro_broker::BrokerOptions::new().with_param("registry", "memory");
        let broker = micro_broker::from_name("http", options).unwrap();
        broker.connect().await.unwrap();
        let handler = handler_fn(|_event: Event| async { Ok(()) });
        let subscription = broker.subscribe("t", handler, SubscribeOptions::new().with_queue("q")).await.unwrap();
        let line = announcement(subscription.as_ref(), broker.as_ref());
        let id = subscription.id().unwrap();
        assert_eq!(
            line,
            format!("broker: subscribed to \"t\" (queue q) as node {id}, listening on {}", broker.address())
        );
        assert!(!broker.address().ends_with(":0"), "{line}");
        subscription.unsubscribe().await.unwrap();
        broker.disconnect().await.unwrap();

        let memory = micro_broker::MemoryBroker::new();
        memory.connect().await.unwrap();
        let handler = handler_fn(|_event: Event| async { Ok(()) });
        let subscription = memory.subscribe("t", handler, SubscribeOptions::new()).await.unwrap();
        let address = memory.address();
        assert_eq!(
            announcement(subscription.as_ref(), &memory),
            format!("broker: subscribed to \"t\" over memory at {address}")
        );
    }
}
