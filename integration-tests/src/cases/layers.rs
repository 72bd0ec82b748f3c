//! The cross-cutting layers of `broker_core::layers`, over the backend's broker: the same
//! behaviour on every backend, whether the backend does the work natively or the layer does it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use broker_core::layers::{BrokerLayerExt, ConcurrencyLayer, RetryLayer, TraceContext, TracingLayer};
use broker_core::{Broker, Event, Message, PublishOptions, SubscribeOptions, handler_fn, headers};

use crate::support::{QUIET, body_text, finish, inbox, must, publish, recorder, subscribe, wait_until};
use crate::{CaseResult, Ctx, unique_topic};

/// The two ways the retry layer can work on a backend: as it chooses (native redelivery where the
/// backend has it), and always in process.
fn retry_layers(max_redeliveries: u32) -> [(&'static str, RetryLayer); 2] {
    let layer = RetryLayer::new(max_redeliveries).with_backoff(Duration::from_millis(10), Duration::from_millis(100));
    [("retry layer", layer.clone()), ("in-process retry layer", layer.in_process())]
}

/// With a `RetryLayer::new(2)` over the backend (deferring to native redelivery where the backend
/// declares it, and also forced in process), a handler that always fails is called exactly 3
/// times (attempts 1, 2, 3); then the message is on `<topic>.dlq` with its body and headers, the
/// handler's error in `x-dead-letter-reason`, `x-delivery-attempts: 3` and `x-original-topic`.
pub async fn retry_layer_dead_letters_after_bound(ctx: &Ctx) -> CaseResult {
    for (which, layer) in retry_layers(2) {
        let broker = ctx.broker().await.with_layer(layer);
        let topic = unique_topic("retry_layer_dead_letters");
        let dlq_topic = format!("{topic}.dlq");
        let (dlq_handler, mut dead) = recorder(format!("dead letters of the {which}"));
        let dlq_sub = subscribe(broker.inner().as_ref(), &dlq_topic, dlq_handler, SubscribeOptions::new()).await;
        let (tx, mut attempts) = inbox(format!("always-failing handler under the {which}"));
        let handler = handler_fn(move |event: Event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event.attempt());
                Err("this handler always fails on purpose".into())
            }
        });
        let sub = subscribe(&broker, &topic, handler, SubscribeOptions::new()).await;

        publish(&broker, &topic, Message::new("poison").with_header("x-conformance", "kept")).await;
        let letter = dead.next(&format!("the dead letter on <topic>.dlq ({which})")).await;
        let seen = attempts.take(3, "attempts").await;
        attempts.assert_quiet(QUIET, "a bound of 2 redeliveries allows 3 attempts in all").await;
        assert_eq!(seen, vec![1, 2, 3], "attempt() of the three deliveries ({which})");
        let msg = letter.message();
        assert_eq!(msg.body(), b"poison", "the dead letter keeps the body ({which})");
        assert_eq!(msg.header("x-conformance"), Some("kept"), "the dead letter keeps the headers ({which})");
        let reason = msg.header(headers::DEAD_LETTER_REASON).unwrap_or_default();
        assert!(
            reason.contains("this handler always fails on purpose"),
            "{} must give the handler's error ({which}), got {reason:?}",
            headers::DEAD_LETTER_REASON
        );
        assert_eq!(msg.header(headers::DELIVERY_ATTEMPTS), Some("3"), "{} ({which})", headers::DELIVERY_ATTEMPTS);
        assert_eq!(msg.header(headers::ORIGINAL_TOPIC), Some(topic.as_str()), "{} ({which})", headers::ORIGINAL_TOPIC);
        dead.assert_quiet(QUIET, "one message is dead-lettered once").await;
        finish(&broker, vec![sub, dlq_sub]).await;
    }
    CaseResult::Passed
}

