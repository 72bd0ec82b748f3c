//! The conformance suite over the NATS backend (core and JetStream): written with the backend.
