//! Cross-cutting layers over any [`Broker`], written once over the trait and never per backend.
//!
//! As in tower, a layer is a small value that takes a broker and returns a broker
//! ([`Layer::layer`]); the returned wrapper implements [`Broker`] by delegating to the inner one
//! (`name()`, `capabilities()`, `connect()`, ...) and adds one concern, mostly by wrapping the
//! handler given to `subscribe()`. The `Subscriber` of the inner broker is returned as
//! it is. No backend knows that a layer exists.
//!
//! | layer | wrapper | concern |
//! | --- | --- | --- |
//! | [`TracingLayer`] | [`Traced`] | a span per publish and per handled message, W3C `traceparent` across processes |
//! | [`MetricsLayer`] | [`Metered`] | counters and histograms through the `metrics` facade |
//! | [`RetryLayer`] | [`Retrying`] | retries with backoff, then `<topic>.dlq`; defers to native redelivery |
//! | [`ConcurrencyLayer`] | [`Limited`] | per-subscription limits on running handlers and in-flight messages |
//!
//! Layers compose in any order with [`BrokerLayerExt::with_layer`]. The last one applied is the
//! outermost for `publish()`, and its handler wrapper is the one closest to your handler; so apply
//! the tracing layer last to get one `process` span per attempt of the retry layer:
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use broker_core::layers::{BrokerLayerExt, ConcurrencyLayer, MetricsLayer, RetryLayer, TracingLayer};
//! use broker_core::{Broker, MemoryBroker, Message, PublishOptions};
//!
//! let inner: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
//! let broker = inner
//!     .with_layer(ConcurrencyLayer::new(8))
//!     .with_layer(RetryLayer::new(3))
//!     .with_layer(MetricsLayer::new())
//!     .with_layer(TracingLayer::new());
//! assert_eq!(broker.name(), "memory");
//! broker.connect().await?;
//! broker.publish("orders.created", Message::new("42"), PublishOptions::new()).await?;
//! broker.disconnect().await?;
//! # Ok::<(), broker_core::Error>(())
//! # }).unwrap();
//! ```
//!
//! [`Broker`] is implemented for `Arc<B>` (and so for `Arc<dyn Broker>`, what
//! [`from_env`](crate::from_env) returns), so a layer wraps a shared broker as well as an owned one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;

use crate::broker::{Broker, Handler, Subscriber};
use crate::capabilities::Capabilities;
use crate::error::Result;
use crate::message::Message;
use crate::options::{BrokerOptions, PublishOptions, SubscribeOptions};

pub mod codec;
pub mod concurrency;
pub mod metrics;
pub mod retry;
pub mod tracing;

pub use self::codec::{Codec, CodecExt, Json};
#[cfg(feature = "msgpack")]
pub use self::codec::{MSGPACK_CONTENT_TYPE, MessagePack};
pub use self::concurrency::{ConcurrencyLayer, Limited};
pub use self::metrics::{Metered, MetricsLayer};
pub use self::retry::{RetryLayer, Retrying};
pub use self::tracing::{TraceContext, Traced, TracingLayer};

/// Takes a broker and returns a broker that adds one concern, as tower's `Layer` does for services.
pub trait Layer<B: Broker> {
    /// The wrapping broker.
    type Broker: Broker;
    /// Wraps `inner`.
    fn layer(&self, inner: B) -> Self::Broker;
}

/// `broker.with_layer(layer)`: applies a [`Layer`] in method-call style, so a stack of layers reads
/// from the backend outwards.
pub trait BrokerLayerExt: Broker + Sized {
    /// Wraps this broker in `layer`.
    ///
    /// ```
    /// use broker_core::layers::{BrokerLayerExt, TracingLayer};
    /// use broker_core::{Broker, MemoryBroker};
    /// let traced = MemoryBroker::new().with_layer(TracingLayer::new());
    /// assert_eq!(traced.name(), "memory");
    /// ```
    fn with_layer<L: Layer<Self>>(self, layer: L) -> L::Broker {
        layer.layer(self)
    }
}

impl<B: Broker> BrokerLayerExt for B {}

/// A shared broker is a broker: every call goes to the broker behind the `Arc`.
#[async_trait]
impl<B: Broker + ?Sized> Broker for Arc<B> {
    fn init(&self, options: BrokerOptions) -> Result<()> {
        (**self).init(options)
    }
    fn options(&self) -> BrokerOptions {
        (**self).options()
    }
    fn address(&self) -> String {
        (**self).address()
    }
    async fn connect(&self) -> Result<()> {
        (**self).connect().await
    }
    async fn disconnect(&self) -> Result<()> {
        (**self).disconnect().await
    }
    // Written out (not `async fn`): hands back the inner broker's boxed future instead of boxing
    // a second one around it, on every publish through an `Arc<dyn Broker>` (what `from_name` returns).
    fn publish<'a, 'b, 'f>(
        &'a self,
        topic: &'b str,
        message: Message,
        options: PublishOptions,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'f>>
    where
        'a: 'f,
        'b: 'f,
        Self: 'f,
    {
        (**self).publish(topic, message, options)
    }
    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        (**self).subscribe(topic, handler, options).await
    }
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
}

/// Implements the synchronous [`Broker`] methods by delegating to `self.inner` (`async_trait`
/// must see the `async fn`s, which each layer writes out).
macro_rules! delegate_broker {
    () => {
        fn init(&self, options: $crate::options::BrokerOptions) -> $crate::error::Result<()> {
            self.inner.init(options)
        }
        fn options(&self) -> $crate::options::BrokerOptions {
            self.inner.options()
        }
        fn address(&self) -> String {
            self.inner.address()
        }
        fn name(&self) -> &'static str {
            self.inner.name()
        }
        fn capabilities(&self) -> $crate::capabilities::Capabilities {
            self.inner.capabilities()
        }
    };
}
pub(crate) use delegate_broker;
