//! The http backend's baseline: a bare hyper 1 server (HTTP/1.1, TCP_NODELAY) that reads each
//! POSTed body and answers 200, and a keep-alive hyper-util client (TCP_NODELAY) that POSTs the
//! same bodies to it, `?id=<subscriber>` per subscriber (broadcast: to each; queue group: to one,
//! round robin), every response body drained so that connections are reused. `--window` is the
//! number of requests in flight per publisher (32 for the comparison in BENCHMARKS.md).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use micro_broker::BoxError;
use tokio::net::TcpListener;

use super::{Outcome, Recorder, Sink, Workload, drive};

struct Poster {
    client: Client<HttpConnector, Full<Bytes>>,
    /// One URI per subscriber: `http://addr/<topic index>?id=<subscriber>` needs the topic, so
    /// the topic goes into the path when the request is built.
    address: SocketAddr,
    subscribers: usize,
    group: bool,
    next: AtomicU64,
}

impl Poster {
    async fn post(&self, topic: usize, subscriber: usize, body: Bytes) -> Result<(), BoxError> {
        let uri = format!("http://{}/t{topic}?id={subscriber}", self.address);
        let request = Request::post(uri).header("content-type", "application/octet-stream").body(Full::new(body))?;
        let response = self.client.request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        if !status.is_success() {
            return Err(format!("the server answered {status}").into());
        }
        Ok(())
    }
}

impl Sink for Poster {
    async fn send(&self, topic: usize, body: Bytes) -> Result<(), BoxError> {
        if self.group {
            let n = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.subscribers;
            return self.post(topic, n, body).await;
        }
        for subscriber in 0..self.subscribers {
            self.post(topic, subscriber, body.clone()).await?;
        }
        Ok(())
    }
}

/// The subscriber number in `?id=N`.
fn subscriber_of(request: &Request<Incoming>) -> Option<usize> {
    let query = request.uri().query()?;
    query.split('&').find_map(|pair| pair.strip_prefix("id="))?.parse().ok()
}

/// One run: the server, the client, the workload.
pub(crate) async fn run(workload: &Workload, recorder: Arc<Recorder>) -> Result<Outcome, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let group = workload.queue.is_some();
    let server_recorder = Arc::clone(&recorder);
    let server = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let recorder = Arc::clone(&server_recorder);
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let recorder = Arc::clone(&recorder);
                async move {
                    let mut answer = Response::new(Empty::<Bytes>::new());
                    let slot = if group { Some(0) } else { subscriber_of(&request) };
                    match (slot, request.into_body().collect().await) {
                        (Some(slot), Ok(body)) => recorder.record(slot, &body.to_bytes()),
                        _ => *answer.status_mut() = StatusCode::BAD_REQUEST,
                    }
                    Ok::<_, Infallible>(answer)
                }
            });
            connections.spawn(async move {
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(connector);
    let sink = Arc::new(Poster { client, address, subscribers: workload.subscribers, group, next: AtomicU64::new(0) });
    let outcome = drive(sink, workload, &recorder).await;
    server.abort();
    outcome
}
