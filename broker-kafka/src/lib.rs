//! # broker-kafka: the Kafka backend (plugin `kafka`)
//!
//! Link it with `use broker_kafka as _;` (or the facade's `kafka` feature), then pick it with
//! `MICRO_BROKER=kafka`; `MICRO_BROKER_ADDRESS` gives the bootstrap servers (comma-separated,
//! `kafka://host:port` or `host:port`, default [`config::DEFAULT_ADDRESS`]). Parameters are listed
//! in [`config::PARAMS`]; `rdkafka.<key>` parameters go straight to librdkafka (SASL, tuning).
//! At-least-once over Kafka with [rdkafka](https://docs.rs/rdkafka) (bundled librdkafka).
//!
//! ## Topics
//! - A topic is a Kafka topic of the same name. Kafka allows at most 249 characters of
//!   `[a-zA-Z0-9._-]`; any other name is an [`InvalidInput`](ErrorKind::InvalidInput) error before
//!   any I/O ([`admin::validate_kafka_topic`]): names are never rewritten.
//! - With `auto_create_topics=true` (default) a topic is created through the admin API the first
//!   time this broker publishes or subscribes to it (`partitions`, default 1; `replication_factor`,
//!   default 1), and so is `<topic>.dlq` before the first dead letter. An existing topic is used
//!   as it is.
//!
//! ## Publishing
//! - An idempotent producer (`enable.idempotence=true`, `acks=all`): `publish` returns after the
//!   delivery report, or fails with `Timeout` after `publish_timeout` (librdkafka's
//!   `message.timeout.ms`). A full local queue (`QueueFull`) is waited out within the same bound,
//!   never dropped. `linger_ms` (default 0) trades latency for batching; concurrent publishers are
//!   batched anyway while requests are in flight.
//! - Record value = the raw body, record headers = the headers (UTF-8), record key = the
//!   publish option `ordering_key`. Partitioning is librdkafka's `murmur2` (the Java client's
//!   hashing): messages with one key go to one partition, in publish order; messages **without a
//!   key all go to one partition** too (not spread at random), so what a publisher sends without
//!   a key is read in publish order whatever the partition count (`ordering: true`). To spread
//!   work over the members of a queue group, give messages keys (and the topic several
//!   partitions); `rdkafka.partitioner=murmur2_random` spreads keyless messages instead, and then
//!   only keyed messages keep their order.
//!
//! - An idempotent producer that is wedged (librdkafka reports a fatal error, the server answers
//!   with producer-state errors, or a server is up but the producer has had no producer id for
//!   longer than `publish_timeout`) is replaced by a fresh producer (a new producer id), at most
//!   twice a second; publishes still queued in the old one fail and may be published again by the
//!   caller (a duplicate is possible: at least once). Counted in [`KafkaStats::producers_replaced`].
//!
//! ## Consuming
//! - **Queue group** = Kafka consumer group `<topic>:<group>` (`group_id=go-micro`: the group name
//!   alone, as Go Micro's plugin). A group with no committed offset starts at the **earliest**
//!   offset (`group_start=latest` to change that), so the first member of a new group also reads
//!   what was published before the group existed. Work is shared by partition: a topic with one
//!   partition is read by one member at a time, the others take over when it leaves (create
//!   topics with `partitions=N` to spread work over N members). `subscribe()` returns once the
//!   member has joined the group (its first assignment, possibly empty), bounded by `join_timeout_ms`.
//! - **Broadcast** = a consumer with a group id of its own (`micro-broker-broadcast-…`), assigned
//!   every partition of the topic at its current end (the high watermark, read when subscribing):
//!   a message published after `subscribe()` returns is delivered, nothing older is
//!   (`persistence: false`, `backlog: false`). Assigning at the high watermark rather than
//!   `auto.offset.reset=latest` after a group join closes the window in which a message published
//!   right after `subscribe()` would be skipped. Partitions added to the topic later are not read.
//! - Up to `concurrency` handlers run at once, also on one partition. Offsets are committed only
//!   for the contiguous prefix of **handled** messages of each partition
//!   (`enable.auto.commit=true` with `enable.auto.offset.store=false`: the backend stores the
//!   commit point after each handled message and librdkafka commits every `commit_interval_ms`,
//!   before a rebalance gives partitions away, and when the consumer closes; `unsubscribe()` and
//!   `disconnect()` also commit synchronously). A member that stops before handling a message
//!   leaves it uncommitted: the group's next owner of the partition reads it again (at least once).
//! - A nack (a failed or panicking handler, or `Event::nack`) is **redelivered in process** to the
//!   same subscription after a pause (`redelivery_backoff_ms`, default 10 ms, doubling up to 1 s),
//!   with [`Event::attempt`](broker_core::Event::attempt) counting up and the previous failure as [`Event::error`](broker_core::Event::error); its offset
//!   stays uncommitted meanwhile (with concurrency 1 the partition waits: order is kept). After
//!   `max_redeliveries` redeliveries (none by default: no limit) the message is published to
//!   `<topic>.dlq` with its body and headers plus `x-dead-letter-reason`, `x-delivery-attempts` and
//!   `x-original-topic` ([`broker_core::headers`]), retried until Kafka acknowledges it, and only
//!   then committed. If the subscriber stops first, the message stays uncommitted (read again by
//!   the next owner, from attempt 1: the attempt count is not kept in Kafka).
//! - With auto-ack off, a delivery the handler leaves unsettled counts as handled when the handler
//!   returns `Ok`, and as nacked when it returns `Err`.
//! - A record that cannot be decoded (`envelope=go-micro` and a value that is not an envelope) is
//!   dead-lettered at once, as it came, with the decoding error as its reason.
//!
//! ## Go Micro interop (`envelope=go-micro`, or `MICRO_BROKER_ENVELOPE=go-micro`)
//! As Go Micro's Kafka plugin: the record value is the JSON envelope `{"Header":…,"Body":…}`
//! (with `Micro-Topic`, `Micro-Id` and `Content-Type` added as Go Micro's client does), no record
//! headers; on receipt the envelope is decoded and record headers are merged over its headers. Go
//! Micro's plugin names a queue group's Kafka group after the queue alone: use `group_id=go-micro`
//! to share a group with Go Micro services (its broadcast subscribers start at the newest offset,
//! as ours do).
//!
//! ## Connecting
//! - `connect()` creates the producer and the admin client and reads the cluster metadata, bounded
//!   by `connect_timeout`: an unreachable server (librdkafka would retry forever) or refused
//!   credentials is a [`Connection`](ErrorKind::Connection) error naming the servers (credentials
//!   hidden) and librdkafka's last error. Afterwards librdkafka reconnects by itself (50 ms
//!   doubling to 1 s between attempts); publishes wait for it within `publish_timeout`.
//! - Credentials: `kafka://user:password@host:port` sets SASL/PLAIN; anything else through
//!   `rdkafka.` parameters (`rdkafka.sasl.mechanism`, `rdkafka.sasl.username`,
//!   `rdkafka.sasl.password`, …). Secret values are hidden in `Debug`.
//! - TLS: [`BrokerOptions::tls`] sets `security.protocol=ssl` (`sasl_ssl` with credentials),
//!   `ssl.ca.location`, `ssl.certificate.location`, `ssl.key.location` and, with
//!   `insecure_skip_verify`, turns verification off. That needs this crate's cargo feature `ssl`
//!   (OpenSSL); without it `connect()` fails at once with `Unsupported`, naming the feature
//!   (`tls` in the capabilities says which build this is).
//!
//! ## Seen with tansu 0.6
//! Everything above works against tansu 0.6 (memory and sqlite storage), with these server
//! limitations: a waiting fetch is answered only when `fetch.wait.max.ms` expires (hence
//! `fetch_wait_ms`, default 10); tansu cannot bump an idempotent producer's epoch (KIP-360), and
//! with sqlite storage a produce retried after messages timed out during an outage can make its
//! storage engine panic and stop serving (keep `publish_timeout` longer than the outages you
//! expect); SASL needs its `--authentication` mode.
//!
//! ## Disconnect
//! `disconnect()` stops every consumer, waits for running handlers (bounded by `drain_timeout`),
//! commits what was handled, closes the consumers (leaving their groups), then flushes the
//! producer (bounded by `publish_timeout`). Each step is bounded, so it returns in bounded time.
//!
//! ```no_run
//! # async fn demo() -> broker_core::Result<()> {
//! use broker_core::{BrokerOptions, Message, PublishOptions};
//! use broker_kafka as _;
//! let options = BrokerOptions::new().with_addresses(["127.0.0.1:9092"]);
//! let broker = broker_core::from_name("kafka", options)?;
//! broker.connect().await?;
//! broker.publish("orders.created", Message::new("42"), PublishOptions::new().with_ordering_key("customer-7")).await?;
//! broker.disconnect().await
//! # }
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod admin;
pub mod config;
mod error;
mod publish;
mod subscribe;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use async_trait::async_trait;
use broker_core::{
    Broker, BrokerOptions, Capabilities, Error, ErrorKind, Handler, Message, PublishOptions, Result, RunningState,
    SubscribeOptions, Subscriber,
};

