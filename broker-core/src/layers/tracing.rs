//! The tracing layer: a [`tracing`] span per publish and per handled message, with the
//! OpenTelemetry messaging semantic-convention attributes, and the W3C trace context carried in
//! the message headers so that a handler's span is a child of the publisher's, across processes
//! and backends.
//!
//! * `publish` spans (`otel.kind = "producer"`) and `process` spans (`otel.kind = "consumer"`)
//!   carry `messaging.system` (the backend's name), `messaging.destination.name` (the topic),
//!   `messaging.operation` (`publish` / `process`), `messaging.message.id` (from the `Micro-Id`
//!   or `message-id` header, when there is one), `messaging.message.body.size`, and the W3C ids
//!   `trace_id`, `span_id` and `parent_id` (lower-case hex). A failure is recorded in `error`
//!   and `otel.status_code = "ERROR"`.
//! * On publish the layer writes [`TRACEPARENT`] (`00-<trace-id>-<span-id of the publish span>-<flags>`)
//!   and [`TRACESTATE`] into the message headers. The publish span continues the trace of the
//!   handler it runs in (see [`TraceContext::current`]), else of a `traceparent` already in the
//!   message or the publish options, else it starts a new trace.
//! * On receive the layer reads `traceparent`/`tracestate` (any letter case) and runs the handler
//!   in a `process` span whose parent is the publish span; inside the handler
//!   [`TraceContext::current`] is that span's context, so what the handler publishes continues the trace.
//!
//! Without OpenTelemetry the ids are generated here (16 and 8 random bytes). With the cargo
//! feature `opentelemetry`, when the current `tracing` subscriber has a `tracing-opentelemetry`
//! layer, the ids are those of the OpenTelemetry spans, the global text-map propagator
//! (`opentelemetry::global::set_text_map_propagator`) also injects and extracts, and the `process`
//! span's OpenTelemetry parent is set to the remote publish span.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use broker_core::layers::{BrokerLayerExt, TraceContext, TracingLayer};
//! use broker_core::{handler_fn, Broker, Event, MemoryBroker, Message, PublishOptions, SubscribeOptions};
//!
//! let broker = MemoryBroker::new().with_layer(TracingLayer::new());
//! broker.connect().await?;
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! broker.subscribe("greetings", handler_fn(move |event: Event| {
//!     let tx = tx.clone();
//!     async move {
//!         // The publisher's context, from the headers; and this handler's own.
//!         let parent = TraceContext::from_message(event.message());
//!         tx.send((parent, TraceContext::current()))?;
//!         Ok(())
//!     }
//! }), SubscribeOptions::new()).await?;
//! broker.publish("greetings", Message::new("hi"), PublishOptions::new()).await?;
//! let (parent, current) = rx.recv().await.unwrap();
//! let (parent, current) = (parent.unwrap(), current.unwrap());
//! assert_eq!(current.trace_id(), parent.trace_id());
//! assert_eq!(current.parent_span_id(), Some(parent.span_id()));
//! broker.disconnect().await?;
//! # Ok::<(), broker_core::Error>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use tracing::Instrument;
use tracing::field::{Empty, display};

use super::{Layer, delegate_broker};
use crate::broker::{Broker, Handler, HandlerResult, Subscriber};
use crate::error::Result;
use crate::event::Event;
use crate::message::{Headers, Message};
use crate::options::{PublishOptions, SubscribeOptions};

/// The W3C Trace Context header that carries the trace id and the parent span id.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C Trace Context header that carries vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";
/// The header whose value becomes `messaging.message.id` when there is no `Micro-Id`.
pub const MESSAGE_ID: &str = "message-id";

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// A W3C trace context: the trace id, this span's id, its parent's id (where known), the trace
/// flags and the `tracestate`.
///
/// ```
/// use broker_core::layers::TraceContext;
/// let parent = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None).unwrap();
/// let child = parent.child();
/// assert_eq!(child.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(child.parent_span_id().as_deref(), Some("00f067aa0ba902b7"));
/// assert!(child.traceparent().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
/// assert!(TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None).is_none());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    flags: u8,
    trace_state: Option<String>,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("trace_id", &self.trace_id())
            .field("span_id", &self.span_id())
            .field("parent_span_id", &self.parent_span_id())
            .field("flags", &self.flags)
            .field("trace_state", &self.trace_state)
            .finish()
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn random_span_id() -> [u8; 8] {
    fastrand::u64(1..).to_be_bytes()
}

impl TraceContext {
    /// A new trace: random trace and span ids, sampled, no parent.
    pub fn new_root() -> Self {
        TraceContext {
            trace_id: fastrand::u128(1..).to_be_bytes(),
            span_id: random_span_id(),
            parent_span_id: None,
            flags: 1,
            trace_state: None,
        }
    }

    /// A child span of this one: same trace, flags and state, a new span id, this span as parent.
    pub fn child(&self) -> Self {
        TraceContext {
            trace_id: self.trace_id,
            span_id: random_span_id(),
            parent_span_id: Some(self.span_id),
            flags: self.flags,
            trace_state: self.trace_state.clone(),
        }
    }

    /// Parses a `traceparent` header value (and an optional `tracestate`). The span id of the
    /// result is the `parent-id` of the header (the sender's span); it has no parent of its own.
    /// `None` for anything the W3C spec says to ignore: a bad length or character, version `ff`,
    /// an all-zero trace or span id.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let parts: Vec<&str> = traceparent.trim().split('-').collect();
        let [version, trace_id, span_id, flags, rest @ ..] = parts.as_slice() else { return None };
        let version = unhex::<1>(version)?[0];
        if version == 0xff || (version == 0 && !rest.is_empty()) {
            return None;
        }
        let trace_id = unhex::<16>(trace_id)?;
        let span_id = unhex::<8>(span_id)?;
        let flags = unhex::<1>(flags)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let trace_state = tracestate.map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
        Some(TraceContext { trace_id, span_id, parent_span_id: None, flags, trace_state })
    }

    /// The context a message carries in its `traceparent` / `tracestate` headers (any letter case).
    pub fn from_message(message: &Message) -> Option<Self> {
        Self::from_headers(&message.headers)
    }

    /// The context in `traceparent` / `tracestate` headers (any letter case).
    pub fn from_headers(headers: &Headers) -> Option<Self> {
        let get = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
        Self::parse(get(TRACEPARENT)?, get(TRACESTATE))
    }

    /// Writes `traceparent` (and `tracestate`, when there is one) into `headers`, replacing any
    /// header of those names in another letter case.
    pub fn inject(&self, headers: &mut Headers) {
        headers.retain(|k, _| !k.eq_ignore_ascii_case(TRACEPARENT) && !k.eq_ignore_ascii_case(TRACESTATE));
        headers.insert(TRACEPARENT.to_string(), self.traceparent());
        if let Some(state) = &self.trace_state {
            headers.insert(TRACESTATE.to_string(), state.clone());
        }
    }

    /// The `traceparent` header value: `00-<trace-id>-<span-id>-<flags>`.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id(), self.span_id(), self.flags)
    }

    /// The trace id, 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// This span's id, 16 lower-case hex digits.
    pub fn span_id(&self) -> String {
        hex(&self.span_id)
    }

    /// The parent span's id, 16 lower-case hex digits, where known.
    pub fn parent_span_id(&self) -> Option<String> {
        self.parent_span_id.map(|id| hex(&id))
    }

    /// Whether the sampled flag is set.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `tracestate`, if any.
    pub fn trace_state(&self) -> Option<&str> {
        self.trace_state.as_deref()
    }

    /// The context of the traced span this task runs in: inside a handler wrapped by the
    /// [`TracingLayer`], its `process` span; inside [`scope`](Self::scope), that context.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `future` with this as the current context: publishes made in it through a
    /// [`Traced`] broker continue this trace, as children of this span.
    pub fn scope<F: Future>(self, future: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, future)
    }
}

