//! The rabbitmq backend's baseline: lapin 4 (tokio), the same layout as ours. A topic exchange of
//! its own (`micro-bench-raw`); a connection for publishing and one for consuming (as ours, whose
//! publisher and subscribers are separate brokers); one publishing channel with publisher confirms, each publish
//! awaited to its confirm (`--window` outstanding per publisher); each subscriber a channel with
//! prefetch `--concurrency`, a queue (broadcast: server-named, exclusive, auto-delete; queue group:
//! the named queue, shared) bound to every topic, consumed with manual acks, one ack per delivery (in flight while the next deliveries are read).

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use micro_broker::BoxError;

use super::{Outcome, Recorder, Sink, Workload, drive};

/// The server when `--broker-address` does not say.
const DEFAULT_ADDRESS: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const EXCHANGE: &str = "micro-bench-raw";

struct Publisher {
    channel: Channel,
    topics: Vec<String>,
}

impl Sink for Publisher {
    async fn send(&self, topic: usize, body: Bytes) -> Result<(), BoxError> {
        let topic = self.topics.get(topic).ok_or("no such topic")?;
        let confirm = self
            .channel
            .basic_publish(
                EXCHANGE.into(),
                topic.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await?
            .await?;
        if confirm.is_ack() { Ok(()) } else { Err("the server nacked a message".into()) }
    }
}

/// One run with confirms and manual acks.
pub(crate) async fn run(workload: &Workload, recorder: Arc<Recorder>) -> Result<Outcome, BoxError> {
    let address = workload.address_or(DEFAULT_ADDRESS);
    // Two connections, as ours (publisher and subscriber are separate brokers).
    let connection = Connection::connect(&address, ConnectionProperties::default()).await?;
    let consuming = Connection::connect(&address, ConnectionProperties::default()).await?;
    let publishing = connection.create_channel().await?;
    publishing
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    publishing.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut readers = Vec::new();
    let mut channels = Vec::new();
    for s in 0..workload.subscribers {
        let channel = consuming.create_channel().await?;
        let prefetch = u16::try_from(workload.concurrency).unwrap_or(u16::MAX);
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let queue = match &workload.queue {
            Some(name) => {
                let options = QueueDeclareOptions { auto_delete: true, ..QueueDeclareOptions::default() };
                channel.queue_declare(name.as_str().into(), options, FieldTable::default()).await?;
                name.clone()
            }
            None => {
                let options =
                    QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
                let declared = channel.queue_declare("".into(), options, FieldTable::default()).await?;
                declared.name().as_str().to_string()
            }
        };
        for topic in &workload.topics {
            let bind = QueueBindOptions::default();
            let routing_key = topic.as_str().into();
            channel
                .queue_bind(queue.as_str().into(), EXCHANGE.into(), routing_key, bind, FieldTable::default())
                .await?;
        }
        let tag = format!("raw-{s}");
        let consume = BasicConsumeOptions::default();
        let mut consumer =
            channel.basic_consume(queue.as_str().into(), tag.as_str().into(), consume, FieldTable::default()).await?;
        let (recorder, slot) = (Arc::clone(&recorder), workload.slot(s));
        readers.push(tokio::spawn(async move {
            // Each ack is in flight while the next deliveries are read (not awaited one by one).
            let mut acks = futures::stream::FuturesUnordered::new();
            loop {
                tokio::select! {
                    delivery = consumer.next() => {
                        let Some(Ok(delivery)) = delivery else { return };
                        recorder.record(slot, &delivery.data);
                        acks.push(async move { delivery.ack(BasicAckOptions::default()).await });
                    }
                    Some(acked) = acks.next(), if !acks.is_empty() => {
                        if acked.is_err() {
                            return;
                        }
                    }
                }
            }
        }));
        channels.push((channel, queue));
    }
    let sink = Arc::new(Publisher { channel: publishing.clone(), topics: workload.topics.clone() });
    let outcome = drive(sink, workload, &recorder).await;
    for reader in readers {
        reader.abort();
    }
    for (channel, queue) in channels {
        if workload.queue.is_some() {
            let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
        }
        let _ = channel.close(200, "bench done".into()).await;
    }
    let _ = publishing.close(200, "bench done".into()).await;
    let _ = connection.close(200, "bench done".into()).await;
    let _ = consuming.close(200, "bench done".into()).await;
    outcome
}
