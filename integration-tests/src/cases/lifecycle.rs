//! Lifecycle: connect, subscribe, unsubscribe, disconnect, init, and the limits of a subscription.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use broker_core::{Broker, ErrorKind, Event, Message, SubscribeOptions, handler_fn};

use crate::support::{
    QUIET, assert_exactly_once, body_text, finish, inbox, must, must_fail, numbered, publish, recorder, subscribe,
};
use crate::{CaseResult, Ctx, unique_topic};

/// How long the slow handlers of the drain cases take.
const SLOW_HANDLER: Duration = Duration::from_millis(300);

/// After `unsubscribe()` returns, messages published to the topic no longer reach that
/// subscription, while another subscriber of the same topic still gets them (so the silence means
/// something).
pub async fn unsubscribe_stops_delivery(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("unsubscribe");
    let (handler, mut gone) = recorder("unsubscribed subscriber");
    let (sentinel_handler, mut sentinel) = recorder("sentinel subscriber");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    let keep = subscribe(broker.as_ref(), &topic, sentinel_handler, SubscribeOptions::new()).await;

    publish(broker.as_ref(), &topic, Message::new("before")).await;
    assert_eq!(body_text(&gone.next("the message before unsubscribe").await), "before");
    assert_eq!(body_text(&sentinel.next("the message before unsubscribe").await), "before");

    must("unsubscribe", sub.unsubscribe()).await;
    for body in numbered("after", 5) {
        publish(broker.as_ref(), &topic, Message::new(body)).await;
    }
    let mut after: Vec<String> = sentinel.take(5, "messages after unsubscribe").await.iter().map(body_text).collect();
    after.sort(); // order is not what this case is about
    assert_eq!(after, numbered("after", 5), "the remaining subscriber still gets the topic's messages");
    gone.assert_quiet(QUIET, "published after unsubscribe() returned").await;

    finish(broker.as_ref(), vec![keep]).await;
    CaseResult::Passed
}

/// A handler may unsubscribe its own subscription ("stop after the message I wanted"): the call
/// returns promptly (it does not wait for the handler that makes it), and nothing more arrives.
pub async fn unsubscribe_from_own_handler(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("unsubscribe_from_handler");
    let slot: Arc<tokio::sync::Mutex<Option<Box<dyn broker_core::Subscriber>>>> = Arc::default();
    let (tx, mut got) = inbox::<std::result::Result<Duration, String>>("unsubscribe_from_own_handler");
    let own = Arc::clone(&slot);
    let handler = handler_fn(move |_event: Event| {
        let (own, tx) = (Arc::clone(&own), tx.clone());
        async move {
            let started = std::time::Instant::now();
            let outcome = match own.lock().await.as_ref() {
                Some(sub) => match tokio::time::timeout(Duration::from_secs(5), sub.unsubscribe()).await {
                    Ok(Ok(())) => Ok(started.elapsed()),
                    Ok(Err(e)) => Err(format!("unsubscribe failed: {e}")),
                    Err(_) => Err("unsubscribe from inside the handler did not return within 5 s".to_string()),
                },
                None => Err("the subscription handle was not stored yet".to_string()),
            };
            let _ = tx.send(outcome);
            Ok(())
        }
    });
    // The handle is stored before anything is published, so the handler always finds it.
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    *slot.lock().await = Some(sub);
    publish(broker.as_ref(), &topic, Message::new("the one I wanted")).await;
    let outcome = got.next("the handler's unsubscribe").await;
    assert!(outcome.is_ok(), "{outcome:?}");
    publish(broker.as_ref(), &topic, Message::new("after")).await;
    got.assert_quiet(QUIET, "the handler unsubscribed itself").await;
    finish(broker.as_ref(), vec![]).await;
    CaseResult::Passed
}

