//! The RabbitMQ backend against the shared server (`BROKER_TEST_RABBITMQ_URL`): Go Micro interop
//! with a raw lapin client, refused credentials, a queue group's durable queue, and reconnection
//! after the server closes the broker's connection (only this test's own connection, found by its
//! connection name; the shared server is never stopped).

use std::sync::Arc;
use std::time::Duration;

use broker_core::{Broker, BrokerOptions, ErrorKind, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_rabbitmq::RabbitBroker;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// `BROKER_TEST_RABBITMQ_URL`, or `None` (the test is skipped) unless `BROKER_TEST_REQUIRE` asks for rabbitmq.
fn shared_url(test: &str) -> Option<String> {
    match std::env::var("BROKER_TEST_RABBITMQ_URL").ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
        Some(url) => Some(url),
        None => {
            let required = std::env::var("BROKER_TEST_REQUIRE").is_ok_and(|v| {
                v.split(',').any(|i| i.trim().eq_ignore_ascii_case("all") || i.trim().eq_ignore_ascii_case("rabbitmq"))
            });
            assert!(!required, "BROKER_TEST_REQUIRE asks for rabbitmq but BROKER_TEST_RABBITMQ_URL is not set");
            eprintln!("SKIP {test}: BROKER_TEST_RABBITMQ_URL is not set");
            None
        }
    }
}

/// A name of its own for one test.
fn unique(name: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("rabbittest.{name}.{}.{n}.{nanos}", std::process::id())
}

fn options(url: &str) -> BrokerOptions {
    BrokerOptions::new()
        .with_addresses([url])
        .with_param("queue_expires_ms", "60000")
        .with_connect_timeout(Duration::from_secs(5))
        .with_publish_timeout(Duration::from_secs(5))
        .with_drain_timeout(Duration::from_secs(5))
}

async fn connected(options: BrokerOptions) -> RabbitBroker {
    let broker = RabbitBroker::with_options(options).unwrap();
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

async fn next(rx: &mut mpsc::UnboundedReceiver<Event>, what: &str) -> Event {
    tokio::time::timeout(WAIT, rx.recv()).await.unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}")).unwrap()
}

