//! # broker-rabbitmq: the RabbitMQ backend (plugin `rabbitmq`)
//!
//! Link it with `use broker_rabbitmq as _;` (or the facade's `rabbitmq` feature), then pick it with
//! `MICRO_BROKER=rabbitmq`; `MICRO_BROKER_ADDRESS` gives the servers (comma-separated, tried in
//! order, default [`config::DEFAULT_ADDRESS`]). Parameters are listed in [`config::PARAMS`].
//! At-least-once over AMQP 0.9.1 with [lapin](https://docs.rs/lapin).
//!
//! ## Topology: Go Micro's RabbitMQ plugin
//! - One **topic exchange**, `micro` by default (`exchange=`), declared at connect and after every
//!   reconnect, non-durable by default as Go Micro's (`exchange_durable=true` to make it durable).
//!   RabbitMQ refuses to re-declare an exchange with another durability: services sharing one
//!   exchange (with Go Micro too) must agree; Go Micro's `DurableExchange()` matches
//!   `exchange_durable=true`, its default matches ours.
//! - **Routing key = topic.** Body = the raw message body; headers = strings in the AMQP header
//!   table; `Content-Type` also goes to the `content_type` property ([`wire`]). This is what Go
//!   Micro's plugin writes and reads, so no envelope is needed (`envelope=go-micro` is accepted and
//!   changes nothing).
//! - A **queue group** is a durable, non-auto-delete queue bound to the topic and shared by its
//!   members: `<topic>:<group>` by default, or `<group>` alone with `group_queue_name=go-micro`
//!   (Go Micro's naming, where `Queue` is the queue name). It keeps messages while all members are
//!   away. `queue_expires_ms` adds `x-expires` so that the server deletes a group queue (and a
//!   dead-letter queue) unused for that long: tests use it so that leftovers vanish.
//! - **Broadcast** is a server-named, exclusive, auto-delete queue per subscriber: it exists while
//!   the subscriber does, so a new broadcast subscriber does not read older messages
//!   (`persistence: false`), and a message published while a topic has no queue is dropped by the
//!   server (`backlog: false`).
//!
//! ## Publishing
//! Publisher confirms are on: `publish` returns after the server confirmed the message (or fails
//! with `Backend` on a nack, `Timeout` after `publish_timeout`). Messages are persistent
//! (delivery mode 2). Publishes of one caller go out in order on one channel (`ordering: true`;
//! an `ordering_key` is accepted: one topic's queue keeps the publish order). If the connection
//! drops during a publish, the publish waits for the reconnection and is sent again within
//! `publish_timeout` (the first copy may have arrived: a duplicate is possible).
//!
//! ## Consuming
//! - Prefetch (basic.qos) = the subscription's `concurrency`; at most that many handlers run.
//! - With auto-ack a message is acked **after** its handler succeeds.
//! - A nack (a failed handler, or `Event::nack`) is redelivered by **republishing** a copy to the
//!   subscription's own queue (through the default exchange, so other subscribers do not get it
//!   again) with the internal header [`wire::ATTEMPT_HEADER`] set to the next attempt number, then
//!   acking the original. That is how [`Event::attempt`] grows (AMQP's own requeue keeps no count
//!   on classic queues); the handler's error travels in another internal header and is offered as
//!   [`Event::error`] on the redelivery. The copy goes to the back of the queue, after a short pause (10 ms,
//!   doubling, at most 1 s). If the copy cannot be published the original is nacked with requeue
//!   (the server redelivers it; the `redelivered` flag then adds one to the attempt).
//! - After `max_redeliveries` redeliveries (none by default: no limit) the message is
//!   **dead-lettered**: published to the exchange with routing key `<topic>.dlq`, with its body
//!   and headers plus `x-dead-letter-reason` (the handler's error), `x-delivery-attempts` and
//!   `x-original-topic` ([`broker_core::headers`]); with `dead_letter_queue=true` (default) a
//!   durable queue `<topic>.dlq` bound to that key keeps dead letters even when nobody subscribes
//!   to `<topic>.dlq`.
//! - A message whose handler runs while the connection drops is not acked: the server requeues it
//!   (group queues) and it is delivered again after the reconnection. A broadcast queue dies with
//!   its connection: what it held is lost, and messages published during the reconnection do not
//!   reach it.
//!
//! ## Connecting, reconnecting
//! - `connect()` is bounded by `connect_timeout`; an unreachable server or refused credentials
//!   is a [`Connection`](ErrorKind::Connection) error naming the address (password hidden).
//! - TLS is not built in (lapin without TLS features): [`BrokerOptions::tls`] or an `amqps://`
//!   address makes `connect()` fail with `Unsupported` (`tls: false`).
//! - When the connection drops, a supervisor reconnects (100 ms doubling to 2 s between attempts),
//!   re-declares the exchange, and every subscription re-declares its queue, binding and consumer.
//! - The connection carries the client property `connection_name` (`connection_name=`), which
//!   `rabbitmqctl list_connections name client_properties` shows.
//!
//! ## Disconnect
//! `disconnect()` cancels every consumer, lets the running handlers finish and their acks go out
//! (bounded by `drain_timeout`), then closes the channels and the connection. Unacked prefetched
//! messages go back to their queue.
//!
//! ```no_run
//! # async fn demo() -> broker_core::Result<()> {
//! use broker_core::{BrokerOptions, Message, PublishOptions};
//! use broker_rabbitmq as _;
//! let options = BrokerOptions::new().with_addresses(["amqp://guest:guest@127.0.0.1:5672/%2f"]);
//! let broker = broker_core::from_name("rabbitmq", options)?;
//! broker.connect().await?;
//! broker.publish("orders.created", Message::new("42"), PublishOptions::new()).await?;
//! broker.disconnect().await
//! # }
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
mod error;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::{
    Acknowledger, Broker, BrokerOptions, Capabilities, Error, ErrorKind, Event, Handler, Message, PublishOptions,
    Result, RunningState, SubscribeOptions, Subscriber, headers, run_handler, running_handler_of, scope_handler,
    validate_topic,
};
use futures::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::RabbitConfig;

