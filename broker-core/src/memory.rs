//! The in-memory backend, plugin `memory`: a real backend inside one process, not a mock.
//!
//! - **Broadcast** subscribers each get every message; a **queue group** gets each message once,
//!   spread over its members (they compete for one shared queue, as on RabbitMQ).
//! - **Bounded buffers with backpressure.** Every broadcast subscriber and every queue group has a
//!   buffer of [`SubscribeOptions::buffer_size`] messages (default [`DEFAULT_BUFFER_SIZE`], or the
//!   broker parameter `buffer_size`). When it is full, `publish` waits for room up to
//!   [`BrokerOptions::publish_timeout`] and then fails with [`ErrorKind::Timeout`]: a message is
//!   never dropped for lack of room, and a publish that times out reached no subscriber at all. Redeliveries re-enter the buffer without waiting, so a buffer
//!   holds at most `buffer_size` plus the subscription's concurrency.
//! - **Ack / nack.** A nacked message (a handler error with auto-ack, a panic, an explicit
//!   `nack()`, or an event dropped unsettled with auto-ack off) is delivered again after a short
//!   backoff (10 ms doubling to 1 s), to any member of a queue group. After `max_redeliveries`
//!   redeliveries it is published to `<topic>.dlq` with the headers of
//!   [`crate::headers`] saying why; if nobody subscribes there it is counted in
//!   [`MemoryBroker::dropped`] and logged.
//! - **Concurrency**: at most [`SubscribeOptions::concurrency`] handlers of a subscription run at once.
//! - **Drain**: `disconnect()` waits until every buffered and in-flight message is settled (bounded
//!   by [`BrokerOptions::drain_timeout`]), then stops the subscriptions. A message nacked during
//!   the drain is not redelivered: it is counted in [`MemoryBroker::dropped`] and logged. `unsubscribe()` stops
//!   delivery at once and waits for the subscription's running handlers; what is still buffered
//!   for a broadcast subscriber (or for the last member of a group) is discarded with it.
//! - **Not kept**: nothing survives the process, and a message published to a topic with no
//!   subscriber reaches nobody (`persistence: false`). Delayed delivery is not offered.
//!
//! A subscription lives until `unsubscribe()` or `disconnect()`, as in Go Micro: dropping the
//! [`Subscriber`] handle does not end it.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Handler, Subscriber, run_handler, scope_handler, wait_for_other_handlers};
use crate::capabilities::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Acknowledger, Event};
use crate::message::{Message, headers};
use crate::options::{BrokerOptions, PublishOptions, SubscribeOptions, validate_topic};

/// The plugin name.
pub const NAME: &str = "memory";

/// Buffer size of a subscription when neither the subscription nor the broker sets one.
pub const DEFAULT_BUFFER_SIZE: usize = 1024;

/// The broker parameter that sets the default buffer size of this broker's subscriptions.
pub const PARAM_BUFFER_SIZE: &str = "buffer_size";

/// What the memory backend does.
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

crate::register_plugin! {
    name: NAME,
    description: "in-process broker: queue groups, acks and redelivery, bounded buffers; nothing leaves the process",
    capabilities: CAPABILITIES,
    factory: build,
}

fn build(options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(MemoryBroker::with_options(options)?))
}

/// Which broker instance this is, for [`Broker::address`].
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// The in-memory broker. See the [module docs](self).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use broker_core::{handler_fn, Broker, Event, MemoryBroker, Message, PublishOptions, SubscribeOptions};
/// let broker = MemoryBroker::new();
/// broker.connect().await?;
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// broker.subscribe("jobs", handler_fn(move |e: Event| {
///     let tx = tx.clone();
///     async move { tx.send(e.message().body.clone())?; Ok(()) }
/// }), SubscribeOptions::new().with_queue("workers")).await?;
/// broker.publish("jobs", Message::new("job-1"), PublishOptions::new()).await?;
/// assert_eq!(rx.recv().await.unwrap(), "job-1");
/// broker.disconnect().await?;
/// # Ok::<(), broker_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

struct Shared {
    instance: u64,
    options: RwLock<BrokerOptions>,
    default_buffer: AtomicUsize,
    connected: AtomicBool,
    topics: Mutex<HashMap<String, TopicQueues, crate::TopicHash>>,
    members: Mutex<HashMap<u64, Arc<Member>>>,
    next_member: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Default)]
struct TopicQueues {
    broadcast: Vec<Arc<Queue>>,
    groups: HashMap<String, Arc<Queue>>,
    /// Every queue of the topic (`all()`), rebuilt when one is added or removed, so that a
    /// publish takes a reference instead of collecting a list.
    snapshot: Option<Arc<[Arc<Queue>]>>,
}

impl TopicQueues {
    fn all(&self) -> impl Iterator<Item = &Arc<Queue>> {
        self.broadcast.iter().chain(self.groups.values())
    }

