//! The nats backend's baseline: async-nats core publish/subscribe. One connection publishes,
//! another one holds the subscriptions (one reader task per subscriber over all its topics,
//! `queue_subscribe` with `--queue`). Publishes are only enqueued; the publisher flushes once at
//! the end (and after each probe / each message in latency mode), which is what a raw async-nats
//! user does. The subscription buffer is the client's default (65,536), as ours.
//! `BENCH_RAW_LIKE_OURS=1` makes the raw publisher flush after every publish, as ours does: a
//! diagnosis of what that flush costs (BENCHMARKS.md). `BENCH_RAW_FLOOR=1`: publishes and
//! deliveries (JetStream too) also go through what the contract costs ([`super::raw_floor`];
//! the wire is the same).
//! With `--param jetstream=true`: [`run_jetstream`].

use std::sync::Arc;

use async_nats::Subject;
use bytes::Bytes;
use futures::StreamExt;
use micro_broker::{BoxError, Message};

use super::{Outcome, Recorder, Sink, Workload, drive};

/// The server when `--broker-address` does not say.
const DEFAULT_ADDRESS: &str = "nats://127.0.0.1:4222";

struct Publisher {
    client: async_nats::Client,
    subjects: Vec<Subject>,
    /// Diagnosis (`BENCH_RAW_LIKE_OURS=1`): flush after every publish, as our backend does.
    flush_each: bool,
    /// Diagnosis (`BENCH_RAW_FLOOR=1`): each publish as the contract makes it.
    floor: bool,
}