/// The plugin name.
pub const NAME: &str = "rabbitmq";

/// What this backend does. See the [crate docs](crate).
pub const CAPABILITIES: Capabilities = Capabilities {
    queue_groups: true,
    persistence: false,
    backlog: false,
    ordering: true,
    redelivery: true,
    delayed_delivery: false,
    native_headers: true,
    tls: false,
};

broker_core::register_plugin! {
    name: NAME,
    description: "RabbitMQ (AMQP 0.9.1): topic exchange `micro` as Go Micro, publisher confirms, ack after the handler, redelivery, dead letters, reconnect",
    capabilities: CAPABILITIES,
    factory: build,
}

fn build(options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(RabbitBroker::with_options(options)?))
}

/// How long closing a channel or the connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Counters of what the broker did beyond plain delivery. See the [crate docs](crate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RabbitStats {
    /// Connections re-established after a loss.
    pub reconnects: u64,
    /// Nacked messages republished for another attempt.
    pub redeliveries: u64,
    /// Messages dead-lettered to `<topic>.dlq` after `max_redeliveries`.
    pub dead_lettered: u64,
}

#[derive(Debug, Default)]
struct Counters {
    reconnects: AtomicU64,
    redeliveries: AtomicU64,
    dead_lettered: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The RabbitMQ broker. See the [crate docs](crate).
pub struct RabbitBroker {
    inner: Arc<Inner>,
}

struct Inner {
    options: RwLock<BrokerOptions>,
    config: RwLock<RabbitConfig>,
    slot: tokio::sync::Mutex<Option<Arc<Running>>>,
    current: RunningState<Running>,
    counters: Arc<Counters>,
}

/// One live AMQP connection and its publishing channel.
struct Link {
    generation: u64,
    connection: Connection,
    /// The confirm-mode channel publishes go through; re-opened if the server closed it.
    publisher: tokio::sync::Mutex<Channel>,
    /// Dead-letter queues declared on this connection.
    dead_letter_queues: Mutex<HashSet<String>>,
    /// The address connected to, credentials hidden.
    address: String,
}

type Events = std::pin::Pin<Box<dyn Stream<Item = lapin::Event> + Send>>;

/// Everything that exists while connected.
struct Running {
    config: RabbitConfig,
    options: BrokerOptions,
    /// The current connection; `None` while reconnecting.
    link: watch::Sender<Option<Arc<Link>>>,
    /// Stops the supervisor (disconnect).
    stop: CancellationToken,
    supervisor: TaskTracker,
    subs: Mutex<HashMap<u64, Arc<SubState>>>,
    next_sub: AtomicU64,
    counters: Arc<Counters>,
}

impl RabbitBroker {
    /// A RabbitMQ broker with default options ([`config::DEFAULT_ADDRESS`], exchange `micro`).
    pub fn new() -> Self {
        RabbitBroker::build(BrokerOptions::default(), RabbitConfig::default())
    }

