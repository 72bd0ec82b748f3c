//! The conformance suite against the Redis backends: plugin `redis` (Pub/Sub) and plugin
//! `redis-streams`, on the server at `BROKER_TEST_REDIS_URL` (`BROKER_TEST_REDIS_STREAMS_URL`
//! overrides it for Streams).

use broker_redis as _;

integration_tests::conformance_suite!(redis, "redis", integration_tests::from_registry("redis"));
integration_tests::conformance_suite!(
    redis_streams,
    "redis-streams",
    integration_tests::from_registry("redis-streams")
);