/// Calling `unsubscribe()` again, and after `disconnect()`, returns `Ok` and does nothing.
pub async fn unsubscribe_twice_is_harmless(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("unsubscribe_twice");
    let (handler, mut got) = recorder("unsubscribe_twice_is_harmless");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    publish(broker.as_ref(), &topic, Message::new("one")).await;
    got.next("the message before unsubscribe").await;

    must("the first unsubscribe", sub.unsubscribe()).await;
    must("the second unsubscribe", sub.unsubscribe()).await;
    publish(broker.as_ref(), &topic, Message::new("nobody")).await;
    got.assert_quiet(QUIET, "published after unsubscribe").await;

    // Another subscription on the same broker is unaffected. Where the backend keeps what nobody
    // received (backlog, persistence), it may first get "nobody"; otherwise only "two".
    let (handler, mut other) = recorder("a later subscriber");
    let other_sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    publish(broker.as_ref(), &topic, Message::new("two")).await;
    let mut bodies = vec![body_text(&other.next("a message after the double unsubscribe").await)];
    if bodies[0] != "two" {
        bodies.push(body_text(&other.next("the message after the double unsubscribe").await));
    }
    bodies.extend(other.collect_for(QUIET).await.iter().map(body_text));
    let caps = ctx.capabilities();
    if caps.backlog || caps.persistence {
        bodies.sort();
        assert_eq!(bodies, vec!["nobody".to_string(), "two".to_string()], "the kept message, then the new one");
    } else {
        assert_eq!(bodies, vec!["two".to_string()], "only the message published while subscribed");
    }

    must("disconnect", broker.disconnect()).await;
    must("unsubscribe after disconnect", sub.unsubscribe()).await;
    must("unsubscribe of the other subscription after disconnect", other_sub.unsubscribe()).await;
    CaseResult::Passed
}

/// `unsubscribe()` waits for a handler that is running: a ~300 ms handler that has started has
/// finished when `unsubscribe()` returns — with auto-ack, and with auto-ack off for a handler that
/// acks first and then keeps working.
pub async fn unsubscribe_waits_for_running_handler(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    for ack_first in [false, true] {
        let topic = unique_topic("unsubscribe_drain");
        let (handler, mut started, done) = slow_handler(ack_first);
        let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new().with_auto_ack(!ack_first)).await;
        publish(broker.as_ref(), &topic, Message::new("slow")).await;
        started.next("the slow handler to start").await;
        must("unsubscribe while a handler runs", sub.unsubscribe()).await;
        assert!(
            done.load(Ordering::SeqCst),
            "unsubscribe() returned before the running handler completed (handler acked first: {ack_first})"
        );
    }
    finish(broker.as_ref(), vec![]).await;
    CaseResult::Passed
}

/// `disconnect()` waits for the handlers that are running: a ~300 ms handler that has started has
/// finished when `disconnect()` returns — with auto-ack, and (on a second broker) with auto-ack off
/// for a handler that acks first and then keeps working: the ack settles the message, not the handler.
pub async fn disconnect_drains_in_flight_handler(ctx: &Ctx) -> CaseResult {
    for ack_first in [false, true] {
        let broker = ctx.broker().await;
        let topic = unique_topic("disconnect_drain");
        let (handler, mut started, done) = slow_handler(ack_first);
        let _sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new().with_auto_ack(!ack_first)).await;
        publish(broker.as_ref(), &topic, Message::new("slow")).await;
        started.next("the slow handler to start").await;
        must("disconnect while a handler runs", broker.disconnect()).await;
        assert!(
            done.load(Ordering::SeqCst),
            "disconnect() returned before the in-flight handler completed (handler acked first: {ack_first})"
        );
    }
    CaseResult::Passed
}

/// A handler that reports it started (after acking, with `ack_first`), sleeps [`SLOW_HANDLER`],
/// then marks itself done.
fn slow_handler(ack_first: bool) -> (Arc<dyn broker_core::Handler>, crate::support::Inbox<()>, Arc<AtomicBool>) {
    let (tx, started) = inbox("slow handler started");
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let handler = handler_fn(move |event: Event| {
        let tx = tx.clone();
        let flag = Arc::clone(&flag);
        async move {
            if ack_first {
                event.ack().await?;
            }
            let _ = tx.send(());
            tokio::time::sleep(SLOW_HANDLER).await;
            flag.store(true, Ordering::SeqCst);
            Ok(())
        }
    });
    (handler, started, done)
}

