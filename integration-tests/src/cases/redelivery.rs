//! Failure and acknowledgement: handler errors, panics, manual ack and nack, redelivery, dead letters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use broker_core::{Event, Message, Settlement, SubscribeOptions, handler_fn, headers};

use crate::support::{QUIET, body_text, finish, inbox, publish, recorder, subscribe};
use crate::{CaseResult, Ctx, unique_topic};

/// Where `redelivery`: a handler that fails the first attempt (returns `Err`, auto-ack on) gets
/// the message again, with `attempt() > 1`, and once it succeeds the message is not delivered again.
pub async fn handler_error_is_redelivered(ctx: &Ctx) -> CaseResult {
    if !ctx.capabilities().redelivery {
        return CaseResult::skipped("the backend does not declare redelivery");
    }
    let broker = ctx.broker().await;
    let topic = unique_topic("redelivery");
    let calls = Arc::new(AtomicU32::new(0));
    let (tx, mut got) = inbox("handler_error_is_redelivered");
    let handler = {
        let calls = Arc::clone(&calls);
        handler_fn(move |event: Event| {
            let (calls, tx) = (Arc::clone(&calls), tx.clone());
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = tx.send(event);
                if n == 1 { Err("the first attempt fails on purpose".into()) } else { Ok(()) }
            }
        })
    };
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;

    publish(broker.as_ref(), &topic, Message::new("retry me")).await;
    let first = got.next("the first attempt").await;
    let second = got.next("the redelivery after the handler failed").await;
    assert_eq!(body_text(&first), "retry me");
    assert_eq!(body_text(&second), "retry me", "the redelivery carries the same body");
    assert_eq!(first.attempt(), 1, "the first delivery is attempt 1");
    assert!(second.attempt() > 1, "a redelivery has attempt() > 1, got {}", second.attempt());
    got.assert_quiet(QUIET, "the second attempt succeeded").await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// Where `redelivery`: with `max_redeliveries(2)` a handler that always fails is called exactly 3
/// times (attempts 1, 2, 3); then the message is dead-lettered to `<topic>.dlq`, with its body and
/// headers, plus `x-dead-letter-reason` (saying why: the handler's error), `x-original-topic` and
/// `x-delivery-attempts: 3`.
pub async fn max_redeliveries_then_dead_letter(ctx: &Ctx) -> CaseResult {
    if !ctx.capabilities().redelivery {
        return CaseResult::skipped("the backend does not declare redelivery");
    }
    let broker = ctx.broker().await;
    let topic = unique_topic("dead_letter");
    let dlq_topic = format!("{topic}.dlq");
    let (dlq_handler, mut dead) = recorder("dead-letter subscriber");
    let dlq_sub = subscribe(broker.as_ref(), &dlq_topic, dlq_handler, SubscribeOptions::new()).await;
    let (tx, mut attempts) = inbox("always-failing handler");
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(event.attempt());
            Err("this handler always fails on purpose".into())
        }
    });
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new().with_max_redeliveries(2)).await;

    publish(broker.as_ref(), &topic, Message::new("poison").with_header("x-conformance", "kept")).await;
    let letter = dead.next("the dead letter on <topic>.dlq").await;
    let seen = attempts.take(3, "attempts").await;
    attempts.assert_quiet(QUIET, "max_redeliveries(2) allows 3 attempts in all").await;
    assert_eq!(seen, vec![1, 2, 3], "attempt() of the three deliveries");

    assert_eq!(letter.topic(), dlq_topic);
    let msg = letter.message();
    assert_eq!(msg.body(), b"poison", "the dead letter keeps the body");
    assert_eq!(msg.header("x-conformance"), Some("kept"), "the dead letter keeps the headers");
    let reason = msg.header(headers::DEAD_LETTER_REASON).unwrap_or_default();
    assert!(
        reason.contains("this handler always fails on purpose"),
        "{} must say why (the handler's error), got {reason:?}",
        headers::DEAD_LETTER_REASON
    );
    assert_eq!(msg.header(headers::ORIGINAL_TOPIC), Some(topic.as_str()), "{}", headers::ORIGINAL_TOPIC);
    assert_eq!(msg.header(headers::DELIVERY_ATTEMPTS), Some("3"), "{}", headers::DELIVERY_ATTEMPTS);
    dead.assert_quiet(QUIET, "one message is dead-lettered once").await;

    finish(broker.as_ref(), vec![sub, dlq_sub]).await;
    CaseResult::Passed
}

