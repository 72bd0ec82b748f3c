//! [`RunningState`]: what a networked backend holds while connected, readable without waiting.

use std::fmt;
use std::sync::{Arc, RwLock};

use crate::{Error, Result};

/// The state a backend builds in `connect()` and drops in `disconnect()` (its connections,
/// subscriptions, tasks), shared with every publish and subscribe: `None` while disconnected.
///
/// Reading clones an `Arc` under a read lock, so publishes never wait for each other; a poisoned
/// lock (a panic while it was held) is recovered, since the `Option` is always whole. Backends
/// serialise `connect()` / `disconnect()` themselves and publish the result here.
///
/// ```
/// use broker_core::RunningState;
/// let state: RunningState<String> = RunningState::new();
/// assert!(state.connected("demo").is_err());
/// state.set(std::sync::Arc::new("connection".to_string()));
/// assert_eq!(state.connected("demo").unwrap().as_str(), "connection");
/// assert!(state.clear().is_some());
/// assert!(state.get().is_none());
/// ```
pub struct RunningState<T> {
    current: RwLock<Option<Arc<T>>>,
}

impl<T> RunningState<T> {
    /// Disconnected.
    pub const fn new() -> Self {
        RunningState { current: RwLock::new(None) }
    }

    /// The state, if connected.
    pub fn get(&self) -> Option<Arc<T>> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The state, or [`ErrorKind::NotConnected`](crate::ErrorKind::NotConnected) naming `backend`.
    pub fn connected(&self, backend: &str) -> Result<Arc<T>> {
        self.get().ok_or_else(|| Error::not_connected(backend))
    }

    /// Whether connected.
    pub fn is_connected(&self) -> bool {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).is_some()
    }

    /// Publishes the state of a new connection.
    pub fn set(&self, state: Arc<T>) {
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(state);
    }

    /// Back to disconnected; returns what was there.
    pub fn clear(&self) -> Option<Arc<T>> {
        self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }

    /// Takes the state without locking, for `Drop` of the struct that owns it.
    pub fn take(&mut self) -> Option<Arc<T>> {
        self.current.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }
}

impl<T> Default for RunningState<T> {
    fn default() -> Self {
        RunningState::new()
    }
}

impl<T> fmt::Debug for RunningState<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningState").field("connected", &self.is_connected()).finish()
    }
}