/// Adds tracing to a broker: see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct TracingLayer {
    _private: (),
}

impl TracingLayer {
    /// The tracing layer.
    pub fn new() -> Self {
        TracingLayer::default()
    }
}

impl<B: Broker> Layer<B> for TracingLayer {
    type Broker = Traced<B>;
    fn layer(&self, inner: B) -> Traced<B> {
        Traced { inner }
    }
}

/// A broker with tracing, made by [`TracingLayer`].
#[derive(Debug)]
pub struct Traced<B> {
    inner: B,
}

impl<B> Traced<B> {
    /// The wrapped broker.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

fn message_id(message: &Message) -> Option<&str> {
    message.header_ignore_case(crate::codec::MICRO_ID).or_else(|| message.header_ignore_case(MESSAGE_ID))
}

fn record_ids(span: &tracing::Span, cx: &TraceContext) {
    span.record("trace_id", display(cx.trace_id()));
    span.record("span_id", display(cx.span_id()));
    if let Some(parent) = cx.parent_span_id() {
        span.record("parent_id", display(parent));
    }
}

fn record_error(span: &tracing::Span, error: &dyn fmt::Display) {
    span.record("otel.status_code", "ERROR");
    span.record("error", display(error));
}

#[async_trait]
impl<B: Broker> Broker for Traced<B> {
    delegate_broker!();

