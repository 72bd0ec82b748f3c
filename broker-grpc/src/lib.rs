//! # broker-grpc: Go Micro's peer-to-peer gRPC broker, its flaws fixed
//!
//! Plugin `grpc`: the `http` backend's twin over gRPC, as Go Micro's gRPC broker plugin
//! (go-micro/plugins `broker/grpc`). No broker server: each broker runs a gRPC server with one
//! method, `/Broker/Publish` (Go Micro's proto, [`proto`]); each subscription registers itself in
//! a service registry ([`broker_registry`]) as service `topic:<topic>`, version = its queue group
//! or `ff.grpc.broadcast`, one node `{id: "broker-<uuid>.<uuid>", address, metadata:
//! {"secure": "false"}}` (`"true"` when it serves [TLS](#tls)); a publisher looks the topic up
//! and calls each subscriber with `Message {topic, id: <node id>, header, body}`. A Go Micro
//! service using the gRPC broker and a shared registry (etcd) interoperates unchanged.
//!
//! What it fixes in Go Micro's plugin:
//! - **One channel per node**, kept and reused (HTTP/2 multiplexes the calls), where Go Micro
//!   dials and closes a connection for every message.
//! - **Failures are not only logged**: the gRPC status is the acknowledgement. A handler error or
//!   nack answers `Internal` and the publisher retries with backoff, up to `max_attempts`; a
//!   queue group's unreachable node makes the publisher try the group's other nodes; a
//!   subscription's `max_redeliveries` sends the message to `<topic>.dlq`.
//!   [`GrpcBroker::publish_confirmed`] returns which nodes got it and why the others did not.
//! - **Inbox**: a message with no reachable subscriber waits in a bounded per-topic inbox,
//!   flushed as soon as the registry shows a subscriber (Go Micro's gRPC broker has none: the
//!   message is lost). The inbox, retry and failover are the `http` backend's, shared through
//!   [`broker_registry::outbox`]; only the transport differs.
//! - **Bad input** is a typed status, never a panic or a hang: a body that is not a `Message`
//!   (`Internal`, from tonic's decoder), one over `max_message_bytes` (`OutOfRange`, checked by
//!   tonic before decoding; a publisher refuses it at `publish` with
//!   [`ErrorKind::InvalidInput`]), an empty topic (`InvalidArgument`), an unknown subscription id
//!   (`NotFound`), a wrong shared secret (`Unauthenticated`), another method (`Unimplemented`).
//!   Every call has a timeout (`request_timeout_ms`).
//!
//! ## Why the proto is hand-written
//!
//! The proto has three small messages and one method. Its prost structs (`#[derive(prost::Message)]`)
//! and the server's routing are written out in [`proto`] and `server.rs`, as tonic's generated
//! code would be, instead of `tonic-build` in a build script: building needs no `protoc` on the
//! user's machine (the `etcd` registry still does, through etcd-client), and the wire contract is
//! readable in one place. Its correctness is not taken on trust: the interop test runs a peer
//! whose stubs Google's `protoc` (grpcio-tools) generates from the proto text.
//!
//! ## TLS
//!
//! With the cargo feature `tls` (see [`tls`]), as the `http` backend's and through the same code
//! ([`broker_registry::tls`]): `BrokerOptions::tls` with `cert_file` + `key_file` makes the
//! endpoint serve TLS (ALPN `h2`) and register its nodes `"secure": "true"`, as Go Micro does; a
//! publisher calls secure nodes over TLS, trusting `ca_file` (or `insecure_skip_verify`), and
//! refuses them without TLS options, never sending in clear text. The shared secret works the
//! same over TLS. Without the feature TLS options are rejected with [`ErrorKind::Unsupported`].
//!
//! What it does not do (yet): keep messages across a restart of the publisher, order messages,
//! delay them.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
pub mod proto;
mod publish;
mod server;
pub mod tls;

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
pub use config::GrpcConfig;

