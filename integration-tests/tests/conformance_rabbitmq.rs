//! The conformance suite over the RabbitMQ backend (`rabbitmq::`).
//!
//! The server comes from `BROKER_TEST_RABBITMQ_URL` (or a container with `--features testcontainers`);
//! without one the cases print `SKIP` and pass, unless `BROKER_TEST_REQUIRE=all`.
//!
//! The brokers are the registry's `rabbitmq` plugin with one extra parameter,
//! `queue_expires_ms=60000`: the durable queues the cases create (queue-group queues
//! `<topic>:<group>` and dead-letter queues `<topic>.dlq`) carry `x-expires`, so the shared server
//! deletes each one a minute after its last consumer left. Broadcast queues are exclusive and
//! auto-delete, so they vanish with their subscriber.

use broker_core::BrokerOptions;
use broker_rabbitmq as _;

/// The registry's `rabbitmq` plugin, with `x-expires` on the durable queues the suite creates.
fn rabbitmq_expiring(options: BrokerOptions) -> integration_tests::BrokerFuture {
    Box::pin(async move { broker_core::from_name("rabbitmq", options.with_param("queue_expires_ms", "60000")) })
}

integration_tests::conformance_suite!(rabbitmq, "rabbitmq", rabbitmq_expiring);
