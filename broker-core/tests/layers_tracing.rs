//! The tracing layer over the memory backend: the handler's `process` span is a child of the
//! publisher's `publish` span, through the W3C `traceparent` header, and carries the messaging
//! attributes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::layers::{BrokerLayerExt, TraceContext, TracingLayer};
use broker_core::{Broker, Event, MemoryBroker, Message, PublishOptions, SubscribeOptions, handler_fn};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Metadata, Subscriber};

/// A span's name and recorded fields.
type SpanRecord = (String, HashMap<String, String>);

/// Every span created while it is the default subscriber: its name and recorded fields.
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<SpanRecord>>>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((attrs.metadata().name().to_string(), fields));
        Id::from_u64(spans.len() as u64)
    }
    fn record(&self, id: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        if let Some((_, fields)) = spans.get_mut(id.into_u64() as usize - 1) {
            values.record(&mut Fields(fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

impl Capture {
    fn span(&self, name: &str, topic: &str) -> HashMap<String, String> {
        let spans = self.spans.lock().unwrap();
        let found: Vec<_> = spans
            .iter()
            .filter(|(n, f)| n == name && f.get("messaging.destination.name").map(String::as_str) == Some(topic))
            .collect();
        assert_eq!(found.len(), 1, "one {name} span for {topic}: {spans:?}");
        found[0].1.clone()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn recv<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("in time").expect("open")
}

#[test]
fn handler_span_is_a_child_of_the_publish_span() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let (traceparent, current) = runtime().block_on(async {
        let broker = MemoryBroker::new().with_layer(TracingLayer::new());
        broker.connect().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        broker
            .subscribe(
                "orders.created",
                handler_fn(move |event: Event| {
                    let tx = tx.clone();
                    async move {
                        tx.send((event.message().header("traceparent").map(str::to_string), TraceContext::current()))?;
                        Ok(())
                    }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        let message = Message::new("42").with_header("Micro-Id", "msg-7");
        broker.publish("orders.created", message, PublishOptions::new()).await.unwrap();
        let got = recv(&mut rx).await;
        broker.disconnect().await.unwrap();
        got
    });
    let publish = capture.span("publish", "orders.created");
    let process = capture.span("process", "orders.created");

    // The header the handler sees: the publisher's trace id, and the publish span as parent.
    let traceparent = traceparent.expect("the handler sees a traceparent header");
    let header = TraceContext::parse(&traceparent, None).expect("a valid traceparent");
    assert_eq!(header.trace_id(), publish["trace_id"]);
    assert_eq!(header.span_id(), publish["span_id"], "parent-id of the header is the publish span's id");
    assert_eq!(publish["trace_id"].len(), 32);
    assert_eq!(publish["span_id"].len(), 16);
    assert!(!publish.contains_key("parent_id"), "a publish outside any trace starts one");

    // The process span: same trace, the publish span as parent; and it is the handler's current context.
    assert_eq!(process["trace_id"], publish["trace_id"]);
    assert_eq!(process["parent_id"], publish["span_id"]);
    assert_ne!(process["span_id"], publish["span_id"]);
    let current = current.expect("a current context inside a traced handler");
    assert_eq!(current.span_id(), process["span_id"]);
    assert_eq!(current.parent_span_id(), Some(publish["span_id"].clone()));

    // OpenTelemetry messaging attributes.
    for (span, operation, kind) in [(&publish, "publish", "producer"), (&process, "process", "consumer")] {
        assert_eq!(span["messaging.system"], "memory");
        assert_eq!(span["messaging.operation"], operation);
        assert_eq!(span["otel.kind"], kind);
        assert_eq!(span["messaging.message.id"], "msg-7");
        assert_eq!(span["messaging.message.body.size"], "2");
    }
}

#[test]
fn a_publish_from_a_handler_continues_the_trace() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let root = TraceContext::new_root();
    let (first, second) = runtime().block_on(async {
        let broker = Arc::new(MemoryBroker::new().with_layer(TracingLayer::new()));
        broker.connect().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let forwarder = Arc::clone(&broker);
        let tx2 = tx.clone();
        broker
            .subscribe(
                "step.one",
                handler_fn(move |event: Event| {
                    let (broker, tx) = (Arc::clone(&forwarder), tx2.clone());
                    async move {
                        tx.send(TraceContext::from_message(event.message()))?;
                        broker.publish("step.two", Message::new("next"), PublishOptions::new()).await?;
                        Ok(())
                    }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        broker
            .subscribe(
                "step.two",
                handler_fn(move |event: Event| {
                    let tx = tx.clone();
                    async move {
                        tx.send(TraceContext::from_message(event.message()))?;
                        Ok(())
                    }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        // A context of the caller's (an incoming request, say): the publish continues it.
        root.clone().scope(broker.publish("step.one", Message::new("go"), PublishOptions::new())).await.unwrap();
        let first = recv(&mut rx).await.expect("traceparent on step.one");
        let second = recv(&mut rx).await.expect("traceparent on step.two");
        broker.disconnect().await.unwrap();
        (first, second)
    });
    let publish_one = capture.span("publish", "step.one");
    let process_one = capture.span("process", "step.one");
    let publish_two = capture.span("publish", "step.two");
    assert_eq!(first.trace_id(), root.trace_id());
    assert_eq!(publish_one["parent_id"], root.span_id());
    assert_eq!(second.trace_id(), root.trace_id(), "one trace across both hops");
    assert_eq!(publish_two["parent_id"], process_one["span_id"], "the second publish is a child of the handler's span");
    assert_eq!(second.span_id(), publish_two["span_id"]);
}

#[test]
fn an_incoming_traceparent_is_continued_and_replaced() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let upstream = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let seen = runtime().block_on(async {
        let broker = MemoryBroker::new().with_layer(TracingLayer::new());
        broker.connect().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        broker
            .subscribe(
                "relay",
                handler_fn(move |event: Event| {
                    let tx = tx.clone();
                    async move {
                        tx.send(event.message().headers.clone())?;
                        Ok(())
                    }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        let options = PublishOptions::new().with_header("TraceParent", upstream).with_header("tracestate", "vendor=1");
        broker.publish("relay", Message::new("x"), options).await.unwrap();
        let seen = recv(&mut rx).await;
        broker.disconnect().await.unwrap();
        seen
    });
    let publish = capture.span("publish", "relay");
    assert_eq!(publish["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(publish["parent_id"], "00f067aa0ba902b7");
    let trace_headers: Vec<_> = seen.keys().filter(|k| k.to_ascii_lowercase().starts_with("trace")).collect();
    assert_eq!(trace_headers.len(), 2, "one traceparent and one tracestate: {seen:?}");
    let cx = TraceContext::from_headers(&seen).unwrap();
    assert_eq!(cx.span_id(), publish["span_id"]);
    assert_eq!(cx.trace_state(), Some("vendor=1"));
}
