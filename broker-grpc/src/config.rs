//! The gRPC backend's configuration, read from [`BrokerOptions`] (addresses and `params`) and,
//! for the registry, from Go Micro's `MICRO_REGISTRY` / `MICRO_REGISTRY_ADDRESS`.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use broker_core::params::{bad_value, positive};
use broker_core::{BrokerOptions, Error, Result, TlsOptions};
use broker_registry::outbox::{OutboxConfig, OverflowPolicy};

use crate::NAME;

/// The default listen address: loopback, any free port.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:0";

/// Every parameter this backend reads from [`BrokerOptions::params`], with its default.
pub const PARAMS: &[(&str, &str)] = &[
    ("registry", "memory | local | etcd (default: MICRO_REGISTRY, else local)"),
    ("registry_address", "comma-separated registry addresses (default: MICRO_REGISTRY_ADDRESS)"),
    ("advertise_address", "host:port put in the registry (default: the bound address)"),
    ("secret", "shared secret publishers send (metadata x-micro-broker-secret) and subscribers check (default: none)"),
    ("max_message_bytes", "largest encoded message sent or accepted (default 4194304, gRPC's usual limit)"),
    ("request_timeout_ms", "timeout of one delivery call (default 5000)"),
    ("max_in_flight", "deliveries in flight at once per broker (default 64)"),
    ("max_attempts", "delivery attempts of a message to one subscription before it is dropped (default 10)"),
    ("inbox_max_messages", "messages waiting per topic (default 10000)"),
    ("inbox_max_bytes", "bytes waiting per topic (default 67108864)"),
    ("inbox_total_bytes", "bytes waiting over all topics (default 268435456)"),
    ("inbox_overflow", "reject | drop_oldest | wait (default reject; wait: up to the publish timeout)"),
    ("register_ttl_ms", "registry TTL of a subscription (default 60000)"),
    ("register_interval_ms", "re-registration period (default 30000)"),
];

/// The gRPC backend's settings.
#[derive(Clone)]
pub struct GrpcConfig {
    /// Where the gRPC server listens.
    pub listen: String,
    /// What goes into the registry as the node address; the bound address when `None`.
    pub advertise: Option<String>,
    /// Registry name; `None` reads `MICRO_REGISTRY`.
    pub registry: Option<String>,
    /// Registry addresses; empty reads `MICRO_REGISTRY_ADDRESS`.
    pub registry_addresses: Vec<String>,
    /// Shared secret, sent as the metadata [`SECRET_METADATA`](crate::SECRET_METADATA) and checked.
    pub secret: Option<String>,
    /// Largest encoded `Message` a publisher sends or the server accepts.
    pub max_message_bytes: usize,
    /// Timeout of one delivery call (connecting included).
    pub request_timeout: Duration,
    /// The inbox bounds and delivery limits.
    pub outbox: OutboxConfig,
    /// Registry TTL.
    pub register_ttl: Duration,
    /// Re-registration period.
    pub register_interval: Duration,
    /// TLS: the endpoint's certificate and what publishers trust (feature `tls`; see [`crate::tls`]).
    pub tls: Option<TlsOptions>,
}

impl fmt::Debug for GrpcConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcConfig")
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("registry", &self.registry)
            .field("registry_addresses", &self.registry_addresses)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("max_message_bytes", &self.max_message_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("outbox", &self.outbox)
            .field("register_ttl", &self.register_ttl)
            .field("register_interval", &self.register_interval)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            listen: DEFAULT_ADDRESS.to_string(),
            advertise: None,
            registry: None,
            registry_addresses: Vec::new(),
            secret: None,
            max_message_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(5),
            outbox: OutboxConfig {
                max_in_flight: 64,
                max_attempts: 10,
                inbox_max_messages: 10_000,
                inbox_max_bytes: 64 * 1024 * 1024,
                inbox_total_bytes: 256 * 1024 * 1024,
                inbox_overflow: OverflowPolicy::Reject,
            },
            register_ttl: Duration::from_secs(60),
            register_interval: Duration::from_secs(30),
            tls: None,
        }
    }
}

