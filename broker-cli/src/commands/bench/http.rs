//! The http backend's baseline: a bare hyper 1 server (HTTP/1.1, TCP_NODELAY) that reads each
//! POSTed body and answers 200, and a keep-alive hyper-util client (TCP_NODELAY) that POSTs the
//! same bodies to it, `?id=<subscriber>` per subscriber (broadcast: to each; queue group: to one,
//! round robin), every response body drained so that connections are reused. `--window` is the
//! number of requests in flight per publisher (32 for the comparison in BENCHMARKS.md).
//! `BENCH_RAW_FLOOR=1`: publishes and deliveries also go through what the contract costs, and
//! the bodies are ours' wire format, Go Micro's envelope with the topic header
//! ([`super::raw_floor`]).

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
use micro_broker::http::wire::CURRENT_TOPIC_HEADER as TOPIC_HEADER;
use micro_broker::{BoxError, codec};
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
    /// Diagnosis (`BENCH_RAW_FLOOR=1`): the topics, for the envelope's topic header.
    floor: Option<Vec<String>>,
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

    /// `body` to the subscriber whose turn it is (queue group), or to each.
    async fn send_bodies(&self, topic: usize, body: Bytes) -> Result<(), BoxError> {
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

impl Sink for Poster {
    async fn send(&self, topic: usize, body: Bytes) -> Result<(), BoxError> {
        if let Some(topics) = &self.floor {
            let name = topics.get(topic).ok_or("no such topic")?;
            return super::publish_as_contract(body, |message| async move {
                self.send_bodies(topic, codec::encode_envelope(&message, Some((TOPIC_HEADER, name)))).await
            })
            .await;
        }
        self.send_bodies(topic, body).await
    }
}

/// The subscriber number in `?id=N`.
fn subscriber_of(request: &Request<Incoming>) -> Option<usize> {
    let query = request.uri().query()?;
    query.split('&').find_map(|pair| pair.strip_prefix("id="))?.parse().ok()
}

/// The topic index in the path `/t<index>`.
fn topic_of(request: &Request<Incoming>) -> Option<usize> {
    request.uri().path().strip_prefix("/t")?.parse().ok()
}

/// One run: the server, the client, the workload.
pub(crate) async fn run(workload: &Workload, recorder: Arc<Recorder>) -> Result<Outcome, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let group = workload.queue.is_some();
    let server_recorder = Arc::clone(&recorder);
    // Diagnosis (`BENCH_RAW_FLOOR=1`): the topics' names and each subscriber's handler.
    let floor = super::raw_floor().then(|| {
        let topics: Vec<Arc<str>> = workload.topics.iter().map(|t| t.as_str().into()).collect();
        let floors: Vec<super::Floor> =
            (0..workload.subscribers).map(|s| super::Floor::new(&recorder, workload.slot(s))).collect();
        Arc::new((topics, floors))
    });
    let server_floor = floor.clone();
    let server = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (recorder, floor) = (Arc::clone(&server_recorder), server_floor.clone());
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (recorder, floor) = (Arc::clone(&recorder), floor.clone());
                async move {
                    let mut answer = Response::new(Empty::<Bytes>::new());
                    let slot = if group { Some(0) } else { subscriber_of(&request) };
                    let floor = floor.as_ref().and_then(|floors| Some((floors, topic_of(&request)?)));
                    match (slot, request.into_body().collect().await) {
                        (Some(slot), Ok(body)) => match floor {
                            None => recorder.record(slot, &body.to_bytes()),
                            Some((shared, topic)) => {
                                let (topics, floors) = &**shared;
                                let decoded = codec::decode_envelope(&body.to_bytes());
                                match (topics.get(topic), floors.get(slot), decoded) {
                                    (Some(topic), Some(floor), Ok(message)) => floor.deliver(topic, message).await,
                                    _ => *answer.status_mut() = StatusCode::BAD_REQUEST,
                                }
                            }
                        },
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
    let floor = floor.map(|_| workload.topics.clone());
    let sink =
        Arc::new(Poster { client, address, subscribers: workload.subscribers, group, next: AtomicU64::new(0), floor });
    let outcome = drive(sink, workload, &recorder).await;
    server.abort();
    outcome
}
