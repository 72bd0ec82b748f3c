//! # broker-gcp-pubsub (work in progress, not registered yet)