    async fn connect(&self) -> Result<()> {
        self.inner.connect().await
    }

    async fn disconnect(&self) -> Result<()> {
        self.inner.disconnect().await
    }

    async fn publish(&self, topic: &str, mut message: Message, mut options: PublishOptions) -> Result<()> {
        let from_options = TraceContext::from_headers(&options.headers);
        options.headers.retain(|k, _| !k.eq_ignore_ascii_case(TRACEPARENT) && !k.eq_ignore_ascii_case(TRACESTATE));
        let parent = TraceContext::current().or(from_options).or_else(|| TraceContext::from_message(&message));
        #[cfg_attr(not(feature = "opentelemetry"), allow(unused_mut))]
        let mut cx = parent.as_ref().map_or_else(TraceContext::new_root, TraceContext::child);
        let span = tracing::info_span!(
            "publish",
            otel.name = %format_args!("{topic} publish"),
            otel.kind = "producer",
            otel.status_code = Empty,
            messaging.system = self.inner.name(),
            messaging.destination.name = topic,
            messaging.operation = "publish",
            messaging.message.id = Empty,
            messaging.message.body.size = message.body.len(),
            trace_id = Empty,
            span_id = Empty,
            parent_id = Empty,
            error = Empty,
        );
        if let Some(id) = message_id(&message) {
            span.record("messaging.message.id", id);
        }
        #[cfg(feature = "opentelemetry")]
        if let Some(otel_cx) = otel::span_context(&span, cx.trace_state.clone()) {
            cx = otel_cx;
        }
        record_ids(&span, &cx);
        cx.inject(&mut message.headers);
        #[cfg(feature = "opentelemetry")]
        otel::inject(&span, &mut message.headers);
        let result = self.inner.publish(topic, message, options).instrument(span.clone()).await;
        if let Err(error) = &result {
            record_error(&span, error);
        }
        result
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let handler = Arc::new(TracedHandler { inner: handler, system: self.inner.name() });
        self.inner.subscribe(topic, handler, options).await
    }
}

/// Runs a handler in a `process` span whose parent is the publisher's span.
struct TracedHandler {
    inner: Arc<dyn Handler>,
    system: &'static str,
}

#[async_trait]
impl Handler for TracedHandler {
    async fn handle(&self, event: Event) -> HandlerResult {
        let message = event.message();
        let parent = TraceContext::from_message(message);
        #[cfg_attr(not(feature = "opentelemetry"), allow(unused_mut))]
        let mut cx = parent.as_ref().map_or_else(TraceContext::new_root, TraceContext::child);
        let span = tracing::info_span!(
            "process",
            otel.name = %format_args!("{} process", event.topic()),
            otel.kind = "consumer",
            otel.status_code = Empty,
            messaging.system = self.system,
            messaging.destination.name = event.topic(),
            messaging.operation = "process",
            messaging.message.id = Empty,
            messaging.message.body.size = message.body.len(),
            messaging.message.delivery_attempt = event.attempt(),
            trace_id = Empty,
            span_id = Empty,
            parent_id = Empty,
            error = Empty,
        );
        if let Some(id) = message_id(message) {
            span.record("messaging.message.id", id);
        }
        #[cfg(feature = "opentelemetry")]
        {
            otel::set_parent(&span, &message.headers, parent.as_ref());
            if let Some(mut otel_cx) = otel::span_context(&span, cx.trace_state.clone()) {
                otel_cx.parent_span_id = cx.parent_span_id;
                cx = otel_cx;
            }
        }
        record_ids(&span, &cx);
        let result = CURRENT.scope(cx, self.inner.handle(event)).instrument(span.clone()).await;
        if let Err(error) = &result {
            record_error(&span, error);
        }
        result
    }
}

/// The bridge to OpenTelemetry (cargo feature `opentelemetry`).
#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::propagation::{Extractor, Injector};
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceContext;
    use crate::message::Headers;

