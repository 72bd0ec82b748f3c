//! Consuming: one librdkafka consumer per subscription, handlers run under a concurrency limit,
//! offsets stored only for the contiguous prefix of handled messages, in-process redelivery and
//! dead letters.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::codec::{self, Envelope};
use broker_core::{
    Acknowledger, Error, ErrorKind, Event, Handler, Headers, Message, Result, Settlement, SubscribeOptions, Subscriber,
    headers, run_handler, running_handler_of, scope_handler,
};
use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::DLQ_SUFFIX;
use crate::publish::ReportingContext;
use crate::{Running, error};

/// How long closing a consumer (final commit, leaving the group) may take at most.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest pause between two redeliveries of a nacked message.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Per partition: the offsets received and not yet handled, and the next offset after the highest
/// received. The offset to commit is the lowest unhandled one (or that next offset): everything
/// below it was handled.
#[derive(Debug, Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    next: i64,
}

impl Partition {
    /// The offset to commit: the lowest unhandled one, or the next after the highest received.
    fn commit_point(&self) -> i64 {
        self.in_flight.first().copied().unwrap_or(self.next)
    }
}

/// The offsets a subscription may commit.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    partitions: Mutex<HashMap<i32, Partition>>,
}

impl Offsets {
    fn received(&self, partition: i32, offset: i64) {
        let mut parts = lock(&self.partitions);
        let entry = parts.entry(partition).or_default();
        entry.in_flight.insert(offset);
        entry.next = entry.next.max(offset + 1);
    }

    /// Marks `offset` handled; the new commit point of its partition, if it is still ours.
    fn done(&self, partition: i32, offset: i64) -> Option<i64> {
        let mut parts = lock(&self.partitions);
        let entry = parts.get_mut(&partition)?;
        if !entry.in_flight.remove(&offset) {
            return None;
        }
        Some(entry.commit_point())
    }

    /// Forgets the partitions in `revoked` (they went to another member).
    fn forget(&self, revoked: &[i32]) {
        let mut parts = lock(&self.partitions);
        for partition in revoked {
            parts.remove(partition);
        }
    }

    /// The commit point of every partition.
    fn commit_points(&self) -> Vec<(i32, i64)> {
        lock(&self.partitions)
            .iter()
            .filter(|(_, p)| p.next > 0)
            .map(|(partition, p)| (*partition, p.commit_point()))
            .collect()
    }
}

/// The consumer context: signals group joins, forgets revoked partitions, reports errors.
pub(crate) struct SubContext {
    reporting: ReportingContext,
    joined: watch::Sender<u64>,
    offsets: Arc<Offsets>,
}

impl ClientContext for SubContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.reporting.log(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.reporting.error(error, reason);
    }
}

impl ConsumerContext for SubContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            // librdkafka commits the stored offsets (auto commit) before it gives partitions up.
            let revoked: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            tracing::debug!(?revoked, "kafka broker: partitions revoked");
            self.offsets.forget(&revoked);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                tracing::debug!(assigned = list.count(), "kafka broker: partitions assigned");
                self.joined.send_modify(|n| *n += 1);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "kafka broker: rebalance failed"),
        }
    }
}

type KConsumer = StreamConsumer<SubContext>;

/// What a subscription is: topic, mode, options.
pub(crate) struct Plan {
    pub(crate) topic: Arc<str>,
    /// The Kafka group id of a queue group; `None` for broadcast.
    pub(crate) group_id: Option<String>,
    pub(crate) options: SubscribeOptions,
}

/// The live state of one subscription.
pub(crate) struct SubState {
    pub(crate) id: u64,
    stop: CancellationToken,
    pump: TaskTracker,
    handlers: TaskTracker,
    drain_timeout: Duration,
    consumer: Mutex<Option<Arc<KConsumer>>>,
    offsets: Arc<Offsets>,
    group: bool,
    topic: Arc<str>,
    closing: tokio::sync::Mutex<bool>,
}

impl SubState {
    /// The key [`scope_handler`] marks this subscription's handlers with.
    fn key(&self) -> usize {
        self as *const SubState as usize
    }

    /// Stops the pump without waiting (the broker is being dropped).
    pub(crate) fn stop_now(&self) {
        self.stop.cancel();
    }

