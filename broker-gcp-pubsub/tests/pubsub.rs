//! The gcp-pubsub backend against the Pub/Sub emulator (`BROKER_TEST_GCP_PUBSUB_URL`, its
//! `host:port`): interop with the raw google-cloud-pubsub client (data, attributes, ordering key,
//! the topic-name mapping), a queue group's subscription keeping messages while its members are
//! away, broadcast subscriptions deleted on unsubscribe, Pub/Sub's own dead-letter policy,
//! names and values the service would reject, and the ack deadline extended while a handler runs.

use std::sync::Arc;
use std::time::Duration;

use broker_core::{Broker, BrokerOptions, ErrorKind, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_gcp_pubsub::{PubSubBroker, wire};
use google_cloud_auth::credentials::anonymous::Builder as Anonymous;
use google_cloud_pubsub::client::{BasePublisher, SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::model::{DeadLetterPolicy, Message as RawMessage};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);
const PROJECT: &str = "test";

/// `BROKER_TEST_GCP_PUBSUB_URL`, or `None` (the test is skipped) unless `BROKER_TEST_REQUIRE` asks for gcp-pubsub.
fn emulator(test: &str) -> Option<String> {
    match std::env::var("BROKER_TEST_GCP_PUBSUB_URL").ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
        Some(url) => Some(url),
        None => {
            let required = std::env::var("BROKER_TEST_REQUIRE").is_ok_and(|v| {
                v.split(',')
                    .any(|i| i.trim().eq_ignore_ascii_case("all") || i.trim().eq_ignore_ascii_case("gcp-pubsub"))
            });
            assert!(!required, "BROKER_TEST_REQUIRE asks for gcp-pubsub but BROKER_TEST_GCP_PUBSUB_URL is not set");
            eprintln!("SKIP {test}: BROKER_TEST_GCP_PUBSUB_URL is not set");
            None
        }
    }
}

/// A name of its own for one test.
fn unique(name: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("pubsubtest.{name}.{}.{n}.{nanos}", std::process::id())
}

fn options(host: &str) -> BrokerOptions {
    BrokerOptions::new()
        .with_addresses([host])
        .with_param("project", PROJECT)
        .with_param("batch_delay_ms", "0")
        .with_connect_timeout(Duration::from_secs(10))
        .with_publish_timeout(Duration::from_secs(10))
        .with_drain_timeout(Duration::from_secs(10))
}

