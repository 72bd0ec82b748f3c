//! The subscriber side: the HTTP endpoint that receives deliveries and runs handlers.
//!
//! Statuses (Go Micro answers 200 to almost everything; we answer what happened, so that the
//! publisher can retry): 200 handled and acked; 400 malformed body; 401 wrong shared secret;
//! 404 no subscription with that id (the publisher forgets the node); 405 not a POST; 413 body
//! over the limit (refused from `Content-Length` before reading, or once the limit is crossed);
//! 500 the handler failed or nacked; 503 shutting down.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::{
    Acknowledger, Event, Handler, Message, Result, SubscribeOptions, headers, run_handler, scope_handler,
};
use broker_registry::Service;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Running, SECRET_HEADER, lock, tls, wire};

/// One local subscription, as the endpoint sees it.
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
            .acknowledger(HttpAck(Arc::clone(&settle)))
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

/// The HTTP response is the acknowledgement: this records which one to send.
struct HttpAck(Arc<Settle>);

#[async_trait]
impl Acknowledger for HttpAck {
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
/// Go Micro's rule that a POST runs every local subscription carrying the id it names.
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

/// Accepts connections until `stop`, then lets open requests finish (bounded).
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: Option<tls::Acceptor>,
    running: Weak<Running>,
    stop: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "http broker: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let running = running.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => serve_connection(stream, running, watcher).await,
                #[cfg(feature = "tls")]
                Some(acceptor) => {
                    // Bounded, so that a peer that never finishes its handshake holds nothing for long.
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(stream, running, watcher).await,
                        Ok(Err(error)) => tracing::debug!(%error, "http broker: TLS handshake failed"),
                        Err(_) => tracing::debug!("http broker: TLS handshake timed out"),
                    }
                }
                #[cfg(not(feature = "tls"))]
                Some(never) => match never {},
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

async fn serve_connection<I>(io: I, running: Weak<Running>, watcher: Watcher)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let running = running.clone();
        async move { Ok::<_, Infallible>(handle(running, request).await) }
    });
    let connection = watcher.watch(http1::Builder::new().serve_connection(TokioIo::new(io), service));
    if let Err(error) = connection.await {
        tracing::debug!(%error, "http broker: connection ended with an error");
    }
}

/// Answers one request. Never panics on what the peer sent.
pub(crate) async fn handle(running: Weak<Running>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(running) = running.upgrade() else {
        return status(StatusCode::SERVICE_UNAVAILABLE, "the broker is shutting down");
    };
    let (parts, body) = request.into_parts();
    if parts.method != Method::POST {
        return status(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: deliveries are POST requests");
    }
    if let Some(secret) = &running.config.secret {
        let given = parts.headers.get(SECRET_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        if !constant_time_eq(given, secret.as_bytes()) {
            return status(StatusCode::UNAUTHORIZED, "missing or wrong shared secret");
        }
    }
    let max = running.config.max_body_bytes;
    let declared = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return too_large(max);
    }
    let body = match Limited::new(body, max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => return too_large(max),
        Err(error) => return status(StatusCode::BAD_REQUEST, &format!("could not read the request body: {error}")),
    };
    let decoded = match wire::decode(&body) {
        Ok(decoded) => decoded,
        Err(error) => return status(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    let query = Query::parse(parts.uri.query());
    let subscriptions: Vec<_> =
        running.subscriptions.get(&query.id).into_iter().filter(|s| s.topic == decoded.topic).collect();
    if subscriptions.is_empty() {
        return status(
            StatusCode::NOT_FOUND,
            &format!("no subscription with id {:?} on topic {:?} here", query.id, decoded.topic),
        );
    }
    let mut failures = Vec::new();
    let mut handled = 0;
    for subscription in &subscriptions {
        match subscription.deliver(&running, decoded.message.clone(), query.attempt).await {
            Delivery::Handled => handled += 1,
            Delivery::Failed(reason) => failures.push(reason),
            Delivery::Gone => {}
        }
    }
    if !failures.is_empty() {
        return status(StatusCode::INTERNAL_SERVER_ERROR, &failures.join("; "));
    }
    if handled == 0 {
        return status(StatusCode::NOT_FOUND, &format!("the subscription {:?} has ended", query.id));
    }
    Response::new(Full::new(Bytes::new()))
}

pub(crate) struct Query {
    id: String,
    attempt: u32,
}

impl Query {
    pub(crate) fn parse(query: Option<&str>) -> Query {
        let mut parsed = Query { id: String::new(), attempt: 1 };
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match key.as_ref() {
                "id" => parsed.id = value.into_owned(),
                "attempt" => parsed.attempt = value.parse().unwrap_or(1).max(1),
                _ => {}
            }
        }
        parsed
    }
}

fn too_large(max: usize) -> Response<Full<Bytes>> {
    status(StatusCode::PAYLOAD_TOO_LARGE, &format!("the request body is larger than the limit of {max} bytes"))
}

/// An error answer with Go Micro's error JSON (`{"id","code","detail","status"}`).
fn status(code: StatusCode, detail: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "id": "go.micro.broker",
        "code": code.as_u16(),
        "detail": detail,
        "status": code.canonical_reason().unwrap_or(""),
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = code;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
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
    fn query_parsing() {
        let q = Query::parse(Some("id=broker-1.2&attempt=3&x=y"));
        assert_eq!(q.id, "broker-1.2");
        assert_eq!(q.attempt, 3);
        let q = Query::parse(Some("id=a%20b&attempt=zero"));
        assert_eq!(q.id, "a b");
        assert_eq!(q.attempt, 1);
        let q = Query::parse(None);
        assert_eq!((q.id.as_str(), q.attempt), ("", 1));
    }

    #[test]
    fn secrets_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn error_bodies_are_go_micro_json() {
        let response = status(StatusCode::NOT_FOUND, "gone");
        assert_eq!(response.status(), 404);
        assert_eq!(response.headers()[http::header::CONTENT_TYPE], "application/json");
    }
}
