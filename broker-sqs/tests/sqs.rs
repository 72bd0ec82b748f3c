//! The SQS backend against a real SQS/SNS-compatible server (moto_server from
//! `scripts/services/moto.sh`), beyond the conformance suite: the attribute layout on the queue,
//! FIFO order, the visibility extension, temporary queues, the redrive policy, and bad input.
//!
//! The server comes from `BROKER_TEST_SQS_URL` (`http://test:test@127.0.0.1:4566`); without it
//! the server tests print `SKIP` and pass, unless `BROKER_TEST_REQUIRE` is `all` or names `sqs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::types::QueueAttributeName;
use broker_core::{Broker, BrokerOptions, ErrorKind, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_sqs::{SqsBroker, names, wire};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// The server URL, or `None` (after a SKIP line) when there is none and none is required.
fn server(test: &str) -> Option<String> {
    match std::env::var("BROKER_TEST_SQS_URL").ok().filter(|v| !v.trim().is_empty()) {
        Some(url) => Some(url),
        None => {
            let required = std::env::var("BROKER_TEST_REQUIRE")
                .is_ok_and(|v| v.split(',').any(|i| matches!(i.trim(), "all" | "sqs")));
            assert!(!required, "{test}: BROKER_TEST_REQUIRE asks for sqs, but BROKER_TEST_SQS_URL is not set");
            eprintln!("SKIP {test}: BROKER_TEST_SQS_URL is not set");
            None
        }
    }
}

fn unique_topic(what: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("sqs-test.{what}.{}.{nanos}", std::process::id())
}

async fn connected(url: &str, params: &[(&str, &str)]) -> SqsBroker {
    let mut options = BrokerOptions::new().with_addresses([url]).with_param("wait_time_secs", "1");
    for (key, value) in params {
        options = options.with_param(*key, *value);
    }
    let broker = SqsBroker::with_options(options).unwrap();
    broker.connect().await.unwrap();
    broker
}

/// A raw SQS client on the test server, for looking at what the backend made.
fn raw_client(url: &str) -> aws_sdk_sqs::Client {
    let host = url.rsplit_once('@').map_or(url.to_string(), |(_, host)| format!("http://{host}"));
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(host)
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

fn recorder() -> (Arc<dyn broker_core::Handler>, mpsc::UnboundedReceiver<Event>) {
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
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(event)) => event,
        _ => panic!("nothing arrived within {WAIT:?} while waiting for {what}"),
    }
}

#[tokio::test]
async fn unreachable_endpoint_is_a_connection_error_naming_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let options = BrokerOptions::new()
        .with_addresses([format!("http://key:s3cret@127.0.0.1:{port}")])
        .with_connect_timeout(Duration::from_secs(3));
    let broker = SqsBroker::with_options(options).unwrap();
    let started = std::time::Instant::now();
    let err = broker.connect().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")) && !text.contains("s3cret"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10), "connect is bounded by the connect timeout");
    assert!(!format!("{broker:?}").contains("s3cret"));
}

#[tokio::test]
async fn names_the_service_would_reject_are_refused_before_any_call() {
    for (key, value) in [("prefix", "has.dot"), ("prefix", "p".repeat(11).as_str()), ("wait_time_secs", "30")] {
        let err = SqsBroker::with_options(BrokerOptions::new().with_param(key, value)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{key}={value}: {err}");
    }
}

#[tokio::test]
async fn oversized_messages_and_ordering_keys_without_fifo_are_typed_errors() {
    let Some(url) = server("oversized_messages_and_ordering_keys_without_fifo_are_typed_errors") else { return };
    let broker = connected(&url, &[]).await;
    let topic = unique_topic("oversized");
    let err = broker.publish(&topic, Message::new(vec![b'a'; 300 * 1024]), PublishOptions::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("262144"), "{err}");
    let err =
        broker.publish(&topic, Message::new("x"), PublishOptions::new().with_ordering_key("k")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("fifo=true"), "{err}");
    broker.disconnect().await.unwrap();
}

/// Up to 10 attributes travel one per header; more (or an odd name) in `x-micro-headers`. Read
/// from the group's queue with the raw SDK, after the group's only member unsubscribed.
#[tokio::test]
async fn headers_are_message_attributes_or_the_envelope() {
    let Some(url) = server("headers_are_message_attributes_or_the_envelope") else { return };
    let broker = connected(&url, &[]).await;
    let topic = unique_topic("attributes");
    let (handler, _rx) = recorder();
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new().with_queue("raw")).await.unwrap();
    sub.unsubscribe().await.unwrap();

    let few = Message::new("few").with_header("a", "1").with_header("Content-Type", "text/plain");
    let mut many = Message::new("many");
    for i in 0..11 {
        many = many.with_header(format!("h{i}"), format!("v{i}"));
    }
    broker.publish(&topic, few.clone(), PublishOptions::new()).await.unwrap();
    broker.publish(&topic, many.clone(), PublishOptions::new()).await.unwrap();

    let sqs = raw_client(&url);
    let queue = names::group_queue("micro", &topic, "raw", false);
    let queue_url = sqs.get_queue_url().queue_name(&queue).send().await.unwrap().queue_url.unwrap();
    let mut seen = Vec::new();
    for _ in 0..10 {
        let output = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .message_attribute_names("All")
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        seen.extend(output.messages.unwrap_or_default());
        if seen.len() >= 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "both messages are in the group's queue");
    for message in &seen {
        let attributes = message.message_attributes().cloned().unwrap_or_default();
        let decoded = wire::decode(
            message.body().unwrap_or_default(),
            attributes.iter().filter_map(|(k, v)| v.string_value().map(|s| (k.as_str(), s))),
        );
        match message.body() {
            Some("few") => {
                assert_eq!(attributes.len(), 2, "{attributes:?}");
                assert_eq!(attributes["a"].string_value(), Some("1"));
                assert_eq!(decoded, few);
            }
            Some("many") => {
                assert_eq!(attributes.keys().collect::<Vec<_>>(), vec![wire::HEADERS_ATTRIBUTE], "{attributes:?}");
                assert_eq!(decoded, many);
            }
            other => panic!("unexpected body {other:?}"),
        }
    }
    sqs.delete_queue().queue_url(&queue_url).send().await.unwrap();
    broker.disconnect().await.unwrap();
}

