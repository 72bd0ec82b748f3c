//! The conformance suite over the NATS backend: core NATS (`nats::`) and JetStream (`nats_jetstream::`).
//!
//! The server comes from `BROKER_TEST_NATS_URL` (or a container with `--features testcontainers`);
//! without one the cases print `SKIP` and pass, unless `BROKER_TEST_REQUIRE=all`.
//!
//! JetStream mode is the same plugin, `nats`, with the parameter `jetstream=true`; its broker's
//! `capabilities()` adds `redelivery` to what the plugin registers (core NATS, the default mode).

use broker_core::BrokerOptions;
use broker_nats as _;

integration_tests::conformance_suite!(nats, "nats", integration_tests::from_registry("nats"));

/// The JetStream brokers of the suite. Every test process shares the stream of the `conformance`
/// topics (`MICRO_conformance`: JetStream streams may not overlap in subjects, so one stream per
/// process is not possible); each case uses its own topics, hence its own consumers.
fn jetstream(options: BrokerOptions) -> integration_tests::BrokerFuture {
    Box::pin(async move {
        broker_core::from_name(
            "nats",
            options.with_param("jetstream", "true").with_param("stream_max_age_secs", "3600"),
        )
    })
}

integration_tests::conformance_suite!(nats_jetstream, "nats", jetstream);

/// The plugin registers core NATS's capabilities; a JetStream broker declares those plus
/// `redelivery`, connected or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_adds_redelivery_to_the_plugins_capabilities() {
    let Some(ctx) = integration_tests::Ctx::prepare("nats", "jetstream_capabilities", jetstream).await else {
        return;
    };
    let plugin = broker_core::plugin("nats").unwrap_or_else(|e| panic!("nats is linked: {e}"));
    assert_eq!(plugin.capabilities, broker_nats::CORE_CAPABILITIES);
    let broker = ctx.unconnected().await;
    assert_eq!(broker.capabilities(), broker_core::Capabilities { redelivery: true, ..plugin.capabilities });
    assert_eq!(broker.capabilities(), broker_nats::JETSTREAM_CAPABILITIES);
}
