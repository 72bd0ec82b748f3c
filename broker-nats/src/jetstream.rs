//! JetStream mode (`jetstream=true`): streams per first topic segment, pull consumers, acks after
//! the handler, nack with backoff, dead letters to `<topic>.dlq`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{AckKind, stream};
use async_trait::async_trait;
use broker_core::codec::Envelope;
use broker_core::{Acknowledger, Error, ErrorKind, Event, Handler, Message, Result, SubscribeOptions, headers};
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;

use crate::wire::{self, Outgoing};
use crate::{Counters, Running, Step, SubState, error, lock};

/// The JetStream context; only called in JetStream mode.
fn context(running: &Running) -> Result<&async_nats::jetstream::Context> {
    running.js.as_ref().ok_or_else(|| Error::new(ErrorKind::Backend, "JetStream is not enabled on this broker"))
}

/// Letters, digits, `_` and `-` only; anything else becomes `_` and a hash keeps names apart.
pub(crate) fn sanitize(name: &str) -> String {
    let clean: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    if clean == name { clean } else { format!("{clean}_{:08x}", fnv(name) as u32) }
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The first segment of `topic`: its stream's subjects are `<segment>` and `<segment>.>`.
fn first_segment(topic: &str) -> &str {
    topic.split('.').next().unwrap_or(topic)
}

/// The stream of `topic` and its first segment.
pub(crate) fn stream_of(prefix: &str, topic: &str) -> (String, String) {
    let segment = first_segment(topic).to_string();
    (format!("{prefix}{}", sanitize(&segment)), segment)
}

/// Creates the stream of `topic` if it does not exist yet; returns its name.
pub(crate) async fn ensure_stream(running: &Running, topic: &str) -> Result<Arc<str>> {
    // Known streams by first segment: a publish finds its stream without building its name
    // (sanitizing and formatting it cost more than the rest of preparing the publish).
    if let Some(name) = lock(&running.streams).get(first_segment(topic)) {
        return Ok(Arc::clone(name));
    }
    let (name, segment) = stream_of(&running.config.stream_prefix, topic);
    let js = context(running)?;
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![segment.clone(), format!("{segment}.>")],
        max_messages: running.config.stream_max_msgs,
        max_bytes: running.config.stream_max_bytes,
        max_age: running.config.stream_max_age,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let timeout = running.options.publish_timeout;
    let created = tokio::time::timeout(timeout, js.get_or_create_stream(config))
        .await
        .map_err(|_| error::timeout(&format!("creating JetStream stream {name}"), timeout))?;
    if let Err(create_error) = created {
        // Another process may have created it at the same moment.
        match tokio::time::timeout(timeout, js.get_stream(&name)).await {
            Ok(Ok(_)) => {}
            _ => {
                return Err(error::backend(
                    &format!("creating JetStream stream {name} for subjects {segment:?} and \"{segment}.>\""),
                    create_error,
                ));
            }
        }
    }
    let name: Arc<str> = Arc::from(name);
    lock(&running.streams).insert(segment, Arc::clone(&name));
    Ok(name)
}

/// Publishes to `subject` (the subject of `topic`) and waits for the stream's acknowledgement.
pub(crate) async fn publish(running: &Running, subject: async_nats::Subject, topic: &str, out: Outgoing) -> Result<()> {
    ensure_stream(running, topic).await?;
    let js = context(running)?;
    send(js, subject, topic, out, running.options.publish_timeout).await
}

async fn send(
    js: &async_nats::jetstream::Context,
    subject: async_nats::Subject,
    topic: &str,
    out: Outgoing,
    timeout: Duration,
) -> Result<()> {
    tokio::time::timeout(timeout, async {
        let ack = match out.headers {
            Some(headers) => js.publish_with_headers(subject, headers, out.payload).await,
            None => js.publish(subject, out.payload).await,
        }
        .map_err(|e| error::jetstream_publish(e, topic))?;
        ack.await.map_err(|e| error::jetstream_publish(e, topic))?;
        Ok(())
    })
    .await
    .map_err(|_| error::timeout(&format!("JetStream publish to {topic:?}"), timeout))?
}

/// Creates the subscription's consumer and starts its pump.
pub(crate) async fn subscribe(
    running: &Arc<Running>,
    topic: &str,
    handler: Arc<dyn Handler>,
    options: &SubscribeOptions,
    state: &Arc<SubState>,
) -> Result<()> {
    let stream_name = ensure_stream(running, topic).await?;
    let js = context(running)?;
    let timeout = running.options.publish_timeout;
    let stream = tokio::time::timeout(timeout, js.get_stream(&stream_name))
        .await
        .map_err(|_| error::timeout(&format!("looking up JetStream stream {stream_name}"), timeout))?
        .map_err(|e| error::backend(&format!("looking up JetStream stream {stream_name}"), e))?;
    let mut config = pull::Config {
        filter_subject: topic.to_string(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: running.config.ack_wait,
        deliver_policy: DeliverPolicy::New,
        max_deliver: -1,
        max_ack_pending: ((options.concurrency as i64) * 64).max(1024),
        ..Default::default()
    };
    let consumer = match &options.queue {
        Some(group) => {
            let name = format!("{}_{:016x}", sanitize(group), fnv(topic));
            config.durable_name = Some(name.clone());
            tokio::time::timeout(timeout, stream.get_or_create_consumer(&name, config))
                .await
                .map_err(|_| error::timeout(&format!("creating JetStream consumer {name}"), timeout))?
                .map_err(|e| error::backend(&format!("creating durable JetStream consumer {name}"), e))?
        }
        None => {
            config.inactive_threshold = Duration::from_secs(300);
            let mut consumer: async_nats::jetstream::consumer::PullConsumer =
                tokio::time::timeout(timeout, stream.create_consumer(config))
                    .await
                    .map_err(|_| error::timeout(&format!("creating a JetStream consumer for {topic:?}"), timeout))?
                    .map_err(|e| error::backend(&format!("creating a JetStream consumer for {topic:?}"), e))?;
            let name = consumer.cached_info().name.clone();
            *lock(&state.ephemeral) = Some((stream_name.to_string(), name));
            let _ = &mut consumer;
            consumer
        }
    };
    let pump = pump(
        consumer,
        Arc::clone(state),
        handler,
        options.clone(),
        topic.into(),
        Arc::new(Shared {
            js: js.clone(),
            envelope: running.config.envelope,
            counters: Arc::clone(&running.counters),
            timeout,
        }),
        running.config.ack_wait,
    );
    state.pump.spawn(pump);
    Ok(())
}

/// What every acknowledger of a subscription needs.
#[derive(Clone)]
struct Shared {
    js: async_nats::jetstream::Context,
    envelope: Envelope,
    counters: Arc<Counters>,
    timeout: Duration,
}

/// How long one pull request waits for messages before the pump asks again. Short, so that a
/// request lost in a reconnection (or a stalled long-lived pull) costs at most this long.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// The most messages one pull request asks for.
const MAX_BATCH: usize = 256;

/// Awaits `future` bounded by `timeout`, registering a timer only if it is not ready at once
/// (a message already received, an ack with room in the client's channel: the usual case).
async fn bounded<F: std::future::Future>(timeout: Duration, future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match futures::poll!(future.as_mut()) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => tokio::time::timeout(timeout, future).await.ok(),
    }
}

/// The pull requests of one subscription. One request at a time: the server shares messages
/// among a consumer's waiting requests in turn, so two in flight would deliver out of order.
/// Each costs a round trip to the server, so the request size grows (from `min`, doubling, up
/// to [`MAX_BATCH`]) while batches come back full and their messages are handled fast enough that
/// a whole batch takes well under `ack_wait` (pulled messages wait their turn unacknowledged:
/// a batch handled slower than `ack_wait` would be redelivered while still queued here). It
/// falls back to `min` after a batch that was not full (no backlog) or took too long.
struct Puller {
    current: Option<pull::Batch>,
    min: usize,
    size: usize,
    /// Messages taken from `current`, and when it was requested.
    taken: usize,
    since: tokio::time::Instant,
    ack_wait: Duration,
}

impl Puller {
    fn new(min: usize, ack_wait: Duration) -> Self {
        Puller { current: None, min, size: min, taken: 0, since: tokio::time::Instant::now(), ack_wait }
    }

    /// The batch in `current` ended (complete or expired): size the next request.
    fn ended(&mut self) {
        let full = self.taken >= self.size;
        let fast = self.since.elapsed() * 4 < self.ack_wait;
        self.size = if full && fast { (self.size * 2).min(MAX_BATCH.max(self.min)) } else { self.min };
        self.current = None;
    }

    /// The next message of `consumer`, pulling a new batch whenever the current one is done.
    /// Cancel-safe: the batch lives in `self`.
    async fn next(
        &mut self,
        consumer: &async_nats::jetstream::consumer::PullConsumer,
        timeout: Duration,
    ) -> std::result::Result<async_nats::jetstream::Message, String> {
        loop {
            let batch = match &mut self.current {
                Some(batch) => batch,
                None => {
                    let request = consumer.batch().max_messages(self.size).expires(PULL_EXPIRES).messages();
                    match tokio::time::timeout(timeout, request).await {
                        Ok(Ok(batch)) => {
                            self.taken = 0;
                            self.since = tokio::time::Instant::now();
                            self.current.insert(batch)
                        }
                        Ok(Err(error)) => return Err(format!("pull request failed: {error}")),
                        Err(_) => return Err(format!("pull request not sent within {timeout:?}")),
                    }
                }
            };
            match bounded(PULL_EXPIRES + timeout, batch.next()).await {
                Some(Some(Ok(message))) => {
                    self.taken += 1;
                    return Ok(message);
                }
                Some(Some(Err(error))) => {
                    self.current = None;
                    self.size = self.min;
                    return Err(error.to_string());
                }
                // Expired or complete: ask again.
                Some(None) => self.ended(),
                None => {
                    self.current = None;
                    self.size = self.min;
                    return Err("a pull request was not answered in time".to_string());
                }
            }
        }
    }
}

async fn pump(
    consumer: async_nats::jetstream::consumer::PullConsumer,
    state: Arc<SubState>,
    handler: Arc<dyn Handler>,
    options: SubscribeOptions,
    topic: Arc<str>,
    shared: Arc<Shared>,
    ack_wait: Duration,
) {
    // Concurrency 1 runs each handler inline (see `SubState::dispatch`): nothing to limit.
    let limit = (!state.inline).then(|| Arc::new(Semaphore::new(options.concurrency)));
    let mut puller = Puller::new((options.concurrency * 8).clamp(8, MAX_BATCH), ack_wait);
    // Made once, not per message: each registers with its token's waiter list when made.
    let mut stop = std::pin::pin!(state.stop.cancelled());
    let mut drain = std::pin::pin!(state.drain.cancelled());
    loop {
        let permit = match &limit {
            None => None,
            Some(limit) => tokio::select! {
                biased;
                _ = &mut stop => break,
                _ = &mut drain => break,
                permit = Arc::clone(limit).acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => break,
                },
            },
        };
        let step = tokio::select! {
            biased;
            _ = &mut stop => Step::Stop,
            _ = &mut drain => Step::Drain,
            message = puller.next(&consumer, shared.timeout) => Step::Item(message),
        };
        let message = match step {
            // Prefetched, unacknowledged messages are redelivered after ack_wait.
            Step::Stop | Step::Drain => break,
            Step::Item(Ok(message)) => message,
            Step::Item(Err(error)) => {
                shared.counters.consumer_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%topic, %error, "nats broker: JetStream consumer error; continuing");
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let attempt = delivered(message.reply.as_deref()).map_or(1, |n| n.clamp(1, u64::from(u32::MAX)) as u32);
        let decoded = match wire::decode(message.headers.as_ref(), message.payload.clone(), shared.envelope) {
            Ok(decoded) => decoded,
            Err(error) => {
                shared.counters.codec_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%topic, %error, "nats broker: a message did not decode; the handler was not called, the message is terminated");
                let _ = bounded(shared.timeout, message.ack_with(AckKind::Term)).await;
                continue;
            }
        };
        // Kept beside the event only when a dead letter may need it (a copy of the headers).
        let kept = options.max_redeliveries.map(|_| decoded.clone());
        let mut event = Event::builder(Arc::clone(&topic), decoded).attempt(attempt);
        if attempt > 1 {
            event = event.error(Error::new(ErrorKind::Handler, "an earlier delivery of this message failed"));
        }
        let event = event
            .acknowledger(JetStreamAck {
                message,
                decoded: kept,
                topic: Arc::clone(&topic),
                attempt,
                max_redeliveries: options.max_redeliveries,
                shared: Arc::clone(&shared),
            })
            .build();
        state.dispatch(&handler, event, options.auto_ack, permit, None).await;
    }
    // Messages prefetched but not handed to the handler go back at once (a queue group's other
    // members take them) instead of waiting for ack_wait. Ones still on the way wait for ack_wait.
    while let Some(batch) = puller.current.as_mut() {
        let Some(Some(Ok(message))) = batch.next().now_or_never() else { break };
        let _ = bounded(shared.timeout, message.ack_with(AckKind::Nak(None))).await;
    }
}

