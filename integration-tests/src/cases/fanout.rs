//! Fan-out: broadcast subscribers each get everything; a queue group gets everything once, shared
//! among its members.

use broker_core::{Message, PublishOptions, SubscribeOptions};

use crate::support::{
    QUIET, assert_exactly_once, finish, group_by, inbox, must, numbered, publish, subscribe, tagged_recorder,
};
use crate::{CaseResult, Ctx, unique_topic};

/// Three broadcast subscribers of one topic each receive every one of 100 messages, once.
pub async fn broadcast_reaches_every_subscriber(ctx: &Ctx) -> CaseResult {
    const SUBSCRIBERS: usize = 3;
    const N: usize = 100;
    let broker = ctx.broker().await;
    let topic = unique_topic("broadcast");
    let (tx, mut got) = inbox("broadcast_reaches_every_subscriber");
    let mut subs = Vec::new();
    for s in 0..SUBSCRIBERS {
        subs.push(subscribe(broker.as_ref(), &topic, tagged_recorder(s, tx.clone()), SubscribeOptions::new()).await);
    }

    let expected = numbered("b", N);
    for body in &expected {
        publish(broker.as_ref(), &topic, Message::new(body.clone())).await;
    }
    let mut received = got.gather(SUBSCRIBERS * N).await;
    received.extend(got.collect_for(QUIET).await);
    let by_subscriber = group_by(received);
    for s in 0..SUBSCRIBERS {
        let bodies = by_subscriber.get(&s).cloned().unwrap_or_default();
        assert_exactly_once(&bodies, &expected, &format!("broadcast subscriber {s}"));
    }

    finish(broker.as_ref(), subs).await;
    CaseResult::Passed
}

/// Where `queue_groups`: two groups of three members, 1,000 messages. Each group receives every
/// message exactly once (counted per message), and every member gets some of them. Where the
/// backend keeps order (and so may share work by ordering key, as Kafka by partition), each
/// message has a key of its own.
pub async fn queue_groups_share_work(ctx: &Ctx) -> CaseResult {
    if !ctx.capabilities().queue_groups {
        return CaseResult::skipped("the backend does not declare queue_groups");
    }
    const GROUPS: usize = 2;
    const MEMBERS: usize = 3;
    const N: usize = 1_000;
    let broker = ctx.broker().await;
    let topic = unique_topic("queue_groups");
    let (tx, mut got) = inbox("queue_groups_share_work");
    let mut subs = Vec::new();
    for g in 0..GROUPS {
        for m in 0..MEMBERS {
            let options = SubscribeOptions::new().with_queue(format!("group-{g}"));
            subs.push(subscribe(broker.as_ref(), &topic, tagged_recorder((g, m), tx.clone()), options).await);
        }
    }

    let expected = numbered("q", N);
    // A backend that orders by key (Kafka) shares a group's work by key: messages without a key
    // keep one order, on one partition, for one member. Give every message a key of its own.
    let keyed = ctx.capabilities().ordering;
    for body in &expected {
        let options = if keyed { PublishOptions::new().with_ordering_key(body.clone()) } else { PublishOptions::new() };
        must(&format!("publish to {topic}"), broker.publish(&topic, Message::new(body.clone()), options)).await;
    }
    let mut received = got.gather(GROUPS * N).await;
    received.extend(got.collect_for(QUIET).await);
    let by_member = group_by(received.iter().cloned());
    let by_group = group_by(received.into_iter().map(|((g, _), body)| (g, body)));
    for g in 0..GROUPS {
        let bodies = by_group.get(&g).cloned().unwrap_or_default();
        assert_exactly_once(&bodies, &expected, &format!("queue group group-{g}"));
        for m in 0..MEMBERS {
            let n = by_member.get(&(g, m)).map_or(0, Vec::len);
            assert!(n > 0, "member {m} of group-{g} got none of {N} messages: the group's work is not shared");
        }
    }

    finish(broker.as_ref(), subs).await;
    CaseResult::Passed
}

/// Where `queue_groups`: on one topic, two broadcast subscribers each get all 200 messages while a
/// queue group of two members gets each message once.
pub async fn mixed_broadcast_and_queue_subscribers(ctx: &Ctx) -> CaseResult {
    if !ctx.capabilities().queue_groups {
        return CaseResult::skipped("the backend does not declare queue_groups");
    }
    const N: usize = 200;
    let broker = ctx.broker().await;
    let topic = unique_topic("mixed");
    let (tx, mut got) = inbox("mixed_broadcast_and_queue_subscribers");
    let mut subs = Vec::new();
    for name in ["broadcast-a", "broadcast-b"] {
        subs.push(subscribe(broker.as_ref(), &topic, tagged_recorder(name, tx.clone()), SubscribeOptions::new()).await);
    }
    for _ in 0..2 {
        let options = SubscribeOptions::new().with_queue("workers");
        subs.push(subscribe(broker.as_ref(), &topic, tagged_recorder("workers", tx.clone()), options).await);
    }

    let expected = numbered("x", N);
    for body in &expected {
        publish(broker.as_ref(), &topic, Message::new(body.clone())).await;
    }
    let mut received = got.gather(3 * N).await;
    received.extend(got.collect_for(QUIET).await);
    let by_name = group_by(received);
    for name in ["broadcast-a", "broadcast-b", "workers"] {
        let bodies = by_name.get(name).cloned().unwrap_or_default();
        assert_exactly_once(&bodies, &expected, name);
    }

    finish(broker.as_ref(), subs).await;
    CaseResult::Passed
}