/// With auto-ack off, a handler that acks and then returns `Err` is not redelivered: its own ack
/// settles the delivery.
pub async fn manual_ack_prevents_redelivery(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("manual_ack");
    let (tx, mut got) = inbox("manual_ack_prevents_redelivery");
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            event.ack().await?;
            let _ = tx.send(event);
            Err("fails after acking".into())
        }
    });
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new().with_auto_ack(false)).await;

    publish(broker.as_ref(), &topic, Message::new("acked")).await;
    let event = got.next("the acked message").await;
    assert_eq!(event.settlement(), Some(Settlement::Acked));
    got.assert_quiet(QUIET, "the handler acked before failing, with auto-ack off").await;

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// Where `redelivery`: with auto-ack off, a message the handler nacks is delivered again; when
/// the handler then acks, it is not delivered a third time.
pub async fn manual_nack_redelivers(ctx: &Ctx) -> CaseResult {
    if !ctx.capabilities().redelivery {
        return CaseResult::skipped("the backend does not declare redelivery");
    }
    let broker = ctx.broker().await;
    let topic = unique_topic("manual_nack");
    let calls = Arc::new(AtomicU32::new(0));
    let (tx, mut got) = inbox("manual_nack_redelivers");
    let handler = {
        let calls = Arc::clone(&calls);
        handler_fn(move |event: Event| {
            let (calls, tx) = (Arc::clone(&calls), tx.clone());
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    event.nack().await?;
                } else {
                    event.ack().await?;
                }
                let _ = tx.send(event);
                Ok(())
            }
        })
    };
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new().with_auto_ack(false)).await;

    publish(broker.as_ref(), &topic, Message::new("nack me once")).await;
    let first = got.next("the first delivery").await;
    let second = got.next("the delivery after the nack").await;
    assert_eq!(first.settlement(), Some(Settlement::Nacked));
    assert_eq!(body_text(&second), "nack me once");
    assert!(second.attempt() > 1, "a redelivery has attempt() > 1, got {}", second.attempt());
    got.assert_quiet(QUIET, "the second delivery was acked").await;

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// A handler that panics fails the delivery like an `Err`: the subscription survives and later
/// messages still arrive, and where `redelivery` the message that panicked is delivered again.
pub async fn handler_panic_is_a_failure(ctx: &Ctx) -> CaseResult {
    let redelivery = ctx.capabilities().redelivery;
    let broker = ctx.broker().await;
    let topic = unique_topic("panic");
    let boom_calls = Arc::new(AtomicU32::new(0));
    let (tx, mut got) = inbox("handler_panic_is_a_failure");
    let handler = {
        let boom_calls = Arc::clone(&boom_calls);
        handler_fn(move |event: Event| {
            let (boom_calls, tx) = (Arc::clone(&boom_calls), tx.clone());
            async move {
                let body = body_text(&event);
                let _ = tx.send(body.clone());
                if body == "boom" && boom_calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("conformance: this handler panics on purpose");
                }
                Ok(())
            }
        })
    };
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;

    publish(broker.as_ref(), &topic, Message::new("boom")).await;
    publish(broker.as_ref(), &topic, Message::new("after")).await;
    let expected = if redelivery { 3 } else { 2 };
    let mut bodies = got.take(expected, "deliveries after a handler panic").await;
    bodies.extend(got.collect_for(QUIET).await);
    bodies.sort();
    if redelivery {
        assert_eq!(bodies, vec!["after", "boom", "boom"], "the panicked message is redelivered once, the next flows");
    } else {
        assert_eq!(bodies, vec!["after", "boom"], "after a panic the subscription keeps delivering");
    }

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}