/// After unsubscribing, subscribing to the same topic again works: the new subscription gets new
/// messages and the old handler gets nothing.
pub async fn resubscribe_after_unsubscribe(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("resubscribe");
    let (handler, mut first) = recorder("first subscription");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    publish(broker.as_ref(), &topic, Message::new("first")).await;
    assert_eq!(body_text(&first.next("the first message").await), "first");
    must("unsubscribe", sub.unsubscribe()).await;

    let (handler, mut second) = recorder("second subscription");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    publish(broker.as_ref(), &topic, Message::new("second")).await;
    let mut bodies = vec![body_text(&second.next("the message after resubscribing").await)];
    bodies.extend(second.collect_for(QUIET).await.iter().map(body_text));
    if ctx.capabilities().persistence {
        assert!(bodies.contains(&"second".to_string()), "the new subscription gets the new message: {bodies:?}");
    } else {
        assert_eq!(bodies, vec!["second".to_string()], "the new subscription gets the new message, once");
    }
    first.assert_quiet(QUIET, "the first subscription was unsubscribed").await;

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// `Subscriber::topic()` and `Subscriber::options()` report what was subscribed with.
pub async fn subscriber_reports_topic_and_options(ctx: &Ctx) -> CaseResult {
    let caps = ctx.capabilities();
    let broker = ctx.broker().await;
    let topic = unique_topic("subscriber_reports");
    let mut options = SubscribeOptions::new().with_concurrency(2).with_auto_ack(false);
    if caps.queue_groups {
        options = options.with_queue("reporters");
    }
    if caps.redelivery {
        options = options.with_max_redeliveries(4);
    }
    let (handler, _got) = recorder("subscriber_reports_topic_and_options");
    let sub = subscribe(broker.as_ref(), &topic, handler, options.clone()).await;
    assert_eq!(sub.topic(), topic);
    assert_eq!(sub.options(), &options);

    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// A subscription with concurrency 4 runs at most, and (with 40 messages waiting and a ~30 ms
/// handler) exactly, 4 handlers at once; with concurrency 1, one at a time. (Each handler waits,
/// at most 1 s, until the limit is reached, so a slow backend still reaches it and a backend that
/// ignores the limit is seen exceeding it.)
pub async fn concurrency_limit_is_respected(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let four = max_concurrent(broker.as_ref(), 4, 40).await;
    assert_eq!(four, 4, "with concurrency 4 and 40 waiting messages, the most handlers running at once must be 4");
    let one = max_concurrent(broker.as_ref(), 1, 10).await;
    assert_eq!(one, 1, "with concurrency 1, handlers must run one at a time");
    finish(broker.as_ref(), vec![]).await;
    CaseResult::Passed
}

/// Subscribes with `limit`, publishes `n` messages to a ~30 ms handler, and returns the most
/// handlers seen running at once.
async fn max_concurrent(broker: &dyn Broker, limit: usize, n: usize) -> usize {
    let topic = unique_topic(&format!("concurrency_{limit}"));
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (tx, mut got) = inbox(format!("concurrency {limit}"));
    let handler = {
        let running = Arc::clone(&running);
        let peak = Arc::clone(&peak);
        handler_fn(move |event: Event| {
            let (running, peak, tx) = (Arc::clone(&running), Arc::clone(&peak), tx.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // Give the backend every chance to reach the limit (however slowly it delivers),
                // and to exceed it if it would: hold until `limit` run at once, or a second passed.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                while running.load(Ordering::SeqCst) < limit && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                peak.fetch_max(running.load(Ordering::SeqCst), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(body_text(&event));
                Ok(())
            }
        })
    };
    let sub = subscribe(broker, &topic, handler, SubscribeOptions::new().with_concurrency(limit)).await;
    let expected = numbered("c", n);
    for body in &expected {
        publish(broker, &topic, Message::new(body.clone())).await;
    }
    let received = got.gather(n).await;
    assert_exactly_once(&received, &expected, &format!("the subscription with concurrency {limit}"));
    must("unsubscribe", sub.unsubscribe()).await;
    peak.load(Ordering::SeqCst)
}

/// After `disconnect()`, `publish()` and `subscribe()` fail with `NotConnected`.
pub async fn publish_after_disconnect_fails(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("after_disconnect");
    must("disconnect", broker.disconnect()).await;
    must_fail(
        "publish after disconnect",
        ErrorKind::NotConnected,
        broker.publish(&topic, Message::new("late"), Default::default()),
    )
    .await;
    let (handler, _got) = recorder("after disconnect");
    must_fail(
        "subscribe after disconnect",
        ErrorKind::NotConnected,
        broker.subscribe(&topic, handler, SubscribeOptions::new()),
    )
    .await;
    CaseResult::Passed
}

/// Before `connect()`, `publish()` and `subscribe()` fail with `NotConnected`.
pub async fn not_connected_before_connect(ctx: &Ctx) -> CaseResult {
    let broker = ctx.unconnected().await;
    let topic = unique_topic("before_connect");
    must_fail(
        "publish before connect",
        ErrorKind::NotConnected,
        broker.publish(&topic, Message::new("early"), Default::default()),
    )
    .await;
    let (handler, _got) = recorder("before connect");
    must_fail(
        "subscribe before connect",
        ErrorKind::NotConnected,
        broker.subscribe(&topic, handler, SubscribeOptions::new()),
    )
    .await;
    CaseResult::Passed
}

/// Connecting a connected broker does nothing: it returns `Ok` and the broker keeps working.
pub async fn connect_twice_is_harmless(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    must("a second connect", broker.connect()).await;
    let topic = unique_topic("connect_twice");
    let (handler, mut got) = recorder("connect_twice_is_harmless");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    must("a third connect, with a live subscription", broker.connect()).await;
    publish(broker.as_ref(), &topic, Message::new("still works")).await;
    assert_eq!(body_text(&got.next("a message after connecting again").await), "still works");
    got.assert_quiet(QUIET, "connecting again must not duplicate subscriptions").await;
    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// A disconnected broker connects again and works; a subscription made before `disconnect()`
/// stays ended (its handler gets nothing), and unsubscribing it afterwards is harmless.
pub async fn reconnect_after_disconnect(ctx: &Ctx) -> CaseResult {
    let broker = ctx.broker().await;
    let topic = unique_topic("reconnect");
    let (handler, mut old) = recorder("subscription from before disconnect");
    let old_sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    must("disconnect", broker.disconnect()).await;
    must("connect again after disconnect", broker.connect()).await;

    let (handler, mut new) = recorder("subscription after reconnecting");
    let new_sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    publish(broker.as_ref(), &topic, Message::new("after reconnect")).await;
    assert_eq!(body_text(&new.next("a message after reconnecting").await), "after reconnect");
    new.assert_quiet(QUIET, "one publish, one delivery").await;
    old.assert_quiet(QUIET, "disconnect() ended the earlier subscription").await;

    must("unsubscribe the subscription that disconnect() ended", old_sub.unsubscribe()).await;
    finish(broker.as_ref(), vec![new_sub]).await;
    CaseResult::Passed
}

/// `name()` is the backend's registered name and `capabilities()` equals what its plugin
/// registered (`broker_core::plugin(name)`).
pub async fn name_and_capabilities_match_plugin(ctx: &Ctx) -> CaseResult {
    let broker = ctx.unconnected().await;
    assert_eq!(broker.name(), ctx.backend(), "name() is the registered backend name");
    let plugin = match broker_core::plugin(ctx.backend()) {
        Ok(plugin) => plugin,
        Err(error) => panic!("the {} backend is not in the plugin registry: {error}", ctx.backend()),
    };
    assert_eq!(plugin.name, ctx.backend());
    assert!(!plugin.description.trim().is_empty(), "the plugin has a description");
    // The plugin registers what the backend does in its default mode; a mode chosen by a
    // parameter (NATS's `jetstream=true`) may declare more, and the instance says so.
    let default_mode = match broker_core::from_name(ctx.backend(), ctx.options()) {
        Ok(broker) => broker,
        Err(error) => panic!("the {} backend builds from the registry with the base options: {error}", ctx.backend()),
    };
    assert_eq!(
        default_mode.capabilities(),
        plugin.capabilities,
        "the default mode declares the registered capabilities"
    );
    let connected = ctx.broker().await;
    assert_eq!(connected.capabilities(), broker.capabilities(), "capabilities do not change when connected");
    assert_eq!(connected.name(), ctx.backend());
    finish(connected.as_ref(), vec![]).await;
    CaseResult::Passed
}

/// `init()` replaces `options()` before `connect()` (and after `disconnect()`); on a connected
/// broker it fails with `InvalidInput` and changes nothing. Options that fail
/// `BrokerOptions::validate()` are rejected with `InvalidInput`.
pub async fn init_only_while_disconnected(ctx: &Ctx) -> CaseResult {
    let broker = ctx.unconnected().await;
    let custom = ctx
        .options()
        .with_publish_timeout(Duration::from_millis(4321))
        .with_drain_timeout(Duration::from_millis(7654))
        .with_connect_timeout(Duration::from_millis(9876));
    if let Err(error) = broker.init(custom.clone()) {
        panic!("init() before connect() failed: {error}");
    }
    assert_eq!(broker.options(), custom, "init() before connect() replaces options()");

    let invalid = ctx.options().with_publish_timeout(Duration::ZERO);
    match broker.init(invalid) {
        Ok(()) => panic!("init() with a zero publish_timeout must fail with InvalidInput"),
        Err(error) => assert_eq!(error.kind(), ErrorKind::InvalidInput, "init() with invalid options: {error}"),
    }
    assert_eq!(broker.options(), custom, "a rejected init() changes nothing");

    must("connect", broker.connect()).await;
    match broker.init(ctx.options()) {
        Ok(()) => panic!("init() on a connected broker must fail with InvalidInput"),
        Err(error) => assert_eq!(error.kind(), ErrorKind::InvalidInput, "init() on a connected broker: {error}"),
    }
    assert_eq!(broker.options(), custom, "a rejected init() changes nothing");

    let topic = unique_topic("init");
    let (handler, mut got) = recorder("init_only_while_disconnected");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    publish(broker.as_ref(), &topic, Message::new("after init")).await;
    assert_eq!(body_text(&got.next("a message on the initialised broker").await), "after init");
    finish(broker.as_ref(), vec![sub]).await;

    if let Err(error) = broker.init(ctx.options()) {
        panic!("init() after disconnect() failed: {error}");
    }
    assert_eq!(broker.options(), ctx.options(), "init() after disconnect() replaces options()");
    CaseResult::Passed
}

/// Where `backlog`: messages published while a topic had no subscriber reach the first subscriber
/// that appears, each once, without another publish.
pub async fn backlog_reaches_first_subscriber(ctx: &Ctx) -> CaseResult {
    if !ctx.capabilities().backlog {
        return CaseResult::skipped("the backend does not declare backlog");
    }
    let broker = ctx.broker().await;
    let topic = unique_topic("backlog");
    for i in 0..3 {
        publish(broker.as_ref(), &topic, Message::new(format!("early {i}"))).await;
    }
    let (handler, mut got) = recorder("backlog_reaches_first_subscriber");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    let mut bodies = Vec::new();
    for _ in 0..3 {
        bodies.push(body_text(&got.next("a message published before the subscriber").await));
    }
    bodies.extend(got.collect_for(QUIET).await.iter().map(body_text));
    bodies.sort();
    assert_eq!(bodies, vec!["early 0", "early 1", "early 2"], "each early message once");
    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}

/// Where `persistence`: a subscriber that arrives after a message was published still reads it.
pub async fn late_subscriber_reads_old_messages(ctx: &Ctx) -> CaseResult {
    if !ctx.capabilities().persistence {
        return CaseResult::skipped("the backend does not declare persistence");
    }
    let broker = ctx.broker().await;
    let topic = unique_topic("persistence");
    publish(broker.as_ref(), &topic, Message::new("published before anyone subscribed")).await;
    let (handler, mut got) = recorder("late subscriber");
    let sub = subscribe(broker.as_ref(), &topic, handler, SubscribeOptions::new()).await;
    let event = got.next("the message published before subscribing").await;
    assert_eq!(body_text(&event), "published before anyone subscribed");
    finish(broker.as_ref(), vec![sub]).await;
    CaseResult::Passed
}
