//! # broker-http: Go Micro's peer-to-peer HTTP broker, its flaws fixed
//!
//! Plugin `http`, the default backend: no broker server. Each broker runs a small HTTP/1.1 server;
//! each subscription registers itself in a service registry ([`broker_registry`]); a publisher
//! looks the topic up and POSTs the message straight to the subscribers, in Go Micro's wire
//! format ([`wire`]), so Go Micro services interoperate unchanged.
//!
//! - **Broadcast** subscribers each get every message; a **queue group** gets it once, on one
//!   of its nodes, trying the group's other nodes when one fails.
//! - **Inbox**: a message with no reachable subscriber waits in a bounded per-topic inbox
//!   ([`HttpConfig::inbox_max_messages`], bytes per topic and in total; when full the publish is
//!   rejected with [`ErrorKind::Overflow`], or the oldest is dropped and counted, as configured).
//!   The inbox is flushed as soon as the registry shows a subscriber, and retried on a timer with
//!   backoff: never only on the next publish, as in Go Micro.
//! - **Acknowledgement is the HTTP status**: the endpoint answers 200 once the handler acked,
//!   500 when it failed or nacked; the publisher retries a failed delivery with backoff, up to
//!   `max_attempts`, then drops it, counted in [`HttpStats`] and logged. A subscription's
//!   `max_redeliveries` is enforced by the subscriber: past it, the message goes to `<topic>.dlq`.
//! - **Bad input** gets the right status and never a panic: 405, 413 (checked before reading),
//!   400 for malformed JSON, base64 or a missing topic, 404 for an unknown subscriber id, 401 for
//!   a wrong shared secret.
//! - **Drain**: `disconnect()` delivers what can be delivered (bounded by the drain timeout),
//!   deregisters, waits for running handlers, then stops the server. Messages still waiting for a
//!   subscriber that never came are discarded then, counted and logged.
//!
//! What it does not do: keep messages across a restart of the publisher (`persistence: false`),
//! order messages (deliveries run concurrently), delay them, or carry headers outside the JSON body.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
mod outbox;
mod server;
mod tls;
pub mod wire;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::{
    Broker, BrokerOptions, Capabilities, Error, ErrorKind, Handler, Message, PublishOptions, Result, RunningState,
    SubscribeOptions, Subscriber, validate_topic,
};
use broker_registry::endpoint;
use broker_registry::outbox::DeliveryCounters;
use broker_registry::{Cache, Node, Service, SharedRegistry};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use broker_registry::outbox::DeliveryReport;
pub use config::{HttpConfig, OverflowPolicy};
pub use wire::Dialect;

/// The plugin name.
pub const NAME: &str = "http";

/// The request header carrying the shared secret, when one is configured.
pub const SECRET_HEADER: &str = "X-Micro-Broker-Secret";

/// What the HTTP backend does.
pub const CAPABILITIES: Capabilities = Capabilities {
    queue_groups: true,
    persistence: false,
    backlog: true,
    ordering: false,
    redelivery: true,
    delayed_delivery: false,
    native_headers: false,
    tls: tls::ENABLED,
};

broker_core::register_plugin! {
    name: NAME,
    description: "peer-to-peer HTTP with registry discovery (Go Micro's default broker); no server needed",
    capabilities: CAPABILITIES,
    factory: build,
}

fn build(options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(HttpBroker::with_options(options)?))
}

/// Counters of what the broker gave up on or delivered. See the [crate docs](crate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpStats {
    /// Deliveries that a subscriber acknowledged.
    pub delivered: u64,
    /// Messages dropped from a full inbox (policy `drop_oldest`) or discarded at disconnect.
    pub inbox_dropped: u64,
    /// Deliveries given up after `max_attempts`, or refused for good by the subscriber (4xx).
    pub delivery_dropped: u64,
}

