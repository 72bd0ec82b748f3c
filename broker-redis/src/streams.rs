//! Plugin `redis-streams`: `XADD` with approximate `MAXLEN`, consumer groups read with blocking
//! `XREADGROUP` on a connection of their own, `XACK` after success, nack and crashed consumers
//! handled by `XCLAIM` / `XAUTOCLAIM`, dead letters on `<topic>.dlq`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_core::{Acknowledger, Event, Handler, Headers, Message, Result, headers};
use bytes::Bytes;
use redis::Value;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamClaimReply, StreamId, StreamReadReply};
use tokio::sync::{Semaphore, mpsc};

use crate::config::RedisConfig;
use crate::error;
use crate::{BODY_FIELD, Connected, HEADER_PREFIX, SubState};

/// The prefix of the consumer group of a broadcast subscription (one group per subscription).
pub(crate) const BROADCAST_GROUP_PREFIX: &str = "micro-broker.broadcast.";

/// `XADD <topic> MAXLEN ~ <maxlen> * body <body> h:<name> <value> …`.
fn xadd(topic: &str, maxlen: u64, message: &Message) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(topic).arg("MAXLEN").arg("~").arg(maxlen).arg("*").arg(BODY_FIELD).arg(message.body.as_ref());
    for (name, value) in &message.headers {
        cmd.arg(format!("{HEADER_PREFIX}{name}")).arg(value.as_str());
    }
    cmd
}

/// Appends `message` to the stream `topic`, bounded by the publish timeout.
pub(crate) async fn publish(state: &Connected, topic: &str, message: &Message) -> Result<()> {
    let mut conn = state.conn.clone();
    let what = || format!("XADD to {topic:?} on redis at {}", state.config.redacted_url());
    let _id: String = error::bounded_with(
        what,
        state.options.publish_timeout,
        xadd(topic, state.config.maxlen, message).query_async(&mut conn),
    )
    .await?;
    Ok(())
}

/// The message stored in a stream entry's fields.
fn message_of(entry: &StreamId) -> Message {
    let mut headers = Headers::new();
    let mut body = Bytes::new();
    for (field, value) in &entry.map {
        let bytes: &[u8] = match value {
            Value::BulkString(b) => b,
            Value::SimpleString(s) => s.as_bytes(),
            _ => continue,
        };
        if field == BODY_FIELD {
            body = Bytes::copy_from_slice(bytes);
        } else if let Some(name) = field.strip_prefix(HEADER_PREFIX) {
            headers.insert(name.to_string(), String::from_utf8_lossy(bytes).into_owned());
        }
    }
    Message::with_headers(headers, body)
}

/// What a subscription's tasks and acknowledgers share.
struct Group {
    topic: String,
    group: String,
    consumer: String,
    conn: ConnectionManager,
    config: RedisConfig,
    call_timeout: Duration,
    max_redeliveries: Option<u32>,
    retries: mpsc::UnboundedSender<Retry>,
}

/// A nacked delivery, to be delivered again or dead-lettered.
struct Retry {
    id: String,
    attempt: u32,
    reason: String,
    message: Message,
}

impl Group {
    fn what(&self, op: &str) -> String {
        format!("{op} on stream {:?} (group {:?}) at {}", self.topic, self.group, self.config.redacted_url())
    }

    /// `XGROUP CREATE <topic> <group> $ MKSTREAM`; an existing group is fine.
    async fn ensure_group(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("XGROUP").arg("CREATE").arg(&self.topic).arg(&self.group).arg("$").arg("MKSTREAM").clone();
        match tokio::time::timeout(self.call_timeout, cmd.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if error::is_busy_group(&e) => Ok(()),
            Ok(Err(e)) => Err(error::map(&self.what("XGROUP CREATE"), e)),
            Err(_) => Err(error::timeout(&self.what("XGROUP CREATE"), self.call_timeout)),
        }
    }

    async fn ack(&self, id: &str) -> Result<()> {
        self.ack_many(std::slice::from_ref(&id)).await
    }

