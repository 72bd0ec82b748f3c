//! The [`Broker`], [`Subscriber`] and [`Handler`] traits, and the typed helpers of [`BrokerExt`].

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;
use serde::{Serialize, de::DeserializeOwned};

use crate::capabilities::Capabilities;
use crate::error::{BoxError, Error, ErrorKind, Result};
use crate::event::Event;
use crate::message::Message;
use crate::options::{BrokerOptions, PublishOptions, SubscribeOptions};

/// What a handler returns: any error type converts with `?`.
pub type HandlerResult = std::result::Result<(), BoxError>;

/// Handles the messages of a subscription. Any `Fn(Event) -> impl Future<Output = HandlerResult>`
/// is a handler; [`handler_fn`] turns a closure into the `Arc<dyn Handler>` that
/// [`Broker::subscribe`] takes.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one event. With auto-ack, `Ok` acks it and `Err` nacks it.
    async fn handle(&self, event: Event) -> HandlerResult;
}

#[async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    async fn handle(&self, event: Event) -> HandlerResult {
        (self)(event).await
    }
}

/// Makes a shared handler out of an async closure.
///
/// ```
/// use broker_core::{handler_fn, Event};
/// let handler = handler_fn(|event: Event| async move {
///     println!("{}: {:?}", event.topic(), event.message().body_str());
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> Arc<dyn Handler>
where
    F: Fn(Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    Arc::new(f)
}

tokio::task_local! {
    static HANDLER_OF: usize;
}

/// For backends: runs `future` (one handler run) marked as belonging to subscription `key` (any
/// number unique among live subscriptions, such as the address of its state), so that
/// [`running_handler_of`] can tell from inside the handler which subscription it serves.
pub fn scope_handler<F: Future>(key: usize, future: F) -> impl Future<Output = F::Output> {
    HANDLER_OF.scope(key, future)
}

/// For backends: the key of the subscription whose handler this task is running, if any. An
/// `unsubscribe()` called from inside the subscription's own handler must not wait for itself.
pub fn running_handler_of() -> Option<usize> {
    HANDLER_OF.try_with(|key| *key).ok()
}

/// For backends: waits for the tasks of `handlers` (a subscription's running handlers, each
/// run under [`scope_handler`] with `key`), except the calling one when it is such a handler: an
/// `unsubscribe()` or `disconnect()` from inside the subscription's own handler waits for the
/// others only, instead of for itself forever.
pub async fn wait_for_other_handlers(handlers: &tokio_util::task::TaskTracker, key: usize) {
    if running_handler_of() != Some(key) {
        return handlers.wait().await;
    }
    while handlers.len() > 1 {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Runs `handler` on `event`, turning a panic into an error, and with `auto_ack` acks on `Ok`
/// and nacks on `Err`. Every backend calls this, so handler semantics are the same everywhere.
///
/// Returns the handler's outcome as a [`Handler`](ErrorKind::Handler) error, or the
/// acknowledgement's error if settling failed.
pub async fn run_handler(handler: &dyn Handler, event: Event, auto_ack: bool) -> Result<()> {
    let outcome = match AssertUnwindSafe(handler.handle(event.clone())).catch_unwind().await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(Error::handler(error)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic payload".to_string());
            Err(Error::new(ErrorKind::Handler, format!("message handler panicked: {what}")))
        }
    };
    if auto_ack {
        match &outcome {
            Ok(()) => event.ack().await?,
            Err(error) => event.nack_with_reason(error.message()).await?,
        }
    }
    outcome
}

/// A live subscription, returned by [`Broker::subscribe`].
#[async_trait]
pub trait Subscriber: Send + Sync + fmt::Debug {
    /// The topic subscribed to.
    fn topic(&self) -> &str;
    /// The options the subscription was made with.
    fn options(&self) -> &SubscribeOptions;
    /// The identity the subscription has on the backend, where it has one (the HTTP backend's
    /// registry node id), for logs and diagnostics.
    fn id(&self) -> Option<&str> {
        None
    }
    /// Stops delivery and waits for the handlers that are running to finish. Calling it again
    /// does nothing.
    async fn unsubscribe(&self) -> Result<()>;
}

/// The publish/subscribe contract every backend implements, as Go Micro's `broker.Broker`.
///
/// Object-safe: pick a backend at run time and hold it as `Arc<dyn Broker>`.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use broker_core::{handler_fn, Broker, Event, Message, MemoryBroker, PublishOptions, SubscribeOptions};
/// use std::sync::Arc;
///
/// let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
/// broker.connect().await?;
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let sub = broker
///     .subscribe("user.registered", handler_fn(move |event: Event| {
///         let tx = tx.clone();
///         async move { tx.send(event.message().body.clone())?; Ok(()) }
///     }), SubscribeOptions::default())
///     .await?;
/// broker.publish("user.registered", Message::new("ada"), PublishOptions::default()).await?;
/// assert_eq!(rx.recv().await.unwrap(), "ada");
/// sub.unsubscribe().await?;
/// broker.disconnect().await?;
/// # Ok::<(), broker_core::Error>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// Replaces the options. Only before `connect()` (or after `disconnect()`): a connected broker
    /// answers `InvalidInput`.
    fn init(&self, options: BrokerOptions) -> Result<()>;
    /// The current options.
    fn options(&self) -> BrokerOptions;
    /// The address in use: the server connected to, or for peer-to-peer backends the bound listen address.
    fn address(&self) -> String;
    /// Connects (bounded by the connect timeout). Connecting a connected broker does nothing.
    async fn connect(&self) -> Result<()>;
    /// Stops every subscription, waits for in-flight handlers (bounded by the drain timeout),
    /// then closes connections.
    async fn disconnect(&self) -> Result<()>;
    /// Publishes `message` on `topic`.
    async fn publish(&self, topic: &str, message: Message, options: PublishOptions) -> Result<()>;
    /// Subscribes `handler` to `topic`.
    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>>;
    /// The backend's name, as in the plugin registry (Go Micro's `String()`).
    fn name(&self) -> &'static str;
    /// What this backend really does.
    fn capabilities(&self) -> Capabilities;
}

