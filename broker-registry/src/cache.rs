//! A registry cache kept fresh by one background watch, as Go Micro's `registry/cache`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::common::{group_by_version, lock, validate_name};
use crate::{Action, Result, Service, SharedRegistry, WatchEvent};

/// How long a cached lookup is trusted without a re-lookup, even while the watch runs (Go Micro's
/// `cache.DefaultTTL`).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);

/// First and largest pause before the background watch is started again after it broke.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How long [`Cache::forget_node`] first hides a node; each failure after that hiding ended (and
/// before the node registers again) doubles it, up to [`FORGET_MAX`]. Bounded because a node
/// that failed once (a request timed out) may be the only one of its queue group: hidden until
/// its next heartbeat (30 s by default), its topic got nothing meanwhile.
const FORGET_FIRST: Duration = Duration::from_secs(1);
const FORGET_MAX: Duration = Duration::from_secs(30);

/// Keeps [`get_service`](Cache::get_service) answers in memory, fresh by ONE background watch of
/// every service of the registry.
///
/// - The first lookup of a name reads the registry; later ones are answered from memory while
///   the watch runs and the entry is younger than the TTL ([`DEFAULT_CACHE_TTL`]). While the watch
///   is down, lookups read through (and fall back to the last answer if the registry fails).
/// - The watch is restarted with backoff when it breaks, and the cached names are looked up again.
/// - [`changes`](Cache::changes) is a generation counter bumped on every registry change seen.
/// - [`forget_node`](Cache::forget_node) hides a node that failed for a while (1 s, doubling with
///   each further failure up to 30 s), or until it is registered again.
///
/// The background task stops when the `Cache` is dropped. It is spawned on the Tokio runtime
/// current at [`Cache::new`] (or at the first lookup, if there was none).
pub struct Cache {
    inner: Arc<Inner>,
    task: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    registry: SharedRegistry,
    ttl: Duration,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// `(service name, node id)` of nodes that failed, hidden until registered again or until
    /// their hiding ends (kept after that, so that the next failure hides the node longer).
    forgotten: HashMap<(String, String), Forgotten>,
    /// Whether the background watch is running, so that entries are kept fresh.
    watching: bool,
    /// Counts the starts of the background watch (see [`Entry::watch`]).
    watch_started: u64,
    /// Lookups under way, per name: how many, and the events seen meanwhile (replayed on top of
    /// the lookup's answer, which may predate them).
    in_flight: HashMap<String, (usize, Vec<WatchEvent>)>,
}

struct Entry {
    services: Vec<Service>,
    fetched: Instant,
    /// [`State::watch_started`] when its lookup began. Only an entry looked up while the current
    /// watch already ran is kept fresh by it: one read before the watch's own first look at the
    /// registry may miss a change made in between, of which the watch sends no event.
    watch: u64,
}

/// A node [`Cache::forget_node`] was told about.
#[derive(Debug, Clone, Copy)]
struct Forgotten {
    hidden_until: Instant,
    /// Failures that started a hiding, since the node last registered.
    strikes: u32,
}

impl Cache {
    /// A cache over `registry` with the default TTL.
    pub fn new(registry: SharedRegistry) -> Arc<Cache> {
        Self::with_ttl(registry, DEFAULT_CACHE_TTL)
    }

    /// A cache over `registry` whose entries are looked up again after `ttl`.
    pub fn with_ttl(registry: SharedRegistry, ttl: Duration) -> Arc<Cache> {
        let cache = Cache {
            inner: Arc::new(Inner { registry, ttl, state: Mutex::new(State::default()), changes: watch::channel(0).0 }),
            task: Mutex::new(None),
        };
        cache.ensure_running();
        Arc::new(cache)
    }

    /// The registry behind the cache.
    pub fn registry(&self) -> &SharedRegistry {
        &self.inner.registry
    }

    /// The live versions of service `name`, from memory when possible (see [`Cache`]). Nodes
    /// hidden by [`forget_node`](Cache::forget_node) are left out, and so are versions left with
    /// no node.
    pub async fn get_service(&self, name: &str) -> Result<Vec<Service>> {
        validate_name(name)?;
        self.ensure_running();
        {
            let state = lock(&self.inner.state);
            if let Some(entry) = state.entries.get(name) {
                let fresh = entry.watch == state.watch_started && entry.fetched.elapsed() < self.inner.ttl;
                if state.watching && fresh {
                    return Ok(state.visible(name, &entry.services));
                }
            }
        }
        match self.inner.lookup(name).await {
            Ok(services) => Ok(services),
            Err(error) => {
                let state = lock(&self.inner.state);
                match state.entries.get(name) {
                    Some(entry) => {
                        tracing::warn!(service = name, %error, "registry lookup failed; answering from the cache");
                        Ok(state.visible(name, &entry.services))
                    }
                    None => Err(error),
                }
            }
        }
    }

