//! The publisher side of the peer-to-peer backends (`http`, `grpc`): the per-topic inbox, its
//! dispatchers, and delivery to the nodes the registry lists, over a [`Transport`].
//!
//! `publish` encodes the message once and puts it in the topic's inbox; one dispatcher task per
//! topic with waiting messages (it ends 100 ms after its inbox emptied) looks the topic's
//! subscribers up (through the registry cache) and hands each message to delivery tasks, at most
//! `max_in_flight` at a time, so the backlog is paced by responses. A message with no subscriber
//! stays in the inbox, and the dispatcher waits for the registry to change (a subscriber
//! appearing), for a new publish, or for a timer with backoff. A failed delivery goes back into the
//! inbox aimed at what failed (one broadcast node, or one queue group), with a backoff, until
//! `max_attempts`.
//!
//! What differs between backends (the registry service name, the broadcast version, the encoding,
//! and one delivery to one node) is the [`Transport`]; everything else is here, once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use broker_core::layers::metrics::{INBOX_DROPPED, LABEL_BACKEND, LABEL_TOPIC};
use broker_core::{Error, ErrorKind, Message, Result};
use bytes::Bytes;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::common::lock;
use crate::{Cache, Node};

/// What a publisher does when a topic's inbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowPolicy {
    /// Fail the publish with [`ErrorKind::Overflow`] (default).
    Reject,
    /// Drop the oldest waiting message of that topic, counting it, to make room.
    DropOldest,
    /// Wait for room (backpressure, as the memory backend does), up to the publish's timeout,
    /// then fail with [`ErrorKind::Timeout`]. A dead letter, which cannot wait, is rejected.
    Wait,
}

impl OverflowPolicy {
    /// What [`OverflowPolicy::parse`] accepts, for error messages.
    pub const VALUES: &'static str = "reject, drop_oldest or wait";

    /// The policy a parameter value names: `reject`, `drop_oldest` or `wait`.
    ///
    /// ```
    /// use broker_registry::outbox::OverflowPolicy;
    /// assert_eq!(OverflowPolicy::parse("wait"), Some(OverflowPolicy::Wait));
    /// assert_eq!(OverflowPolicy::parse("block"), None);
    /// ```
    pub fn parse(value: &str) -> Option<OverflowPolicy> {
        match value {
            "reject" => Some(OverflowPolicy::Reject),
            "drop_oldest" => Some(OverflowPolicy::DropOldest),
            "wait" => Some(OverflowPolicy::Wait),
            _ => None,
        }
    }
}

/// The inbox bounds and delivery limits of an [`Outbox`].
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Deliveries in flight at once.
    pub max_in_flight: usize,
    /// Attempts per message and subscription before giving up.
    pub max_attempts: u32,
    /// Per-topic inbox bound, in messages.
    pub inbox_max_messages: usize,
    /// Per-topic inbox bound, in bytes.
    pub inbox_max_bytes: usize,
    /// Inbox bound over all topics, in bytes.
    pub inbox_total_bytes: usize,
    /// What happens when an inbox is full.
    pub inbox_overflow: OverflowPolicy,
}

/// How one delivery to one node ended, as the [`Transport`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The subscriber handled and acknowledged the message.
    Delivered,
    /// The handler ran and failed or nacked: redelivered later, no failover.
    HandlerFailed(String),
    /// The node no longer has that subscription: forgotten; the message goes elsewhere.
    Gone,
    /// The node did not answer (connection refused, timeout): a queue group tries another node.
    Unreachable(String),
    /// The node refused the message for good (too large, wrong secret): dropped, counted.
    Refused(String),
}