    struct HeaderInjector<'a>(&'a mut Headers);

    impl Injector for HeaderInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.retain(|k, _| !k.eq_ignore_ascii_case(key));
            self.0.insert(key.to_string(), value);
        }
    }

    struct HeaderExtractor<'a>(&'a Headers);

    impl Extractor for HeaderExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.as_str())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(String::as_str).collect()
        }
    }

    /// The OpenTelemetry ids of `span`, when an OpenTelemetry layer gives it valid ones.
    pub(super) fn span_context(span: &tracing::Span, trace_state: Option<String>) -> Option<TraceContext> {
        let cx = span.context();
        let otel_span = cx.span();
        let sc = otel_span.span_context();
        if !sc.is_valid() {
            return None;
        }
        let state = sc.trace_state().header();
        Some(TraceContext {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            parent_span_id: None,
            flags: sc.trace_flags().to_u8(),
            trace_state: if state.is_empty() { trace_state } else { Some(state) },
        })
    }

    /// Lets the global propagator write its headers (baggage, its own trace context) too.
    pub(super) fn inject(span: &tracing::Span, headers: &mut Headers) {
        let cx = span.context();
        if cx.span().span_context().is_valid() {
            opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
        }
    }

    /// Makes the remote publish span the OpenTelemetry parent of `span`: from the global
    /// propagator when it finds a context, else from the `traceparent` parsed here.
    pub(super) fn set_parent(span: &tracing::Span, headers: &Headers, parent: Option<&TraceContext>) {
        let extracted = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
        let cx = if extracted.span().span_context().is_valid() {
            extracted
        } else if let Some(parent) = parent {
            let state = parent.trace_state().and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
            let remote = SpanContext::new(
                TraceId::from_bytes(parent.trace_id),
                SpanId::from_bytes(parent.span_id),
                TraceFlags::new(parent.flags),
                true,
                state,
            );
            opentelemetry::Context::new().with_remote_span_context(remote)
        } else {
            return;
        };
        // Fails only when the subscriber has no OpenTelemetry layer: then there is nothing to link.
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_follows_the_w3c_rules() {
        let ok = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Some(" k=v ")).unwrap();
        assert_eq!(ok.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ok.span_id(), "00f067aa0ba902b7");
        assert!(ok.sampled());
        assert_eq!(ok.trace_state(), Some("k=v"));
        assert_eq!(ok.traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        // A future version may append fields; version 00 may not.
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra", None).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn roots_are_random_and_children_keep_the_trace() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_ne!(a.trace_id(), b.trace_id());
        assert_eq!(a.trace_id().len(), 32);
        assert_eq!(a.span_id().len(), 16);
        let child = a.child();
        assert_eq!(child.trace_id(), a.trace_id());
        assert_eq!(child.parent_span_id(), Some(a.span_id()));
        assert_ne!(child.span_id(), a.span_id());
        assert_eq!(TraceContext::parse(&child.traceparent(), None).map(|c| c.span_id()), Some(child.span_id()));
    }

    #[test]
    fn inject_replaces_other_letter_cases() {
        let mut headers = Headers::new();
        headers.insert("TraceParent".into(), "junk".into());
        let cx = TraceContext::new_root();
        cx.inject(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(TraceContext::from_headers(&headers).map(|c| c.span_id()), Some(cx.span_id()));
    }
}