impl GrpcConfig {
    /// Reads the configuration from broker options, rejecting unknown parameters and bad values.
    pub fn from_options(options: &BrokerOptions) -> Result<Self> {
        options.validate()?;
        if let Some(tls) = &options.tls {
            crate::tls::check(tls)?;
        }
        let mut config = GrpcConfig { tls: options.tls.clone(), ..GrpcConfig::default() };
        match options.addresses.as_slice() {
            [] => {}
            [one] => {
                let listen = one.trim().trim_start_matches("grpc://").trim_start_matches("http://");
                check_socket_address("listen address", listen)?;
                config.listen = listen.to_string();
            }
            many => {
                return Err(Error::invalid_input(format!(
                    "the gRPC backend listens on one address, got {}: {many:?}",
                    many.len()
                )));
            }
        }
        let outbox = &mut config.outbox;
        for (key, value) in &options.params {
            let value = value.trim();
            match key.as_str() {
                "registry" => config.registry = Some(value.to_string()),
                "registry_address" => config.registry_addresses = broker_core::parse_addresses(value),
                "advertise_address" => {
                    check_socket_address("advertise_address", value)?;
                    config.advertise = Some(value.to_string());
                }
                "secret" => {
                    if value.is_empty() {
                        return Err(Error::invalid_input("parameter `secret` must not be empty"));
                    }
                    config.secret = Some(value.to_string());
                }
                "max_message_bytes" => config.max_message_bytes = positive(key, value)?,
                "request_timeout_ms" => config.request_timeout = Duration::from_millis(positive(key, value)?),
                "max_in_flight" => outbox.max_in_flight = positive(key, value)?,
                "max_attempts" => outbox.max_attempts = positive(key, value)?,
                "inbox_max_messages" => outbox.inbox_max_messages = positive(key, value)?,
                "inbox_max_bytes" => outbox.inbox_max_bytes = positive(key, value)?,
                "inbox_total_bytes" => outbox.inbox_total_bytes = positive(key, value)?,
                "inbox_overflow" => {
                    outbox.inbox_overflow =
                        OverflowPolicy::parse(value).ok_or_else(|| bad_value(key, value, OverflowPolicy::VALUES))?
                }
                "register_ttl_ms" => config.register_ttl = Duration::from_millis(positive(key, value)?),
                "register_interval_ms" => config.register_interval = Duration::from_millis(positive(key, value)?),
                unknown => {
                    let known: Vec<&str> = PARAMS.iter().map(|(k, _)| *k).collect();
                    return Err(Error::unsupported(
                        NAME,
                        unknown,
                        &format!("unknown parameter; the gRPC backend reads {}", known.join(", ")),
                    ));
                }
            }
        }
        if config.register_interval >= config.register_ttl {
            return Err(Error::invalid_input(format!(
                "register_interval ({:?}) must be shorter than register_ttl ({:?}), or subscriptions expire between heartbeats",
                config.register_interval, config.register_ttl
            )));
        }
        Ok(config)
    }
}

fn check_socket_address(what: &str, value: &str) -> Result<()> {
    value
        .parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|e| Error::invalid_input(format!("{what} {value:?} is not an IP:port address like 127.0.0.1:0 ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::{ErrorKind, TlsOptions};

    #[test]
    fn defaults() {
        let config = GrpcConfig::from_options(&BrokerOptions::new()).unwrap();
        assert_eq!(config.listen, DEFAULT_ADDRESS);
        assert_eq!(config.max_message_bytes, 4 * 1024 * 1024);
        assert_eq!(config.outbox.max_attempts, 10);
        assert_eq!(config.register_ttl, Duration::from_secs(60));
    }

    #[test]
    fn params_are_read() {
        let options = BrokerOptions::new()
            .with_addresses(["grpc://127.0.0.1:8080"])
            .with_param("secret", "hunter2")
            .with_param("inbox_overflow", "drop_oldest")
            .with_param("registry", "memory")
            .with_param("max_message_bytes", "1024")
            .with_param("registry_address", "a, b");
        let config = GrpcConfig::from_options(&options).unwrap();
        assert_eq!(config.listen, "127.0.0.1:8080");
        assert_eq!(config.outbox.inbox_overflow, OverflowPolicy::DropOldest);
        assert_eq!(config.max_message_bytes, 1024);
        assert_eq!(config.registry_addresses, vec!["a", "b"]);
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn bad_input_is_named() {
        let cases = [
            (BrokerOptions::new().with_addresses(["localhost"]), ErrorKind::InvalidInput, "IP:port"),
            (
                BrokerOptions::new().with_addresses(["127.0.0.1:1", "127.0.0.1:2"]),
                ErrorKind::InvalidInput,
                "one address",
            ),
            (BrokerOptions::new().with_param("max_message_bytes", "0"), ErrorKind::InvalidInput, "max_message_bytes"),
            (BrokerOptions::new().with_param("dialect", "current"), ErrorKind::Unsupported, "dialect"),
            (BrokerOptions::new().with_param("register_interval_ms", "70000"), ErrorKind::InvalidInput, "register_ttl"),
            (
                BrokerOptions::new().with_tls(TlsOptions::new()),
                if crate::tls::ENABLED { ErrorKind::InvalidInput } else { ErrorKind::Unsupported },
                "tls",
            ),
        ];
        for (options, kind, needle) in cases {
            let err = GrpcConfig::from_options(&options).unwrap_err();
            assert_eq!(err.kind(), kind, "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
    }
}