/// The HTTP broker. See the [crate docs](crate).
///
/// ```
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use broker_core::{handler_fn, Broker, BrokerOptions, Event, Message, PublishOptions, SubscribeOptions};
/// use broker_http::HttpBroker;
///
/// let options = BrokerOptions::new().with_param("registry", "memory");
/// let broker = HttpBroker::with_options(options)?;
/// broker.connect().await?;
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// broker.subscribe("user.registered", handler_fn(move |e: Event| {
///     let tx = tx.clone();
///     async move { tx.send(e.message().body.clone())?; Ok(()) }
/// }), SubscribeOptions::new()).await?;
/// broker.publish("user.registered", Message::new("ada"), PublishOptions::new()).await?;
/// assert_eq!(rx.recv().await.unwrap(), "ada");
/// broker.disconnect().await?;
/// # Ok::<(), broker_core::Error>(())
/// # }).unwrap();
/// ```
pub struct HttpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    /// `broker-<uuid>`: the prefix of legacy node ids.
    id: String,
    options: RwLock<BrokerOptions>,
    registry_override: Option<SharedRegistry>,
    running: tokio::sync::Mutex<Option<Arc<Running>>>,
    /// The running state for the synchronous accessors (`address()`), mirrored from `running`.
    current: RunningState<Running>,
    counters: Arc<DeliveryCounters>,
}

/// Everything that exists while connected.
struct Running {
    config: HttpConfig,
    /// The registry, the local subscriptions and their heartbeat.
    peer: Arc<endpoint::Peer>,
    bound: SocketAddr,
    advertise: String,
    /// Whether the endpoint serves HTTPS (registered as `"secure": "true"`).
    secure: bool,
    outbox: Arc<outbox::Outbox>,
    server_stop: CancellationToken,
    server_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    handlers: TaskTracker,
    /// How long a publish may wait for room in a full inbox (policy `wait`).
    publish_timeout: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl HttpBroker {
    /// An HTTP broker with default options (listening on `127.0.0.1:0`, registry from `MICRO_REGISTRY`).
    pub fn new() -> Self {
        // Default options always pass the configuration check.
        Self::build(BrokerOptions::default(), None)
    }

    /// An HTTP broker with `options`; see [`config::PARAMS`] for its parameters.
    pub fn with_options(options: BrokerOptions) -> Result<Self> {
        HttpConfig::from_options(&options)?;
        Ok(Self::build(options, None))
    }

    /// An HTTP broker using `registry` instead of the one named by options or environment.
    pub fn with_registry(options: BrokerOptions, registry: SharedRegistry) -> Result<Self> {
        HttpConfig::from_options(&options)?;
        Ok(Self::build(options, Some(registry)))
    }

    fn build(options: BrokerOptions, registry_override: Option<SharedRegistry>) -> Self {
        let uuid = uuid::Uuid::new_v4().to_string();
        HttpBroker {
            inner: Arc::new(Inner {
                id: format!("broker-{uuid}"),
                options: RwLock::new(options),
                registry_override,
                running: tokio::sync::Mutex::new(None),
                current: RunningState::new(),
                counters: Arc::new(DeliveryCounters::default()),
            }),
        }
    }

    /// What was delivered and what was given up on so far.
    pub fn stats(&self) -> HttpStats {
        let c = &self.inner.counters;
        HttpStats {
            delivered: c.delivered.load(Ordering::Relaxed),
            inbox_dropped: c.inbox_dropped.load(Ordering::Relaxed),
            delivery_dropped: c.delivery_dropped.load(Ordering::Relaxed),
        }
    }

    /// The registry in use while connected.
    pub fn registry(&self) -> Option<SharedRegistry> {
        self.current().map(|r| Arc::clone(&r.peer.registry))
    }

    /// Publishes and waits (up to the publish timeout) for the outcome of the first delivery round:
    /// which subscriber nodes acknowledged it, which failed and why, and whether it still waits in
    /// the inbox for a subscriber. Fire-and-forget [`Broker::publish`] stays the default.
    pub async fn publish_confirmed(
        &self,
        topic: &str,
        message: Message,
        options: PublishOptions,
    ) -> Result<DeliveryReport> {
        let running = self.connected()?;
        let message = prepare(topic, message, options)?;
        running.outbox.publish_confirmed(topic, &message, running.publish_timeout).await
    }

    fn current(&self) -> Option<Arc<Running>> {
        self.inner.current.get()
    }

    fn connected(&self) -> Result<Arc<Running>> {
        self.inner.current.connected(NAME)
    }

    /// The node that registers `topic` / `queue` for this broker, in its dialect.
    fn node_for(&self, running: &Running, topic: &str, queue: Option<&str>) -> Service {
        let dialect = running.config.dialect;
        let (id, mut metadata) = match dialect {
            Dialect::Legacy => (format!("{}.{}", self.inner.id, uuid::Uuid::new_v4()), Default::default()),
            Dialect::Current => {
                let metadata: std::collections::HashMap<String, String> =
                    [("broker".to_string(), "http".to_string()), ("topic".to_string(), topic.to_string())].into();
                // Go Micro uses its broker uuid here, so two subscriptions of one topic share the id,
                // and registries keyed by node id (etcd) let one version's entry overwrite the
                // other's. A uuid per subscription keeps Go's shape without that collision.
                (format!("{topic}-{}", uuid::Uuid::new_v4()), metadata)
            }
        };
        metadata.insert("secure".to_string(), running.secure.to_string());
        Service {
            name: dialect.service_name(topic),
            version: queue.unwrap_or(wire::BROADCAST_VERSION).to_string(),
            metadata: None,
            endpoints: None,
            nodes: vec![Node { id, address: running.advertise.clone(), metadata }],
        }
    }
}

impl Default for HttpBroker {
    fn default() -> Self {
        HttpBroker::new()
    }
}

impl fmt::Debug for HttpBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBroker")
            .field("id", &self.inner.id)
            .field("address", &self.current().map(|r| r.bound))
            .field("options", &self.inner.options())
            .finish()
    }
}

