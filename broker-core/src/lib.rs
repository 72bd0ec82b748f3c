//! # broker-core: the micro-broker contract
//!
//! Go Micro's `Broker` for Rust: one async publish/subscribe contract ([`Broker`], [`Message`],
//! [`Event`], [`Subscriber`], options), many message systems behind it, and the backend chosen at
//! deploy time by name (`MICRO_BROKER=nats`) through the plugin registry ([`from_env`]).
//!
//! This crate knows no network backend. It holds the contract, the [`Capabilities`] check that
//! rejects options a backend cannot honour, one [`Error`] type, the registry, and the
//! in-process [`MemoryBroker`] (plugin `memory`).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use broker_core::{handler_fn, Event, Message, PublishOptions, SubscribeOptions};
//!
//! // from_env() reads MICRO_BROKER and MICRO_BROKER_ADDRESS; its default, `http`, is in broker-http.
//! let broker = broker_core::from_name("memory", broker_core::BrokerOptions::default())?;
//! broker.connect().await?;
//! let (done, mut got) = tokio::sync::mpsc::unbounded_channel();
//! let _sub = broker
//!     .subscribe("greetings", handler_fn(move |event: Event| {
//!         let done = done.clone();
//!         async move { done.send(event.message().body_str().map(str::to_owned))?; Ok(()) }
//!     }), SubscribeOptions::default())
//!     .await?;
//! broker.publish("greetings", Message::new("hello"), PublishOptions::default()).await?;
//! assert_eq!(got.recv().await.flatten().as_deref(), Some("hello"));
//! broker.disconnect().await?;
//! # Ok::<(), broker_core::Error>(())
//! # }).unwrap();
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod broker;
mod capabilities;
pub mod codec;
mod error;
mod event;
pub mod layers;
pub mod memory;
mod message;
mod options;
pub mod params;
mod plugin;
mod running;
mod topic_hash;

pub use broker::{
    Broker, BrokerExt, Handler, HandlerResult, Subscriber, handler_fn, run_handler, running_handler_of, scope_handler,
    wait_for_other_handlers,
};
pub use capabilities::Capabilities;
pub use error::{BoxError, Error, ErrorKind, Result};
pub use event::{Acknowledger, Event, EventBuilder, NoAcknowledger, Settlement};
pub use layers::{BrokerLayerExt, CodecExt, Layer};
pub use memory::MemoryBroker;
pub use message::{Headers, JSON_CONTENT_TYPE, Message, headers};
pub use options::{
    BrokerOptions, ENV_BROKER, ENV_BROKER_ADDRESS, PublishOptions, SubscribeOptions, TlsOptions, parse_addresses,
    redact_credentials, validate_topic,
};
pub use plugin::{
    DEFAULT_BACKEND, Factory, KNOWN_BACKENDS, KnownBackend, Plugin, available, backend_name, from_env, from_lookup,
    from_name, plugin,
};
pub use running::RunningState;
pub use topic_hash::{TopicHash, TopicHasher};

#[doc(hidden)]
pub mod __private {
    pub use inventory;
}