/// With `fifo=true`: messages of one ordering key, and keyless messages of one publisher, arrive
/// in publish order.
#[tokio::test]
async fn fifo_keeps_order_per_key_and_per_publisher() {
    let Some(url) = server("fifo_keeps_order_per_key_and_per_publisher") else { return };
    let broker = connected(&url, &[("fifo", "true")]).await;
    assert!(broker.capabilities().ordering);
    let topic = unique_topic("fifo");
    let (handler, mut rx) = recorder();
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new()).await.unwrap();
    const PER_KEY: usize = 20;
    for i in 0..PER_KEY {
        for key in ["k1", "k2", "ключ"] {
            let options = PublishOptions::new().with_ordering_key(key);
            broker.publish(&topic, Message::new(format!("{key}:{i}")), options).await.unwrap();
        }
        broker.publish(&topic, Message::new(format!("none:{i}")), PublishOptions::new()).await.unwrap();
    }
    let mut by_key: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for _ in 0..PER_KEY * 4 {
        let event = next(&mut rx, "a FIFO message").await;
        let text = String::from_utf8(event.message().body().to_vec()).unwrap();
        let (key, n) = text.split_once(':').unwrap();
        by_key.entry(key.to_string()).or_default().push(n.parse().unwrap());
    }
    for key in ["k1", "k2", "ключ", "none"] {
        assert_eq!(by_key[key], (0..PER_KEY).collect::<Vec<_>>(), "order of {key}");
    }
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}

/// A handler that runs for longer than the visibility timeout does not see its message again:
/// the visibility is extended while it runs.
#[tokio::test]
async fn visibility_is_extended_while_the_handler_runs() {
    let Some(url) = server("visibility_is_extended_while_the_handler_runs") else { return };
    let broker = connected(&url, &[("visibility_timeout_secs", "2")]).await;
    let topic = unique_topic("visibility");
    let calls = Arc::new(AtomicU32::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = {
        let calls = Arc::clone(&calls);
        handler_fn(move |event: Event| {
            let (calls, tx) = (Arc::clone(&calls), tx.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(5)).await;
                let _ = tx.send(event.attempt());
                Ok(())
            }
        })
    };
    // Concurrency 2: a redelivery could start beside the running handler.
    let options = SubscribeOptions::new().with_queue("slow").with_concurrency(2);
    let sub = broker.subscribe(&topic, handler, options).await.unwrap();
    broker.publish(&topic, Message::new("slow"), PublishOptions::new()).await.unwrap();
    let attempt = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(attempt, 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the message was not delivered again while it was handled");
    sub.unsubscribe().await.unwrap();
    broker.disconnect().await.unwrap();
}

/// A broadcast subscriber's queue exists while it does; a queue group's queue stays, with the
/// redrive policy of `max_redeliveries` to `<SNS topic name>-dlq`.
#[tokio::test]
async fn temporary_queues_go_and_group_queues_get_a_redrive_policy() {
    let Some(url) = server("temporary_queues_go_and_group_queues_get_a_redrive_policy") else { return };
    let broker = connected(&url, &[]).await;
    let sqs = raw_client(&url);
    let topic = unique_topic("queues");
    let broadcast_prefix = names::broadcast_queue("micro", &topic, "", false);
    let broadcast_prefix = broadcast_prefix.trim_end_matches('-');
    let count = |prefix: String| {
        let sqs = sqs.clone();
        async move {
            let output = sqs.list_queues().queue_name_prefix(prefix).send().await.unwrap();
            output.queue_urls.unwrap_or_default().len()
        }
    };
    let (handler, _rx) = recorder();
    let sub = broker.subscribe(&topic, handler, SubscribeOptions::new()).await.unwrap();
    assert_eq!(count(broadcast_prefix.to_string()).await, 1, "the broadcast queue exists while subscribed");
    sub.unsubscribe().await.unwrap();
    assert_eq!(count(broadcast_prefix.to_string()).await, 0, "the broadcast queue is deleted on unsubscribe");

    let (handler, _rx) = recorder();
    let options = SubscribeOptions::new().with_queue("workers").with_max_redeliveries(4);
    let sub = broker.subscribe(&topic, handler, options).await.unwrap();
    sub.unsubscribe().await.unwrap();
    let queue = names::group_queue("micro", &topic, "workers", false);
    let queue_url = sqs.get_queue_url().queue_name(&queue).send().await.unwrap().queue_url.unwrap();
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap_or_default();
    let redrive = attributes.get(&QueueAttributeName::RedrivePolicy).cloned().unwrap_or_default();
    let redrive: serde_json::Value = serde_json::from_str(&redrive).unwrap();
    assert_eq!(redrive["maxReceiveCount"].to_string().trim_matches('"'), "5", "{redrive}");
    let dlq = names::redrive_queue("micro", &topic, false);
    assert!(redrive["deadLetterTargetArn"].as_str().unwrap_or_default().ends_with(&dlq), "{redrive}");
    assert!(attributes.contains_key(&QueueAttributeName::Policy), "the queue lets SNS send to it");
    sqs.delete_queue().queue_url(&queue_url).send().await.unwrap();
    broker.disconnect().await.unwrap();
}
