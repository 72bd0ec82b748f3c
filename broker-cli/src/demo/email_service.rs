//! The email service: subscribes to the run's `user.registered` topic and "sends" a welcome email
//! per user. In the two-process demo it is its own process ([`run_as_process`]).

use std::collections::HashSet;
use std::time::Duration;

use micro_broker::{Broker, BrokerExt, Event, SubscribeOptions, Subscriber};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::process::{READY, REPORT};
use super::{DUPLICATE_GRACE, Deliveries, DemoArgs, RUN_HEADER, User, topic, user_service};
use crate::error::CliError;
use crate::output::say;

/// The queue group the email service joins where the backend has queue groups, so that several
/// instances share the work (Go Micro services subscribe with their service name as the queue).
const QUEUE: &str = "email-service";

/// A running email service: its subscription, the user ids it welcomed, and their counts.
pub(crate) struct EmailService {
    subscription: Box<dyn Subscriber>,
    welcomed: mpsc::UnboundedReceiver<u64>,
    counts: Deliveries,
}

impl EmailService {
    /// Subscribes to `topic`; events of other runs than `run_id` are ignored.
    pub(crate) async fn start(broker: &dyn Broker, topic: &str, run_id: &str) -> Result<Self, CliError> {
        let (welcomed_tx, welcomed) = mpsc::unbounded_channel();
        let mut options = SubscribeOptions::new();
        if broker.capabilities().queue_groups {
            options = options.with_queue(QUEUE);
        }
        let run_id = run_id.to_string();
        let subscription = broker
            .subscribe_json(
                topic,
                move |user: User, event: Event| {
                    let welcomed = welcomed_tx.clone();
                    let ours = event.message().header(RUN_HEADER) == Some(run_id.as_str());
                    async move {
                        if ours {
                            say!("email-service: sent welcome email to {} (user {})", user.email, user.id);
                            // The receiver lives as long as the subscription: it is dropped after
                            // unsubscribing.
                            let _ = welcomed.send(user.id);
                        }
                        Ok(())
                    }
                },
                options,
            )
            .await?;
        let whereabouts = crate::commands::subscribe::whereabouts(subscription.as_ref(), broker);
        say!("email-service: subscribed to {topic}{whereabouts}");
        Ok(EmailService { subscription, welcomed, counts: Deliveries::new() })
    }

    /// Counts welcome emails per user id until every user in `users` got one or `timeout`
    /// passed, then for `grace` more (to see duplicates).
    pub(crate) async fn wait_for(&mut self, users: &[User], timeout: Duration, grace: Duration) {
        let mut waiting: HashSet<u64> = users.iter().map(|u| u.id).collect();
        waiting.retain(|id| !self.counts.contains_key(id));
        let deadline = Instant::now() + timeout;
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, self.welcomed.recv()).await {
                Ok(Some(id)) => {
                    waiting.remove(&id);
                    *self.counts.entry(id).or_default() += 1;
                }
                Ok(None) | Err(_) => return,
            }
        }
        let grace_end = Instant::now() + grace;
        while let Ok(Some(id)) = tokio::time::timeout_at(grace_end, self.welcomed.recv()).await {
            *self.counts.entry(id).or_default() += 1;
        }
    }

    /// Unsubscribes (which waits for running handlers), and returns the counts, those handlers'
    /// deliveries included.
    pub(crate) async fn stop(mut self) -> Result<Deliveries, CliError> {
        self.subscription.unsubscribe().await?;
        while let Ok(id) = self.welcomed.try_recv() {
            *self.counts.entry(id).or_default() += 1;
        }
        Ok(self.counts)
    }
}

/// `broker demo --role email-service --run-id ID`: the email service as its own process, started
/// by the user service. On standard output, besides its welcome emails, it says [`READY`] once
/// subscribed and, at the end, [`REPORT`] followed by its counts as JSON (`{"<user id>": n}`).
pub(crate) async fn run_as_process(broker: &dyn Broker, args: &DemoArgs, run_id: &str) -> Result<(), CliError> {
    let users = user_service::new_users(args.users);
    let mut service = EmailService::start(broker, &topic(run_id), run_id).await?;
    say!("{READY}");
    service.wait_for(&users, args.timeout, DUPLICATE_GRACE).await;
    let deliveries = service.stop().await?;
    let report = serde_json::to_string(&deliveries)
        .map_err(|e| CliError::Failed(format!("cannot encode the email service's report: {e}")))?;
    say!("{REPORT}{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use micro_broker::{MemoryBroker, Message, PublishOptions};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_its_run_and_ignores_others() {
        let broker = MemoryBroker::new();
        broker.connect().await.unwrap();
        let users = user_service::new_users(2);
        let mut service = EmailService::start(&broker, "t", "run1").await.unwrap();
        for (user, run) in [(&users[0], "run1"), (&users[1], "other"), (&users[1], "run1"), (&users[1], "run1")] {
            let message = Message::json(user).unwrap().with_header(RUN_HEADER, run);
            broker.publish("t", message, PublishOptions::new()).await.unwrap();
        }
        service.wait_for(&users, Duration::from_secs(5), Duration::from_millis(100)).await;
        let counts = service.stop().await.unwrap();
        assert_eq!(counts, [(1, 1), (2, 2)].into_iter().collect::<Deliveries>());
        broker.disconnect().await.unwrap();
    }
}
