//! Typed bodies in any format: the [`Codec`] trait, its [`Json`] implementation and, with the
//! cargo feature `msgpack`, `MessagePack` (`application/msgpack`, through `rmp-serde`), and
//! [`CodecExt`], which publishes and subscribes serde values with any codec.
//!
//! A codec writes its `Content-Type` on publish and checks it on receive: a message whose
//! `Content-Type` names another format, or whose body does not decode, never reaches the typed
//! handler; the delivery fails with a [`Codec`](crate::ErrorKind::Codec) error (nacked with
//! auto-ack). A message without `Content-Type` is decoded as the codec's format.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use broker_core::layers::{CodecExt, Json};
//! use broker_core::{Broker, Event, MemoryBroker, PublishOptions, SubscribeOptions};
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Order { id: u64 }
//!
//! let broker = MemoryBroker::new();
//! broker.connect().await?;
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! broker.subscribe_with(Json, "orders", move |order: Order, _event: Event| {
//!     let tx = tx.clone();
//!     async move { tx.send(order.id)?; Ok(()) }
//! }, SubscribeOptions::new()).await?;
//! broker.publish_with(Json, "orders", &Order { id: 7 }, PublishOptions::new()).await?;
//! assert_eq!(rx.recv().await, Some(7));
//! broker.disconnect().await?;
//! # Ok::<(), broker_core::Error>(())
//! # }).unwrap();
//! ```

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::broker::{Broker, HandlerResult, Subscriber, handler_fn};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::message::{JSON_CONTENT_TYPE, Message, headers};
use crate::options::{PublishOptions, SubscribeOptions};

/// A body format for serde values.
pub trait Codec: Clone + Send + Sync + 'static {
    /// The `Content-Type` this codec writes.
    fn content_type(&self) -> &'static str;

    /// Whether a `Content-Type` value (maybe with parameters, any letter case) names this format.
    fn accepts(&self, content_type: &str) -> bool;

    /// Encodes `value`.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes>;

    /// Decodes a body.
    fn decode<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T>;

    /// A message whose body is `value` in this format, with its `Content-Type`.
    fn message<T: Serialize + ?Sized>(&self, value: &T) -> Result<Message> {
        Ok(Message::new(self.encode(value)?).with_header(headers::CONTENT_TYPE, self.content_type()))
    }

    /// Decodes a message's body, after checking that its `Content-Type` (when present) names this format.
    fn decode_message<T: DeserializeOwned>(&self, message: &Message) -> Result<T> {
        if let Some(content_type) = message.header_ignore_case(headers::CONTENT_TYPE) {
            if !self.accepts(content_type) {
                return Err(Error::codec(format!(
                    "expected a body of Content-Type {}, got Content-Type {content_type:?}",
                    self.content_type()
                )));
            }
        }
        self.decode(message.body())
    }
}

/// The MIME type without parameters, lower-cased.
fn mime(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// JSON (`application/json`, and `application/*+json` on receive), as [`Message::json`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json;

impl Codec for Json {
    fn content_type(&self) -> &'static str {
        JSON_CONTENT_TYPE
    }

    fn accepts(&self, content_type: &str) -> bool {
        let mime = mime(content_type);
        mime == JSON_CONTENT_TYPE || (mime.starts_with("application/") && mime.ends_with("+json"))
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes> {
        Ok(Message::json(value)?.body)
    }

    fn decode<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T> {
        Message::new(Bytes::copy_from_slice(body)).decode_json()
    }

    fn decode_message<T: DeserializeOwned>(&self, message: &Message) -> Result<T> {
        message.decode_json()
    }
}

/// The `Content-Type` of MessagePack bodies.
#[cfg(feature = "msgpack")]
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";

/// MessagePack (`application/msgpack`; `application/x-msgpack` and `application/vnd.msgpack` are
/// accepted on receive). Structs are written as maps with field names, so other languages'
/// MessagePack libraries read them. Cargo feature `msgpack`.
///
/// ```
/// use broker_core::layers::{Codec, MessagePack};
/// let message = MessagePack.message(&vec![1u8, 2, 3]).unwrap();
/// assert_eq!(message.header("Content-Type"), Some("application/msgpack"));
/// assert_eq!(MessagePack.decode_message::<Vec<u8>>(&message).unwrap(), vec![1, 2, 3]);
/// ```
#[cfg(feature = "msgpack")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessagePack;

#[cfg(feature = "msgpack")]
impl Codec for MessagePack {
    fn content_type(&self) -> &'static str {
        MSGPACK_CONTENT_TYPE
    }

    fn accepts(&self, content_type: &str) -> bool {
        matches!(
            mime(content_type).as_str(),
            MSGPACK_CONTENT_TYPE | "application/x-msgpack" | "application/vnd.msgpack"
        )
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes> {
        let mut out = Vec::new();
        value
            .serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())
            .map_err(|e| Error::codec(format!("cannot encode the message body as MessagePack: {e}")).with_source(e))?;
        Ok(Bytes::from(out))
    }

    fn decode<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T> {
        rmp_serde::from_slice(body).map_err(|e| {
            Error::codec(format!("the message body is not the expected MessagePack ({} bytes): {e}", body.len()))
                .with_source(e)
        })
    }
}

/// Typed helpers over any [`Broker`] with any [`Codec`].
#[async_trait]
pub trait CodecExt: Broker {
    /// Publishes `value` encoded by `codec`, with its `Content-Type`.
    async fn publish_with<C, T>(&self, codec: C, topic: &str, value: &T, options: PublishOptions) -> Result<()>
    where
        C: Codec,
        T: Serialize + Sync + ?Sized,
    {
        let message = codec.message(value)?;
        self.publish(topic, message, options).await
    }

    /// Subscribes a handler that receives the body decoded by `codec`. A body of another
    /// `Content-Type`, or one that does not decode, never reaches `f`: the delivery fails with a
    /// [`Codec`](crate::ErrorKind::Codec) error.
    async fn subscribe_with<C, T, F, Fut>(
        &self,
        codec: C,
        topic: &str,
        f: F,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>>
    where
        C: Codec,
        T: DeserializeOwned + Send + 'static,
        F: Fn(T, Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let f = Arc::new(f);
        let handler = handler_fn(move |event: Event| {
            let (f, codec) = (Arc::clone(&f), codec.clone());
            async move {
                let value: T = codec.decode_message(event.message())?;
                f(value, event).await
            }
        });
        self.subscribe(topic, handler, options).await
    }

    /// Publishes `value` as MessagePack with `Content-Type: application/msgpack` (feature `msgpack`).
    #[cfg(feature = "msgpack")]
    async fn publish_msgpack<T>(&self, topic: &str, value: &T, options: PublishOptions) -> Result<()>
    where
        T: Serialize + Sync + ?Sized,
    {
        self.publish_with(MessagePack, topic, value, options).await
    }

    /// Subscribes a handler that receives MessagePack bodies decoded (feature `msgpack`); see
    /// [`subscribe_with`](Self::subscribe_with).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use broker_core::layers::CodecExt;
    /// use broker_core::{Broker, Event, MemoryBroker, PublishOptions, SubscribeOptions};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Reading { sensor: String, celsius: f32 }
    ///
    /// let broker = MemoryBroker::new();
    /// broker.connect().await?;
    /// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// broker.subscribe_msgpack("readings", move |r: Reading, _event: Event| {
    ///     let tx = tx.clone();
    ///     async move { tx.send(r.sensor)?; Ok(()) }
    /// }, SubscribeOptions::new()).await?;
    /// broker.publish_msgpack("readings", &Reading { sensor: "s1".into(), celsius: 21.5 }, PublishOptions::new()).await?;
    /// assert_eq!(rx.recv().await.as_deref(), Some("s1"));
    /// # Ok::<(), broker_core::Error>(())
    /// # }).unwrap();
    /// ```
    #[cfg(feature = "msgpack")]
    async fn subscribe_msgpack<T, F, Fut>(
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
        self.subscribe_with(MessagePack, topic, f, options).await
    }
}

impl<B: Broker + ?Sized> CodecExt for B {}