/// One backend's way of reaching a subscriber node: what differs between `http` and `grpc`.
pub trait Transport: Send + Sync + 'static {
    /// The backend's name, for logs and the `broker_inbox_dropped_total` metric.
    fn backend(&self) -> &'static str;
    /// The registry version of broadcast subscriptions (`ff.http.broadcast`, `ff.grpc.broadcast`).
    fn broadcast_version(&self) -> &str;
    /// The registry service name of `topic`'s subscriptions.
    fn service_name(&self, topic: &str) -> String;
    /// Whether a node registered under [`Transport::service_name`] serves `topic` (a service name
    /// shared by every topic keeps other topics' nodes too).
    fn serves(&self, node: &Node, topic: &str) -> bool {
        let _ = (node, topic);
        true
    }
    /// Encodes a message for `topic`, once per publish; [`Transport::send`] gets these bytes.
    fn encode(&self, topic: &str, message: &Message) -> Bytes;
    /// Delivers `body` to `node` (the `attempt`-th time), bounded by the transport's own timeout.
    fn send(&self, node: &Node, body: &Bytes, attempt: u32) -> impl Future<Output = Outcome> + Send;
}

/// What an [`Outbox`] delivered and gave up on, counted.
#[derive(Debug, Default)]
pub struct DeliveryCounters {
    /// Deliveries that a subscriber acknowledged.
    pub delivered: AtomicU64,
    /// Messages dropped from a full inbox (policy `drop_oldest`) or discarded at disconnect.
    pub inbox_dropped: AtomicU64,
    /// Deliveries given up after `max_attempts`, or refused for good by the subscriber.
    pub delivery_dropped: AtomicU64,
}

/// The outcome of [`Outbox::publish_confirmed`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Node ids of the subscriptions that acknowledged the message.
    pub delivered: Vec<String>,
    /// Subscriptions (node ids, or a queue group) the message was given up for, with why.
    pub failed: Vec<(String, String)>,
    /// Deliveries still open when the publish timeout ended the wait: the message waits in the
    /// inbox for a subscriber, or is being retried.
    pub pending: usize,
}

/// Collects the outcome of one confirmed publish.
struct Report {
    outcome: Mutex<DeliveryReport>,
    open: AtomicUsize,
    done: Notify,
}

impl Report {
    fn new() -> Arc<Report> {
        Arc::new(Report {
            outcome: Mutex::new(DeliveryReport::default()),
            open: AtomicUsize::new(1),
            done: Notify::new(),
        })
    }

    fn delivered(&self, node: &str) {
        lock(&self.outcome).delivered.push(node.to_string());
        self.close_one();
    }

    fn failed(&self, target: &str, reason: &str) {
        lock(&self.outcome).failed.push((target.to_string(), reason.to_string()));
        self.close_one();
    }

    /// One open delivery becomes `n`.
    fn split(&self, n: usize) {
        match n {
            0 => {}
            n => {
                self.open.fetch_add(n - 1, Ordering::AcqRel);
            }
        }
    }

    fn close_one(&self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_waiters();
        }
    }

    async fn wait(&self) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn snapshot(&self) -> DeliveryReport {
        let mut report = lock(&self.outcome).clone();
        report.pending = self.open.load(Ordering::Acquire);
        report
    }
}

/// Where a waiting message still has to go.
#[derive(Clone)]
enum Target {
    /// Every subscription of the topic: broadcast nodes each, queue groups once.
    All,
    /// One queue group (a failed group delivery).
    Group(String),
    /// One broadcast node (a failed broadcast delivery).
    Node(Arc<Node>),
}

struct Pending {
    body: Bytes,
    target: Target,
    attempt: u32,
    not_before: Option<Instant>,
    report: Option<Arc<Report>>,
    /// The broadcast nodes this message was aimed at, shared by its deliveries: when one of them
    /// turns out to be gone (our registry cache was stale), nodes registered since are found
    /// and aimed at once, without sending twice to the others.
    reached: Option<Arc<Reached>>,
    /// This delivery is the message's only one (one broadcast node, no queue group).
    alone: bool,
}

impl Pending {
    fn new(body: Bytes, report: Option<Arc<Report>>) -> Pending {
        Pending { body, target: Target::All, attempt: 1, not_before: None, report, reached: None, alone: false }
    }

    /// The same message aimed at `target`.
    fn aimed_at(&self, target: Target, attempt: u32) -> Pending {
        Pending {
            body: self.body.clone(),
            target,
            attempt,
            not_before: None,
            report: self.report.clone(),
            reached: self.reached.clone(),
            alone: false,
        }
    }

