//! The subscriber side shared by the peer-to-peer backends (`http`, `grpc`): the local
//! subscriptions by node id, and one delivery to a handler with its acknowledgement, redelivery
//! count and dead letter. Each backend's server decodes a request, finds the subscriptions here
//! and answers what [`Subscription::deliver`] says (the answer is the acknowledgement). A
//! connected backend holds a [`Peer`]: its subscribing, heartbeat and leaving the registry.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};

use async_trait::async_trait;
use std::time::Duration;

use broker_core::{
    Acknowledger, Error, ErrorKind, Event, Handler, Message, Result, SubscribeOptions, Subscriber, TopicHash, headers,
    run_handler, scope_handler,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::common::lock;
use crate::{Registry, Service, SharedRegistry};

/// One local subscription, as the backend's endpoint sees it.
pub struct Subscription {
    /// Shared with every event of the subscription.
    topic: Arc<str>,
    node_id: String,
    /// The registry entry (one node) this subscription registers.
    pub service: Service,
    handler: Arc<dyn Handler>,
    options: SubscribeOptions,
    limit: Arc<Semaphore>,
    active: AtomicBool,
    /// Handlers of this subscription that are running; `unsubscribe()` waits for them.
    pub tasks: TaskTracker,
}

impl Subscription {
    /// A subscription to `topic` registered as `service` (one node), running `handler`.
    pub fn new(topic: &str, service: Service, handler: Arc<dyn Handler>, options: SubscribeOptions) -> Arc<Self> {
        let node_id = service.nodes.first().map(|n| n.id.clone()).unwrap_or_default();
        Arc::new(Subscription {
            topic: Arc::from(topic),
            node_id,
            service,
            handler,
            limit: Arc::new(Semaphore::new(options.concurrency)),
            options,
            active: AtomicBool::new(true),
            tasks: TaskTracker::new(),
        })
    }

    /// The node id this subscription is registered under.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Waits for this subscription's running handlers, except the one calling (an
    /// `unsubscribe()` from inside its own handler).
    pub async fn wait_for_handlers(self: &Arc<Self>) {
        broker_core::wait_for_other_handlers(&self.tasks, Arc::as_ptr(self) as usize).await;
    }

    /// Runs the handler on one delivery (counted in `handlers`, which `disconnect()` waits for)
    /// and says how it ended; past `max_redeliveries`, hands the message to `dead_letter`
    /// (`<topic>.dlq` and the message, to publish).
    pub async fn deliver(
        self: &Arc<Self>,
        handlers: &TaskTracker,
        message: Message,
        attempt: u32,
        dead_letter: &(dyn Fn(&str, &Message) -> Result<()> + Sync),
    ) -> Delivery {
        let Ok(permit) = Arc::clone(&self.limit).acquire_owned().await else { return Delivery::Gone };
        // Taken before the check, so that unsubscribe() either sees this delivery or it sees
        // the subscription gone: never a handler starting after unsubscribe() returned.
        let token = self.tasks.token();
        if !self.active.load(Ordering::Acquire) {
            return Delivery::Gone;
        }
        let settle = Arc::new(Settle::default());
        // Kept only where a dead letter may need it.
        let kept = self.options.max_redeliveries.is_some().then(|| message.clone());
        let event = Event::builder(Arc::clone(&self.topic), message)
            .attempt(attempt)
            .acknowledger(AnswerAck(Arc::clone(&settle)))
            .build();
        let handler = Arc::clone(&self.handler);
        let auto_ack = self.options.auto_ack;
        let handler_token = handlers.token();
        let run = scope_handler(Arc::as_ptr(self) as usize, async move {
            let outcome = run_handler(handler.as_ref(), event, auto_ack).await;
            drop(permit);
            drop(token);
            drop(handler_token);
            outcome
        });
        // Run here, in the request's task (a task per delivery cost a spawn and a wake-up of
        // this one); a publisher that gives up waiting must not cancel a running handler, so
        // if this request is dropped first, the rest of the handler runs in a task of its own.
        let outcome = FinishOnDrop::new(run, handlers.clone()).await;
        let reason = match settle.state.load(Ordering::Acquire) {
            ACKED => return Delivery::Handled,
            NACKED => lock(&settle.reason).clone().unwrap_or_else(|| "nacked".into()),
            _ => match outcome {
                Err(e) => e.to_string(),
                Ok(()) => "the handler returned without acking (auto-ack is off)".into(),
            },
        };
        match (self.options.max_redeliveries, kept) {
            (Some(max), Some(message)) if attempt > max => self.dead_letter(dead_letter, message, attempt, &reason),
            _ => Delivery::Failed(reason),
        }
    }

    /// Past `max_redeliveries`: hand the message to `<topic>.dlq` and call it handled.
    fn dead_letter(
        &self,
        publish: &(dyn Fn(&str, &Message) -> Result<()> + Sync),
        message: Message,
        attempt: u32,
        reason: &str,
    ) -> Delivery {
        let dlq = format!("{}.dlq", self.topic);
        let message = message
            .with_header(headers::DEAD_LETTER_REASON, reason)
            .with_header(headers::DELIVERY_ATTEMPTS, attempt.to_string())
            .with_header(headers::ORIGINAL_TOPIC, self.topic.to_string());
        match publish(&dlq, &message) {
            Ok(()) => Delivery::Handled,
            Err(e) => Delivery::Failed(format!("{reason}; and dead-lettering to {dlq} failed: {e}")),
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("node_id", &self.node_id)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Runs a future in the task that awaits it; if that task drops it before it finished, the rest
/// of it runs in a task of `tracker` instead of being cancelled (a handler always runs to its
/// end). Without a runtime to spawn on (the runtime is shutting down) the rest is dropped.
struct FinishOnDrop<F: Future<Output: Send> + Send + 'static> {
    /// Boxed, so that it can move into a task after it was polled.
    future: Option<Pin<Box<F>>>,
    tracker: TaskTracker,
}

impl<F: Future<Output: Send> + Send + 'static> FinishOnDrop<F> {
    fn new(future: F, tracker: TaskTracker) -> Self {
        FinishOnDrop { future: Some(Box::pin(future)), tracker }
    }
}

impl<F: Future<Output: Send> + Send + 'static> Future for FinishOnDrop<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(future) = self.future.as_mut() else { return Poll::Pending };
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.future = None;
        Poll::Ready(output)
    }
}

