//! The memory backend has no client library: its baseline is a tokio mpsc channel per
//! subscriber (bounded, 65,536 messages), one reader task each, the same bodies sent to it.
//! `BENCH_RAW_LIKE_OURS=1` (diagnosis) runs each delivery in a task of its own, as ours does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use micro_broker::BoxError;
use tokio::sync::mpsc;

use super::{Outcome, Recorder, Sink, Workload, drive};

/// Capacity of each subscriber's channel.
const CAPACITY: usize = 65_536;

struct Channels {
    senders: Vec<mpsc::Sender<Bytes>>,
    /// Queue groups: round robin over the members.
    next: AtomicU64,
    group: bool,
}

impl Sink for Channels {
    async fn send(&self, _topic: usize, body: Bytes) -> Result<(), BoxError> {
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
    let mut senders = Vec::new();
    let mut readers = Vec::new();
    for s in 0..workload.subscribers {
        let (tx, mut rx) = mpsc::channel::<Bytes>(CAPACITY);
        senders.push(tx);
        let (recorder, slot) = (Arc::clone(&recorder), workload.slot(s));
        let spawn_each = super::raw_like_ours();
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
    let sink = Arc::new(Channels { senders, next: AtomicU64::new(0), group: workload.queue.is_some() });
    let outcome = drive(Arc::clone(&sink), workload, &recorder).await;
    drop(sink);
    for reader in readers {
        reader.abort();
    }
    outcome
}
