//! # broker-redis: Go Micro's Redis broker, and a durable Redis Streams broker
//!
//! Two plugins, linked with `use broker_redis as _;` (or the `redis` feature of the facade):
//!
//! ## `redis`: Pub/Sub (Go Micro's Redis broker)
//! `PUBLISH <topic> <payload>` / `SUBSCRIBE <topic>`, at most once: a message published while a
//! subscriber is disconnected, or one its handler fails, is gone. Queue groups are
//! `Unsupported` (Go Micro's plugin silently ignored `Queue`), and so are `max_redeliveries`
//! and delays.
//!
//! **Payload.** Always Go Micro's JSON envelope (`{"Header":{…},"Body":"<base64>"}`, written and
//! read by [`broker_core::codec`]): Pub/Sub has no header fields, so headers need an envelope, and
//! choosing Go Micro's makes the default already readable by Go Micro services. It costs base64
//! (4/3 of the body). With `envelope=go-micro` (`MICRO_BROKER_ENVELOPE=go-micro`) the publisher
//! also sets `Micro-Topic`, `Micro-Id` and `Content-Type` as Go Micro's client does, so the payload
//! is exactly what Go Micro's Redis plugin publishes. A payload that is not an envelope (a raw
//! `redis-cli PUBLISH`) is delivered as the body, without headers, with a `Codec` error attached
//! to the event ([`Event::error`](broker_core::Event::error)).
//!
//! ## `redis-streams`: Redis Streams (durable, at least once)
//! - **Publish**: `XADD <topic> MAXLEN ~ <maxlen> * body <body> h:<name> <value> …`: the stream
//!   key is the topic, the body is the field [`BODY_FIELD`] and each header `<name>` the field
//!   `h:<name>` ([`HEADER_PREFIX`]), plain data that `redis-cli XRANGE <topic> - +` shows. With
//!   `envelope=go-micro` the Go Micro event headers are added (Go Micro has no Streams broker).
//! - **Queue group** = consumer group named after the queue; **broadcast** = a consumer group of
//!   its own per subscription (`micro-broker.broadcast.<uuid>`), destroyed at unsubscribe.
//!   Groups are created at `$`: a subscription reads what is published after it is made. A queue
//!   group then keeps its place while all its members are gone (messages published meanwhile wait
//!   for the group), but a new subscriber does not read older history, so `persistence` is not
//!   declared.
//! - **Reading**: `XREADGROUP … BLOCK <block_ms> … >` on a connection of the subscription's own,
//!   without the client's 500 ms response timeout.
//! - **Acks**: `XACK` after the handler succeeds (auto-ack) or when it acks. A nack claims the
//!   entry back at once and delivers it again with `attempt() + 1`; an entry read by a consumer that
//!   died stays pending and is claimed by a live member (`XAUTOCLAIM`) after `claim_idle_ms`
//!   (default 30 s; a handler slower than that may see its message delivered twice). Past
//!   `max_redeliveries` (default: no limit, as the memory backend) the entry is copied to the
//!   stream `<topic>.dlq` with `x-dead-letter-reason`, `x-original-topic` and
//!   `x-delivery-attempts`, then acked.
//! - **Reconnecting**: after a lost connection the reader reconnects (backoff 50 ms doubling to
//!   500 ms), makes sure its group exists, and first reads its own pending entries again (`0`):
//!   a read whose reply was lost with the connection, or a message whose `XACK` failed during the
//!   outage, is delivered again (attempt 2). Delivery is at least once: duplicates are possible.
//! - **Trimming**: streams are trimmed approximately to `maxlen` on every `XADD`; entries trimmed
//!   before they were read are lost. When a broadcast subscription ends and its stream has no
//!   consumer group left, the stream is deleted (new groups start at `$`, so nobody could read it).
//!   Queue groups are durable and are never deleted by this crate (a member with nothing pending
//!   is removed from its group at unsubscribe). Not cleaned up: the group of a broadcast
//!   subscriber whose process died without `unsubscribe()` (it pins nothing but its pending
//!   entries; `XINFO GROUPS <topic>` lists `micro-broker.broadcast.*` groups), and streams
//!   published to while they have no group (each is bounded by `maxlen`).
//!
//! ## Both
//! Address: the first of `addresses` (`MICRO_BROKER_ADDRESS`), default [`DEFAULT_ADDRESS`];
//! `redis://user:password@host:port/db`, the password never shown (`Debug`, errors). An
//! unreachable server or wrong credentials fail `connect()` with `ErrorKind::Connection` naming the
//! address, within `connect_timeout`. After a connection loss, publishing fails (with
//! `Connection`) until the server is back; the client reconnects by itself and subscriptions
//! reconnect and subscribe again (Pub/Sub loses what was published meanwhile; Streams reads it).
//! A subscribed Pub/Sub connection is checked with a PING every 5 s, so that a silently dead
//! connection is noticed. Every network wait is bounded (a Streams read by `block_ms` plus
//! `connect_timeout`). `disconnect()` and `unsubscribe()` wait for running handlers
//! (and their acks), bounded by `drain_timeout`. Parameters: [`config::PARAMS`].
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
mod error;
mod pubsub;
mod streams;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::{
    Broker, BrokerOptions, Capabilities, Error, ErrorKind, Handler, Message, PublishOptions, Result, SubscribeOptions,
    Subscriber, validate_topic,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{DEFAULT_ADDRESS, RedisConfig};

/// The Pub/Sub plugin's name.
pub const PUBSUB_NAME: &str = "redis";
/// The Streams plugin's name.
pub const STREAMS_NAME: &str = "redis-streams";
/// The stream field holding the body.
pub const BODY_FIELD: &str = "body";
/// The prefix of the stream fields holding headers: header `trace` is field `h:trace`.
pub const HEADER_PREFIX: &str = "h:";

/// What the `redis` plugin does: at most once, ordered per publisher, nothing more.
pub const PUBSUB_CAPABILITIES: Capabilities = Capabilities { ordering: true, ..Capabilities::NONE };

/// What the `redis-streams` plugin does.
pub const STREAMS_CAPABILITIES: Capabilities =
    Capabilities { queue_groups: true, ordering: true, redelivery: true, native_headers: true, ..Capabilities::NONE };

broker_core::register_plugin! {
    name: PUBSUB_NAME,
    description: "Redis Pub/Sub (Go Micro's Redis broker): at most once, no queue groups",
    capabilities: PUBSUB_CAPABILITIES,
    factory: build_pubsub,
}

broker_core::register_plugin! {
    name: STREAMS_NAME,
    description: "Redis Streams: consumer groups, acks, redelivery and dead letters (at least once)",
    capabilities: STREAMS_CAPABILITIES,
    factory: build_streams,
}

fn build_pubsub(options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(RedisBroker::pubsub(options)?))
}

