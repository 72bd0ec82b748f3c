//! The metrics layer, read through metrics-util's `DebuggingRecorder` installed for this thread
//! only (`metrics::with_local_recorder`) around a current-thread runtime, so every task of the
//! test records into it and no other test's metrics mix in.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use broker_core::layers::metrics::{
    ACKED, DEAD_LETTERED, DELIVERED, HANDLER_DURATION, NACKED, PUBLISH_DURATION, PUBLISH_ERRORS, PUBLISHED, REDELIVERED,
};
use broker_core::layers::{BrokerLayerExt, MetricsLayer, RetryLayer};
use broker_core::{Broker, Event, MemoryBroker, Message, PublishOptions, SubscribeOptions, handler_fn};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, debugging::Snapshot};

type Entries = Vec<(CompositeKey, Option<metrics::Unit>, Option<metrics::SharedString>, DebugValue)>;

/// Everything recorded (a snapshot drains the recorder, so each test takes one).
fn entries(snapshot: Snapshot) -> Entries {
    snapshot.into_vec()
}

/// The value of counter `name` for `topic` (0 when absent); histograms give their sample count.
fn value(entries: &Entries, name: &str, topic: &str) -> u64 {
    entries
        .iter()
        .filter(|(key, ..)| {
            let key = key.key();
            key.name() == name
                && key.labels().any(|l| l.key() == "topic" && l.value() == topic)
                && key.labels().any(|l| l.key() == "backend" && l.value() == "memory")
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => *n,
            DebugValue::Histogram(samples) => samples.len() as u64,
            DebugValue::Gauge(_) => 0,
        })
        .sum()
}

#[test]
fn counts_publishes_deliveries_acks_nacks_redeliveries_and_durations() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let broker = MemoryBroker::new().with_layer(MetricsLayer::new());
            broker.connect().await.unwrap();
            let flaky_calls = Arc::new(AtomicU32::new(0));
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let calls = Arc::clone(&flaky_calls);
            broker
                .subscribe(
                    "metered",
                    handler_fn(move |event: Event| {
                        let (tx, calls) = (tx.clone(), Arc::clone(&calls));
                        async move {
                            let _ = tx.send(());
                            if event.message().body() == b"flaky" && calls.fetch_add(1, Ordering::SeqCst) == 0 {
                                return Err("the first attempt fails".into());
                            }
                            Ok(())
                        }
                    }),
                    SubscribeOptions::new(),
                )
                .await
                .unwrap();
            broker.publish("metered", Message::new("ok"), PublishOptions::new()).await.unwrap();
            broker.publish("metered", Message::new("flaky"), PublishOptions::new()).await.unwrap();
            for _ in 0..3 {
                tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap();
            }
            assert!(broker.publish("bad topic", Message::new("x"), PublishOptions::new()).await.is_err());
            // Waits for the handlers, so the settlements are counted.
            broker.disconnect().await.unwrap();
        })
    });
    let snap = entries(snapshotter.snapshot());
    let v = |name| value(&snap, name, "metered");
    assert_eq!(v(PUBLISHED), 2);
    assert_eq!(v(PUBLISH_DURATION), 2);
    assert_eq!(v(DELIVERED), 3, "two messages, one of them twice");
    assert_eq!(v(REDELIVERED), 1);
    assert_eq!(v(ACKED), 2);
    assert_eq!(v(NACKED), 1);
    assert_eq!(v(HANDLER_DURATION), 3);
    assert_eq!(v(PUBLISH_ERRORS), 0);
    assert_eq!(value(&snap, PUBLISH_ERRORS, "bad topic"), 1);
    assert_eq!(value(&snap, PUBLISH_DURATION, "bad topic"), 1);
    assert_eq!(value(&snap, PUBLISHED, "bad topic"), 0);
}

#[test]
fn manual_settlement_and_panics_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let broker = MemoryBroker::new().with_layer(MetricsLayer::new());
            broker.connect().await.unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let tx2 = tx.clone();
            // Manual: acks, then returns Err (still an ack).
            broker
                .subscribe(
                    "manual",
                    handler_fn(move |event: Event| {
                        let tx = tx2.clone();
                        async move {
                            event.ack().await?;
                            let _ = tx.send(());
                            Err("after the ack".into())
                        }
                    }),
                    SubscribeOptions::new().with_auto_ack(false),
                )
                .await
                .unwrap();
            // Auto-ack: panics once (a nack), then succeeds.
            let panicked = Arc::new(AtomicU32::new(0));
            broker
                .subscribe(
                    "panicky",
                    handler_fn(move |_event: Event| {
                        let (tx, panicked) = (tx.clone(), Arc::clone(&panicked));
                        async move {
                            let _ = tx.send(());
                            if panicked.fetch_add(1, Ordering::SeqCst) == 0 {
                                panic!("on purpose");
                            }
                            Ok(())
                        }
                    }),
                    SubscribeOptions::new(),
                )
                .await
                .unwrap();
            broker.publish("manual", Message::new("m"), PublishOptions::new()).await.unwrap();
            broker.publish("panicky", Message::new("p"), PublishOptions::new()).await.unwrap();
            for _ in 0..3 {
                tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap();
            }
            broker.disconnect().await.unwrap();
        })
    });
    let snap = entries(snapshotter.snapshot());
    assert_eq!(value(&snap, ACKED, "manual"), 1);
    assert_eq!(value(&snap, NACKED, "manual"), 0);
    assert_eq!(value(&snap, DELIVERED, "panicky"), 2);
    assert_eq!(value(&snap, NACKED, "panicky"), 1, "the panic is a nack");
    assert_eq!(value(&snap, ACKED, "panicky"), 1);
    assert_eq!(value(&snap, REDELIVERED, "panicky"), 1);
}

#[test]
fn the_retry_layer_counts_what_it_dead_letters() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let layer =
                RetryLayer::new(1).with_backoff(Duration::from_millis(1), Duration::from_millis(2)).in_process();
            let broker = MemoryBroker::new().with_layer(layer).with_layer(MetricsLayer::new());
            broker.connect().await.unwrap();
            let (tx, mut dead) = tokio::sync::mpsc::unbounded_channel();
            broker
                .subscribe(
                    "doomed.dlq",
                    handler_fn(move |_event: Event| {
                        let tx = tx.clone();
                        async move {
                            let _ = tx.send(());
                            Ok(())
                        }
                    }),
                    SubscribeOptions::new(),
                )
                .await
                .unwrap();
            broker
                .subscribe(
                    "doomed",
                    handler_fn(|_e: Event| async { Err("never works".into()) }),
                    SubscribeOptions::new(),
                )
                .await
                .unwrap();
            broker.publish("doomed", Message::new("x"), PublishOptions::new()).await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), dead.recv()).await.unwrap();
            broker.disconnect().await.unwrap();
        })
    });
    let snap = entries(snapshotter.snapshot());
    assert_eq!(value(&snap, DEAD_LETTERED, "doomed"), 1);
    // The metrics layer is outside the retry layer: it sees each in-process attempt.
    assert_eq!(value(&snap, DELIVERED, "doomed"), 2);
    assert_eq!(value(&snap, REDELIVERED, "doomed"), 1);
    assert_eq!(value(&snap, NACKED, "doomed"), 2);
}