impl Sink for Publisher {
    async fn send(&self, topic: usize, body: Bytes) -> Result<(), BoxError> {
        let subject = self.subjects.get(topic).ok_or("no such topic")?.clone();
        if self.floor {
            let client = &self.client;
            return super::publish_as_contract(body, |message| async move {
                Ok(client.publish(subject, message.body).await?)
            })
            .await;
        }
        self.client.publish(subject, body).await?;
        if self.flush_each {
            self.client.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BoxError> {
        Ok(self.client.flush().await?)
    }
}

/// One run of core NATS.
pub(crate) async fn run(workload: &Workload, recorder: Arc<Recorder>) -> Result<Outcome, BoxError> {
    if workload.param("jetstream").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return run_jetstream(workload, recorder).await;
    }
    let address = workload.address_or(DEFAULT_ADDRESS);
    let publisher = async_nats::connect(address.as_str()).await?;
    let subscriber = async_nats::connect(address.as_str()).await?;
    let mut readers = Vec::new();
    for s in 0..workload.subscribers {
        let mut subscriptions = Vec::new();
        for topic in &workload.topics {
            subscriptions.push(match &workload.queue {
                Some(queue) => subscriber.queue_subscribe(topic.clone(), queue.clone()).await?,
                None => subscriber.subscribe(topic.clone()).await?,
            });
        }
        let (recorder, slot) = (Arc::clone(&recorder), workload.slot(s));
        if super::raw_floor() {
            let floor = super::Floor::new(&recorder, slot);
            let tagged = subscriptions.into_iter().zip(&workload.topics).map(|(subscription, topic)| {
                let topic: Arc<str> = topic.as_str().into();
                subscription.map(move |message| (Arc::clone(&topic), message))
            });
            let mut all = futures::stream::select_all(tagged);
            readers.push(tokio::spawn(async move {
                while let Some((topic, message)) = all.next().await {
                    floor.deliver(&topic, Message::new(message.payload)).await;
                }
            }));
            continue;
        }
        readers.push(tokio::spawn(async move {
            let mut all = futures::stream::select_all(subscriptions);
            while let Some(message) = all.next().await {
                recorder.record(slot, &message.payload);
            }
        }));
    }
    subscriber.flush().await?;
    let subjects = workload.topics.iter().map(|t| Subject::from(t.as_str())).collect();
    let (flush_each, floor) = (super::raw_like_ours(), super::raw_floor());
    let sink = Arc::new(Publisher { client: publisher.clone(), subjects, flush_each, floor });
    let outcome = drive(sink, workload, &recorder).await;
    for reader in readers {
        reader.abort();
    }
    let _ = publisher.drain().await;
    let _ = subscriber.drain().await;
    outcome
}

/// JetStream publisher: each publish awaited to the stream's ack (`--window` in flight).
struct JsPublisher {
    js: async_nats::jetstream::Context,
    subjects: Vec<Subject>,
    /// Diagnosis (`BENCH_RAW_FLOOR=1`): each publish as the contract makes it.
    floor: bool,
}

impl Sink for JsPublisher {
    async fn send(&self, topic: usize, body: Bytes) -> Result<(), BoxError> {
        let subject = self.subjects.get(topic).ok_or("no such topic")?.clone();
        let publish = |body: Bytes| async move {
            self.js.publish(subject, body).await?.await?;
            Ok(())
        };
        if self.floor {
            return super::publish_as_contract(body, |message| publish(message.body)).await;
        }
        publish(body).await
    }
}

/// The JetStream baseline: a file stream of its own (`RAWBENCH_…`, subjects `rawjs.<run>.>`, so it
/// never overlaps ours), publishes awaited to their ack, per subscriber a durable pull consumer
/// (the queue group shares one) with explicit acks, one ack per message; the stream is deleted
/// afterwards.
pub(crate) async fn run_jetstream(workload: &Workload, recorder: Arc<Recorder>) -> Result<Outcome, BoxError> {
    use async_nats::jetstream::{consumer::AckPolicy, consumer::DeliverPolicy, consumer::pull, stream};
    let address = workload.address_or(DEFAULT_ADDRESS);
    let publisher = async_nats::connect(address.as_str()).await?;
    let subscriber = async_nats::connect(address.as_str()).await?;
    let run: String = workload
        .topics
        .first()
        .ok_or("no topic")?
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let name = format!("RAWBENCH_{run}");
    let js = async_nats::jetstream::new(publisher.clone());
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![format!("rawjs.{run}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    };
    js.get_or_create_stream(config).await?;
    let sub_js = async_nats::jetstream::new(subscriber.clone());
    let stream = sub_js.get_stream(&name).await?;
    let mut readers = Vec::new();
    for s in 0..workload.subscribers {
        let durable = workload.queue.clone().unwrap_or_else(|| format!("raw{s}"));
        let config = pull::Config {
            durable_name: Some(durable.clone()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::New,
            max_ack_pending: ((workload.concurrency as i64) * 64).max(1024),
            ..Default::default()
        };
        let consumer = stream.get_or_create_consumer(&durable, config).await?;
        let mut messages = consumer.messages().await?;
        let (recorder, slot) = (Arc::clone(&recorder), workload.slot(s));
        // Diagnosis (`BENCH_RAW_FLOOR=1`): each message an event to the handler, before its ack.
        let floor = super::raw_floor().then(|| {
            let topics = super::Floor::topics((0..workload.topics.len()).map(|t| format!("rawjs.{run}.{t}")));
            (super::Floor::new(&recorder, slot), topics)
        });
        readers.push(tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                match &floor {
                    None => recorder.record(slot, &message.payload),
                    Some((floor, topics)) => {
                        if let Some(topic) = topics.get(message.subject.as_str()) {
                            floor.deliver(topic, Message::new(message.payload.clone())).await;
                        }
                    }
                }
                if message.ack().await.is_err() {
                    return;
                }
            }
        }));
    }
    let subjects = (0..workload.topics.len()).map(|t| Subject::from(format!("rawjs.{run}.{t}"))).collect();
    let sink = Arc::new(JsPublisher { js: js.clone(), subjects, floor: super::raw_floor() });
    let outcome = drive(sink, workload, &recorder).await;
    for reader in readers {
        reader.abort();
    }
    let _ = js.delete_stream(&name).await;
    let _ = publisher.drain().await;
    let _ = subscriber.drain().await;
    outcome
}

/// Deletes the JetStream stream our backend made for the run's topics (`<stream_prefix><first
/// segment>`, see broker-nats's `stream_of`), if there is one: it would keep the messages and
/// capture later publishes to the same first segment.
pub(crate) async fn delete_our_stream(workload: &Workload) -> Result<(), BoxError> {
    if !workload.param("jetstream").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(());
    }
    let segment = workload.topics.first().and_then(|t| t.split('.').next()).ok_or("no topic")?;
    let prefix = workload.param("stream_prefix").unwrap_or("MICRO_");
    let client = async_nats::connect(workload.address_or(DEFAULT_ADDRESS).as_str()).await?;
    let js = async_nats::jetstream::new(client.clone());
    let _ = js.delete_stream(format!("{prefix}{segment}")).await;
    let _ = client.drain().await;
    Ok(())
}