async fn raw_connection(url: &str) -> Connection {
    tokio::time::timeout(WAIT, Connection::connect(url, ConnectionProperties::default())).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_micro_reads_what_we_publish_raw_body_and_string_headers() {
    let Some(url) = shared_url("go_micro_reads_what_we_publish") else { return };
    let topic = unique("interop_out");
    // What Go Micro's plugin does: a non-durable topic exchange `micro`, a queue bound with key = topic.
    let raw = raw_connection(&url).await;
    let channel = raw.create_channel().await.unwrap();
    channel
        .exchange_declare("micro".into(), ExchangeKind::Topic, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let queue = channel
        .queue_declare("".into(), QueueDeclareOptions::exclusive().auto_delete(), FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            "micro".into(),
            topic.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(queue.name().clone(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();

    let broker = connected(options(&url)).await;
    let message = Message::new(r#"{"email":"ada@example.com"}"#)
        .with_header("Content-Type", "application/json")
        .with_header("Micro-Topic", topic.as_str());
    broker.publish(&topic, message, PublishOptions::new().with_header("Micro-Id", "42")).await.unwrap();

    let delivery = tokio::time::timeout(WAIT, consumer.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(delivery.routing_key.as_str(), topic, "routing key = topic");
    assert_eq!(delivery.exchange.as_str(), "micro");
    assert_eq!(delivery.data, br#"{"email":"ada@example.com"}"#, "the raw body, no envelope");
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let text = |key: &str| match headers.inner().get(key) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => panic!("header {key} is not a string in the header table: {other:?}"),
    };
    assert_eq!(text("Content-Type").as_deref(), Some("application/json"));
    assert_eq!(text("Micro-Topic").as_deref(), Some(topic.as_str()));
    assert_eq!(text("Micro-Id").as_deref(), Some("42"));
    assert_eq!(delivery.properties.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
    assert_eq!(delivery.properties.delivery_mode(), &Some(2), "persistent");
    delivery.acker.ack(BasicAckOptions::default()).await.unwrap();

    broker.disconnect().await.unwrap();
    let _ = raw.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_read_what_go_micro_publishes() {
    let Some(url) = shared_url("we_read_what_go_micro_publishes") else { return };
    let topic = unique("interop_in");
    let broker = connected(options(&url)).await;
    let (handler, mut got) = forwarding();
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new()).await.unwrap();

    // Go Micro's publish: exchange `micro`, routing key = topic, raw body, string headers, no content_type.
    let raw = raw_connection(&url).await;
    let channel = raw.create_channel().await.unwrap();
    let mut table = FieldTable::default();
    table.insert("Micro-Topic".into(), AMQPValue::LongString(topic.as_str().into()));
    table.insert("Micro-Id".into(), AMQPValue::LongString("abc".into()));
    table.insert("count".into(), AMQPValue::LongInt(7));
    let properties = BasicProperties::default().with_headers(table);
    channel
        .basic_publish("micro".into(), topic.as_str().into(), BasicPublishOptions::default(), b"hello", properties)
        .await
        .unwrap();

    let event = next(&mut got, "the Go Micro style message").await;
    assert_eq!(event.topic(), topic);
    assert_eq!(event.message().body(), b"hello");
    assert_eq!(event.message().header("Micro-Topic"), Some(topic.as_str()));
    assert_eq!(event.message().header("Micro-Id"), Some("abc"));
    assert_eq!(event.message().header("count"), Some("7"), "non-string values become text, as Go Micro's %v");
    assert_eq!(event.attempt(), 1);

    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
    let _ = raw.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_a_connection_error_without_the_password() {
    let Some(url) = shared_url("refused_credentials") else { return };
    let Some(rest) = url.split_once('@').map(|(_, rest)| rest) else {
        eprintln!("SKIP refused_credentials: the URL has no user info");
        return;
    };
    let bad = format!("amqp://guest:pw-XYZ123@{rest}");
    let broker = RabbitBroker::with_options(options(&bad)).unwrap();
    let err = tokio::time::timeout(WAIT, broker.connect()).await.expect("bounded by connect_timeout").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    let text = err.to_string();
    assert!(!text.contains("pw-XYZ123"), "the password is hidden: {text}");
    assert!(text.contains("guest:***@"), "the address is named: {text}");
    assert!(!broker.is_link_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_groups_queue_keeps_messages_while_its_members_are_away() {
    let Some(url) = shared_url("queue_group_keeps_messages") else { return };
    let topic = unique("group_keeps");
    let broker = connected(options(&url)).await;
    let (handler, _first) = forwarding();
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new().with_queue("workers")).await.unwrap();
    sub.unsubscribe().await.unwrap();
    for i in 0..3 {
        broker.publish(&topic, Message::new(format!("m{i}")), PublishOptions::new()).await.unwrap();
    }
    let (handler, mut got) = forwarding();
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new().with_queue("workers")).await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        bodies.push(
            next(&mut got, "a message kept by the group's queue").await.message().body_str().unwrap().to_string(),
        );
    }
    assert_eq!(bodies, ["m0", "m1", "m2"]);
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();

    let raw = raw_connection(&url).await;
    let channel = raw.create_channel().await.unwrap();
    channel.queue_delete(format!("{topic}:workers").as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let _ = raw.close(200, "done".into()).await;
}

/// Runs `rabbitmqctl` with `args`; `None` when it cannot run here.
fn rabbitmqctl(args: &[&str]) -> Option<String> {
    let output = match std::process::Command::new("rabbitmqctl").args(args).output() {
        Ok(output) => output,
        Err(error) => {
            eprintln!("rabbitmqctl {args:?}: {error}");
            return None;
        }
    };
    if !output.status.success() {
        eprintln!("rabbitmqctl {args:?}: {}: {}", output.status, String::from_utf8_lossy(&output.stderr));
        return None;
    }
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Closes, from the server side, the connections whose client properties carry `connection_name`
/// (by pid: `rabbitmqctl close_connection` of RabbitMQ 3.10 takes a connection pid).
fn close_own_connection(connection_name: &str) -> usize {
    let Some(listing) = rabbitmqctl(&["list_connections", "-q", "--no-table-headers", "pid", "client_properties"])
    else {
        return 0;
    };
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(connection_name)) {
        let Some(pid) = line.split('\t').next() else { continue };
        if rabbitmqctl(&["close_connection", pid, "micro-broker reconnect test"]).is_some() {
            closed += 1;
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_resubscribes_after_the_server_closes_the_connection() {
    let Some(url) = shared_url("reconnects_and_resubscribes") else { return };
    if rabbitmqctl(&["status"]).is_none() {
        eprintln!("SKIP reconnects_and_resubscribes: rabbitmqctl cannot reach the server here");
        return;
    }
    let connection_name = unique("reconnect-conn");
    let topic = unique("reconnect");
    let broker = connected(options(&url).with_param("connection_name", connection_name.as_str())).await;
    let (group_handler, mut group) = forwarding();
    let (broadcast_handler, mut broadcast) = forwarding();
    let group_sub =
        broker.subscribe(&topic, group_handler, SubscribeOptions::new().with_queue("workers")).await.unwrap();
    let broadcast_sub = broker.subscribe(&topic, broadcast_handler, SubscribeOptions::new()).await.unwrap();
    broker.publish(&topic, Message::new("before"), PublishOptions::new()).await.unwrap();
    assert_eq!(next(&mut group, "group before").await.message().body(), b"before");
    assert_eq!(next(&mut broadcast, "broadcast before").await.message().body(), b"before");

    // The server closes this test's connection (found by its connection name; ~1 s per rabbitmqctl call).
    let mut closed = 0;
    for _ in 0..10 {
        closed = close_own_connection(&connection_name);
        if closed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(closed > 0, "rabbitmqctl found no connection named {connection_name}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while broker.stats().reconnects == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no reconnection within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Both subscriptions come back: publish until each has received a message sent after the loss.
    let (mut group_ok, mut broadcast_ok) = (false, false);
    let mut i = 0;
    while !(group_ok && broadcast_ok) {
        assert!(tokio::time::Instant::now() < deadline, "group {group_ok}, broadcast {broadcast_ok} after 20 s");
        broker.publish(&topic, Message::new(format!("after-{i}")), PublishOptions::new()).await.unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        while let Ok(event) = group.try_recv() {
            group_ok |= event.message().body_str().is_some_and(|b| b.starts_with("after-"));
        }
        while let Ok(event) = broadcast.try_recv() {
            broadcast_ok |= event.message().body_str().is_some_and(|b| b.starts_with("after-"));
        }
    }
    assert!(broker.is_link_up());
    assert!(broker.stats().reconnects >= 1);

    group_sub.unsubscribe().await.unwrap();
    broadcast_sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
    let raw = raw_connection(&url).await;
    let channel = raw.create_channel().await.unwrap();
    channel.queue_delete(format!("{topic}:workers").as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let _ = raw.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_carries_the_next_attempt_and_the_previous_failure() {
    let Some(url) = shared_url("redelivery_carries_attempt_and_failure") else { return };
    let topic = unique("redelivery_error");
    let broker = connected(options(&url)).await;
    let (tx, mut got) = mpsc::unbounded_channel();
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            let first = event.attempt() == 1;
            let _ = tx.send(event);
            if first { Err("db down on purpose".into()) } else { Ok(()) }
        }
    });
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new()).await.unwrap();
    broker.publish(&topic, Message::new("x").with_header("k", "v"), PublishOptions::new()).await.unwrap();
    let first = next(&mut got, "the first attempt").await;
    let second = next(&mut got, "the redelivery").await;
    assert_eq!((first.attempt(), second.attempt()), (1, 2));
    assert!(first.error().is_none());
    let error = second.error().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("db down on purpose"), "{error}");
    assert_eq!(second.message().headers, first.message().headers, "internal headers are not shown to handlers");
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
    assert_eq!(broker.stats().redeliveries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_declared_with_other_durability_is_explained() {
    let Some(url) = shared_url("exchange_durability_mismatch") else { return };
    let exchange = unique("exchange");
    let raw = raw_connection(&url).await;
    let channel = raw.create_channel().await.unwrap();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let broker = RabbitBroker::with_options(
        options(&url).with_param("exchange", exchange.as_str()).with_param("exchange_durable", "true"),
    )
    .unwrap();
    let err = tokio::time::timeout(WAIT, broker.connect()).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("exchange_durable"), "{err}");
    let _ = channel.exchange_delete(exchange.as_str().into(), Default::default()).await;
    let _ = raw.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_recovers_after_the_exchange_was_deleted() {
    let Some(url) = shared_url("exchange_deleted") else { return };
    let exchange = unique("deleted_exchange");
    let topic = unique("deleted_exchange_topic");
    let broker = connected(options(&url).with_param("exchange", exchange.as_str())).await;
    broker.publish(&topic, Message::new("one"), PublishOptions::new()).await.unwrap();
    let raw = raw_connection(&url).await;
    let channel = raw.create_channel().await.unwrap();
    channel.exchange_delete(exchange.as_str().into(), Default::default()).await.unwrap();
    // The first publish to the missing exchange may fail (the server closes the channel); the
    // next one re-opens the channel, declares the exchange again, and succeeds.
    let _ = broker.publish(&topic, Message::new("two"), PublishOptions::new()).await;
    broker.publish(&topic, Message::new("three"), PublishOptions::new()).await.unwrap();
    broker.disconnect().await.unwrap();
    channel.exchange_delete(exchange.as_str().into(), Default::default()).await.unwrap();
    let _ = raw.close(200, "done".into()).await;
}