    /// A RabbitMQ broker with `options`; see [`config::PARAMS`] for its parameters. Does no I/O.
    pub fn with_options(options: BrokerOptions) -> Result<Self> {
        let config = RabbitConfig::from_options(&options)?;
        Ok(RabbitBroker::build(options, config))
    }

    fn build(options: BrokerOptions, config: RabbitConfig) -> Self {
        RabbitBroker {
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
    pub fn stats(&self) -> RabbitStats {
        let c = &self.inner.counters;
        RabbitStats {
            reconnects: c.reconnects.load(Ordering::Relaxed),
            redeliveries: c.redeliveries.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
        }
    }

    /// Whether a connection is up right now (false while reconnecting or disconnected).
    pub fn is_link_up(&self) -> bool {
        self.current().is_some_and(|r| r.link.borrow().as_ref().is_some_and(|l| l.connection.status().connected()))
    }

    fn current(&self) -> Option<Arc<Running>> {
        self.inner.current.get()
    }

    fn connected(&self) -> Result<Arc<Running>> {
        self.inner.current.connected(NAME)
    }

    fn config(&self) -> RabbitConfig {
        self.inner.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Default for RabbitBroker {
    fn default() -> Self {
        RabbitBroker::new()
    }
}

impl fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitBroker")
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
        // Dropped without disconnect(): stop the supervisor and the pumps rather than leak them.
        let current = self.current.take();
        if let Some(running) = current {
            running.stop.cancel();
            for sub in lock(&running.subs).values() {
                sub.stop.cancel();
            }
        }
    }
}

/// Opens a connection to the first address that answers, declares the exchange and opens the
/// confirm-mode publishing channel; all within the connect timeout.
async fn open_link(config: &RabbitConfig, options: &BrokerOptions, generation: u64) -> Result<(Link, Events)> {
    let limit = options.connect_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = None;
    for address in &config.addresses {
        let text = broker_core::redact_credentials(address);
        let uri = config::parse_uri(address)?;
        let properties = ConnectionProperties::default().with_connection_name(config.connection_name.clone().into());
        let connection = match tokio::time::timeout_at(deadline, Connection::connect_uri(uri, properties)).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => {
                last = Some(error::connect(e, &text));
                continue;
            }
            Err(_) => {
                last = Some(error::connect_timeout(&text, limit));
                break;
            }
        };
        let events: Events = Box::pin(connection.events_listener());
        let set_up = tokio::time::timeout_at(deadline, async {
            let channel = connection.create_channel().await.map_err(|e| error::amqp("open a channel", e))?;
            let declare =
                ExchangeDeclareOptions { durable: config.exchange_durable, ..ExchangeDeclareOptions::default() };
            channel
                .exchange_declare(config.exchange.as_str().into(), ExchangeKind::Topic, declare, FieldTable::default())
                .await
                .map_err(|e| exchange_error(config, e))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| error::amqp("turn publisher confirms on", e))?;
            Ok::<_, Error>(channel)
        })
        .await;
        let publisher = match set_up {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "setup failed".into())).await;
                return Err(Error::new(e.kind(), format!("RabbitMQ at {text}: {}", e.message())).with_source(e));
            }
            Err(_) => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "setup timed out".into())).await;
                last = Some(error::connect_timeout(&text, limit));
                break;
            }
        };
        let link = Link {
            generation,
            connection,
            publisher: tokio::sync::Mutex::new(publisher),
            dead_letter_queues: Mutex::new(HashSet::new()),
            address: text,
        };
        return Ok((link, events));
    }
    Err(last.unwrap_or_else(|| Error::invalid_input("no RabbitMQ address to connect to")))
}

fn exchange_error(config: &RabbitConfig, error: lapin::Error) -> Error {
    if error.to_string().contains("PRECONDITION_FAILED") {
        return Error::new(
            ErrorKind::InvalidInput,
            format!(
                "the exchange {:?} exists with other settings (declared with durable={}): set the parameter \
                 exchange_durable to what it was declared with (Go Micro's default exchange is non-durable) \
                 or use another exchange name: {error}",
                config.exchange, config.exchange_durable
            ),
        )
        .with_source(error);
    }
    error::amqp(&format!("declare the exchange {:?}", config.exchange), error)
}

