//! Typed bodies with a codec: JSON through `publish_with`/`subscribe_with`, and MessagePack
//! (feature `msgpack`), each writing its Content-Type and refusing other ones.

use std::time::Duration;

use broker_core::layers::{Codec, CodecExt, Json};
use broker_core::{
    Broker, ErrorKind, Event, MemoryBroker, Message, PublishOptions, SubscribeOptions, handler_fn, headers,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    celsius: f64,
    tags: Vec<String>,
}

fn reading() -> Reading {
    Reading { sensor: "s1".into(), celsius: 21.5, tags: vec!["lab".into()] }
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("in time").expect("open")
}

/// Publishes `bad` to a typed subscription with `max_redeliveries(0)`: the delivery fails, so the
/// memory backend dead-letters it; returns the reason it gives.
async fn rejected_reason<C: Codec>(codec: C, bad: Message) -> String {
    let broker = MemoryBroker::new();
    broker.connect().await.unwrap();
    let (tx, mut dead) = mpsc::unbounded_channel();
    broker
        .subscribe(
            "typed.dlq",
            handler_fn(move |event: Event| {
                let tx = tx.clone();
                async move {
                    tx.send(event.message().header(headers::DEAD_LETTER_REASON).map(str::to_string))?;
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    broker
        .subscribe_with(
            codec,
            "typed",
            |_r: Reading, _e: Event| async { panic!("a body that does not decode must not reach the handler") },
            SubscribeOptions::new().with_max_redeliveries(0),
        )
        .await
        .unwrap();
    broker.publish("typed", bad, PublishOptions::new()).await.unwrap();
    let reason = next(&mut dead).await.unwrap_or_default();
    broker.disconnect().await.unwrap();
    reason
}

#[tokio::test]
async fn json_round_trip_and_rejections() {
    let broker = MemoryBroker::new();
    broker.connect().await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    broker
        .subscribe_with(
            Json,
            "readings",
            move |r: Reading, e: Event| {
                let tx = tx.clone();
                async move {
                    tx.send((r, e.message().header(headers::CONTENT_TYPE).map(str::to_string)))?;
                    Ok(())
                }
            },
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    broker.publish_with(Json, "readings", &reading(), PublishOptions::new()).await.unwrap();
    assert_eq!(next(&mut rx).await, (reading(), Some("application/json".to_string())));
    broker.disconnect().await.unwrap();

    let wrong_type = Message::new(r#"{"sensor":"s","celsius":1,"tags":[]}"#).with_header("Content-Type", "text/plain");
    assert_eq!(Json.decode_message::<Reading>(&wrong_type).unwrap_err().kind(), ErrorKind::Codec);
    assert!(rejected_reason(Json, wrong_type).await.contains("text/plain"));
    assert!(rejected_reason(Json, Message::new("not json")).await.contains("JSON"));
}

#[cfg(feature = "msgpack")]
mod msgpack {
    use super::*;
    use broker_core::layers::{MSGPACK_CONTENT_TYPE, MessagePack};

    #[tokio::test]
    async fn msgpack_round_trip_with_its_content_type() {
        let broker = MemoryBroker::new();
        broker.connect().await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        broker
            .subscribe_msgpack(
                "readings",
                move |r: Reading, e: Event| {
                    let tx = tx.clone();
                    async move {
                        tx.send((r, e.message().clone()))?;
                        Ok(())
                    }
                },
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        broker.publish_msgpack("readings", &reading(), PublishOptions::new()).await.unwrap();
        let (got, message) = next(&mut rx).await;
        assert_eq!(got, reading());
        assert_eq!(message.header(headers::CONTENT_TYPE), Some(MSGPACK_CONTENT_TYPE));
        // Structs travel as maps with field names (readable by other languages), not as arrays.
        let value: rmpv_like::Value = rmp_serde::from_slice(message.body()).unwrap();
        assert!(matches!(value, rmpv_like::Value::Map(ref m) if m.contains_key("sensor")), "{value:?}");
        broker.disconnect().await.unwrap();
    }

    /// Just enough of a dynamic MessagePack value to see the shape of the body.
    mod rmpv_like {
        use std::collections::BTreeMap;
        #[derive(Debug, serde::Deserialize)]
        #[serde(untagged)]
        pub(super) enum Value {
            Map(BTreeMap<String, serde::de::IgnoredAny>),
            Other(serde::de::IgnoredAny),
        }
    }

    #[tokio::test]
    async fn msgpack_rejects_other_content_types_and_garbage() {
        let json = Message::json(&reading()).unwrap();
        let err = MessagePack.decode_message::<Reading>(&json).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec);
        assert!(err.to_string().contains("application/json"), "{err}");
        assert!(rejected_reason(MessagePack, json).await.contains("application/msgpack"));
        let garbage = Message::new(&b"\xc1\xc1\xc1"[..]).with_header("content-type", "application/x-msgpack");
        assert_eq!(MessagePack.decode_message::<Reading>(&garbage).unwrap_err().kind(), ErrorKind::Codec);
        assert!(rejected_reason(MessagePack, garbage).await.contains("MessagePack"));
        // Without a Content-Type the body is decoded as MessagePack.
        let bare = Message::new(MessagePack.encode(&reading()).unwrap());
        assert_eq!(MessagePack.decode_message::<Reading>(&bare).unwrap(), reading());
        assert!(MessagePack.accepts("Application/MsgPack; charset=binary"));
    }
}