impl<F: Future<Output: Send> + Send + 'static> Drop for FinishOnDrop<F> {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                self.tracker.spawn_on(future, &runtime);
            }
        }
    }
}

/// How one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The handler acked (or the message was dead-lettered).
    Handled,
    /// The handler failed or nacked, and why: the publisher retries.
    Failed(String),
    /// The subscription has ended.
    Gone,
}

const ACKED: u8 = 1;
const NACKED: u8 = 2;

#[derive(Default)]
struct Settle {
    state: AtomicU8,
    reason: Mutex<Option<String>>,
}

/// The answer to the publisher is the acknowledgement: this records which one to send.
struct AnswerAck(Arc<Settle>);

#[async_trait]
impl Acknowledger for AnswerAck {
    async fn ack(&self) -> Result<()> {
        self.ack_now().unwrap_or(Ok(()))
    }

    fn ack_now(&self) -> Option<Result<()>> {
        // Recording the answer never waits: no boxed `ack()` future per delivery.
        self.0.state.store(ACKED, Ordering::Release);
        Some(Ok(()))
    }

    async fn nack(&self, reason: &str) -> Result<()> {
        *lock(&self.0.reason) = Some(reason.to_string());
        self.0.state.store(NACKED, Ordering::Release);
        Ok(())
    }
}