/// Typed helpers over any [`Broker`]: serde values as JSON bodies.
#[async_trait]
pub trait BrokerExt: Broker {
    /// Publishes `value` as JSON with `Content-Type: application/json`.
    async fn publish_json<T>(&self, topic: &str, value: &T, options: PublishOptions) -> Result<()>
    where
        T: Serialize + Sync + ?Sized,
    {
        let message = Message::json(value)?;
        self.publish(topic, message, options).await
    }

    /// Subscribes a handler that receives the body decoded from JSON. A body that does not decode
    /// never reaches `f`: it fails the delivery with a [`Codec`](ErrorKind::Codec) error (nacked
    /// with auto-ack, so it is redelivered or dead-lettered where the backend can).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use broker_core::{Broker, BrokerExt, Event, MemoryBroker, PublishOptions, SubscribeOptions};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct User { email: String }
    ///
    /// let broker = MemoryBroker::new();
    /// broker.connect().await?;
    /// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// broker.subscribe_json("user.registered", move |user: User, _event: Event| {
    ///     let tx = tx.clone();
    ///     async move { tx.send(user.email)?; Ok(()) }
    /// }, SubscribeOptions::default()).await?;
    /// broker.publish_json("user.registered", &User { email: "ada@example.com".into() }, PublishOptions::default()).await?;
    /// assert_eq!(rx.recv().await.unwrap(), "ada@example.com");
    /// # Ok::<(), broker_core::Error>(())
    /// # }).unwrap();
    /// ```
    async fn subscribe_json<T, F, Fut>(
        &self,
        topic: &str,
        f: F,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(T, Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let f = Arc::new(f);
        let handler = handler_fn(move |event: Event| {
            let f = Arc::clone(&f);
            async move {
                let value: T = event.message().decode_json()?;
                f(value, event).await
            }
        });
        self.subscribe(topic, handler, options).await
    }
}

impl<B: Broker + ?Sized> BrokerExt for B {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Recorder, Settlement};

    fn event(rec: &Recorder) -> Event {
        Event::builder("t", Message::new("x")).acknowledger(rec.clone()).build()
    }

    #[tokio::test]
    async fn auto_ack_acks_ok_and_nacks_err() {
        let rec = Recorder::default();
        let ok = handler_fn(|_e: Event| async { Ok(()) });
        assert!(run_handler(ok.as_ref(), event(&rec), true).await.is_ok());
        let failing = handler_fn(|_e: Event| async { Err("db down".into()) });
        let err = run_handler(failing.as_ref(), event(&rec), true).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Handler);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec!["ack".to_string(), "nack: message handler failed: db down".to_string()]
        );
    }

    #[tokio::test]
    async fn panics_become_handler_errors() {
        let rec = Recorder::default();
        let panicking = handler_fn(|_e: Event| async { panic!("kaboom") });
        let err = run_handler(panicking.as_ref(), event(&rec), true).await.unwrap_err();
        assert!(err.to_string().contains("kaboom"), "{err}");
        assert_eq!(rec.0.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn manual_mode_leaves_settlement_to_the_handler() {
        let rec = Recorder::default();
        let acks_then_fails = handler_fn(|e: Event| async move {
            e.ack().await?;
            Err("after ack".into())
        });
        let ev = event(&rec);
        assert!(run_handler(acks_then_fails.as_ref(), ev.clone(), false).await.is_err());
        assert_eq!(ev.settlement(), Some(Settlement::Acked));
        let silent = handler_fn(|_e: Event| async { Ok(()) });
        let ev = event(&rec);
        run_handler(silent.as_ref(), ev.clone(), false).await.unwrap();
        assert_eq!(ev.settlement(), None);
        assert_eq!(*rec.0.lock().unwrap(), vec!["ack".to_string()]);
    }
}