    /// Marks `offset` handled, and stores the new commit point for the next (auto) commit.
    fn handled(&self, partition: i32, offset: i64) {
        let Some(point) = self.offsets.done(partition, offset) else { return };
        if !self.group {
            return;
        }
        if let Some(consumer) = lock(&self.consumer).as_ref() {
            let mut list = TopicPartitionList::new();
            if list.add_partition_offset(&self.topic, partition, Offset::Offset(point)).is_ok() {
                if let Err(error) = consumer.store_offsets(&list) {
                    // The partition went to another member meanwhile: it redelivers from its commit.
                    tracing::debug!(%error, partition, point, "kafka broker: offset not stored");
                }
            }
        }
    }

    /// Stops the pump; with `wait_handlers`, waits for running handlers (bounded by the drain
    /// timeout); then commits what was handled and closes the consumer (leaving the group).
    /// Idempotent. Returns `Timeout` when handlers were still running after the drain timeout.
    pub(crate) async fn close(self: &Arc<Self>, wait_handlers: bool) -> Result<()> {
        let mut closed = self.closing.lock().await;
        self.stop.cancel();
        self.pump.close();
        self.handlers.close();
        if *closed {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        // At concurrency 1 the pump runs the handler itself (see `pump`), so it is waited for as
        // a handler is: not from inside that handler.
        let drained = !wait_handlers
            || (tokio::time::timeout_at(deadline, self.pump.wait()).await.is_ok()
                && tokio::time::timeout_at(deadline, self.handlers.wait()).await.is_ok());
        *closed = true;
        drop(closed);
        if wait_handlers {
            self.finish().await;
        } else {
            // Called from this subscription's own handler: finish once that handler is done.
            let state = Arc::clone(self);
            tokio::spawn(async move {
                let stopped = async {
                    state.pump.wait().await;
                    state.handlers.wait().await;
                };
                let _ = tokio::time::timeout(state.drain_timeout, stopped).await;
                state.finish().await;
            });
        }
        if drained {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Timeout,
                format!("unsubscribe from {:?}: handlers still running after {:?}", self.topic, self.drain_timeout),
            ))
        }
    }

    /// Commits the handled offsets and closes the consumer, off the async threads, bounded.
    async fn finish(&self) {
        let Some(consumer) = lock(&self.consumer).take() else { return };
        let points = if self.group { self.offsets.commit_points() } else { Vec::new() };
        let topic = Arc::clone(&self.topic);
        let close = tokio::task::spawn_blocking(move || {
            if !points.is_empty() {
                let mut list = TopicPartitionList::new();
                for (partition, point) in points {
                    let _ = list.add_partition_offset(&topic, partition, Offset::Offset(point));
                }
                if let Err(error) = consumer.commit(&list, CommitMode::Sync) {
                    tracing::debug!(%error, "kafka broker: final commit failed (another member may own the partition)");
                }
            }
            // Dropping the last handle closes the consumer: it leaves its group.
            drop(consumer);
        });
        if tokio::time::timeout(CLOSE_TIMEOUT, close).await.is_err() {
            tracing::warn!(topic = %self.topic, "kafka broker: closing a consumer took longer than {CLOSE_TIMEOUT:?}");
        }
    }
}

/// Records the nack reason of a delivery.
#[derive(Clone, Default)]
struct Settle {
    reason: Arc<Mutex<Option<String>>>,
}

#[async_trait]
impl Acknowledger for Settle {
    async fn ack(&self) -> Result<()> {
        Ok(())
    }

    async fn nack(&self, reason: &str) -> Result<()> {
        *lock(&self.reason) = Some(reason.to_string());
        Ok(())
    }
}

/// A received record, detached from the consumer.
struct Record {
    partition: i32,
    offset: i64,
    payload: Bytes,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    fn from_message(message: &BorrowedMessage<'_>) -> Record {
        let headers = message
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default();
        Record {
            partition: message.partition(),
            offset: message.offset(),
            payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            headers,
        }
    }

    fn headers(&self) -> Headers {
        self.headers
            .iter()
            .map(|(k, v)| {
                (k.clone(), v.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default())
            })
            .collect()
    }
}

/// The message of a record: the raw value and the record headers, or (go-micro) the decoded
/// envelope with the record headers merged over it (as Go Micro's plugin does).
pub(crate) fn decode(payload: Bytes, record_headers: Headers, envelope: Envelope) -> Result<Message> {
    match envelope {
        Envelope::Native => Ok(Message::with_headers(record_headers, payload)),
        Envelope::GoMicro => {
            let mut message = codec::decode_envelope(&payload)?;
            message.headers.extend(record_headers);
            Ok(message)
        }
    }
}

