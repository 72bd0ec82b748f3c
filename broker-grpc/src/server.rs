//! The subscriber side: the gRPC server answering `/Broker/Publish`, and the local subscriptions.
//!
//! Statuses (Go Micro's server answers `Empty` even when the handler failed; we answer what
//! happened, so that the publisher can retry): OK handled and acked; `InvalidArgument` no topic;
//! `Unauthenticated` wrong shared secret; `NotFound` no subscription with that id on that topic
//! (the publisher forgets the node); `Internal` the handler failed or nacked; `Unavailable`
//! shutting down. tonic itself answers `Internal` to a body that is not a `Message`,
//! `OutOfRange` / `ResourceExhausted` to one over `max_message_bytes`, and `Unimplemented` to any
//! other method.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};

use async_trait::async_trait;
use broker_core::{
    Acknowledger, Event, Handler, Message, Result, SubscribeOptions, headers, run_handler, scope_handler,
};
use broker_registry::Service;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service as TowerService, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

use crate::proto::{self, Empty};
use crate::{ATTEMPT_METADATA, Running, SECRET_METADATA, lock};

/// One local subscription, as the server sees it.
pub(crate) struct Subscription {
    topic: String,
    node_id: String,
    /// The registry entry (one node) this subscription registers.
    pub(crate) service: Service,
    handler: Arc<dyn Handler>,
    options: SubscribeOptions,
    limit: Arc<Semaphore>,
    active: AtomicBool,
    /// Handlers of this subscription that are running; `unsubscribe()` waits for them.
    pub(crate) tasks: TaskTracker,
}

impl Subscription {
    pub(crate) fn new(
        topic: &str,
        service: Service,
        handler: Arc<dyn Handler>,
        options: SubscribeOptions,
    ) -> Arc<Self> {
        let node_id = service.nodes.first().map(|n| n.id.clone()).unwrap_or_default();
        Arc::new(Subscription {
            topic: topic.to_string(),
            node_id,
            service,
            handler,
            limit: Arc::new(Semaphore::new(options.concurrency)),
            options,
            active: AtomicBool::new(true),
            tasks: TaskTracker::new(),
        })
    }

    pub(crate) fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Waits for this subscription's running handlers, except the one calling (an
    /// `unsubscribe()` from inside its own handler).
    pub(crate) async fn wait_for_handlers(self: &Arc<Self>) {
        broker_core::wait_for_other_handlers(&self.tasks, Arc::as_ptr(self) as usize).await;
    }

    /// Runs the handler on one delivery and says how it ended.
    async fn deliver(self: &Arc<Self>, running: &Arc<Running>, message: Message, attempt: u32) -> Delivery {
        let Ok(permit) = Arc::clone(&self.limit).acquire_owned().await else { return Delivery::Gone };
        // Taken before the check, so that unsubscribe() either sees this delivery or it sees
        // the subscription gone: never a handler starting after unsubscribe() returned.
        let token = self.tasks.token();
        if !self.active.load(Ordering::Acquire) {
            return Delivery::Gone;
        }
        let settle = Arc::new(Settle::default());
        let event = Event::builder(self.topic.as_str(), message.clone())
            .attempt(attempt)
            .acknowledger(GrpcAck(Arc::clone(&settle)))
            .build();
        let handler = Arc::clone(&self.handler);
        let auto_ack = self.options.auto_ack;
        // Spawned, so that a publisher that gives up waiting does not cancel a running handler.
        let task = running.handlers.spawn(scope_handler(Arc::as_ptr(self) as usize, async move {
            let outcome = run_handler(handler.as_ref(), event, auto_ack).await;
            drop(permit);
            drop(token);
            outcome
        }));
        let outcome = task.await;
        let reason = match settle.state.load(Ordering::Acquire) {
            ACKED => return Delivery::Handled,
            NACKED => lock(&settle.reason).clone().unwrap_or_else(|| "nacked".into()),
            _ => match outcome {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(())) => "the handler returned without acking (auto-ack is off)".into(),
                Err(e) => format!("the handler task ended abnormally: {e}"),
            },
        };
        match self.options.max_redeliveries {
            Some(max) if attempt > max => self.dead_letter(running, message, attempt, &reason),
            _ => Delivery::Failed(reason),
        }
    }

    /// Past `max_redeliveries`: hand the message to `<topic>.dlq` and call it handled.
    fn dead_letter(&self, running: &Running, message: Message, attempt: u32, reason: &str) -> Delivery {
        let dlq = format!("{}.dlq", self.topic);
        let message = message
            .with_header(headers::DEAD_LETTER_REASON, reason)
            .with_header(headers::DELIVERY_ATTEMPTS, attempt.to_string())
            .with_header(headers::ORIGINAL_TOPIC, self.topic.clone());
        match running.outbox.publish(&dlq, &message) {
            Ok(()) => Delivery::Handled,
            Err(e) => Delivery::Failed(format!("{reason}; and dead-lettering to {dlq} failed: {e}")),
        }
    }
}

enum Delivery {
    Handled,
    Failed(String),
    Gone,
}

const ACKED: u8 = 1;
const NACKED: u8 = 2;

#[derive(Default)]
struct Settle {
    state: AtomicU8,
    reason: Mutex<Option<String>>,
}

/// The gRPC status is the acknowledgement: this records which one to send.
struct GrpcAck(Arc<Settle>);

#[async_trait]
impl Acknowledger for GrpcAck {
    async fn ack(&self) -> Result<()> {
        self.0.state.store(ACKED, Ordering::Release);
        Ok(())
    }