    fn give_up(&self, target: &str, reason: &str) {
        if let Some(report) = &self.report {
            report.failed(target, reason);
        }
    }
}

#[derive(Default)]
struct TopicInbox {
    entries: VecDeque<Pending>,
    bytes: usize,
    wake: Arc<Notify>,
    dispatching: bool,
}

#[derive(Default)]
struct InboxState {
    /// Keyed by the application's topic names, looked up by every publish and dispatch round.
    topics: HashMap<String, TopicInbox, broker_core::TopicHash>,
    total_bytes: usize,
}

/// One version of the topic's service with its nodes, as looked up. Shared (`Arc`) by the
/// messages of a dispatch round: a message aimed at it costs a reference count, not a copy of
/// every node's id, address and metadata.
struct Version {
    name: String,
    nodes: Vec<Arc<Node>>,
}

/// The versions a message goes to: those of one lookup, shared by the messages of its round.
type Versions = Arc<[Arc<Version>]>;

/// The broadcast nodes one message was aimed at (see [`Pending::reached`]). The set of ids is
/// built only when a node turns out to be gone, which is rare: the usual message pays for the
/// list of its nodes and nothing else.
struct Reached {
    aimed: Vec<Arc<Node>>,
    /// Every id reached so far, `aimed` included, once the first fresh node is looked for.
    ids: Mutex<Option<HashSet<String>>>,
}

impl Reached {
    fn new(aimed: Vec<Arc<Node>>) -> Arc<Reached> {
        Arc::new(Reached { aimed, ids: Mutex::new(None) })
    }

    /// Records `id` as reached; false when it already was.
    fn insert(&self, id: &str) -> bool {
        let mut ids = lock(&self.ids);
        let ids = ids.get_or_insert_with(|| self.aimed.iter().map(|node| node.id.clone()).collect());
        ids.insert(id.to_string())
    }
}

/// The inbox and delivery of one peer-to-peer broker. See the [module docs](self).
pub struct Outbox<T: Transport> {
    config: OutboxConfig,
    transport: T,
    cache: Arc<Cache>,
    counters: Arc<DeliveryCounters>,
    in_flight: Arc<Semaphore>,
    deliveries: TaskTracker,
    state: Mutex<InboxState>,
    /// Woken when messages leave an inbox, for publishers waiting for room (policy `wait`);
    /// `room_waiters` counts them, so that a dispatch round with nobody waiting skips the wake.
    room: Notify,
    room_waiters: AtomicUsize,
    draining: AtomicBool,
    stop: CancellationToken,
    this: Weak<Outbox<T>>,
}

/// Whether a message went into its inbox, or is handed back because the inbox is full.
enum Admission {
    Queued,
    Full(Pending),
}

/// Counts a publisher waiting for room while it exists (a dropped publish stops counting).
struct RoomWaiter<'a>(&'a AtomicUsize);

impl<'a> RoomWaiter<'a> {
    fn new(waiters: &'a AtomicUsize) -> RoomWaiter<'a> {
        waiters.fetch_add(1, Ordering::SeqCst);
        RoomWaiter(waiters)
    }
}

impl Drop for RoomWaiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<T: Transport> std::fmt::Debug for Outbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("backend", &self.transport.backend()).field("config", &self.config).finish()
    }
}

impl<T: Transport> Outbox<T> {
    /// An outbox delivering over `transport` to the nodes `cache` finds, counting in `counters`.
    pub fn new(
        config: OutboxConfig,
        transport: T,
        cache: Arc<Cache>,
        counters: Arc<DeliveryCounters>,
    ) -> Arc<Outbox<T>> {
        Arc::new_cyclic(|this| Outbox {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
            transport,
            cache,
            counters,
            deliveries: TaskTracker::new(),
            state: Mutex::new(InboxState::default()),
            room: Notify::new(),
            room_waiters: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            stop: CancellationToken::new(),
            this: this.clone(),
        })
    }