    /// One `XACK <topic> <group> <id> <id> …`.
    async fn ack_many<S: AsRef<str>>(&self, ids: &[S]) -> Result<()> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.topic).arg(&self.group);
        for id in ids {
            cmd.arg(id.as_ref());
        }
        let _n: i64 = error::bounded_with(|| self.what("XACK"), self.call_timeout, cmd.query_async(&mut conn)).await?;
        Ok(())
    }

    /// Copies the message to `<topic>.dlq` with the dead-letter headers, then acks the entry.
    async fn dead_letter(&self, id: &str, mut message: Message, attempts: u32, reason: &str) -> Result<()> {
        let dlq = format!("{}.dlq", self.topic);
        message.headers.insert(headers::DEAD_LETTER_REASON.into(), reason.to_string());
        message.headers.insert(headers::ORIGINAL_TOPIC.into(), self.topic.clone());
        message.headers.insert(headers::DELIVERY_ATTEMPTS.into(), attempts.to_string());
        let mut conn = self.conn.clone();
        let _id: String = error::bounded(
            &self.what("XADD to the dead-letter stream"),
            self.call_timeout,
            xadd(&dlq, self.config.maxlen, &message).query_async(&mut conn),
        )
        .await?;
        tracing::warn!(topic = %self.topic, %id, attempts, reason, "redis-streams: message dead-lettered to {dlq}");
        self.ack(id).await
    }

    /// Claims `id` for this consumer now (a nack): the entry, or `None` if it is gone (trimmed).
    async fn claim_now(&self, id: &str) -> Result<Option<StreamId>> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("XCLAIM").arg(&self.topic).arg(&self.group).arg(&self.consumer).arg(0).arg(id).clone();
        let reply: StreamClaimReply =
            error::bounded(&self.what("XCLAIM"), self.call_timeout, cmd.query_async(&mut conn)).await?;
        Ok(reply.ids.into_iter().next())
    }

    /// Claims entries idle longer than `claim_idle` (their consumer died or was too slow), with
    /// how many times each was delivered (this claim included).
    async fn autoclaim(&self) -> Result<Vec<(StreamId, u32)>> {
        let mut conn = self.conn.clone();
        let idle = u64::try_from(self.config.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let cmd = redis::cmd("XAUTOCLAIM")
            .arg(&self.topic)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(idle)
            .arg("0-0")
            .arg("COUNT")
            .arg(self.config.read_count)
            .clone();
        let reply: StreamAutoClaimReply =
            error::bounded(&self.what("XAUTOCLAIM"), self.call_timeout, cmd.query_async(&mut conn)).await?;
        let mut out = Vec::with_capacity(reply.claimed.len());
        for entry in reply.claimed {
            let pending =
                redis::cmd("XPENDING").arg(&self.topic).arg(&self.group).arg(&entry.id).arg(&entry.id).arg(1).clone();
            let rows: Vec<(String, String, u64, u64)> =
                error::bounded(&self.what("XPENDING"), self.call_timeout, pending.query_async(&mut conn)).await?;
            let delivered = rows.first().map_or(1, |row| row.3);
            out.push((entry, u32::try_from(delivered).unwrap_or(u32::MAX)));
        }
        Ok(out)
    }
}

/// Settles one delivery: ack = hand the id to the subscription's acker (which sends the acks
/// of many deliveries in one `XACK`), nack = hand it to the retry task.
struct StreamAck {
    group: Arc<Group>,
    acks: mpsc::UnboundedSender<String>,
    id: String,
    attempt: u32,
    message: Message,
}

#[async_trait]
impl Acknowledger for StreamAck {
    async fn ack(&self) -> Result<()> {
        // Queued: the acker sends it with the others queued meanwhile. An ack lost to a failure
        // leaves the entry pending, and XAUTOCLAIM delivers it again (at-least-once). Once the
        // acker has stopped, the ack goes out directly.
        match self.acks.send(self.id.clone()) {
            Ok(()) => Ok(()),
            Err(_) => self.group.ack(&self.id).await,
        }
    }

    async fn nack(&self, reason: &str) -> Result<()> {
        let retry = Retry {
            id: self.id.clone(),
            attempt: self.attempt,
            reason: reason.to_string(),
            message: self.message.clone(),
        };
        // When the subscription is gone the entry stays pending: another member claims it later.
        let _ = self.group.retries.send(retry);
        Ok(())
    }
}