/// The local subscriptions by node id. Our node ids are unique per subscription; a list keeps
/// Go Micro's rule that a delivery runs every local subscription carrying the id it names.
#[derive(Debug, Default)]
pub struct Subscriptions {
    /// Hashed with [`TopicHash`]: every delivery looks its id up here (SipHash of a node id was
    /// ~560 instructions a delivery). Only our own ids are inserted; a lookup of an id from the
    /// network cannot flood the table.
    by_node: RwLock<HashMap<String, Vec<Arc<Subscription>>, TopicHash>>,
}

impl Subscriptions {
    /// Adds a subscription.
    pub fn insert(&self, subscription: Arc<Subscription>) {
        let mut map = self.by_node.write().unwrap_or_else(|p| p.into_inner());
        map.entry(subscription.node_id.clone()).or_default().push(subscription);
    }

    /// Removes one subscription; false if it was already gone.
    pub fn remove(&self, subscription: &Arc<Subscription>) -> bool {
        subscription.active.store(false, Ordering::Release);
        let mut map = self.by_node.write().unwrap_or_else(|p| p.into_inner());
        let Some(list) = map.get_mut(&subscription.node_id) else { return false };
        let before = list.len();
        list.retain(|s| !Arc::ptr_eq(s, subscription));
        let removed = list.len() != before;
        if list.is_empty() {
            map.remove(&subscription.node_id);
        }
        removed
    }

    /// Removes every subscription; returns their registry entries.
    pub fn remove_all(&self) -> Vec<Service> {
        let mut map = self.by_node.write().unwrap_or_else(|p| p.into_inner());
        map.drain()
            .flat_map(|(_, list)| list)
            .map(|s| {
                s.active.store(false, Ordering::Release);
                s.service.clone()
            })
            .collect()
    }

    /// The registry entries of every subscription (for the heartbeat).
    pub fn services(&self) -> Vec<Service> {
        let map = self.by_node.read().unwrap_or_else(|p| p.into_inner());
        map.values().flatten().map(|s| s.service.clone()).collect()
    }

    /// Registers every subscription again: the heartbeat that keeps registry TTLs from expiring.
    /// A failure is logged (the next heartbeat tries again).
    pub async fn register_all(&self, registry: &dyn Registry, ttl: Duration, backend: &str) {
        for service in self.services() {
            if let Err(e) = registry.register(&service, ttl).await {
                tracing::warn!(backend, error = %e, service = %service.name, "re-registration failed");
            }
        }
    }

    /// Ends `subscription`: no new delivery starts, it leaves the registry, and its running
    /// handlers (except the one calling) get up to `drain_timeout` to finish. A second call does
    /// nothing.
    pub async fn unsubscribe(
        &self,
        subscription: &Arc<Subscription>,
        registry: &dyn Registry,
        drain_timeout: Duration,
    ) -> Result<()> {
        if !self.remove(subscription) {
            return Ok(());
        }
        let deregistered = registry.deregister(&subscription.service).await;
        subscription.tasks.close();
        let waited = tokio::time::timeout(drain_timeout, subscription.wait_for_handlers()).await;
        deregistered?;
        waited.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!("unsubscribe from {:?}: handlers still running after {drain_timeout:?}", subscription.topic),
            )
        })
    }

    /// The subscriptions registered as `node_id`.
    pub fn get(&self, node_id: &str) -> Vec<Arc<Subscription>> {
        let map = self.by_node.read().unwrap_or_else(|p| p.into_inner());
        map.get(node_id).cloned().unwrap_or_default()
    }
}

