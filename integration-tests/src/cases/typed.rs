//! Typed messages: `BrokerExt::publish_json` and `BrokerExt::subscribe_json`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use broker_core::{BrokerExt, Event, JSON_CONTENT_TYPE, Message, PublishOptions, SubscribeOptions, headers};
use serde::{Deserialize, Serialize};

use crate::support::{QUIET, body_text, finish, inbox, must, publish, recorder, subscribe};
use crate::{CaseResult, Ctx, unique_topic};

/// The value the typed cases send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    items: Vec<String>,
    total_cents: i64,
    note: Option<String>,
}

fn order(id: u64) -> Order {
    Order {
        id,
        customer: "Ada Lovelace — ✓ 日本".into(),
        items: vec!["difference engine".into(), "punched cards".into()],
        total_cents: -12_345,
        note: None,
    }
}

/// A value published with `publish_json` reaches a `subscribe_json` closure equal to what was
/// sent, with `Content-Type: application/json`.
pub async fn typed_json_round_trip(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("typed_json");
    let (tx, mut got) = inbox("typed_json_round_trip");
    let sub = must(
        "subscribe_json",
        broker.subscribe_json(
            &topic,
            move |value: Order, event: Event| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((value, event.message().header(headers::CONTENT_TYPE).map(str::to_owned)));
                    Ok(())
                }
            },
            SubscribeOptions::new(),
        ),
    )
    .await;

    let sent = order(7);
    must("publish_json", broker.publish_json(&topic, &sent, PublishOptions::new())).await;
    let (value, content_type) = got.next("the typed value").await;
    assert_eq!(value, sent, "the decoded value equals the published one");
    assert_eq!(content_type.as_deref(), Some(JSON_CONTENT_TYPE), "publish_json sets Content-Type");

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// A body that does not decode (garbage, or JSON under a non-JSON `Content-Type`) never reaches the
/// typed closure, and later good messages still do. Where `redelivery`, with `max_redeliveries(0)`
/// each bad message is dead-lettered to `<topic>.dlq` with a reason that names the codec error.
pub async fn typed_json_rejects_garbage(ctx: &Ctx) -> CaseResult {
    let redelivery = ctx.capabilities().redelivery;
    let broker = ctx.broker().await;
    let topic = unique_topic("typed_garbage");
    let mut subs = Vec::new();
    let mut dead = None;
    let mut options = SubscribeOptions::new();
    if redelivery {
        let (handler, inbox) = recorder("dead-letter subscriber");
        subs.push(subscribe(broker.as_ref(), &format!("{topic}.dlq"), handler, SubscribeOptions::new()).await);
        dead = Some(inbox);
        options = options.with_max_redeliveries(0);
    }
    let calls = Arc::new(AtomicU32::new(0));
    let (tx, mut got) = inbox("typed_json_rejects_garbage");
    let counter = Arc::clone(&calls);
    subs.push(
        must(
            "subscribe_json",
            broker.subscribe_json(
                &topic,
                move |value: Order, _event: Event| {
                    let (tx, counter) = (tx.clone(), Arc::clone(&counter));
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let _ = tx.send(value);
                        Ok(())
                    }
                },
                options,
            ),
        )
        .await,
    );

    publish(broker.as_ref(), &topic, Message::new("{not json")).await;
    let wrong_type = Message::new(serde_json::to_vec(&order(1)).unwrap_or_default())
        .with_header(headers::CONTENT_TYPE, "application/protobuf");
    publish(broker.as_ref(), &topic, wrong_type).await;
    must("publish_json", broker.publish_json(&topic, &order(2), PublishOptions::new())).await;

    let value = got.next("the good message after two bad ones").await;
    assert_eq!(value, order(2), "only the good message reaches the typed closure");
    got.assert_quiet(QUIET, "bad bodies never reach the typed closure").await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the typed closure is called for the good message only");

    if let Some(mut dead) = dead {
        let letters = dead.take(2, "dead letters of the two bad messages").await;
        for letter in &letters {
            let reason = letter.message().header(headers::DEAD_LETTER_REASON).unwrap_or_default().to_lowercase();
            assert!(
                reason.contains("codec") || reason.contains("json"),
                "the dead-letter reason of {:?} names the codec error, got {reason:?}",
                body_text(letter)
            );
        }
        let mut bodies: Vec<String> = letters.iter().map(body_text).collect();
        bodies.sort();
        assert_eq!(bodies[1], "{not json", "the garbage body is dead-lettered unchanged");
        dead.assert_quiet(QUIET, "each bad message is dead-lettered once").await;
    }

    finish(broker.as_ref(), subs).await;
    CaseResult::Passed
}
