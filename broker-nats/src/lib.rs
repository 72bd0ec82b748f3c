//! # broker-nats: the NATS backend (plugin `nats`)
//!
//! Link it with `use broker_nats as _;` (or the facade's `nats` feature), then pick it with
//! `MICRO_BROKER=nats`; `MICRO_BROKER_ADDRESS` gives the servers (comma-separated, default
//! [`config::DEFAULT_ADDRESS`]). Parameters are listed in [`config::PARAMS`].
//!
//! ## Core NATS (default): at-most-once
//! - Subject = topic; a queue group is a NATS queue group; headers travel as native NATS headers
//!   and the body is the raw payload ([`bytes::Bytes`] passed through, not copied). A header name
//!   NATS cannot carry (non-ASCII, `:`) is percent-encoded as `Micro-Enc-…` and decoded back ([`wire`]).
//! - `publish` returns once the message has been flushed to the socket, so publish-then-disconnect
//!   loses nothing. While the connection is down the client reconnects by itself; a publish that
//!   cannot be flushed within `publish_timeout` fails with `Timeout` (it may still go out after the
//!   reconnection: a caller that retries may duplicate).
//! - A subscription buffers up to `buffer_size` messages (default 65,536) in the client. NATS drops
//!   a slow consumer's overflow: each such event is logged and counted in
//!   [`NatsStats::slow_consumer_events`]. Nothing is redelivered: a failed handler's message is
//!   gone (counted in [`NatsStats::handler_failures`]). Hence `redelivery: false`,
//!   `persistence: false`, `backlog: false` ([`CORE_CAPABILITIES`]).
//!
//! ## JetStream (`jetstream=true`): at-least-once
//! - A stream per first topic segment: topic `orders.created` lives in stream
//!   `<stream_prefix>orders` with subjects `orders` and `orders.>`, created if absent, bounded by
//!   `stream_max_msgs`, `stream_max_bytes` and `stream_max_age_secs`.
//! - A queue group is a durable pull consumer (named after the group and the topic), shared by its
//!   members; a broadcast subscriber has an ephemeral pull consumer of its own. Both start at the
//!   first message published after they were created (`persistence: false`: a *new* broadcast
//!   subscriber does not read history, though a durable group keeps its place across restarts).
//!   Messages are pulled in batches of 8 × concurrency (at most 256) with pull requests that
//!   expire after 1 s and are renewed (async-nats's long-lived pull stream was seen stalling under
//!   concurrent publishers). When a subscription stops, messages it had pulled but not started
//!   are nacked back at once.
//! - `publish` waits for the stream's acknowledgement. A message is acked after its handler
//!   succeeds; a nack is redelivered after a backoff (20 ms doubling to 5 s); after
//!   `max_redeliveries` it is published to `<topic>.dlq` with `x-dead-letter-reason`,
//!   `x-delivery-attempts` and `x-original-topic`, then terminated. An unsettled message is
//!   redelivered after `ack_wait_ms`. Duplicates are possible (a handler that succeeded but whose
//!   ack was lost in a connection failure runs again). A publish that failed (timed out) may have
//!   been stored: set the `Nats-Msg-Id` header to a unique id and the stream drops a retried
//!   duplicate within its duplicate window (2 min). [`JETSTREAM_CAPABILITIES`].
//! - Works with nats-server 2.9 (no 2.10-only consumer fields).
//!
//! `capabilities()` of a broker reflects its mode; the plugin registers [`CORE_CAPABILITIES`].
//!
//! ## Go Micro interop (`envelope=go-micro`, or `MICRO_BROKER_ENVELOPE=go-micro`)
//! The whole payload is Go Micro's JSON envelope ([`broker_core::codec`]) with `Micro-Topic`,
//! `Micro-Id` and `Content-Type` set, as Go Micro's NATS broker writes it. A payload that does not
//! decode never reaches the handler: it is logged, counted in [`NatsStats::codec_errors`] and given
//! up (terminated on JetStream). Headers then travel inside the envelope (`native_headers: false`).
//!
//! ## Connecting
//! - `connect()` is bounded by `connect_timeout`; nothing listening is a
//!   [`Connection`](ErrorKind::Connection) error naming the address, refused credentials one that
//!   says so (authorization violation). Once connected the client reconnects by itself (0 to 1 s
//!   between attempts); JetStream mode also checks that the server has JetStream enabled.
//! - Credentials: parameters `user` + `password`, or `token`, or `nats://user:password@host:port`
//!   (`nats://token@host:port`) in the address. `Debug` and error messages never show them.
//! - TLS: [`BrokerOptions::tls`] is honoured: `ca_file` (trusted roots, the system's otherwise),
//!   `cert_file` + `key_file` (mutual TLS); TLS is then required. `insecure_skip_verify` is
//!   rejected with `Unsupported`.
//! - Topics: [`validate_topic`] (no whitespace, wildcards or empty segments, at most 255 bytes),
//!   else `InvalidInput`; a header value with CR or LF is `InvalidInput` too.
//!
//! ## Disconnect
//! `disconnect()` stops taking new messages, lets the buffered (core) and running handlers finish
//! and their acks go out, flushes, then closes the connection; all bounded by `drain_timeout`.
//!
//! ```no_run
//! # async fn demo() -> broker_core::Result<()> {
//! use broker_core::{BrokerOptions, Message, PublishOptions};
//! let options = BrokerOptions::new().with_addresses(["nats://127.0.0.1:4222"]).with_param("jetstream", "true");
//! let broker = broker_core::from_name("nats", options)?;
//! broker.connect().await?;
//! broker.publish("orders.created", Message::new("42"), PublishOptions::new()).await?;
//! broker.disconnect().await
//! # }
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
mod error;
mod jetstream;
pub mod wire;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::codec::Envelope;
use broker_core::{
    Broker, BrokerOptions, Capabilities, Error, ErrorKind, Event, Handler, Message, PublishOptions, Result,
    RunningState, SubscribeOptions, Subscriber, run_handler, running_handler_of, scope_handler, validate_topic,
};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::NatsConfig;

