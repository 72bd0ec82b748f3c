//! Topic names and topic creation through the admin API.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use broker_core::{Error, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::error;

/// The longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// The suffix of a topic's dead-letter topic.
pub const DLQ_SUFFIX: &str = ".dlq";

/// Checks `topic` as every backend does ([`broker_core::validate_topic`]), then as Kafka does: at
/// most 249 characters of `[a-zA-Z0-9._-]`. Names Kafka would refuse are `InvalidInput` before any
/// I/O, naming the rule; nothing is mapped or escaped.
pub fn validate_kafka_topic(topic: &str) -> Result<()> {
    broker_core::validate_topic(topic)?;
    if topic.len() > MAX_TOPIC_LEN {
        return Err(Error::invalid_input(format!(
            "topic is {} characters long; Kafka allows at most {MAX_TOPIC_LEN}",
            topic.len()
        )));
    }
    if let Some(c) = topic.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(Error::invalid_input(format!(
            "topic {topic:?} contains {c:?}: Kafka topic names may only contain ASCII letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(())
}

/// The admin client and the topics known to be ready.
pub(crate) struct Admin {
    client: AdminClient<DefaultClientContext>,
    /// Topics that passed [`validate_kafka_topic`] and exist (or topic creation is off): a
    /// publish to one of them checks nothing else (the checks were ~940 instructions a publish).
    known: Mutex<HashSet<String, broker_core::TopicHash>>,
    partitions: i32,
    replication: i32,
    enabled: bool,
    limit: Duration,
}

impl Admin {
    pub(crate) fn new(config: &KafkaConfig, limit: Duration) -> Result<Admin> {
        let mut client_config = config.base_client_config();
        config.apply_overrides(&mut client_config);
        let client = client_config.create().map_err(|e| error::client_config("admin client", e))?;
        Ok(Admin {
            client,
            known: Mutex::new(HashSet::default()),
            partitions: config.partitions,
            replication: config.replication_factor,
            enabled: config.auto_create_topics,
            limit,
        })
    }

    /// Whether `topic` is ready: validated, and created unless creation is off (see [`Admin::ensure`]).
    pub(crate) fn is_known(&self, topic: &str) -> bool {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).contains(topic)
    }

    /// Creates `topic` (which passed [`validate_kafka_topic`]) unless it is known to exist or
    /// creation is off, and remembers it as ready. An existing topic is fine.
    pub(crate) async fn ensure(&self, topic: &str) -> Result<()> {
        if self.is_known(topic) {
            return Ok(());
        }
        if !self.enabled {
            self.known.lock().unwrap_or_else(|p| p.into_inner()).insert(topic.to_string());
            return Ok(());
        }
        let new = NewTopic::new(topic, self.partitions, TopicReplication::Fixed(self.replication));
        let options = AdminOptions::new().operation_timeout(Some(self.limit)).request_timeout(Some(self.limit));
        let what = format!("create the topic {topic:?}");
        let results = match tokio::time::timeout(self.limit, self.client.create_topics([&new], &options)).await {
            Ok(Ok(results)) => results,
            Ok(Err(e)) => return Err(error::kafka(&what, e)),
            Err(_) => return Err(error::timeout(&what, self.limit)),
        };
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    let kind = if code == RDKafkaErrorCode::InvalidTopic {
                        broker_core::ErrorKind::InvalidInput
                    } else if error::is_auth(code) {
                        broker_core::ErrorKind::Connection
                    } else {
                        broker_core::ErrorKind::Backend
                    };
                    return Err(Error::new(kind, format!("create the topic {name:?}: the server answered {code}")));
                }
            }
        }
        self.known.lock().unwrap_or_else(|p| p.into_inner()).insert(topic.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::ErrorKind;

    #[test]
    fn kafka_topic_rules() {
        for good in ["orders", "a.b-c_d", "conformance.round_trip.1.2.3", &"x".repeat(249)] {
            validate_kafka_topic(good).unwrap();
        }
        for (bad, rule) in [
            ("a:b", "may only contain"),
            ("a/b", "may only contain"),
            ("é", "may only contain"),
            (&"x".repeat(250) as &str, "at most 249"),
            ("a b", "whitespace"),
            ("", "empty"),
        ] {
            let err = validate_kafka_topic(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            assert!(err.to_string().contains(rule), "{bad:?}: {err}");
        }
    }
}