impl Inner {
    fn options(&self) -> BrokerOptions {
        self.options.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Validates a publish and merges its options into the message.
fn prepare(topic: &str, mut message: Message, options: PublishOptions) -> Result<Message> {
    validate_topic(topic)?;
    CAPABILITIES.check_publish(NAME, &options)?;
    message.headers.extend(options.headers);
    Ok(message)
}

async fn open_registry(config: &HttpConfig, overridden: Option<SharedRegistry>) -> Result<SharedRegistry> {
    if let Some(registry) = overridden {
        return Ok(registry);
    }
    let name = match &config.registry {
        Some(name) => name.clone(),
        None => std::env::var(broker_registry::ENV_REGISTRY)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| broker_registry::DEFAULT_REGISTRY.to_string()),
    };
    let addresses = if config.registry_addresses.is_empty() {
        std::env::var(broker_registry::ENV_REGISTRY_ADDRESS)
            .map(|v| broker_core::parse_addresses(&v))
            .unwrap_or_default()
    } else {
        config.registry_addresses.clone()
    };
    broker_registry::from_name(&name, &addresses).await
}

#[async_trait]
impl Broker for HttpBroker {
    fn init(&self, options: BrokerOptions) -> Result<()> {
        if self.current().is_some() {
            return Err(Error::invalid_input("init() on a connected http broker: call disconnect() first"));
        }
        HttpConfig::from_options(&options)?;
        *self.inner.options.write().unwrap_or_else(|p| p.into_inner()) = options;
        Ok(())
    }

    fn options(&self) -> BrokerOptions {
        self.inner.options()
    }

    fn address(&self) -> String {
        match self.current() {
            Some(running) => running.bound.to_string(),
            None => HttpConfig::from_options(&self.inner.options()).map(|c| c.listen).unwrap_or_default(),
        }
    }