/// The plugin name.
pub const NAME: &str = "nats";

/// What core NATS does (the default mode, and what the plugin registers).
pub const CORE_CAPABILITIES: Capabilities = Capabilities {
    queue_groups: true,
    persistence: false,
    backlog: false,
    ordering: true,
    redelivery: false,
    delayed_delivery: false,
    native_headers: true,
    tls: true,
};

/// What the JetStream mode (`jetstream=true`) does.
pub const JETSTREAM_CAPABILITIES: Capabilities = Capabilities { redelivery: true, ..CORE_CAPABILITIES };

broker_core::register_plugin! {
    name: NAME,
    description: "NATS: core (at-most-once, queue groups, native headers) or JetStream with jetstream=true (acks, redelivery, dead letters)",
    capabilities: CORE_CAPABILITIES,
    factory: build,
}

fn build(options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(NatsBroker::with_options(options)?))
}

/// The capabilities of a broker configured with `config`.
pub fn capabilities_of(config: &NatsConfig) -> Capabilities {
    let base = if config.jetstream { JETSTREAM_CAPABILITIES } else { CORE_CAPABILITIES };
    Capabilities { native_headers: config.envelope == Envelope::Native, ..base }
}

/// Counters of what the broker gave up on. See the [crate docs](crate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatsStats {
    /// Slow-consumer events: a core subscription's client buffer was full and NATS dropped messages.
    pub slow_consumer_events: u64,
    /// Received payloads that did not decode (`envelope=go-micro`); the handler never saw them.
    pub codec_errors: u64,
    /// Core NATS: handler failures, whose messages are not redelivered.
    pub handler_failures: u64,
    /// JetStream: messages published to `<topic>.dlq` after `max_redeliveries`.
    pub dead_lettered: u64,
    /// JetStream: errors of a consumer's message stream (connection loss, missed heartbeats).
    pub consumer_errors: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    slow_consumer_events: AtomicU64,
    codec_errors: AtomicU64,
    handler_failures: AtomicU64,
    dead_lettered: AtomicU64,
    consumer_errors: AtomicU64,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The NATS broker. See the [crate docs](crate).
pub struct NatsBroker {
    inner: Arc<Inner>,
}

struct Inner {
    options: RwLock<BrokerOptions>,
    config: RwLock<NatsConfig>,
    slot: tokio::sync::Mutex<Option<Arc<Running>>>,
    current: RunningState<Running>,
    counters: Arc<Counters>,
}

/// Everything that exists while connected.
pub(crate) struct Running {
    pub(crate) client: async_nats::Client,
    pub(crate) config: NatsConfig,
    pub(crate) options: BrokerOptions,
    pub(crate) js: Option<async_nats::jetstream::Context>,
    /// The streams known to exist, by first topic segment.
    pub(crate) streams: Mutex<HashMap<String, Arc<str>, broker_core::TopicHash>>,
    subs: Mutex<HashMap<u64, Arc<SubState>>>,
    next_sub: AtomicU64,
    pub(crate) counters: Arc<Counters>,
    /// The servers, credentials hidden, for messages.
    pub(crate) servers: String,
    /// Group flush of core publishes.
    flush: FlushGroup,
    /// Subjects of the topics published to, validated once (see [`Running::subject`]).
    subjects: RwLock<HashMap<Box<str>, async_nats::Subject, broker_core::TopicHash>>,
}