/// 20 ms before the first redelivery, doubling, at most 5 s.
fn backoff(attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(12);
    Duration::from_millis(20u64 << exponent).min(Duration::from_secs(5))
}

struct JetStreamAck {
    message: async_nats::jetstream::Message,
    /// The decoded message, for a dead letter (kept only with `max_redeliveries`).
    decoded: Option<Message>,
    topic: Arc<str>,
    attempt: u32,
    max_redeliveries: Option<u32>,
    /// Shared by the subscription's events: one reference count each, not a copy of the context.
    shared: Arc<Shared>,
}

impl JetStreamAck {
    async fn settle(&self, kind: AckKind) -> Result<()> {
        bounded(self.shared.timeout, self.message.ack_with(kind))
            .await
            .ok_or_else(|| error::timeout("acknowledging a JetStream message", self.shared.timeout))?
            .map_err(|e| Error::new(ErrorKind::Connection, format!("acknowledging a JetStream message: {e}")))
    }

    async fn dead_letter(&self, reason: &str) -> Result<()> {
        let dlq = format!("{}.dlq", self.topic);
        let Some(decoded) = &self.decoded else {
            return Err(Error::new(ErrorKind::Backend, "no copy of the message was kept for a dead letter"));
        };
        let message = decoded
            .clone()
            .with_header(headers::DEAD_LETTER_REASON, reason)
            .with_header(headers::DELIVERY_ATTEMPTS, self.attempt.to_string())
            .with_header(headers::ORIGINAL_TOPIC, self.topic.to_string());
        let out = wire::encode(&dlq, message, self.shared.envelope)?;
        send(&self.shared.js, async_nats::Subject::from(dlq.as_str()), &dlq, out, self.shared.timeout).await?;
        self.shared.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(topic = %self.topic, %dlq, reason, attempts = self.attempt, "nats broker: dead-lettered");
        Ok(())
    }
}

