//! The conformance suite over the Google Cloud Pub/Sub backend (`gcp_pubsub::`), against the
//! Pub/Sub emulator (needs the cargo feature `gcp-pubsub` of this crate).
//!
//! The emulator comes from `BROKER_TEST_GCP_PUBSUB_URL` (its `host:port`, `127.0.0.1:8085` as
//! `scripts/services/pubsub.sh` starts it); without one the cases print `SKIP` and pass, unless
//! `BROKER_TEST_REQUIRE=all`. There is no container for it.
//!
//! The brokers are the registry's `gcp-pubsub` plugin with the project `test` (the emulator takes
//! any) and `batch_delay_ms=0`: the cases publish one message at a time and wait for each, so
//! batching would only add its delay to every publish.
#![cfg(feature = "gcp-pubsub")]

use broker_core::BrokerOptions;
use broker_gcp_pubsub as _;

/// The registry's `gcp-pubsub` plugin, in project `test`, without publish batching.
fn pubsub_for_tests(options: BrokerOptions) -> integration_tests::BrokerFuture {
    Box::pin(async move {
        broker_core::from_name("gcp-pubsub", options.with_param("project", "test").with_param("batch_delay_ms", "0"))
    })
}

integration_tests::conformance_suite!(gcp_pubsub, "gcp-pubsub", pubsub_for_tests);
