//! [`Capabilities`]: what a backend really does, and the one check that rejects what it does not.

use std::fmt;

use crate::error::{Error, Result};
use crate::options::{PublishOptions, SubscribeOptions};

/// What a backend really does. Read by the conformance suite to decide which cases apply, and by
/// [`check_subscribe`](Capabilities::check_subscribe) / [`check_publish`](Capabilities::check_publish)
/// to reject options before any I/O.
///
/// ```
/// use broker_core::{Capabilities, PublishOptions};
/// use std::time::Duration;
/// let caps = Capabilities { delayed_delivery: false, ..Capabilities::NONE };
/// let err = caps.check_publish("memory", &PublishOptions::new().with_delay(Duration::from_secs(1))).unwrap_err();
/// assert_eq!(err.kind(), broker_core::ErrorKind::Unsupported);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// Queue groups: each message goes to one member of each group.
    pub queue_groups: bool,
    /// Messages are kept: a subscriber that arrives later still reads messages published before it.
    pub persistence: bool,
    /// A message published while its topic has no subscriber waits (in a bounded buffer of the
    /// publisher) and goes to the first subscriber that appears, as Go Micro's HTTP inbox does.
    /// Weaker than `persistence`: what a subscriber received is not kept for later ones.
    pub backlog: bool,
    /// Messages with the same ordering key (and, with no key, from one publisher) arrive in publish order
    /// at a subscription with concurrency 1.
    pub ordering: bool,
    /// A nacked (or failed) message is delivered again, and `max_redeliveries` is honoured.
    pub redelivery: bool,
    /// Delivery can be delayed by a publish option.
    pub delayed_delivery: bool,
    /// Headers travel natively (not inside an envelope in the body).
    pub native_headers: bool,
    /// TLS options are honoured.
    pub tls: bool,
}

impl Capabilities {
    /// A backend that does none of the optional things.
    pub const NONE: Capabilities = Capabilities {
        queue_groups: false,
        persistence: false,
        backlog: false,
        ordering: false,
        redelivery: false,
        delayed_delivery: false,
        native_headers: false,
        tls: false,
    };

    /// Rejects subscribe options that `backend` cannot honour, naming the option.
    pub fn check_subscribe(&self, backend: &str, options: &SubscribeOptions) -> Result<()> {
        options.validate()?;
        if options.queue.is_some() && !self.queue_groups {
            return Err(Error::unsupported(
                backend,
                "queue",
                "this backend has no queue groups; subscribe without one (broadcast)",
            ));
        }
        if options.max_redeliveries.is_some() && !self.redelivery {
            return Err(Error::unsupported(
                backend,
                "max_redeliveries",
                "this backend does not redeliver nacked messages; use a retry layer or a backend with redelivery",
            ));
        }
        Ok(())
    }

    /// Rejects publish options that `backend` cannot honour, naming the option.
    pub fn check_publish(&self, backend: &str, options: &PublishOptions) -> Result<()> {
        if options.ordering_key.is_some() && !self.ordering {
            return Err(Error::unsupported(backend, "ordering_key", "this backend does not order messages by key"));
        }
        if options.delay.is_some() && !self.delayed_delivery {
            return Err(Error::unsupported(
                backend,
                "delay",
                "this backend delivers immediately; it has no delayed delivery",
            ));
        }
        Ok(())
    }

    /// The names of the capabilities that are on, in declaration order.
    pub fn names(&self) -> Vec<&'static str> {
        [
            ("queue_groups", self.queue_groups),
            ("persistence", self.persistence),
            ("backlog", self.backlog),
            ("ordering", self.ordering),
            ("redelivery", self.redelivery),
            ("delayed_delivery", self.delayed_delivery),
            ("native_headers", self.native_headers),
            ("tls", self.tls),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::time::Duration;

    const ALL: Capabilities = Capabilities {
        queue_groups: true,
        persistence: true,
        backlog: true,
        ordering: true,
        redelivery: true,
        delayed_delivery: true,
        native_headers: true,
        tls: true,
    };

    #[test]
    fn everything_passes_when_everything_is_supported() {
        let sub = SubscribeOptions::new().with_queue("g").with_max_redeliveries(3);
        assert!(ALL.check_subscribe("x", &sub).is_ok());
        let publish = PublishOptions::new().with_ordering_key("k").with_delay(Duration::from_secs(1));
        assert!(ALL.check_publish("x", &publish).is_ok());
    }

    #[test]
    fn each_unsupported_option_is_named() {
        let none = Capabilities::NONE;
        let cases: Vec<(Result<()>, &str)> = vec![
            (none.check_subscribe("redis", &SubscribeOptions::new().with_queue("g")), "`queue`"),
            (none.check_subscribe("redis", &SubscribeOptions::new().with_max_redeliveries(1)), "`max_redeliveries`"),
            (none.check_publish("redis", &PublishOptions::new().with_ordering_key("k")), "`ordering_key`"),
            (none.check_publish("redis", &PublishOptions::new().with_delay(Duration::from_millis(1))), "`delay`"),
        ];
        for (result, option) in cases {
            let err = result.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unsupported);
            assert!(err.to_string().contains(option) && err.to_string().contains("redis"), "{err}");
        }
        // Broadcast with defaults is always fine.
        assert!(none.check_subscribe("redis", &SubscribeOptions::new()).is_ok());
        assert!(none.check_publish("redis", &PublishOptions::new().with_header("a", "b")).is_ok());
    }

    #[test]
    fn invalid_before_unsupported() {
        let err = Capabilities::NONE.check_subscribe("x", &SubscribeOptions::new().with_concurrency(0)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn names_and_display() {
        assert!(Capabilities::NONE.names().is_empty());
        assert_eq!(
            Capabilities { queue_groups: true, tls: true, ..Capabilities::NONE }.to_string(),
            "queue_groups, tls"
        );
    }
}
