//! The Kafka backend against the shared server (`BROKER_TEST_KAFKA_URL`, e.g. tansu on
//! 127.0.0.1:9092): commit after the handler, dead letters, bounded disconnect, typed errors,
//! record headers and key as a raw rdkafka consumer sees them, and Go Micro's envelope both ways.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use broker_core::{
    Broker, BrokerOptions, ErrorKind, Event, Message, PublishOptions, SubscribeOptions, codec, handler_fn, headers,
};
use broker_kafka::KafkaBroker;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// `BROKER_TEST_KAFKA_URL`, or `None` (the test is skipped) unless `BROKER_TEST_REQUIRE` asks for kafka.
fn shared_url(test: &str) -> Option<String> {
    match std::env::var("BROKER_TEST_KAFKA_URL").ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
        Some(url) => Some(url),
        None => {
            let required = std::env::var("BROKER_TEST_REQUIRE").is_ok_and(|v| {
                v.split(',').any(|i| i.trim().eq_ignore_ascii_case("all") || i.trim().eq_ignore_ascii_case("kafka"))
            });
            assert!(!required, "BROKER_TEST_REQUIRE asks for kafka but BROKER_TEST_KAFKA_URL is not set");
            eprintln!("SKIP {test}: BROKER_TEST_KAFKA_URL is not set");
            None
        }
    }
}

/// `host:port` of a Kafka URL (`kafka://host:port` or `host:port`).
fn bootstrap(url: &str) -> String {
    url.split_once("://").map_or(url, |(_, rest)| rest).to_string()
}

/// A topic of its own for one test (Kafka's legal characters only).
fn unique(name: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("kafkatest.{name}.{}.{n}.{nanos}", std::process::id())
}

fn options(url: &str) -> BrokerOptions {
    BrokerOptions::new()
        .with_addresses([url])
        .with_param("fetch_wait_ms", "5")
        .with_connect_timeout(Duration::from_secs(5))
        .with_publish_timeout(Duration::from_secs(10))
        .with_drain_timeout(Duration::from_secs(5))
}

async fn connected(options: BrokerOptions) -> KafkaBroker {
    let broker = KafkaBroker::with_options(options).unwrap();
    tokio::time::timeout(WAIT, broker.connect()).await.expect("connect in time").expect("connect");
    broker
}

fn forwarding() -> (Arc<dyn broker_core::Handler>, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(event);
            Ok(())
        }
    });
    (handler, rx)
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(WAIT, rx.recv()).await.unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}")).unwrap()
}

/// A raw consumer of `topic` from its beginning, in a group of its own.
fn raw_consumer(url: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(url))
        .set("group.id", unique("raw-group"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&list).unwrap();
    consumer
}

fn raw_producer(url: &str) -> FutureProducer {
    ClientConfig::new().set("bootstrap.servers", bootstrap(url)).create().unwrap()
}