    /// A generation counter, bumped on every change the watch sees, of any service, cached or
    /// not (and after the watch was restarted). Await [`watch::Receiver::changed`] on it.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Hides node `node_id` of `service_name` (after a failed delivery, say) for 1 s, or 2, 4, ...
    /// up to 30 s when it fails again after each hiding, or until it is registered again (a
    /// create or update event for it, heartbeats included) or deleted. A failure while the node
    /// is hidden (deliveries that were under way) changes nothing.
    pub fn forget_node(&self, service_name: &str, node_id: &str) {
        lock(&self.inner.state).forget(service_name, node_id, Instant::now());
    }

    /// Whether the background watch is running (lookups are then answered from memory).
    pub fn is_watching(&self) -> bool {
        lock(&self.inner.state).watching
    }

    /// Starts the background task when there is none (or it died with its runtime).
    fn ensure_running(&self) {
        let mut task = lock(&self.task);
        if task.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            lock(&self.inner.state).watching = false;
            *task = Some(runtime.spawn(run(Arc::downgrade(&self.inner))));
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.inner.state);
        f.debug_struct("Cache")
            .field("registry", &self.inner.registry)
            .field("ttl", &self.inner.ttl)
            .field("cached", &state.entries.len())
            .field("forgotten", &state.forgotten.len())
            .field("watching", &state.watching)
            .field("generation", &*self.inner.changes.borrow())
            .finish()
    }
}

impl State {
    fn visible(&self, name: &str, services: &[Service]) -> Vec<Service> {
        // Usually no node is hidden: then no clock read on this path (every dispatch round).
        if self.forgotten.is_empty() {
            return services.to_vec();
        }
        self.visible_at(name, services, Instant::now())
    }

    /// [`State::visible`] at `now`, with the hidden nodes left out.
    fn visible_at(&self, name: &str, services: &[Service], now: Instant) -> Vec<Service> {
        let mut services = services.to_vec();
        let hidden = |id: &str| {
            self.forgotten.get(&(name.to_owned(), id.to_owned())).is_some_and(|node| node.hidden_until > now)
        };
        for service in &mut services {
            service.nodes.retain(|node| !hidden(&node.id));
        }
        services.retain(|service| !service.nodes.is_empty());
        services
    }

    fn forget(&mut self, service_name: &str, node_id: &str, now: Instant) {
        let node = self
            .forgotten
            .entry((service_name.to_owned(), node_id.to_owned()))
            .or_insert(Forgotten { hidden_until: now, strikes: 0 });
        if node.hidden_until <= now {
            node.strikes += 1;
            node.hidden_until = now + forget_for(node.strikes);
        }
    }

    fn apply(&mut self, event: &WatchEvent) {
        let name = &event.service.name;
        // The key is built (two allocations) only when some node is hidden: usually none is.
        if !self.forgotten.is_empty() {
            for node in &event.service.nodes {
                self.forgotten.remove(&(name.clone(), node.id.clone()));
            }
        }
        if let Some((_, seen)) = self.in_flight.get_mut(name) {
            seen.push(event.clone());
        }
        if let Some(entry) = self.entries.get_mut(name) {
            apply_to(&mut entry.services, event);
        }
    }
}

/// How long the `strikes`-th failure hides a node: 1 s, 2, 4, 8, 16, then 30 s.
fn forget_for(strikes: u32) -> Duration {
    FORGET_FIRST.saturating_mul(1 << strikes.saturating_sub(1).min(5)).min(FORGET_MAX)
}

/// Applies one event to the versions of one service. Idempotent, so events may be replayed.
fn apply_to(services: &mut Vec<Service>, event: &WatchEvent) {
    for node in &event.service.nodes {
        for service in services.iter_mut() {
            service.nodes.retain(|known| known.id != node.id);
        }
    }
    if event.action != Action::Delete {
        match services.iter_mut().find(|service| service.version == event.service.version) {
            Some(service) => service.nodes.extend(event.service.nodes.iter().cloned()),
            None => services.push(event.service.clone()),
        }
    }
    *services = group_by_version(std::mem::take(services));
}