/// Topics whose subjects [`Running::subject`] keeps; beyond that a topic is validated and
/// converted on every publish (a process publishing to ever new topics must not grow the map).
const SUBJECT_CACHE_LIMIT: usize = 4096;

impl Running {
    /// The validated subject of `topic`, from the cache: a publish to a known topic neither
    /// validates nor allocates it again (a `Subject` clone is a reference count).
    pub(crate) fn subject(&self, topic: &str) -> Result<async_nats::Subject> {
        if let Some(subject) = self.subjects.read().unwrap_or_else(|p| p.into_inner()).get(topic) {
            return Ok(subject.clone());
        }
        validate_topic(topic)?;
        let subject = async_nats::Subject::from(topic);
        let mut subjects = self.subjects.write().unwrap_or_else(|p| p.into_inner());
        if subjects.len() < SUBJECT_CACHE_LIMIT {
            subjects.insert(topic.into(), subject.clone());
        }
        Ok(subject)
    }

    /// A core publish: handed to the client, then returns once a flush covering it finished,
    /// all within `publish_timeout`.
    async fn publish_core(&self, subject: async_nats::Subject, topic: &str, out: wire::Outgoing) -> Result<()> {
        let timeout = self.options.publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || error::timeout(&format!("publish to {topic:?}"), timeout);
        let client = &self.client;
        // In a block of its own: the send's future (large) is gone before the flush wait, and
        // does not enlarge the state kept across it.
        let sent = {
            // One future for both cases (publish and publish_with_headers are two, and a future
            // holding either is as large as both).
            let message = async_nats::message::OutboundMessage {
                subject,
                reply: None,
                payload: out.payload,
                headers: out.headers,
            };
            // Boxed: the send's future is 776 bytes. Inline, it made every publish's future (which
            // async_trait allocates) 1,624 bytes, past glibc's per-thread cache of small blocks (up
            // to about 1 KiB): each publish took malloc's slow path. Two small blocks cost less.
            let mut send = Box::pin(async_nats::client::traits::Publisher::publish_message(client, message));
            // There is nearly always room in the client's channel: no timer unless there is none.
            match futures::poll!(send.as_mut()) {
                std::task::Poll::Ready(sent) => sent,
                std::task::Poll::Pending => tokio::time::timeout_at(deadline, send).await.map_err(|_| timed_out())?,
            }
        };
        sent.map_err(|e| error::publish(e, topic))?;
        let mine = self.flush.enqueued.fetch_add(1, Ordering::AcqRel) + 1;
        match self.flush.covering(client, mine, deadline).await {
            Ok(()) => Ok(()),
            Err(Some(e)) => Err(error::flush(e, topic)),
            Err(None) => Err(timed_out()),
        }
    }
}

/// Group flush of core publishes: concurrent publishers share one flush instead of queueing one
/// each, and only the publisher running the flush holds a timer. Publishes are numbered in
/// `enqueued` after they were handed to the client; a flush that started after publish `n` was
/// numbered covers it (the client's channel is FIFO).
#[derive(Debug)]
struct FlushGroup {
    /// Publishes handed to the client so far.
    enqueued: AtomicU64,
    /// The highest publish number covered by a finished flush.
    flushed: AtomicU64,
    /// 0: no flush in flight; otherwise the deadline of the publisher running it (ns since
    /// `epoch`, at least 1), which gives up then.
    lead: AtomicU64,
    /// Flushes ended so far, successfully or not.
    ends: AtomicU64,
    /// The publishers waiting for the flush in flight to end, woken all at once when it does.
    /// A list of wakers rather than a `tokio::sync::Notify`: a `Notify` waiter locks its list to
    /// enter it, to be woken and to leave it (≈ 720 instructions per publish in callgrind, the
    /// largest cost ours added to a core publish); here a waiter locks once to put its waker in
    /// (≈ 180).
    waiting: Mutex<Vec<std::task::Waker>>,
    epoch: tokio::time::Instant,
}

impl FlushGroup {
    fn new() -> Self {
        FlushGroup {
            enqueued: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            lead: AtomicU64::new(0),
            ends: AtomicU64::new(0),
            waiting: Mutex::new(Vec::new()),
            epoch: tokio::time::Instant::now(),
        }
    }