async fn connected(host: &str) -> PubSubBroker {
    let broker = PubSubBroker::with_options(options(host)).unwrap();
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

fn topic_path(id: &str) -> String {
    format!("projects/{PROJECT}/topics/{id}")
}

fn subscription_path(id: &str) -> String {
    format!("projects/{PROJECT}/subscriptions/{id}")
}

/// The raw admin clients of the emulator.
async fn admins(host: &str) -> (TopicAdmin, SubscriptionAdmin) {
    let url = format!("http://{host}");
    let topics = TopicAdmin::builder()
        .with_endpoint(url.clone())
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap();
    let subscriptions = SubscriptionAdmin::builder()
        .with_endpoint(url)
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap();
    (topics, subscriptions)
}

/// The subscription ids of topic `id`.
async fn subscriptions_of(topics: &TopicAdmin, id: &str) -> Vec<String> {
    let response = topics.list_topic_subscriptions().set_topic(topic_path(id)).send().await.unwrap();
    response.subscriptions.iter().map(|s| s.rsplit('/').next().unwrap_or_default().to_string()).collect()
}

/// A raw streaming pull of subscription `id`: (message, delivery attempt) of each delivery, acked
/// unless `nack` says to nack it.
fn raw_pull(
    host: &str,
    id: &str,
    nack: impl Fn(&RawMessage) -> bool + Send + 'static,
) -> mpsc::UnboundedReceiver<(RawMessage, Option<i32>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let url = format!("http://{host}");
    let path = subscription_path(id);
    tokio::spawn(async move {
        let client = google_cloud_pubsub::client::Subscriber::builder()
            .with_endpoint(url)
            .with_credentials(Anonymous::new().build())
            .build()
            .await
            .unwrap();
        let mut stream = client.subscribe(path).build();
        while let Some(Ok((message, handle))) = stream.next().await {
            let attempt = handle.delivery_attempt();
            if nack(&message) {
                handle.nack()
            } else {
                handle.ack()
            }
            if tx.send((message, attempt)).is_err() {
                break;
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_with_the_raw_client_data_attributes_ordering_key_and_names() {
    let Some(host) = emulator("interop_with_the_raw_client_data_attributes_ordering_key_and_names") else { return };
    let broker = connected(&host).await;
    let (topics, subscriptions) = admins(&host).await;
    // A topic with characters Pub/Sub ids cannot hold, and a leading digit.
    let topic = format!("9/{}:ü~", unique("interop"));
    let id = wire::topic_id(&topic).unwrap();
    assert!(id.starts_with("mb~~9~2Fpubsubtest.interop."), "{id}");

    // The raw client reads what the broker publishes: data, attributes, ordering key.
    let raw_sub = unique("raw-reader").replace('.', "-");
    let (handler, mut got) = forwarding();
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new()).await.unwrap();
    subscriptions
        .create_subscription()
        .set_name(subscription_path(&raw_sub))
        .set_topic(topic_path(&id))
        .send()
        .await
        .unwrap();
    let mut raw = raw_pull(&host, &raw_sub, |_| false);
    let message = Message::new("from the broker").with_header("Content-Type", "text/plain");
    broker.publish(&topic, message, PublishOptions::new().with_ordering_key("user-7")).await.unwrap();
    let (read, _) = tokio::time::timeout(WAIT, raw.recv()).await.expect("the raw client reads it").unwrap();
    assert_eq!(&read.data[..], b"from the broker");
    assert_eq!(read.attributes.get("Content-Type").map(String::as_str), Some("text/plain"));
    assert_eq!(read.ordering_key, "user-7");
    assert_eq!(next(&mut got, "the broker's own subscriber").await.message().body(), b"from the broker");

    // The broker reads what a raw publisher sends to the mapped topic.
    let publisher = BasePublisher::builder()
        .with_endpoint(format!("http://{host}"))
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap()
        .publisher(topic_path(&id))
        .build();
    let raw_message = RawMessage::new().set_data("from the raw client").set_attributes([("trace", "abc")]);
    publisher.publish(raw_message).await.unwrap();
    let event = next(&mut got, "the raw client's message").await;
    assert_eq!(event.topic(), topic);
    assert_eq!(event.message().body(), b"from the raw client");
    assert_eq!(event.message().header("trace"), Some("abc"));

    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
    let _ = subscriptions.delete_subscription().set_subscription(subscription_path(&raw_sub)).send().await;
    let _ = topics.delete_topic().set_topic(topic_path(&id)).send().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_keeps_messages_while_its_members_are_away() {
    let Some(host) = emulator("a_queue_group_keeps_messages_while_its_members_are_away") else { return };
    let broker = connected(&host).await;
    let topic = unique("group");
    let (handler, _got) = forwarding();
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new().with_queue("billing")).await.unwrap();
    sub.unsubscribe().await.unwrap();
    for i in 0..3 {
        broker.publish(&topic, Message::new(format!("while away {i}")), PublishOptions::new()).await.unwrap();
    }
    let (handler, mut got) = forwarding();
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new().with_queue("billing")).await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        bodies.push(String::from_utf8_lossy(next(&mut got, "a kept message").await.message().body()).into_owned());
    }
    bodies.sort();
    assert_eq!(bodies, ["while away 0", "while away 1", "while away 2"]);
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
    let (topics, subscriptions) = admins(&host).await;
    let group = wire::group_subscription_id(&topic, "billing").unwrap();
    let _ = subscriptions.delete_subscription().set_subscription(subscription_path(&group)).send().await;
    let _ = topics.delete_topic().set_topic(topic_path(&wire::topic_id(&topic).unwrap())).send().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_subscriptions_are_deleted_on_unsubscribe_and_disconnect() {
    let Some(host) = emulator("broadcast_subscriptions_are_deleted_on_unsubscribe_and_disconnect") else { return };
    let broker = connected(&host).await;
    let (topics, _) = admins(&host).await;
    let topic = unique("broadcast");
    let id = wire::topic_id(&topic).unwrap();
    let (handler, _got) = forwarding();
    let first = broker.subscribe(&topic, Arc::clone(&handler), SubscribeOptions::new()).await.unwrap();
    let _second = broker.subscribe(&topic, handler, SubscribeOptions::new()).await.unwrap();
    let subs = subscriptions_of(&topics, &id).await;
    assert_eq!(subs.len(), 2, "one subscription per broadcast subscriber: {subs:?}");
    assert!(subs.iter().all(|s| s.starts_with(&format!("{id}~~b~~"))), "{subs:?}");
    first.unsubscribe().await.unwrap();
    assert_eq!(subscriptions_of(&topics, &id).await.len(), 1, "unsubscribe deletes the subscriber's own");
    broker.disconnect().await.unwrap();
    assert!(subscriptions_of(&topics, &id).await.is_empty(), "disconnect deletes the rest");
    let _ = topics.delete_topic().set_topic(topic_path(&id)).send().await;
}

/// Pub/Sub's own dead-letter policy, set with `max_redeliveries`: the emulator stores it, counts
/// delivery attempts and stops redelivering after `max_delivery_attempts`. Seen here with a raw
/// subscriber that nacks everything (the broker itself dead-letters before that bound). Whether
/// the emulator then forwards the message to the dead-letter topic is printed, not asserted: the
/// one on this machine image does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_gets_pubsubs_dead_letter_policy() {
    let Some(host) = emulator("the_subscription_gets_pubsubs_dead_letter_policy") else { return };
    let broker = connected(&host).await;
    let (topics, subscriptions) = admins(&host).await;
    let topic = unique("dlq-policy");
    let (handler, _got) = forwarding();
    let options = SubscribeOptions::new().with_queue("workers").with_max_redeliveries(3);
    let sub = broker.subscribe(&topic, handler, options).await.unwrap();
    sub.unsubscribe().await.unwrap();
    let group = wire::group_subscription_id(&topic, "workers").unwrap();
    let stored = subscriptions.get_subscription().set_subscription(subscription_path(&group)).send().await.unwrap();
    let policy = stored.dead_letter_policy.clone().unwrap_or_else(DeadLetterPolicy::new);
    let dlq_id = wire::topic_id(&format!("{topic}.dlq")).unwrap();
    assert_eq!(policy.dead_letter_topic, topic_path(&dlq_id), "{stored:?}");
    assert_eq!(policy.max_delivery_attempts, 5, "max_redeliveries 3 + 2, within Pub/Sub's 5..=100");
    assert!(stored.enable_message_ordering, "{stored:?}");

    // Pub/Sub itself: a raw consumer that always nacks sees attempts 1..=5, then the message is
    // on the dead-letter topic.
    let dead_sub = unique("dead-reader").replace('.', "-");
    subscriptions
        .create_subscription()
        .set_name(subscription_path(&dead_sub))
        .set_topic(topic_path(&dlq_id))
        .send()
        .await
        .unwrap();
    let mut dead = raw_pull(&host, &dead_sub, |_| false);
    let mut nacking = raw_pull(&host, &group, |_| true);
    broker.publish(&topic, Message::new("poison"), PublishOptions::new()).await.unwrap();
    let mut attempts = Vec::new();
    while let Ok(Some((_, attempt))) = tokio::time::timeout(Duration::from_secs(3), nacking.recv()).await {
        attempts.push(attempt);
        if attempts.len() == 8 {
            break;
        }
    }
    assert_eq!(attempts, [Some(1), Some(2), Some(3), Some(4), Some(5)], "the server counts, and stops at the bound");
    // Google's service now publishes the message to the dead-letter topic; the emulator (0.8.20)
    // does not (it drops it), which is why the broker dead-letters by itself, before this bound.
    match tokio::time::timeout(Duration::from_secs(2), dead.recv()).await {
        Ok(Some((letter, _))) => {
            assert_eq!(&letter.data[..], b"poison");
            eprintln!("NOTE: this Pub/Sub emulator forwards to the dead-letter topic");
        }
        _ => eprintln!("NOTE: this Pub/Sub emulator does not forward to the dead-letter topic (Google's service does)"),
    }
    broker.disconnect().await.unwrap();
    for id in [&group, &dead_sub] {
        let _ = subscriptions.delete_subscription().set_subscription(subscription_path(id)).send().await;
    }
    for id in [wire::topic_id(&topic).unwrap(), dlq_id] {
        let _ = topics.delete_topic().set_topic(topic_path(&id)).send().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_values_the_service_rejects_are_invalid_input() {
    let Some(host) = emulator("names_and_values_the_service_rejects_are_invalid_input") else { return };
    let broker = connected(&host).await;
    let long = "ü".repeat(120); // 240 bytes: a legal broker topic, 720 characters once escaped
    let err = broker.publish(&long, Message::new("x"), PublishOptions::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let (handler, _got) = forwarding();
    let err = broker.subscribe(&long, handler.clone(), SubscribeOptions::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let group = "g".repeat(250);
    let err = broker.subscribe(&unique("t"), handler, SubscribeOptions::new().with_queue(group)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let topic = unique("values");
    for message in [
        Message::new("x").with_header("goog-reserved", "v"),
        Message::new("x").with_header("k", "v".repeat(2000)),
        Message::new(vec![0u8; 10_000_001]),
    ] {
        let err = broker.publish(&topic, message, PublishOptions::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }
    broker.disconnect().await.unwrap();
}

/// A handler that runs longer than the subscription's ack deadline (10 s) is not redelivered
/// meanwhile: the client extends the deadline (modifyAckDeadline) while it runs. The control, a
/// raw consumer that stops extending after 1 s (`set_max_lease`) and holds its message as long,
/// is redelivered: the emulator does enforce the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_deadline_is_extended_while_a_handler_runs() {
    let Some(host) = emulator("the_ack_deadline_is_extended_while_a_handler_runs") else { return };
    const HOLD: Duration = Duration::from_secs(14);
    let broker = connected(&host).await;
    let (topics, subscriptions) = admins(&host).await;

    // The broker's subscriber: one slow handler run, and no second delivery.
    let topic = unique("deadline");
    let (tx, mut got) = mpsc::unbounded_channel();
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(event.attempt());
            tokio::time::sleep(HOLD).await;
            Ok(())
        }
    });
    let options = SubscribeOptions::new().with_queue("slow").with_concurrency(2);
    let sub = broker.subscribe(&topic, handler, options).await.unwrap();

    // The control on a raw subscription of its own with a 10 s deadline.
    let id = wire::topic_id(&topic).unwrap();
    let raw_sub = unique("deadline-control").replace('.', "-");
    subscriptions
        .create_subscription()
        .set_name(subscription_path(&raw_sub))
        .set_topic(topic_path(&id))
        .set_ack_deadline_seconds(10)
        .send()
        .await
        .unwrap();
    let (raw_tx, mut raw_got) = mpsc::unbounded_channel();
    let control_path = subscription_path(&raw_sub);
    let control_host = format!("http://{host}");
    tokio::spawn(async move {
        let client = google_cloud_pubsub::client::Subscriber::builder()
            .with_endpoint(control_host)
            .with_credentials(Anonymous::new().build())
            .build()
            .await
            .unwrap();
        let mut stream = client
            .subscribe(control_path)
            .set_max_lease(Duration::from_secs(1))
            .set_max_lease_extension(Duration::from_secs(10))
            .build();
        let mut held = Vec::new();
        while let Some(Ok((message, handle))) = stream.next().await {
            let _ = raw_tx.send(message.message_id.clone());
            held.push(handle); // never settled while the test runs
        }
    });

    broker.publish(&topic, Message::new("slow"), PublishOptions::new()).await.unwrap();
    assert_eq!(next_attempt(&mut got).await, Some(1));
    let first = tokio::time::timeout(WAIT, raw_got.recv()).await.expect("the control's first delivery").unwrap();
    let started = tokio::time::Instant::now();
    let again = tokio::time::timeout(HOLD + Duration::from_secs(10), raw_got.recv()).await;
    assert_eq!(
        again.ok().flatten().as_deref(),
        Some(first.as_str()),
        "the control is redelivered once its deadline passes unextended"
    );
    let left = (HOLD + Duration::from_secs(1)).saturating_sub(started.elapsed());
    assert!(
        tokio::time::timeout(left, got.recv()).await.is_err(),
        "the broker's handler ran past the ack deadline and the message was redelivered meanwhile"
    );

    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
    let group = wire::group_subscription_id(&topic, "slow").unwrap();
    for sub_id in [&group, &raw_sub] {
        let _ = subscriptions.delete_subscription().set_subscription(subscription_path(sub_id)).send().await;
    }
    let _ = topics.delete_topic().set_topic(topic_path(&id)).send().await;
}

async fn next_attempt(rx: &mut mpsc::UnboundedReceiver<u32>) -> Option<u32> {
    tokio::time::timeout(WAIT, rx.recv()).await.ok().flatten()
}