impl Inner {
    fn bump(&self) {
        self.changes.send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// Looks `name` up in the registry and stores the answer (with the events seen meanwhile).
    async fn lookup(&self, name: &str) -> Result<Vec<Service>> {
        let watch = {
            let mut state = lock(&self.state);
            state.in_flight.entry(name.to_owned()).or_default().0 += 1;
            state.watch_started
        };
        let result = self.registry.get_service(name).await;
        let mut state = lock(&self.state);
        let seen = match state.in_flight.get_mut(name) {
            Some((count, seen)) if *count > 1 => {
                *count -= 1;
                seen.clone()
            }
            _ => state.in_flight.remove(name).map(|(_, seen)| seen).unwrap_or_default(),
        };
        let mut services = result?;
        for event in &seen {
            apply_to(&mut services, event);
        }
        state.entries.insert(name.to_owned(), Entry { services: services.clone(), fetched: Instant::now(), watch });
        Ok(state.visible(name, &services))
    }

    /// Looks every cached name up again (after the watch (re)started, changes may have been
    /// missed).
    async fn refresh_all(&self) {
        let names: Vec<String> = lock(&self.state).entries.keys().cloned().collect();
        for name in names {
            if let Err(error) = self.lookup(&name).await {
                tracing::warn!(service = %name, %error, "registry lookup failed while refreshing the cache");
            }
        }
    }
}

/// The background watch: applies events, restarts with backoff when the watch breaks.
async fn run(inner: Weak<Inner>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(registry) = inner.upgrade().map(|inner| inner.registry.clone()) else { return };
        match registry.watch(None).await {
            Ok(mut watcher) => {
                {
                    let Some(inner) = inner.upgrade() else { return };
                    {
                        let mut state = lock(&inner.state);
                        state.watching = true;
                        state.watch_started += 1;
                    }
                    inner.refresh_all().await;
                    inner.bump();
                }
                loop {
                    let item = watcher.next().await;
                    let Some(inner) = inner.upgrade() else { return };
                    match item {
                        Some(Ok(event)) => {
                            lock(&inner.state).apply(&event);
                            inner.bump();
                            backoff = BACKOFF_MIN;
                        }
                        Some(Err(error)) => {
                            tracing::warn!(%error, registry = registry.name(), "registry watch broke; restarting it");
                            break;
                        }
                        None => {
                            tracing::debug!(registry = registry.name(), "registry watch ended; restarting it");
                            break;
                        }
                    }
                }
                if let Some(inner) = inner.upgrade() {
                    lock(&inner.state).watching = false;
                }
            }
            Err(error) => {
                tracing::warn!(%error, registry = registry.name(), "cannot watch the registry; retrying");
            }
        }
        drop(registry);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, ErrorKind, MemoryRegistry, Node, Registry, Watcher};
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A memory registry that counts lookups and live watches, and whose watches can be broken.
    #[derive(Debug)]
    struct Flaky {
        inner: MemoryRegistry,
        lookups: AtomicUsize,
        watches: Arc<AtomicUsize>,
        breaker: watch::Sender<u64>,
        fail_lookups: std::sync::atomic::AtomicBool,
        /// New watches wait while this is false.
        watches_open: watch::Sender<bool>,
        /// Lookups, once they have read the registry, wait while this is false.
        answers_open: watch::Sender<bool>,
    }

    struct WatchGuard(Arc<AtomicUsize>);
    impl Drop for WatchGuard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Flaky {
        fn new() -> Arc<Flaky> {
            Arc::new(Flaky {
                inner: MemoryRegistry::new(),
                lookups: AtomicUsize::new(0),
                watches: Arc::new(AtomicUsize::new(0)),
                breaker: watch::channel(0).0,
                fail_lookups: Default::default(),
                watches_open: watch::channel(true).0,
                answers_open: watch::channel(true).0,
            })
        }
        fn break_watches(&self) {
            self.breaker.send_modify(|g| *g += 1);
        }
    }

