//! Tests of the Redis backends' own behaviour: configuration, connection errors, the wire
//! formats (stream fields readable with a raw `XRANGE`, Go Micro's Pub/Sub envelope), and
//! reconnection of Pub/Sub subscriptions. Server tests use `BROKER_TEST_REDIS_URL`; without it
//! they are skipped, unless `BROKER_TEST_REQUIRE` is `all` or names `redis`.

use std::sync::Arc;
use std::time::Duration;

use broker_core::{Broker, BrokerOptions, ErrorKind, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_redis::{RedisBroker, RedisConfig};
use futures::StreamExt;

fn server() -> Option<String> {
    if let Ok(url) = std::env::var("BROKER_TEST_REDIS_URL") {
        if !url.trim().is_empty() {
            return Some(url);
        }
    }
    let require = std::env::var("BROKER_TEST_REQUIRE").unwrap_or_default();
    if require.split(',').any(|r| matches!(r.trim(), "all" | "redis" | "redis-streams")) {
        panic!("BROKER_TEST_REQUIRE asks for redis but BROKER_TEST_REDIS_URL is not set");
    }
    eprintln!("SKIP: no redis server (set BROKER_TEST_REDIS_URL)");
    None
}

fn unique(name: &str) -> String {
    format!("broker-redis-test.{name}.{}", uuid_like())
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn redis_config_defaults_params_and_redaction() {
    let config = RedisConfig::from_options(&BrokerOptions::default()).unwrap();
    assert_eq!(config.url, "redis://127.0.0.1:6379");
    assert_eq!(config.maxlen, 100_000);
    let secret = BrokerOptions::default().with_addresses(["redis://user:s3cr3t@127.0.0.1:6379/0"]);
    let broker = RedisBroker::streams(secret).unwrap();
    let debug = format!("{broker:?}");
    assert!(!debug.contains("s3cr3t"), "{debug}");
    assert!(debug.contains("user:***@127.0.0.1"), "{debug}");
    assert!(!broker.address().contains("s3cr3t"));
    let err = RedisBroker::pubsub(BrokerOptions::default().with_param("nosuch", "1")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = RedisBroker::streams(BrokerOptions::default().with_param("maxlen", "zero")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = RedisBroker::pubsub(BrokerOptions::default().with_param("envelope", "xml")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let host_port = RedisConfig::from_options(&BrokerOptions::default().with_addresses(["127.0.0.1:7000"])).unwrap();
    assert_eq!(host_port.url, "redis://127.0.0.1:7000");
}

#[tokio::test]
async fn redis_unreachable_server_is_a_connection_error_naming_the_address() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for broker in [
        RedisBroker::pubsub(
            BrokerOptions::default()
                .with_addresses([format!("redis://:pw-hidden@127.0.0.1:{port}")])
                .with_connect_timeout(Duration::from_secs(2)),
        )
        .unwrap(),
        RedisBroker::streams(
            BrokerOptions::default()
                .with_addresses([format!("redis://127.0.0.1:{port}")])
                .with_connect_timeout(Duration::from_secs(2)),
        )
        .unwrap(),
    ] {
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(10), broker.connect()).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
        let text = err.to_string();
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(!text.contains("pw-hidden"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(9), "connect is bounded by connect_timeout");
        let publish = broker.publish("t", Message::new("x"), PublishOptions::new()).await.unwrap_err();
        assert_eq!(publish.kind(), ErrorKind::NotConnected);
    }
}

#[tokio::test]
async fn redis_wrong_credentials_are_a_connection_error() {
    let Some(url) = server() else { return };
    let with_password = url.replacen("redis://", "redis://nosuchuser:wrong-password@", 1);
    let broker = RedisBroker::pubsub(BrokerOptions::default().with_addresses([with_password])).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(15), broker.connect()).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(!err.to_string().contains("wrong-password"), "{err}");
    assert!(std::error::Error::source(&err).is_some(), "the redis error is kept as the source");
}

/// A redis-streams entry is plain fields: `body` and `h:<header>`, readable with a raw XRANGE.
#[tokio::test]
async fn redis_streams_entry_is_readable_with_raw_xrange() {
    let Some(url) = server() else { return };
    let broker = RedisBroker::streams(BrokerOptions::default().with_addresses([url.clone()])).unwrap();
    broker.connect().await.unwrap();
    let topic = unique("xrange");
    broker
        .publish(
            &topic,
            Message::new("hello body").with_header("trace", "abc"),
            PublishOptions::new().with_header("k", "v"),
        )
        .await
        .unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    type Entry = (String, Vec<(String, Vec<u8>)>);
    let entries: Vec<Entry> = redis::cmd("XRANGE").arg(&topic).arg("-").arg("+").query_async(&mut conn).await.unwrap();
    assert_eq!(entries.len(), 1);
    let fields: std::collections::HashMap<String, Vec<u8>> = entries[0].1.iter().cloned().collect();
    assert_eq!(fields.get("body").map(Vec::as_slice), Some(b"hello body".as_slice()));
    assert_eq!(fields.get("h:trace").map(Vec::as_slice), Some(b"abc".as_slice()));
    assert_eq!(fields.get("h:k").map(Vec::as_slice), Some(b"v".as_slice()));
    assert_eq!(fields.len(), 3, "{fields:?}");
    let _: () = redis::cmd("DEL").arg(&topic).query_async(&mut conn).await.unwrap();
    broker.disconnect().await.unwrap();
}

/// With `envelope=go-micro`, the Pub/Sub payload is exactly what Go Micro's Redis plugin
/// publishes: the JSON envelope with `Micro-Topic`, `Micro-Id` and `Content-Type`; and a
/// Go Micro payload is read back with its headers.
#[tokio::test]
async fn redis_pubsub_go_micro_envelope_on_the_wire() {
    let Some(url) = server() else { return };
    let topic = unique("gomicro");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_async_pubsub().await.unwrap();
    raw.subscribe(&topic).await.unwrap();
    let broker =
        RedisBroker::pubsub(BrokerOptions::default().with_addresses([url.clone()]).with_param("envelope", "go-micro"))
            .unwrap();
    broker.connect().await.unwrap();
    broker.publish(&topic, Message::new("{\"id\":1}"), PublishOptions::new()).await.unwrap();
    let msg = tokio::time::timeout(WAIT, raw.on_message().next()).await.unwrap().unwrap();
    let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
    let decoded = broker_core::codec::decode_envelope(&payload).unwrap();
    assert_eq!(decoded.body(), b"{\"id\":1}");
    assert_eq!(decoded.header("Micro-Topic"), Some(topic.as_str()));
    assert_eq!(decoded.header("Content-Type"), Some("application/json"));
    assert!(decoded.header("Micro-Id").is_some_and(|id| !id.is_empty()));
    let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert!(json.get("Header").is_some() && json.get("Body").is_some(), "{json}");

    // What a Go Micro service publishes reaches a Rust handler with its headers.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = broker
        .subscribe(
            &topic,
            handler_fn(move |event: Event| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(event);
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let go = r#"{"Header":{"Micro-Topic":"x","Content-Type":"application/json"},"Body":"aGk="}"#;
    let _: i64 = redis::cmd("PUBLISH").arg(&topic).arg(go).query_async(&mut conn).await.unwrap();
    let event = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(event.message().body(), b"hi");
    assert_eq!(event.message().header("Micro-Topic"), Some("x"));
    assert!(event.error().is_none());
    // A raw payload that is not an envelope is delivered as the body, with a codec error attached.
    let _: i64 = redis::cmd("PUBLISH").arg(&topic).arg("plain text").query_async(&mut conn).await.unwrap();
    let event = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(event.message().body(), b"plain text");
    assert_eq!(event.error().map(|e| e.kind()), Some(ErrorKind::Codec));
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}

/// A queue group of redis-streams is durable: messages published while every member is gone
/// wait for the group, and a message whose consumer never acked is claimed by another member.
#[tokio::test]
async fn redis_streams_queue_group_keeps_messages_and_claims_abandoned_ones() {
    let Some(url) = server() else { return };
    let options = BrokerOptions::default().with_addresses([url.clone()]).with_param("claim_idle_ms", "500");
    let broker: Arc<dyn Broker> = Arc::new(RedisBroker::streams(options).unwrap());
    broker.connect().await.unwrap();
    let topic = unique("durable");
    let group = format!("g-{}", uuid_like());
    // A member that takes messages and never settles them (manual ack), as a crashed consumer.
    let (tx, mut taken) = tokio::sync::mpsc::unbounded_channel();
    let silent = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(event.message().body_str().unwrap_or_default().to_string());
            Ok(())
        }
    });
    let first = broker
        .subscribe(&topic, silent, SubscribeOptions::new().with_queue(group.clone()).with_auto_ack(false))
        .await
        .unwrap();
    broker.publish(&topic, Message::new("abandoned"), PublishOptions::new()).await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, taken.recv()).await.unwrap().unwrap(), "abandoned");
    first.unsubscribe().await.unwrap();
    broker.publish(&topic, Message::new("while away"), PublishOptions::new()).await.unwrap();

    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let second = broker
        .subscribe(
            &topic,
            handler_fn(move |event: Event| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((event.message().body_str().unwrap_or_default().to_string(), event.attempt()));
                    Ok(())
                }
            }),
            SubscribeOptions::new().with_queue(group.clone()),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(tokio::time::timeout(WAIT, got.recv()).await.unwrap().unwrap());
    }
    seen.sort();
    assert_eq!(seen[0].0, "abandoned");
    assert!(seen[0].1 >= 2, "the claimed message is a redelivery: {seen:?}");
    assert_eq!(seen[1], ("while away".to_string(), 1));
    second.unsubscribe().await.unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL").arg(&topic).query_async(&mut conn).await.unwrap();
    broker.disconnect().await.unwrap();
}

