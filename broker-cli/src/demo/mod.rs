//! `broker demo`: the example of the design (Go Micro's user service and email service).
//!
//! A user service publishes one `user.registered` event per new user, as JSON; an email service
//! subscribes and "sends" a welcome email for each. Each service is its own module, talking to the
//! other only through the broker.
//!
//! Over a networked backend (the default, `http`, or any backend but `memory`) the two services
//! are **two processes**: this process is the user service, and it starts the email service as a
//! child process (this same program, `broker demo --role email-service`, environment inherited).
//! Where the backend keeps messages published before anyone subscribed (the http backend, in the
//! publisher's inbox, or a backend with `persistence`), the user service publishes half of the
//! events *before* it starts the email service: they are the backlog, delivered once the email
//! service subscribes. It then waits for the email service to say it is subscribed (a line on
//! the child's standard output), and publishes the rest. Over another backend every event is
//! published after that. The email service counts welcome emails per user id, listens a little
//! longer for duplicates, and reports its counts to the user service, which prints the summary.
//!
//! Over `memory`, which lives inside one process, both services run as tasks of this process
//! and the email service subscribes first.
//!
//! Each run has a fresh id (lowercase hex, usable in topic names of every backend). Its events
//! carry it in the header [`RUN_HEADER`], and go to the topic `user.registered.<run id>`: a
//! message that waits for a subscriber goes to whoever subscribes to its topic first, so a
//! shared topic would let another run's email service (or a `broker sub user.registered` left
//! running) take this run's backlog.
//!
//! The demo checks what it shows: it exits 0 only if every event was delivered exactly once,
//! within `--timeout` seconds.

mod email_service;
mod process;
mod user_service;

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use micro_broker::Broker;
use serde::{Deserialize, Serialize};

use crate::cli::{BrokerArgs, is_peer_to_peer, parse_seconds};
use crate::error::CliError;
use crate::output::say;

/// The topic of the article; a run publishes to `user.registered.<run id>` ([`topic`]).
pub(crate) const TOPIC: &str = "user.registered";
/// The header carrying the demo run's id, so that an email service ignores events of other runs.
pub(crate) const RUN_HEADER: &str = "x-demo-run";
/// How long the email service keeps listening after the last expected delivery, to catch duplicates.
const DUPLICATE_GRACE: Duration = Duration::from_millis(500);
/// How many user ids the email service counted, per user id.
pub(crate) type Deliveries = BTreeMap<u64, u32>;

/// A registered user: the body of a `user.registered` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct User {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) email: String,
}

/// Arguments of `broker demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// How many users the user service registers.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    users: u64,
    /// How long to wait, in seconds, for the email service to start and for every welcome email.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_seconds)]
    timeout: Duration,
    /// Internal: which service this process is (the user service starts the email service with it).
    #[arg(long, value_enum, hide = true)]
    role: Option<Role>,
    /// Internal: the id of the run the email service belongs to.
    #[arg(long, value_name = "ID", hide = true, value_parser = parse_run_id)]
    run_id: Option<String>,
}

/// The service a `broker demo` process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// The email service, started by the user service as a child process.
    EmailService,
}

/// Runs the demo: as the user service (which starts the email service where it needs a process
/// of its own), or with `--role email-service` as that email service.
pub(crate) fn run(broker_args: &BrokerArgs, args: DemoArgs) -> Result<(), CliError> {
    let broker = broker_args.build()?;
    crate::block_on(async {
        broker.connect().await?;
        let outcome = match (args.role, args.run_id.as_deref()) {
            (Some(Role::EmailService), Some(run_id)) => {
                email_service::run_as_process(broker.as_ref(), &args, run_id).await
            }
            (Some(Role::EmailService), None) => Err(CliError::Failed("--role email-service needs --run-id".into())),
            (None, _) => demo(broker.as_ref(), broker_args, &args).await,
        };
        let disconnected = broker.disconnect().await;
        outcome?;
        Ok(disconnected?)
    })?
}

async fn demo(broker: &dyn Broker, broker_args: &BrokerArgs, args: &DemoArgs) -> Result<(), CliError> {
    let run_id = args.run_id.clone().unwrap_or_else(new_run_id);
    let topic = topic(&run_id);
    let users = user_service::new_users(args.users);
    let report = if broker.name() == micro_broker::memory::NAME {
        one_process(broker, args, &run_id, &topic, &users).await?
    } else {
        two_processes(broker, broker_args, args, &run_id, &topic, &users).await?
    };
    say!("{}", report.summary());
    if report.is_exactly_once() { Ok(()) } else { Err(CliError::Failed(format!("demo failed: {}", report.problems()))) }
}