    #[async_trait]
    impl Registry for Flaky {
        async fn register(&self, service: &Service, ttl: Duration) -> Result<()> {
            self.inner.register(service, ttl).await
        }
        async fn deregister(&self, service: &Service) -> Result<()> {
            self.inner.deregister(service).await
        }
        async fn get_service(&self, name: &str) -> Result<Vec<Service>> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            if self.fail_lookups.load(Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Connection, "lookup failed"));
            }
            let answer = self.inner.get_service(name).await;
            let _ = self.answers_open.subscribe().wait_for(|open| *open).await;
            answer
        }
        async fn watch(&self, name: Option<&str>) -> Result<Watcher> {
            let mut open = self.watches_open.subscribe();
            let _ = open.wait_for(|open| *open).await;
            let events = self.inner.watch(name).await?;
            self.watches.fetch_add(1, Ordering::SeqCst);
            let guard = WatchGuard(self.watches.clone());
            let mut breaker = self.breaker.subscribe();
            let broken = futures::stream::once(async move {
                let _ = breaker.changed().await;
                Err(Error::new(ErrorKind::Connection, "watch broken"))
            });
            Ok(Box::pin(futures::stream::select(events, broken).map(move |item| {
                let _keep = &guard;
                item
            })))
        }
        fn name(&self) -> &'static str {
            "flaky"
        }
    }

    fn service(name: &str, version: &str, id: &str) -> Service {
        Service::new(name, version).with_node(Node::new(id, "127.0.0.1:9"))
    }

    fn ids(services: &[Service]) -> Vec<String> {
        services.iter().flat_map(|s| s.nodes.iter().map(|n| format!("{}/{}", s.version, n.id))).collect()
    }

    async fn until<F: Fn() -> bool>(what: &str, condition: F) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn answers_from_memory_and_follows_events() {
        let registry = Flaky::new();
        let cache = Cache::new(registry.clone());
        until("the watch", || cache.is_watching()).await;
        registry.register(&service("s", "v1", "a"), Duration::ZERO).await.unwrap();
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v1/a"]);
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v1/a"]);
        assert_eq!(registry.lookups.load(Ordering::SeqCst), 1, "second lookup from memory");

        let mut changes = cache.changes();
        registry.register(&service("s", "v2", "b"), Duration::ZERO).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), changes.changed()).await.unwrap().unwrap();
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v1/a", "v2/b"]);
        // A node moving to another version moves in the cache too.
        registry.register(&service("s", "v2", "a"), Duration::ZERO).await.unwrap();
        registry.deregister(&service("s", "v2", "b")).await.unwrap();
        until("two changes", || *changes.borrow() >= 4).await;
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v2/a"]);
        assert_eq!(registry.lookups.load(Ordering::SeqCst), 1);

        // Changes of services never looked up bump the counter too.
        let before = *changes.borrow_and_update();
        registry.register(&service("uncached", "v", "x"), Duration::ZERO).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), changes.changed()).await.unwrap().unwrap();
        assert!(*changes.borrow() > before);
    }

    #[tokio::test]
    async fn forgotten_nodes_are_hidden_until_registered_again() {
        let registry = Flaky::new();
        let cache = Cache::new(registry.clone());
        until("the watch", || cache.is_watching()).await;
        registry.register(&service("s", "v", "a"), Duration::ZERO).await.unwrap();
        registry.register(&service("s", "v", "b"), Duration::ZERO).await.unwrap();
        let mut changes = cache.changes();
        // Let the cache see both registrations first: a Create seen later would un-forget.
        until("both creates", || *changes.borrow() >= 3).await;
        changes.borrow_and_update();
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v/a", "v/b"]);
        cache.forget_node("s", "a");
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v/b"]);
        cache.forget_node("s", "b");
        assert!(cache.get_service("s").await.unwrap().is_empty(), "an empty version is dropped");

        registry.register(&service("s", "v", "a"), Duration::ZERO).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), changes.changed()).await.unwrap().unwrap();
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v/a"]);
    }

    #[test]
    fn a_forgotten_node_is_hidden_for_a_while_and_longer_when_it_fails_again() {
        let mut state = State::default();
        let services = [service("s", "v", "a")];
        let visible = |state: &State, at| ids(&state.visible_at("s", &services, at));
        let t0 = Instant::now();
        state.forget("s", "a", t0);
        assert!(visible(&state, t0).is_empty());
        // A failure while it is hidden (deliveries that were under way) does not hide it longer.
        state.forget("s", "a", t0 + Duration::from_millis(500));
        assert!(visible(&state, t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(visible(&state, t0 + FORGET_FIRST), ["v/a"], "back after the first second");
        // Failing again after its hiding: twice as long.
        let t1 = t0 + Duration::from_secs(5);
        state.forget("s", "a", t1);
        assert!(visible(&state, t1 + Duration::from_millis(1999)).is_empty());
        assert_eq!(visible(&state, t1 + Duration::from_secs(2)), ["v/a"]);
        // Registering again starts over.
        state.apply(&WatchEvent { action: Action::Update, service: service("s", "v", "a") });
        let t2 = t1 + Duration::from_secs(10);
        state.forget("s", "a", t2);
        assert_eq!(visible(&state, t2 + FORGET_FIRST), ["v/a"]);
        assert_eq!((1..=8).map(forget_for).map(|d| d.as_secs()).collect::<Vec<_>>(), [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[tokio::test]
    async fn a_lookup_older_than_the_watch_is_not_trusted() {
        let registry = Flaky::new();
        registry.watches_open.send_replace(false);
        registry.answers_open.send_replace(false);
        let cache = Cache::new(registry.clone());
        // A lookup reads the registry before the watch has looked at it, and is still under way
        // when the watch starts; a node registered in between is in the watch's first look, so
        // no event tells of it.
        let early = tokio::spawn({
            let cache = Arc::clone(&cache);
            async move { cache.get_service("s").await }
        });
        until("the early read", || registry.lookups.load(Ordering::SeqCst) == 1).await;
        registry.register(&service("s", "v", "a"), Duration::ZERO).await.unwrap();
        registry.watches_open.send_replace(true);
        until("the watch", || cache.is_watching()).await;
        registry.answers_open.send_replace(true);
        assert!(early.await.unwrap().unwrap().is_empty(), "what it read");
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v/a"], "read again, not taken as fresh");
        let lookups = registry.lookups.load(Ordering::SeqCst);
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v/a"]);
        assert_eq!(registry.lookups.load(Ordering::SeqCst), lookups, "from memory once looked up under the watch");
    }

    #[tokio::test]
    async fn watch_restart_rereads_cached_names() {
        let registry = Flaky::new();
        let cache = Cache::new(registry.clone());
        until("the watch", || cache.is_watching()).await;
        assert!(cache.get_service("s").await.unwrap().is_empty());
        assert_eq!(registry.lookups.load(Ordering::SeqCst), 1);

        registry.break_watches();
        until("the watch to break", || registry.watches.load(Ordering::SeqCst) == 0).await;
        // Registered while no watch runs: only the re-read on restart can see it.
        registry.register(&service("s", "v", "late"), Duration::ZERO).await.unwrap();
        until("the watch to restart", || cache.is_watching() && registry.lookups.load(Ordering::SeqCst) >= 2).await;
        let lookups = registry.lookups.load(Ordering::SeqCst);
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v/late"]);
        assert_eq!(registry.lookups.load(Ordering::SeqCst), lookups, "answered from memory after the re-read");
    }

    #[tokio::test]
    async fn stale_answer_when_the_registry_fails_and_ttl_fallback() {
        let registry = Flaky::new();
        let cache = Cache::with_ttl(registry.clone(), Duration::from_millis(50));
        until("the watch", || cache.is_watching()).await;
        registry.register(&service("s", "v", "a"), Duration::ZERO).await.unwrap();
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v/a"]);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v/a"]);
        assert_eq!(registry.lookups.load(Ordering::SeqCst), 2, "looked up again after the TTL");

        registry.fail_lookups.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(ids(&cache.get_service("s").await.unwrap()), ["v/a"], "stale answer on failure");
        let err = cache.get_service("never-looked-up").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection);
    }

    #[tokio::test]
    async fn dropping_the_cache_stops_its_watch() {
        let registry = Flaky::new();
        let cache = Cache::new(registry.clone());
        until("the watch", || registry.watches.load(Ordering::SeqCst) == 1).await;
        let weak = Arc::downgrade(&cache.inner);
        drop(cache);
        until("the watch to stop", || registry.watches.load(Ordering::SeqCst) == 0).await;
        until("the state to be freed", || weak.upgrade().is_none()).await;
    }

    #[test]
    fn created_outside_a_runtime_starts_at_first_lookup() {
        let registry = Flaky::new();
        let cache = Cache::new(registry.clone());
        assert!(lock(&cache.task).is_none());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            assert!(cache.get_service("s").await.unwrap().is_empty());
            until("the watch", || cache.is_watching()).await;
        });
    }

    #[test]
    fn replayed_events_are_idempotent() {
        let mut services = vec![service("s", "v", "a")];
        let create = WatchEvent { action: Action::Create, service: service("s", "v", "b") };
        let delete = WatchEvent { action: Action::Delete, service: service("s", "v", "a") };
        for _ in 0..2 {
            apply_to(&mut services, &create);
            apply_to(&mut services, &delete);
        }
        assert_eq!(ids(&services), ["v/b"]);
        // A delete that names no version (etcd after compaction) still removes the node.
        apply_to(&mut services, &WatchEvent { action: Action::Delete, service: service("s", "", "b") });
        assert!(services.is_empty());
    }
}