    /// Returns once publish number `mine` is covered by a finished flush: one in flight that
    /// started after it was numbered, or one it runs itself when none is in flight. `Err(None)`:
    /// `deadline` passed; `Err(Some(_))`: its own flush failed.
    async fn covering(
        &self,
        client: &async_nats::Client,
        mine: u64,
        deadline: tokio::time::Instant,
    ) -> std::result::Result<(), Option<async_nats::client::FlushError>> {
        let my_deadline =
            u64::try_from(deadline.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX).max(1);
        loop {
            if self.flushed.load(Ordering::Acquire) >= mine {
                return Ok(());
            }
            // Taken before looking again, so that the end of the flush in flight is not missed.
            let ended = FlushEnd { group: self, seen: self.ends.load(Ordering::Acquire) };
            if self.flushed.load(Ordering::Acquire) >= mine {
                return Ok(());
            }
            match self.lead.compare_exchange(0, my_deadline, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // Ends the lead even if this future is dropped mid-flush (its caller gave up).
                    let _lead = LeadGuard(self);
                    let upto = self.enqueued.load(Ordering::Acquire);
                    // Boxed, as the timed wait below: one publish in many runs a flush, and
                    // inline these would enlarge every publish's (allocated, moved) future.
                    return match Box::pin(tokio::time::timeout_at(deadline, client.flush())).await {
                        Ok(Ok(())) => {
                            self.flushed.fetch_max(upto, Ordering::AcqRel);
                            Ok(())
                        }
                        Ok(Err(e)) => Err(Some(e)),
                        Err(_) => Err(None),
                    };
                }
                // The flush in flight ends (or gives up) by its runner's deadline: a timer of our
                // own only if ours comes first.
                Err(lead) if lead > my_deadline => {
                    if Box::pin(tokio::time::timeout_at(deadline, ended)).await.is_err() {
                        return Err(None);
                    }
                }
                // Each wait ends by `deadline`, and so does a flush run after it: past it, the
                // next turn of the loop fails at once.
                Err(_) => ended.await,
            }
        }
    }
}

/// Ends a flush's lead: the next waiting publisher may start one.
struct LeadGuard<'a>(&'a FlushGroup);

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        let group = self.0;
        group.lead.store(0, Ordering::Release);
        // Counted before the list is taken: a waiter that locks it after this sees the end.
        group.ends.fetch_add(1, Ordering::AcqRel);
        let waiting = std::mem::take(&mut *lock(&group.waiting));
        for waker in waiting {
            waker.wake();
        }
    }
}

/// Resolves once a flush ended after `seen` flushes had ended.
struct FlushEnd<'a> {
    group: &'a FlushGroup,
    seen: u64,
}

impl std::future::Future for FlushEnd<'_> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let group = self.group;
        if group.ends.load(Ordering::Acquire) != self.seen {
            return std::task::Poll::Ready(());
        }
        let mut waiting = lock(&group.waiting);
        // Looked at again under the lock that the ending flush takes after counting its end.
        if group.ends.load(Ordering::Acquire) != self.seen {
            return std::task::Poll::Ready(());
        }
        // A future polled again before the end (a `select!`) leaves one more waker: all go at
        // the end of the flush in flight, which is bounded by its runner's deadline.
        waiting.push(cx.waker().clone());
        std::task::Poll::Pending
    }
}

/// One subscription's control state.
pub(crate) struct SubState {
    id: u64,
    /// Stop at once (unsubscribe).
    pub(crate) stop: CancellationToken,
    /// Stop taking new messages, finish the buffered ones (disconnect).
    pub(crate) drain: CancellationToken,
    /// The task that pulls messages.
    pub(crate) pump: TaskTracker,
    /// The running handlers.
    pub(crate) handlers: TaskTracker,
    /// Concurrency 1: the pump runs each handler itself instead of spawning a task for it.
    inline: bool,
    drain_timeout: Duration,
    /// JetStream: an ephemeral consumer (stream, consumer) to delete on unsubscribe.
    pub(crate) ephemeral: Mutex<Option<(String, String)>>,
}

impl SubState {
    fn new(id: u64, drain_timeout: Duration, inline: bool) -> Self {
        SubState {
            id,
            stop: CancellationToken::new(),
            drain: CancellationToken::new(),
            pump: TaskTracker::new(),
            handlers: TaskTracker::new(),
            inline,
            drain_timeout,
            ephemeral: Mutex::new(None),
        }
    }

    fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    /// Waits for the running handlers, except the one calling (an unsubscribe or disconnect from
    /// inside this subscription's own handler).
    async fn wait_for_others(self: &Arc<Self>) {
        broker_core::wait_for_other_handlers(&self.handlers, self.key()).await;
    }

