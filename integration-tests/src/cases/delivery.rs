//! Delivery: what is published arrives, whole, once, on the right topic, in order where promised.

use std::sync::Arc;

use broker_core::{Broker, Headers, Message, PublishOptions, SubscribeOptions};
use bytes::Bytes;

use crate::support::{
    QUIET, assert_exactly_once, body_text, finish, group_by, inbox, must, numbered, publish, recorder, subscribe,
    tagged_recorder,
};
use crate::{CaseResult, Ctx, unique_topic};

/// Publishes one message and receives it exactly once: same body, the topic it was published to,
/// `attempt() == 1`.
pub async fn round_trip(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("round_trip");
    let (handler, mut got) = recorder("round_trip");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;

    publish(broker.as_ref(), &topic, Message::new("hello, conformance")).await;
    let event = got.next("the published message").await;
    assert_eq!(event.topic(), topic, "the event's topic is the topic published to");
    assert_eq!(event.message().body(), b"hello, conformance", "the body arrives unchanged");
    assert_eq!(event.attempt(), 1, "a first delivery is attempt 1");
    got.assert_quiet(QUIET, "one publish is delivered once").await;

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// Publishing to a topic nobody subscribes to succeeds (and is simply not delivered), as in Go Micro.
pub async fn publish_without_subscribers_succeeds(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("no_subscribers");
    for i in 0..3 {
        publish(broker.as_ref(), &topic, Message::new(format!("nobody listens {i}"))).await;
    }
    finish(broker.as_ref(), vec![]).await;
    CaseResult::Passed
}

/// 50 headers with Unicode keys and values (and an empty value, mixed case, punctuation) arrive
/// unchanged. A backend may add headers of its own, but not drop or alter these.
pub async fn headers_round_trip(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("headers");
    let (handler, mut got) = recorder("headers_round_trip");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;

    let mut headers = Headers::new();
    for i in 0..47 {
        headers.insert(format!("x-ключ-{i}-日本"), format!("значение {i}: ✓ héllo — 値 {i}"));
    }
    headers.insert("X-Mixed-Case".into(), "Keeps Its Case".into());
    headers.insert("x-empty".into(), String::new());
    headers.insert("x-punctuation".into(), "a=b; c, d: \"e\" 'f' \\ /g?h&i#j".into());
    assert_eq!(headers.len(), 50);
    publish(broker.as_ref(), &topic, Message::with_headers(headers.clone(), "with headers")).await;

    let event = got.next("the message with 50 headers").await;
    for (key, value) in &headers {
        assert_eq!(event.message().header(key), Some(value.as_str()), "header {key:?} must arrive unchanged");
    }
    assert_eq!(event.message().body(), b"with headers");

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// `PublishOptions::headers` are added to the message's own headers, and win on a clash.
pub async fn publish_option_headers_are_merged(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("merged_headers");
    let (handler, mut got) = recorder("publish_option_headers_are_merged");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;

    let message = Message::new("merge").with_header("from-message", "m").with_header("clash", "message loses");
    let options = PublishOptions::new().with_header("from-options", "o").with_header("clash", "options win");
    must("publish with header options", broker.publish(&topic, message, options)).await;

    let event = got.next("the message with merged headers").await;
    let msg = event.message();
    assert_eq!(msg.header("from-message"), Some("m"), "the message's own header is kept");
    assert_eq!(msg.header("from-options"), Some("o"), "a PublishOptions header is added");
    assert_eq!(msg.header("clash"), Some("options win"), "a PublishOptions header wins over the message's");

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// An empty body is delivered as an empty body (not dropped, not turned into something else).
pub async fn empty_body(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("empty_body");
    let (handler, mut got) = recorder("empty_body");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;

    publish(broker.as_ref(), &topic, Message::new(Bytes::new()).with_header("kind", "empty")).await;
    let event = got.next("the empty message").await;
    assert!(event.message().body().is_empty(), "body must be empty, got {} bytes", event.message().body().len());
    assert_eq!(event.message().header("kind"), Some("empty"));

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// A body holding every byte value 0..=255 (not UTF-8) arrives byte for byte.
pub async fn binary_body(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("binary_body");
    let (handler, mut got) = recorder("binary_body");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;

    let mut body: Vec<u8> = (0..=255u8).collect();
    body.extend((0..=255u8).rev());
    publish(broker.as_ref(), &topic, Message::new(body.clone())).await;
    let event = got.next("the binary message").await;
    assert_eq!(event.message().body(), body.as_slice(), "every byte value must survive");

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// A 1 MiB body arrives whole.
pub async fn large_body(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("large_body");
    let (handler, mut got) = recorder("large_body");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;

    let body: Vec<u8> = (0..1024 * 1024).map(|i: usize| (i % 251) as u8).collect();
    publish(broker.as_ref(), &topic, Message::new(body.clone())).await;
    let event = got.next("the 1 MiB message").await;
    let received = event.message().body();
    assert_eq!(received.len(), body.len(), "length of the 1 MiB body");
    assert!(received == body.as_slice(), "the 1 MiB body arrives byte for byte");

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// A subscriber gets only its own topic: not another topic, not a topic it is a prefix of, not one
/// that extends it.
pub async fn topics_are_isolated(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let a = unique_topic("isolation");
    let child = format!("{a}.child");
    let longer = format!("{a}x");
    let (tx, mut got) = inbox("topics_are_isolated");
    let mut subs = Vec::new();
    for topic in [&a, &child, &longer] {
        subs.push(
            subscribe(broker.as_ref(), topic, tagged_recorder(topic.clone(), tx.clone()), SubscribeOptions::new())
                .await,
        );
    }

    for topic in [&a, &child, &longer] {
        publish(broker.as_ref(), topic, Message::new(format!("for {topic}"))).await;
    }
    let mut received = got.take(3, "one message per topic").await;
    received.extend(got.collect_for(QUIET).await);
    let by_topic = group_by(received);
    for topic in [&a, &child, &longer] {
        assert_eq!(
            by_topic.get(topic.as_str()).cloned().unwrap_or_default(),
            vec![format!("for {topic}")],
            "the subscriber of {topic} must get exactly its own message"
        );
    }

    finish(broker.as_ref(), subs).await;
    CaseResult::Passed
}

/// Where `ordering`: 500 messages from one publisher reach a concurrency-1 subscription in publish order.
pub async fn per_publisher_order(ctx: &Ctx) -> CaseResult {
    if !ctx.capabilities().ordering {
        return CaseResult::skipped("the backend does not declare ordering");
    }
    const N: usize = 500;
    let broker = ctx.broker().await;
    let topic = unique_topic("order");
    let (handler, mut got) = recorder("per_publisher_order");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new().with_concurrency(1)).await;

    let expected = numbered("order", N);
    for body in &expected {
        publish(broker.as_ref(), &topic, Message::new(body.clone())).await;
    }
    let received: Vec<String> = got.take(N, "ordered messages").await.iter().map(body_text).collect();
    if let Some(i) = (0..N).find(|&i| received[i] != expected[i]) {
        panic!(
            "messages arrived out of order: position {i} holds {:?}, expected {:?} (around: {:?})",
            received[i],
            expected[i],
            &received[i.saturating_sub(3)..(i + 3).min(N)]
        );
    }
    got.assert_quiet(QUIET, "each ordered message once").await;

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// Where `ordering`: publishing with an ordering key is accepted, and messages of the same key
/// arrive in publish order (three keys interleaved, 100 messages each).
pub async fn ordering_key_keeps_order(ctx: &Ctx) -> CaseResult {
    if !ctx.capabilities().ordering {
        return CaseResult::skipped("the backend does not declare ordering (ordering_key must be Unsupported)");
    }
    const PER_KEY: usize = 100;
    let keys = ["user-1", "user-2", "user-3"];
    let broker = ctx.broker().await;
    let topic = unique_topic("ordering_key");
    let (handler, mut got) = recorder("ordering_key_keeps_order");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new().with_concurrency(1)).await;

    for i in 0..PER_KEY {
        for key in keys {
            let options = PublishOptions::new().with_ordering_key(key);
            must("publish with an ordering key", broker.publish(&topic, Message::new(format!("{key}:{i}")), options))
                .await;
        }
    }
    let received = got.take(PER_KEY * keys.len(), "keyed messages").await;
    let by_key = group_by(received.iter().map(|e| {
        let text = body_text(e);
        let (key, n) = text.split_once(':').map(|(k, n)| (k.to_string(), n.to_string())).unwrap_or_default();
        (key, n.parse::<usize>().unwrap_or(usize::MAX))
    }));
    for key in keys {
        let seq = by_key.get(key).cloned().unwrap_or_default();
        assert_eq!(seq, (0..PER_KEY).collect::<Vec<_>>(), "messages with ordering key {key} arrive in publish order");
    }

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// 8 tasks publish 250 messages each at the same time through one broker: all 2,000 arrive,
/// none twice.
pub async fn concurrent_publishers_lose_nothing(ctx: &Ctx) -> CaseResult {
    const TASKS: usize = 8;
    const EACH: usize = 250;
    let broker = ctx.broker().await;
    let topic = unique_topic("concurrent_publishers");
    let (handler, mut got) = recorder("concurrent_publishers_lose_nothing");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let broker: Arc<dyn Broker> = Arc::clone(&broker);
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            for body in numbered(&format!("p{t}"), EACH) {
                publish(broker.as_ref(), &topic, Message::new(body)).await;
            }
        }));
    }
    for task in tasks {
        if let Err(e) = task.await {
            panic!("a publisher task failed: {e}");
        }
    }
    let mut received: Vec<String> = got.gather(TASKS * EACH).await.iter().map(body_text).collect();
    received.extend(got.collect_for(QUIET).await.iter().map(body_text));
    let expected: Vec<String> = (0..TASKS).flat_map(|t| numbered(&format!("p{t}"), EACH)).collect();
    assert_exactly_once(&received, &expected, "the subscriber of 8 concurrent publishers");

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// 10,000 messages published one after the other all arrive, each once.
pub async fn ten_thousand_messages_none_lost(ctx: &Ctx) -> CaseResult {
    const N: usize = 10_000;
    let broker = ctx.broker().await;
    let topic = unique_topic("ten_thousand");
    let (handler, mut got) = recorder("ten_thousand_messages_none_lost");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;

    let expected = numbered("m", N);
    for body in &expected {
        publish(broker.as_ref(), &topic, Message::new(body.clone())).await;
    }
    let mut received: Vec<String> = got.gather(N).await.iter().map(body_text).collect();
    received.extend(got.collect_for(QUIET).await.iter().map(body_text));
    assert_exactly_once(&received, &expected, "the subscriber of 10,000 messages");

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}
