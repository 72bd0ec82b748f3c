//! The tracing layer bridged to OpenTelemetry (feature `opentelemetry`): with a
//! `tracing-opentelemetry` layer installed, the ids in `traceparent` are those of the OpenTelemetry
//! spans, and the handler's OpenTelemetry span joins the publisher's trace.
#![cfg(feature = "opentelemetry")]

use std::time::Duration;

use broker_core::layers::{BrokerLayerExt, TraceContext, TracingLayer};
use broker_core::{Broker, Event, MemoryBroker, Message, PublishOptions, SubscribeOptions, handler_fn};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

#[test]
fn traceparent_carries_the_opentelemetry_ids() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("layers-test")));
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (header, current, otel_trace, otel_span) = runtime.block_on(async {
        let broker = MemoryBroker::new().with_layer(TracingLayer::new());
        broker.connect().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        broker
            .subscribe(
                "otel",
                handler_fn(move |event: Event| {
                    let tx = tx.clone();
                    async move {
                        let cx = tracing::Span::current().context();
                        let span = cx.span();
                        let sc = span.span_context();
                        tx.send((
                            TraceContext::from_message(event.message()),
                            TraceContext::current(),
                            sc.trace_id().to_string(),
                            sc.span_id().to_string(),
                        ))?;
                        Ok(())
                    }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
        broker.publish("otel", Message::new("x"), PublishOptions::new()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
        broker.disconnect().await.unwrap();
        got
    });
    let header = header.expect("a traceparent");
    let current = current.expect("a current context");
    assert_eq!(otel_trace, header.trace_id(), "the handler's OpenTelemetry span is in the publisher's trace");
    assert_eq!(current.span_id(), otel_span, "the recorded ids are the OpenTelemetry span's");
    assert_eq!(current.parent_span_id(), Some(header.span_id()));
    assert_ne!(otel_span, header.span_id());
}