    /// Waits for the pump and the running handlers. From inside this subscription's own handler
    /// run by the pump itself (concurrency 1), the pump is the caller: it is not waited for.
    async fn wait_stopped(self: &Arc<Self>) {
        if !(self.inline && running_handler_of() == Some(self.key())) {
            self.pump.wait().await;
        }
        self.wait_for_others().await;
    }

    /// Runs the handler on `event`, releasing `permit` (if any) after: with concurrency 1 right
    /// here, in the pump (no task per delivery), otherwise as one of this subscription's tasks.
    pub(crate) async fn dispatch(
        self: &Arc<Self>,
        handler: &Arc<dyn Handler>,
        event: Event,
        auto_ack: bool,
        permit: Option<OwnedSemaphorePermit>,
        counters: Option<&Arc<Counters>>,
    ) {
        if self.inline {
            let run = run_handler(handler.as_ref(), event, auto_ack);
            if let Err(error) = scope_handler(self.key(), run).await {
                report_failure(&error, counters);
            }
            drop(permit);
            return;
        }
        let handler = Arc::clone(handler);
        let counters = counters.cloned();
        self.handlers.spawn(scope_handler(self.key(), async move {
            if let Err(error) = run_handler(handler.as_ref(), event, auto_ack).await {
                report_failure(&error, counters.as_ref());
            }
            drop(permit);
        }));
    }
}

fn report_failure(error: &Error, counters: Option<&Arc<Counters>>) {
    match counters {
        Some(counters) if error.kind() == ErrorKind::Handler => {
            counters.handler_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "nats broker: handler failed; core NATS does not redeliver");
        }
        _ => tracing::debug!(%error, "nats broker: delivery failed"),
    }
}

impl NatsBroker {
    /// A NATS broker with default options (core NATS at [`config::DEFAULT_ADDRESS`]).
    pub fn new() -> Self {
        NatsBroker::build(BrokerOptions::default(), NatsConfig::default())
    }

    /// A NATS broker with `options`; see [`config::PARAMS`] for its parameters. Does no I/O.
    pub fn with_options(options: BrokerOptions) -> Result<Self> {
        let config = NatsConfig::from_options(&options)?;
        Ok(NatsBroker::build(options, config))
    }

    fn build(options: BrokerOptions, config: NatsConfig) -> Self {
        NatsBroker {
            inner: Arc::new(Inner {
                options: RwLock::new(options),
                config: RwLock::new(config),
                slot: tokio::sync::Mutex::new(None),
                current: RunningState::new(),
                counters: Arc::new(Counters::default()),
            }),
        }
    }

    /// What the broker gave up on so far.
    pub fn stats(&self) -> NatsStats {
        let c = &self.inner.counters;
        NatsStats {
            slow_consumer_events: c.slow_consumer_events.load(Ordering::Relaxed),
            codec_errors: c.codec_errors.load(Ordering::Relaxed),
            handler_failures: c.handler_failures.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            consumer_errors: c.consumer_errors.load(Ordering::Relaxed),
        }
    }

    /// The async-nats client while connected, for what this crate does not wrap.
    pub fn client(&self) -> Option<async_nats::Client> {
        self.current().map(|r| r.client.clone())
    }

    fn current(&self) -> Option<Arc<Running>> {
        self.inner.current.get()
    }

    fn connected(&self) -> Result<Arc<Running>> {
        self.inner.current.connected(NAME)
    }

    fn config(&self) -> NatsConfig {
        self.inner.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Default for NatsBroker {
    fn default() -> Self {
        NatsBroker::new()
    }
}

impl fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBroker")
            .field("config", &self.config())
            .field("connected", &self.current().is_some())
            .finish()
    }
}

impl Inner {
    fn options(&self) -> BrokerOptions {
        self.options.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped without disconnect(): stop the pumps rather than leak them.
        let current = self.current.take();
        if let Some(running) = current {
            for sub in lock(&running.subs).values() {
                sub.stop.cancel();
            }
        }
    }
}