    fn rebuild(&mut self) {
        self.snapshot = Some(self.all().cloned().collect());
    }
}

/// One subscription's worker: pulls from its queue, runs handlers.
struct Member {
    queue: Arc<Queue>,
    cancel: CancellationToken,
    handlers: TaskTracker,
}

/// A bounded FIFO consumed by one broadcast subscriber or by the members of one queue group.
struct Queue {
    topic: Arc<str>,
    group: Option<String>,
    items: Mutex<VecDeque<Delivery>>,
    /// Free buffer slots; publishers take one per message, consumers give it back.
    slots: Semaphore,
    ready: Notify,
    /// Messages accepted and not yet settled for good (queued, in a handler, or waiting to be redelivered).
    outstanding: AtomicUsize,
    idle: Notify,
    members: AtomicUsize,
    closed: AtomicBool,
}

struct Delivery {
    message: Message,
    attempt: u32,
    /// Whether this entry occupies a buffer slot (a redelivery does not).
    holds_slot: bool,
    last_error: Option<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short, non-reentrant locks leaves consistent data.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryBroker {
    /// A memory broker with default options.
    pub fn new() -> Self {
        MemoryBroker { shared: Arc::new(Shared::new(BrokerOptions::default(), DEFAULT_BUFFER_SIZE)) }
    }

    /// A memory broker with `options`. Accepts one parameter, `buffer_size` (the default buffer of its
    /// subscriptions); any other parameter, or TLS, is rejected.
    pub fn with_options(options: BrokerOptions) -> Result<Self> {
        let buffer = checked_options(&options)?;
        Ok(MemoryBroker { shared: Arc::new(Shared::new(options, buffer)) })
    }

    /// How many messages this broker gave up on: dead-lettered messages that found no room or no
    /// subscriber on `<topic>.dlq`, and messages still unsettled when a drain timed out.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

/// Validates options for this backend; returns the default buffer size.
fn checked_options(options: &BrokerOptions) -> Result<usize> {
    options.validate()?;
    if options.tls.is_some() {
        return Err(Error::unsupported(NAME, "tls", "the in-process broker has no network connection to protect"));
    }
    let mut buffer = DEFAULT_BUFFER_SIZE;
    for (key, value) in &options.params {
        if key == crate::codec::PARAM_ENVELOPE {
            return Err(Error::unsupported(
                NAME,
                key,
                "the in-process broker has no wire format; unset MICRO_BROKER_ENVELOPE for it",
            ));
        }
        if key != PARAM_BUFFER_SIZE {
            return Err(Error::unsupported(
                NAME,
                key,
                &format!("the only parameter of the memory backend is `{PARAM_BUFFER_SIZE}`"),
            ));
        }
        buffer = crate::params::positive(key, value)?;
    }
    Ok(buffer)
}

impl Shared {
    fn new(options: BrokerOptions, default_buffer: usize) -> Self {
        Shared {
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            options: RwLock::new(options),
            default_buffer: AtomicUsize::new(default_buffer),
            connected: AtomicBool::new(false),
            topics: Mutex::new(HashMap::default()),
            members: Mutex::new(HashMap::new()),
            next_member: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
        }
    }

    fn options(&self) -> BrokerOptions {
        self.options.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// One setting, without cloning the whole options.
    fn publish_timeout(&self) -> Duration {
        self.options.read().unwrap_or_else(|poisoned| poisoned.into_inner()).publish_timeout
    }

    fn drain_timeout(&self) -> Duration {
        self.options.read().unwrap_or_else(|poisoned| poisoned.into_inner()).drain_timeout
    }

    fn ensure_connected(&self) -> Result<()> {
        if self.connected.load(Ordering::Acquire) { Ok(()) } else { Err(Error::not_connected(NAME)) }
    }

    /// The queues of `topic`, or `None` when it has no subscriber.
    fn queues_of(&self, topic: &str) -> Option<Arc<[Arc<Queue>]>> {
        lock(&self.topics).get(topic).and_then(|t| t.snapshot.clone())
    }

    /// Hands a dead letter to the subscribers of `<topic>.dlq` without waiting; counts it when nobody takes it.
    fn dead_letter(&self, queue: &Queue, delivery: Delivery, reason: &str) {
        let dlq_topic = format!("{}.dlq", queue.topic);
        let message = delivery
            .message
            .with_header(headers::DEAD_LETTER_REASON, reason)
            .with_header(headers::DELIVERY_ATTEMPTS, delivery.attempt.to_string())
            .with_header(headers::ORIGINAL_TOPIC, queue.topic.to_string());
        let targets = self.queues_of(&dlq_topic);
        let mut taken = false;
        for target in targets.iter().flat_map(|t| t.iter()) {
            taken |= target.try_push(message.clone());
        }
        if !taken {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = %queue.topic, %dlq_topic, reason, "memory broker: dead letter had no subscriber with room; dropped");
        }
    }

    /// Ends subscription `id`: no more deliveries, then waits for its running handlers.
    async fn unsubscribe(&self, id: u64) -> Result<()> {
        let Some(member) = lock(&self.members).remove(&id) else { return Ok(()) };
        self.detach(&member);
        member.cancel.cancel();
        member.handlers.close();
        let timeout = self.drain_timeout();
        tokio::time::timeout(timeout, wait_for_others(&member)).await.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!("unsubscribe from {:?}: handlers still running after {timeout:?}", member.queue.topic),
            )
        })
    }

    /// Removes a member from its queue; the last member of a queue takes the queue away with it.
    fn detach(&self, member: &Member) {
        let queue = &member.queue;
        if queue.members.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let mut topics = lock(&self.topics);
        if let Some(entry) = topics.get_mut(&*queue.topic) {
            match &queue.group {
                Some(group) => {
                    if entry.groups.get(group).is_some_and(|q| Arc::ptr_eq(q, queue)) {
                        entry.groups.remove(group);
                    }
                }
                None => entry.broadcast.retain(|q| !Arc::ptr_eq(q, queue)),
            }
            if entry.broadcast.is_empty() && entry.groups.is_empty() {
                topics.remove(&*queue.topic);
            } else {
                entry.rebuild();
            }
        }
        drop(topics);
        queue.close();
    }
}

