//! The conformance suite, run against every backend linked into this crate.
//!
//! `cargo test -p integration-tests memory::` runs one backend. A network backend's suite is one
//! more line here (and its crate named once, to link its plugin):
//!
//! ```ignore
//! use broker_nats as _;
//! integration_tests::conformance_suite!(nats, "nats", integration_tests::from_registry("nats"));
//! ```

use std::sync::Arc;
use std::time::Duration;

use broker_core::{Broker, BrokerOptions, ErrorKind, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use integration_tests::support::{must, must_fail};

integration_tests::conformance_suite!(memory, "memory", |options: BrokerOptions| async move {
    broker_core::from_name("memory", options)
});

// The http backend over each of its registries: `cargo test -p integration-tests http` runs all three.
use broker_http as _;

integration_tests::conformance_suite!(http_memory, "http", |options: BrokerOptions| async move {
    broker_core::from_name("http", options.with_param("registry", "memory"))
});

integration_tests::conformance_suite!(http_local, "http", |options: BrokerOptions| async move {
    // A registry directory of this test process only, so that runs do not see each other.
    let dir = std::env::temp_dir().join(format!("micro-broker-conformance-{}", std::process::id()));
    broker_core::from_name(
        "http",
        options.with_param("registry", "local").with_param("registry_address", dir.to_string_lossy()),
    )
});

// etcd at BROKER_TEST_ETCD_URL (scripts/services/etcd.sh starts one); skipped without it.
#[cfg(feature = "etcd")]
integration_tests::conformance_suite!(http_etcd, "http", service: "etcd", |url: String| {
    move |options: BrokerOptions| {
        let url = url.clone();
        async move {
            broker_core::from_name("http", options.with_param("registry", "etcd").with_param("registry_address", url))
        }
    }
});

/// Every case in `integration_tests::CASES` has a generated test (the list is the one the macro expands).
#[test]
fn every_case_is_listed_once() {
    let mut names = integration_tests::CASES.to_vec();
    assert!(names.len() >= 25, "the suite has {} cases", names.len());
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), integration_tests::CASES.len(), "a case is listed twice");
}

/// Memory-specific: a subscription whose buffer is full makes `publish()` wait up to
/// `publish_timeout`, then fail with `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_full_buffer_publish_times_out() {
    let options = BrokerOptions::default().with_publish_timeout(Duration::from_millis(200));
    let broker: Arc<dyn Broker> = broker_core::from_name("memory", options).expect("memory is linked");
    must("connect", broker.connect()).await;
    let topic = integration_tests::unique_topic("full_buffer");
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = handler_fn(move |_event: Event| {
        let mut release = release_rx.clone();
        let started = started_tx.clone();
        async move {
            let _ = started.send(());
            // Blocks until the test releases it.
            let _ = release.wait_for(|go| *go).await;
            Ok(())
        }
    });
    let sub = must(
        "subscribe",
        broker.subscribe(&topic, handler, SubscribeOptions::new().with_buffer_size(1).with_concurrency(1)),
    )
    .await;
    must("publish the message the handler holds", broker.publish(&topic, Message::new("held"), PublishOptions::new()))
        .await;
    tokio::time::timeout(Duration::from_secs(10), started_rx.recv()).await.expect("the handler starts");
    // The buffer (size 1) takes one more; then the next publish has to wait and time out.
    let mut outcome = Ok(());
    for i in 0..4 {
        outcome = broker.publish(&topic, Message::new(format!("fill {i}")), PublishOptions::new()).await;
        if outcome.is_err() {
            break;
        }
    }
    let error = outcome.expect_err("publishing into a full buffer must eventually fail");
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    release_tx.send(true).expect("release the handler");
    must("unsubscribe", sub.unsubscribe()).await;
    must("disconnect", broker.disconnect()).await;
    // And a disconnected broker says so.
    must_fail(
        "publish after disconnect",
        ErrorKind::NotConnected,
        broker.publish(&topic, Message::new("x"), PublishOptions::new()),
    )
    .await;
}
