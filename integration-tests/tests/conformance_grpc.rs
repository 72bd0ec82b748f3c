//! The conformance suite against the grpc backend (Go Micro's peer-to-peer gRPC broker) over each
//! of its registries, as the http backend's: `cargo test -p integration-tests grpc_` runs all three.

use broker_core::BrokerOptions;
use broker_grpc as _;

integration_tests::conformance_suite!(grpc_memory, "grpc", |options: BrokerOptions| async move {
    broker_core::from_name("grpc", options.with_param("registry", "memory"))
});

integration_tests::conformance_suite!(grpc_local, "grpc", |options: BrokerOptions| async move {
    // A registry directory of this test process only, so that runs do not see each other.
    let dir = std::env::temp_dir().join(format!("micro-broker-conformance-grpc-{}", std::process::id()));
    broker_core::from_name(
        "grpc",
        options.with_param("registry", "local").with_param("registry_address", dir.to_string_lossy()),
    )
});

// etcd at BROKER_TEST_ETCD_URL (scripts/services/etcd.sh starts one); skipped without it.
#[cfg(feature = "etcd")]
integration_tests::conformance_suite!(grpc_etcd, "grpc", service: "etcd", |url: String| {
    move |options: BrokerOptions| {
        let url = url.clone();
        async move {
            broker_core::from_name("grpc", options.with_param("registry", "etcd").with_param("registry_address", url))
        }
    }
});
