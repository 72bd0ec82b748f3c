//! The RabbitMQ backend's configuration, read from [`BrokerOptions`]: addresses and `params`.

use std::fmt;
use std::time::Duration;

use broker_core::codec::{Envelope, PARAM_ENVELOPE};
use broker_core::params::{bad_value, boolean as parse_bool, non_empty};
use broker_core::{BrokerOptions, Error, Result};
use lapin::uri::{AMQPScheme, AMQPUri};

use crate::NAME;

/// The server used when no address is given (`MICRO_BROKER_ADDRESS` unset).
pub const DEFAULT_ADDRESS: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The exchange Go Micro's RabbitMQ plugin uses, and ours by default.
pub const DEFAULT_EXCHANGE: &str = "micro";

/// The heartbeat asked for when the address does not say (`?heartbeat=`), as Go Micro (10 s).
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Every parameter this backend reads from [`BrokerOptions::params`], with its default.
pub const PARAMS: &[(&str, &str)] = &[
    ("exchange", "name of the topic exchange (default micro, as Go Micro)"),
    (
        "exchange_durable",
        "true | false (default false, as Go Micro's default; an exchange must be declared with the \
         durability it already has, so match the other services that share it)",
    ),
    (
        "group_queue_name",
        "topic | go-micro (default topic: a queue group's queue is `<topic>:<group>`; go-micro: the \
         queue is named after the group alone, as Go Micro's plugin names it)",
    ),
    (
        "queue_expires_ms",
        "x-expires of the durable queues this broker declares (group and dead-letter queues): the \
         server deletes such a queue after it has had no consumer for this long (default: never)",
    ),
    ("dead_letter_queue", "true | false (default true): keep dead letters in a durable queue `<topic>.dlq`"),
    ("connection_name", "connection name shown by the server (client property connection_name, default micro-broker)"),
    ("envelope", "native | go-micro (both: Go Micro's RabbitMQ mapping is native; raw body, header table)"),
];

/// How a queue group's queue is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupQueueName {
    /// `<topic>:<group>`: one queue per topic and group, so a group name can be reused on several topics.
    Topic,
    /// `<group>`: Go Micro's naming (`Queue` is the queue name), to share a group with Go Micro services.
    GoMicro,
}

/// The RabbitMQ backend's settings.
#[derive(Clone)]
pub struct RabbitConfig {
    /// Server addresses, `amqp://user:password@host:port/vhost`; tried in order.
    pub addresses: Vec<String>,
    /// The topic exchange.
    pub exchange: String,
    /// Whether the exchange is declared durable.
    pub exchange_durable: bool,
    /// How a queue group's queue is named.
    pub group_queue_name: GroupQueueName,
    /// `x-expires` of declared durable queues.
    pub queue_expires: Option<Duration>,
    /// Keep dead letters in a durable queue `<topic>.dlq`.
    pub dead_letter_queue: bool,
    /// The connection name shown by the server.
    pub connection_name: String,
    /// TLS was asked for (options or an `amqps://` address): rejected at `connect()`.
    pub tls_requested: bool,
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addresses: Vec<String> = self.addresses.iter().map(|a| broker_core::redact_credentials(a)).collect();
        f.debug_struct("RabbitConfig")
            .field("addresses", &addresses)
            .field("exchange", &self.exchange)
            .field("exchange_durable", &self.exchange_durable)
            .field("group_queue_name", &self.group_queue_name)
            .field("queue_expires", &self.queue_expires)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("connection_name", &self.connection_name)
            .field("tls_requested", &self.tls_requested)
            .finish()
    }
}

impl Default for RabbitConfig {
    fn default() -> Self {
        RabbitConfig {
            addresses: vec![DEFAULT_ADDRESS.to_string()],
            exchange: DEFAULT_EXCHANGE.to_string(),
            exchange_durable: false,
            group_queue_name: GroupQueueName::Topic,
            queue_expires: None,
            dead_letter_queue: true,
            connection_name: "micro-broker".to_string(),
            tls_requested: false,
        }
    }
}

