//! The tracing layer over the HTTP backend: two brokers (two "processes") that find each other
//! through a shared registry. The handler on the subscribing broker sees a `traceparent` with the
//! publisher's trace id and the publish span's id as parent, and its `process` span is a child of
//! the `publish` span made on the other broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::layers::{BrokerLayerExt, TraceContext, TracingLayer};
use broker_core::{Broker, BrokerOptions, Event, Message, PublishOptions, SubscribeOptions, handler_fn};
use broker_http::HttpBroker;
use broker_registry::{MemoryRegistry, SharedRegistry};
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

fn http_broker(registry: &SharedRegistry) -> HttpBroker {
    let options = BrokerOptions::new().with_drain_timeout(Duration::from_secs(5));
    HttpBroker::with_registry(options, Arc::clone(registry)).expect("valid options")
}

#[test]
fn the_handler_span_is_a_child_of_the_publish_span_across_http() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    // One thread: every task of both brokers runs where the capturing subscriber is the default.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let topic = format!("layers.http.{}", std::process::id());
    let (traceparent, current) = runtime.block_on(async {
        let registry: SharedRegistry = Arc::new(MemoryRegistry::new());
        let publisher = http_broker(&registry).with_layer(TracingLayer::new());
        let subscriber = http_broker(&registry).with_layer(TracingLayer::new());
        publisher.connect().await.unwrap();
        subscriber.connect().await.unwrap();
        assert_ne!(publisher.address(), subscriber.address(), "two brokers, two listeners");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sub = subscriber
            .subscribe(
                &topic,
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
        publisher.publish(&topic, Message::new("hello"), PublishOptions::new()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("delivered").expect("open");
        sub.unsubscribe().await.unwrap();
        subscriber.disconnect().await.unwrap();
        publisher.disconnect().await.unwrap();
        got
    });
    let publish = capture.span("publish", &topic);
    let process = capture.span("process", &topic);
    let header = TraceContext::parse(&traceparent.expect("a traceparent header"), None).expect("a valid traceparent");
    assert_eq!(header.trace_id(), publish["trace_id"], "the publisher's trace id");
    assert_eq!(header.span_id(), publish["span_id"], "the publish span's id as parent-id");
    assert_eq!(process["trace_id"], publish["trace_id"]);
    assert_eq!(process["parent_id"], publish["span_id"]);
    let current = current.expect("the handler's context");
    assert_eq!(current.span_id(), process["span_id"]);
    for span in [&publish, &process] {
        assert_eq!(span["messaging.system"], "http");
        assert_eq!(span["messaging.message.body.size"], "5");
    }
    assert_eq!(publish["messaging.operation"], "publish");
    assert_eq!(process["messaging.operation"], "process");
}
