//! The plugin registry: backends register a name and a factory with [`register_plugin!`];
//! [`from_name`] and [`from_env`] build one by name at run time.
//!
//! # The linking pitfall
//!
//! Registration uses [`inventory`], which collects entries at program start. Rust links only the
//! crates a program refers to: a backend crate that is a dependency but that no code names is
//! left out by the linker, and its plugin is silently missing from [`available`]. A program that
//! picks its backend by name therefore names each backend crate once:
//!
//! ```text
//! use broker_nats as _; // links the `nats` plugin
//! ```
//!
//! or depends on the `micro-broker` facade crate, whose cargo features do this. The
//! `integration-tests` crate proves both halves (`tests/linking_*.rs`).

use std::sync::Arc;

use crate::broker::Broker;
use crate::capabilities::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::options::{BrokerOptions, ENV_BROKER};

/// The backend [`from_env`] picks when `MICRO_BROKER` is unset or empty.
pub const DEFAULT_BACKEND: &str = "http";

/// Builds a broker from options. Must not do I/O: connecting is `connect()`'s job.
pub type Factory = fn(BrokerOptions) -> Result<Arc<dyn Broker>>;

/// A registered backend.
#[derive(Debug)]
pub struct Plugin {
    /// The name `MICRO_BROKER` selects (`memory`, `http`, `nats`, ...).
    pub name: &'static str,
    /// One line saying what it is.
    pub description: &'static str,
    /// What it really does.
    pub capabilities: Capabilities,
    /// Builds an unconnected broker.
    pub factory: Factory,
}

inventory::collect!(Plugin);

/// Registers a backend with the plugin registry. One call per backend crate, at item level.
///
/// ```
/// use std::sync::Arc;
/// use broker_core::{register_plugin, Broker, BrokerOptions, Capabilities, MemoryBroker, Result};
///
/// fn build(options: BrokerOptions) -> Result<Arc<dyn Broker>> {
///     Ok(Arc::new(MemoryBroker::with_options(options)?))
/// }
/// register_plugin! {
///     name: "doc-example",
///     description: "an example registration",
///     capabilities: Capabilities::NONE,
///     factory: build,
/// }
/// # fn main() {
/// assert!(broker_core::available().iter().any(|p| p.name == "doc-example"));
/// # }
/// ```
#[macro_export]
macro_rules! register_plugin {
    (name: $name:expr, description: $description:expr, capabilities: $capabilities:expr, factory: $factory:expr $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::Plugin {
                name: $name,
                description: $description,
                capabilities: $capabilities,
                factory: $factory,
            }
        }
    };
}

/// A backend this project provides, and how to link it when it is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownBackend {
    /// The plugin name.
    pub name: &'static str,
    /// The crate that registers it.
    pub crate_name: &'static str,
    /// The feature of the `micro-broker` facade crate that links it.
    pub facade_feature: &'static str,
}

/// Every backend of this project, linked or not: what the "not linked" error points to.
pub const KNOWN_BACKENDS: &[KnownBackend] = &[
    KnownBackend { name: "memory", crate_name: "broker-core", facade_feature: "(always linked)" },
    KnownBackend { name: "http", crate_name: "broker-http", facade_feature: "http" },
    KnownBackend { name: "nats", crate_name: "broker-nats", facade_feature: "nats" },
    KnownBackend { name: "rabbitmq", crate_name: "broker-rabbitmq", facade_feature: "rabbitmq" },
    KnownBackend { name: "kafka", crate_name: "broker-kafka", facade_feature: "kafka" },
    KnownBackend { name: "redis", crate_name: "broker-redis", facade_feature: "redis" },
    KnownBackend { name: "redis-streams", crate_name: "broker-redis", facade_feature: "redis" },
    KnownBackend { name: "grpc", crate_name: "broker-grpc", facade_feature: "grpc" },
    KnownBackend { name: "sqs", crate_name: "broker-sqs", facade_feature: "sqs" },
    KnownBackend { name: "gcp-pubsub", crate_name: "broker-gcp-pubsub", facade_feature: "gcp-pubsub" },
];

/// The linked plugins, sorted by name (the first registration of a name wins).
pub fn available() -> Vec<&'static Plugin> {
    let mut plugins: Vec<&'static Plugin> = inventory::iter::<Plugin>.into_iter().collect();
    plugins.sort_by_key(|p| p.name);
    plugins.dedup_by_key(|p| p.name);
    plugins
}