impl Link {
    /// The publishing channel, re-opened (with confirms) if the server closed it; the exchange is
    /// declared again then (a publish to a deleted exchange is what closes the channel).
    async fn publisher(&self, config: &RabbitConfig, limit: Duration) -> Result<Channel> {
        let mut channel = self.publisher.lock().await;
        if !channel.status().connected() && self.connection.status().connected() {
            let fresh = error::bounded("open a publishing channel", limit, self.connection.create_channel()).await?;
            let declare =
                ExchangeDeclareOptions { durable: config.exchange_durable, ..ExchangeDeclareOptions::default() };
            tokio::time::timeout(
                limit,
                fresh.exchange_declare(
                    config.exchange.as_str().into(),
                    ExchangeKind::Topic,
                    declare,
                    FieldTable::default(),
                ),
            )
            .await
            .map_err(|_| error::timeout("declare the exchange", limit))?
            .map_err(|e| exchange_error(config, e))?;
            error::bounded("turn publisher confirms on", limit, fresh.confirm_select(ConfirmSelectOptions::default()))
                .await?;
            *channel = fresh;
        }
        Ok(channel.clone())
    }
}

impl Running {
    fn link(&self) -> Option<Arc<Link>> {
        self.link.borrow().clone()
    }

    /// Publishes `message` to `exchange` with `routing_key` and waits for the confirm, across a
    /// reconnection if one happens, all within the publish timeout. `what` says what the publish
    /// was for, in errors (made only then: formatted on every publish, it was ~1,400 instructions).
    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        what: &(dyn Fn() -> String + Sync),
    ) -> Result<()> {
        if routing_key.len() > 255 {
            return Err(Error::invalid_input(format!("{}: the routing key is longer than 255 bytes", what())));
        }
        let properties = wire::properties(message)?;
        let limit = self.options.publish_timeout;
        let mut links = self.link.subscribe();
        let attempt = async {
            loop {
                let link = match links.wait_for(Option::is_some).await {
                    Ok(link) => link.clone(),
                    Err(_) => {
                        return Err(Error::new(ErrorKind::Closed, format!("{}: the broker disconnected", what())));
                    }
                };
                let Some(link) = link else { continue };
                let channel = link.publisher(&self.config, limit).await?;
                let sent = async {
                    channel
                        .basic_publish(
                            exchange.into(),
                            routing_key.into(),
                            BasicPublishOptions::default(),
                            &message.body,
                            properties.clone(),
                        )
                        .await?
                        .await
                }
                .await;
                match sent {
                    Ok(confirmation) if confirmation.is_ack() => return Ok(()),
                    Ok(_) => {
                        return Err(Error::new(
                            ErrorKind::Backend,
                            format!("{}: the server refused the message (nack)", what()),
                        ));
                    }
                    Err(e) if link.connection.status().connected() => return Err(error::amqp(&what(), e)),
                    Err(e) => {
                        // The connection dropped: wait for the supervisor's next one and send again.
                        tracing::warn!(error = %e, "rabbitmq broker: {}: connection lost; publishing again after the reconnection", what());
                        let generation = link.generation;
                        let _ = links.wait_for(|l| l.as_ref().is_some_and(|l| l.generation != generation)).await;
                    }
                }
            }
        };
        tokio::time::timeout(limit, attempt).await.map_err(|_| error::timeout(&what(), limit))?
    }

    /// Publishes a dead letter of `message` (first published to `topic`) to `<topic>.dlq`.
    async fn dead_letter(&self, topic: &str, message: &Message, reason: &str, attempts: u32) -> Result<()> {
        let dlq = format!("{topic}.dlq");
        if self.config.dead_letter_queue
            && let Some(link) = self.link()
            && !lock(&link.dead_letter_queues).contains(&dlq)
        {
            match self.declare_dead_letter_queue(&link, &dlq).await {
                Ok(()) => {
                    lock(&link.dead_letter_queues).insert(dlq.clone());
                }
                Err(error) => {
                    tracing::warn!(%error, queue = %dlq, "rabbitmq broker: cannot declare the dead-letter queue")
                }
            }
        }
        let letter = message
            .clone()
            .with_header(headers::DEAD_LETTER_REASON, reason)
            .with_header(headers::DELIVERY_ATTEMPTS, attempts.to_string())
            .with_header(headers::ORIGINAL_TOPIC, topic);
        self.send(&self.config.exchange, &dlq, &letter, &|| format!("dead-letter to {dlq:?}")).await?;
        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%topic, %dlq, reason, attempts, "rabbitmq broker: dead-lettered");
        Ok(())
    }

    async fn declare_dead_letter_queue(&self, link: &Link, queue: &str) -> Result<()> {
        let limit = self.options.publish_timeout;
        let channel = error::bounded("open a channel", limit, link.connection.create_channel()).await?;
        let result = async {
            error::bounded(
                &format!("declare the dead-letter queue {queue:?}"),
                limit,
                channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), self.queue_arguments()),
            )
            .await?;
            error::bounded(
                &format!("bind the dead-letter queue {queue:?}"),
                limit,
                channel.queue_bind(
                    queue.into(),
                    self.config.exchange.as_str().into(),
                    queue.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await
        }
        .await;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "done".into())).await;
        result
    }

    /// Arguments of the durable queues this broker declares (`x-expires`).
    fn queue_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if let Some(expires) = self.config.queue_expires {
            let ms = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX);
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
        }
        arguments
    }
}