/// With a `RetryLayer::new(3)` over the backend (native or in process), a handler that fails
/// twice and then succeeds handles the message exactly once successfully, on attempt 3, and
/// nothing is dead-lettered.
pub async fn retry_layer_handles_once_after_failures(ctx: &Ctx) -> CaseResult {
    for (which, layer) in retry_layers(3) {
        let broker = ctx.broker().await.with_layer(layer);
        let topic = unique_topic("retry_layer_once");
        let (dlq_handler, mut dead) = recorder(format!("dead letters of the {which}"));
        let dlq_sub =
            subscribe(broker.inner().as_ref(), &format!("{topic}.dlq"), dlq_handler, SubscribeOptions::new()).await;
        let calls = Arc::new(AtomicU32::new(0));
        let (tx, mut handled) = inbox(format!("successes under the {which}"));
        let handler = {
            let calls = Arc::clone(&calls);
            handler_fn(move |event: Event| {
                let (calls, tx) = (Arc::clone(&calls), tx.clone());
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                        return Err("fails twice on purpose".into());
                    }
                    let _ = tx.send((body_text(&event), event.attempt()));
                    Ok(())
                }
            })
        };
        let sub = subscribe(&broker, &topic, handler, SubscribeOptions::new()).await;

        publish(&broker, &topic, Message::new("third time lucky")).await;
        let (body, attempt) = handled.next(&format!("the successful attempt ({which})")).await;
        assert_eq!(body, "third time lucky");
        assert_eq!(attempt, 3, "it succeeds on attempt 3 ({which})");
        handled.assert_quiet(QUIET, "the message is handled successfully exactly once").await;
        dead.assert_quiet(Duration::ZERO, "a message that was handled is not dead-lettered").await;
        assert_eq!(calls.load(Ordering::SeqCst), 3, "two failures and one success ({which})");
        finish(&broker, vec![sub, dlq_sub]).await;
    }
    CaseResult::Passed
}

/// With a `TracingLayer` over the backend, a message published inside a trace carries its W3C
/// `traceparent`: the handler sees the publisher's trace id, and the handler's own context
/// ([`TraceContext::current`]) is in that trace with the publish span as its parent.
pub async fn tracing_layer_propagates_trace_context(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await.with_layer(TracingLayer::new());
    let topic = unique_topic("tracing_layer");
    let (tx, mut got) = inbox("traced handler");
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((TraceContext::from_message(event.message()), TraceContext::current()));
            Ok(())
        }
    });
    let sub = subscribe(&broker, &topic, handler, SubscribeOptions::new()).await;

    let root = TraceContext::new_root();
    must(
        &format!("publish to {topic} inside a trace"),
        root.clone().scope(broker.publish(&topic, Message::new("traced"), PublishOptions::new())),
    )
    .await;
    let (header, current) = got.next("the traced message").await;
    let header = header.unwrap_or_else(|| panic!("the handler must see a valid traceparent header"));
    let current = current.unwrap_or_else(|| panic!("a traced handler has a current trace context"));
    assert_eq!(header.trace_id(), root.trace_id(), "traceparent carries the publisher's trace id");
    assert_ne!(header.span_id(), root.span_id(), "the parent-id is the publish span's, a child of the caller's");
    assert_eq!(current.trace_id(), root.trace_id(), "the handler's span is in the publisher's trace");
    assert_eq!(current.parent_span_id(), Some(header.span_id()), "the publish span is the handler span's parent");

    finish(&broker, vec![sub]).await;
    CaseResult::Passed
}

/// With a `ConcurrencyLayer::new(2)` (4 in flight) over the backend, at most 2 handlers of the
/// subscription run at once, and every message is still handled.
pub async fn concurrency_layer_limits_handlers(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await.with_layer(ConcurrencyLayer::new(2).with_max_in_flight(4));
    let topic = unique_topic("concurrency_layer");
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (now, max, done) = (Arc::clone(&now), Arc::clone(&max), Arc::clone(&done));
        handler_fn(move |_event: Event| {
            let (now, max, done) = (Arc::clone(&now), Arc::clone(&max), Arc::clone(&done));
            async move {
                let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    };
    let sub = subscribe(&broker, &topic, handler, SubscribeOptions::new()).await;
    for i in 0..12 {
        publish(&broker, &topic, Message::new(format!("job {i}"))).await;
    }
    wait_until("12 messages are handled", || done.load(Ordering::SeqCst) >= 12).await;
    let most = max.load(Ordering::SeqCst);
    assert!((1..=2).contains(&most), "at most 2 handlers at once, saw {most}");

    finish(&broker, vec![sub]).await;
    CaseResult::Passed
}