/// Record headers as (name, value) pairs, sorted.
fn header_pairs(message: &rdkafka::message::BorrowedMessage<'_>) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = message
        .headers()
        .map(|h| {
            h.iter().map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into())).collect()
        })
        .unwrap_or_default();
    pairs.sort();
    pairs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_key_are_record_headers_and_key_for_a_raw_consumer() {
    let Some(url) = shared_url("headers_and_key") else { return };
    let topic = unique("raw_headers");
    let broker = connected(options(&url)).await;
    let message = Message::new("body-1").with_header("Content-Type", "text/plain").with_header("x-ключ", "значение");
    let publish = PublishOptions::new().with_header("x-empty", "").with_ordering_key("customer-7");
    broker.publish(&topic, message, publish).await.unwrap();

    let consumer = raw_consumer(&url, &topic);
    let record = tokio::time::timeout(WAIT, consumer.recv()).await.unwrap().unwrap();
    assert_eq!(record.payload(), Some(&b"body-1"[..]), "the raw body is the record value");
    assert_eq!(record.key(), Some(&b"customer-7"[..]), "the ordering key is the record key");
    assert_eq!(
        header_pairs(&record),
        vec![
            ("Content-Type".to_string(), "text/plain".to_string()),
            ("x-empty".to_string(), String::new()),
            ("x-ключ".to_string(), "значение".to_string()),
        ]
    );
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_micro_envelope_is_the_record_value_both_ways() {
    let Some(url) = shared_url("go_micro_envelope") else { return };
    let topic = unique("envelope");
    let broker = connected(options(&url).with_param("envelope", "go-micro")).await;
    let (handler, mut got) = forwarding();
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new()).await.unwrap();

    // Ours -> raw (what Go Micro's Kafka plugin reads): a JSON envelope, no record headers.
    broker.publish(&topic, Message::new(r#"{"id":1}"#).with_header("a", "b"), PublishOptions::new()).await.unwrap();
    let consumer = raw_consumer(&url, &topic);
    let record = tokio::time::timeout(WAIT, consumer.recv()).await.unwrap().unwrap();
    assert!(record.headers().is_none_or(|h| h.count() == 0), "no record headers with the go-micro envelope");
    let value: serde_json::Value = serde_json::from_slice(record.payload().unwrap()).unwrap();
    assert_eq!(value["Header"]["a"], "b");
    assert_eq!(value["Header"][codec::MICRO_TOPIC], topic.as_str());
    assert_eq!(value["Header"]["Content-Type"], "application/json");
    assert_eq!(value["Body"], "eyJpZCI6MX0=", "the body in standard base64");
    let ours = next(&mut got, "our own enveloped message").await;
    assert_eq!(ours.message().body(), br#"{"id":1}"#);

    // Raw (what Go Micro's Kafka plugin writes) -> ours: envelope decoded, record headers merged.
    let producer = raw_producer(&url);
    let go = format!(r#"{{"Header":{{"Micro-Topic":"{topic}","Micro-Id":"42","x":"envelope"}},"Body":"aGVsbG8="}}"#);
    let headers = OwnedHeaders::new().insert(Header { key: "x", value: Some("record") });
    producer
        .send(FutureRecord::<(), _>::to(&topic).payload(go.as_bytes()).headers(headers), Duration::from_secs(5))
        .await
        .unwrap();
    let event = next(&mut got, "the Go Micro message").await;
    assert_eq!(event.message().body(), b"hello");
    assert_eq!(event.message().header("Micro-Id"), Some("42"));
    assert_eq!(event.message().header("x"), Some("record"), "record headers are merged over the envelope's");
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_mode_reads_what_a_raw_producer_writes() {
    let Some(url) = shared_url("native_reads_raw") else { return };
    let topic = unique("native_in");
    let broker = connected(options(&url)).await;
    let (handler, mut got) = forwarding();
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new()).await.unwrap();
    let headers = OwnedHeaders::new()
        .insert(Header { key: "k", value: Some("v") })
        .insert(Header::<&[u8]> { key: "null", value: None });
    raw_producer(&url)
        .send(FutureRecord::to(&topic).payload("raw").key("key-1").headers(headers), Duration::from_secs(5))
        .await
        .unwrap();
    let event = next(&mut got, "the raw record").await;
    assert_eq!(event.message().body(), b"raw");
    assert_eq!(event.message().header("k"), Some("v"));
    assert_eq!(event.message().header("null"), Some(""), "a null header value reads as empty");
    assert_eq!(event.attempt(), 1);
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}

/// A queue-group member that stops before handling a message leaves it uncommitted: the next
/// member of the group gets it. What was handled is committed and not delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_committed_only_after_the_handler() {
    let Some(url) = shared_url("commit_after_handler") else { return };
    let topic = unique("commit");
    let group = SubscribeOptions::new().with_queue("workers");

    // Member one handles "handled", then is stuck on "stuck" and is stopped (drain timeout 1 s).
    let first = connected(options(&url).with_drain_timeout(Duration::from_secs(1))).await;
    let (tx, mut seen) = mpsc::unbounded_channel::<String>();
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            let body = event.message().body_str().unwrap_or_default().to_string();
            let _ = tx.send(body.clone());
            if body == "stuck" {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Ok(())
        }
    });
    let sub = first.subscribe(&topic, handler, group.clone()).await.unwrap();
    first.publish(&topic, Message::new("handled"), PublishOptions::new()).await.unwrap();
    assert_eq!(next(&mut seen, "the first message").await, "handled");
    first.publish(&topic, Message::new("stuck"), PublishOptions::new()).await.unwrap();
    assert_eq!(next(&mut seen, "the message the member gets stuck on").await, "stuck");
    let err = sub.unsubscribe().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    first.disconnect().await.unwrap();

    // Member two joins the group: it gets "stuck" (never handled), not "handled" (committed).
    let second = connected(options(&url)).await;
    let (handler, mut got) = forwarding();
    let sub = second.subscribe(&topic, handler, group).await.unwrap();
    let event = next(&mut got, "the message member one never finished").await;
    assert_eq!(event.message().body(), b"stuck");
    let more = tokio::time::timeout(Duration::from_millis(1500), got.recv()).await;
    assert!(more.is_err(), "the handled message must not be delivered again: {more:?}");
    sub.unsubscribe().await.unwrap();
    second.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_after_max_redeliveries_are_records_with_reason_headers() {
    let Some(url) = shared_url("dead_letter") else { return };
    let topic = unique("dlq");
    let broker = connected(options(&url)).await;
    let (tx, mut attempts) = mpsc::unbounded_channel();
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            let previous = event.error().map(|e| e.to_string());
            let _ = tx.send((event.attempt(), previous));
            Err("poisoned on purpose".into())
        }
    });
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new().with_max_redeliveries(1)).await.unwrap();
    broker.publish(&topic, Message::new("poison").with_header("k", "v"), PublishOptions::new()).await.unwrap();
    let (one, none) = next(&mut attempts, "attempt 1").await;
    let (two, previous) = next(&mut attempts, "attempt 2").await;
    assert_eq!((one, two), (1, 2));
    assert!(none.is_none());
    assert!(previous.unwrap_or_default().contains("poisoned on purpose"), "Event::error has the previous failure");

    let consumer = raw_consumer(&url, &format!("{topic}.dlq"));
    let record = tokio::time::timeout(WAIT, consumer.recv()).await.expect("a dead letter").unwrap();
    assert_eq!(record.payload(), Some(&b"poison"[..]));
    let pairs = header_pairs(&record);
    let header = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    assert_eq!(header("k").as_deref(), Some("v"));
    assert_eq!(header(headers::DELIVERY_ATTEMPTS).as_deref(), Some("2"));
    assert_eq!(header(headers::ORIGINAL_TOPIC).as_deref(), Some(topic.as_str()));
    assert!(header(headers::DEAD_LETTER_REASON).unwrap_or_default().contains("poisoned on purpose"));
    assert!(tokio::time::timeout(Duration::from_millis(500), attempts.recv()).await.is_err(), "no third attempt");
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
    assert_eq!(broker.stats().dead_lettered, 1);
    assert_eq!(broker.stats().redeliveries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_is_bounded_with_a_handler_in_flight() {
    let Some(url) = shared_url("disconnect_bounded") else { return };
    let topic = unique("bounded");
    let broker = connected(options(&url).with_drain_timeout(Duration::from_millis(500))).await;
    let (tx, mut started) = mpsc::unbounded_channel();
    let handler = handler_fn(move |_event: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(());
            tokio::time::sleep(Duration::from_secs(120)).await;
            Ok(())
        }
    });
    let _sub = broker.subscribe(&topic, handler, SubscribeOptions::new().with_queue("slow")).await.unwrap();
    broker.publish(&topic, Message::new("forever"), PublishOptions::new()).await.unwrap();
    next(&mut started, "the handler to start").await;
    let began = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), broker.disconnect()).await.expect("bounded").unwrap_err();
    let took = began.elapsed();
    eprintln!("disconnect with a stuck handler returned after {took:?}: {err}");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    let e = broker.publish(&topic, Message::new("late"), PublishOptions::new()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotConnected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_connection_error_within_the_connect_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let options = BrokerOptions::new()
        .with_addresses([format!("kafka://user:pw-s3cret@127.0.0.1:{port}")])
        .with_connect_timeout(Duration::from_secs(1));
    let broker = KafkaBroker::with_options(options).unwrap();
    let began = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), broker.connect()).await.expect("bounded").unwrap_err();
    eprintln!("unreachable server: {:?} -> {err}", began.elapsed());
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")) && !text.contains("pw-s3cret"), "{text}");
    assert!(!format!("{broker:?}").contains("pw-s3cret"));
    let e = broker.publish("t", Message::new("x"), PublishOptions::new()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotConnected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_or_impossible_sasl_is_a_typed_error() {
    let Some(url) = shared_url("sasl") else { return };
    // The shared server has a plaintext listener without SASL: PLAIN credentials cannot succeed.
    let address = format!("kafka://user:pw-XYZ123@{}", bootstrap(&url));
    let options = BrokerOptions::new().with_addresses([address]).with_connect_timeout(Duration::from_secs(2));
    let broker = KafkaBroker::with_options(options).unwrap();
    let began = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), broker.connect()).await.expect("bounded").unwrap_err();
    eprintln!("SASL against a plaintext listener: {:?} -> {err}", began.elapsed());
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(!err.to_string().contains("pw-XYZ123"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_names_kafka_refuses_are_invalid_input_before_any_io() {
    // No server needed: the names are checked before anything else.
    let broker = KafkaBroker::new();
    for (topic, rule) in [
        ("orders:created", "may only contain"),
        ("a/b", "may only contain"),
        ("ünïcode", "may only contain"),
        (&"x".repeat(250) as &str, "at most 249"),
        ("a b", "whitespace"),
    ] {
        let err = broker.publish(topic, Message::new("x"), PublishOptions::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{topic}: {err}");
        assert!(err.to_string().contains(rule), "{err}");
        let err = broker.subscribe(topic, forwarding().0, SubscribeOptions::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{topic}: {err}");
    }
    let long = "y".repeat(247);
    let err =
        broker.subscribe(&long, forwarding().0, SubscribeOptions::new().with_max_redeliveries(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains(".dlq"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_shares_work_by_key_over_partitions() {
    let Some(url) = shared_url("group_shares_by_key") else { return };
    let topic = unique("shares");
    let broker = connected(options(&url).with_param("partitions", "3")).await;
    let (tx, mut got) = mpsc::unbounded_channel::<(usize, String)>();
    let mut subs = Vec::new();
    for member in 0..3 {
        let tx = tx.clone();
        let handler = handler_fn(move |event: Event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((member, event.message().body_str().unwrap_or_default().to_string()));
                Ok(())
            }
        });
        subs.push(broker.subscribe(&topic, handler, SubscribeOptions::new().with_queue("workers")).await.unwrap());
    }
    for i in 0..300 {
        let body = format!("m{i}");
        broker
            .publish(&topic, Message::new(body.clone()), PublishOptions::new().with_ordering_key(body))
            .await
            .unwrap();
    }
    let mut per_member = [0usize; 3];
    let mut bodies = std::collections::BTreeSet::new();
    for _ in 0..300 {
        let (member, body) = next(&mut got, "a keyed message").await;
        per_member[member] += 1;
        assert!(bodies.insert(body.clone()), "{body} delivered twice");
    }
    eprintln!("messages per member: {per_member:?}");
    assert!(per_member.iter().all(|n| *n > 0), "every member owns a partition: {per_member:?}");
    for sub in subs {
        sub.unsubscribe().await.unwrap();
    }
    broker.disconnect().await.unwrap();
}
