//! The subscriber side: the HTTP endpoint that receives deliveries and runs handlers.
//!
//! Statuses (Go Micro answers 200 to almost everything; we answer what happened, so that the
//! publisher can retry): 200 handled and acked; 400 malformed body; 401 wrong shared secret;
//! 404 no subscription with that id (the publisher forgets the node); 405 not a POST; 413 body
//! over the limit (refused from `Content-Length` before reading, or once the limit is crossed);
//! 500 the handler failed or nacked; 503 shutting down.

use std::convert::Infallible;
use std::sync::Weak;
use std::time::Duration;

use broker_registry::endpoint::Delivery;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Running, SECRET_HEADER, tls, wire};

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
    let mut decoded = match wire::decode(&body) {
        Ok(decoded) => decoded,
        Err(error) => return status(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    let query = Query::parse(parts.uri.query());
    let subscriptions: Vec<_> =
        running.peer.subscriptions.get(&query.id).into_iter().filter(|s| s.topic() == decoded.topic).collect();
    if subscriptions.is_empty() {
        return status(
            StatusCode::NOT_FOUND,
            &format!("no subscription with id {:?} on topic {:?} here", query.id, decoded.topic),
        );
    }
    let mut failures = Vec::new();
    let mut handled = 0;
    let mut subscriptions = subscriptions.into_iter().peekable();
    while let Some(subscription) = subscriptions.next() {
        let dead_letter = |dlq: &str, message: &broker_core::Message| running.outbox.try_publish(dlq, message);
        // The last (usually the only) subscription takes the message itself.
        let message =
            if subscriptions.peek().is_some() { decoded.message.clone() } else { std::mem::take(&mut decoded.message) };
        match subscription.deliver(&running.handlers, message, query.attempt, &dead_letter).await {
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

pub(crate) struct Query<'a> {
    /// Borrowed from the request unless it had to be percent-decoded.
    id: std::borrow::Cow<'a, str>,
    attempt: u32,
}

impl<'a> Query<'a> {
    pub(crate) fn parse(query: Option<&'a str>) -> Query<'a> {
        let mut parsed = Query { id: std::borrow::Cow::Borrowed(""), attempt: 1 };
        for pair in query.unwrap_or("").split('&') {
            // Our publishers' pairs need no decoding; an escaped one goes through the full decoder.
            // (A byte scan: `contains(['%', '+'])` decodes every char first.)
            let (key, value) = if pair.bytes().any(|b| b == b'%' || b == b'+') {
                match form_urlencoded::parse(pair.as_bytes()).next() {
                    Some(decoded) => decoded,
                    None => continue,
                }
            } else {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (std::borrow::Cow::Borrowed(key), std::borrow::Cow::Borrowed(value))
            };
            match key.as_ref() {
                "id" => parsed.id = value,
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
        assert_eq!((q.id.as_ref(), q.attempt), ("", 1));
        let q = Query::parse(Some("attempt=2&i%64=a+b%2Bc&id2=x&=&&flag"));
        assert_eq!((q.id.as_ref(), q.attempt), ("a b+c", 2));
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