/// Waits for the member's running handlers, except the one calling (an `unsubscribe()` from
/// inside the subscription's own handler).
async fn wait_for_others(member: &Arc<Member>) {
    wait_for_other_handlers(&member.handlers, Arc::as_ptr(member) as usize).await;
}

impl Drop for Shared {
    fn drop(&mut self) {
        // A broker dropped without disconnect(): stop its workers rather than leak them.
        for member in lock(&self.members).values() {
            member.cancel.cancel();
            member.queue.close();
        }
    }
}

impl Queue {
    fn new(topic: Arc<str>, group: Option<String>, capacity: usize) -> Self {
        Queue {
            topic,
            group,
            items: Mutex::new(VecDeque::new()),
            slots: Semaphore::new(capacity.min(Semaphore::MAX_PERMITS)),
            ready: Notify::new(),
            outstanding: AtomicUsize::new(0),
            idle: Notify::new(),
            members: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    fn enqueue(&self, delivery: Delivery) {
        lock(&self.items).push_back(delivery);
        self.ready.notify_one();
    }

    /// Waits up to `timeout` for a buffer slot. `Ok(None)`: the queue closed meanwhile (its
    /// subscriber left), which takes nothing and is not an error.
    async fn reserve(&self, timeout: Duration) -> Result<Option<tokio::sync::SemaphorePermit<'_>>> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(Some(permit));
        }
        match tokio::time::timeout(timeout, self.slots.acquire()).await {
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "publish to {:?}: the buffer of {} stayed full for {timeout:?} (a slow subscriber); \
                     raise buffer_size or publish_timeout, or speed up the handler. No subscriber got the message",
                    self.topic,
                    self.group
                        .as_deref()
                        .map(|g| format!("queue group {g:?}"))
                        .unwrap_or_else(|| "a subscriber".into())
                ),
            )),
            Ok(Err(_closed)) => Ok(None),
            Ok(Ok(permit)) => Ok(Some(permit)),
        }
    }

    /// Queues the message if a slot is free now.
    fn try_push(&self, message: Message) -> bool {
        match self.slots.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.accept(message);
                true
            }
            Err(_) => false,
        }
    }

    fn accept(&self, message: Message) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        self.enqueue(Delivery { message, attempt: 1, holds_slot: true, last_error: None });
    }

    /// The next delivery, or `None` once the queue is closed. Cancel-safe: an item is taken
    /// from the queue in the same poll that returns it.
    async fn pop(&self) -> Option<Delivery> {
        // A message already waiting is taken without registering for a wakeup first (that costs
        // two locks of the `Notify` per message under load).
        if let Some(found) = self.try_pop() {
            return found;
        }
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = self.try_pop() {
                return found;
            }
            notified.await;
        }
    }

    /// `Some(None)`: closed; `Some(Some(_))`: the next delivery; `None`: nothing queued now.
    fn try_pop(&self) -> Option<Option<Delivery>> {
        if self.closed.load(Ordering::Acquire) {
            return Some(None);
        }
        let delivery = lock(&self.items).pop_front()?;
        if delivery.holds_slot {
            self.slots.add_permits(1);
        }
        Some(Some(delivery))
    }

    /// A message is settled for good.
    fn finish_one(&self) {
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.outstanding.load(Ordering::Acquire) == 0 || self.closed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.slots.close();
        self.ready.notify_waiters();
        self.idle.notify_waiters();
    }
}