/// Runs deliveries with the subscription's concurrency limit.
#[derive(Clone)]
struct Dispatcher {
    sub: Arc<SubState>,
    group: Arc<Group>,
    handler: Arc<dyn Handler>,
    permits: Arc<Semaphore>,
    acks: mpsc::UnboundedSender<String>,
}

impl Dispatcher {
    /// Waits for a free slot, then runs the handler on the entry. False when the subscription stopped.
    async fn dispatch(&self, entry: &StreamId, attempt: u32) -> bool {
        let message = message_of(entry);
        let permit = tokio::select! {
            _ = self.sub.cancel.cancelled() => return false,
            permit = Arc::clone(&self.permits).acquire_owned() => match permit { Ok(p) => p, Err(_) => return false },
        };
        let ack = StreamAck {
            group: Arc::clone(&self.group),
            acks: self.acks.clone(),
            id: entry.id.clone(),
            attempt,
            message: message.clone(),
        };
        let event = Event::builder(self.sub.topic.as_str(), message).attempt(attempt).acknowledger(ack).build();
        let auto_ack = self.sub.options.auto_ack;
        if self.sub.options.concurrency == 1 {
            // One handler at a time: run it here (no task per delivery). The permit still keeps
            // the reader and the retry task from running two at once. An unsubscribe from inside
            // the handler does not wait for the subscription's tasks, so it cannot wait for this one.
            let run = broker_core::run_handler(self.handler.as_ref(), event, auto_ack);
            if let Err(e) = broker_core::scope_handler(self.sub.key(), run).await {
                tracing::debug!(error = %e, "redis-streams handler failed");
            }
            drop(permit);
            return true;
        }
        let handler = Arc::clone(&self.handler);
        self.sub.tracker.spawn(broker_core::scope_handler(self.sub.key(), async move {
            if let Err(e) = broker_core::run_handler(handler.as_ref(), event, auto_ack).await {
                tracing::debug!(error = %e, "redis-streams handler failed");
            }
            drop(permit);
        }));
        true
    }
}

/// A connection for blocking reads: multiplexed, without the client's default response timeout
/// (each read is bounded by `BLOCK` plus the connect timeout instead).
async fn reader_connection(client: &redis::Client, limit: Duration, what: &str) -> Result<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new().set_connection_timeout(Some(limit)).set_response_timeout(None);
    match tokio::time::timeout(limit, client.get_multiplexed_async_connection_with_config(&config)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(error::connection(what, e)),
        Err(_) => Err(error::timeout(what, limit)),
    }
}