    /// The transport this outbox delivers over.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Puts a new message in the topic's inbox. When the inbox is full, policy `wait` waits for
    /// room up to `timeout`; the others decide at once (see [`OverflowPolicy`]).
    pub async fn publish(&self, topic: &str, message: &Message, timeout: Duration) -> Result<()> {
        let body = self.transport.encode(topic, message);
        self.enqueue_waiting(topic, Pending::new(body, None), timeout).await
    }

    /// Puts a new message in the topic's inbox without waiting: a full inbox under policy `wait`
    /// rejects it (for a dead letter, handed over from inside a delivery).
    pub fn try_publish(&self, topic: &str, message: &Message) -> Result<()> {
        let body = self.transport.encode(topic, message);
        self.enqueue(topic, Pending::new(body, None), true)
    }

    /// Publishes and waits (up to `timeout`, room in the inbox included) for the outcome of the
    /// first delivery round.
    pub async fn publish_confirmed(&self, topic: &str, message: &Message, timeout: Duration) -> Result<DeliveryReport> {
        let deadline = Instant::now() + timeout;
        let body = self.transport.encode(topic, message);
        let report = Report::new();
        self.enqueue_waiting(topic, Pending::new(body, Some(Arc::clone(&report))), timeout).await?;
        let _ = tokio::time::timeout_at(deadline, report.wait()).await;
        Ok(report.snapshot())
    }

