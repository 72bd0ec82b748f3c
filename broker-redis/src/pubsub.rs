//! Plugin `redis`: `PUBLISH` / `SUBSCRIBE` with Go Micro's JSON envelope as the payload.

use std::sync::Arc;
use std::time::Duration;

use broker_core::{Error, Event, Handler, Message, Result, codec};
use futures::StreamExt;
use redis::RedisWrite as _;
use tokio::sync::Semaphore;

use crate::error;

/// How often an idle subscribed connection is checked with a PING.
const KEEPALIVE: Duration = Duration::from_secs(5);
use crate::{Connected, SubState};

/// `PUBLISH <topic> <envelope>`, bounded by the publish timeout.
pub(crate) async fn publish(state: &Connected, topic: &str, message: &Message) -> Result<()> {
    // The envelope is written straight into the command's buffer, sized up front: no envelope
    // built apart and copied, no buffer regrowth.
    let envelope_len = codec::envelope_len(message, None);
    let mut cmd = redis::Cmd::with_capacity(3, "PUBLISH".len() + topic.len() + envelope_len);
    cmd.arg("PUBLISH").arg(topic);
    codec::write_envelope(&mut cmd.writer_for_next_arg(), message, None)
        .map_err(|e| Error::codec(format!("cannot encode the envelope: {e}")))?;
    let mut conn = state.conn.clone();
    let what = || format!("PUBLISH to {topic:?} on redis at {}", state.config.redacted_url());
    let _receivers: i64 = error::bounded_with(what, state.options.publish_timeout, cmd.query_async(&mut conn)).await?;
    Ok(())
}

/// A `SUBSCRIBE`d connection of its own, bounded by the connect timeout.
async fn subscribed(client: &redis::Client, topic: &str, limit: Duration, address: &str) -> Result<redis::aio::PubSub> {
    let what = format!("cannot subscribe to {topic:?} on redis at {address}");
    let mut pubsub = match tokio::time::timeout(limit, client.get_async_pubsub()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(error::connection(&what, e)),
        Err(_) => return Err(error::timeout(&what, limit)),
    };
    error::bounded(&what, limit, pubsub.subscribe(topic)).await?;
    Ok(pubsub)
}

/// Subscribes (live when this returns) and starts the reader, which reconnects and subscribes
/// again after a connection loss.
pub(crate) async fn start(state: &Arc<Connected>, sub: &Arc<SubState>, handler: Arc<dyn Handler>) -> Result<()> {
    let address = state.config.redacted_url();
    let limit = state.options.connect_timeout;
    let pubsub = subscribed(&state.client, &sub.topic, limit, &address).await?;
    let client = state.client.clone();
    let sub2 = Arc::clone(sub);
    sub.tracker.spawn(async move {
        let sub = sub2;
        let permits = Arc::new(Semaphore::new(sub.options.concurrency));
        let (mut sink, mut stream) = pubsub.split();
        let mut backoff = Duration::from_millis(50);
        // A PING every KEEPALIVE on the subscribed connection detects a silently dead one.
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One cancellation future for the whole loop: a new one per message would register with
        // (and leave) the token's waiter list for every delivery.
        let cancelled = sub.cancel.cancelled();
        tokio::pin!(cancelled);
        loop {
            let msg = tokio::select! {
                _ = &mut cancelled => return,
                msg = stream.next() => msg,
                _ = keepalive.tick() => {
                    match tokio::time::timeout(limit, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => continue,
                        _ => None,
                    }
                }
            };
            let Some(msg) = msg else {
                tracing::warn!(topic = %sub.topic, %address, "redis Pub/Sub connection lost; reconnecting (messages published meanwhile are lost)");
                loop {
                    if crate::sleep_or_cancel(&sub.cancel, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    match subscribed(&client, &sub.topic, limit, &address).await {
                        Ok(p) => {
                            (sink, stream) = p.split();
                            backoff = Duration::from_millis(50);
                            tracing::info!(topic = %sub.topic, "redis Pub/Sub subscription restored");
                            break;
                        }
                        Err(e) => tracing::debug!(topic = %sub.topic, error = %e, "redis Pub/Sub reconnect failed"),
                    }
                }
                continue;
            };
            let payload: &[u8] = msg.get_payload_bytes();
            let builder = match codec::decode_envelope(payload) {
                Ok(message) => Event::builder(sub.topic.as_str(), message),
                Err(e) => Event::builder(sub.topic.as_str(), Message::new(payload.to_vec()))
                    .error(Error::codec(format!("the payload is not a Go Micro envelope; delivered raw: {e}"))),
            };
            let event = builder.build();
            let key = sub.key();
            let auto_ack = sub.options.auto_ack;
            if sub.options.concurrency == 1 {
                // One handler at a time: run it here, without a task per delivery, and without a
                // permit (this loop is the only one running handlers, so one would always be free).
                // An unsubscribe from inside the handler does not wait for the subscription's tasks
                // (this one).
                if sub.cancel.is_cancelled() {
                    return;
                }
                let run = broker_core::run_handler(handler.as_ref(), event, auto_ack);
                if let Err(e) = broker_core::scope_handler(key, run).await {
                    tracing::debug!(error = %e, "redis Pub/Sub handler failed (at most once: not redelivered)");
                }
                continue;
            }
            let permit = tokio::select! {
                _ = &mut cancelled => return,
                permit = Arc::clone(&permits).acquire_owned() => match permit { Ok(p) => p, Err(_) => return },
            };
            let handler = Arc::clone(&handler);
            sub.tracker.spawn(broker_core::scope_handler(key, async move {
                if let Err(e) = broker_core::run_handler(handler.as_ref(), event, auto_ack).await {
                    tracing::debug!(error = %e, "redis Pub/Sub handler failed (at most once: not redelivered)");
                }
                drop(permit);
            }));
        }
    });
    Ok(())
}