/// Creates the consumer of `plan`, joins or assigns, and starts its pump. Returns once the
/// consumer reads the topic: a queue-group member has joined its group, a broadcast consumer
/// has its partitions assigned at their current end.
pub(crate) async fn start(
    running: &Arc<Running>,
    plan: Arc<Plan>,
    handler: Arc<dyn Handler>,
    id: u64,
) -> Result<Arc<SubState>> {
    let config = &running.config;
    let mut client = config.base_client_config();
    client
        .set("enable.partition.eof", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", config.fetch_wait_ms.to_string())
        .set("fetch.error.backoff.ms", "50");
    let group = plan.group_id.is_some();
    match &plan.group_id {
        Some(group_id) => {
            client
                .set("group.id", group_id)
                .set("enable.auto.commit", "true")
                .set("auto.commit.interval.ms", config.commit_interval_ms.to_string())
                .set("auto.offset.reset", if config.group_start_earliest { "earliest" } else { "latest" })
                .set("session.timeout.ms", config.session_timeout_ms.to_string())
                .set("heartbeat.interval.ms", config.heartbeat_interval_ms.to_string());
        }
        None => {
            client
                .set("group.id", unique_group())
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "latest");
        }
    }
    config.apply_overrides(&mut client);
    let offsets = Arc::new(Offsets::default());
    let (joined, mut joins) = watch::channel(0u64);
    let context = SubContext { reporting: ReportingContext::default(), joined, offsets: Arc::clone(&offsets) };
    let consumer: Arc<KConsumer> =
        Arc::new(client.create_with_context(context).map_err(|e| error::client_config("consumer", e))?);
    let state = Arc::new(SubState {
        id,
        stop: CancellationToken::new(),
        pump: TaskTracker::new(),
        handlers: TaskTracker::new(),
        drain_timeout: running.options.drain_timeout,
        consumer: Mutex::new(Some(Arc::clone(&consumer))),
        offsets,
        group,
        topic: Arc::clone(&plan.topic),
        closing: tokio::sync::Mutex::new(false),
    });
    let topic = Arc::clone(&plan.topic);
    let limit = running.options.connect_timeout;
    if group {
        consumer.subscribe(&[&topic]).map_err(|e| error::kafka(&format!("subscribe to {topic:?}"), e))?;
    } else {
        let assigner = Arc::clone(&consumer);
        let what = format!("read the partitions of {topic:?}");
        let assign_topic = Arc::clone(&topic);
        let assigned = tokio::task::spawn_blocking(move || assign_at_end(&assigner, &assign_topic, limit));
        let outcome = match tokio::time::timeout(limit + Duration::from_secs(1), assigned).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(join)) => Err(error::join(&what, join)),
            Err(_) => Err(error::timeout(&what, limit)),
        };
        if let Err(error) = outcome {
            let _ = state.close(true).await;
            return Err(error);
        }
    }
    state.pump.spawn(pump(Arc::downgrade(running), Arc::clone(&state), consumer, handler, Arc::clone(&plan)));
    if group {
        let join_limit = running.config.join_timeout;
        let joined = tokio::time::timeout(join_limit, async { joins.wait_for(|n| *n > 0).await.is_ok() }).await;
        if joined != Ok(true) {
            let _ = state.close(true).await;
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "subscribe to {topic:?}: the consumer did not join the group {:?} within {join_limit:?} \
                     (parameter join_timeout_ms)",
                    plan.group_id.as_deref().unwrap_or_default()
                ),
            ));
        }
    }
    Ok(state)
}

/// Assigns every partition of `topic` at its current end (high watermark): messages published
/// after this returns are read, none before. Retries while the topic's metadata is not there yet.
fn assign_at_end(consumer: &KConsumer, topic: &str, limit: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + limit;
    let what = format!("read the partitions of {topic:?}");
    let partitions = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let metadata = consumer.fetch_metadata(Some(topic), left).map_err(|e| error::kafka(&what, e))?;
        let found: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if !found.is_empty() {
            break found;
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{what}: the topic does not exist (and auto_create_topics is off, or it was not created yet)"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut list = TopicPartitionList::new();
    for partition in partitions {
        let left = deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_millis(100));
        let (_, high) = consumer.fetch_watermarks(topic, partition, left).map_err(|e| error::kafka(&what, e))?;
        list.add_partition_offset(topic, partition, Offset::Offset(high)).map_err(|e| error::kafka(&what, e))?;
    }
    consumer.assign(&list).map_err(|e| error::kafka(&format!("assign the partitions of {topic:?}"), e))
}

