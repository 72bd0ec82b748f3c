//! # micro-broker: Go Micro's Broker for Rust
//!
//! One async publish/subscribe contract ([`Broker`], [`Message`], [`Event`], [`Subscriber`],
//! options, [`Capabilities`], one [`Error`]) and many message systems behind it. As in Go Micro,
//! the backend is chosen at deploy time by name: `MICRO_BROKER=nats` and
//! `MICRO_BROKER_ADDRESS=nats://10.0.0.1:4222,nats://10.0.0.2:4222` (comma-separated).
//!
//! This is the crate applications depend on. It re-exports everything of `broker-core` (the
//! contract, the plugin registry and the in-memory backend) and links the backend crates selected
//! by its cargo features, so that [`from_env`] can find them by name.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use micro_broker::{BrokerExt, Event, PublishOptions, SubscribeOptions};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct User { id: u64, email: String }
//!
//! // MICRO_BROKER picks the backend (default "http", linked by the default feature),
//! // MICRO_BROKER_ADDRESS its addresses. Here: the in-process backend, by name.
//! let broker = micro_broker::from_name("memory", micro_broker::BrokerOptions::default())?;
//! broker.connect().await?;
//!
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let sub = broker
//!     .subscribe_json("user.registered", move |user: User, _event: Event| {
//!         let tx = tx.clone();
//!         async move { tx.send(user.email)?; Ok(()) }
//!     }, SubscribeOptions::default())
//!     .await?;
//!
//! let ada = User { id: 1, email: "ada@example.com".into() };
//! broker.publish_json("user.registered", &ada, PublishOptions::default()).await?;
//! assert_eq!(rx.recv().await.as_deref(), Some("ada@example.com"));
//!
//! sub.unsubscribe().await?;
//! broker.disconnect().await?;
//! # Ok::<(), micro_broker::Error>(())
//! # }).unwrap();
//! ```
//!
//! ## Backends and cargo features
//!
//! | `MICRO_BROKER` | cargo feature | crate | what |
//! |---|---|---|---|
//! | `memory` | none: always linked | `broker-core` | in-process only |
//! | `http` | `http` (default) | `broker-http` | peer-to-peer HTTP, no server; [`http`] |
//! | `nats` | `nats` | `broker-nats` | core NATS, or JetStream with `jetstream=true` |
//! | `rabbitmq` | `rabbitmq` | `broker-rabbitmq` | AMQP 0.9.1, Go Micro's exchange layout |
//! | `kafka` | `kafka` (`kafka-ssl` adds TLS) | `broker-kafka` | rdkafka with a bundled librdkafka |
//! | `redis`, `redis-streams` | `redis` | `broker-redis` | Pub/Sub, or Streams with groups |
//! | `gcp-pubsub` | `gcp-pubsub` | `broker-gcp-pubsub` | Google Cloud Pub/Sub (or its emulator, `PUBSUB_EMULATOR_HOST`) |
//!
//! The default feature is `http`, Go Micro's default backend, which needs no server: with no
//! `MICRO_BROKER` set, [`from_env`] builds it. The feature `all` links every backend that builds
//! quickly with cargo alone (`http`, `nats`, `rabbitmq`, `redis`). Two features are in neither
//! `default` nor `all` because of what they build: `etcd` adds the etcd registry to the http
//! backend (`MICRO_REGISTRY=etcd`) and needs `protoc`; `kafka` compiles librdkafka's C code (a
//! few minutes). Nor is `gcp-pubsub`, Google's Pub/Sub client: a cloud SDK, minutes of Rust to
//! build. [`available`] lists what a program really linked, and [`KNOWN_BACKENDS`] every
//! backend of the project.
//!
//! The http backend finds subscribers through a registry, chosen with `MICRO_REGISTRY`
//! (`memory`: one process; `local`, the default: lease files, every process of one user on one
//! host; `etcd`: several hosts) and `MICRO_REGISTRY_ADDRESS`, or the broker parameters
//! `registry` / `registry_address`.
//!
//! ## The linking pitfall
//!
//! Backends register themselves with [`register_plugin!`], which collects entries when the
//! program starts. Rust links only the crates a program names: a backend crate that is a
//! dependency but that no code refers to is dropped by the linker, and its plugin is silently
//! missing. [`from_name`] then answers [`ErrorKind::BackendNotLinked`] (a known backend that is
//! not linked: the message names the feature to enable) or [`ErrorKind::UnknownBackend`] (a name
//! no backend has: the message lists the linked names).
//!
//! A program that depends on a backend crate directly, without this facade, names it once:
//!
//! ```ignore
//! use broker_nats as _; // links the `nats` plugin
//! ```
//!
//! This facade does exactly that for each enabled feature.
//!
//! ## Adding a backend crate to this facade
//!
//! For a new crate `broker-nats` (plugin `nats`):
//!
//! 1. `micro-broker/Cargo.toml`: an optional dependency and a feature that turns it on, and the
//!    feature added to `all`:
//!    ```toml
//!    [dependencies]
//!    broker-nats = { workspace = true, optional = true }
//!
//!    [features]
//!    nats = ["dep:broker-nats"]
//!    all = ["nats"]
//!    ```
//! 2. `micro-broker/src/lib.rs`: the line that links it, under the same feature:
//!    ```ignore
//!    #[cfg(feature = "nats")]
//!    use broker_nats as _;
//!    ```
//!    Without this line the feature compiles the crate but the linker may drop it, and with it
//!    the plugin registration.
//! 3. The backend tables of this page and of `README.md`.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub use broker_core::*;

