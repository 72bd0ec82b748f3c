//! The conformance suite over the Kafka backend (`kafka::`).
//!
//! The server comes from `BROKER_TEST_KAFKA_URL` (`127.0.0.1:9092` for the shared tansu, or a
//! container with `--features testcontainers`); without one the cases print `SKIP` and pass,
//! unless `BROKER_TEST_REQUIRE=all`.
//!
//! The brokers are the registry's `kafka` plugin with two extra parameters:
//! - `fetch_wait_ms=5`: tansu answers a waiting fetch only when `fetch.wait.max.ms` expires, so
//!   delivery latency is about that plus 3 ms; a few milliseconds keeps every wait in the suite cheap.
//! - `partitions=3`: the topics the cases create have three partitions, so that the members of a
//!   queue group each own some (Kafka shares a group's work by partition). Messages without an
//!   ordering key all go to one partition (the backend's keyless-ordering rule), so per-publisher
//!   order still holds.

use broker_core::BrokerOptions;
use broker_kafka as _;

/// The registry's `kafka` plugin, with short fetch waits and three partitions per created topic.
fn kafka_for_tests(options: BrokerOptions) -> integration_tests::BrokerFuture {
    Box::pin(async move {
        broker_core::from_name("kafka", options.with_param("fetch_wait_ms", "5").with_param("partitions", "3"))
    })
}

integration_tests::conformance_suite!(kafka, "kafka", kafka_for_tests);