/// The plugin name.
pub const NAME: &str = "grpc";

/// The registry version of broadcast subscriptions (Go Micro's `broadcastVersion`).
pub const BROADCAST_VERSION: &str = "ff.grpc.broadcast";

/// The request metadata carrying the shared secret, when one is configured.
pub const SECRET_METADATA: &str = "x-micro-broker-secret";

/// The request metadata carrying the delivery attempt (1 for the first); Go Micro sends none.
pub const ATTEMPT_METADATA: &str = "x-micro-broker-attempt";

/// What the gRPC backend does.
pub const CAPABILITIES: Capabilities = Capabilities {
    queue_groups: true,
    persistence: false,
    backlog: true,
    ordering: false,
    redelivery: true,
    delayed_delivery: false,
    native_headers: true,
    tls: tls::ENABLED,
};

broker_core::register_plugin! {
    name: NAME,
    description: "peer-to-peer gRPC with registry discovery (Go Micro's gRPC broker); no server needed",
    capabilities: CAPABILITIES,
    factory: build,
}

fn build(options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(GrpcBroker::with_options(options)?))
}

/// The registry service name of `topic`'s subscriptions, as Go Micro's gRPC broker writes it.
pub fn service_name(topic: &str) -> String {
    format!("topic:{topic}")
}

/// Counters of what the broker gave up on or delivered. See the [crate docs](crate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrpcStats {
    /// Deliveries that a subscriber acknowledged.
    pub delivered: u64,
    /// Messages dropped from a full inbox (policy `drop_oldest`) or discarded at disconnect.
    pub inbox_dropped: u64,
    /// Deliveries given up after `max_attempts`, or refused for good by the subscriber.
    pub delivery_dropped: u64,
}

/// The gRPC broker. See the [crate docs](crate).
///
/// ```
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// use broker_core::{handler_fn, Broker, BrokerOptions, Event, Message, PublishOptions, SubscribeOptions};
/// use broker_grpc::GrpcBroker;
///
/// let broker = GrpcBroker::with_options(BrokerOptions::new().with_param("registry", "memory"))?;
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
pub struct GrpcBroker {
    inner: Arc<Inner>,
}