// Backend crates are linked here, one line each, under their cargo feature (see the crate docs):
#[cfg(feature = "gcp-pubsub")]
use broker_gcp_pubsub as _;
#[cfg(feature = "http")]
use broker_http as _;
#[cfg(feature = "kafka")]
use broker_kafka as _;
#[cfg(feature = "nats")]
use broker_nats as _;
#[cfg(feature = "rabbitmq")]
use broker_rabbitmq as _;
#[cfg(feature = "redis")]
use broker_redis as _;

/// The Google Cloud Pub/Sub backend's crate (plugin `gcp-pubsub`).
#[cfg(feature = "gcp-pubsub")]
pub use broker_gcp_pubsub as gcp_pubsub;
/// The `http` backend's crate ([`broker_http`](https://docs.rs/broker-http)): [`http::HttpBroker`]
/// with its parameters, statistics and confirmed publish, for programs that want more than the
/// [`Broker`] contract. Linked by the feature `http` (a default feature).
#[cfg(feature = "http")]
pub use broker_http as http;
/// The Kafka backend's crate (plugin `kafka`).
#[cfg(feature = "kafka")]
pub use broker_kafka as kafka;
/// The NATS backend's crate (plugin `nats`: core NATS, or JetStream with `jetstream=true`).
#[cfg(feature = "nats")]
pub use broker_nats as nats;
/// The RabbitMQ backend's crate (plugin `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub use broker_rabbitmq as rabbitmq;
/// The Redis backends' crate (plugins `redis` and `redis-streams`).
#[cfg(feature = "redis")]
pub use broker_redis as redis;

/// The README's examples, compiled and run as doctests so that they match the real API. They
/// use `from_env()`, whose default backend is `http`: only with the feature that links it.
#[cfg(all(doctest, feature = "http"))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_always_linked() {
        assert!(available().iter().any(|p| p.name == "memory"));
        let broker = from_name("memory", BrokerOptions::default()).unwrap();
        assert_eq!(broker.name(), "memory");
    }

    #[cfg(feature = "http")]
    #[test]
    fn http_is_linked_by_the_default_feature() {
        assert!(available().iter().any(|p| p.name == "http"));
        assert_eq!(plugin(DEFAULT_BACKEND).map(|p| p.name).ok(), Some("http"));
        let broker = from_name("http", BrokerOptions::default()).unwrap();
        assert_eq!(broker.name(), http::NAME);
    }

    #[test]
    fn every_known_backend_either_links_or_says_which_feature_links_it() {
        for known in KNOWN_BACKENDS {
            match plugin(known.name) {
                Ok(found) => assert_eq!(found.name, known.name),
                Err(err) => {
                    assert_eq!(err.kind(), ErrorKind::BackendNotLinked, "{err}");
                    assert!(err.to_string().contains(known.facade_feature), "{err}");
                }
            }
        }
    }
}