/// Watches the connection; when it drops, reconnects (with backoff) until stopped, and publishes
/// each new connection for the publishers and the subscriptions' pumps.
async fn supervise(running: Weak<Running>, stop: CancellationToken, mut link: Arc<Link>, mut events: Events) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                event = events.next() => match event {
                    Some(lapin::Event::Error(error)) => {
                        tracing::warn!(%error, address = %link.address, "rabbitmq broker: connection error");
                        if !link.connection.status().connected() {
                            break;
                        }
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = tick.tick() => if !link.connection.status().connected() {
                    break;
                },
            }
        }
        let Some(current) = running.upgrade() else { return };
        current.link.send_replace(None);
        tracing::warn!(address = %link.address, "rabbitmq broker: connection lost; reconnecting");
        let (config, options) = (current.config.clone(), current.options.clone());
        drop(current);
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            match open_link(&config, &options, link.generation + 1).await {
                Ok((fresh, fresh_events)) => {
                    let Some(current) = running.upgrade() else { return };
                    if stop.is_cancelled() {
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, fresh.connection.close(200, "bye".into())).await;
                        return;
                    }
                    link = Arc::new(fresh);
                    events = fresh_events;
                    current.link.send_replace(Some(Arc::clone(&link)));
                    current.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(address = %link.address, "rabbitmq broker: reconnected");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "rabbitmq broker: reconnect failed; trying again");
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// What a subscription consumes, for (re-)declaring it.
struct Plan {
    topic: Arc<str>,
    /// The durable queue of the group; `None` for broadcast.
    group_queue: Option<String>,
    options: SubscribeOptions,
}

/// The channel and consumer a subscription currently uses.
struct Active {
    channel: Channel,
    tag: ShortString,
}

/// One subscription's control state.
struct SubState {
    id: u64,
    stop: CancellationToken,
    pump: TaskTracker,
    handlers: TaskTracker,
    drain_timeout: Duration,
    active: Mutex<Option<Active>>,
}

impl SubState {
    fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    /// Waits for the running handlers, except the one calling (an unsubscribe or disconnect from
    /// inside this subscription's own handler).
    async fn wait_for_others(self: &Arc<Self>) {
        broker_core::wait_for_other_handlers(&self.handlers, self.key()).await;
    }

    fn dispatch(
        self: &Arc<Self>,
        handler: &Arc<dyn Handler>,
        event: Event,
        auto_ack: bool,
        permit: OwnedSemaphorePermit,
    ) {
        let handler = Arc::clone(handler);
        self.handlers.spawn(scope_handler(self.key(), async move {
            if let Err(error) = run_handler(handler.as_ref(), event, auto_ack).await {
                tracing::debug!(%error, "rabbitmq broker: delivery failed");
            }
            drop(permit);
        }));
    }

    /// Closes the subscription's channel (what it had prefetched goes back to the queue).
    async fn close_channel(&self) {
        let active = lock(&self.active).take();
        if let Some(active) = active {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, active.channel.close(200, "unsubscribed".into())).await;
        }
    }
}

