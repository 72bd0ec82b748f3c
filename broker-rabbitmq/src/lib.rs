//! Work in progress: see the crate docs when it lands.
#![deny(missing_docs)]
