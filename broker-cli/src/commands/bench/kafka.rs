//! The kafka backend's baseline: rdkafka (the same bundled librdkafka as broker-kafka) with the
//! settings ours uses. Topics created through the admin API first (one partition, as ours by
//! default); a `FutureProducer` with `acks=all`, idempotence on and `linger.ms=0`, each send
//! awaited to its delivery report (`--window` in flight, a full local queue waited out); per
//! subscriber a `StreamConsumer` (broadcast: a group of its own starting at the end; queue group:
//! `--queue` as the group id, starting at the beginning) subscribed to every topic, storing the
//! offset of each record once it is recorded, committed by librdkafka every second, as ours
//! (`enable.auto.offset.store=false`). `fetch.wait.max.ms=10`, ours' default (tansu answers a
//! waiting fetch only when it expires).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use micro_broker::BoxError;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{Outcome, Recorder, Sink, Workload, drive};

/// The bootstrap servers when `--broker-address` does not say.
const DEFAULT_ADDRESS: &str = "127.0.0.1:9092";
/// How long one send may take, as ours' default publish timeout.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

struct Publisher {
    producer: FutureProducer,
    topics: Vec<String>,
}

impl Sink for Publisher {
    async fn send(&self, topic: usize, body: Bytes) -> Result<(), BoxError> {
        let topic = self.topics.get(topic).ok_or("no such topic")?;
        let record = FutureRecord::<(), [u8]>::to(topic).payload(body.as_ref());
        // `send` waits out a full local queue (QueueFull) within the timeout, then the report.
        match self.producer.send(record, SEND_TIMEOUT).await {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(error.into()),
        }
    }
}

/// One run with delivery reports and stored offsets.
pub(crate) async fn run(workload: &Workload, recorder: Arc<Recorder>) -> Result<Outcome, BoxError> {
    let address = workload.address_or(DEFAULT_ADDRESS);
    let address = address.strip_prefix("kafka://").unwrap_or(&address).to_string();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", &address).create()?;
    let new_topics: Vec<NewTopic<'_>> =
        workload.topics.iter().map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("cannot create topic {topic}: {code}").into()),
        }
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &address)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create()?;
    let topic_names: Vec<&str> = workload.topics.iter().map(String::as_str).collect();
    let mut readers = Vec::new();
    let mut consumers = Vec::new();
    for s in 0..workload.subscribers {
        let (group, reset) = match &workload.queue {
            Some(queue) => (queue.clone(), "earliest"),
            None => (format!("bench-raw-{}-{s}", workload.topics[0]), "latest"),
        };
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &address)
            .set("group.id", &group)
            .set("auto.offset.reset", reset)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", "1000")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        consumer.subscribe(&topic_names)?;
        let consumer = Arc::new(consumer);
        consumers.push(Arc::clone(&consumer));
        let (recorder, slot) = (Arc::clone(&recorder), workload.slot(s));
        readers.push(tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(record) => {
                        recorder.record(slot, record.payload().unwrap_or_default());
                        if consumer.store_offset_from_message(&record).is_err() {
                            return;
                        }
                    }
                    Err(KafkaError::PartitionEOF(_)) => {}
                    Err(_) => return,
                }
            }
        }));
    }
    let sink = Arc::new(Publisher { producer, topics: workload.topics.clone() });
    // The probes of `drive` go on until every consumer has joined and reads.
    let outcome = drive(sink, workload, &recorder).await;
    for reader in readers {
        reader.abort();
    }
    for consumer in consumers {
        consumer.unsubscribe();
    }
    outcome
}