fn build_streams(options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(RedisBroker::streams(options)?))
}

/// Which of the two plugins a [`RedisBroker`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plugin `redis`: Pub/Sub.
    PubSub,
    /// Plugin `redis-streams`: Streams with consumer groups.
    Streams,
}

/// A Redis broker, in one of the two [`Mode`]s.
pub struct RedisBroker {
    mode: Mode,
    settings: Mutex<(BrokerOptions, RedisConfig)>,
    state: Mutex<Option<Arc<Connected>>>,
    connect_lock: tokio::sync::Mutex<()>,
}

/// A connected broker's shared state.
pub(crate) struct Connected {
    pub(crate) client: redis::Client,
    pub(crate) conn: ConnectionManager,
    pub(crate) options: BrokerOptions,
    pub(crate) config: RedisConfig,
    subscriptions: Mutex<HashMap<u64, Arc<SubState>>>,
    next_id: AtomicU64,
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (options, config) = lock(&self.settings).clone();
        f.debug_struct("RedisBroker")
            .field("mode", &self.mode)
            .field("config", &config)
            .field("options", &options)
            .field("connected", &lock(&self.state).is_some())
            .finish()
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl RedisBroker {
    /// A Pub/Sub broker (plugin `redis`), not connected.
    pub fn pubsub(options: BrokerOptions) -> Result<Self> {
        Self::new(Mode::PubSub, options)
    }

    /// A Streams broker (plugin `redis-streams`), not connected.
    pub fn streams(options: BrokerOptions) -> Result<Self> {
        Self::new(Mode::Streams, options)
    }

    /// A broker in `mode`, not connected.
    pub fn new(mode: Mode, options: BrokerOptions) -> Result<Self> {
        let config = RedisConfig::from_options(&options)?;
        Ok(RedisBroker {
            mode,
            settings: Mutex::new((options, config)),
            state: Mutex::new(None),
            connect_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> RedisConfig {
        lock(&self.settings).1.clone()
    }

    fn connected(&self) -> Result<Arc<Connected>> {
        lock(&self.state).clone().ok_or_else(|| Error::not_connected(self.name()))
    }
}

impl Drop for RedisBroker {
    /// A broker dropped without `disconnect()` stops its subscriptions' tasks (without waiting).
    fn drop(&mut self) {
        if let Some(state) = lock(&self.state).take() {
            for sub in lock(&state.subscriptions).values() {
                sub.cancel.cancel();
            }
        }
    }
}

/// Opens the connection manager (reconnecting by itself), bounded by the connect timeout, and checks it with PING.
async fn open(config: &RedisConfig, options: &BrokerOptions) -> Result<(redis::Client, ConnectionManager)> {
    let address = config.redacted_url();
    let client = redis::Client::open(config.url.as_str())
        .map_err(|e| Error::invalid_input(format!("invalid redis address {address}: {e}")).with_source(e))?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.connect_timeout))
        // No response timeout of the client's own: every command on this connection is bounded
        // by a timer of ours (publish_timeout or connect_timeout), which fires first or together
        // with it, and a second timer per command is a cost (its expiry does not make the manager
        // reconnect either: a timeout is not an unrecoverable error to redis-rs).
        .set_response_timeout(None)
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    let what = format!("cannot connect to redis at {address}");
    let mut conn =
        match tokio::time::timeout(options.connect_timeout, client.get_connection_manager_with_config(manager_config))
            .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(error::connection(&what, e)),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    format!("{what}: no connection within {:?}", options.connect_timeout),
                ));
            }
        };
    match tokio::time::timeout(options.connect_timeout, redis::cmd("PING").query_async::<String>(&mut conn)).await {
        Ok(Ok(_)) => Ok((client, conn)),
        Ok(Err(e)) => Err(error::connection(&what, e)),
        Err(_) => Err(Error::new(
            ErrorKind::Connection,
            format!("{what}: no answer to PING within {:?}", options.connect_timeout),
        )),
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn init(&self, options: BrokerOptions) -> Result<()> {
        let _connect = self
            .connect_lock
            .try_lock()
            .map_err(|_| Error::invalid_input("init() while connect() or disconnect() runs"))?;
        if lock(&self.state).is_some() {
            return Err(Error::invalid_input("init() on a connected broker: call disconnect() first"));
        }
        let config = RedisConfig::from_options(&options)?;
        *lock(&self.settings) = (options, config);
        Ok(())
    }

    fn options(&self) -> BrokerOptions {
        lock(&self.settings).0.clone()
    }

    fn address(&self) -> String {
        lock(&self.settings).1.redacted_url()
    }

    async fn connect(&self) -> Result<()> {
        let _guard = self.connect_lock.lock().await;
        if lock(&self.state).is_some() {
            return Ok(());
        }
        let (options, config) = lock(&self.settings).clone();
        let (client, conn) = open(&config, &options).await?;
        *lock(&self.state) = Some(Arc::new(Connected {
            client,
            conn,
            options,
            config,
            subscriptions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }));
        Ok(())
    }

    async fn disconnect(&self) -> Result<()> {
        let _guard = self.connect_lock.lock().await;
        let Some(state) = lock(&self.state).take() else { return Ok(()) };
        let subs: Vec<Arc<SubState>> = lock(&state.subscriptions).drain().map(|(_, s)| s).collect();
        let deadline = tokio::time::Instant::now() + state.options.drain_timeout;
        let mut outcome = Ok(());
        for sub in subs {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Err(e) = sub.stop(left.max(Duration::from_millis(1))).await {
                outcome = Err(e);
            }
        }
        outcome
    }

    async fn publish(&self, topic: &str, message: Message, options: PublishOptions) -> Result<()> {
        validate_topic(topic)?;
        self.capabilities().check_publish(self.name(), &options)?;
        let state = self.connected()?;
        let mut message = message;
        if !options.headers.is_empty() {
            message.headers.extend(options.headers);
        }
        if state.config.envelope == broker_core::codec::Envelope::GoMicro {
            broker_core::codec::add_go_micro_headers(&mut message, topic);
        }
        match self.mode {
            Mode::PubSub => pubsub::publish(&state, topic, &message).await,
            Mode::Streams => streams::publish(&state, topic, &message).await,
        }
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        validate_topic(topic)?;
        self.capabilities().check_subscribe(self.name(), &options)?;
        let state = self.connected()?;
        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        let sub = Arc::new(SubState {
            topic: topic.to_string(),
            options: options.clone(),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            stopped: tokio::sync::Mutex::new(false),
            cleanup: Mutex::new(None),
            drain_timeout: state.options.drain_timeout,
            id: uuid::Uuid::new_v4().to_string(),
        });
        match self.mode {
            Mode::PubSub => pubsub::start(&state, &sub, handler).await?,
            Mode::Streams => streams::start(&state, &sub, handler).await?,
        }
        lock(&state.subscriptions).insert(id, Arc::clone(&sub));
        Ok(Box::new(RedisSubscriber { sub, id, state: Arc::downgrade(&state) }))
    }

    fn name(&self) -> &'static str {
        match self.mode {
            Mode::PubSub => PUBSUB_NAME,
            Mode::Streams => STREAMS_NAME,
        }
    }

    fn capabilities(&self) -> Capabilities {
        match self.mode {
            Mode::PubSub => PUBSUB_CAPABILITIES,
            Mode::Streams => STREAMS_CAPABILITIES,
        }
    }
}