/// A group id of its own for a broadcast subscriber.
fn unique_group() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("micro-broker-broadcast-{}-{n}-{nanos}", std::process::id())
}

/// One subscription's loop: a record, then its handler. At concurrency 1 the handler runs in
/// this task (a task and a permit per record were a third of the subscriber's instructions);
/// above, each in a task of its own under a concurrency permit.
async fn pump(
    running: Weak<Running>,
    state: Arc<SubState>,
    consumer: Arc<KConsumer>,
    handler: Arc<dyn Handler>,
    plan: Arc<Plan>,
) {
    let inline = plan.options.concurrency == 1;
    let limit = Arc::new(Semaphore::new(plan.options.concurrency));
    loop {
        let permit = if inline {
            None
        } else {
            tokio::select! {
                biased;
                _ = state.stop.cancelled() => break,
                permit = Arc::clone(&limit).acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => break,
                },
            }
        };
        let next = tokio::select! {
            biased;
            _ = state.stop.cancelled() => break,
            next = consumer.recv() => next,
        };
        let record = match next {
            Ok(message) => Record::from_message(&message),
            Err(error) => {
                tracing::debug!(%error, topic = %plan.topic, "kafka broker: consumer error");
                tokio::select! {
                    _ = state.stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                continue;
            }
        };
        state.offsets.received(record.partition, record.offset);
        let key = state.key();
        if inline {
            let delivery = deliver(&running, &state, handler.as_ref(), &plan, record, key);
            tokio::pin!(delivery);
            tokio::select! {
                biased;
                () = &mut delivery => continue,
                () = state.stop.cancelled() => {}
            }
            // Stopping while the handler runs: it finishes, but without this task's handle on the
            // consumer, so that closing the consumer (after the drain timeout) leaves the group.
            drop(consumer);
            delivery.await;
            break;
        }
        let (running, state2, handler, plan) =
            (running.clone(), Arc::clone(&state), Arc::clone(&handler), Arc::clone(&plan));
        state.handlers.spawn(async move {
            deliver(&running, &state2, handler.as_ref(), &plan, record, key).await;
            drop(permit);
        });
    }
}

