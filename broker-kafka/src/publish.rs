//! Publishing: the mapping of a [`Message`] to a Kafka record, and the idempotent producer that
//! awaits each delivery report.
//!
//! - Native (default): the record value is the raw body, every header is a record header (UTF-8
//!   name, UTF-8 value; an empty value is an empty byte string), the ordering key is the record key.
//! - `envelope=go-micro`: Go Micro's headers are added (`Micro-Topic`, `Micro-Id`, `Content-Type`)
//!   and the record value is Go Micro's JSON envelope; no record headers, as Go Micro's Kafka plugin.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use broker_core::codec::{self, Envelope};
use broker_core::{Error, ErrorKind, Message, Result};
use bytes::Bytes;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;

use crate::config::KafkaConfig;
use crate::error;

/// A client context that keeps the last error librdkafka reported (for connect errors that would
/// otherwise only say "timed out"), the idempotent producer's health from the statistics, and
/// sends librdkafka's log to `tracing`.
#[derive(Debug, Clone)]
pub(crate) struct ReportingContext {
    last_error: Arc<Mutex<Option<String>>>,
    auth_failure: Arc<Mutex<Option<RDKafkaErrorCode>>>,
    health: Arc<Mutex<Health>>,
}

/// What the last statistics said about an idempotent producer.
#[derive(Debug, Clone, Copy)]
struct Health {
    /// A server connection is up.
    server_up: bool,
    /// The idempotent producer had a producer id (state `Assigned`) at the last statistics.
    assigned: bool,
    /// When the producer was last seen with a producer id (or created).
    last_assigned: std::time::Instant,
}

impl Default for ReportingContext {
    fn default() -> Self {
        ReportingContext {
            last_error: Arc::default(),
            auth_failure: Arc::default(),
            health: Arc::new(Mutex::new(Health {
                server_up: false,
                assigned: false,
                last_assigned: std::time::Instant::now(),
            })),
        }
    }
}

impl ReportingContext {
    /// The last error the client reported, if any.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The error code of a refused authentication, if the client saw one.
    fn auth_failure(&self) -> Option<RDKafkaErrorCode> {
        *self.auth_failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the idempotent producer is stuck: a server answers, yet the producer has had no
    /// producer id for longer than `patience` (it keeps failing to get or bump one).
    fn stuck(&self, patience: Duration) -> bool {
        let health = *self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.server_up && !health.assigned && health.last_assigned.elapsed() > patience
    }
}

impl ClientContext for ReportingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::warn!(facility = fac, "librdkafka: {log_message}")
            }
            _ => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        let Some(eos) = statistics.eos else { return };
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.server_up = statistics.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        health.assigned = eos.idemp_state == "Assigned";
        if health.assigned {
            health.last_assigned = std::time::Instant::now();
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "kafka broker: client error");
        if let Some(code) = error.rdkafka_error_code().filter(|c| error::is_auth(*c)) {
            *self.auth_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
        }
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        // "All brokers are down" follows the error that says why: keep the why.
        if last.is_none() || error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *last = Some(format!("{error}: {reason}"));
        }
    }
}

/// A record ready for the producer.
pub(crate) struct Outgoing {
    pub(crate) payload: Bytes,
    pub(crate) headers: Option<OwnedHeaders>,
}

/// Encodes `message` for `topic` in `envelope`.
pub(crate) fn encode(topic: &str, mut message: Message, envelope: Envelope) -> Outgoing {
    match envelope {
        Envelope::GoMicro => {
            codec::add_go_micro_headers(&mut message, topic);
            Outgoing { payload: codec::encode_envelope(&message, None), headers: None }
        }
        Envelope::Native => {
            if message.headers.is_empty() {
                return Outgoing { payload: message.body, headers: None };
            }
            let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
            for (key, value) in &message.headers {
                headers = headers.insert(Header { key: key.as_str(), value: Some(value.as_bytes()) });
            }
            Outgoing { payload: message.body, headers: Some(headers) }
        }
    }
}

/// One librdkafka producer and its context.
struct Producing {
    producer: FutureProducer<ReportingContext>,
    context: ReportingContext,
}