    /// [`Outbox::enqueue`] of a new publish that, under policy `wait`, waits for room up to
    /// `timeout`. Cancel-safe: a publish dropped while it waits has put nothing in the inbox.
    async fn enqueue_waiting(&self, topic: &str, pending: Pending, timeout: Duration) -> Result<()> {
        let never_fits = pending.body.len() > self.config.inbox_max_bytes.min(self.config.inbox_total_bytes);
        if self.config.inbox_overflow != OverflowPolicy::Wait || never_fits {
            return self.enqueue(topic, pending, true);
        }
        let mut pending = match self.admit(topic, pending) {
            Admission::Queued => return Ok(()),
            Admission::Full(pending) => pending,
        };
        let deadline = Instant::now() + timeout;
        let _waiter = RoomWaiter::new(&self.room_waiters);
        loop {
            // Armed before the inbox is looked at again, so that room made in between wakes it.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            pending = match self.admit(topic, pending) {
                Admission::Queued => return Ok(()),
                Admission::Full(pending) => pending,
            };
            tokio::select! {
                _ = self.stop.cancelled() => {
                    return Err(Error::new(ErrorKind::NotConnected, format!(
                        "the broker disconnected while a publish to topic {topic:?} waited for room in its inbox"
                    )));
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let why = self.full_reason(topic);
                    return Err(Error::new(ErrorKind::Timeout, format!(
                        "waited {timeout:?} (the publish timeout) for room, and {why} (policy wait)"
                    )));
                }
                _ = &mut room => {}
            }
        }
    }

    /// Adds to a topic's inbox within its bounds. A new publish that does not fit is rejected
    /// (policies `reject` and `wait`); a retry that does not fit is dropped and counted.
    fn enqueue(&self, topic: &str, pending: Pending, fresh: bool) -> Result<()> {
        match self.admit(topic, pending) {
            Admission::Queued => Ok(()),
            Admission::Full(pending) => {
                let why = self.full_reason(topic);
                if fresh {
                    return Err(Error::new(ErrorKind::Overflow, why));
                }
                self.count_inbox_drops(topic, 1);
                pending.give_up(topic, &why);
                tracing::warn!(topic, backend = self.transport.backend(), "{why}; a retry was dropped");
                Ok(())
            }
        }
    }

    /// Why a message does not fit in the inbox of `topic`, with its fill and the limits (built
    /// only once the message is refused: the text costs more than the rest of a publish).
    fn full_reason(&self, topic: &str) -> String {
        let config = &self.config;
        let state = lock(&self.state);
        let (messages, bytes) = state.topics.get(topic).map_or((0, 0), |inbox| (inbox.entries.len(), inbox.bytes));
        format!(
            "the inbox of topic {topic:?} is full ({messages} messages, {bytes} bytes; {} bytes over all topics; \
             limits {} / {} / {}): subscribers do not take messages as fast as they are published",
            state.total_bytes, config.inbox_max_messages, config.inbox_max_bytes, config.inbox_total_bytes
        )
    }

    /// Puts `pending` in the topic's inbox if it fits (after dropping the oldest, under policy
    /// `drop_oldest`), and starts the topic's dispatcher if none runs; hands it back if not.
    fn admit(&self, topic: &str, pending: Pending) -> Admission {
        let config = &self.config;
        let size = pending.body.len();
        let mut state = lock(&self.state);
        let InboxState { topics, total_bytes } = &mut *state;
        // Looked up before an owned key is made: usually the inbox exists.
        if !topics.contains_key(topic) {
            topics.insert(topic.to_string(), TopicInbox::default());
        }
        let Some(inbox) = topics.get_mut(topic) else { return Admission::Full(pending) };
        loop {
            let fits = inbox.entries.len() < config.inbox_max_messages
                && inbox.bytes + size <= config.inbox_max_bytes
                && *total_bytes + size <= config.inbox_total_bytes;
            if fits {
                break;
            }
            let evicted = match config.inbox_overflow {
                OverflowPolicy::DropOldest => inbox.entries.pop_front(),
                OverflowPolicy::Reject | OverflowPolicy::Wait => None,
            };
            match evicted {
                Some(old) => {
                    inbox.bytes -= old.body.len();
                    *total_bytes -= old.body.len();
                    self.count_inbox_drops(topic, 1);
                    old.give_up(topic, "dropped from the full inbox (policy drop_oldest)");
                    tracing::warn!(topic, backend = self.transport.backend(), "inbox full, dropped the oldest message");
                }
                None => {
                    if inbox.entries.is_empty() && !inbox.dispatching {
                        topics.remove(topic);
                    }
                    return Admission::Full(pending);
                }
            }
        }
        inbox.bytes += size;
        *total_bytes += size;
        inbox.entries.push_back(pending);
        if inbox.dispatching {
            inbox.wake.notify_one();
        } else if let Some(this) = self.this.upgrade() {
            inbox.dispatching = true;
            tokio::spawn(this.dispatch(Arc::from(topic), Arc::clone(&inbox.wake)));
        }
        Admission::Queued
    }

    /// The topic's dispatcher: runs while its inbox has messages, and [`DISPATCHER_LINGER`] after.
    async fn dispatch(self: Arc<Self>, topic: Arc<str>, wake: Arc<Notify>) {
        let service_name: Arc<str> = Arc::from(self.transport.service_name(&topic));
        let mut changes = self.cache.changes();
        let mut idle = Duration::from_millis(10);
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let versions = self.lookup(&service_name, &topic).await;
            let (ready, next_due, finished) = self.take_ready(&topic, &versions);
            let had_work = !ready.is_empty();
            if had_work && self.room_waiters.load(Ordering::SeqCst) > 0 {
                self.room.notify_waiters();
            }
            for (pending, version) in ready {
                self.start_delivery(&topic, &service_name, pending, version).await;
            }
            if finished {
                // The inbox is empty: stay a moment for the next publish (one message at a time,
                // a new dispatcher per message cost a spawn and a watch subscription each), then
                // end unless something arrived meanwhile.
                if !self.draining.load(Ordering::Acquire) {
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = wake.notified() => continue,
                        _ = tokio::time::sleep(DISPATCHER_LINGER) => {}
                    }
                }
                if self.end_dispatch(&topic) {
                    return;
                }
                continue;
            }
            if had_work {
                idle = Duration::from_millis(10);
                continue;
            }
            let sleep = next_due.map_or(idle, |due| due.saturating_duration_since(Instant::now()).min(idle));
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = wake.notified() => {}
                _ = changes.changed() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
            idle = (idle * 2).min(Duration::from_secs(1));
        }
    }

    /// Removes the topic's inbox if it is still empty, so that the next publish starts a new
    /// dispatcher; false when a message arrived meanwhile (the dispatcher goes on).
    fn end_dispatch(&self, topic: &str) -> bool {
        let mut state = lock(&self.state);
        match state.topics.get(topic) {
            Some(inbox) if !inbox.entries.is_empty() => false,
            Some(_) => {
                state.topics.remove(topic);
                true
            }
            None => true,
        }
    }

    /// The topic's subscribers by version; nothing when the lookup fails (retried later).
    async fn lookup(&self, service_name: &str, topic: &str) -> Versions {
        match self.cache.get_service(service_name).await {
            Ok(services) => self.versions_of(services, topic).into_iter().map(Arc::new).collect(),
            Err(error) => {
                tracing::debug!(%error, service_name, backend = self.transport.backend(), "registry lookup failed");
                Arc::new([])
            }
        }
    }

    /// Groups services by version, keeping the nodes that serve `topic`.
    fn versions_of(&self, services: Vec<crate::Service>, topic: &str) -> Vec<Version> {
        let mut versions: Vec<Version> = Vec::new();
        for service in services {
            let nodes = service.nodes.into_iter().filter(|node| self.transport.serves(node, topic)).map(Arc::new);
            match versions.iter_mut().find(|v| v.name == service.version) {
                Some(version) => version.nodes.extend(nodes),
                None => versions.push(Version { name: service.version, nodes: nodes.collect() }),
            }
        }
        versions.retain(|v| !v.nodes.is_empty());
        versions
    }

    /// Takes the messages that can go now, each with the versions it goes to. Also returns when
    /// the next delayed retry is due, and whether the inbox is now empty (the dispatcher ends).
    #[allow(clippy::type_complexity)]
    fn take_ready(&self, topic: &str, versions: &Versions) -> (Vec<(Pending, Versions)>, Option<Instant>, bool) {
        let now = Instant::now();
        let draining = self.draining.load(Ordering::Acquire);
        let mut state = lock(&self.state);
        let InboxState { topics, total_bytes } = &mut *state;
        let Some(inbox) = topics.get_mut(topic) else { return (Vec::new(), None, true) };
        let mut ready = Vec::new();
        let mut next_due: Option<Instant> = None;
        // Walks the inbox from its front and stops once a round is full: a round takes at most
        // max_in_flight messages, so that what waits for a delivery slot stays counted in the
        // inbox's bounds, and the messages behind stay where they are (no pass over the whole
        // inbox per round: with a backlog of thousands that pass was most of the publisher's CPU).
        let mut index = 0;
        while index < inbox.entries.len() && ready.len() < self.config.max_in_flight {
            let pending = &inbox.entries[index];
            if let Some(due) = pending.not_before.filter(|due| *due > now) {
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
                index += 1;
                continue;
            }
            let targets: Versions = match &pending.target {
                Target::All => Arc::clone(versions),
                Target::Group(group) => versions.iter().filter(|v| &v.name == group).cloned().collect(),
                // Sent to the node itself, whatever the cache says (it may not show a node that
                // registered a moment ago): a node whose subscription ended answers 404.
                Target::Node(node) => Arc::new([Arc::new(Version {
                    name: self.transport.broadcast_version().to_string(),
                    nodes: vec![Arc::clone(node)],
                })]),
            };
            if targets.is_empty() && !draining {
                index += 1;
                continue;
            }
            // Removing at the front (the usual case) moves nothing.
            let Some(pending) = inbox.entries.remove(index) else { break };
            inbox.bytes -= pending.body.len();
            *total_bytes -= pending.body.len();
            if targets.is_empty() {
                self.count_inbox_drops(topic, 1);
                pending.give_up(topic, "discarded at disconnect: no subscriber appeared");
                tracing::warn!(
                    topic,
                    backend = self.transport.backend(),
                    "disconnect discarded a message that no subscriber took"
                );
                continue;
            }
            ready.push((pending, targets));
        }
        // An empty inbox stays (its dispatcher lingers, see `dispatch`) until `end_dispatch`.
        (ready, next_due, inbox.entries.is_empty())
    }

    /// Starts one delivery task per broadcast node and per queue group, within `max_in_flight`.
    async fn start_delivery(&self, topic: &Arc<str>, service_name: &Arc<str>, pending: Pending, versions: Versions) {
        let mut jobs: Vec<(Target, Vec<Arc<Node>>)> = Vec::new();
        for version in versions.iter() {
            if version.name == self.transport.broadcast_version() {
                jobs.extend(version.nodes.iter().map(|node| (Target::Node(Arc::clone(node)), vec![Arc::clone(node)])));
            } else {
                jobs.push((Target::Group(version.name.clone()), version.nodes.clone()));
            }
        }
        if let Some(report) = &pending.report {
            report.split(jobs.len());
        }
        let pending = match pending.reached {
            Some(_) => pending,
            None => {
                let aimed = jobs
                    .iter()
                    .filter_map(|(target, _)| match target {
                        Target::Node(node) => Some(Arc::clone(node)),
                        _ => None,
                    })
                    .collect();
                Pending { reached: Some(Reached::new(aimed)), ..pending }
            }
        };
        let alone = jobs.len() == 1;
        for (target, nodes) in jobs {
            let permit = tokio::select! {
                _ = self.stop.cancelled() => return,
                permit = Arc::clone(&self.in_flight).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let Some(this) = self.this.upgrade() else { return };
            let job = Pending { alone, ..pending.aimed_at(target, pending.attempt) };
            let topic = Arc::clone(topic);
            let service_name = Arc::clone(service_name);
            // Boxed before it is spawned: the delivery's future is large (the transport's request
            // in it), and each move on the way into a task copies all of it.
            self.deliveries.spawn(Box::pin(async move {
                this.deliver(&topic, &service_name, job, nodes).await;
                drop(permit);
            }));
        }
    }

    /// Delivers to one broadcast node, or to one node of a queue group trying the others on failure.
    async fn deliver(&self, topic: &str, service_name: &str, job: Pending, mut nodes: Vec<Arc<Node>>) {
        fastrand::shuffle(&mut nodes);
        let mut last_failure = String::from("no node of the group answered");
        for node in &nodes {
            match self.transport.send(node, &job.body, job.attempt).await {
                Outcome::Delivered => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    if let Some(report) = &job.report {
                        report.delivered(&node.id);
                    }
                    return;
                }
                Outcome::HandlerFailed(reason) => {
                    // The handler ran and failed: a redelivery, not a failover.
                    last_failure = reason;
                    break;
                }
                Outcome::Gone => {
                    self.cache.forget_node(service_name, &node.id);
                    last_failure = format!("node {} no longer has that subscription", node.id);
                    if matches!(job.target, Target::Node(_)) {
                        if !self.aim_at_new_broadcast_nodes(topic, service_name, &job).await {
                            job.give_up(&node.id, &last_failure);
                        }
                        return;
                    }
                }
                Outcome::Unreachable(reason) => {
                    // A group hides the node for a while (Cache::forget_node) and tries another; a
                    // broadcast node is retried until max_attempts or until its registration ends.
                    if matches!(job.target, Target::Group(_)) {
                        self.cache.forget_node(service_name, &node.id);
                    }
                    last_failure = format!("node {} at {} is unreachable: {reason}", node.id, node.address);
                }
                Outcome::Refused(reason) => {
                    self.counters.delivery_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(topic, node = %node.id, %reason, backend = self.transport.backend(), "delivery refused; message dropped");
                    job.give_up(&node.id, &reason);
                    return;
                }
            }
        }
        self.retry_later(topic, job, &last_failure);
    }

    /// A broadcast node was gone, so our cached view was stale: look the topic up in the registry
    /// itself and aim the message at broadcast nodes registered since it was dispatched. When the
    /// topic has no subscriber left at all, the message goes back to the inbox to wait for one,
    /// as if published now (returns true: the delivery is not over).
    async fn aim_at_new_broadcast_nodes(&self, topic: &str, service_name: &str, job: &Pending) -> bool {
        let Some(reached) = &job.reached else { return false };
        let services = match self.cache.registry().get_service(service_name).await {
            Ok(services) => services,
            Err(error) => {
                tracing::debug!(%error, service_name, backend = self.transport.backend(), "registry lookup failed");
                return false;
            }
        };
        let versions = self.versions_of(services, topic);
        if versions.is_empty() && job.alone {
            // Its only subscriber is gone and nobody else listens: back to waiting for one.
            let waiting = Pending { reached: None, ..job.aimed_at(Target::All, 1) };
            return self.enqueue(topic, waiting, false).is_ok();
        }
        let fresh: Vec<Arc<Node>> = versions
            .into_iter()
            .filter(|v| v.name == self.transport.broadcast_version())
            .flat_map(|v| v.nodes)
            .filter(|node| reached.insert(&node.id))
            .collect();
        for node in fresh {
            if let Some(report) = &job.report {
                report.split(2);
            }
            let _ = self.enqueue(topic, job.aimed_at(Target::Node(node), 1), false);
        }
        false
    }

    /// Puts a failed delivery back into the inbox with a backoff, or gives up after `max_attempts`.
    fn retry_later(&self, topic: &str, mut job: Pending, reason: &str) {
        let target_name = match &job.target {
            Target::Node(node) => node.id.clone(),
            Target::Group(group) => format!("queue group {group}"),
            Target::All => topic.to_string(),
        };
        if job.attempt >= self.config.max_attempts {
            self.counters.delivery_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(topic, target = %target_name, attempts = job.attempt, reason, backend = self.transport.backend(), "delivery failed too often; message dropped");
            job.give_up(&target_name, &format!("gave up after {} attempts: {reason}", job.attempt));
            return;
        }
        tracing::debug!(topic, target = %target_name, attempt = job.attempt, reason, backend = self.transport.backend(), "delivery failed; will retry");
        job.not_before = Some(Instant::now() + retry_backoff(job.attempt));
        job.attempt += 1;
        let _ = self.enqueue(topic, job, false);
    }

    /// Counts messages dropped from the inbox: in [`DeliveryCounters`] and as the
    /// `broker_inbox_dropped_total` metric.
    fn count_inbox_drops(&self, topic: &str, n: u64) {
        self.counters.inbox_dropped.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(INBOX_DROPPED, LABEL_BACKEND => self.transport.backend(), LABEL_TOPIC => topic.to_string())
            .increment(n);
    }

    /// Delivers what can be delivered until `deadline`; then discards the rest, counted.
    pub async fn drain(&self, deadline: Instant) -> Result<()> {
        self.draining.store(true, Ordering::Release);
        for inbox in lock(&self.state).topics.values() {
            inbox.wake.notify_one();
        }
        self.deliveries.close();
        let finished = tokio::time::timeout_at(deadline, async {
            loop {
                if lock(&self.state).topics.is_empty() && self.deliveries.is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .is_ok();
        self.stop.cancel();
        if finished {
            return Ok(());
        }
        let mut state = lock(&self.state);
        let left: usize = state.topics.values().map(|t| t.entries.len()).sum();
        for (topic, inbox) in state.topics.drain() {
            self.count_inbox_drops(&topic, inbox.entries.len() as u64);
            for pending in inbox.entries {
                pending.give_up(&topic, "discarded at disconnect: the drain timeout ended");
            }
        }
        state.total_bytes = 0;
        Err(Error::new(
            ErrorKind::Timeout,
            format!("{left} messages were still waiting for delivery at the drain deadline and were discarded"),
        ))
    }
}

impl<T: Transport> Drop for Outbox<T> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An error with its sources, `a: b: c` (a client's own message alone often says only
/// "client error (Connect)"): for a [`Transport`]'s failure reasons.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How long a topic's dispatcher waits for the next publish once its inbox is empty.
const DISPATCHER_LINGER: Duration = Duration::from_millis(100);

/// 10 ms after the first failure, doubling, at most 2 s.
fn retry_backoff(attempt: u32) -> Duration {
    Duration::from_millis(10u64 << attempt.saturating_sub(1).min(8)).min(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(retry_backoff(1), Duration::from_millis(10));
        assert_eq!(retry_backoff(2), Duration::from_millis(20));
        assert_eq!(retry_backoff(30), Duration::from_secs(2));
    }
}