#[async_trait]
impl Acknowledger for JetStreamAck {
    async fn ack(&self) -> Result<()> {
        self.settle(AckKind::Ack).await
    }

    async fn nack(&self, reason: &str) -> Result<()> {
        let redeliveries_so_far = self.attempt.saturating_sub(1);
        if self.max_redeliveries.is_some_and(|max| redeliveries_so_far >= max) {
            match self.dead_letter(reason).await {
                Ok(()) => return self.settle(AckKind::Term).await,
                Err(error) => {
                    tracing::warn!(%error, topic = %self.topic, "nats broker: dead-lettering failed; redelivering");
                    self.settle(AckKind::Nak(Some(backoff(self.attempt)))).await?;
                    return Err(error);
                }
            }
        }
        self.settle(AckKind::Nak(Some(backoff(self.attempt)))).await
    }
}

/// Deletes an ephemeral consumer (best effort: it expires by itself after its inactivity threshold).
pub(crate) async fn delete_consumer(running: &Running, stream: &str, consumer: &str) {
    let Some(js) = running.js.as_ref() else { return };
    let timeout = running.options.publish_timeout.min(Duration::from_secs(2));
    if let Ok(Err(error)) = tokio::time::timeout(timeout, js.delete_consumer_from_stream(consumer, stream)).await {
        tracing::debug!(%error, stream, consumer, "nats broker: deleting an ephemeral consumer failed");
    }
}

