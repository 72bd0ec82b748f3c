//! The conformance suite over the RabbitMQ backend: written with the backend.