pub use config::KafkaConfig;

use crate::admin::{Admin, DLQ_SUFFIX, MAX_TOPIC_LEN, validate_kafka_topic};
use crate::publish::Publisher;
use crate::subscribe::{KafkaSubscriber, Plan, SubState};

/// The plugin name.
pub const NAME: &str = "kafka";

/// What this backend does. See the [crate docs](crate). `tls` is on only when built with the
/// cargo feature `ssl`.
pub const CAPABILITIES: Capabilities = Capabilities {
    queue_groups: true,
    persistence: false,
    backlog: false,
    ordering: true,
    redelivery: true,
    delayed_delivery: false,
    native_headers: true,
    tls: cfg!(feature = "ssl"),
};

broker_core::register_plugin! {
    name: NAME,
    description: "Kafka (rdkafka): idempotent producer with awaited acks, consumer groups as queue groups, commit after the handler, redelivery, dead letters to <topic>.dlq",
    capabilities: CAPABILITIES,
    factory: build,
}

fn build(options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(KafkaBroker::with_options(options)?))
}

/// Counters of what the broker did beyond plain delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KafkaStats {
    /// Nacked messages delivered again.
    pub redeliveries: u64,
    /// Messages dead-lettered to `<topic>.dlq`.
    pub dead_lettered: u64,
    /// Wedged idempotent producers replaced by a fresh one (see the crate docs).
    pub producers_replaced: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) redeliveries: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) producers_replaced: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The Kafka broker. See the [crate docs](crate).
