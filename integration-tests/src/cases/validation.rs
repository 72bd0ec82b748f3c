//! Validation: malformed input is `InvalidInput`, options a backend cannot honour are
//! `Unsupported` (naming the option), both before anything is published or subscribed.

use std::time::Duration;

use broker_core::{ErrorKind, Message, PublishOptions, SubscribeOptions};

use crate::support::{QUIET, body_text, finish, must, must_fail, recorder, subscribe};
use crate::{CaseResult, Ctx, unique_topic};

/// Topics every backend must reject with `InvalidInput`, for publish and subscribe alike.
pub const INVALID_TOPICS: &[&str] = &["", "a b", "a.*", "a.>", "#", "a..b", ".a", "tab\there"];

/// A subscription with `concurrency` 0 (or `buffer_size` 0, or a queue name with a blank) fails
/// with `InvalidInput`.
pub async fn concurrency_zero_is_rejected(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("concurrency_zero");
    let invalid = [
        ("concurrency 0", SubscribeOptions::new().with_concurrency(0)),
        ("buffer_size 0", SubscribeOptions::new().with_buffer_size(0)),
        ("a queue name with a blank", SubscribeOptions::new().with_queue("bad name")),
    ];
    for (what, options) in invalid {
        let (handler, _got) = recorder("never subscribed");
        let error = must_fail(
            &format!("subscribe with {what}"),
            ErrorKind::InvalidInput,
            broker.subscribe(&topic, handler, options),
        )
        .await;
        if what == "concurrency 0" {
            assert!(error.to_string().contains("concurrency"), "the error names the option: {error}");
        }
    }
    finish(broker.as_ref(), vec![]).await;
    CaseResult::Passed
}

/// Empty, blank-containing, wildcard and empty-segment topics ([`INVALID_TOPICS`]) fail with
/// `InvalidInput` on publish and on subscribe.
pub async fn invalid_topics_are_rejected(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    for topic in INVALID_TOPICS {
        must_fail(
            &format!("publish to {topic:?}"),
            ErrorKind::InvalidInput,
            broker.publish(topic, Message::new("x"), PublishOptions::new()),
        )
        .await;
        let (handler, _got) = recorder("never subscribed");
        must_fail(
            &format!("subscribe to {topic:?}"),
            ErrorKind::InvalidInput,
            broker.subscribe(topic, handler, SubscribeOptions::new()),
        )
        .await;
    }
    finish(broker.as_ref(), vec![]).await;
    CaseResult::Passed
}

/// Every option the backend's capabilities do not declare is rejected with `Unsupported`, and the
/// error names the option: `queue` without `queue_groups`, `max_redeliveries` without
/// `redelivery`, `ordering_key` without `ordering`, `delay` without `delayed_delivery`. A rejected
/// publish delivers nothing.
pub async fn unsupported_options_are_rejected(ctx: &Ctx) -> CaseResult {
    let caps = ctx.capabilities();
    let mut subscribe_checks = Vec::new();
    if !caps.queue_groups {
        subscribe_checks.push(("queue", SubscribeOptions::new().with_queue("workers")));
    }
    if !caps.redelivery {
        subscribe_checks.push(("max_redeliveries", SubscribeOptions::new().with_max_redeliveries(1)));
    }
    let mut publish_checks = Vec::new();
    if !caps.ordering {
        publish_checks.push(("ordering_key", PublishOptions::new().with_ordering_key("user-42")));
    }
    if !caps.delayed_delivery {
        publish_checks.push(("delay", PublishOptions::new().with_delay(Duration::from_millis(10))));
    }
    if subscribe_checks.is_empty() && publish_checks.is_empty() {
        return CaseResult::skipped("the backend declares every optional feature");
    }

    let broker = ctx.broker().await;
    let topic = unique_topic("unsupported");
    let (handler, mut got) = recorder("subscriber of the rejected publishes");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    for (option, options) in subscribe_checks {
        let (handler, _never) = recorder("never subscribed");
        let error = must_fail(
            &format!("subscribe with the undeclared option {option}"),
            ErrorKind::Unsupported,
            broker.subscribe(&topic, handler, options),
        )
        .await;
        assert!(error.to_string().contains(option), "the Unsupported error names `{option}`: {error}");
    }
    for (option, options) in publish_checks {
        let error = must_fail(
            &format!("publish with the undeclared option {option}"),
            ErrorKind::Unsupported,
            broker.publish(&topic, Message::new(format!("rejected: {option}")), options),
        )
        .await;
        assert!(error.to_string().contains(option), "the Unsupported error names `{option}`: {error}");
    }
    // Proof the topic works: the only message delivered is this one.
    must("publish with default options", broker.publish(&topic, Message::new("accepted"), PublishOptions::new())).await;
    let mut bodies = vec![body_text(&got.next("the accepted message").await)];
    bodies.extend(got.collect_for(QUIET).await.iter().map(body_text));
    assert_eq!(bodies, vec!["accepted".to_string()], "a rejected publish must not be delivered");

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// Where `delayed_delivery`: a message published with a 1 s delay arrives no earlier than that.
pub async fn delayed_delivery_waits(ctx: &Ctx) -> CaseResult {
    if !ctx.capabilities().delayed_delivery {
        return CaseResult::skipped("the backend does not declare delayed_delivery (delay must be Unsupported)");
    }
    const DELAY: Duration = Duration::from_secs(1);
    let broker = ctx.broker().await;
    let topic = unique_topic("delay");
    let (handler, mut got) = recorder("delayed_delivery_waits");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;

    let published = tokio::time::Instant::now();
    must(
        "publish with a delay",
        broker.publish(&topic, Message::new("later"), PublishOptions::new().with_delay(DELAY)),
    )
    .await;
    let event = got.next("the delayed message").await;
    let waited = published.elapsed();
    assert_eq!(body_text(&event), "later");
    // Allow for a coarse clock on the server side; the point is "not immediately".
    assert!(waited >= DELAY.mul_f32(0.9), "a message delayed by {DELAY:?} arrived after {waited:?}");

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}