struct Inner {
    /// `broker-<uuid>`: the prefix of node ids, as Go Micro's.
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
    config: GrpcConfig,
    /// The registry, the local subscriptions and their heartbeat.
    peer: Arc<endpoint::Peer>,
    bound: SocketAddr,
    advertise: String,
    /// Whether the endpoint serves TLS (registered as `"secure": "true"`).
    secure: bool,
    outbox: Arc<publish::Outbox>,
    server_stop: CancellationToken,
    server_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    handlers: TaskTracker,
    /// How long a publish may wait for room in a full inbox (policy `wait`).
    publish_timeout: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl GrpcBroker {
    /// A gRPC broker with default options (listening on `127.0.0.1:0`, registry from `MICRO_REGISTRY`).
    pub fn new() -> Self {
        // Default options always pass the configuration check.
        Self::build(BrokerOptions::default(), None)
    }

    /// A gRPC broker with `options`; see [`config::PARAMS`] for its parameters.
    pub fn with_options(options: BrokerOptions) -> Result<Self> {
        GrpcConfig::from_options(&options)?;
        Ok(Self::build(options, None))
    }

    /// A gRPC broker using `registry` instead of the one named by options or environment.
    pub fn with_registry(options: BrokerOptions, registry: SharedRegistry) -> Result<Self> {
        GrpcConfig::from_options(&options)?;
        Ok(Self::build(options, Some(registry)))
    }

    fn build(options: BrokerOptions, registry_override: Option<SharedRegistry>) -> Self {
        GrpcBroker {
            inner: Arc::new(Inner {
                id: format!("broker-{}", uuid::Uuid::new_v4()),
                options: RwLock::new(options),
                registry_override,
                running: tokio::sync::Mutex::new(None),
                current: RunningState::new(),
                counters: Arc::new(DeliveryCounters::default()),
            }),
        }
    }

    /// What was delivered and what was given up on so far.
    pub fn stats(&self) -> GrpcStats {
        let c = &self.inner.counters;
        GrpcStats {
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
        let message = prepare(&running.config, topic, message, options)?;
        running.outbox.publish_confirmed(topic, &message, running.publish_timeout).await
    }

    fn current(&self) -> Option<Arc<Running>> {
        self.inner.current.get()
    }

    fn connected(&self) -> Result<Arc<Running>> {
        self.inner.current.connected(NAME)
    }

    /// The registry entry of a subscription to `topic` / `queue`, as Go Micro's gRPC broker writes it.
    fn node_for(&self, running: &Running, topic: &str, queue: Option<&str>) -> Service {
        let id = format!("{}.{}", self.inner.id, uuid::Uuid::new_v4());
        Service {
            name: service_name(topic),
            version: queue.unwrap_or(BROADCAST_VERSION).to_string(),
            metadata: None,
            endpoints: None,
            nodes: vec![Node::new(id, running.advertise.clone()).with_metadata("secure", running.secure.to_string())],
        }
    }
}

impl Default for GrpcBroker {
    fn default() -> Self {
        GrpcBroker::new()
    }
}

impl fmt::Debug for GrpcBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcBroker")
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
fn prepare(config: &GrpcConfig, topic: &str, mut message: Message, options: PublishOptions) -> Result<Message> {
    validate_topic(topic)?;
    CAPABILITIES.check_publish(NAME, &options)?;
    message.headers.extend(options.headers);
    publish::check_size(config, topic, &message)?;
    Ok(message)
}

async fn open_registry(config: &GrpcConfig, overridden: Option<SharedRegistry>) -> Result<SharedRegistry> {
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
impl Broker for GrpcBroker {
    fn init(&self, options: BrokerOptions) -> Result<()> {
        if self.current().is_some() {
            return Err(Error::invalid_input("init() on a connected grpc broker: call disconnect() first"));
        }
        GrpcConfig::from_options(&options)?;
        *self.inner.options.write().unwrap_or_else(|p| p.into_inner()) = options;
        Ok(())
    }

    fn options(&self) -> BrokerOptions {
        self.inner.options()
    }

    fn address(&self) -> String {
        match self.current() {
            Some(running) => running.bound.to_string(),
            None => GrpcConfig::from_options(&self.inner.options()).map(|c| c.listen).unwrap_or_default(),
        }
    }

    async fn connect(&self) -> Result<()> {
        let mut slot = self.inner.running.lock().await;
        if slot.is_some() {
            return Ok(());
        }
        let options = self.inner.options();
        let config = GrpcConfig::from_options(&options)?;
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
                tracing::warn!(%bound, "grpc broker listens on all interfaces; registering 127.0.0.1 (set advertise_address for other hosts)");
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port()).to_string()
            }
            None => bound.to_string(),
        };
        let acceptor = tls::acceptor(config.tls.as_ref())?;
        let secure = acceptor.is_some();
        let connector = tls::connector(config.tls.as_ref())?;
        let cache = Cache::new(Arc::clone(&registry));
        let outbox = publish::new(config.clone(), connector, cache, Arc::clone(&self.inner.counters));
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
        let task = tokio::spawn(server::serve(
            listener,
            acceptor,
            Arc::downgrade(&running),
            running.config.max_message_bytes,
            running.server_stop.clone(),
        ));
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
        // 1. Deliver what can be delivered while our own server still answers.
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
        Err(Error::new(kind, format!("grpc broker disconnect: {}", all.join("; "))))
    }

    async fn publish(&self, topic: &str, message: Message, options: PublishOptions) -> Result<()> {
        let running = self.connected()?;
        let message = prepare(&running.config, topic, message, options)?;
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
