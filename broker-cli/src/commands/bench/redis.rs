//! The redis backends' baselines, redis-rs 1.x with the same features as broker-redis.
//! - `redis` (Pub/Sub): `PUBLISH` on one multiplexed connection (`--window` in flight per
//!   publisher); each subscriber a `SUBSCRIBE`d connection of its own over all topics.
//! - `redis-streams`: `XADD <topic> MAXLEN ~ 100000 * body <body>` (ours' defaults) on the
//!   multiplexed connection; each subscriber a consumer group (broadcast: a group each; queue:
//!   the group `--queue`, one consumer each) read by `XREADGROUP COUNT 64 BLOCK 1000` on a
//!   connection without response timeout, every entry acked by its own `XACK`, the acks of one
//!   read sent together (`BENCH_RAW_LIKE_OURS=1`, a diagnosis: each awaited before the next entry). The streams are deleted afterwards (ours' too, see [`delete_streams`]).
//!
//! Bytes on the wire per message differ for Pub/Sub: raw publishes the bare body, ours Go
//! Micro's envelope `{"Header":{},"Body":"<base64>"}` (the backend's wire format), i.e.
//! 23 + 4·⌈size/3⌉ bytes: 47 for `--size 16`, 1,391 for `--size 1024` (36 % more), both in the
//! PUBLISH and in the message each subscriber receives; ours also base64-encodes and -decodes
//! the body. For Streams both sides send the bare body in the field `body` (ours with no header
//! fields when the message has none).
//! `BENCH_RAW_FLOOR=1`: publishes and deliveries also go through what the contract costs, and
//! Pub/Sub carries ours' envelope ([`super::raw_floor`]).

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use micro_broker::{BoxError, Message, codec};
use redis::RedisWrite as _;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;

use super::{Outcome, Recorder, Sink, Workload, drive};

/// The server when `--broker-address` does not say.
const DEFAULT_ADDRESS: &str = "redis://127.0.0.1:6379";
/// Ours' defaults: approximate MAXLEN of each stream, entries per XREADGROUP.
const MAXLEN: u64 = 100_000;
const READ_COUNT: usize = 64;

fn client(workload: &Workload) -> Result<redis::Client, BoxError> {
    let address = workload.address_or(DEFAULT_ADDRESS);
    let url = if address.contains("://") { address } else { format!("redis://{address}") };
    Ok(redis::Client::open(url)?)
}

struct Publisher {
    conn: MultiplexedConnection,
    topics: Vec<String>,
    streams: bool,
    /// Diagnosis (`BENCH_RAW_FLOOR=1`): each publish as the contract makes it (Pub/Sub: in ours' envelope).
    floor: bool,
}

impl Sink for Publisher {
    async fn send(&self, topic: usize, body: Bytes) -> Result<(), BoxError> {
        let topic = self.topics.get(topic).ok_or("no such topic")?;
        let mut conn = self.conn.clone();
        if self.streams {
            let xadd = |body: Bytes| async move {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(topic).arg("MAXLEN").arg("~").arg(MAXLEN).arg("*").arg("body").arg(body.as_ref());
                let _id: String = cmd.query_async(&mut conn).await?;
                Ok(())
            };
            if self.floor {
                return super::publish_as_contract(body, |message| xadd(message.body)).await;
            }
            xadd(body).await?;
        } else if self.floor {
            return super::publish_as_contract(body, |message| async move {
                // Sized up front, as ours does: no regrowth of the command's buffer.
                let envelope_len = codec::envelope_len(&message, None);
                let mut cmd = redis::Cmd::with_capacity(3, "PUBLISH".len() + topic.len() + envelope_len);
                cmd.arg("PUBLISH").arg(topic);
                codec::write_envelope(&mut cmd.writer_for_next_arg(), &message, None)?;
                let _receivers: i64 = cmd.query_async(&mut conn).await?;
                Ok(())
            })
            .await;
        } else {
            let _receivers: i64 = redis::cmd("PUBLISH").arg(topic).arg(body.as_ref()).query_async(&mut conn).await?;
        }
        Ok(())
    }
}

