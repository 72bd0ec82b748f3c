//! The in-process registry: brokers of one process find each other.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::common::{group_by_version, lock, split_nodes, validate_for_register, validate_name};
use crate::{Action, Registry, Result, Service, SharedRegistry, WatchEvent, Watcher};

/// An in-process registry.
///
/// TTLs are honoured: an expired node disappears from [`get_service`](Registry::get_service) and
/// its watchers see a [`Action::Delete`]. A zero TTL never expires. Clones share the same state.
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// service name → node id → the one-node entry.
    services: HashMap<String, HashMap<String, Entry>>,
    /// The entries that expire, soonest first, as `(expiry, sequence) → (service name, node id)`:
    /// reaping and the next expiry look at the front only (a walk over every service on each
    /// call made lookups cost O(services): with 10,000 topics, most of a publisher's time).
    expiries: BTreeMap<ExpiryKey, (String, String)>,
    /// Makes expiry keys unique.
    sequence: u64,
    watchers: Vec<mpsc::UnboundedSender<WatchEvent>>,
}

/// An entry's place in [`State::expiries`].
type ExpiryKey = (Instant, u64);

struct Entry {
    service: Service,
    /// `None`: never expires.
    expiry: Option<ExpiryKey>,
}

impl MemoryRegistry {
    /// A new, empty registry of its own.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide instance: every caller gets the same registry, so brokers created
    /// anywhere in the process find each other. `MICRO_REGISTRY=memory` selects it.
    pub fn global() -> SharedRegistry {
        static GLOBAL: OnceLock<SharedRegistry> = OnceLock::new();
        GLOBAL.get_or_init(|| Arc::new(MemoryRegistry::new())).clone()
    }
}

impl fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.inner.state);
        f.debug_struct("MemoryRegistry")
            .field("services", &state.services.len())
            .field("nodes", &state.services.values().map(HashMap::len).sum::<usize>())
            .field("watchers", &state.watchers.len())
            .finish()
    }
}

impl State {
    fn emit(&mut self, action: Action, service: &Service) {
        let event = WatchEvent { action, service: service.clone() };
        self.watchers.retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Stores the entry of node `id` of `name`, replacing the one it had.
    fn insert(&mut self, name: &str, id: String, service: Service, expires: Option<Instant>) -> Action {
        let expiry = expires.map(|at| {
            self.sequence += 1;
            self.expiries.insert((at, self.sequence), (name.to_owned(), id.clone()));
            (at, self.sequence)
        });
        let old = self.services.entry(name.to_owned()).or_default().insert(id, Entry { service, expiry });
        match old {
            Some(old) => {
                if let Some(key) = old.expiry {
                    self.expiries.remove(&key);
                }
                Action::Update
            }
            None => Action::Create,
        }
    }

    /// Removes the entry of node `id` of `name`.
    fn remove(&mut self, name: &str, id: &str) -> Option<Service> {
        let nodes = self.services.get_mut(name)?;
        let entry = nodes.remove(id)?;
        if nodes.is_empty() {
            self.services.remove(name);
        }
        if let Some(key) = entry.expiry {
            self.expiries.remove(&key);
        }
        Some(entry.service)
    }

    /// Removes expired entries, telling the watchers.
    fn reap(&mut self, now: Instant) {
        while let Some(first) = self.expiries.first_entry() {
            if first.key().0 > now {
                break;
            }
            let (name, id) = first.remove();
            if let Some(service) = self.remove(&name, &id) {
                self.emit(Action::Delete, &service);
            }
        }
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.expiries.keys().next().map(|(at, _)| *at)
    }
}

impl Inner {
    fn reap(&self) {
        lock(&self.state).reap(Instant::now());
    }

    fn next_expiry(&self) -> Option<Instant> {
        lock(&self.state).next_expiry()
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, service: &Service, ttl: Duration) -> Result<()> {
        validate_for_register(service)?;
        let now = Instant::now();
        // A TTL too large to represent never expires, like a zero one.
        let expires = if ttl.is_zero() { None } else { now.checked_add(ttl) };
        let mut state = lock(&self.inner.state);
        state.reap(now);
        for entry in split_nodes(service) {
            let id = entry.nodes.first().map(|node| node.id.clone()).unwrap_or_default();
            let action = state.insert(&service.name, id, entry.clone(), expires);
            state.emit(action, &entry);
        }
        Ok(())
    }

