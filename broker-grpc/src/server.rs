//! The subscriber side: the gRPC server answering `/Broker/Publish` (the local subscriptions and
//! one delivery to a handler are the http backend's, shared: [`broker_registry::endpoint`]).
//!
//! Statuses (Go Micro's server answers `Empty` even when the handler failed; we answer what
//! happened, so that the publisher can retry): OK handled and acked; `InvalidArgument` no topic;
//! `Unauthenticated` wrong shared secret; `NotFound` no subscription with that id on that topic
//! (the publisher forgets the node); `Internal` the handler failed or nacked; `Unavailable`
//! shutting down. tonic itself answers `Internal` to a body that is not a `Message`,
//! `OutOfRange` / `ResourceExhausted` to one over `max_message_bytes`, and `Unimplemented` to any
//! other method.

use std::convert::Infallible;
use std::sync::Weak;
use std::task::{Context, Poll};

use broker_core::Message;
use broker_registry::endpoint::Delivery;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service as TowerService, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

use crate::proto::{self, Empty};
use crate::{ATTEMPT_METADATA, Running, SECRET_METADATA, tls};

/// Serves `/Broker/Publish` on `listener` until `stop`, then lets open calls finish.
/// With an `acceptor`, every connection is TLS (the handshakes run beside the server, in
/// [`tls::accept_loop`](crate::tls)).
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: Option<tls::Acceptor>,
    running: Weak<Running>,
    max_message_bytes: usize,
    stop: CancellationToken,
) {
    let service = BrokerServer { running, max_message_bytes };
    let server = tonic::transport::Server::builder().add_service(service);
    let served = match acceptor {
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            server.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await
        }
        #[cfg(feature = "tls")]
        Some(acceptor) => {
            let (ready, connections) = tokio::sync::mpsc::channel::<tls::TlsConnection>(64);
            tokio::spawn(tls::accept_loop(listener, acceptor, ready, stop.clone()));
            let incoming = futures::stream::unfold(connections, |mut connections| async move {
                let connection = connections.recv().await?;
                Some((Ok::<_, std::io::Error>(connection), connections))
            });
            server.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await
        }
        #[cfg(not(feature = "tls"))]
        Some(never) => match never {},
    };
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
        running.peer.subscriptions.get(&message.id).into_iter().filter(|s| s.topic() == message.topic).collect();
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
        let dead_letter = |dlq: &str, message: &Message| running.outbox.try_publish(dlq, message);
        match subscription.deliver(&running.handlers, delivered.clone(), attempt, &dead_letter).await {
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