    async fn nack(&self, reason: &str) -> Result<()> {
        *lock(&self.0.reason) = Some(reason.to_string());
        self.0.state.store(NACKED, Ordering::Release);
        Ok(())
    }
}

/// The local subscriptions by node id. Our node ids are unique per subscription; a list keeps
/// Go Micro's rule that a call runs every local subscription carrying the id it names.
#[derive(Default)]
pub(crate) struct Subscriptions {
    by_node: RwLock<HashMap<String, Vec<Arc<Subscription>>>>,
}

impl Subscriptions {
    pub(crate) fn insert(&self, subscription: Arc<Subscription>) {
        let mut map = self.by_node.write().unwrap_or_else(|p| p.into_inner());
        map.entry(subscription.node_id.clone()).or_default().push(subscription);
    }

    /// Removes one subscription; false if it was already gone.
    pub(crate) fn remove(&self, subscription: &Arc<Subscription>) -> bool {
        subscription.active.store(false, Ordering::Release);
        let mut map = self.by_node.write().unwrap_or_else(|p| p.into_inner());
        let Some(list) = map.get_mut(&subscription.node_id) else { return false };
        let before = list.len();
        list.retain(|s| !Arc::ptr_eq(s, subscription));
        let removed = list.len() != before;
        if list.is_empty() {
            map.remove(&subscription.node_id);
        }
        removed
    }

    /// Removes every subscription; returns their registry entries.
    pub(crate) fn remove_all(&self) -> Vec<Service> {
        let mut map = self.by_node.write().unwrap_or_else(|p| p.into_inner());
        map.drain()
            .flat_map(|(_, list)| list)
            .map(|s| {
                s.active.store(false, Ordering::Release);
                s.service.clone()
            })
            .collect()
    }

    pub(crate) fn services(&self) -> Vec<Service> {
        let map = self.by_node.read().unwrap_or_else(|p| p.into_inner());
        map.values().flatten().map(|s| s.service.clone()).collect()
    }

    fn get(&self, node_id: &str) -> Vec<Arc<Subscription>> {
        let map = self.by_node.read().unwrap_or_else(|p| p.into_inner());
        map.get(node_id).cloned().unwrap_or_default()
    }
}

/// Serves `/Broker/Publish` on `listener` until `stop`, then lets open calls finish.
pub(crate) async fn serve(
    listener: TcpListener,
    running: Weak<Running>,
    max_message_bytes: usize,
    stop: CancellationToken,
) {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let service = BrokerServer { running, max_message_bytes };
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::warn!(%error, "grpc broker: the server ended with an error");
    }
}

/// The `Broker` service, written as tonic's generated code would be (no `protoc` needed).
#[derive(Clone)]
struct BrokerServer {
    running: Weak<Running>,
    max_message_bytes: usize,
}

impl NamedService for BrokerServer {
    const NAME: &'static str = proto::SERVICE;
}

impl<B> TowerService<http::Request<B>> for BrokerServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if request.uri().path() != proto::PUBLISH_PATH {
                let status = Status::unimplemented(format!(
                    "{} is not a method of this broker: it serves {} only",
                    request.uri().path(),
                    proto::PUBLISH_PATH
                ));
                return Ok(status.into_http());
            }
            let mut grpc = Grpc::new(ProstCodec::<Empty, proto::Message>::default())
                .apply_max_message_size_config(Some(this.max_message_bytes), None);
            Ok(grpc.unary(Publish(this.running.clone()), request).await)
        })
    }
}

/// The `Publish` method.
struct Publish(Weak<Running>);

impl UnaryService<proto::Message> for Publish {
    type Response = Empty;
    type Future = BoxFuture<Response<Empty>, Status>;

    fn call(&mut self, request: Request<proto::Message>) -> Self::Future {
        let running = self.0.clone();
        Box::pin(async move { publish(running, request).await.map(Response::new) })
    }
}

/// Answers one call. Never panics on what the peer sent.
async fn publish(running: Weak<Running>, request: Request<proto::Message>) -> std::result::Result<Empty, Status> {
    let Some(running) = running.upgrade() else {
        return Err(Status::unavailable("the broker is shutting down"));
    };
    if let Some(secret) = &running.config.secret {
        let given = request.metadata().get(SECRET_METADATA).map(|v| v.as_bytes()).unwrap_or_default();
        if !constant_time_eq(given, secret.as_bytes()) {
            return Err(Status::unauthenticated("missing or wrong shared secret"));
        }
    }
    let attempt =
        request.metadata().get(ATTEMPT_METADATA).and_then(|v| v.to_str().ok()?.parse::<u32>().ok()).unwrap_or(1).max(1);
    let message = request.into_inner();
    if message.topic.is_empty() {
        return Err(Status::invalid_argument("Topic not found: the message has an empty topic"));
    }
    let subscriptions: Vec<_> =
        running.subscriptions.get(&message.id).into_iter().filter(|s| s.topic == message.topic).collect();
    if subscriptions.is_empty() {
        return Err(Status::not_found(format!(
            "no subscription with id {:?} on topic {:?} here",
            message.id, message.topic
        )));
    }
    let mut delivered = Message::new(message.body);
    delivered.headers = message.header;
    let mut failures = Vec::new();
    let mut handled = 0;
    for subscription in &subscriptions {
        match subscription.deliver(&running, delivered.clone(), attempt).await {
            Delivery::Handled => handled += 1,
            Delivery::Failed(reason) => failures.push(reason),
            Delivery::Gone => {}
        }
    }
    if !failures.is_empty() {
        return Err(Status::internal(failures.join("; ")));
    }
    if handled == 0 {
        return Err(Status::not_found(format!("the subscription {:?} has ended", message.id)));
    }
    Ok(Empty {})
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