/// What a connected peer-to-peer broker shares with its subscriptions: the registry, the local
/// subscriptions and how they are registered. Its heartbeat registers every subscription again
/// each `register_interval` until [`Peer::leave`], or until the last `Arc` of it is dropped.
pub struct Peer {
    /// Where the subscriptions are registered.
    pub registry: SharedRegistry,
    /// The local subscriptions by node id (what the backend's endpoint delivers to).
    pub subscriptions: Subscriptions,
    /// How long an unsubscribe (and the broker's disconnect) waits for running handlers.
    pub drain_timeout: Duration,
    backend: &'static str,
    register_ttl: Duration,
    register_interval: Duration,
    heartbeat_stop: CancellationToken,
}

impl Peer {
    /// A peer of `backend` over `registry`, its heartbeat started (on the current Tokio runtime).
    pub fn start(
        backend: &'static str,
        registry: SharedRegistry,
        register_ttl: Duration,
        register_interval: Duration,
        drain_timeout: Duration,
    ) -> Arc<Peer> {
        let peer = Arc::new(Peer {
            registry,
            subscriptions: Subscriptions::default(),
            drain_timeout,
            backend,
            register_ttl,
            register_interval,
            heartbeat_stop: CancellationToken::new(),
        });
        tokio::spawn(heartbeat(Arc::downgrade(&peer), peer.heartbeat_stop.clone()));
        peer
    }

    /// Subscribes `handler` as `service` (one node, the subscription's own id): it is added to
    /// the local subscriptions, then registered; a failed registration takes it out again.
    pub async fn subscribe(
        self: &Arc<Self>,
        topic: &str,
        service: Service,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let subscription = Subscription::new(topic, service.clone(), handler, options.clone());
        self.subscriptions.insert(Arc::clone(&subscription));
        if let Err(e) = self.registry.register(&service, self.register_ttl).await {
            self.subscriptions.remove(&subscription);
            return Err(e);
        }
        let peer = Arc::downgrade(self);
        Ok(Box::new(PeerSubscriber { backend: self.backend, topic: topic.to_string(), options, subscription, peer }))
    }

    /// Stops the heartbeat and takes every subscription out of the registry, so that publishers
    /// stop choosing this broker; returns one error per failed deregistration.
    pub async fn leave(&self) -> Vec<Error> {
        self.heartbeat_stop.cancel();
        let mut problems = Vec::new();
        for service in self.subscriptions.remove_all() {
            if let Err(e) = self.registry.deregister(&service).await {
                problems.push(Error::new(e.kind(), format!("deregister {}: {e}", service.name)).with_source(e));
            }
        }
        problems
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("backend", &self.backend)
            .field("registry", &self.registry)
            .field("register_ttl", &self.register_ttl)
            .field("register_interval", &self.register_interval)
            .finish()
    }
}

/// Registers every subscription again each `register_interval`, so that registry TTLs do not
/// expire, until `stop` or until the peer is gone.
async fn heartbeat(peer: Weak<Peer>, stop: CancellationToken) {
    loop {
        let interval = match peer.upgrade() {
            Some(peer) => peer.register_interval,
            None => return,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let Some(peer) = peer.upgrade() else { return };
        peer.subscriptions.register_all(peer.registry.as_ref(), peer.register_ttl, peer.backend).await;
    }
}

/// A subscription of a peer-to-peer broker.
struct PeerSubscriber {
    backend: &'static str,
    topic: String,
    options: SubscribeOptions,
    subscription: Arc<Subscription>,
    peer: Weak<Peer>,
}

impl fmt::Debug for PeerSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("backend", &self.backend)
            .field("topic", &self.topic)
            .field("node_id", &self.subscription.node_id())
            .finish()
    }
}

#[async_trait]
impl Subscriber for PeerSubscriber {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn options(&self) -> &SubscribeOptions {
        &self.options
    }

    fn id(&self) -> Option<&str> {
        Some(self.subscription.node_id())
    }

    async fn unsubscribe(&self) -> Result<()> {
        let Some(peer) = self.peer.upgrade() else { return Ok(()) };
        peer.subscriptions.unsubscribe(&self.subscription, peer.registry.as_ref(), peer.drain_timeout).await
    }
}