/// The producer of a connected broker. The idempotent producer is replaced by a fresh one (a new
/// producer id) when it is wedged: librdkafka raised a fatal error, or the server keeps refusing
/// its sequence after messages timed out (tansu 0.6 cannot bump a producer's epoch, KIP-360).
pub(crate) struct Publisher {
    current: RwLock<Arc<Producing>>,
    client: rdkafka::ClientConfig,
    envelope: Envelope,
    limit: Duration,
    last_replaced: Mutex<Option<tokio::time::Instant>>,
    replaced: AtomicU64,
}

/// How often a wedged producer may be replaced at most.
const REPLACE_INTERVAL: Duration = Duration::from_millis(500);

/// Whether a delivery error means the idempotent producer's state is out of step with the server.
fn wedges_the_producer(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Unknown
                | RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerIdMapping
        )
    )
}

impl Publisher {
    /// An idempotent producer (acks=all) whose message timeout is `publish_timeout`. No I/O.
    pub(crate) fn new(config: &KafkaConfig, publish_timeout: Duration) -> Result<Publisher> {
        let mut client = config.base_client_config();
        let timeout_ms = publish_timeout.as_millis().clamp(1, i32::MAX as u128).to_string();
        client
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", &timeout_ms)
            .set("linger.ms", config.linger_ms.to_string())
            .set("message.max.bytes", config.max_message_bytes.to_string())
            // Java-compatible key hashing; records without a key all go to one partition (no random
            // spreading), so what one publisher sends without a key stays in publish order.
            .set("partitioner", "murmur2")
            // The statistics tell whether the idempotent producer is stuck without a producer id.
            .set("statistics.interval.ms", "500");
        config.apply_overrides(&mut client);
        let producing = Self::create(&client)?;
        Ok(Publisher {
            current: RwLock::new(Arc::new(producing)),
            client,
            envelope: config.envelope,
            limit: publish_timeout,
            last_replaced: Mutex::new(None),
            replaced: AtomicU64::new(0),
        })
    }

    fn create(client: &rdkafka::ClientConfig) -> Result<Producing> {
        let context = ReportingContext::default();
        let producer = client
            .create_with_context::<_, FutureProducer<ReportingContext>>(context.clone())
            .map_err(|e| error::client_config("producer", e))?;
        Ok(Producing { producer, context })
    }