async fn open(options: &BrokerOptions, config: &NatsConfig, counters: &Arc<Counters>) -> Result<Running> {
    let servers_text = config.servers.iter().map(|s| broker_core::redact_credentials(s)).collect::<Vec<_>>().join(", ");
    let mut addresses = Vec::with_capacity(config.servers.len());
    for server in &config.servers {
        addresses.push(server.parse::<async_nats::ServerAddr>().map_err(|e| {
            Error::invalid_input(format!(
                "NATS address {} does not parse: {e}",
                broker_core::redact_credentials(server)
            ))
        })?);
    }
    let events = Arc::clone(counters);
    let mut connect = async_nats::ConnectOptions::new()
        .name(&config.client_name)
        .connection_timeout(options.connect_timeout)
        .subscription_capacity(config.buffer_size)
        // Reconnect quickly after a server restart: 0, 100, 200 ... ms, at most 1 s apart.
        .reconnect_delay_callback(|attempts| Duration::from_millis(100 * attempts.saturating_sub(1).min(10) as u64))
        .event_callback(move |event| {
            let counters = Arc::clone(&events);
            async move {
                match event {
                    async_nats::Event::SlowConsumer(sid) => {
                        counters.slow_consumer_events.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            sid,
                            "nats broker: slow consumer: a subscription's buffer was full and NATS dropped messages"
                        );
                    }
                    async_nats::Event::Disconnected => tracing::warn!("nats broker: disconnected; reconnecting"),
                    async_nats::Event::Connected => tracing::info!("nats broker: connected"),
                    other => tracing::info!(event = %other, "nats broker: connection event"),
                }
            }
        });
    if let Some((user, password)) = &config.user_password {
        connect = connect.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        connect = connect.token(token.clone());
    }
    if let Some(tls) = &config.tls {
        connect = connect.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            connect = connect.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            connect = connect.add_client_certificate(cert.clone(), key.clone());
        }
    }
    let client = tokio::time::timeout(options.connect_timeout, connect.connect(addresses))
        .await
        .map_err(|_| error::connect_timeout(&servers_text, options.connect_timeout))?
        .map_err(|e| error::connect(e, &servers_text))?;
    let js = if config.jetstream {
        let mut js = async_nats::jetstream::new(client.clone());
        js.set_timeout(options.publish_timeout);
        // A raw $JS.API.INFO request: the typed account-info response of async-nats does not
        // parse nats-server 2.9's answer.
        let answer = tokio::time::timeout(options.connect_timeout, client.request("$JS.API.INFO", bytes::Bytes::new()))
            .await
            .map_err(|_| error::connect_timeout(&servers_text, options.connect_timeout))?;
        let problem = match answer {
            Err(e) => Some(e.to_string()),
            Ok(reply) => match serde_json::from_slice::<serde_json::Value>(&reply.payload) {
                Ok(json) => json.get("error").map(|e| e.to_string()),
                Err(e) => Some(format!("unreadable answer: {e}")),
            },
        };
        if let Some(problem) = problem {
            return Err(Error::new(
                ErrorKind::Connection,
                format!(
                    "JetStream is not available on the NATS server at {servers_text} (start it with -js): {problem}"
                ),
            ));
        }
        Some(js)
    } else {
        None
    };
    Ok(Running {
        client,
        config: config.clone(),
        options: options.clone(),
        js,
        streams: Mutex::new(HashMap::default()),
        subs: Mutex::new(HashMap::new()),
        next_sub: AtomicU64::new(1),
        counters: Arc::clone(counters),
        servers: servers_text,
        flush: FlushGroup::new(),
        subjects: RwLock::new(HashMap::default()),
    })
}

