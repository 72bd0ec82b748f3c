//! The user service: registers users and publishes one `user.registered` event for each.

use micro_broker::{Broker, BrokerExt, PublishOptions};

use super::{RUN_HEADER, User};
use crate::error::CliError;
use crate::output::say;

const PEOPLE: &[(&str, &str)] = &[
    ("Ada", "Lovelace"),
    ("Grace", "Hopper"),
    ("Alan", "Turing"),
    ("Barbara", "Liskov"),
    ("Edsger", "Dijkstra"),
    ("Margaret", "Hamilton"),
    ("Donald", "Knuth"),
    ("Frances", "Allen"),
    ("Ken", "Thompson"),
    ("Radia", "Perlman"),
];

/// `count` users with ids 1..=count; names repeat with a number after the first round.
pub(crate) fn new_users(count: u64) -> Vec<User> {
    (1..=count)
        .zip(PEOPLE.iter().cycle())
        .map(|(id, (first, last))| {
            let round = (id - 1) / PEOPLE.len() as u64;
            let handle =
                if round == 0 { first.to_lowercase() } else { format!("{}{}", first.to_lowercase(), round + 1) };
            User { id, name: format!("{first} {last}"), email: format!("{handle}@example.com") }
        })
        .collect()
}

/// Publishes one `user.registered` event per user to `topic`, as JSON, tagged with the run id.
/// Returns how many it published; stops at the first error.
pub(crate) async fn publish(broker: &dyn Broker, topic: &str, users: &[User], run_id: &str) -> Result<usize, CliError> {
    let options = PublishOptions::new().with_header(RUN_HEADER, run_id);
    for user in users {
        broker.publish_json(topic, user, options.clone()).await?;
        say!("user-service: registered {} <{}> (user {}), published the event", user.name, user.email, user.id);
    }
    Ok(users.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_unique() {
        let users = new_users(25);
        assert_eq!(users.len(), 25);
        assert_eq!(users[0], User { id: 1, name: "Ada Lovelace".into(), email: "ada@example.com".into() });
        assert_eq!(users[10].email, "ada2@example.com");
        let mut emails: Vec<_> = users.iter().map(|u| u.email.as_str()).collect();
        emails.sort_unstable();
        emails.dedup();
        assert_eq!(emails.len(), 25);
    }
}
