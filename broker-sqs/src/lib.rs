//! # broker-sqs (work in progress, not registered yet)