/// Runs the handler on one record until it is handled, dead-lettered, or the subscription stops
/// (then the record stays uncommitted and is read again by the group's next owner).
async fn deliver(
    running: &Weak<Running>,
    state: &SubState,
    handler: &dyn Handler,
    plan: &Plan,
    record: Record,
    key: usize,
) {
    let Some(envelope) = running.upgrade().map(|r| r.config.envelope) else { return };
    let record_headers = record.headers();
    let message = match decode(record.payload.clone(), record_headers.clone(), envelope) {
        Ok(message) => message,
        Err(error) => {
            // Not readable at all: no handler can take it. Dead-letter it as it came, once.
            let raw = Message::with_headers(record_headers, record.payload.clone());
            let reason = format!("the record could not be decoded: {error}");
            if dead_letter(running, state, &plan.topic, raw, &reason, 1).await {
                state.handled(record.partition, record.offset);
            }
            return;
        }
    };
    let mut attempt: u32 = 1;
    let mut previous: Option<String> = None;
    let mut pause = running.upgrade().map_or(Duration::from_millis(10), |r| r.config.redelivery_backoff);
    loop {
        let settle = Settle::default();
        let mut builder =
            Event::builder(Arc::clone(&plan.topic), message.clone()).attempt(attempt).acknowledger(settle.clone());
        if let Some(reason) = &previous {
            builder = builder.error(Error::new(ErrorKind::Handler, format!("the previous attempt failed: {reason}")));
        }
        let event = builder.build();
        let outcome = scope_handler(key, run_handler(handler, event.clone(), plan.options.auto_ack)).await;
        let failure = match (event.settlement(), outcome) {
            (Some(Settlement::Acked), _) | (None, Ok(())) => None,
            (Some(Settlement::Nacked), _) => {
                Some(lock(&settle.reason).clone().unwrap_or_else(|| "nacked by the handler".to_string()))
            }
            (None, Err(error)) => Some(error.message().to_string()),
        };
        let Some(reason) = failure else { break };
        if plan.options.max_redeliveries.is_some_and(|max| attempt > max) {
            let dead = message
                .clone()
                .with_header(headers::DEAD_LETTER_REASON, reason.as_str())
                .with_header(headers::DELIVERY_ATTEMPTS, attempt.to_string())
                .with_header(headers::ORIGINAL_TOPIC, &*plan.topic);
            if !dead_letter(running, state, &plan.topic, dead, &reason, attempt).await {
                return;
            }
            break;
        }
        tokio::select! {
            biased;
            _ = state.stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        if let Some(running) = running.upgrade() {
            running.counters.redeliveries.fetch_add(1, Ordering::Relaxed);
        }
        pause = (pause * 2).min(MAX_BACKOFF);
        attempt = attempt.saturating_add(1);
        previous = Some(reason);
    }
    state.handled(record.partition, record.offset);
}

/// Publishes `message` (with its dead-letter headers) to `<topic>.dlq`, retrying until it is
/// acknowledged or the subscription stops. True when it was published.
async fn dead_letter(
    running: &Weak<Running>,
    state: &SubState,
    topic: &str,
    message: Message,
    reason: &str,
    attempts: u32,
) -> bool {
    let dlq = format!("{topic}{DLQ_SUFFIX}");
    let mut pause = Duration::from_millis(50);
    loop {
        let Some(current) = running.upgrade() else { return false };
        let sent = async {
            current.admin.ensure(&dlq).await?;
            current.publisher.send(&dlq, message.clone(), None).await
        }
        .await;
        match sent {
            Ok(()) => {
                current.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(topic, attempts, reason, "kafka broker: message dead-lettered to {dlq}");
                return true;
            }
            Err(error) => {
                tracing::warn!(%error, topic, "kafka broker: cannot publish a dead letter; trying again");
            }
        }
        drop(current);
        tokio::select! {
            biased;
            _ = state.stop.cancelled() => return false,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_BACKOFF);
    }
}

/// A subscription of the Kafka broker.
pub(crate) struct KafkaSubscriber {
    pub(crate) topic: String,
    pub(crate) options: SubscribeOptions,
    pub(crate) group_id: Option<String>,
    pub(crate) state: Arc<SubState>,
    pub(crate) running: Weak<Running>,
}

impl fmt::Debug for KafkaSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSubscriber")
            .field("topic", &self.topic)
            .field("group_id", &self.group_id)
            .field("id", &self.state.id)
            .finish()
    }
}

#[async_trait]
impl Subscriber for KafkaSubscriber {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn options(&self) -> &SubscribeOptions {
        &self.options
    }

    fn id(&self) -> Option<&str> {
        self.group_id.as_deref()
    }

    async fn unsubscribe(&self) -> Result<()> {
        if let Some(running) = self.running.upgrade() {
            lock(&running.subs).remove(&self.state.id);
        }
        let own = running_handler_of() == Some(self.state.key());
        self.state.close(!own).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_point_is_the_lowest_unhandled_offset() {
        let offsets = Offsets::default();
        for o in 10..15 {
            offsets.received(0, o);
        }
        assert_eq!(offsets.done(0, 11), Some(10));
        assert_eq!(offsets.done(0, 10), Some(12));
        assert_eq!(offsets.done(0, 14), Some(12));
        assert_eq!(offsets.done(0, 12), Some(13));
        assert_eq!(offsets.done(0, 13), Some(15));
        assert_eq!(offsets.done(0, 13), None, "twice is ignored");
        assert_eq!(offsets.commit_points(), vec![(0, 15)]);
        offsets.received(1, 3);
        offsets.forget(&[1]);
        assert_eq!(offsets.done(1, 3), None, "a revoked partition is not committed");
    }

    #[test]
    fn go_micro_records_merge_headers_over_the_envelope() {
        let value = codec::encode_envelope(&Message::new("hi").with_header("a", "env").with_header("b", "env"), None);
        let mut record_headers = Headers::new();
        record_headers.insert("b".into(), "record".into());
        let message = decode(value, record_headers, Envelope::GoMicro).unwrap();
        assert_eq!(message.body(), b"hi");
        assert_eq!(message.header("a"), Some("env"));
        assert_eq!(message.header("b"), Some("record"));
        let err = decode(Bytes::from_static(b"raw"), Headers::new(), Envelope::GoMicro).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec);
    }
}