/// A broadcast subscription's group is removed at unsubscribe, and its stream with it when no
/// group is left: nothing is leaked on the server.
#[tokio::test]
async fn redis_streams_broadcast_cleans_up_at_unsubscribe() {
    let Some(url) = server() else { return };
    let broker = RedisBroker::streams(BrokerOptions::default().with_addresses([url.clone()])).unwrap();
    broker.connect().await.unwrap();
    let topic = unique("cleanup");
    let sub =
        broker.subscribe(&topic, handler_fn(|_e: Event| async { Ok(()) }), SubscribeOptions::new()).await.unwrap();
    broker.publish(&topic, Message::new("x"), PublishOptions::new()).await.unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let exists: i64 = redis::cmd("EXISTS").arg(&topic).query_async(&mut conn).await.unwrap();
    assert_eq!(exists, 1);
    sub.unsubscribe().await.unwrap();
    let exists: i64 = redis::cmd("EXISTS").arg(&topic).query_async(&mut conn).await.unwrap();
    assert_eq!(exists, 0, "the stream of a topic with no group left is deleted");
    broker.disconnect().await.unwrap();
}

/// An entry nobody acknowledges is claimed again after `claim_idle_ms`; past `max_redeliveries`
/// it goes to `<topic>.dlq` with the dead-letter headers.
#[tokio::test]
async fn redis_streams_unacknowledged_entry_is_dead_lettered_after_max_redeliveries() {
    let Some(url) = server() else { return };
    let options = BrokerOptions::default().with_addresses([url.clone()]).with_param("claim_idle_ms", "300");
    let broker = RedisBroker::streams(options).unwrap();
    broker.connect().await.unwrap();
    let topic = unique("unacked");
    let (dlq_tx, mut dead) = tokio::sync::mpsc::unbounded_channel();
    let dlq = broker
        .subscribe(
            &format!("{topic}.dlq"),
            handler_fn(move |event: Event| {
                let tx = dlq_tx.clone();
                async move {
                    let _ = tx.send(event.message().clone());
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    let (tx, mut attempts) = tokio::sync::mpsc::unbounded_channel();
    // Manual ack, and the handler never settles: as a consumer that hangs or crashes.
    let sub = broker
        .subscribe(
            &topic,
            handler_fn(move |event: Event| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(event.attempt());
                    Ok(())
                }
            }),
            SubscribeOptions::new().with_auto_ack(false).with_max_redeliveries(1),
        )
        .await
        .unwrap();
    broker.publish(&topic, Message::new("never acked"), PublishOptions::new()).await.unwrap();
    let letter = tokio::time::timeout(WAIT, dead.recv()).await.unwrap().unwrap();
    assert_eq!(letter.body(), b"never acked");
    assert_eq!(letter.header(broker_core::headers::ORIGINAL_TOPIC), Some(topic.as_str()));
    assert_eq!(letter.header(broker_core::headers::DELIVERY_ATTEMPTS), Some("2"));
    assert!(letter.header(broker_core::headers::DEAD_LETTER_REASON).is_some_and(|r| r.contains("not acknowledged")));
    let mut seen = Vec::new();
    while let Ok(attempt) = attempts.try_recv() {
        seen.push(attempt);
    }
    assert_eq!(seen, vec![1, 2], "one delivery and one redelivery, then the dead letter");
    sub.unsubscribe().await.unwrap();
    dlq.unsubscribe().await.unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL").arg(&topic).arg(format!("{topic}.dlq")).query_async(&mut conn).await.unwrap();
    broker.disconnect().await.unwrap();
}

/// `disconnect()` lets a running handler finish and sends its `XACK`: nothing stays pending.
#[tokio::test]
async fn redis_streams_disconnect_drains_and_acks() {
    let Some(url) = server() else { return };
    let broker = RedisBroker::streams(BrokerOptions::default().with_addresses([url.clone()])).unwrap();
    broker.connect().await.unwrap();
    let topic = unique("drain");
    let group = format!("g-{}", uuid_like());
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::clone(&finished);
    let _sub = broker
        .subscribe(
            &topic,
            handler_fn(move |_event: Event| {
                let (tx, done) = (started_tx.clone(), Arc::clone(&done));
                async move {
                    let _ = tx.send(());
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    done.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                }
            }),
            SubscribeOptions::new().with_queue(group.clone()),
        )
        .await
        .unwrap();
    broker.publish(&topic, Message::new("slow"), PublishOptions::new()).await.unwrap();
    tokio::time::timeout(WAIT, started.recv()).await.unwrap().unwrap();
    broker.disconnect().await.unwrap();
    assert!(finished.load(std::sync::atomic::Ordering::SeqCst), "disconnect waited for the handler");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let summary: (u64, Option<String>, Option<String>, redis::Value) =
        redis::cmd("XPENDING").arg(&topic).arg(&group).query_async(&mut conn).await.unwrap();
    assert_eq!(summary.0, 0, "the handled message was acked before disconnect() returned");
    let _: () = redis::cmd("DEL").arg(&topic).query_async(&mut conn).await.unwrap();
}
