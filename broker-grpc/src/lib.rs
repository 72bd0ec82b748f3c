//! # broker-grpc (work in progress, not registered yet)
