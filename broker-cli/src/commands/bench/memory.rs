//! The memory backend has no client library: its baseline is a tokio mpsc channel per
//! subscriber, one reader task each, the same bodies sent to it. The channel holds as many
//! messages as ours' buffer does (the same settings): `--param buffer_size=N` when given, else
//! ours' default of 1,024 ([`DEFAULT_BUFFER_SIZE`]). (Until 2026-12-02 it was 65,536 whatever
//! ours had.) `BENCH_RAW_LIKE_OURS=1` (diagnosis) runs each delivery in a task of its own, as
//! ours does at `--concurrency` above 1. `BENCH_RAW_FLOOR=1` (one topic): publishes and
//! deliveries also go through what the contract costs ([`super::raw_floor`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use micro_broker::memory::{DEFAULT_BUFFER_SIZE, PARAM_BUFFER_SIZE};
use micro_broker::{BoxError, Message};
use tokio::sync::mpsc;

use super::{Outcome, Recorder, Sink, Workload, drive};

/// Capacity of each subscriber's channel: ours' effective buffer size.
fn capacity(workload: &Workload) -> Result<usize, BoxError> {
    match workload.param(PARAM_BUFFER_SIZE) {
        None => Ok(DEFAULT_BUFFER_SIZE),
        Some(value) => match value.trim().parse::<usize>() {
            // Clamped as ours clamps its buffer (the channel's semaphore has this limit too).
            Ok(n) if n > 0 => Ok(n.min(tokio::sync::Semaphore::MAX_PERMITS)),
            _ => Err(format!("{PARAM_BUFFER_SIZE}={value:?}: expected a positive number").into()),
        },
    }
}

struct Channels {
    senders: Vec<mpsc::Sender<Bytes>>,
    /// Queue groups: round robin over the members.
    next: AtomicU64,
    group: bool,
    /// Diagnosis (`BENCH_RAW_FLOOR=1`): each publish as the contract makes it.
    floor: bool,
}

impl Sink for Channels {
    async fn send(&self, _topic: usize, body: Bytes) -> Result<(), BoxError> {
        if self.floor {
            return super::publish_as_contract(body, |message| self.send_body(message.body)).await;
        }
        self.send_body(body).await
    }
}

impl Channels {
    /// `body` to the member whose turn it is (queue group), or to each subscriber.
    async fn send_body(&self, body: Bytes) -> Result<(), BoxError> {
        if self.group {
            let n = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.senders.len();
            let sender = self.senders.get(n).ok_or("no subscriber")?;
            return sender.send(body).await.map_err(|_| "the subscriber is gone".into());
        }
        for sender in &self.senders {
            sender.send(body.clone()).await.map_err(|_| "a subscriber is gone")?;
        }
        Ok(())
    }
}

/// One run over mpsc channels.
pub(crate) async fn run(workload: &Workload, recorder: Arc<Recorder>) -> Result<Outcome, BoxError> {
    let capacity = capacity(workload)?;
    // Diagnosis: the channels carry bodies only; the floor's events get the one topic (checked
    // before the runs, `raw_floor_refusal`).
    let floor = match (super::raw_floor(), workload.topics.as_slice()) {
        (true, [topic]) => Some(Arc::<str>::from(topic.as_str())),
        _ => None,
    };
    let mut senders = Vec::new();
    let mut readers = Vec::new();
    for s in 0..workload.subscribers {
        let (tx, mut rx) = mpsc::channel::<Bytes>(capacity);
        senders.push(tx);
        let (recorder, slot) = (Arc::clone(&recorder), workload.slot(s));
        let spawn_each = super::raw_like_ours();
        if let Some(topic) = &floor {
            let (floor, topic) = (super::Floor::new(&recorder, slot), Arc::clone(topic));
            readers.push(tokio::spawn(async move {
                while let Some(body) = rx.recv().await {
                    floor.deliver(&topic, Message::new(body)).await;
                }
            }));
            continue;
        }
        readers.push(tokio::spawn(async move {
            let mut handlers = tokio::task::JoinSet::new();
            while let Some(body) = rx.recv().await {
                if spawn_each {
                    // Diagnosis: a task per delivery, as our memory backend does.
                    let recorder = Arc::clone(&recorder);
                    handlers.spawn(async move { recorder.record(slot, &body) });
                    while handlers.try_join_next().is_some() {}
                } else {
                    recorder.record(slot, &body);
                }
            }
        }));
    }
    let sink = Arc::new(Channels {
        senders,
        next: AtomicU64::new(0),
        group: workload.queue.is_some(),
        floor: floor.is_some(),
    });
    let outcome = drive(Arc::clone(&sink), workload, &recorder).await;
    drop(sink);
    for reader in readers {
        reader.abort();
    }
    outcome
}