    async fn connect(&self) -> Result<()> {
        let mut slot = self.inner.running.lock().await;
        if slot.is_some() {
            return Ok(());
        }
        let options = self.inner.options();
        let config = HttpConfig::from_options(&options)?;
        let registry =
            tokio::time::timeout(options.connect_timeout, open_registry(&config, self.inner.registry_override.clone()))
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("opening the registry took over {:?}", options.connect_timeout),
                    )
                })??;
        let listener = tokio::net::TcpListener::bind(&config.listen).await.map_err(|e| {
            Error::new(ErrorKind::Connection, format!("cannot listen on {}: {e}", config.listen)).with_source(e)
        })?;
        let bound =
            listener.local_addr().map_err(|e| Error::new(ErrorKind::Connection, e.to_string()).with_source(e))?;
        let advertise = match &config.advertise {
            Some(address) => address.clone(),
            None if bound.ip().is_unspecified() => {
                tracing::warn!(%bound, "http broker listens on all interfaces; registering 127.0.0.1 (set advertise_address for other hosts)");
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port()).to_string()
            }
            None => bound.to_string(),
        };
        let acceptor = tls::acceptor(config.tls.as_ref())?;
        let secure = acceptor.is_some();
        let cache = Cache::new(Arc::clone(&registry));
        let outbox = outbox::new(config.clone(), cache, Arc::clone(&self.inner.counters))?;
        let peer =
            endpoint::Peer::start(NAME, registry, config.register_ttl, config.register_interval, options.drain_timeout);
        let running = Arc::new(Running {
            config,
            peer,
            bound,
            advertise,
            secure,
            outbox,
            server_stop: CancellationToken::new(),
            server_task: Mutex::new(None),
            handlers: TaskTracker::new(),
            publish_timeout: options.publish_timeout,
        });
        let task =
            tokio::spawn(server::serve(listener, acceptor, Arc::downgrade(&running), running.server_stop.clone()));
        *lock(&running.server_task) = Some(task);
        self.inner.current.set(Arc::clone(&running));
        *slot = Some(running);
        Ok(())
    }

    async fn disconnect(&self) -> Result<()> {
        let mut slot = self.inner.running.lock().await;
        let Some(running) = slot.take() else { return Ok(()) };
        self.inner.current.clear();
        let timeout = running.peer.drain_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        // The first problem decides the error's kind; the message lists them all.
        let mut problems: Vec<Error> = Vec::new();
        // 1. Deliver what can be delivered while our own endpoint still answers.
        if let Err(e) = running.outbox.drain(deadline).await {
            problems.push(e);
        }
        // 2. Leave the registry, so that publishers stop choosing us.
        problems.extend(running.peer.leave().await);
        // 3. Let running handlers finish, then stop the server.
        running.handlers.close();
        if tokio::time::timeout_at(deadline, running.handlers.wait()).await.is_err() {
            problems.push(Error::new(
                ErrorKind::Timeout,
                format!("handlers still running after the drain timeout of {timeout:?}"),
            ));
        }
        running.server_stop.cancel();
        let task = lock(&running.server_task).take();
        if let Some(task) = task {
            let _ = tokio::time::timeout_at(deadline + Duration::from_secs(1), task).await;
        }
        let Some(first) = problems.first() else { return Ok(()) };
        let kind = first.kind();
        let all: Vec<String> = problems.iter().map(|e| e.to_string()).collect();
        Err(Error::new(kind, format!("http broker disconnect: {}", all.join("; "))))
    }

    async fn publish(&self, topic: &str, message: Message, options: PublishOptions) -> Result<()> {
        let running = self.connected()?;
        let message = prepare(topic, message, options)?;
        running.outbox.publish(topic, &message, running.publish_timeout).await
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
        let service = self.node_for(&running, topic, options.queue.as_deref());
        running.peer.subscribe(topic, service, handler, options).await
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }
}

/// Entry points for the fuzz targets in `broker-http/fuzz`; not part of the API.
#[doc(hidden)]
#[allow(clippy::panic, clippy::expect_used)]
pub mod fuzzing {
    use crate::wire::{Dialect, decode, encode};

    /// Splits `data` at its first newline into a query string and a request body, and runs both
    /// through the endpoint's parsing. Whatever decodes must encode back to the same message.
    pub fn request(data: &[u8]) {
        let (query, body) = match data.iter().position(|b| *b == b'\n') {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (&b""[..], data),
        };
        let _ = crate::server::Query::parse(std::str::from_utf8(query).ok());
        if let Ok(decoded) = decode(body) {
            for dialect in [Dialect::Legacy, Dialect::Current] {
                let again =
                    decode(&encode(&decoded.topic, &decoded.message, dialect)).expect("a re-encoded message decodes");
                assert_eq!(again.topic, decoded.topic);
                assert_eq!(again.message.body, decoded.message.body);
                if dialect == Dialect::Legacy {
                    assert_eq!(again.message.headers, decoded.message.headers);
                }
            }
        }
    }
}