impl RabbitConfig {
    /// Reads the configuration from broker options, rejecting unknown parameters and bad values.
    pub fn from_options(options: &BrokerOptions) -> Result<Self> {
        options.validate()?;
        let mut config = RabbitConfig::default();
        if !options.addresses.is_empty() {
            config.addresses = options.addresses.iter().map(|a| a.trim().to_string()).collect();
        }
        for address in &config.addresses {
            let uri = parse_uri(address)?;
            if uri.scheme == AMQPScheme::AMQPS {
                config.tls_requested = true;
            }
        }
        config.tls_requested |= options.tls.is_some();
        for (key, value) in &options.params {
            let value = value.trim();
            match key.as_str() {
                "exchange" => {
                    let name = non_empty(key, value)?;
                    if name.len() > 255 {
                        return Err(bad_value(key, value, "at most 255 bytes"));
                    }
                    config.exchange = name;
                }
                "exchange_durable" => config.exchange_durable = parse_bool(key, value)?,
                "group_queue_name" => {
                    config.group_queue_name = match value {
                        "topic" => GroupQueueName::Topic,
                        "go-micro" | "gomicro" => GroupQueueName::GoMicro,
                        _ => return Err(bad_value(key, value, "topic or go-micro")),
                    }
                }
                "queue_expires_ms" => {
                    let ms =
                        value.parse::<u32>().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                            bad_value(key, value, "a number of milliseconds between 1 and 4294967295")
                        })?;
                    config.queue_expires = Some(Duration::from_millis(u64::from(ms)));
                }
                "dead_letter_queue" => config.dead_letter_queue = parse_bool(key, value)?,
                "connection_name" => config.connection_name = non_empty(key, value)?,
                PARAM_ENVELOPE => {
                    // Go Micro's RabbitMQ plugin already uses the native mapping: nothing to change.
                    Envelope::parse(value)?;
                }
                unknown => {
                    let known: Vec<&str> = PARAMS.iter().map(|(k, _)| *k).collect();
                    return Err(Error::unsupported(
                        NAME,
                        unknown,
                        &format!("unknown parameter; the RabbitMQ backend reads {}", known.join(", ")),
                    ));
                }
            }
        }
        Ok(config)
    }

    /// The queue of queue group `group` on `topic`.
    pub fn group_queue(&self, topic: &str, group: &str) -> String {
        match self.group_queue_name {
            GroupQueueName::Topic => format!("{topic}:{group}"),
            GroupQueueName::GoMicro => group.to_string(),
        }
    }
}

/// Parses an AMQP address, with the heartbeat defaulting to [`DEFAULT_HEARTBEAT_SECS`].
pub(crate) fn parse_uri(address: &str) -> Result<AMQPUri> {
    let mut uri = address.parse::<AMQPUri>().map_err(|e| {
        Error::invalid_input(format!(
            "RabbitMQ address {:?} is not an address like amqp://user:password@127.0.0.1:5672/%2f: {e}",
            broker_core::redact_credentials(address)
        ))
    })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::{ErrorKind, TlsOptions};

    #[test]
    fn defaults() {
        let config = RabbitConfig::from_options(&BrokerOptions::new()).unwrap();
        assert_eq!(config.addresses, vec![DEFAULT_ADDRESS]);
        assert_eq!(config.exchange, "micro");
        assert!(!config.exchange_durable);
        assert_eq!(config.group_queue("orders", "billing"), "orders:billing");
        assert!(config.dead_letter_queue && !config.tls_requested && config.queue_expires.is_none());
        let uri = parse_uri(DEFAULT_ADDRESS).unwrap();
        assert_eq!(uri.vhost, "/");
        assert_eq!(uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
    }

    #[test]
    fn params() {
        let options = BrokerOptions::new()
            .with_addresses(["amqp://u:p@h:5672/v"])
            .with_param("exchange", "events")
            .with_param("exchange_durable", "true")
            .with_param("group_queue_name", "go-micro")
            .with_param("queue_expires_ms", "60000")
            .with_param("dead_letter_queue", "false")
            .with_param("connection_name", "svc")
            .with_param("envelope", "go-micro");
        let config = RabbitConfig::from_options(&options).unwrap();
        assert_eq!(config.exchange, "events");
        assert!(config.exchange_durable && !config.dead_letter_queue);
        assert_eq!(config.group_queue("orders", "billing"), "billing");
        assert_eq!(config.queue_expires, Some(Duration::from_secs(60)));
        assert_eq!(config.connection_name, "svc");
    }

    #[test]
    fn bad_values_are_rejected() {
        for (key, value) in [
            ("exchange_durable", "maybe"),
            ("queue_expires_ms", "0"),
            ("group_queue_name", "x"),
            ("exchange", ""),
            ("envelope", "xml"),
        ] {
            let err = RabbitConfig::from_options(&BrokerOptions::new().with_param(key, value)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{key}={value}: {err}");
        }
        let err = RabbitConfig::from_options(&BrokerOptions::new().with_param("nosuch", "1")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("nosuch"), "{err}");
        let err = RabbitConfig::from_options(&BrokerOptions::new().with_addresses(["http://x:secret@h"])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn tls_is_noted_and_debug_hides_the_password() {
        let config =
            RabbitConfig::from_options(&BrokerOptions::new().with_addresses(["amqps://u:secret@h:5671/%2f"])).unwrap();
        assert!(config.tls_requested);
        assert!(!format!("{config:?}").contains("secret"));
        let config = RabbitConfig::from_options(&BrokerOptions::new().with_tls(TlsOptions::new())).unwrap();
        assert!(config.tls_requested);
    }
}