/// Both services in this process: the email service subscribes first, then the user service
/// publishes every event.
async fn one_process(
    broker: &dyn Broker,
    args: &DemoArgs,
    run_id: &str,
    topic: &str,
    users: &[User],
) -> Result<Report, CliError> {
    say!(
        "demo: {} users over the {} backend, both services in this process, topic {topic} (run {run_id})",
        users.len(),
        broker.name()
    );
    let mut email_service = email_service::EmailService::start(broker, topic, run_id).await?;
    let published = user_service::publish(broker, topic, users, run_id).await?;
    email_service.wait_for(users, args.timeout, DUPLICATE_GRACE).await;
    let deliveries = email_service.stop().await?;
    Ok(Report::new(users, published, 0, &deliveries))
}

/// The email service in a child process. Where the backend keeps messages that wait for a
/// subscriber, half of the events are published before the child is started.
async fn two_processes(
    broker: &dyn Broker,
    broker_args: &BrokerArgs,
    args: &DemoArgs,
    run_id: &str,
    topic: &str,
    users: &[User],
) -> Result<Report, CliError> {
    check_registry_reaches_other_processes(broker)?;
    let backlog = backlog_size(broker, users.len());
    let listening = if is_peer_to_peer(broker.name()) {
        format!(", broker listening on {}", broker.address())
    } else {
        String::new()
    };
    say!(
        "demo: {} users over the {} backend, topic {topic} (run {run_id}); the user service is this process (pid {}{listening}), the email service a second process",
        users.len(),
        broker.name(),
        std::process::id()
    );
    let (before, after) = users.split_at(backlog);
    if !before.is_empty() {
        say!(
            "demo: publishing {} events before the email service starts: {}",
            before.len(),
            where_the_backlog_waits(broker)
        );
    }
    let mut published = user_service::publish(broker, topic, before, run_id).await?;

    // From here on, dropping `email_service` (an error, say) kills the child.
    let mut email_service = process::EmailProcess::start(broker_args, broker.name(), args, run_id)?;
    say!("demo: started the email service (pid {}); waiting for it to subscribe", email_service.pid());
    email_service.wait_ready(args.timeout).await?;
    if !after.is_empty() {
        let which = if before.is_empty() { "the" } else { "the other" };
        say!("demo: the email service is subscribed; publishing {which} {} events", after.len());
    }
    published += user_service::publish(broker, topic, after, run_id).await?;
    let deliveries = email_service.finish(args.timeout + DUPLICATE_GRACE + process::EXIT_MARGIN).await?;
    Ok(Report::new(users, published, before.len(), &deliveries))
}

/// How many events to publish before the email service exists: half, where such events are kept
/// (the inbox of the http and grpc backends, a persistent backend); none elsewhere, where they
/// would be lost.
fn backlog_size(broker: &dyn Broker, users: usize) -> usize {
    if is_peer_to_peer(broker.name()) || broker.capabilities().persistence { users.div_ceil(2) } else { 0 }
}

fn where_the_backlog_waits(broker: &dyn Broker) -> String {
    if is_peer_to_peer(broker.name()) {
        "they wait in this process's inbox until a subscriber registers".to_string()
    } else {
        format!("the {} backend keeps them until a subscriber comes", broker.name())
    }
}

/// The http and grpc backends with the in-process `memory` registry cannot reach another process.
fn check_registry_reaches_other_processes(broker: &dyn Broker) -> Result<(), CliError> {
    if !is_peer_to_peer(broker.name()) {
        return Ok(());
    }
    let registry = std::env::var("MICRO_REGISTRY").unwrap_or_default();
    if registry.trim().eq_ignore_ascii_case("memory") {
        return Err(CliError::Failed(
            "the demo runs its services as two processes, and MICRO_REGISTRY=memory is seen by one process only: \
             unset MICRO_REGISTRY (the default, local, works across processes of one host) or use etcd"
                .into(),
        ));
    }
    Ok(())
}

/// The topic of one run.
pub(crate) fn topic(run_id: &str) -> String {
    format!("{TOPIC}.{run_id}")
}

/// A fresh run id: 12 lowercase hex digits, from the process id, the clock and a random key.
fn new_run_id() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(nanos);
    format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

/// A run id from the command line: 1 to 32 characters out of `[a-z0-9]`, so that the topic it
/// makes is valid on every backend.
fn parse_run_id(value: &str) -> Result<String, String> {
    let ok = (1..=32).contains(&value.len()) && value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok { Ok(value.to_string()) } else { Err(format!("{value:?} is not a run id (1 to 32 of a-z, 0-9)")) }
}

/// What was published and delivered, per user.
#[derive(Debug)]
struct Report {
    users: usize,
    published: usize,
    /// Events published before the email service started.
    backlog: usize,
    /// Of those, how many were delivered.
    from_backlog: usize,
    delivered: u64,
    missing: Vec<u64>,
    duplicated: Vec<u64>,
    unexpected: Vec<u64>,
}