/// Settles one memory delivery; an event dropped unsettled counts as a nack.
struct MemoryAck {
    queue: Arc<Queue>,
    shared: Weak<Shared>,
    delivery: Mutex<Option<Delivery>>,
    max_redeliveries: Option<u32>,
}

impl MemoryAck {
    fn nack_now(&self, reason: &str) {
        let Some(delivery) = lock(&self.delivery).take() else { return };
        self.redeliver(delivery, reason);
    }

    fn redeliver(&self, mut delivery: Delivery, reason: &str) {
        let Some(shared) = self.shared.upgrade() else { return };
        let queue = Arc::clone(&self.queue);
        if !shared.connected.load(Ordering::Acquire) {
            // Disconnecting: a redelivery would keep the drain waiting for a handler that keeps
            // failing. Give the message up, counted and logged.
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = %queue.topic, reason, "memory broker: nacked during disconnect; not redelivered");
            queue.finish_one();
            return;
        }
        let redeliveries_so_far = delivery.attempt - 1;
        if self.max_redeliveries.is_some_and(|max| redeliveries_so_far >= max) {
            shared.dead_letter(&queue, delivery, reason);
            queue.finish_one();
            return;
        }
        delivery.attempt += 1;
        delivery.holds_slot = false;
        delivery.last_error = Some(reason.to_string());
        let backoff = redelivery_backoff(delivery.attempt);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    tokio::time::sleep(backoff).await;
                    if queue.closed.load(Ordering::Acquire) {
                        queue.finish_one();
                    } else {
                        queue.enqueue(delivery);
                    }
                });
            }
            Err(_) => queue.enqueue(delivery),
        }
    }
}

/// 10 ms before the first redelivery, doubling, at most 1 s.
fn redelivery_backoff(attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(2).min(7);
    Duration::from_millis(10u64 << exponent).min(Duration::from_secs(1))
}

#[async_trait]
impl Acknowledger for MemoryAck {
    async fn ack(&self) -> Result<()> {
        self.ack_now().unwrap_or(Ok(()))
    }

    /// Never waits: `Event::ack` takes this, without the boxed future of `ack()`.
    fn ack_now(&self) -> Option<Result<()>> {
        if lock(&self.delivery).take().is_some() {
            self.queue.finish_one();
        }
        Some(Ok(()))
    }

    async fn nack(&self, reason: &str) -> Result<()> {
        self.nack_now(reason);
        Ok(())
    }
}