/// How many times the server has delivered a message, this time included, read from its reply
/// subject as `Message::info` reads it (ADR-15: after `$JS.ACK.`, either `<stream>.<consumer>.
/// <delivered>` and 4 more tokens, or `<domain>.<account hash>.<stream>.<consumer>.<delivered>`
/// and 4 or more), without parsing the rest: `info` also parses the publish time, which made it
/// ~1,250 instructions per message more.
fn delivered(reply: Option<&str>) -> Option<u64> {
    let tokens = reply?.strip_prefix("$JS.ACK.")?;
    let index = match tokens.bytes().filter(|&b| b == b'.').count() + 1 {
        7 => 2,
        n if n >= 9 => 4,
        _ => return None,
    };
    tokens.split('.').nth(index)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        assert_eq!(stream_of("MICRO_", "orders.created"), ("MICRO_orders".to_string(), "orders".to_string()));
        assert_eq!(stream_of("P", "single").0, "Psingle");
        let (odd, segment) = stream_of("MICRO_", "é/x.y");
        assert_eq!(segment, "é/x");
        assert!(odd.starts_with("MICRO___x_") && odd.len() > "MICRO___x_".len(), "{odd}");
        assert_ne!(sanitize("a/b"), sanitize("a_b"));
    }

    #[test]
    fn delivery_count_from_the_reply_subject() {
        // The original form (7 tokens after the prefix) and ADR-15's (9, or more with a token).
        assert_eq!(delivered(Some("$JS.ACK.S.C.3.10.7.1700000000000000000.0")), Some(3));
        assert_eq!(delivered(Some("$JS.ACK._.HASH.S.C.4.10.7.1700000000000000000.0")), Some(4));
        assert_eq!(delivered(Some("$JS.ACK.dom.HASH.S.C.5.10.7.1700000000000000000.0.tok.more")), Some(5));
        for unreadable in [None, Some("_INBOX.x"), Some("$JS.ACK.S.C.3.10.7.1.0.8"), Some("$JS.ACK.S.C.x.1.1.1.0")] {
            assert_eq!(delivered(unreadable), None, "{unreadable:?}");
        }
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert_eq!(backoff(1), Duration::from_millis(20));
        assert_eq!(backoff(2), Duration::from_millis(40));
        assert_eq!(backoff(100), Duration::from_secs(5));
    }
}
