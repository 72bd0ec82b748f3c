//! The conformance suite over the SQS + SNS backend (`sqs::`), against moto_server.
//!
//! The server comes from `BROKER_TEST_SQS_URL` (`http://test:test@127.0.0.1:4566`, started by
//! `scripts/services/moto.sh`: moto takes any credentials, and the backend reads them from the
//! address's user info, so that a case's `init()` with the base options keeps them); without one the cases print `SKIP` and pass, unless
//! `BROKER_TEST_REQUIRE=all`.
//!
//! The brokers are the registry's `sqs` plugin with these parameters:
//! - `wait_time_secs=1`: a receive's long poll ends after a second, so that idle subscriptions
//!   of the parallel cases do not hold moto's (few) request threads for 20 s each;
//! - `visibility_timeout_secs=10`: a message received by a receive that an unsubscribe cancelled
//!   is visible again after 10 s rather than 30 (nacks set the visibility to 0 anyway).
//!
//! `large_body` is skipped: SNS and SQS take at most 256 KiB per message, and the case sends
//! 1 MiB; the backend rejects a larger message with `InvalidInput` (broker-sqs's own tests check that).

use broker_core::BrokerOptions;
use broker_sqs as _;

/// The registry's `sqs` plugin, with short waits.
fn sqs_for_tests(options: BrokerOptions) -> integration_tests::BrokerFuture {
    Box::pin(async move {
        broker_core::from_name(
            "sqs",
            options.with_param("wait_time_secs", "1").with_param("visibility_timeout_secs", "10"),
        )
    })
}

integration_tests::conformance_suite!(
    sqs,
    "sqs",
    sqs_for_tests,
    skip: &[(
        "large_body",
        "SNS and SQS take at most 256 KiB per message and the case sends 1 MiB; a larger publish is an \
         InvalidInput error (broker-sqs tests/sqs.rs checks it)",
    )],
);