/// One run of Pub/Sub.
pub(crate) async fn run_pubsub(workload: &Workload, recorder: Arc<Recorder>) -> Result<Outcome, BoxError> {
    if workload.queue.is_some() {
        return Err("redis Pub/Sub has no queue groups".into());
    }
    let client = client(workload)?;
    let floor = super::raw_floor();
    let mut readers = Vec::new();
    for s in 0..workload.subscribers {
        let mut pubsub = client.get_async_pubsub().await?;
        for topic in &workload.topics {
            pubsub.subscribe(topic).await?;
        }
        let (recorder, slot) = (Arc::clone(&recorder), workload.slot(s));
        if floor {
            let floor = super::Floor::new(&recorder, slot);
            let topics = super::Floor::topics(workload.topics.iter().cloned());
            readers.push(tokio::spawn(async move {
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let (Some(topic), Ok(decoded)) =
                        (topics.get(message.get_channel_name()), codec::decode_envelope(message.get_payload_bytes()))
                    else {
                        continue;
                    };
                    floor.deliver(topic, decoded).await;
                }
            }));
            continue;
        }
        readers.push(tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                recorder.record(slot, message.get_payload_bytes());
            }
        }));
    }
    let conn = client.get_multiplexed_async_connection().await?;
    let sink = Arc::new(Publisher { conn, topics: workload.topics.clone(), streams: false, floor });
    let outcome = drive(sink, workload, &recorder).await;
    for reader in readers {
        reader.abort();
    }
    outcome
}

/// One run of Streams with consumer groups.
pub(crate) async fn run_streams(workload: &Workload, recorder: Arc<Recorder>) -> Result<Outcome, BoxError> {
    let client = client(workload)?;
    let conn = client.get_multiplexed_async_connection().await?;
    let mut readers = Vec::new();
    for s in 0..workload.subscribers {
        let group = workload.queue.clone().unwrap_or_else(|| format!("raw.{s}"));
        for topic in &workload.topics {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(topic)
                .arg(&group)
                .arg("$")
                .arg("MKSTREAM")
                .query_async(&mut conn.clone())
                .await;
            match created {
                Err(e) if e.code() != Some("BUSYGROUP") => return Err(e.into()),
                _ => {}
            }
        }
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut reading = client.get_multiplexed_async_connection_with_config(&config).await?;
        let acking = conn.clone();
        let (recorder, slot, topics) = (Arc::clone(&recorder), workload.slot(s), workload.topics.clone());
        let consumer = format!("c{s}");
        // Diagnosis (`BENCH_RAW_FLOOR=1`): each entry an event to the handler, before its XACK.
        let floor = super::raw_floor().then(|| {
            let topics = super::Floor::topics(workload.topics.iter().cloned());
            (super::Floor::new(&recorder, slot), topics)
        });
        readers.push(tokio::spawn(async move {
            let mut read = redis::cmd("XREADGROUP");
            read.arg("GROUP").arg(&group).arg(&consumer).arg("COUNT").arg(READ_COUNT).arg("BLOCK").arg(1000);
            read.arg("STREAMS").arg(&topics);
            for _ in &topics {
                read.arg(">");
            }
            loop {
                let reply: Option<StreamReadReply> = match read.query_async(&mut reading).await {
                    Ok(reply) => reply,
                    Err(_) => return,
                };
                let mut acks = Vec::new();
                let serial = super::raw_like_ours();
                for key in reply.map(|r| r.keys).unwrap_or_default() {
                    for mut entry in key.ids {
                        match (&floor, entry.map.remove("body")) {
                            (None, Some(redis::Value::BulkString(body))) => recorder.record(slot, &body),
                            (Some((floor, topics)), Some(redis::Value::BulkString(body))) => {
                                if let Some(topic) = topics.get(&key.key) {
                                    floor.deliver(topic, Message::new(body)).await;
                                }
                            }
                            _ => {}
                        }
                        let mut ack = redis::cmd("XACK");
                        ack.arg(&key.key).arg(&group).arg(&entry.id);
                        let mut conn = acking.clone();
                        if serial {
                            // Diagnosis: each ack awaited before the next entry, as ours with concurrency 1.
                            if ack.query_async::<i64>(&mut conn).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        acks.push(async move { ack.query_async::<i64>(&mut conn).await });
                    }
                }
                for acked in futures::future::join_all(acks).await {
                    if acked.is_err() {
                        return;
                    }
                }
            }
        }));
    }
    let sink = Arc::new(Publisher {
        conn: conn.clone(),
        topics: workload.topics.clone(),
        streams: true,
        floor: super::raw_floor(),
    });
    let outcome = drive(sink, workload, &recorder).await;
    for reader in readers {
        reader.abort();
    }
    let _ = delete_streams(workload).await;
    outcome
}

/// Deletes the run's streams (ours leaves them, with their consumer groups, on the server).
pub(crate) async fn delete_streams(workload: &Workload) -> Result<(), BoxError> {
    let mut conn = client(workload)?.get_multiplexed_async_connection().await?;
    for chunk in workload.topics.chunks(1000) {
        let _deleted: i64 = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await?;
    }
    Ok(())
}