/// Declares the subscription's queue and binding on `link` and starts consuming.
async fn set_up(running: &Running, link: &Link, plan: &Plan, state: &SubState) -> Result<(lapin::Consumer, Arc<str>)> {
    let limit = running.options.publish_timeout;
    let topic = &plan.topic;
    let channel = error::bounded("open a channel", limit, link.connection.create_channel()).await?;
    let result = async {
        let prefetch = u16::try_from(plan.options.concurrency).unwrap_or(u16::MAX);
        error::bounded("set the prefetch (basic.qos)", limit, channel.basic_qos(prefetch, BasicQosOptions::default()))
            .await?;
        let queue: Arc<str> = match &plan.group_queue {
            Some(name) => {
                error::bounded(
                    &format!("declare the queue {name:?} of subscription to {topic:?}"),
                    limit,
                    channel.queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions::durable(),
                        running.queue_arguments(),
                    ),
                )
                .await?;
                name.as_str().into()
            }
            None => {
                let declared = error::bounded(
                    &format!("declare the broadcast queue of a subscription to {topic:?}"),
                    limit,
                    channel.queue_declare(
                        "".into(),
                        QueueDeclareOptions::exclusive().auto_delete(),
                        FieldTable::default(),
                    ),
                )
                .await?;
                declared.name().as_str().into()
            }
        };
        error::bounded(
            &format!("bind the queue {queue:?} to {topic:?}"),
            limit,
            channel.queue_bind(
                (*queue).into(),
                running.config.exchange.as_str().into(),
                (**topic).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let consumer = error::bounded(
            &format!("consume from the queue {queue:?}"),
            limit,
            channel.basic_consume((*queue).into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
        )
        .await?;
        Ok::<_, Error>((consumer, queue))
    }
    .await;
    match result {
        Ok((consumer, queue)) => {
            *lock(&state.active) = Some(Active { channel, tag: consumer.tag() });
            Ok((consumer, queue))
        }
        Err(error) => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "setup failed".into())).await;
            Err(error)
        }
    }
}

/// How a delivery is settled: ack; nack = republish with the next attempt (or dead-letter), then ack.
struct Settle {
    acker: lapin::Acker,
    running: Weak<Running>,
    queue: Arc<str>,
    topic: Arc<str>,
    message: Message,
    attempt: u32,
    max_redeliveries: Option<u32>,
    limit: Duration,
}

impl Settle {
    async fn requeue(&self) -> Result<()> {
        let options = BasicNackOptions { requeue: true, ..BasicNackOptions::default() };
        error::bounded("nack (requeue)", self.limit, self.acker.nack(options)).await.map(|_| ())
    }
}

#[async_trait]
impl Acknowledger for Settle {
    async fn ack(&self) -> Result<()> {
        error::bounded("ack", self.limit, self.acker.ack(BasicAckOptions::default())).await.map(|_| ())
    }

    async fn nack(&self, reason: &str) -> Result<()> {
        let Some(running) = self.running.upgrade() else { return self.requeue().await };
        let redeliveries_so_far = self.attempt.saturating_sub(1);
        let outcome = if self.max_redeliveries.is_some_and(|max| redeliveries_so_far >= max) {
            running.dead_letter(&self.topic, &self.message, reason, self.attempt).await
        } else {
            let pause = Duration::from_millis(10u64 << redeliveries_so_far.min(7)).min(Duration::from_secs(1));
            tokio::time::sleep(pause).await;
            let copy = self
                .message
                .clone()
                .with_header(wire::ATTEMPT_HEADER, (self.attempt + 1).to_string())
                .with_header(wire::REASON_HEADER, reason);
            let sent =
                running.send("", &self.queue, &copy, &|| format!("redeliver to the queue {:?}", self.queue)).await;
            if sent.is_ok() {
                running.counters.redeliveries.fetch_add(1, Ordering::Relaxed);
            }
            sent
        };
        match outcome {
            Ok(()) => self.ack().await,
            Err(error) => {
                tracing::warn!(%error, "rabbitmq broker: cannot republish a nacked message; requeueing it on the server");
                self.requeue().await
            }
        }
    }
}