impl Drop for MemoryAck {
    fn drop(&mut self) {
        // Every clone of the event is gone and nobody settled it: as a broker would after the
        // consumer went away, deliver it again. (`&mut self`: no lock needed to look.)
        let delivery = self.delivery.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(delivery) = delivery {
            self.redeliver(delivery, "the event was dropped without ack or nack");
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn init(&self, options: BrokerOptions) -> Result<()> {
        if self.shared.connected.load(Ordering::Acquire) {
            return Err(Error::invalid_input("init() on a connected memory broker: call disconnect() first"));
        }
        let buffer = checked_options(&options)?;
        *self.shared.options.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = options;
        self.shared.default_buffer.store(buffer, Ordering::Relaxed);
        Ok(())
    }

    fn options(&self) -> BrokerOptions {
        self.shared.options()
    }

    fn address(&self) -> String {
        format!("memory://{}", self.shared.instance)
    }

    async fn connect(&self) -> Result<()> {
        checked_options(&self.shared.options())?;
        self.shared.connected.store(true, Ordering::Release);
        Ok(())
    }

    async fn disconnect(&self) -> Result<()> {
        let shared = &self.shared;
        if !shared.connected.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let timeout = shared.options().drain_timeout;
        let queues: Vec<Arc<Queue>> = lock(&shared.topics).values().flat_map(|t| t.all().cloned()).collect();
        let drained = tokio::time::timeout(timeout, async {
            for queue in &queues {
                queue.wait_idle().await;
            }
        })
        .await
        .is_ok();
        let members: Vec<Arc<Member>> = lock(&shared.members).drain().map(|(_, m)| m).collect();
        lock(&shared.topics).clear();
        let mut left_behind = 0;
        for queue in &queues {
            left_behind += queue.outstanding.load(Ordering::Acquire);
            queue.close();
        }
        for member in &members {
            member.cancel.cancel();
            member.handlers.close();
        }
        let handlers_done = tokio::time::timeout(timeout, async {
            for member in &members {
                member.handlers.wait().await;
            }
        })
        .await
        .is_ok();
        if drained && handlers_done {
            return Ok(());
        }
        shared.dropped.fetch_add(left_behind as u64, Ordering::Relaxed);
        tracing::warn!(left_behind, "memory broker: disconnect drain timed out");
        Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "disconnect: {left_behind} messages were still unhandled after the drain timeout of {timeout:?}{}",
                if handlers_done { "" } else { ", and handlers were still running" }
            ),
        ))
    }

    async fn publish(&self, topic: &str, message: Message, options: PublishOptions) -> Result<()> {
        self.shared.ensure_connected()?;
        CAPABILITIES.check_publish(NAME, &options)?;
        // A topic with queues was validated by subscribe(); only an unknown one is checked here
        // (an invalid topic never has queues, so it is always refused).
        let Some(queues) = self.shared.queues_of(topic) else { return validate_topic(topic) };
        let mut message = message;
        if !options.headers.is_empty() {
            message.headers.extend(options.headers);
        }
        if let [queue] = &*queues {
            if let Ok(permit) = queue.slots.try_acquire() {
                permit.forget();
                queue.accept(message);
                return Ok(());
            }
        }
        // Waiting for room (with its timer), or several queues: boxed, so that this future, which
        // is moved into a box of its own on every publish, stays small for the common case above.
        Box::pin(publish_waiting(self.shared.publish_timeout(), &queues, message)).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let shared = &self.shared;
        shared.ensure_connected()?;
        validate_topic(topic)?;
        CAPABILITIES.check_subscribe(NAME, &options)?;
        let capacity = options.buffer_size.unwrap_or_else(|| shared.default_buffer.load(Ordering::Relaxed));
        let queue = {
            let mut topics = lock(&shared.topics);
            let entry = topics.entry(topic.to_string()).or_default();
            let queue = match &options.queue {
                None => {
                    let queue = Arc::new(Queue::new(topic.into(), None, capacity));
                    entry.broadcast.push(Arc::clone(&queue));
                    queue
                }
                Some(group) => Arc::clone(
                    entry
                        .groups
                        .entry(group.clone())
                        .or_insert_with(|| Arc::new(Queue::new(topic.into(), Some(group.clone()), capacity))),
                ),
            };
            queue.members.fetch_add(1, Ordering::AcqRel);
            entry.rebuild();
            queue
        };
        let id = shared.next_member.fetch_add(1, Ordering::Relaxed);
        let member = Arc::new(Member { queue, cancel: CancellationToken::new(), handlers: TaskTracker::new() });
        lock(&shared.members).insert(id, Arc::clone(&member));
        if options.concurrency == 1 {
            // One handler at a time: the worker runs it itself (no task per delivery). The worker
            // is then the subscription's one tracked task, so unsubscribe and disconnect wait for
            // it, and an unsubscribe from inside the handler sees itself as the running handler.
            let key = Arc::as_ptr(&member) as usize;
            let worker = run_member_inline(Arc::clone(&member), handler, options.clone(), Arc::downgrade(shared));
            member.handlers.spawn(scope_handler(key, worker));
        } else {
            tokio::spawn(run_member(member, handler, options.clone(), Arc::downgrade(shared)));
        }
        Ok(Box::new(MemorySubscriber { id, topic: topic.to_string(), options, shared: Arc::downgrade(shared) }))
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }
}

/// The slow path of `publish`: waits up to `timeout` for room in every queue of the topic.
async fn publish_waiting(timeout: Duration, queues: &[Arc<Queue>], message: Message) -> Result<()> {
    if let [queue] = queues {
        if let Some(permit) = queue.reserve(timeout).await? {
            permit.forget();
            queue.accept(message);
        }
        return Ok(());
    }
    // Room in every buffer first, then the message into all of them: a publish that times
    // out reached no subscriber, so a retry cannot duplicate it for some of them.
    let reserved = futures::future::join_all(queues.iter().map(|q| q.reserve(timeout))).await;
    let mut slots = Vec::with_capacity(reserved.len());
    for slot in reserved {
        slots.push(slot?);
    }
    for (queue, slot) in queues.iter().zip(slots) {
        if let Some(permit) = slot {
            permit.forget();
            queue.accept(message.clone());
        }
    }
    Ok(())
}

/// The loop of a subscription with concurrency 1: take a message, run the handler, settle it.
/// A panicking handler is caught by `run_handler`; cancellation is only looked at between
/// handlers, so a running handler always finishes.
async fn run_member_inline(
    member: Arc<Member>,
    handler: Arc<dyn Handler>,
    options: SubscribeOptions,
    shared: Weak<Shared>,
) {
    loop {
        let Some(delivery) = next_delivery(&member).await else { return };
        let event = member_event(&member, delivery, &options, &shared);
        if let Err(error) = run_handler(handler.as_ref(), event, options.auto_ack).await {
            tracing::debug!(%error, "memory broker: delivery failed");
        }
        if member.queue.members.load(Ordering::Acquire) > 1 {
            // A queue group's members compete for one queue: let the others (woken by the
            // publishes) take their share instead of this worker draining it alone.
            tokio::task::yield_now().await;
        }
    }
}