#[async_trait]
impl Broker for NatsBroker {
    fn init(&self, options: BrokerOptions) -> Result<()> {
        if self.current().is_some() {
            return Err(Error::invalid_input("init() on a connected nats broker: call disconnect() first"));
        }
        let config = NatsConfig::from_options(&options)?;
        *self.inner.options.write().unwrap_or_else(|p| p.into_inner()) = options;
        *self.inner.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    fn options(&self) -> BrokerOptions {
        self.inner.options()
    }

    fn address(&self) -> String {
        match self.current() {
            Some(running) => running.servers.clone(),
            None => {
                self.config().servers.iter().map(|s| broker_core::redact_credentials(s)).collect::<Vec<_>>().join(", ")
            }
        }
    }

    async fn connect(&self) -> Result<()> {
        let mut slot = self.inner.slot.lock().await;
        if slot.is_some() {
            return Ok(());
        }
        let options = self.inner.options();
        let config = NatsConfig::from_options(&options)?;
        let running = Arc::new(open(&options, &config, &self.inner.counters).await?);
        self.inner.current.set(Arc::clone(&running));
        *slot = Some(running);
        Ok(())
    }

    async fn disconnect(&self) -> Result<()> {
        let mut slot = self.inner.slot.lock().await;
        let Some(running) = slot.take() else { return Ok(()) };
        self.inner.current.clear();
        let timeout = running.options.drain_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let subs: Vec<Arc<SubState>> = lock(&running.subs).drain().map(|(_, s)| s).collect();
        for sub in &subs {
            sub.drain.cancel();
            sub.pump.close();
            sub.handlers.close();
        }
        let drained = tokio::time::timeout_at(deadline, async {
            for sub in &subs {
                sub.wait_stopped().await;
            }
        })
        .await
        .is_ok();
        for sub in &subs {
            sub.stop.cancel();
            let ephemeral = lock(&sub.ephemeral).take();
            if let Some((stream, consumer)) = ephemeral {
                jetstream::delete_consumer(&running, &stream, &consumer).await;
            }
        }
        // The handlers' acks (and any publish) leave before the connection closes.
        let flush_deadline = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
        let flushed = matches!(tokio::time::timeout_at(flush_deadline, running.client.flush()).await, Ok(Ok(())));
        let _ = tokio::time::timeout(Duration::from_secs(1), running.client.drain()).await;
        if drained && flushed {
            return Ok(());
        }
        let mut problems = Vec::new();
        if !drained {
            problems.push(format!("handlers were still running after the drain timeout of {timeout:?}"));
        }
        if !flushed {
            problems.push("the last messages and acks could not be flushed (connection down?)".to_string());
        }
        tracing::warn!(problems = %problems.join("; "), "nats broker: disconnect did not drain cleanly");
        Err(Error::new(ErrorKind::Timeout, format!("nats broker disconnect: {}", problems.join("; "))))
    }

    async fn publish(&self, topic: &str, mut message: Message, options: PublishOptions) -> Result<()> {
        let running = self.connected()?;
        let subject = running.subject(topic)?;
        capabilities_of(&running.config).check_publish(NAME, &options)?;
        if !options.headers.is_empty() {
            message.headers.extend(options.headers);
        }
        let out = wire::encode(topic, message, running.config.envelope)?;
        if running.js.is_some() {
            // Boxed: the JetStream publish's future is large, and every core publish's future
            // (allocated and moved by async_trait) would otherwise be as large.
            return Box::pin(jetstream::publish(&running, subject, topic, out)).await;
        }
        running.publish_core(subject, topic, out).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let running = self.connected()?;
        validate_topic(topic)?;
        capabilities_of(&running.config).check_subscribe(NAME, &options)?;
        let id = running.next_sub.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(SubState::new(id, running.options.drain_timeout, options.concurrency == 1));
        if running.js.is_some() {
            jetstream::subscribe(&running, topic, handler, &options, &state).await?;
        } else {
            core_subscribe(&running, topic, handler, &options, &state).await?;
        }
        lock(&running.subs).insert(id, Arc::clone(&state));
        Ok(Box::new(NatsSubscriber { topic: topic.to_string(), options, state, running: Arc::downgrade(&running) }))
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        capabilities_of(&self.config())
    }
}

async fn core_subscribe(
    running: &Arc<Running>,
    topic: &str,
    handler: Arc<dyn Handler>,
    options: &SubscribeOptions,
    state: &Arc<SubState>,
) -> Result<()> {
    let timeout = running.options.publish_timeout;
    let client = &running.client;
    let subscription = tokio::time::timeout(timeout, async {
        let subscription = match &options.queue {
            Some(queue) => client.queue_subscribe(topic.to_string(), queue.clone()).await,
            None => client.subscribe(topic.to_string()).await,
        }
        .map_err(|e| error::subscribe(e, topic))?;
        // The server has processed the SUB before subscribe() returns: a message published
        // afterwards, from any connection, reaches it.
        sync_with_server(client).await.map_err(|e| Error::new(e.kind(), format!("subscribe to {topic:?}: {e}")))?;
        Ok::<_, Error>(subscription)
    })
    .await
    .map_err(|_| error::timeout(&format!("subscribe to {topic:?}"), timeout))??;
    let pump = core_pump(
        subscription,
        Arc::clone(state),
        handler,
        options.clone(),
        topic.into(),
        running.config.envelope,
        Arc::clone(&running.counters),
    );
    state.pump.spawn(pump);
    Ok(())
}

/// One round trip through the server on this connection: a request to a subject nobody
/// subscribes to, answered by the server with "no responders" once it has read everything sent
/// before it. Callers bound it with a timeout.
pub(crate) async fn sync_with_server(client: &async_nats::Client) -> Result<()> {
    match client.request(client.new_inbox(), bytes::Bytes::new()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Err(e) => {
            Err(Error::new(ErrorKind::Connection, format!("round trip to the NATS server failed: {e}")).with_source(e))
        }
    }
}

enum Step<T> {
    Stop,
    Drain,
    Item(T),
}

/// One core subscription's loop: a concurrency permit, then a message, then its handler (run
/// right here at concurrency 1, in a task otherwise).
async fn core_pump(
    mut subscription: async_nats::Subscriber,
    state: Arc<SubState>,
    handler: Arc<dyn Handler>,
    options: SubscribeOptions,
    topic: Arc<str>,
    envelope: Envelope,
    counters: Arc<Counters>,
) {
    // Concurrency 1 runs each handler inline: the next message is only read once it is done,
    // so there is nothing to limit.
    let limit = (!state.inline).then(|| Arc::new(Semaphore::new(options.concurrency)));
    // Made once, not per message: each of these registers with (and leaves) its token's waiter
    // list when made and dropped.
    let mut stop = std::pin::pin!(state.stop.cancelled());
    let mut drain = std::pin::pin!(state.drain.cancelled());
    let mut draining = false;
    loop {
        let permit = match &limit {
            None => None,
            Some(limit) => tokio::select! {
                biased;
                _ = &mut stop => break,
                permit = Arc::clone(limit).acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => break,
                },
            },
        };
        let step = tokio::select! {
            biased;
            _ = &mut stop => Step::Stop,
            _ = &mut drain, if !draining => Step::Drain,
            message = subscription.next() => match message {
                Some(message) => Step::Item(message),
                None => Step::Stop,
            },
        };
        let message = match step {
            Step::Stop => break,
            Step::Drain => {
                // The server stops sending; what the client holds is still handled, then the stream ends.
                draining = true;
                if tokio::time::timeout(Duration::from_secs(1), subscription.drain()).await.is_err() {
                    break;
                }
                continue;
            }
            Step::Item(message) => message,
        };
        let decoded = wire::decode(message.headers.as_ref(), message.payload, envelope);
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(error) => {
                counters.codec_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%topic, %error, "nats broker: a message did not decode; the handler was not called");
                continue;
            }
        };
        let event = Event::builder(Arc::clone(&topic), decoded).build();
        state.dispatch(&handler, event, options.auto_ack, permit, Some(&counters)).await;
    }
    if !draining {
        let _ = tokio::time::timeout(Duration::from_secs(1), subscription.unsubscribe()).await;
    }
}