/// One subscription's loop: a concurrency permit, then a delivery, then its handler in a task;
/// when the consumer ends (connection lost) it sets the subscription up again on the next connection.
async fn pump(
    running: Weak<Running>,
    state: Arc<SubState>,
    handler: Arc<dyn Handler>,
    plan: Arc<Plan>,
    mut consumer: lapin::Consumer,
    mut queue: Arc<str>,
) {
    let limit = Arc::new(Semaphore::new(plan.options.concurrency));
    let settle_timeout = running.upgrade().map_or(Duration::from_secs(10), |r| r.options.publish_timeout);
    'outer: loop {
        loop {
            let permit = tokio::select! {
                biased;
                _ = state.stop.cancelled() => break 'outer,
                permit = Arc::clone(&limit).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break 'outer,
                },
            };
            let next = tokio::select! {
                biased;
                _ = state.stop.cancelled() => break 'outer,
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    tracing::warn!(%error, topic = %plan.topic, "rabbitmq broker: consumer failed");
                    break;
                }
                None => break,
            };
            let decoded = wire::decode(delivery.data, &delivery.properties);
            let message = decoded.message;
            let attempt = decoded.attempt.saturating_add(u32::from(delivery.redelivered));
            let settle = Settle {
                acker: delivery.acker,
                running: running.clone(),
                queue: Arc::clone(&queue),
                topic: Arc::clone(&plan.topic),
                message: message.clone(),
                attempt,
                max_redeliveries: plan.options.max_redeliveries,
                limit: settle_timeout,
            };
            let mut event = Event::builder(Arc::clone(&plan.topic), message).attempt(attempt).acknowledger(settle);
            if let Some(reason) = decoded.previous_failure {
                event = event.error(Error::new(ErrorKind::Handler, format!("the previous attempt failed: {reason}")));
            }
            let event = event.build();
            state.dispatch(&handler, event, plan.options.auto_ack, permit);
        }
        // The consumer ended: the connection (or channel) is gone. Set up again when a connection is there.
        state.close_channel().await;
        tracing::warn!(topic = %plan.topic, "rabbitmq broker: subscription lost its consumer; resubscribing");
        let mut backoff = Duration::from_millis(50);
        loop {
            tokio::select! {
                biased;
                _ = state.stop.cancelled() => break 'outer,
                _ = tokio::time::sleep(backoff) => {}
            }
            let Some(current) = running.upgrade() else { break 'outer };
            let Some(link) = current.link() else { continue };
            match set_up(&current, &link, &plan, &state).await {
                Ok((fresh, fresh_queue)) => {
                    consumer = fresh;
                    queue = fresh_queue;
                    tracing::info!(topic = %plan.topic, queue = %queue, "rabbitmq broker: resubscribed");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, topic = %plan.topic, "rabbitmq broker: resubscribe failed; trying again");
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
    // Stopped: the server sends no more; what runs finishes, then the channel is closed by the caller.
    let active = lock(&state.active).as_ref().map(|a| (a.channel.clone(), a.tag.clone()));
    if let Some((channel, tag)) = active {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.basic_cancel(tag, BasicCancelOptions::default())).await;
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    fn init(&self, options: BrokerOptions) -> Result<()> {
        if self.current().is_some() {
            return Err(Error::invalid_input("init() on a connected rabbitmq broker: call disconnect() first"));
        }
        let config = RabbitConfig::from_options(&options)?;
        *self.inner.options.write().unwrap_or_else(|p| p.into_inner()) = options;
        *self.inner.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    fn options(&self) -> BrokerOptions {
        self.inner.options()
    }

    fn address(&self) -> String {
        match self.current().and_then(|r| r.link()) {
            Some(link) => link.address.clone(),
            None => self
                .config()
                .addresses
                .iter()
                .map(|a| broker_core::redact_credentials(a))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    async fn connect(&self) -> Result<()> {
        let mut slot = self.inner.slot.lock().await;
        if slot.is_some() {
            return Ok(());
        }
        let options = self.inner.options();
        let config = RabbitConfig::from_options(&options)?;
        if config.tls_requested {
            return Err(Error::unsupported(
                NAME,
                "tls",
                "this build of the RabbitMQ backend speaks plain AMQP only (lapin without TLS features); \
                 use an amqp:// address, or terminate TLS in front of RabbitMQ",
            ));
        }
        let (link, events) = open_link(&config, &options, 1).await?;
        let link = Arc::new(link);
        let (sender, _) = watch::channel(Some(Arc::clone(&link)));
        let running = Arc::new(Running {
            config,
            options,
            link: sender,
            stop: CancellationToken::new(),
            supervisor: TaskTracker::new(),
            subs: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(1),
            counters: Arc::clone(&self.inner.counters),
        });
        running.supervisor.spawn(supervise(Arc::downgrade(&running), running.stop.clone(), link, events));
        running.supervisor.close();
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
            sub.stop.cancel();
            sub.pump.close();
            sub.handlers.close();
        }
        let drained = tokio::time::timeout_at(deadline, async {
            for sub in &subs {
                sub.pump.wait().await;
                sub.wait_for_others().await;
            }
        })
        .await
        .is_ok();
        for sub in &subs {
            sub.close_channel().await;
        }
        running.stop.cancel();
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, running.supervisor.wait()).await;
        if let Some(link) = running.link.send_replace(None) {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.connection.close(200, "disconnect".into())).await;
        }
        if drained {
            return Ok(());
        }
        let problem = format!("handlers were still running after the drain timeout of {timeout:?}");
        tracing::warn!(%problem, "rabbitmq broker: disconnect did not drain cleanly");
        Err(Error::new(ErrorKind::Timeout, format!("rabbitmq broker disconnect: {problem}")))
    }

    async fn publish(&self, topic: &str, mut message: Message, options: PublishOptions) -> Result<()> {
        let running = self.connected()?;
        validate_topic(topic)?;
        CAPABILITIES.check_publish(NAME, &options)?;
        message.headers.extend(options.headers);
        running.send(&running.config.exchange, topic, &message, &|| format!("publish to {topic:?}")).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let running = self.connected()?;
        validate_topic(topic)?;
        CAPABILITIES.check_subscribe(NAME, &options)?;
        let group_queue = options.queue.as_deref().map(|group| running.config.group_queue(topic, group));
        if let Some(name) = &group_queue
            && name.len() > 255
        {
            return Err(Error::invalid_input(format!(
                "the queue name {name:?} (topic and group) is longer than 255 bytes: use a shorter group name"
            )));
        }
        let id = running.next_sub.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(SubState {
            id,
            stop: CancellationToken::new(),
            pump: TaskTracker::new(),
            handlers: TaskTracker::new(),
            drain_timeout: running.options.drain_timeout,
            active: Mutex::new(None),
        });
        let plan = Arc::new(Plan { topic: topic.into(), group_queue, options: options.clone() });
        // While the connection is being re-established, wait for it (bounded by the publish timeout).
        let limit = running.options.publish_timeout;
        let link = match tokio::time::timeout(limit, running.link.subscribe().wait_for(Option::is_some)).await {
            Ok(Ok(link)) => link.clone(),
            _ => None,
        }
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Connection,
                format!("subscribe to {topic:?}: the RabbitMQ connection is down (reconnecting) after {limit:?}"),
            )
        })?;
        let (consumer, queue) = set_up(&running, &link, &plan, &state).await?;
        state.pump.spawn(pump(Arc::downgrade(&running), Arc::clone(&state), handler, plan, consumer, queue));
        lock(&running.subs).insert(id, Arc::clone(&state));
        Ok(Box::new(RabbitSubscriber { topic: topic.to_string(), options, state, running: Arc::downgrade(&running) }))
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }
}