pub struct KafkaBroker {
    inner: Arc<Inner>,
}

struct Inner {
    options: RwLock<BrokerOptions>,
    config: RwLock<KafkaConfig>,
    slot: tokio::sync::Mutex<Option<Arc<Running>>>,
    current: RunningState<Running>,
    counters: Arc<Counters>,
}

/// Everything that exists while connected.
pub(crate) struct Running {
    pub(crate) config: KafkaConfig,
    pub(crate) options: BrokerOptions,
    pub(crate) publisher: Publisher,
    pub(crate) admin: Admin,
    pub(crate) subs: Mutex<HashMap<u64, Arc<SubState>>>,
    next_sub: AtomicU64,
    pub(crate) counters: Arc<Counters>,
}

impl KafkaBroker {
    /// A Kafka broker with default options ([`config::DEFAULT_ADDRESS`]).
    pub fn new() -> Self {
        KafkaBroker::build(BrokerOptions::default(), KafkaConfig::default())
    }

    /// A Kafka broker with `options`; see [`config::PARAMS`] for its parameters. Does no I/O.
    pub fn with_options(options: BrokerOptions) -> Result<Self> {
        let config = KafkaConfig::from_options(&options)?;
        Ok(KafkaBroker::build(options, config))
    }

    fn build(options: BrokerOptions, config: KafkaConfig) -> Self {
        KafkaBroker {
            inner: Arc::new(Inner {
                options: RwLock::new(options),
                config: RwLock::new(config),
                slot: tokio::sync::Mutex::new(None),
                current: RunningState::new(),
                counters: Arc::new(Counters::default()),
            }),
        }
    }