impl Report {
    /// `backlog`: the first `backlog` users were published before the email service started;
    /// `deliveries`: how many welcome emails each user id got.
    fn new(users: &[User], published: usize, backlog: usize, deliveries: &Deliveries) -> Self {
        let expected: std::collections::HashSet<u64> = users.iter().map(|u| u.id).collect();
        Report {
            users: users.len(),
            published,
            backlog,
            from_backlog: users.iter().take(backlog).filter(|u| deliveries.contains_key(&u.id)).count(),
            delivered: deliveries.values().map(|&n| u64::from(n)).sum(),
            missing: users.iter().map(|u| u.id).filter(|id| !deliveries.contains_key(id)).collect(),
            duplicated: deliveries
                .iter()
                .filter(|(id, n)| expected.contains(id) && **n > 1)
                .map(|(id, _)| *id)
                .collect(),
            unexpected: deliveries.keys().filter(|id| !expected.contains(id)).copied().collect(),
        }
    }

    fn is_exactly_once(&self) -> bool {
        self.published == self.users
            && self.missing.is_empty()
            && self.duplicated.is_empty()
            && self.unexpected.is_empty()
    }

    fn summary(&self) -> String {
        let verdict = if self.is_exactly_once() {
            format!("all {} users welcomed exactly once", self.users)
        } else {
            self.problems()
        };
        let (published, delivered) = if self.backlog > 0 {
            (
                format!(" ({} before the email service started)", self.backlog),
                format!(" ({} of them from that backlog)", self.from_backlog),
            )
        } else {
            (String::new(), String::new())
        };
        format!("demo: published {}{published}, delivered {}{delivered}: {verdict}", self.published, self.delivered)
    }

    fn problems(&self) -> String {
        let mut problems = Vec::new();
        if self.published != self.users {
            problems.push(format!("published {} of {} events", self.published, self.users));
        }
        for (what, ids) in [
            ("missing", &self.missing),
            ("delivered more than once", &self.duplicated),
            ("unexpected", &self.unexpected),
        ] {
            if !ids.is_empty() {
                problems.push(format!("{} users {what} ({})", ids.len(), list_ids(ids)));
            }
        }
        if problems.is_empty() { "none".to_string() } else { problems.join("; ") }
    }
}

fn list_ids(ids: &[u64]) -> String {
    const SHOWN: usize = 10;
    let mut text = ids.iter().take(SHOWN).map(|id| format!("user {id}")).collect::<Vec<_>>().join(", ");
    if ids.len() > SHOWN {
        text.push_str(&format!(", and {} more", ids.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliveries(pairs: &[(u64, u32)]) -> Deliveries {
        pairs.iter().copied().collect()
    }

    #[test]
    fn exactly_once() {
        let users = user_service::new_users(3);
        let report = Report::new(&users, 3, 0, &deliveries(&[(1, 1), (2, 1), (3, 1)]));
        assert!(report.is_exactly_once());
        assert_eq!(report.summary(), "demo: published 3, delivered 3: all 3 users welcomed exactly once");
    }

    #[test]
    fn backlog_is_counted() {
        let users = user_service::new_users(3);
        let report = Report::new(&users, 3, 2, &deliveries(&[(1, 1), (2, 1), (3, 1)]));
        assert_eq!(
            report.summary(),
            "demo: published 3 (2 before the email service started), delivered 3 (2 of them from that backlog): \
             all 3 users welcomed exactly once"
        );
        let report = Report::new(&users, 3, 2, &deliveries(&[(2, 1), (3, 1)]));
        assert!(!report.is_exactly_once());
        assert!(report.summary().contains("delivered 2 (1 of them from that backlog): 1 users missing (user 1)"));
    }

    #[test]
    fn missing_and_duplicated_are_named() {
        let users = user_service::new_users(3);
        let report = Report::new(&users, 3, 0, &deliveries(&[(1, 2), (2, 1), (9, 1)]));
        assert!(!report.is_exactly_once());
        let text = report.summary();
        assert!(text.starts_with("demo: published 3, delivered 4: "), "{text}");
        assert!(text.contains("1 users missing (user 3)"), "{text}");
        assert!(text.contains("1 users delivered more than once (user 1)"), "{text}");
        assert!(text.contains("1 users unexpected (user 9)"), "{text}");
    }

    #[test]
    fn long_id_lists_are_cut() {
        let ids: Vec<u64> = (1..=12).collect();
        assert!(list_ids(&ids).ends_with("user 10, and 2 more"));
    }

    #[test]
    fn run_ids_make_valid_topics() {
        let (a, b) = (new_run_id(), new_run_id());
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert_eq!(parse_run_id(id).as_ref(), Ok(id));
            micro_broker::validate_topic(&topic(id)).unwrap();
        }
        for bad in ["", "UPPER", "a.b", "a b", "x-y", &"a".repeat(33)] {
            assert!(parse_run_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn backlog_only_where_messages_wait() {
        let http = micro_broker::from_name("http", micro_broker::BrokerOptions::new()).unwrap();
        assert_eq!(backlog_size(http.as_ref(), 10), 5);
        assert_eq!(backlog_size(http.as_ref(), 1), 1);
        let memory = micro_broker::MemoryBroker::new();
        assert_eq!(backlog_size(&memory, 10), 0);
    }
}