/// A subscription of the RabbitMQ broker.
struct RabbitSubscriber {
    topic: String,
    options: SubscribeOptions,
    state: Arc<SubState>,
    running: Weak<Running>,
}

impl fmt::Debug for RabbitSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSubscriber").field("topic", &self.topic).field("id", &self.state.id).finish()
    }
}

#[async_trait]
impl Subscriber for RabbitSubscriber {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn options(&self) -> &SubscribeOptions {
        &self.options
    }

    async fn unsubscribe(&self) -> Result<()> {
        let state = &self.state;
        if let Some(running) = self.running.upgrade() {
            lock(&running.subs).remove(&state.id);
        }
        state.stop.cancel();
        state.pump.close();
        state.handlers.close();
        let timeout = state.drain_timeout;
        let waited = tokio::time::timeout(timeout, async {
            state.pump.wait().await;
            state.wait_for_others().await;
        })
        .await;
        if running_handler_of() == Some(state.key()) {
            // Called from this subscription's own handler: close the channel once that handler
            // (and its ack) is done.
            let state = Arc::clone(state);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(state.drain_timeout, state.handlers.wait()).await;
                state.close_channel().await;
            });
        } else {
            state.close_channel().await;
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
    use super::*;

    #[test]
    fn registered_with_its_capabilities() {
        let plugin = broker_core::plugin(NAME).unwrap();
        assert_eq!(plugin.capabilities, CAPABILITIES);
        let broker = broker_core::from_name(NAME, BrokerOptions::new()).unwrap();
        assert_eq!(broker.name(), NAME);
        assert_eq!(broker.address(), "amqp://guest:***@127.0.0.1:5672/%2f");
    }

    #[tokio::test]
    async fn not_connected_and_tls_rejected() {
        let broker = RabbitBroker::new();
        let err = broker.publish("t", Message::new("x"), PublishOptions::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotConnected);
        let broker = RabbitBroker::with_options(BrokerOptions::new().with_tls(broker_core::TlsOptions::new())).unwrap();
        let err = broker.connect().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("tls"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_server_is_a_connection_error_naming_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let options = BrokerOptions::new()
            .with_addresses([format!("amqp://guest:s3cret@127.0.0.1:{port}/%2f")])
            .with_connect_timeout(Duration::from_secs(2));
        let broker = RabbitBroker::with_options(options).unwrap();
        let err = broker.connect().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection);
        let text = err.to_string();
        assert!(text.contains(&format!("127.0.0.1:{port}")) && !text.contains("s3cret"), "{text}");
        assert!(!format!("{broker:?}").contains("s3cret"));
    }
}