/// Creates the group (live when this returns), then starts the reader and the retry/claim task.
pub(crate) async fn start(state: &Arc<Connected>, sub: &Arc<SubState>, handler: Arc<dyn Handler>) -> Result<()> {
    let broadcast = sub.options.queue.is_none();
    let group_name = sub.options.queue.clone().unwrap_or_else(|| format!("{BROADCAST_GROUP_PREFIX}{}", sub.id));
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel();
    let group = Arc::new(Group {
        topic: sub.topic.clone(),
        group: group_name,
        consumer: sub.id.clone(),
        conn: state.conn.clone(),
        config: state.config.clone(),
        call_timeout: state.options.publish_timeout,
        max_redeliveries: sub.options.max_redeliveries,
        retries: retry_tx,
    });
    let what = group.what("cannot open a reading connection");
    let reader = reader_connection(&state.client, state.options.connect_timeout, &what).await?;
    group.ensure_group().await?;

    // Cleanup at unsubscribe: a broadcast group is destroyed (and its stream deleted when no group
    // is left); a queue-group member is removed when it has nothing pending.
    {
        let group = Arc::clone(&group);
        *crate::lock(&sub.cleanup) = Some(Box::pin(async move {
            let script = if broadcast {
                "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
                 redis.pcall('XGROUP', 'DESTROY', KEYS[1], ARGV[1]) \
                 local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1]) \
                 if type(groups) == 'table' and #groups == 0 then redis.call('DEL', KEYS[1]) end \
                 return 1"
            } else {
                "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
                 local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) \
                 if type(p) == 'table' and #p == 0 then redis.pcall('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end \
                 return 1"
            };
            let mut conn = group.conn.clone();
            let cmd =
                redis::cmd("EVAL").arg(script).arg(1).arg(&group.topic).arg(&group.group).arg(&group.consumer).clone();
            if let Err(e) =
                error::bounded(&group.what("cleanup"), group.call_timeout, cmd.query_async::<i64>(&mut conn)).await
            {
                tracing::debug!(error = %e, "redis-streams: cleanup at unsubscribe failed");
            }
        }));
    }

    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let dispatcher = Dispatcher {
        sub: Arc::clone(sub),
        group: Arc::clone(&group),
        handler,
        permits: Arc::new(Semaphore::new(sub.options.concurrency)),
        acks: ack_tx,
    };
    sub.tracker.spawn(acker(Arc::clone(sub), Arc::clone(&group), ack_rx));

    // The reader: XREADGROUP ... BLOCK ... >, reconnecting after a loss.
    {
        let d = dispatcher.clone();
        let client = state.client.clone();
        let connect_timeout = state.options.connect_timeout;
        sub.tracker.spawn(async move {
            let g = &d.group;
            let block_ms = u64::try_from(g.config.block.as_millis()).unwrap_or(1000);
            let limit = g.config.block + connect_timeout;
            let mut backoff = Duration::from_millis(50);
            let mut conn = Some(reader);
            let mut recover_pending = false;
            let mut recovered_up_to: Option<String> = None;
            loop {
                if d.sub.cancel.is_cancelled() {
                    return;
                }
                let Some(c) = conn.as_mut() else {
                    if crate::sleep_or_cancel(&d.sub.cancel, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    match reader_connection(&client, connect_timeout, &g.what("reconnect")).await {
                        Ok(c) => match g.ensure_group().await {
                            Ok(()) => {
                                tracing::info!(topic = %g.topic, group = %g.group, "redis-streams reader reconnected");
                                backoff = Duration::from_millis(50);
                                conn = Some(c);
                                recover_pending = true;
                                recovered_up_to = None;
                            }
                            Err(e) => tracing::debug!(error = %e, "redis-streams: group check after reconnect failed"),
                        },
                        Err(e) => tracing::debug!(error = %e, "redis-streams: reconnect failed"),
                    }
                    continue;
                };
                // After a reconnect, first this consumer's own pending entries (`0`): a read
                // whose reply was lost with the connection left them delivered but never seen.
                let (from, attempt) = if recover_pending {
                    (recovered_up_to.clone().unwrap_or_else(|| "0".to_string()), 2)
                } else {
                    (">".to_string(), 1)
                };
                let cmd = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&g.group)
                    .arg(&g.consumer)
                    .arg("COUNT")
                    .arg(g.config.read_count)
                    .arg("BLOCK")
                    .arg(block_ms)
                    .arg("STREAMS")
                    .arg(&g.topic)
                    .arg(from)
                    .clone();
                let read = tokio::select! {
                    _ = d.sub.cancel.cancelled() => return,
                    read = tokio::time::timeout(limit, cmd.query_async::<Option<StreamReadReply>>(c)) => read,
                };
                match read {
                    Ok(Ok(Some(reply))) => {
                        let mut count = 0;
                        for key in reply.keys {
                            for entry in key.ids {
                                count += 1;
                                if recover_pending {
                                    if entry.map.is_empty() {
                                        // Pending, but trimmed from the stream meanwhile.
                                        let _ = g.ack(&entry.id).await;
                                        continue;
                                    }
                                    recovered_up_to = Some(entry.id.clone());
                                }
                                if !d.dispatch(&entry, attempt).await {
                                    return;
                                }
                            }
                        }
                        if recover_pending && count == 0 {
                            recover_pending = false;
                        }
                    }
                    Ok(Ok(None)) => recover_pending = false,
                    Ok(Err(e)) if error::is_no_group(&e) => {
                        tracing::warn!(topic = %g.topic, group = %g.group, "redis-streams: group missing (server restarted without its data?); creating it again");
                        if let Err(e) = g.ensure_group().await {
                            tracing::debug!(error = %e, "redis-streams: creating the group again failed");
                            conn = None;
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(topic = %g.topic, error = %e, "redis-streams: read failed; reconnecting");
                        conn = None;
                    }
                    Err(_) => {
                        tracing::warn!(topic = %g.topic, "redis-streams: read not answered in time; reconnecting");
                        conn = None;
                    }
                }
            }
        });
    }

    // The retry task: nacked deliveries (claimed back at once, or dead-lettered past
    // max_redeliveries) and, periodically, entries other consumers left pending (XAUTOCLAIM).
    {
        let d = dispatcher;
        sub.tracker.spawn(async move {
            let g = &d.group;
            let period = (g.config.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = d.sub.cancel.cancelled() => return,
                    retry = retry_rx.recv() => {
                        let Some(retry) = retry else { return };
                        if g.max_redeliveries.is_some_and(|max| retry.attempt > max) {
                            if let Err(e) = g.dead_letter(&retry.id, retry.message, retry.attempt, &retry.reason).await {
                                tracing::warn!(error = %e, "redis-streams: dead-lettering failed; the entry stays pending");
                            }
                            continue;
                        }
                        match g.claim_now(&retry.id).await {
                            Ok(Some(entry)) => {
                                if !d.dispatch(&entry, retry.attempt.saturating_add(1)).await {
                                    return;
                                }
                            }
                            Ok(None) => {
                                tracing::warn!(id = %retry.id, "redis-streams: a nacked entry is gone from the stream (trimmed); acking it");
                                let _ = g.ack(&retry.id).await;
                            }
                            Err(e) => tracing::warn!(error = %e, "redis-streams: claiming a nacked entry failed; it is claimed again after the idle timeout"),
                        }
                    }
                    _ = tick.tick() => {
                        match g.autoclaim().await {
                            Ok(claimed) => {
                                for (entry, delivered) in claimed {
                                    let done = delivered.saturating_sub(1);
                                    if g.max_redeliveries.is_some_and(|max| done > max) {
                                        let reason = format!("not acknowledged within {:?} after {done} deliveries", g.config.claim_idle);
                                        if let Err(e) = g.dead_letter(&entry.id, message_of(&entry), done, &reason).await {
                                            tracing::warn!(error = %e, "redis-streams: dead-lettering failed");
                                        }
                                    } else if !d.dispatch(&entry, delivered.max(1)).await {
                                        return;
                                    }
                                }
                            }
                            Err(e) => tracing::debug!(error = %e, "redis-streams: XAUTOCLAIM failed"),
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

/// Most entry ids in one `XACK`.
const ACK_BATCH: usize = 512;

/// Sends the acks queued by the handlers, all those queued meanwhile in one `XACK`, so that a
/// handler does not wait for its ack's round trip before the next delivery. Once the subscription
/// is stopping it waits until the reader, the retry task and the handlers are done, sends what
/// they queued, and ends: stop() (unsubscribe, disconnect) waits for it, so their acks are out
/// before it returns.
async fn acker(sub: Arc<SubState>, group: Arc<Group>, mut acks: mpsc::UnboundedReceiver<String>) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    loop {
        tokio::select! {
            biased;
            n = acks.recv_many(&mut batch, ACK_BATCH) => if n == 0 {
                return;
            },
            _ = sub.cancel.cancelled() => {
                // The other tasks of the subscription finish (this one is the last in the tracker).
                while sub.tracker.len() > 1 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                while let Ok(id) = acks.try_recv() {
                    batch.push(id);
                }
                for chunk in batch.chunks(ACK_BATCH) {
                    send_acks(&group, chunk).await;
                }
                return;
            }
        }
        send_acks(&group, &batch).await;
        batch.clear();
    }
}

async fn send_acks(group: &Group, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    if let Err(e) = group.ack_many(ids).await {
        tracing::warn!(error = %e, count = ids.len(), "redis-streams: XACK failed; the entries stay pending and are delivered again after the idle timeout");
    }
}
