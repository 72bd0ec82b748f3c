//! The Redis backends' configuration, read from [`BrokerOptions`]: the address (first of
//! `addresses`, else [`DEFAULT_ADDRESS`]) and the parameters in [`PARAMS`].

use std::fmt;
use std::time::Duration;

use broker_core::codec::Envelope;
use broker_core::{BrokerOptions, Error, Result, redact_credentials};

/// The address used when none is given (option `addresses` or `MICRO_BROKER_ADDRESS`).
pub const DEFAULT_ADDRESS: &str = "redis://127.0.0.1:6379";

/// Every parameter these backends read from [`BrokerOptions::params`], with its default.
pub const PARAMS: &[(&str, &str)] = &[
    ("envelope", "native | go-micro (MICRO_BROKER_ENVELOPE); see the crate docs for what each writes"),
    ("maxlen", "redis-streams: approximate MAXLEN of each stream, trimmed on XADD (default 100000)"),
    ("claim_idle_ms", "redis-streams: idle time after which an unacknowledged entry is claimed again (default 30000)"),
    ("block_ms", "redis-streams: how long one XREADGROUP blocks (default 1000)"),
    ("read_count", "redis-streams: entries read per XREADGROUP (default 64)"),
];

/// The settings of a Redis broker.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// The server URL (`redis://[user:password@]host:port[/db]`, or `rediss://` for TLS).
    pub url: String,
    /// How messages are written; see the crate docs.
    pub envelope: Envelope,
    /// Streams: approximate maximum length of a stream (`XADD MAXLEN ~`).
    pub maxlen: u64,
    /// Streams: an entry pending (read, not acked) longer than this is claimed again (`XAUTOCLAIM`).
    pub claim_idle: Duration,
    /// Streams: the `BLOCK` of one `XREADGROUP`.
    pub block: Duration,
    /// Streams: the `COUNT` of one `XREADGROUP`.
    pub read_count: usize,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_credentials(&self.url))
            .field("envelope", &self.envelope)
            .field("maxlen", &self.maxlen)
            .field("claim_idle", &self.claim_idle)
            .field("block", &self.block)
            .field("read_count", &self.read_count)
            .finish()
    }
}

impl RedisConfig {
    /// Reads the configuration, rejecting unknown parameters and malformed values with `InvalidInput`.
    pub fn from_options(options: &BrokerOptions) -> Result<RedisConfig> {
        options.validate()?;
        for key in options.params.keys() {
            if !PARAMS.iter().any(|(name, _)| name == key) {
                let known: Vec<&str> = PARAMS.iter().map(|(name, _)| *name).collect();
                return Err(Error::invalid_input(format!(
                    "unknown redis broker parameter {key:?}; known: {}",
                    known.join(", ")
                )));
            }
        }
        if options.addresses.len() > 1 {
            return Err(Error::invalid_input(format!(
                "the redis backends connect to one server; got {} addresses",
                options.addresses.len()
            )));
        }
        let url = options.addresses.first().map(|a| a.trim().to_string()).unwrap_or_else(|| DEFAULT_ADDRESS.into());
        let url = if url.contains("://") { url } else { format!("redis://{url}") };
        if options.tls.is_some() {
            return Err(Error::unsupported(
                "redis",
                "tls",
                "TLS options are not supported by this build; use a rediss:// URL only with a redis crate built with TLS",
            ));
        }
        let number = |key: &str, default: u64| -> Result<u64> {
            match options.params.get(key) {
                None => Ok(default),
                Some(v) => broker_core::params::positive(key, v),
            }
        };
        let config = RedisConfig {
            envelope: Envelope::from_params(&options.params)?,
            maxlen: number("maxlen", 100_000)?,
            claim_idle: Duration::from_millis(number("claim_idle_ms", 30_000)?),
            block: Duration::from_millis(number("block_ms", 1_000)?),
            read_count: usize::try_from(number("read_count", 64)?).unwrap_or(64),
            url,
        };
        redis::Client::open(config.url.as_str()).map_err(|e| {
            Error::invalid_input(format!("invalid redis address {}: {e}", redact_credentials(&config.url)))
                .with_source(e)
        })?;
        Ok(config)
    }

    /// The address with any password hidden, for messages and logs.
    pub fn redacted_url(&self) -> String {
        redact_credentials(&self.url)
    }
}