    async fn deregister(&self, service: &Service) -> Result<()> {
        validate_name(&service.name)?;
        let mut state = lock(&self.inner.state);
        state.reap(Instant::now());
        let mut removed = Vec::new();
        for node in &service.nodes {
            let same_version = state
                .services
                .get(&service.name)
                .and_then(|nodes| nodes.get(&node.id))
                .is_some_and(|entry| entry.service.version == service.version);
            if same_version {
                removed.extend(state.remove(&service.name, &node.id));
            }
        }
        for entry in removed {
            state.emit(Action::Delete, &entry);
        }
        Ok(())
    }

    async fn get_service(&self, name: &str) -> Result<Vec<Service>> {
        validate_name(name)?;
        let mut state = lock(&self.inner.state);
        state.reap(Instant::now());
        let entries: Vec<Service> = state
            .services
            .get(name)
            .map(|nodes| nodes.values().map(|entry| entry.service.clone()).collect())
            .unwrap_or_default();
        Ok(group_by_version(entries))
    }

    async fn watch(&self, name: Option<&str>) -> Result<Watcher> {
        if let Some(name) = name {
            validate_name(name)?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut state = lock(&self.inner.state);
            state.reap(Instant::now());
            state.watchers.push(tx);
        }
        let watch = MemoryWatch { rx, inner: Arc::downgrade(&self.inner), name: name.map(str::to_owned) };
        Ok(Box::pin(futures::stream::unfold(watch, MemoryWatch::next)))
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

/// One watcher's state. It also drives TTL expiry: while it waits, it wakes at the next expiry
/// and reaps, so expiries reach every watcher without a background task.
struct MemoryWatch {
    rx: mpsc::UnboundedReceiver<WatchEvent>,
    inner: Weak<Inner>,
    name: Option<String>,
}

impl MemoryWatch {
    async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            let deadline = self.inner.upgrade().and_then(|inner| inner.next_expiry());
            let received = match deadline {
                Some(deadline) => tokio::select! {
                    received = self.rx.recv() => received,
                    () = tokio::time::sleep_until(deadline) => {
                        if let Some(inner) = self.inner.upgrade() {
                            inner.reap();
                        }
                        continue;
                    }
                },
                None => self.rx.recv().await,
            };
            // `None`: the registry was dropped, which closes every watcher.
            let event = received?;
            if self.name.as_deref().is_none_or(|name| name == event.service.name) {
                return Some((Ok(event), self));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Node;
    use futures::StreamExt;

    fn service(name: &str, version: &str, id: &str) -> Service {
        Service::new(name, version).with_node(Node::new(id, format!("127.0.0.1:{}", id.len())).with_metadata("k", "v"))
    }

    async fn next_event(watcher: &mut Watcher) -> WatchEvent {
        match tokio::time::timeout(Duration::from_secs(5), watcher.next()).await {
            Ok(Some(Ok(event))) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn register_lookup_deregister() {
        let registry = MemoryRegistry::new();
        assert!(registry.get_service("s").await.unwrap().is_empty());
        registry.register(&service("s", "v1", "a"), Duration::from_secs(60)).await.unwrap();
        registry.register(&service("s", "v1", "b"), Duration::from_secs(60)).await.unwrap();
        registry.register(&service("s", "v2", "c"), Duration::ZERO).await.unwrap();
        registry.register(&service("other", "v1", "d"), Duration::ZERO).await.unwrap();
        let found = registry.get_service("s").await.unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].version, "v1");
        assert_eq!(found[0].nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(found[1].nodes, service("s", "v2", "c").nodes);

        // A deregister naming another version removes nothing.
        registry.deregister(&service("s", "v2", "a")).await.unwrap();
        assert_eq!(registry.get_service("s").await.unwrap()[0].nodes.len(), 2);
        registry.deregister(&service("s", "v1", "a")).await.unwrap();
        let found = registry.get_service("s").await.unwrap();
        assert_eq!(found[0].nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["b"]);
        assert!(registry.register(&Service::new("s", "v"), Duration::ZERO).await.is_err());
        assert_eq!(registry.name(), "memory");
    }

    #[tokio::test]
    async fn watch_sees_create_update_delete_filtered_by_name() {
        let registry = MemoryRegistry::new();
        let mut all = registry.watch(None).await.unwrap();
        let mut only_s = registry.watch(Some("s")).await.unwrap();
        registry.register(&service("other", "v", "x"), Duration::ZERO).await.unwrap();
        registry.register(&service("s", "v", "a"), Duration::ZERO).await.unwrap();
        registry.register(&service("s", "v", "a"), Duration::ZERO).await.unwrap();
        registry.deregister(&service("s", "v", "a")).await.unwrap();

        let event = next_event(&mut all).await;
        assert_eq!((event.action, event.service.name.as_str()), (Action::Create, "other"));
        for expected in [Action::Create, Action::Update, Action::Delete] {
            let event = next_event(&mut all).await;
            assert_eq!(event.action, expected);
            assert_eq!(event.service, service("s", "v", "a"));
            let event = next_event(&mut only_s).await;
            assert_eq!(event.action, expected);
            assert_eq!(event.service, service("s", "v", "a"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_expiry_hides_node_and_emits_delete() {
        let registry = MemoryRegistry::new();
        let mut watcher = registry.watch(Some("s")).await.unwrap();
        registry.register(&service("s", "v", "short"), Duration::from_secs(2)).await.unwrap();
        registry.register(&service("s", "v", "long"), Duration::from_secs(5)).await.unwrap();
        assert_eq!(next_event(&mut watcher).await.action, Action::Create);
        assert_eq!(next_event(&mut watcher).await.action, Action::Create);

        tokio::time::sleep(Duration::from_secs(1)).await;
        // A heartbeat refreshes the TTL.
        registry.register(&service("s", "v", "short"), Duration::from_secs(2)).await.unwrap();
        assert_eq!(next_event(&mut watcher).await.action, Action::Update);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(registry.get_service("s").await.unwrap()[0].nodes.len(), 2, "refreshed node still alive");

        let started = Instant::now();
        let event = next_event(&mut watcher).await;
        assert_eq!((event.action, event.service.nodes[0].id.as_str()), (Action::Delete, "short"));
        assert!(started.elapsed() <= Duration::from_secs(1), "deleted at its expiry, {:?}", started.elapsed());
        let found = registry.get_service("s").await.unwrap();
        assert_eq!(found[0].nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["long"]);

        let event = next_event(&mut watcher).await;
        assert_eq!((event.action, event.service.nodes[0].id.as_str()), (Action::Delete, "long"));
        assert!(registry.get_service("s").await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_latest_registration_of_a_node_sets_its_expiry() {
        let registry = MemoryRegistry::new();
        // Registered with a TTL, then again without one: the first TTL no longer applies.
        registry.register(&service("s", "v", "a"), Duration::from_secs(1)).await.unwrap();
        registry.register(&service("s", "v", "a"), Duration::ZERO).await.unwrap();
        // Deregistered while its TTL ran, then registered again without one.
        registry.register(&service("s", "v", "b"), Duration::from_secs(1)).await.unwrap();
        registry.deregister(&service("s", "v", "b")).await.unwrap();
        registry.register(&service("s", "v", "b"), Duration::ZERO).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let found = registry.get_service("s").await.unwrap();
        let mut ids: Vec<&str> = found[0].nodes.iter().map(|n| n.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        assert!(lock(&registry.inner.state).expiries.is_empty(), "no expiry left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_nodes_vanish_without_watchers() {
        let registry = MemoryRegistry::new();
        registry.register(&service("s", "v", "a"), Duration::from_secs(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1001)).await;
        assert!(registry.get_service("s").await.unwrap().is_empty());
        // Registering again after expiry is a Create.
        let mut watcher = registry.watch(None).await.unwrap();
        registry.register(&service("s", "v", "a"), Duration::from_secs(1)).await.unwrap();
        assert_eq!(next_event(&mut watcher).await.action, Action::Create);
    }

    #[tokio::test]
    async fn global_is_one_instance_and_dropping_a_registry_ends_watchers() {
        let a = MemoryRegistry::global();
        let b = MemoryRegistry::global();
        a.register(&service("memory-global-test", "v", "n"), Duration::from_secs(60)).await.unwrap();
        assert_eq!(b.get_service("memory-global-test").await.unwrap().len(), 1);
        a.deregister(&service("memory-global-test", "v", "n")).await.unwrap();

        let own = MemoryRegistry::new();
        let mut watcher = own.watch(None).await.unwrap();
        drop(own);
        let end = tokio::time::timeout(Duration::from_secs(5), watcher.next()).await.unwrap();
        assert!(end.is_none());
    }
}