/// The next message of the member's queue; `None` once the member is cancelled or the queue closed.
async fn next_delivery(member: &Member) -> Option<Delivery> {
    // Under load a message is waiting: take it without setting up the select (a cancellation
    // future per message). Cancellation still wins over a waiting message, as in the select.
    if member.cancel.is_cancelled() {
        return None;
    }
    if let Some(found) = member.queue.try_pop() {
        return found;
    }
    tokio::select! {
        biased;
        _ = member.cancel.cancelled() => None,
        delivery = member.queue.pop() => delivery,
    }
}

fn member_event(member: &Arc<Member>, delivery: Delivery, options: &SubscribeOptions, shared: &Weak<Shared>) -> Event {
    let mut event = Event::builder(Arc::clone(&member.queue.topic), delivery.message.clone()).attempt(delivery.attempt);
    if let Some(reason) = &delivery.last_error {
        event = event.error(Error::new(ErrorKind::Handler, format!("previous delivery failed: {reason}")));
    }
    event
        .acknowledger(MemoryAck {
            queue: Arc::clone(&member.queue),
            shared: shared.clone(),
            delivery: Mutex::new(Some(delivery)),
            max_redeliveries: options.max_redeliveries,
        })
        .build()
}

/// One subscription's loop: take a concurrency permit, take a message, run the handler in a task.
async fn run_member(member: Arc<Member>, handler: Arc<dyn Handler>, options: SubscribeOptions, shared: Weak<Shared>) {
    let limit = Arc::new(Semaphore::new(options.concurrency));
    loop {
        let permit = tokio::select! {
            biased;
            _ = member.cancel.cancelled() => return,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let Some(delivery) = next_delivery(&member).await else { return };
        let event = member_event(&member, delivery, &options, &shared);
        let handler = Arc::clone(&handler);
        let auto_ack = options.auto_ack;
        member.handlers.spawn(scope_handler(Arc::as_ptr(&member) as usize, async move {
            if let Err(error) = run_handler(handler.as_ref(), event, auto_ack).await {
                tracing::debug!(%error, "memory broker: delivery failed");
            }
            drop(permit);
        }));
    }
}

/// A memory subscription.
struct MemorySubscriber {
    id: u64,
    topic: String,
    options: SubscribeOptions,
    shared: Weak<Shared>,
}

impl fmt::Debug for MemorySubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySubscriber").field("id", &self.id).field("topic", &self.topic).finish()
    }
}

#[async_trait]
impl Subscriber for MemorySubscriber {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn options(&self) -> &SubscribeOptions {
        &self.options
    }

