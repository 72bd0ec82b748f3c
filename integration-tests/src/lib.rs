//! # The broker conformance suite
//!
//! One executable spec of the [`Broker`] contract that every backend (memory, http, nats, redis,
//! rabbitmq, kafka, ...) is held to. Each case is an ordinary documented function,
//! `pub async fn case(ctx: &Ctx) -> CaseResult`, that a reader can open to see exactly what is
//! required; [`conformance_suite!`] turns the whole list into one `#[tokio::test]` per case for a
//! backend:
//!
//! ```ignore
//! integration_tests::conformance_suite!(memory, "memory", integration_tests::from_registry("memory"));
//! // tests memory::round_trip, memory::queue_groups_share_work, ...
//! ```
//!
//! `cargo test -p integration-tests memory::` runs one backend.
//!
//! ## What a case may assume, and what it checks
//!
//! * The [`Ctx`] builds a fresh broker per case (connected with [`Ctx::broker`], or not with
//!   [`Ctx::unconnected`]). A case publishes and subscribes through one broker unless it says
//!   otherwise, so in-process backends (each `MemoryBroker` is a world of its own) pass too.
//! * Every case uses its own topics ([`unique_topic`]), so cases run in parallel, also against a
//!   shared server.
//! * `subscribe()` returns once the subscription is live: a message published after it returns is
//!   delivered to it.
//! * A case that does not apply to a backend (its [`Capabilities`] say it cannot) returns
//!   [`CaseResult::Skipped`]; the test prints `SKIP <backend>::<case>: <reason>` to stderr and passes.
//!   Options a backend does not declare must be rejected with `Unsupported`, which
//!   [`unsupported_options_are_rejected`] checks.
//! * A failing case panics, like any test assertion, with a message that says what was expected.
//! * Every wait is bounded ([`support::WAIT`], [`support::CALL`]): a broken backend fails, it never
//!   hangs. No case asserts how fast anything is; where a case must be sure something does *not*
//!   happen, it watches for [`support::QUIET`].
//!
//! Servers for network backends are found by [`servers`].
//!
//! ## The cases
//!
//! | about | cases |
//! | --- | --- |
//! | delivery | [`round_trip`], [`publish_without_subscribers_succeeds`], [`headers_round_trip`], [`publish_option_headers_are_merged`], [`empty_body`], [`binary_body`], [`large_body`], [`topics_are_isolated`] |
//! | fan-out | [`broadcast_reaches_every_subscriber`], [`queue_groups_share_work`], [`mixed_broadcast_and_queue_subscribers`] |
//! | order and volume | [`per_publisher_order`], [`ordering_key_keeps_order`], [`concurrent_publishers_lose_nothing`], [`ten_thousand_messages_none_lost`] |
//! | subscriptions | [`unsubscribe_stops_delivery`], [`unsubscribe_twice_is_harmless`], [`unsubscribe_from_own_handler`], [`unsubscribe_waits_for_running_handler`], [`resubscribe_after_unsubscribe`], [`subscriber_reports_topic_and_options`], [`concurrency_limit_is_respected`], [`concurrency_zero_is_rejected`] |
//! | failures and acks | [`handler_error_is_redelivered`], [`max_redeliveries_then_dead_letter`], [`manual_ack_prevents_redelivery`], [`manual_nack_redelivers`], [`handler_panic_is_a_failure`] |
//! | connection | [`disconnect_drains_in_flight_handler`], [`publish_after_disconnect_fails`], [`not_connected_before_connect`], [`connect_twice_is_harmless`], [`reconnect_after_disconnect`], [`init_only_while_disconnected`], [`name_and_capabilities_match_plugin`] |
//! | validation | [`invalid_topics_are_rejected`], [`unsupported_options_are_rejected`], [`delayed_delivery_waits`], [`late_subscriber_reads_old_messages`], [`backlog_reaches_first_subscriber`] |
//! | typed | [`typed_json_round_trip`], [`typed_json_rejects_garbage`] |
//! | layers (`broker_core::layers` over the backend) | [`retry_layer_dead_letters_after_bound`], [`retry_layer_handles_once_after_failures`], [`tracing_layer_propagates_trace_context`], [`concurrency_layer_limits_handlers`] |