/// The linked plugin called `name`.
pub fn plugin(name: &str) -> Result<&'static Plugin> {
    let plugins = available();
    if let Some(found) = plugins.iter().find(|p| p.name == name) {
        return Ok(found);
    }
    let linked = plugins.iter().map(|p| p.name).collect::<Vec<_>>().join(", ");
    match KNOWN_BACKENDS.iter().find(|k| k.name == name) {
        Some(known) => {
            let snake = known.crate_name.replace('-', "_");
            Err(Error::new(
                ErrorKind::BackendNotLinked,
                format!(
                    "{name:?} is not linked into this program (linked: {linked}); \
                     enable the cargo feature \"{feature}\" of the micro-broker crate, \
                     or depend on the {crate_name} crate and add the line `use {snake} as _;`",
                    feature = known.facade_feature,
                    crate_name = known.crate_name,
                ),
            ))
        }
        None => Err(Error::new(
            ErrorKind::UnknownBackend,
            format!(
                "{name:?} is not a broker backend; linked backends: {linked} (all known backends: {})",
                KNOWN_BACKENDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Builds the backend called `name` with `options` (not connected yet).
///
/// ```
/// let broker = broker_core::from_name("memory", broker_core::BrokerOptions::default()).unwrap();
/// assert_eq!(broker.name(), "memory");
/// let err = broker_core::from_name("nosuch", Default::default()).unwrap_err();
/// assert_eq!(err.kind(), broker_core::ErrorKind::UnknownBackend);
/// ```
pub fn from_name(name: &str, options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    options.validate()?;
    (plugin(name)?.factory)(options)
}

/// Builds the backend named by `MICRO_BROKER` (default [`DEFAULT_BACKEND`]) with the addresses
/// in `MICRO_BROKER_ADDRESS`, as Go Micro does. Not connected yet.
pub fn from_env() -> Result<Arc<dyn Broker>> {
    from_lookup(|key| std::env::var(key).ok())
}

/// Like [`from_env`] with a custom variable lookup.
pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Arc<dyn Broker>> {
    let name = backend_name(&lookup);
    from_name(&name, BrokerOptions::from_lookup(lookup))
}

/// The backend name `MICRO_BROKER` selects through `lookup`, trimmed; the default when unset or blank.
pub fn backend_name(lookup: impl Fn(&str) -> Option<String>) -> String {
    lookup(ENV_BROKER)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_BACKEND.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::ENV_BROKER_ADDRESS;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |key| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string())
    }

    #[test]
    fn memory_is_linked_and_listed() {
        let names: Vec<_> = available().iter().map(|p| p.name).collect();
        assert!(names.contains(&"memory"), "{names:?}");
        let mem = plugin("memory").unwrap();
        assert!(mem.capabilities.queue_groups && mem.capabilities.redelivery);
        assert!(!mem.description.is_empty());
    }

    #[test]
    fn unknown_name_lists_linked_backends() {
        let err = from_name("nosuch", BrokerOptions::default()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownBackend);
        let text = err.to_string();
        assert!(text.contains("\"nosuch\"") && text.contains("linked backends: ") && text.contains("memory"), "{text}");
    }

    #[test]
    fn known_but_unlinked_name_says_how_to_link_it() {
        let err = from_name("nats", BrokerOptions::default()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BackendNotLinked);
        let text = err.to_string();
        assert!(text.contains("feature \"nats\""), "{text}");
        assert!(text.contains("broker-nats") && text.contains("use broker_nats as _;"), "{text}");
        let err = from_name("redis-streams", BrokerOptions::default()).unwrap_err();
        assert!(err.to_string().contains("use broker_redis as _;"), "{err}");
    }

    #[test]
    fn env_selects_backend_and_addresses() {
        assert_eq!(backend_name(env(&[])), DEFAULT_BACKEND);
        assert_eq!(backend_name(env(&[(ENV_BROKER, "  ")])), DEFAULT_BACKEND);
        assert_eq!(backend_name(env(&[(ENV_BROKER, " memory ")])), "memory");
        let broker = from_lookup(env(&[(ENV_BROKER, "memory"), (ENV_BROKER_ADDRESS, "a:1,b:2")])).unwrap();
        assert_eq!(broker.name(), "memory");
        assert_eq!(broker.options().addresses, vec!["a:1", "b:2"]);
        let err = from_lookup(env(&[(ENV_BROKER, "nosuch")])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownBackend);
    }

    #[test]
    fn invalid_options_are_rejected_before_building() {
        let opts = BrokerOptions::default().with_addresses([""]);
        assert_eq!(from_name("memory", opts).unwrap_err().kind(), ErrorKind::InvalidInput);
    }
}