/// A subscription of the NATS broker.
struct NatsSubscriber {
    topic: String,
    options: SubscribeOptions,
    state: Arc<SubState>,
    running: Weak<Running>,
}

impl fmt::Debug for NatsSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSubscriber").field("topic", &self.topic).field("id", &self.state.id).finish()
    }
}

#[async_trait]
impl Subscriber for NatsSubscriber {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn options(&self) -> &SubscribeOptions {
        &self.options
    }

    async fn unsubscribe(&self) -> Result<()> {
        let state = &self.state;
        let running = self.running.upgrade();
        if let Some(running) = &running {
            lock(&running.subs).remove(&state.id);
        }
        state.stop.cancel();
        state.pump.close();
        state.handlers.close();
        let timeout = state.drain_timeout;
        let waited = tokio::time::timeout(timeout, state.wait_stopped()).await;
        let ephemeral = lock(&state.ephemeral).take();
        if let (Some(running), Some((stream, consumer))) = (running, ephemeral) {
            jetstream::delete_consumer(&running, &stream, &consumer).await;
        }
        waited.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!("unsubscribe from {:?}: handlers still running after {timeout:?}", self.topic),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Poll, Wake, Waker};

    use super::*;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_end_of_a_flush_wakes_its_waiters_and_is_seen_by_a_late_one() {
        let group = FlushGroup::new();
        group.lead.store(1, Ordering::Release);
        let seen = group.ends.load(Ordering::Acquire);
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        let mut first = std::pin::pin!(FlushEnd { group: &group, seen });
        let mut second = std::pin::pin!(FlushEnd { group: &group, seen });
        assert!(first.as_mut().poll(&mut cx).is_pending());
        assert!(second.as_mut().poll(&mut cx).is_pending());
        assert_eq!(lock(&group.waiting).len(), 2);

        drop(LeadGuard(&group));
        assert_eq!(counter.0.load(Ordering::SeqCst), 2, "both waiters woken");
        assert!(lock(&group.waiting).is_empty());
        assert_eq!(group.lead.load(Ordering::Acquire), 0, "the next publisher may lead");
        assert_eq!(first.as_mut().poll(&mut cx), Poll::Ready(()));
        assert_eq!(second.as_mut().poll(&mut cx), Poll::Ready(()));
        // One that counted the ends before this one but is polled only now is done at once,
        // without waiting for another flush; one that counted after it waits for the next.
        let mut late = std::pin::pin!(FlushEnd { group: &group, seen });
        assert_eq!(late.as_mut().poll(&mut cx), Poll::Ready(()));
        let mut next = std::pin::pin!(FlushEnd { group: &group, seen: group.ends.load(Ordering::Acquire) });
        assert!(next.as_mut().poll(&mut cx).is_pending());
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    }
}
