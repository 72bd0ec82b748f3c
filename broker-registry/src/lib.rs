//! # broker-registry: service discovery for the peer-to-peer backends
//!
//! Go Micro's `registry.Registry`, reduced to what a broker needs: register a service node with a
//! TTL, deregister it, look a service up (one [`Service`] per version), and watch for changes.
//! The data model and its JSON are Go Micro's own (`{"name":…,"version":…,"metadata":null,
//! "endpoints":null,"nodes":[{"id":…,"address":…,"metadata":{…}}]}`), so a Go Micro service and a
//! Rust one can share an etcd registry.
//!
//! Implementations, chosen by `MICRO_REGISTRY` / `MICRO_REGISTRY_ADDRESS` (Go Micro's variables)
//! through [`from_env`] or by name through [`from_name`]:
//! - `memory`: in-process ([`MemoryRegistry`]); brokers of one process find each other.
//! - `local`: the zero-configuration default ([`LocalRegistry`]): lease files in a per-user
//!   runtime directory, so processes on one host find each other with no server and no multicast.
//! - `etcd` (cargo feature `etcd`): Go Micro's etcd layout, for several hosts.
//!
//! [`Cache`] keeps lookups local and fresh by watching. With the feature `outbox`, what the
//! peer-to-peer backends (`http`, `grpc`) share beside the registry: `outbox`, the publisher
//! (a bounded per-topic inbox, delivery to the nodes the registry lists, retry with backoff and
//! failover within a queue group, over a backend's own transport), and `endpoint`, the
//! subscriber side (local subscriptions by node id, one delivery with its ack and dead letter).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::time::Duration;
//! use broker_registry::{MemoryRegistry, Node, Registry, Service};
//!
//! let registry = MemoryRegistry::new();
//! let service = Service::new("topic:events", "ff.http.broadcast")
//!     .with_node(Node::new("events-1", "127.0.0.1:40123").with_metadata("secure", "false"));
//! registry.register(&service, Duration::from_secs(60)).await?;
//! let found = registry.get_service("topic:events").await?;
//! assert_eq!(found, vec![service]);
//! # Ok::<(), broker_registry::Error>(())
//! # }).unwrap();
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod cache;
mod common;
#[cfg(feature = "outbox")]
pub mod endpoint;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod local;
pub mod memory;
#[cfg(feature = "outbox")]
pub mod outbox;
mod select;
#[cfg(feature = "tls")]
pub mod tls;

pub use cache::{Cache, DEFAULT_CACHE_TTL};
#[cfg(feature = "etcd")]
pub use etcd::EtcdRegistry;
pub use local::LocalRegistry;
pub use memory::MemoryRegistry;
pub use select::{from_env, from_lookup, from_name};

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

pub use broker_core::{Error, ErrorKind, Result};

/// A service node: one subscription's endpoint, in Go Micro's JSON shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Unique node id.
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// String metadata (`secure`, `broker`, `topic`, ...). Written with sorted keys, as Go does.
    #[serde(default, deserialize_with = "null_as_default", serialize_with = "common::sorted_map")]
    pub metadata: HashMap<String, String>,
}

/// A service version with its nodes, in Go Micro's JSON shape (`metadata` and `endpoints` are
/// written as `null`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Service name (`topic:<topic>` or `micro.http.broker` for the HTTP broker).
    pub name: String,
    /// Version (the queue group, or `ff.http.broadcast`).
    pub version: String,
    /// Service metadata: always `null` on the wire for brokers; kept when read.
    #[serde(default, serialize_with = "common::sorted_optional_map")]
    pub metadata: Option<HashMap<String, String>>,
    /// Endpoints: always `null` for brokers; kept as raw JSON when read.
    #[serde(default)]
    pub endpoints: Option<serde_json::Value>,
    /// Nodes of this version.
    #[serde(default, deserialize_with = "null_as_default")]
    pub nodes: Vec<Node>,
}

fn null_as_default<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

impl Node {
    /// A node with no metadata.
    pub fn new(id: impl Into<String>, address: impl Into<String>) -> Self {
        Node { id: id.into(), address: address.into(), metadata: HashMap::new() }
    }

    /// Adds one metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

impl Service {
    /// A service version with no nodes, `null` metadata and `null` endpoints (what brokers write).
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Service { name: name.into(), version: version.into(), metadata: None, endpoints: None, nodes: Vec::new() }
    }

    /// Adds a node.
    pub fn with_node(mut self, node: Node) -> Self {
        self.nodes.push(node);
        self
    }
}

/// What changed, in a [`WatchEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A node was registered for the first time.
    Create,
    /// A node was registered again (heartbeat) or changed.
    Update,
    /// A node was deregistered or its TTL expired.
    Delete,
}

/// One change seen by a watcher: `service` holds the one node concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// What happened.
    pub action: Action,
    /// The service version and the node concerned.
    pub service: Service,
}

/// A stream of changes. Ends when the registry is closed; an `Err` item says the watch broke
/// (the watcher should look services up again and re-watch).
pub type Watcher = BoxStream<'static, Result<WatchEvent>>;

/// Service discovery, as Go Micro's `registry.Registry`.
#[async_trait]
pub trait Registry: Send + Sync + fmt::Debug + 'static {
    /// Registers every node of `service` under its name and version, expiring after `ttl` unless
    /// registered again. Registering an existing node again refreshes its TTL. A zero `ttl` never
    /// expires. A node is identified by service name and node id (as Go Micro's etcd key), so
    /// registering it under another version moves it. A service with no node is an
    /// [`ErrorKind::InvalidInput`] error.
    async fn register(&self, service: &Service, ttl: Duration) -> Result<()>;
    /// Removes every node of `service` (matched by name, version and node id).
    async fn deregister(&self, service: &Service) -> Result<()>;
    /// The live versions of service `name`, one [`Service`] per version with all its nodes.
    /// An unknown name is an empty list, not an error.
    async fn get_service(&self, name: &str) -> Result<Vec<Service>>;
    /// Watches changes of service `name` (every service when `None`).
    async fn watch(&self, name: Option<&str>) -> Result<Watcher>;
    /// The implementation's name: `memory`, `local` or `etcd`.
    fn name(&self) -> &'static str;
}

/// Environment variable naming the registry, as in Go Micro.
pub const ENV_REGISTRY: &str = "MICRO_REGISTRY";
/// Environment variable with the registry's address(es), as in Go Micro.
pub const ENV_REGISTRY_ADDRESS: &str = "MICRO_REGISTRY_ADDRESS";
/// The registry used when none is named.
pub const DEFAULT_REGISTRY: &str = "local";
/// Every registry name this crate knows, compiled in or not.
pub const KNOWN_REGISTRIES: &[&str] = &["memory", "local", "etcd"];

/// Shared handle to a registry.
pub type SharedRegistry = Arc<dyn Registry>;
