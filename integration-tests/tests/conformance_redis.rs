//! The conformance suite over the Redis backends (Pub/Sub and Streams): written with the backend.