#![deny(missing_docs)]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use broker_core::{Broker, BrokerOptions, Capabilities};

mod cases;
pub mod servers;
pub mod support;

pub use cases::*;
pub use support::unique_topic;

/// What a case concluded when it did not fail (failures panic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseResult {
    /// Everything the case checks held.
    Passed,
    /// The case does not apply to this backend, and why (from its [`Capabilities`]).
    Skipped(String),
}

impl CaseResult {
    /// A skip with `reason`.
    pub fn skipped(reason: impl Into<String>) -> Self {
        CaseResult::Skipped(reason.into())
    }
}

/// The future a broker factory returns.
pub type BrokerFuture = Pin<Box<dyn Future<Output = broker_core::Result<Arc<dyn Broker>>> + Send + 'static>>;

/// Builds an unconnected broker from options (which carry the server address, if any).
pub type BuildFn = Arc<dyn Fn(BrokerOptions) -> BrokerFuture + Send + Sync + 'static>;

/// What a case gets: the backend's name and capabilities, and fresh brokers.
#[derive(Clone)]
pub struct Ctx {
    backend: String,
    capabilities: Capabilities,
    options: BrokerOptions,
    build: BuildFn,
}

impl fmt::Debug for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx")
            .field("backend", &self.backend)
            .field("capabilities", &self.capabilities)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    /// A context for `backend`: `build` makes an unconnected broker from options, `options` are the
    /// base options every broker of the case starts from (addresses of the server, if any).
    /// Builds one broker to read its [`Capabilities`].
    pub async fn new<F, Fut>(backend: impl Into<String>, options: BrokerOptions, build: F) -> broker_core::Result<Ctx>
    where
        F: Fn(BrokerOptions) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = broker_core::Result<Arc<dyn Broker>>> + Send + 'static,
    {
        let build: BuildFn = Arc::new(move |options| Box::pin(build(options)));
        let probe = build(options.clone()).await?;
        let capabilities = probe.capabilities();
        Ok(Ctx { backend: backend.into(), capabilities, options, build })
    }

    /// The context a generated test uses: finds the server of `backend` ([`servers::server_or_skip`]),
    /// then builds the context. `None` (after printing `SKIP <backend>::<case>: ...`) when the
    /// backend's server is unavailable and not required.
    ///
    /// # Panics
    ///
    /// When the server is required but unavailable, or the factory fails: the suite cannot run.
    pub async fn prepare<F, Fut>(backend: &str, case: &str, build: F) -> Option<Ctx>
    where
        F: Fn(BrokerOptions) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = broker_core::Result<Arc<dyn Broker>>> + Send + 'static,
    {
        let Some(address) = servers::server_or_skip(backend).await else {
            print_skip(backend, case, &format!("no {backend} server (set {})", servers::env_var(backend)));
            return None;
        };
        let mut options = BrokerOptions::default();
        if let Some(address) = address {
            options = options.with_addresses([address]);
        }
        match Ctx::new(backend, options, build).await {
            Ok(ctx) => Some(ctx),
            Err(error) => panic!("cannot build a {backend} broker for the conformance suite: {error}"),
        }
    }

    /// The backend's name, as registered.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// What the backend declares it does.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// The base options (server addresses and defaults) each broker starts from.
    pub fn options(&self) -> BrokerOptions {
        self.options.clone()
    }

    /// A fresh broker with `options`, not connected.
    ///
    /// # Panics
    ///
    /// When the factory fails.
    pub async fn unconnected_with(&self, options: BrokerOptions) -> Arc<dyn Broker> {
        match support::bounded("building a broker", (self.build)(options)).await {
            Ok(broker) => broker,
            Err(error) => panic!("cannot build a {} broker: {error}", self.backend),
        }
    }

    /// A fresh broker with the base options, not connected.
    ///
    /// # Panics
    ///
    /// When the factory fails.
    pub async fn unconnected(&self) -> Arc<dyn Broker> {
        self.unconnected_with(self.options()).await
    }

    /// A fresh connected broker with `options`.
    ///
    /// # Panics
    ///
    /// When building or connecting fails.
    pub async fn broker_with(&self, options: BrokerOptions) -> Arc<dyn Broker> {
        let broker = self.unconnected_with(options).await;
        support::must(&format!("connect a {} broker", self.backend), broker.connect()).await;
        broker
    }

    /// A fresh connected broker with the base options.
    ///
    /// # Panics
    ///
    /// When building or connecting fails.
    pub async fn broker(&self) -> Arc<dyn Broker> {
        self.broker_with(self.options()).await
    }
}

