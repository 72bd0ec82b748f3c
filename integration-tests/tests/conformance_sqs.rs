//! The conformance suite over the SQS + SNS backend (`sqs::`), against moto_server.
//!
//! The server comes from `BROKER_TEST_SQS_URL` (`http://test:test@127.0.0.1:4566`, started by
//! `scripts/services/moto.sh`: moto takes any credentials, and the backend reads them from the
//! address's user info, so that a case's `init()` with the base options keeps them); without one the cases print `SKIP` and pass, unless
//! `BROKER_TEST_REQUIRE=all`.
//!
//! The brokers are the registry's `sqs` plugin with `visibility_timeout_secs=10`: a message
//! received by a receive that an unsubscribe cancelled is visible again after 10 s rather than 30
//! (nacks set the visibility to 0 anyway). The long-polling wait stays at its default, 20 s: moto
//! handles a few dozen requests a second on a busy 2-core machine, and shorter polls of the idle
//! subscriptions of the parallel cases would take most of them.
//!
//! Skipped, each with its reason ([`skips`]): `large_body` (SNS and SQS take at most 256 KiB per
//! message, and the case sends 1 MiB; the backend rejects a larger message with `InvalidInput`,
//! which broker-sqs's own tests check), and `ten_thousand_messages_none_lost` unless
//! `BROKER_TEST_SQS_VOLUME` is set (10,000 sequential publishes through moto take minutes).

use broker_core::BrokerOptions;
use broker_sqs as _;

/// The registry's `sqs` plugin, with a short visibility timeout.
fn sqs_for_tests(options: BrokerOptions) -> integration_tests::BrokerFuture {
    Box::pin(async move { broker_core::from_name("sqs", options.with_param("visibility_timeout_secs", "10")) })
}

/// The cases skipped over moto, and why.
fn skips() -> Vec<(&'static str, &'static str)> {
    let mut skips = vec![(
        "large_body",
        "SNS and SQS take at most 256 KiB per message and the case sends 1 MiB; a larger publish is an \
         InvalidInput error (broker-sqs tests/sqs.rs checks it)",
    )];
    if std::env::var_os("BROKER_TEST_SQS_VOLUME").is_none() {
        skips.push((
            "ten_thousand_messages_none_lost",
            "10,000 SNS publishes one after the other take minutes on moto_server (about 15 ms each on a \
             loaded 2-core machine), beyond this suite's time budget; the volume cases with 1,000 to 2,000 \
             messages run, and BROKER_TEST_SQS_VOLUME=1 runs this one too",
        ));
    }
    skips
}

integration_tests::conformance_suite!(sqs, "sqs", skip: &skips(), sqs_for_tests);