    async fn unsubscribe(&self) -> Result<()> {
        match self.shared.upgrade() {
            Some(shared) => shared.unsubscribe(self.id).await,
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("instance", &self.instance)
            .field("connected", &self.connected.load(Ordering::Relaxed))
            .field("subscriptions", &lock(&self.members).len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{BrokerExt, handler_fn};
    use std::sync::atomic::AtomicU32;
    use tokio::sync::mpsc;

    async fn connected(options: BrokerOptions) -> MemoryBroker {
        let broker = MemoryBroker::with_options(options).unwrap();
        broker.connect().await.unwrap();
        broker
    }

    #[tokio::test]
    async fn full_buffer_makes_publish_wait_then_time_out() {
        let broker = connected(BrokerOptions::new().with_publish_timeout(Duration::from_millis(100))).await;
        let release = Arc::new(Notify::new());
        let gate = Arc::clone(&release);
        let (started_tx, mut started) = mpsc::unbounded_channel();
        broker
            .subscribe(
                "bp",
                handler_fn(move |_e: Event| {
                    let gate = Arc::clone(&gate);
                    let started_tx = started_tx.clone();
                    async move {
                        started_tx.send(())?;
                        gate.notified().await;
                        Ok(())
                    }
                }),
                SubscribeOptions::new().with_buffer_size(1),
            )
            .await
            .unwrap();
        broker.publish("bp", Message::new("1"), PublishOptions::new()).await.unwrap();
        started.recv().await.unwrap(); // 1 is in the handler
        broker.publish("bp", Message::new("2"), PublishOptions::new()).await.unwrap(); // 2 fills the buffer
        let err = broker.publish("bp", Message::new("3"), PublishOptions::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert!(err.to_string().contains("buffer"), "{err}");
        release.notify_one();
        started.recv().await.unwrap(); // 2 now runs, the buffer has room again
        broker.publish("bp", Message::new("3"), PublishOptions::new()).await.unwrap();
        release.notify_one();
        release.notify_one();
    }

    #[tokio::test]
    async fn redelivered_event_knows_why_and_dead_letter_has_headers() {
        let broker = connected(BrokerOptions::new()).await;
        let attempts = Arc::new(AtomicU32::new(0));
        let seen = Arc::clone(&attempts);
        let (errors_tx, mut errors) = mpsc::unbounded_channel();
        broker
            .subscribe(
                "poison",
                handler_fn(move |e: Event| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let _ = errors_tx.send(e.error().map(|err| err.to_string()));
                    async { Err("db down".into()) }
                }),
                SubscribeOptions::new().with_max_redeliveries(1),
            )
            .await
            .unwrap();
        let (dlq_tx, mut dlq) = mpsc::unbounded_channel();
        broker
            .subscribe(
                "poison.dlq",
                handler_fn(move |e: Event| {
                    let _ = dlq_tx.send(e.message().clone());
                    async { Ok(()) }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        broker.publish("poison", Message::new("x"), PublishOptions::new()).await.unwrap();
        let dead = tokio::time::timeout(Duration::from_secs(5), dlq.recv()).await.unwrap().unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        assert_eq!(errors.recv().await.unwrap(), None);
        assert!(errors.recv().await.unwrap().unwrap().contains("db down"));
        assert!(dead.header(headers::DEAD_LETTER_REASON).unwrap().contains("db down"));
        assert_eq!(dead.header(headers::DELIVERY_ATTEMPTS), Some("2"));
        assert_eq!(dead.header(headers::ORIGINAL_TOPIC), Some("poison"));
        assert_eq!(broker.dropped(), 0);
        broker.disconnect().await.unwrap();
    }

    #[tokio::test]
    async fn dead_letter_without_subscriber_is_counted() {
        let broker = connected(BrokerOptions::new()).await;
        broker
            .subscribe(
                "nobody-listens",
                handler_fn(|_e: Event| async { Err("no".into()) }),
                SubscribeOptions::new().with_max_redeliveries(0),
            )
            .await
            .unwrap();
        broker.publish("nobody-listens", Message::new("x"), PublishOptions::new()).await.unwrap();
        broker.disconnect().await.unwrap();
        assert_eq!(broker.dropped(), 1);
    }

    #[tokio::test]
    async fn typed_subscribe_dead_letters_garbage_as_codec_error() {
        #[derive(serde::Deserialize)]
        struct User {
            #[allow(dead_code)]
            email: String,
        }
        let broker = connected(BrokerOptions::new()).await;
        let calls = Arc::new(AtomicU32::new(0));
        let seen = Arc::clone(&calls);
        broker
            .subscribe_json(
                "typed",
                move |_user: User, _e: Event| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    async { Ok(()) }
                },
                SubscribeOptions::new().with_max_redeliveries(0),
            )
            .await
            .unwrap();
        let (dlq_tx, mut dlq) = mpsc::unbounded_channel();
        broker
            .subscribe(
                "typed.dlq",
                handler_fn(move |e: Event| {
                    let _ = dlq_tx.send(e.message().clone());
                    async { Ok(()) }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        broker.publish("typed", Message::new("{not json"), PublishOptions::new()).await.unwrap();
        let dead = tokio::time::timeout(Duration::from_secs(5), dlq.recv()).await.unwrap().unwrap();
        assert!(dead.header(headers::DEAD_LETTER_REASON).unwrap().contains("codec error"), "{dead:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn dropping_an_unsettled_event_redelivers_it() {
        let broker = connected(BrokerOptions::new()).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        broker
            .subscribe(
                "forgetful",
                handler_fn(move |e: Event| {
                    let tx = tx.clone();
                    async move {
                        tx.send(e.attempt())?;
                        if e.attempt() > 1 {
                            e.ack().await?;
                        }
                        Ok(())
                    }
                }),
                SubscribeOptions::new().with_auto_ack(false),
            )
            .await
            .unwrap();
        broker.publish("forgetful", Message::new("x"), PublishOptions::new()).await.unwrap();
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        broker.disconnect().await.unwrap();
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn disconnect_drains_buffered_messages_too() {
        let broker = connected(BrokerOptions::new()).await;
        let handled = Arc::new(AtomicU32::new(0));
        let count = Arc::clone(&handled);
        broker
            .subscribe(
                "slow",
                handler_fn(move |_e: Event| {
                    let count = Arc::clone(&count);
                    async move {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        count.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        for i in 0..50 {
            broker.publish("slow", Message::new(i.to_string()), PublishOptions::new()).await.unwrap();
        }
        broker.disconnect().await.unwrap();
        assert_eq!(handled.load(Ordering::SeqCst), 50);
        assert_eq!(
            broker.publish("slow", Message::new("x"), PublishOptions::new()).await.unwrap_err().kind(),
            ErrorKind::NotConnected
        );
    }

    #[tokio::test]
    async fn drain_timeout_is_reported_not_hung() {
        let broker = connected(BrokerOptions::new().with_drain_timeout(Duration::from_millis(50))).await;
        broker
            .subscribe(
                "stuck",
                handler_fn(|_e: Event| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(())
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        broker.publish("stuck", Message::new("x"), PublishOptions::new()).await.unwrap();
        broker.publish("stuck", Message::new("y"), PublishOptions::new()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let err = broker.disconnect().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert!(err.to_string().contains("2 messages"), "{err}");
        assert_eq!(broker.dropped(), 2);
    }

    #[tokio::test]
    async fn options_are_checked() {
        let err = MemoryBroker::with_options(BrokerOptions::new().with_param("jetstream", "true")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("jetstream"));
        let err = MemoryBroker::with_options(BrokerOptions::new().with_param(PARAM_BUFFER_SIZE, "0")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let err = MemoryBroker::with_options(BrokerOptions::new().with_tls(crate::TlsOptions::new())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        let broker = connected(BrokerOptions::new().with_param(PARAM_BUFFER_SIZE, "7")).await;
        assert_eq!(broker.shared.default_buffer.load(Ordering::Relaxed), 7);
        assert_eq!(broker.init(BrokerOptions::new()).unwrap_err().kind(), ErrorKind::InvalidInput);
        broker.disconnect().await.unwrap();
        broker.init(BrokerOptions::new().with_addresses(["x"])).unwrap();
        assert_eq!(broker.options().addresses, vec!["x"]);
        assert_ne!(MemoryBroker::new().address(), MemoryBroker::new().address());
    }

    #[tokio::test]
    async fn dropping_the_broker_stops_its_workers() {
        let broker = connected(BrokerOptions::new()).await;
        let handler = handler_fn(|_e: Event| async { Ok(()) });
        let weak = Arc::downgrade(&handler);
        broker.subscribe("gone", handler, SubscribeOptions::new()).await.unwrap();
        drop(broker);
        tokio::time::timeout(Duration::from_secs(5), async {
            while weak.strong_count() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the worker released its handler");
    }

    #[tokio::test]
    async fn a_publish_that_times_out_reached_nobody() {
        let broker = connected(BrokerOptions::new().with_publish_timeout(Duration::from_millis(100))).await;
        let (fast_tx, mut fast) = mpsc::unbounded_channel();
        broker
            .subscribe(
                "fanout",
                handler_fn(move |e: Event| {
                    let _ = fast_tx.send(e.message().body.clone());
                    async { Ok(()) }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        let gate = Arc::new(Notify::new());
        let held = Arc::clone(&gate);
        broker
            .subscribe(
                "fanout",
                handler_fn(move |_e: Event| {
                    let held = Arc::clone(&held);
                    async move {
                        held.notified().await;
                        Ok(())
                    }
                }),
                SubscribeOptions::new().with_buffer_size(1),
            )
            .await
            .unwrap();
        // The slow subscriber holds "1" in its handler and "2" in its buffer; "3" finds no room.
        for body in ["1", "2"] {
            broker.publish("fanout", Message::new(body), PublishOptions::new()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let err = broker.publish("fanout", Message::new("3"), PublishOptions::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert!(err.to_string().contains("No subscriber got the message"), "{err}");
        assert_eq!(fast.recv().await.unwrap(), "1");
        assert_eq!(fast.recv().await.unwrap(), "2");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(fast.try_recv().is_err(), "the fast subscriber did not get the failed publish either");
        for _ in 0..3 {
            gate.notify_one();
        }
    }

    #[tokio::test]
    async fn a_poison_message_does_not_hold_up_disconnect() {
        let broker = connected(BrokerOptions::new().with_drain_timeout(Duration::from_secs(20))).await;
        broker
            .subscribe("poison-forever", handler_fn(|_e: Event| async { Err("never".into()) }), SubscribeOptions::new())
            .await
            .unwrap();
        broker.publish("poison-forever", Message::new("x"), PublishOptions::new()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        broker.disconnect().await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "disconnect did not wait out the drain timeout");
        assert_eq!(broker.dropped(), 1, "the message given up on is counted");
    }

    #[tokio::test]
    async fn unsubscribe_from_own_handler_returns() {
        let broker = connected(BrokerOptions::new().with_drain_timeout(Duration::from_secs(20))).await;
        let slot: Arc<tokio::sync::Mutex<Option<Box<dyn Subscriber>>>> = Arc::default();
        let own = Arc::clone(&slot);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sub = broker
            .subscribe(
                "self-stop",
                handler_fn(move |_e: Event| {
                    let (own, tx) = (Arc::clone(&own), tx.clone());
                    async move {
                        if let Some(sub) = own.lock().await.as_ref() {
                            tx.send(sub.unsubscribe().await.is_ok())?;
                        }
                        Ok(())
                    }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        *slot.lock().await = Some(sub);
        broker.publish("self-stop", Message::new("x"), PublishOptions::new()).await.unwrap();
        let unsubscribed = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert!(unsubscribed);
        broker.disconnect().await.unwrap();
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(redelivery_backoff(2), Duration::from_millis(10));
        assert_eq!(redelivery_backoff(3), Duration::from_millis(20));
        assert_eq!(redelivery_backoff(50), Duration::from_secs(1));
    }
}