/// A factory for [`Ctx::new`] and [`conformance_suite!`] that builds `name` through the plugin
/// registry ([`broker_core::from_name`]). The backend's crate must be linked (see the plugin docs).
pub fn from_registry(name: &'static str) -> impl Fn(BrokerOptions) -> BrokerFuture + Send + Sync + 'static {
    move |options| Box::pin(async move { broker_core::from_name(name, options) })
}

/// What a generated test does with a case's result: a skip prints `SKIP <backend>::<case>: <reason>`
/// to stderr (and the test passes).
pub fn report(ctx: &Ctx, case: &str, result: CaseResult) {
    if let CaseResult::Skipped(reason) = result {
        print_skip(ctx.backend(), case, &reason);
    }
}

/// Writes `SKIP <backend>::<case>: <reason>` straight to the process's stderr, past the test
/// harness's output capture, so skips show in every test log.
pub fn print_skip(backend: &str, case: &str, reason: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "SKIP {backend}::{case}: {reason}");
}

/// Calls `$callback!($($args)* ; case, case, ...)` with the name of every case, in order. The one
/// list of cases, shared by [`conformance_suite!`] and [`CASES`].
#[doc(hidden)]
#[macro_export]
macro_rules! __with_cases {
    ($callback:ident ! ($($args:tt)*)) => {
        $crate::$callback! { $($args)* ;
            round_trip,
            publish_without_subscribers_succeeds,
            headers_round_trip,
            publish_option_headers_are_merged,
            empty_body,
            binary_body,
            large_body,
            broadcast_reaches_every_subscriber,
            topics_are_isolated,
            queue_groups_share_work,
            mixed_broadcast_and_queue_subscribers,
            per_publisher_order,
            ordering_key_keeps_order,
            concurrent_publishers_lose_nothing,
            ten_thousand_messages_none_lost,
            unsubscribe_stops_delivery,
            unsubscribe_twice_is_harmless,
            unsubscribe_waits_for_running_handler,
            resubscribe_after_unsubscribe,
            subscriber_reports_topic_and_options,
            handler_error_is_redelivered,
            max_redeliveries_then_dead_letter,
            manual_ack_prevents_redelivery,
            manual_nack_redelivers,
            handler_panic_is_a_failure,
            concurrency_limit_is_respected,
            concurrency_zero_is_rejected,
            disconnect_drains_in_flight_handler,
            publish_after_disconnect_fails,
            not_connected_before_connect,
            connect_twice_is_harmless,
            reconnect_after_disconnect,
            invalid_topics_are_rejected,
            unsupported_options_are_rejected,
            delayed_delivery_waits,
            late_subscriber_reads_old_messages,
            backlog_reaches_first_subscriber,
            unsubscribe_from_own_handler,
            typed_json_round_trip,
            typed_json_rejects_garbage,
            name_and_capabilities_match_plugin,
            init_only_while_disconnected,
            retry_layer_dead_letters_after_bound,
            retry_layer_handles_once_after_failures,
            tracing_layer_propagates_trace_context,
            concurrency_layer_limits_handlers,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __case_names {
    (; $($case:ident),* $(,)?) => {
        /// The names of every conformance case, in the order [`conformance_suite!`] generates them.
        pub const CASES: &[&str] = &[$(stringify!($case)),*];
    };
}

__with_cases!(__case_names!());

#[doc(hidden)]
#[macro_export]
macro_rules! __case_tests {
    ($backend:expr, $factory:expr ; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend: &str = $backend;
                if let Some(ctx) = $crate::Ctx::prepare(backend, stringify!($case), $factory).await {
                    let result = $crate::$case(&ctx).await;
                    $crate::report(&ctx, stringify!($case), result);
                }
            }
        )*
    };
}

/// Generates `mod $module { #[tokio::test] async fn <case>() ... }` with one test per conformance
/// case for `$backend`, building brokers with `$factory` (a `Fn(BrokerOptions) -> impl Future<Output =
/// broker_core::Result<Arc<dyn Broker>>>` returning an unconnected broker, such as
/// [`from_registry`]). The test crate needs `tokio` (with `macros` and `rt-multi-thread`).
///
/// ```ignore
/// use broker_nats as _; // link the plugin
/// integration_tests::conformance_suite!(nats, "nats", integration_tests::from_registry("nats"));
/// ```
///
/// For a backend that needs a server, the address comes from [`servers`]; without one the tests
/// print `SKIP` and pass, unless `BROKER_TEST_REQUIRE=all`.
#[macro_export]
macro_rules! conformance_suite {
    ($module:ident, $backend:expr, $factory:expr $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::__with_cases!(__case_tests!($backend, $factory));
        }
    };
    // A suite with cases that cannot hold on this backend for a reason its capabilities do not
    // express (SQS's 256 KiB message limit): `skip: &[("case", "why")]` before the factory; each
    // listed case prints `SKIP <backend>::<case>: <why>` and passes, and a name that is not a case
    // fails every test.
    ($module:ident, $backend:expr, skip: $skips:expr, $factory:expr $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::__with_cases!(__skipping_case_tests!($backend, $factory, $skips));
        }
    };
    // A suite that also needs another server (`service: "etcd"`): `$make_factory` takes that
    // server's URL and returns the factory; without the URL every case is skipped (or fails
    // where BROKER_TEST_REQUIRE asks for the service).
    ($module:ident, $backend:expr, service: $service:expr, $make_factory:expr $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::__with_cases!(__service_case_tests!($backend, $service, $make_factory));
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __service_case_tests {
    ($backend:expr, $service:expr, $make_factory:expr ; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend: &str = $backend;
                let service: &str = $service;
                let Some(url) = $crate::servers::service_or_skip(service) else {
                    $crate::print_skip(
                        backend,
                        stringify!($case),
                        &format!("no {service} server (set {})", $crate::servers::env_var(service)),
                    );
                    return;
                };
                if let Some(ctx) = $crate::Ctx::prepare(backend, stringify!($case), ($make_factory)(url)).await {
                    let result = $crate::$case(&ctx).await;
                    $crate::report(&ctx, stringify!($case), result);
                }
            }
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __skipping_case_tests {
    ($backend:expr, $factory:expr, $skips:expr ; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend: &str = $backend;
                let skips: &[(&str, &str)] = $skips;
                for (name, _) in skips {
                    assert!($crate::CASES.contains(name), "the skip list names {name:?}, which is not a case");
                }
                if let Some((_, why)) = skips.iter().find(|(name, _)| *name == stringify!($case)) {
                    $crate::print_skip(backend, stringify!($case), why);
                    return;
                }
                if let Some(ctx) = $crate::Ctx::prepare(backend, stringify!($case), $factory).await {
                    let result = $crate::$case(&ctx).await;
                    $crate::report(&ctx, stringify!($case), result);
                }
            }
        )*
    };
}