    /// What the broker did so far.
    pub fn stats(&self) -> KafkaStats {
        let c = &self.inner.counters;
        KafkaStats {
            redeliveries: c.redeliveries.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            producers_replaced: c.producers_replaced.load(Ordering::Relaxed)
                + self.current().map_or(0, |r| r.publisher.replaced()),
        }
    }

    /// Messages the producer holds that Kafka has not acknowledged yet (0 when disconnected).
    pub fn publishes_in_flight(&self) -> i32 {
        self.current().map_or(0, |r| r.publisher.in_flight())
    }

    fn current(&self) -> Option<Arc<Running>> {
        self.inner.current.get()
    }

    fn connected(&self) -> Result<Arc<Running>> {
        self.inner.current.connected(NAME)
    }

    fn config(&self) -> KafkaConfig {
        self.inner.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Default for KafkaBroker {
    fn default() -> Self {
        KafkaBroker::new()
    }
}

impl fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBroker")
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
                sub.stop_now();
            }
        }
    }
}

/// The servers of `config`, for messages (user info never included).
fn servers(config: &KafkaConfig) -> String {
    config.bootstrap.join(",")
}

#[async_trait]
impl Broker for KafkaBroker {
    fn init(&self, options: BrokerOptions) -> Result<()> {
        if self.current().is_some() {
            return Err(Error::invalid_input("init() on a connected kafka broker: call disconnect() first"));
        }
        let config = KafkaConfig::from_options(&options)?;
        *self.inner.options.write().unwrap_or_else(|p| p.into_inner()) = options;
        *self.inner.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    fn options(&self) -> BrokerOptions {
        self.inner.options()
    }

    fn address(&self) -> String {
        servers(&self.config())
    }

    async fn connect(&self) -> Result<()> {
        let mut slot = self.inner.slot.lock().await;
        if slot.is_some() {
            return Ok(());
        }
        let options = self.inner.options();
        let config = KafkaConfig::from_options(&options)?;
        if config.needs_tls() && !cfg!(feature = "ssl") {
            return Err(Error::unsupported(
                NAME,
                "tls",
                &format!(
                    "security.protocol={} needs TLS, and this build of broker-kafka has no TLS: enable its cargo \
                     feature `ssl` (OpenSSL), or use a plaintext listener",
                    config.security_protocol()
                ),
            ));
        }
        let publisher = Publisher::new(&config, options.publish_timeout)?;
        let sasl = config.security_protocol().starts_with("sasl");
        publisher.probe(&servers(&config), sasl, options.connect_timeout).await?;
        let admin = Admin::new(&config, options.connect_timeout)?;
        let running = Arc::new(Running {
            config,
            options,
            publisher,
            admin,
            subs: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(1),
            counters: Arc::clone(&self.inner.counters),
        });
        self.inner.current.set(Arc::clone(&running));
        *slot = Some(running);
        Ok(())
    }

    async fn disconnect(&self) -> Result<()> {
        let mut slot = self.inner.slot.lock().await;
        let Some(running) = slot.take() else { return Ok(()) };
        self.inner.current.clear();
        let timeout = running.options.drain_timeout;
        let subs: Vec<Arc<SubState>> = lock(&running.subs).drain().map(|(_, s)| s).collect();
        // All subscriptions drain at once, each bounded by the drain timeout.
        let closed = futures::future::join_all(subs.iter().map(|s| s.close(true))).await;
        let drained = closed.iter().all(Result::is_ok);
        let flushed = running.publisher.flush(running.options.publish_timeout).await;
        running.counters.producers_replaced.fetch_add(running.publisher.replaced(), Ordering::Relaxed);
        // Destroying librdkafka clients joins their threads: off the async threads, bounded.
        let destroy = tokio::task::spawn_blocking(move || drop(running));
        if tokio::time::timeout(std::time::Duration::from_secs(5), destroy).await.is_err() {
            tracing::warn!("kafka broker: destroying the clients took longer than 5 s");
        }
        if let Err(error) = flushed {
            tracing::warn!(%error, "kafka broker: disconnect could not flush the producer");
        }
        if drained {
            return Ok(());
        }
        let problem = format!("handlers were still running after the drain timeout of {timeout:?}");
        tracing::warn!(%problem, "kafka broker: disconnect did not drain cleanly");
        Err(Error::new(ErrorKind::Timeout, format!("kafka broker disconnect: {problem}")))
    }

    async fn publish(&self, topic: &str, mut message: Message, options: PublishOptions) -> Result<()> {
        let running = self.connected();
        // A topic published to before was validated then (and created): usually it was.
        let known = running.as_ref().is_ok_and(|running| running.admin.is_known(topic));
        if !known {
            validate_kafka_topic(topic)?;
        }
        CAPABILITIES.check_publish(NAME, &options)?;
        let running = running?;
        if !options.headers.is_empty() {
            message.headers.extend(options.headers);
        }
        if !known {
            running.admin.ensure(topic).await?;
        }
        running.publisher.send(topic, message, options.ordering_key.as_deref()).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        validate_kafka_topic(topic)?;
        CAPABILITIES.check_subscribe(NAME, &options)?;
        if options.max_redeliveries.is_some() && topic.len() + DLQ_SUFFIX.len() > MAX_TOPIC_LEN {
            return Err(Error::invalid_input(format!(
                "topic {topic:?} is too long for its dead-letter topic `<topic>{DLQ_SUFFIX}` (Kafka allows at most \
                 {MAX_TOPIC_LEN} characters)"
            )));
        }
        let running = self.connected()?;
        running.admin.ensure(topic).await?;
        let group_id = options.queue.as_deref().map(|group| running.config.group_id(topic, group));
        let id = running.next_sub.fetch_add(1, Ordering::Relaxed);
        let plan = Arc::new(Plan { topic: topic.into(), group_id: group_id.clone(), options: options.clone() });
        let state = subscribe::start(&running, plan, handler, id).await?;
        lock(&running.subs).insert(id, Arc::clone(&state));
        Ok(Box::new(KafkaSubscriber {
            topic: topic.to_string(),
            options,
            group_id,
            state,
            running: Arc::downgrade(&running),
        }))
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let config = self.config();
        Capabilities { native_headers: config.envelope == broker_core::codec::Envelope::Native, ..CAPABILITIES }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_with_its_capabilities() {
        let plugin = broker_core::plugin(NAME).unwrap();
        assert_eq!(plugin.capabilities, CAPABILITIES);
        let broker = broker_core::from_name(NAME, BrokerOptions::new()).unwrap();
        assert_eq!(broker.name(), NAME);
        assert_eq!(broker.address(), "127.0.0.1:9092");
        assert_eq!(broker.capabilities(), CAPABILITIES);
        let go = KafkaBroker::with_options(BrokerOptions::new().with_param("envelope", "go-micro")).unwrap();
        assert!(!go.capabilities().native_headers);
    }

    #[tokio::test]
    async fn not_connected_and_invalid_topics() {
        let broker = KafkaBroker::new();
        let err = broker.publish("t", Message::new("x"), PublishOptions::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotConnected);
        let err = broker
            .subscribe("t", broker_core::handler_fn(|_e| async { Ok(()) }), SubscribeOptions::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotConnected);
    }

    #[cfg(not(feature = "ssl"))]
    #[tokio::test]
    async fn tls_without_the_ssl_feature_is_refused_at_connect() {
        let started = std::time::Instant::now();
        let broker = KafkaBroker::with_options(BrokerOptions::new().with_tls(broker_core::TlsOptions::new())).unwrap();
        let err = broker.connect().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("`ssl`"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let broker =
            KafkaBroker::with_options(BrokerOptions::new().with_param("rdkafka.security.protocol", "SSL")).unwrap();
        assert_eq!(broker.connect().await.unwrap_err().kind(), ErrorKind::Unsupported);
    }
}
