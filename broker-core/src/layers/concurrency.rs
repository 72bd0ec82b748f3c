//! The concurrency layer: per-subscription limits on how many handlers run at once and on how
//! many messages are in flight (handed over by the backend and not yet finished), enforced the
//! same way on every backend, by semaphores in the wrapping handler.
//!
//! The layer asks the backend for `max_in_flight` concurrent deliveries (it sets the
//! subscription's `concurrency`); a delivery first takes an in-flight permit (waiting for one
//! holds the backend's delivery back: backpressure), then a handler permit, and keeps both until
//! the handler returns. Each `subscribe()` gets its own semaphores.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use broker_core::layers::{BrokerLayerExt, ConcurrencyLayer};
//! use broker_core::{handler_fn, Broker, Event, MemoryBroker, Message, PublishOptions, SubscribeOptions};
//!
//! // At most 4 handlers at once, at most 16 messages taken from the backend.
//! let broker = MemoryBroker::new().with_layer(ConcurrencyLayer::new(4).with_max_in_flight(16));
//! broker.connect().await?;
//! let sub = broker.subscribe("thumbnails", handler_fn(|_event: Event| async { Ok(()) }),
//!     SubscribeOptions::new()).await?;
//! assert_eq!(sub.options().concurrency, 16);
//! broker.publish("thumbnails", Message::new("cat.png"), PublishOptions::new()).await?;
//! broker.disconnect().await?;
//! # Ok::<(), broker_core::Error>(())
//! # }).unwrap();
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use super::{Layer, delegate_broker};
use crate::broker::{Broker, Handler, HandlerResult, Subscriber};
use crate::error::{Error, ErrorKind, Result};
use crate::event::Event;
use crate::message::Message;
use crate::options::{PublishOptions, SubscribeOptions};

/// Limits the handlers and in-flight messages of each subscription: see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrencyLayer {
    max_concurrent: usize,
    max_in_flight: usize,
}

impl ConcurrencyLayer {
    /// At most `max_concurrent` handlers of a subscription at once (at least 1), and as many
    /// messages in flight.
    pub fn new(max_concurrent: usize) -> Self {
        let max_concurrent = max_concurrent.max(1);
        ConcurrencyLayer { max_concurrent, max_in_flight: max_concurrent }
    }

    /// Lets up to `max_in_flight` messages be taken from the backend (waiting for a handler
    /// permit, or running); never fewer than the handler limit.
    pub fn with_max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = max_in_flight.max(self.max_concurrent);
        self
    }

    /// The handler limit.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// The in-flight limit.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }
}

impl<B: Broker> Layer<B> for ConcurrencyLayer {
    type Broker = Limited<B>;
    fn layer(&self, inner: B) -> Limited<B> {
        Limited { inner, limits: self.clone() }
    }
}

/// A broker whose subscriptions are limited, made by [`ConcurrencyLayer`].
#[derive(Debug)]
pub struct Limited<B> {
    inner: B,
    limits: ConcurrencyLayer,
}

impl<B> Limited<B> {
    /// The wrapped broker.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

#[async_trait]
impl<B: Broker> Broker for Limited<B> {
    delegate_broker!();

    async fn connect(&self) -> Result<()> {
        self.inner.connect().await
    }

    async fn disconnect(&self) -> Result<()> {
        self.inner.disconnect().await
    }

    async fn publish(&self, topic: &str, message: Message, options: PublishOptions) -> Result<()> {
        self.inner.publish(topic, message, options).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        mut options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        options.concurrency = self.limits.max_in_flight;
        let limited = Arc::new(LimitedHandler {
            inner: handler,
            in_flight: Semaphore::new(self.limits.max_in_flight),
            running: Semaphore::new(self.limits.max_concurrent),
        });
        self.inner.subscribe(topic, limited, options).await
    }
}

struct LimitedHandler {
    inner: Arc<dyn Handler>,
    in_flight: Semaphore,
    running: Semaphore,
}

fn closed(_: tokio::sync::AcquireError) -> Error {
    Error::new(ErrorKind::Closed, "the concurrency limit of this subscription is closed")
}

#[async_trait]
impl Handler for LimitedHandler {
    async fn handle(&self, event: Event) -> HandlerResult {
        let _in_flight = self.in_flight.acquire().await.map_err(closed)?;
        let _running = self.running.acquire().await.map_err(closed)?;
        self.inner.handle(event).await
    }
}