    fn current(&self) -> Arc<Producing> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces `wedged` (if it is still the current producer) by a fresh one, at most every
    /// [`REPLACE_INTERVAL`].
    fn replace(&self, wedged: &Arc<Producing>, why: &KafkaError) {
        let mut last = self.last_replaced.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| at.elapsed() < REPLACE_INTERVAL) {
            return;
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&current, wedged) {
            return;
        }
        match Self::create(&self.client) {
            Ok(fresh) => {
                tracing::warn!(error = %why, "kafka broker: replacing a wedged idempotent producer");
                let old = std::mem::replace(&mut *current, Arc::new(fresh));
                self.replaced.fetch_add(1, Ordering::Relaxed);
                *last = Some(tokio::time::Instant::now());
                // Destroying a producer joins its threads: not on an async thread.
                drop(tokio::task::spawn_blocking(move || drop(old)));
            }
            Err(error) => tracing::warn!(%error, "kafka broker: cannot create a fresh producer"),
        }
    }

    /// How many times a wedged producer was replaced.
    pub(crate) fn replaced(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }

    /// Reads the cluster's metadata within `limit`: the proof that the servers answer.
    pub(crate) async fn probe(&self, servers: &str, sasl: bool, limit: Duration) -> Result<()> {
        let producing = self.current();
        let producer = producing.producer.clone();
        let probe = tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, limit).map(|_| ()));
        // Refused credentials are final: answer at once rather than at the end of the timeout.
        let context = producing.context.clone();
        let refused = async move {
            loop {
                if let Some(code) = context.auth_failure() {
                    return code;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let outcome = tokio::select! {
            probed = tokio::time::timeout(limit + Duration::from_secs(1), probe) => match probed {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(join)) => return Err(error::join("probe the Kafka servers", join)),
                Err(_) => Err(KafkaError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut)),
            },
            code = refused => Err(KafkaError::MetadataFetch(code)),
        };
        outcome.map_err(|e| {
            let mut err = error::connect(e, servers, sasl, limit);
            if let Some(last) = producing.context.last_error() {
                err = Error::new(err.kind(), format!("{} (last client error: {last})", err.message()));
            }
            err
        })
    }

    /// Produces `message` to `topic` with record key `key` and awaits its delivery report,
    /// bounded by the publish timeout. A full local queue is waited out (never dropped).
    pub(crate) async fn send(&self, topic: &str, message: Message, key: Option<&str>) -> Result<()> {
        // For errors only (formatted on every publish, it was ~1,300 instructions).
        let what = || format!("publish to {topic:?}");
        let outgoing = encode(topic, message, self.envelope);
        let deadline = tokio::time::Instant::now() + self.limit;
        let producing = self.current();
        let mut record = FutureRecord::<str, [u8]>::to(topic).payload(&outgoing.payload[..]);
        if let Some(headers) = outgoing.headers {
            record = record.headers(headers);
        }
        if let Some(key) = key {
            record = record.key(key);
        }
        let mut pause = Duration::from_millis(1);
        let delivery = loop {
            match producing.producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if tokio::time::Instant::now() + pause > deadline {
                        return Err(Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "{}: the producer's local queue stayed full for the publish timeout of {:?}",
                                what(),
                                self.limit
                            ),
                        ));
                    }
                    record = back;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err((error, _)) => {
                    if wedges_the_producer(&error) || producing.producer.client().fatal_error().is_some() {
                        self.replace(&producing, &error);
                    }
                    return Err(error::kafka(&what(), error));
                }
            }
        };
        // librdkafka reports a timeout itself after message.timeout.ms; the grace covers a stuck client.
        match tokio::time::timeout_at(deadline + Duration::from_secs(1), delivery).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err((error, _)))) => {
                if wedges_the_producer(&error)
                    || producing.producer.client().fatal_error().is_some()
                    || producing.context.stuck(self.limit.max(Duration::from_secs(2)))
                {
                    self.replace(&producing, &error);
                }
                Err(error::kafka(&what(), error))
            }
            Ok(Err(_canceled)) => Err(Error::new(ErrorKind::Closed, format!("{}: the producer was closed", what()))),
            Err(_) => Err(error::timeout(&what(), self.limit)),
        }
    }

    /// Waits (bounded by `limit`) for every queued message to be delivered or to fail.
    pub(crate) async fn flush(&self, limit: Duration) -> Result<()> {
        let producer = self.current().producer.clone();
        let flush = tokio::task::spawn_blocking(move || producer.flush(limit));
        match tokio::time::timeout(limit + Duration::from_secs(1), flush).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(error::kafka("flush the producer", e)),
            Ok(Err(join)) => Err(error::join("flush the producer", join)),
            Err(_) => Err(error::timeout("flush the producer", limit)),
        }
    }

    /// Messages waiting in the producer (queued or in flight).
    pub(crate) fn in_flight(&self) -> i32 {
        self.current().producer.in_flight_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn native_and_go_micro() {
        let out = encode("t", Message::new("b").with_header("k", "v").with_header("e", ""), Envelope::Native);
        assert_eq!(&out.payload[..], b"b");
        let headers = out.headers.unwrap();
        let mut pairs: Vec<(String, Option<Vec<u8>>)> =
            headers.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect();
        pairs.sort();
        assert_eq!(pairs, vec![("e".into(), Some(vec![])), ("k".into(), Some(b"v".to_vec()))]);
        let out = encode("t", Message::new("b"), Envelope::Native);
        assert!(out.headers.is_none());
        let out = encode("orders", Message::new("b").with_header("k", "v"), Envelope::GoMicro);
        assert!(out.headers.is_none());
        let back = codec::decode_envelope(&out.payload).unwrap();
        assert_eq!(back.body(), b"b");
        assert_eq!(back.header("k"), Some("v"));
        assert_eq!(back.header(codec::MICRO_TOPIC), Some("orders"));
    }
}