/// What a subscription's tasks share.
pub(crate) struct SubState {
    pub(crate) topic: String,
    pub(crate) options: SubscribeOptions,
    /// Stops the reader tasks.
    pub(crate) cancel: CancellationToken,
    /// The reader tasks and the running handlers.
    pub(crate) tracker: TaskTracker,
    stopped: tokio::sync::Mutex<bool>,
    /// What to do on the server once stopped (Streams: destroy a broadcast group).
    pub(crate) cleanup: Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
    drain_timeout: Duration,
    /// A unique id (consumer name, broadcast group name).
    pub(crate) id: String,
}

impl SubState {
    /// The key [`broker_core::scope_handler`] marks this subscription's handlers with.
    pub(crate) fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    /// Stops reading, waits for running handlers (unless called from one of them) up to `limit`,
    /// then cleans up on the server. Idempotent.
    async fn stop(self: &Arc<Self>, limit: Duration) -> Result<()> {
        self.cancel.cancel();
        self.tracker.close();
        let from_own_handler = broker_core::running_handler_of() == Some(self.key());
        let mut stopped = self.stopped.lock().await;
        if *stopped {
            return Ok(());
        }
        *stopped = true;
        let mut outcome = Ok(());
        if !from_own_handler && tokio::time::timeout(limit, self.tracker.wait()).await.is_err() {
            outcome = Err(Error::new(
                ErrorKind::Timeout,
                format!("handlers of the subscription to {:?} still running after {limit:?}", self.topic),
            ));
        }
        let cleanup = lock(&self.cleanup).take();
        if let Some(cleanup) = cleanup {
            if from_own_handler {
                tokio::spawn(cleanup);
            } else {
                cleanup.await;
            }
        }
        outcome
    }
}

/// A live subscription of a [`RedisBroker`].
struct RedisSubscriber {
    sub: Arc<SubState>,
    id: u64,
    state: std::sync::Weak<Connected>,
}

impl fmt::Debug for RedisSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSubscriber").field("topic", &self.sub.topic).field("id", &self.sub.id).finish()
    }
}

#[async_trait]
impl Subscriber for RedisSubscriber {
    fn topic(&self) -> &str {
        &self.sub.topic
    }

    fn options(&self) -> &SubscribeOptions {
        &self.sub.options
    }

    fn id(&self) -> Option<&str> {
        Some(&self.sub.id)
    }

    async fn unsubscribe(&self) -> Result<()> {
        if let Some(state) = self.state.upgrade() {
            lock(&state.subscriptions).remove(&self.id);
        }
        self.sub.stop(self.sub.drain_timeout).await
    }
}

/// Waits `delay` or until `cancel`; true when cancelled.
pub(crate) async fn sleep_or_cancel(cancel: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}
