//! The zero-configuration registry: lease files in a per-user directory, so processes on one host
//! find each other with no server and no multicast.
//!
//! Layout: `<dir>/<escaped service name>/<escaped node id>.json`, one file per node, holding
//! `{"expires_unix_ms":<ms or null>,"service":<the Go Micro JSON of the service with that one
//! node>}`. Names are escaped byte-wise (`[A-Za-z0-9._-]` kept, anything else `%XX`, a leading
//! `.` escaped too). Files are written to a temporary name in `<dir>` and renamed into place, so a
//! reader never sees half a file, and every change touches `<dir>` itself, which lets one inotify
//! watch on `<dir>` see all of them. A temporary name ends with the escaped service directory it
//! goes to or comes from (when that fits in a file name), so that a watcher lists only the
//! directories that changed; a change it cannot place makes it list them all. Expired files are
//! ignored and removed by whoever sees them.
//!
//! The default directory is `$XDG_RUNTIME_DIR/micro-registry`, else
//! `<temp dir>/micro-registry-<uid>`, created with mode 0700 and refused if another user owns it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use notify::Watcher as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::common::{escape_component, group_by_version, lock, split_nodes, validate_for_register, validate_name};
use crate::{Action, Error, ErrorKind, Registry, Result, Service, WatchEvent, Watcher};

/// Name of the registry directory inside `$XDG_RUNTIME_DIR`.
pub const LOCAL_DIR_NAME: &str = "micro-registry";
/// How often a watcher polls the directory when inotify is unavailable (or when asked to poll
/// with [`LocalRegistry::poll_only`]).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How often an inotify-driven watcher rescans anyway, as a safety net.
const SAFETY_RESCAN: Duration = Duration::from_secs(1);
/// A rescan skips a service directory whose identity and modification time are those it had when
/// last listed, provided that modification time was at least this old then: a directory's
/// modification time has a coarse clock (a kernel tick), so two changes within one tick may leave
/// the same time, and only a time older than any tick proves that no change followed it.
const DIR_STAMP_SETTLED: Duration = Duration::from_secs(1);
/// A service directory is listed again after this long even when its stamp says nothing changed
/// (a file rewritten in place, by a foreign tool, changes no directory stamp).
const RELIST_AFTER_MS: u64 = 60_000;
/// Leftover temporary files (from a process that died mid-write) older than this are removed.
const STALE_TEMP_AGE: Duration = Duration::from_secs(600);
/// How old an empty service directory must be before a scan removes it as a leftover. A
/// directory that `write_node` has just made is empty until its rename: removing it then made
/// the writer's mkdir wake the watcher that removed it again, a loop a loaded machine could lose.
const LEFTOVER_DIR_AGE: Duration = Duration::from_secs(60);

/// The registry of lease files. See the [module documentation](self) for the layout.
#[derive(Debug, Clone)]
pub struct LocalRegistry {
    layout: Layout,
    poll_only: Option<Duration>,
}

impl LocalRegistry {
    /// The registry in the per-user default directory ([`LocalRegistry::default_dir`]), created
    /// with mode 0700 if missing.
    pub fn new() -> Result<Self> {
        let dir = Self::default_dir()?;
        prepare_private_dir(&dir)?;
        Ok(Self::at(dir))
    }

    /// The registry in `dir` (created, with mode 0700, if missing): for tests, and what
    /// `MICRO_REGISTRY_ADDRESS=<dir>` selects. Every process using the same directory sees the
    /// same services.
    pub fn with_dir(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        if dir.as_os_str().is_empty() {
            return Err(Error::invalid_input("the local registry directory must not be empty"));
        }
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| io_error("create", &dir, e))?;
        let meta = fs::metadata(&dir).map_err(|e| io_error("inspect", &dir, e))?;
        if !meta.is_dir() {
            return Err(Error::invalid_input(format!("the local registry path {} is not a directory", dir.display())));
        }
        Ok(Self::at(dir))
    }

    fn at(root: PathBuf) -> Self {
        LocalRegistry { layout: Layout { root: Arc::new(root) }, poll_only: None }
    }

    /// The per-user default directory: `$XDG_RUNTIME_DIR/micro-registry` when that variable
    /// names a directory, else `<temp dir>/micro-registry-<uid>`.
    pub fn default_dir() -> Result<PathBuf> {
        if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
            let runtime = PathBuf::from(runtime);
            if runtime.is_dir() {
                return Ok(runtime.join(LOCAL_DIR_NAME));
            }
        }
        let uid = current_uid()?;
        Ok(std::env::temp_dir().join(format!("{LOCAL_DIR_NAME}-{uid}")))
    }

    /// The directory holding the lease files.
    pub fn dir(&self) -> &Path {
        &self.layout.root
    }

    /// Makes watchers poll the directory every `interval` instead of using inotify.
    pub fn poll_only(mut self, interval: Duration) -> Self {
        self.poll_only = Some(interval.max(Duration::from_millis(1)));
        self
    }

    async fn blocking<T, F>(&self, op: &'static str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Layout) -> Result<T> + Send + 'static,
    {
        let layout = self.layout.clone();
        tokio::task::spawn_blocking(move || work(layout)).await.map_err(|e| join_error(op, e))?
    }
}

#[async_trait]
impl Registry for LocalRegistry {
    async fn register(&self, service: &Service, ttl: Duration) -> Result<()> {
        validate_for_register(service)?;
        let expires_unix_ms = if ttl.is_zero() {
            None
        } else {
            Some(now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)))
        };
        let entries: Vec<LeaseFile> =
            split_nodes(service).map(|service| LeaseFile { expires_unix_ms, service }).collect();
        self.blocking("register", move |layout| entries.iter().try_for_each(|entry| layout.write_node(entry))).await
    }

    async fn deregister(&self, service: &Service) -> Result<()> {
        validate_name(&service.name)?;
        let service = service.clone();
        self.blocking("deregister", move |layout| {
            service.nodes.iter().try_for_each(|node| layout.remove_node(&service.name, &service.version, &node.id))
        })
        .await
    }

    async fn get_service(&self, name: &str) -> Result<Vec<Service>> {
        validate_name(name)?;
        let name = name.to_owned();
        self.blocking("get_service", move |layout| layout.read_service(&name)).await
    }

    async fn watch(&self, name: Option<&str>) -> Result<Watcher> {
        if let Some(name) = name {
            validate_name(name)?;
        }
        // Make the directory again if it was removed since (inotify needs it).
        self.layout.ensure_root().map_err(|e| io_error("create", &self.layout.root, e))?;
        // Subscribe before the baseline scan, so that no change falls between the two.
        let signal = match self.poll_only {
            Some(_) => None,
            None => dir_signal(&self.layout.root),
        };
        let receiver = signal.as_ref().map(|signal| {
            let mut receiver = signal.sender.subscribe();
            receiver.borrow_and_update();
            receiver
        });
        let seen = signal.as_ref().map_or(0, |signal| lock(&signal.log).end());
        let poll = match (&signal, self.poll_only) {
            (_, Some(interval)) => interval,
            (Some(_), None) => SAFETY_RESCAN,
            (None, None) => DEFAULT_POLL_INTERVAL,
        };
        let dir_filter = name.map(escape_component);
        let filter = dir_filter.clone();
        let baseline = self
            .blocking("watch", move |layout| {
                let now = now_ms();
                let mut snapshot = layout.scan(filter.as_deref(), &Snapshot::new(), now)?;
                diff(&Snapshot::new(), &mut snapshot, now);
                Ok(snapshot)
            })
            .await?;
        let watch = LocalWatch {
            layout: self.layout.clone(),
            name: name.map(str::to_owned),
            dir_filter,
            next_expiry: earliest_expiry(baseline.values()),
            snapshot: baseline,
            pending: VecDeque::new(),
            signal: signal.zip(receiver),
            seen,
            full_scan_at: Instant::now(),
            poll,
            failed: false,
        };
        Ok(Box::pin(futures::stream::unfold(watch, LocalWatch::next)))
    }

    fn name(&self) -> &'static str {
        "local"
    }
}

/// What one lease file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseFile {
    /// Wall-clock expiry in milliseconds since the Unix epoch; `null` never expires.
    expires_unix_ms: Option<u64>,
    /// The service version with the one node.
    service: Service,
}

impl LeaseFile {
    fn live_at(&self, now_ms: u64) -> bool {
        self.expires_unix_ms.is_none_or(|at| at > now_ms)
    }
}

/// Paths, and the blocking file operations on them.
#[derive(Debug, Clone)]
struct Layout {
    root: Arc<PathBuf>,
}

/// What a watcher knows of the registry: per escaped service directory, what it held when last
/// listed. Shared (`Arc`) between rescans while a directory is unchanged, so that a rescan of an
/// unchanged registry copies nothing and reports nothing.
type Snapshot = BTreeMap<String, Arc<DirState>>;

/// What a watcher knows of one service directory.
#[derive(Debug, Clone)]
struct DirState {
    /// The directory as stat'ed just before it was listed, when its modification time was old
    /// enough to be trusted ([`DIR_STAMP_SETTLED`]); `None` makes the next rescan list it again.
    stamp: Option<FileIdent>,
    /// When it was listed, in ms since the epoch.
    listed_ms: u64,
    /// Its live lease files, by file name (a directory without any is not kept).
    files: BTreeMap<String, FileState>,
}

impl DirState {
    /// Whether a rescan may take this state as it is for a directory stat'ed as `stamp`: the
    /// directory did not change, no lease in it has expired since, and it was listed recently.
    fn still_valid(&self, stamp: &FileIdent, now_ms: u64) -> bool {
        self.stamp.as_ref() == Some(stamp)
            && now_ms.saturating_sub(self.listed_ms) < RELIST_AFTER_MS
            && self.files.values().all(|file| file.lease.live_at(now_ms))
    }
}

/// What a watcher knows of one lease file.
#[derive(Debug, Clone)]
struct FileState {
    ident: FileIdent,
    lease: LeaseFile,
    /// Whether this watcher has reported the node as present.
    live: bool,
}

/// Identifies one version of a file (every write makes a new inode: temp file + rename), or of a
/// directory (adding, replacing or removing an entry changes its modification time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdent {
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileIdent {
    fn of(meta: &fs::Metadata) -> Self {
        FileIdent {
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

impl Layout {
    fn ensure_root(&self) -> io::Result<()> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(self.root.as_path())
    }

    fn service_dir(&self, name: &str) -> PathBuf {
        self.root.join(escape_component(name))
    }

    fn node_path(&self, name: &str, id: &str) -> PathBuf {
        self.service_dir(name).join(format!("{}.json", escape_component(id)))
    }

    /// A fresh name for a temporary file in the root directory (hidden: starts with `.`), for a
    /// file that goes to or comes from service directory `dir_name` (escaped), which the name
    /// ends with when it fits (see [`changed_dir`]).
    fn temp_path(&self, kind: &str, dir_name: Option<&str>) -> PathBuf {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let mut name = format!(".{kind}-{}-{seq}-{nanos}", std::process::id());
        if let Some(dir_name) = dir_name.filter(|dir_name| name.len() + 1 + dir_name.len() <= MAX_FILE_NAME) {
            name.push('-');
            name.push_str(dir_name);
        }
        self.root.join(name)
    }

    fn write_node(&self, lease: &LeaseFile) -> Result<()> {
        let node_id = lease.service.nodes.first().map(|node| node.id.as_str()).unwrap_or_default();
        let dir_name = escape_component(&lease.service.name);
        let dir = self.root.join(&dir_name);
        let path = self.node_path(&lease.service.name, node_id);
        let bytes = serde_json::to_vec(lease)
            .map_err(|e| Error::codec(format!("cannot encode the lease of node {node_id:?}: {e}")).with_source(e))?;
        let temp = self.temp_path("tmp", Some(&dir_name));
        let create = || fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp);
        let written = match create() {
            // The directory was removed (a temp cleaner, a user): make it again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.ensure_root().and_then(|()| create()),
            other => other,
        }
        .and_then(|mut file| file.write_all(&bytes));
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(io_error("write", &temp, e));
        }
        // The service directory may be removed by a concurrent clean-up between our mkdir and
        // rename: try again a few times.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let renamed = match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
                _ => fs::rename(&temp, &path),
            };
            match renamed {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 5 => continue,
                Err(e) => {
                    let _ = fs::remove_file(&temp);
                    return Err(io_error("rename into", &path, e));
                }
            }
        }
    }

    fn remove_node(&self, name: &str, version: &str, id: &str) -> Result<()> {
        let path = self.node_path(name, id);
        match read_lease(&path).map_err(|e| io_error("read", &path, e))? {
            Some(lease) if lease.service.version == version => self.unlink_via_root(&path),
            _ => Ok(()),
        }
    }

    /// Removes `path` by renaming it into the root first, so that the root sees the change; then
    /// the service directory, if that was its last node.
    fn unlink_via_root(&self, path: &Path) -> Result<()> {
        let temp = self.temp_path("del", parent_name(path));
        match fs::rename(path, &temp) {
            Ok(()) => {
                fs::remove_file(&temp).map_err(|e| io_error("remove", &temp, e))?;
                remove_dir_if_empty(path.parent());
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", path, e)),
        }
    }

    /// Removes the expired lease file at `path`, unless it was refreshed meanwhile.
    fn collect_expired(&self, path: &Path) {
        let temp = self.temp_path("gc", parent_name(path));
        if fs::rename(path, &temp).is_err() {
            return;
        }
        let still_expired = match read_lease(&temp) {
            Ok(Some(lease)) => !lease.live_at(now_ms()),
            Ok(None) | Err(_) => true,
        };
        if !still_expired {
            // Refreshed between our read and our rename: put it back unless an even newer one
            // is already there (hard_link never replaces).
            let _ = fs::hard_link(&temp, path);
        }
        let _ = fs::remove_file(&temp);
        remove_dir_if_empty(path.parent());
        tracing::debug!(path = %path.display(), still_expired, "collected an expired lease file");
    }

    fn read_service(&self, name: &str) -> Result<Vec<Service>> {
        let dir = self.service_dir(name);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("list", &dir, e)),
        };
        let now = now_ms();
        let mut services = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", &dir, e))?;
            if !is_lease_file_name(&entry.file_name()) {
                continue;
            }
            let path = entry.path();
            match read_lease(&path).map_err(|e| io_error("read", &path, e))? {
                Some(lease) if lease.service.name != name => {}
                Some(lease) if lease.live_at(now) => services.push(lease.service),
                Some(_) => self.collect_expired(&path),
                None => {}
            }
        }
        Ok(group_by_version(services))
    }

    /// Reads the lease files (of one service directory when `dir_filter` is set), listing again
    /// only the directories that changed since `previous` (see [`DirState::still_valid`]),
    /// re-reading only files that changed or whose recorded expiry has passed, and removing the
    /// expired ones. With thousands of services, listing every directory on every rescan was
    /// most of a process's time (each subscription is a service directory of its own).
    fn scan(&self, dir_filter: Option<&str>, previous: &Snapshot, now: u64) -> Result<Snapshot> {
        let mut dirs = Vec::new();
        match dir_filter {
            Some(dir_name) => dirs.extend(self.stat_dir(dir_name)?.map(|meta| (dir_name.to_owned(), meta))),
            None => {
                let root = self.root.as_path();
                for entry in fs::read_dir(root).map_err(|e| io_error("list", root, e))? {
                    let entry = entry.map_err(|e| io_error("list", root, e))?;
                    let name = entry.file_name();
                    let Some(name) = name.to_str() else { continue };
                    if name.starts_with('.') {
                        self.remove_if_stale_temp(&entry.path());
                    } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        // Stat'ed relative to the listing's descriptor (no path walk); a
                        // directory removed meanwhile is skipped.
                        if let Ok(meta) = entry.metadata() {
                            dirs.push((name.to_owned(), meta));
                        }
                    }
                }
            }
        }
        let mut snapshot = Snapshot::new();
        for (dir_name, meta) in dirs {
            let stamp = FileIdent::of(&meta);
            let known = previous.get(&dir_name);
            if let Some(known) = known.filter(|known| known.still_valid(&stamp, now)) {
                snapshot.insert(dir_name, Arc::clone(known));
                continue;
            }
            if let Some(state) = self.list(&dir_name, &meta, known.map(|known| &**known), now)? {
                snapshot.insert(dir_name, Arc::new(state));
            }
        }
        Ok(snapshot)
    }

    /// Lists again the service directories `dir_names` (changed, as inotify said), updating
    /// `snapshot` and returning what changed; the other directories are not looked at.
    fn rescan_dirs(
        &self,
        dir_filter: Option<&str>,
        dir_names: &BTreeSet<String>,
        snapshot: &mut Snapshot,
        now: u64,
    ) -> Result<Vec<WatchEvent>> {
        // A vanished registry directory breaks the watch, as a full scan would find.
        let root = self.root.as_path();
        fs::symlink_metadata(root).map_err(|e| io_error("list", root, e))?;
        let mut events = Vec::new();
        for dir_name in dir_names.iter().filter(|name| dir_filter.is_none_or(|only| only == name.as_str())) {
            let meta = self.stat_dir(dir_name)?;
            let known = snapshot.remove(dir_name);
            let mut state = match meta {
                Some(meta) => self.list(dir_name, &meta, known.as_deref(), now)?,
                None => None,
            };
            diff_dir(known.as_deref(), state.as_mut(), now, &mut events);
            if let Some(state) = state {
                snapshot.insert(dir_name.clone(), Arc::new(state));
            }
        }
        Ok(events)
    }

    /// Service directory `dir_name` as stat'ed now; `None` when it is gone or no directory.
    fn stat_dir(&self, dir_name: &str) -> Result<Option<fs::Metadata>> {
        let dir = self.root.join(dir_name);
        match fs::symlink_metadata(&dir) {
            Ok(meta) => Ok(meta.is_dir().then_some(meta)),
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => Ok(None),
            Err(e) => Err(io_error("list", &dir, e)),
        }
    }

    /// A service directory's state, listed now: `None` when it holds no live lease.
    fn list(
        &self,
        dir_name: &str,
        meta: &fs::Metadata,
        known: Option<&DirState>,
        now: u64,
    ) -> Result<Option<DirState>> {
        let settled = older_than(meta, DIR_STAMP_SETTLED);
        let files = self.list_dir(dir_name, known.map(|known| &known.files), now)?;
        Ok((!files.is_empty()).then(|| DirState { stamp: settled.then(|| FileIdent::of(meta)), listed_ms: now, files }))
    }

    /// The live lease files of one service directory, re-reading only those that differ from
    /// `known`; removes expired files, and the directory itself if it is an old leftover.
    fn list_dir(
        &self,
        dir_name: &str,
        known: Option<&BTreeMap<String, FileState>>,
        now: u64,
    ) -> Result<BTreeMap<String, FileState>> {
        let mut files = BTreeMap::new();
        let dir = self.root.join(dir_name);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => return Ok(files),
            Err(e) => return Err(io_error("list", &dir, e)),
        };
        let mut empty = true;
        for entry in entries {
            empty = false;
            let Ok(entry) = entry else { continue };
            let file_name = entry.file_name();
            if !is_lease_file_name(&file_name) {
                continue;
            }
            let Some(file_name) = file_name.to_str().map(str::to_owned) else { continue };
            let path = entry.path();
            // Does not follow symlinks, like `symlink_metadata`.
            let Ok(meta) = entry.metadata() else { continue };
            let ident = FileIdent::of(&meta);
            let unchanged = known
                .and_then(|known| known.get(&file_name))
                .filter(|old| old.ident == ident && old.lease.live_at(now));
            let state = match unchanged {
                Some(old) => old.clone(),
                None => match read_lease(&path) {
                    Ok(Some(lease)) => FileState { ident, lease, live: false },
                    Ok(None) | Err(_) => continue,
                },
            };
            if state.lease.live_at(now) {
                files.insert(file_name, state);
            } else {
                self.collect_expired(&path);
            }
        }
        if empty && modified_before(&dir, LEFTOVER_DIR_AGE) {
            // A service directory left empty (by a registry version that kept them, or a
            // process that died between its last deregister and this clean-up): every scan
            // lists every directory, so leftovers would make each rescan slower forever.
            remove_dir_if_empty(Some(&dir));
        }
        Ok(files)
    }

    fn remove_if_stale_temp(&self, path: &Path) {
        if modified_before(path, STALE_TEMP_AGE) {
            let _ = fs::remove_file(path);
        }
    }
}

/// Whether `path` was last modified more than `age` ago (false when that cannot be told).
fn modified_before(path: &Path, age: Duration) -> bool {
    fs::symlink_metadata(path).is_ok_and(|meta| older_than(&meta, age))
}

/// Whether what `meta` describes was last modified more than `age` ago.
fn older_than(meta: &fs::Metadata, age: Duration) -> bool {
    meta.modified().ok().and_then(|modified| modified.elapsed().ok()).is_some_and(|elapsed| elapsed > age)
}

/// The events that turn the watcher's `previous` view into `next`, marking what `next` reports.
/// A directory whose state `next` shares with `previous` is unchanged and skipped.
fn diff(previous: &Snapshot, next: &mut Snapshot, now: u64) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    for (dir_name, dir) in next.iter_mut() {
        let old = previous.get(dir_name);
        if old.is_some_and(|old| Arc::ptr_eq(old, dir)) {
            continue;
        }
        // A state made by this scan: not shared, so this copies nothing.
        diff_dir(old.map(|old| &**old), Some(Arc::make_mut(dir)), now, &mut events);
    }
    for (dir_name, old) in previous {
        if !next.contains_key(dir_name) {
            diff_dir(Some(old), None, now, &mut events);
        }
    }
    events
}

/// The earliest expiry of a reported lease in `dirs`.
fn earliest_expiry<'a>(dirs: impl Iterator<Item = &'a Arc<DirState>>) -> Option<u64> {
    dirs.flat_map(|dir| dir.files.values())
        .filter(|state| state.live)
        .filter_map(|state| state.lease.expires_unix_ms)
        .min()
}

/// The events that turn one directory's `old` state into `new`, marking what `new` reports.
fn diff_dir(old: Option<&DirState>, mut new: Option<&mut DirState>, now: u64, events: &mut Vec<WatchEvent>) {
    let mut emit = |action, service: &Service| events.push(WatchEvent { action, service: service.clone() });
    for (file_name, state) in new.iter_mut().flat_map(|new| new.files.iter_mut()) {
        let live = state.lease.live_at(now);
        let was_live = old.and_then(|old| old.files.get(file_name)).map(|old| (old.live, old));
        match was_live {
            None | Some((false, _)) if live => emit(Action::Create, &state.lease.service),
            Some((true, old)) if !live => emit(Action::Delete, &old.lease.service),
            Some((true, old)) if old.ident != state.ident => emit(Action::Update, &state.lease.service),
            _ => {}
        }
        state.live = live;
    }
    let new_files = new.as_ref().map(|new| &new.files);
    for (file_name, old) in old.iter().flat_map(|old| old.files.iter()) {
        if old.live && !new_files.is_some_and(|files| files.contains_key(file_name)) {
            emit(Action::Delete, &old.lease.service);
        }
    }
}

/// One watcher: rescans when inotify says the root changed, at the next expiry, and every
/// `poll` in any case.
struct LocalWatch {
    layout: Layout,
    name: Option<String>,
    dir_filter: Option<String>,
    snapshot: Snapshot,
    pending: VecDeque<WatchEvent>,
    signal: Option<(Arc<DirSignal>, watch::Receiver<u64>)>,
    /// How far into the signal's [`ChangeLog`] this watcher has looked.
    seen: u64,
    /// The earliest expiry of a lease in `snapshot` (ms since the epoch), or earlier: a rescan of
    /// a few directories only lowers it, the next full scan sets it exactly.
    next_expiry: Option<u64>,
    /// When every directory was last listed: at least every `poll`, even while changes keep
    /// coming (the safety net against lost inotify events).
    full_scan_at: Instant,
    poll: Duration,
    failed: bool,
}

impl LocalWatch {
    async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.failed {
                return None;
            }
            let signalled = self.wait().await;
            // After a change signal, only the directories it named (all of them if it named one
            // it could not place); after a timer (poll, expiry, safety net), every directory.
            let changed = match &self.signal {
                Some((signal, _)) => {
                    let changed = lock(&signal.log).since(&mut self.seen);
                    changed.filter(|_| signalled && self.full_scan_at.elapsed() < self.poll)
                }
                None => None,
            };
            if changed.is_none() {
                self.full_scan_at = Instant::now();
            }
            let mut snapshot = std::mem::take(&mut self.snapshot);
            let filter = self.dir_filter.clone();
            let layout = self.layout.clone();
            let expiry_before = self.next_expiry;
            let scanned = tokio::task::spawn_blocking(move || {
                let now = now_ms();
                match changed {
                    Some(dir_names) => {
                        let events = layout.rescan_dirs(filter.as_deref(), &dir_names, &mut snapshot, now)?;
                        let rescanned = earliest_expiry(dir_names.iter().filter_map(|name| snapshot.get(name)));
                        Ok((snapshot, events, expiry_before.into_iter().chain(rescanned).min()))
                    }
                    None => {
                        let mut next = layout.scan(filter.as_deref(), &snapshot, now)?;
                        let events = diff(&snapshot, &mut next, now);
                        let expiry = earliest_expiry(next.values());
                        Ok((next, events, expiry))
                    }
                }
            })
            .await
            .map_err(|e| join_error("watch", e))
            .and_then(|scanned| scanned);
            match scanned {
                Ok((next, events, next_expiry)) => {
                    self.snapshot = next;
                    self.next_expiry = next_expiry;
                    let name = self.name.as_deref();
                    self.pending.extend(events.into_iter().filter(|e| name.is_none_or(|n| n == e.service.name)));
                }
                Err(e) => {
                    self.failed = true;
                    return Some((Err(e), self));
                }
            }
        }
    }

    /// Waits for a change signal, the next expiry, or the poll interval, whichever comes first;
    /// true for a change signal.
    async fn wait(&mut self) -> bool {
        let now = now_ms();
        let next_expiry = self.next_expiry.map(|at| Duration::from_millis(at.saturating_sub(now).saturating_add(1)));
        let wait = next_expiry.map_or(self.poll, |expiry| expiry.min(self.poll));
        match &mut self.signal {
            Some((_, receiver)) => {
                tokio::select! {
                    changed = receiver.changed() => {
                        if changed.is_err() {
                            // The inotify side is gone: fall back to polling.
                            self.signal = None;
                            self.poll = DEFAULT_POLL_INTERVAL;
                            return false;
                        }
                        true
                    }
                    () = tokio::time::sleep(wait) => false,
                }
            }
            None => {
                tokio::time::sleep(wait).await;
                false
            }
        }
    }
}

/// One inotify watch per directory and process, shared by every watcher of that directory: it
/// logs which service directory each change of the directory's entries was about, and bumps a
/// counter.
struct DirSignal {
    _watcher: notify::RecommendedWatcher,
    sender: Arc<watch::Sender<u64>>,
    log: Arc<Mutex<ChangeLog>>,
}

/// The last [`ChangeLog::CAPACITY`] changes of a registry directory, in order: each the escaped
/// service directory it touched, or `None` when that is unknown (a full rescan).
#[derive(Default)]
struct ChangeLog {
    /// The position of `changes[0]` since the log began.
    first: u64,
    changes: VecDeque<Option<String>>,
}

impl ChangeLog {
    /// Changes kept for watchers that lag behind; one that lags further rescans everything.
    const CAPACITY: usize = 8192;

    fn push(&mut self, change: Option<String>) {
        if self.changes.len() == Self::CAPACITY {
            self.changes.pop_front();
            self.first += 1;
        }
        self.changes.push_back(change);
    }

    /// The position after the last change.
    fn end(&self) -> u64 {
        self.first + self.changes.len() as u64
    }

    /// The service directories changed since position `seen` (moved to the end); `None` when
    /// one of the changes is not placed, or was already dropped from the log.
    fn since(&self, seen: &mut u64) -> Option<BTreeSet<String>> {
        let start = std::mem::replace(seen, self.end());
        let skip = usize::try_from(start.checked_sub(self.first)?).ok()?;
        self.changes.iter().skip(skip).cloned().collect()
    }
}

/// The service directory (escaped) that a change of `path`, an entry of `root`, was about: the
/// entry itself, or for a temporary file the directory its name ends with ([`Layout::temp_path`]).
/// `None` when that is unknown: the root itself, or a temporary name of another form.
fn changed_dir(root: &Path, path: &Path) -> Option<String> {
    if path.parent() != Some(root) {
        return None;
    }
    let name = path.file_name()?.to_str()?;
    match name.strip_prefix('.') {
        // `.<kind>-<pid>-<seq>-<nanos>-<dir>`
        Some(temp) => temp.splitn(5, '-').nth(4).filter(|dir| !dir.is_empty()).map(str::to_owned),
        None => Some(name.to_owned()),
    }
}

fn dir_signal(root: &Path) -> Option<Arc<DirSignal>> {
    static SIGNALS: OnceLock<Mutex<HashMap<PathBuf, Weak<DirSignal>>>> = OnceLock::new();
    let key = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let mut signals = lock(SIGNALS.get_or_init(Mutex::default));
    if let Some(signal) = signals.get(&key).and_then(Weak::upgrade) {
        return Some(signal);
    }
    signals.retain(|_, signal| signal.strong_count() > 0);
    let sender = Arc::new(watch::channel(0_u64).0);
    let log = Arc::new(Mutex::new(ChangeLog::default()));
    let notifier = sender.clone();
    let changes = Arc::clone(&log);
    let root_path = key.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        let changed: Vec<Option<String>> = match &event {
            // Opening or closing files (our own scans open the directory) changes nothing.
            Ok(event) if matches!(event.kind, notify::EventKind::Access(_)) => return,
            // Events were lost (the kernel's queue overflowed): everything may have changed.
            Ok(event) if event.need_rescan() || event.paths.is_empty() => vec![None],
            Ok(event) => event.paths.iter().map(|path| changed_dir(&root_path, path)).collect(),
            Err(_) => vec![None],
        };
        {
            let mut log = lock(&changes);
            for change in changed {
                log.push(change);
            }
        }
        notifier.send_modify(|generation| *generation = generation.wrapping_add(1));
    };
    let watcher = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher.watch(&key, notify::RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    match watcher {
        Ok(watcher) => {
            let signal = Arc::new(DirSignal { _watcher: watcher, sender, log });
            signals.insert(key, Arc::downgrade(&signal));
            Some(signal)
        }
        Err(e) => {
            tracing::warn!(dir = %key.display(), error = %e, "inotify unavailable; the local registry polls instead");
            None
        }
    }
}

/// Removes a service directory that holds nothing any more. Fails, harmlessly, while it still
/// holds a file; a writer racing with it makes the directory again (see `write_node`).
fn remove_dir_if_empty(dir: Option<&Path>) {
    if let Some(dir) = dir {
        let _ = fs::remove_dir(dir);
    }
}

/// The longest file name (bytes) that Linux file systems take.
const MAX_FILE_NAME: usize = 255;

/// The name of `path`'s parent directory (a service directory, for a lease file).
fn parent_name(path: &Path) -> Option<&str> {
    path.parent()?.file_name()?.to_str()
}

fn is_lease_file_name(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|name| !name.starts_with('.') && name.ends_with(".json"))
}

/// The lease in `path`; `None` when the file is gone or not a lease (a foreign or damaged file).
fn read_lease(path: &Path) -> io::Result<Option<LeaseFile>> {
    match fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(lease) => Ok(Some(lease)),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "ignoring a file that is not a lease");
                Ok(None)
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// The user id of this process, without `unsafe`: the owner of `/proc/self`, else of a file we
/// create.
fn current_uid() -> Result<u32> {
    if let Ok(meta) = fs::metadata("/proc/self") {
        return Ok(meta.uid());
    }
    let probe = std::env::temp_dir().join(format!(".micro-registry-uid-{}", std::process::id()));
    let created = fs::OpenOptions::new().write(true).create(true).truncate(true).open(&probe);
    let uid = created.and_then(|file| file.metadata()).map(|meta| meta.uid());
    let _ = fs::remove_file(&probe);
    uid.map_err(|e| io_error("find the user id with", &probe, e))
}

/// Creates `dir` with mode 0700, or checks that the existing one is a real directory of ours
/// (not a symlink, not another user's) and makes it private.
fn prepare_private_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(parent).map_err(|e| io_error("create", parent, e))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error("create", dir, e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(|e| io_error("inspect", dir, e))?;
    let uid = current_uid()?;
    if !meta.is_dir() || meta.uid() != uid {
        return Err(Error::invalid_input(format!(
            "the local registry directory {} is not a directory owned by this user (uid {uid}); remove it, \
             or set MICRO_REGISTRY_ADDRESS to a directory of yours",
            dir.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| io_error("chmod", dir, e))?;
    }
    Ok(())
}

/// The one place where file-system errors become [`Error`]s.
fn io_error(op: &str, path: &Path, error: io::Error) -> Error {
    let kind = match error.kind() {
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidFilename | io::ErrorKind::NotADirectory => {
            ErrorKind::InvalidInput
        }
        io::ErrorKind::PermissionDenied => ErrorKind::Connection,
        _ => ErrorKind::Backend,
    };
    Error::new(kind, format!("local registry: cannot {op} {}: {error}", path.display())).with_source(error)
}

fn join_error(op: &str, error: tokio::task::JoinError) -> Error {
    Error::new(ErrorKind::Closed, format!("local registry: {op} did not finish: {error}")).with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Node;
    use futures::StreamExt;

    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "broker-registry-unit-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn service(name: &str, version: &str, id: &str) -> Service {
        Service::new(name, version).with_node(Node::new(id, "127.0.0.1:1").with_metadata("secure", "false"))
    }

    async fn next_event(watcher: &mut Watcher) -> WatchEvent {
        match tokio::time::timeout(Duration::from_secs(5), watcher.next()).await {
            Ok(Some(Ok(event))) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn layout_is_one_escaped_file_per_node_with_go_json() {
        let dir = temp_dir("layout");
        let registry = LocalRegistry::with_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let svc = service("topic:a/b", "ff.http.broadcast", "node/1");
        registry.register(&svc, Duration::from_secs(30)).await.unwrap();
        let path = dir.join("topic%3Aa%2Fb").join("node%2F1.json");
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with(r#","service":{"name":"topic:a/b","version":"ff.http.broadcast","metadata":null,"endpoints":null,"nodes":[{"id":"node/1","address":"127.0.0.1:1","metadata":{"secure":"false"}}]}}"#),
            "{text}"
        );
        let raw: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let expires = raw["expires_unix_ms"].as_u64().unwrap();
        assert!(expires > now_ms() + 25_000 && expires <= now_ms() + 30_000, "{expires}");
        // No temporary file is left behind.
        let leftovers: Vec<_> =
            fs::read_dir(&dir).unwrap().flatten().filter(|e| e.file_name() != "topic%3Aa%2Fb").collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        assert_eq!(registry.get_service("topic:a/b").await.unwrap(), vec![svc.clone()]);
        registry.deregister(&svc).await.unwrap();
        assert!(!path.exists());
        assert!(registry.get_service("topic:a/b").await.unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn versions_are_grouped_and_deregister_matches_version() {
        let dir = temp_dir("group");
        let registry = LocalRegistry::with_dir(&dir).unwrap();
        registry.register(&service("s", "v1", "a"), Duration::ZERO).await.unwrap();
        registry.register(&service("s", "v1", "b"), Duration::ZERO).await.unwrap();
        registry.register(&service("s", "v2", "c"), Duration::from_secs(60)).await.unwrap();
        registry.register(&service("s2", "v1", "d"), Duration::ZERO).await.unwrap();
        let found = registry.get_service("s").await.unwrap();
        assert_eq!(
            found.iter().map(|s| (s.version.as_str(), s.nodes.len())).collect::<Vec<_>>(),
            [("v1", 2), ("v2", 1)]
        );
        registry.deregister(&service("s", "v2", "a")).await.unwrap();
        assert_eq!(registry.get_service("s").await.unwrap()[0].nodes.len(), 2);
        registry.deregister(&service("s", "v1", "a")).await.unwrap();
        assert_eq!(registry.get_service("s").await.unwrap()[0].nodes.len(), 1);
        // A damaged or foreign file is ignored.
        fs::write(dir.join("s").join("junk.json"), b"{not json").unwrap();
        fs::write(dir.join("s").join("README"), b"hello").unwrap();
        assert_eq!(registry.get_service("s").await.unwrap().len(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn expired_files_are_ignored_cleaned_and_reported() {
        let dir = temp_dir("expiry");
        let registry = LocalRegistry::with_dir(&dir).unwrap();
        let mut watcher = registry.watch(Some("s")).await.unwrap();
        registry.register(&service("s", "v", "short"), Duration::from_millis(300)).await.unwrap();
        registry.register(&service("s", "v", "long"), Duration::from_secs(60)).await.unwrap();
        let mut created = [next_event(&mut watcher).await, next_event(&mut watcher).await];
        created.sort_by(|a, b| a.service.nodes[0].id.cmp(&b.service.nodes[0].id));
        assert!(created.iter().all(|e| e.action == Action::Create));
        let started = std::time::Instant::now();
        let event = next_event(&mut watcher).await;
        assert_eq!((event.action, event.service.nodes[0].id.as_str()), (Action::Delete, "short"));
        assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
        let found = registry.get_service("s").await.unwrap();
        assert_eq!(found[0].nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["long"]);
        assert!(!dir.join("s").join("short.json").exists(), "expired file removed");

        // An expired file written by someone else is ignored by lookups and removed.
        let stale = LeaseFile { expires_unix_ms: Some(now_ms() - 1), service: service("s", "v", "stale") };
        fs::write(dir.join("s").join("stale.json"), serde_json::to_vec(&stale).unwrap()).unwrap();
        assert_eq!(registry.get_service("s").await.unwrap()[0].nodes.len(), 1);
        assert!(!dir.join("s").join("stale.json").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn heartbeat_is_update_and_keeps_the_node() {
        let dir = temp_dir("heartbeat");
        let registry = LocalRegistry::with_dir(&dir).unwrap();
        let mut watcher = registry.watch(None).await.unwrap();
        let svc = service("s", "v", "n");
        registry.register(&svc, Duration::from_millis(400)).await.unwrap();
        assert_eq!(next_event(&mut watcher).await.action, Action::Create);
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            registry.register(&svc, Duration::from_millis(400)).await.unwrap();
            let event = next_event(&mut watcher).await;
            assert_eq!(event.action, Action::Update, "{event:?}");
        }
        assert_eq!(registry.get_service("s").await.unwrap().len(), 1);
        registry.deregister(&svc).await.unwrap();
        let event = next_event(&mut watcher).await;
        assert_eq!((event.action, event.service), (Action::Delete, svc));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn service_directories_do_not_outlive_their_nodes() {
        let dir = temp_dir("dirs");
        let registry = LocalRegistry::with_dir(&dir).unwrap();
        registry.register(&service("s", "v", "a"), Duration::ZERO).await.unwrap();
        registry.register(&service("s", "v", "b"), Duration::ZERO).await.unwrap();
        registry.deregister(&service("s", "v", "a")).await.unwrap();
        assert!(dir.join("s").is_dir(), "node b is still registered");
        registry.deregister(&service("s", "v", "b")).await.unwrap();
        assert!(!dir.join("s").exists(), "the last deregister removes the service directory");
        // Registering again makes it again.
        registry.register(&service("s", "v", "a"), Duration::ZERO).await.unwrap();
        assert_eq!(registry.get_service("s").await.unwrap().len(), 1);
        // Empty directories left by older versions are removed by a watcher's scan once they are
        // old enough; a fresh one (a writer between its mkdir and its rename) is left alone.
        fs::create_dir(dir.join("leftover")).unwrap();
        fs::create_dir(dir.join("fresh")).unwrap();
        let old = SystemTime::now() - LEFTOVER_DIR_AGE - Duration::from_secs(1);
        fs::File::open(dir.join("leftover")).unwrap().set_modified(old).unwrap();
        let _watcher = registry.watch(None).await.unwrap();
        assert!(!dir.join("leftover").exists());
        assert!(dir.join("fresh").is_dir());
        assert!(dir.join("s").is_dir());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn watchers_see_changes_in_directories_they_found_unchanged() {
        // Both ways of rescanning: after inotify, only the directories a change names; when
        // polling, every directory, skipping those whose stamp is as it was.
        for polling in [false, true] {
            let dir = temp_dir("stamps");
            let mut registry = LocalRegistry::with_dir(&dir).unwrap();
            if polling {
                registry = registry.poll_only(Duration::from_millis(20));
            }
            let mut watcher = registry.watch(None).await.unwrap();
            let (a, b) = (service("a", "v", "n"), service("b", "v", "n"));
            registry.register(&a, Duration::ZERO).await.unwrap();
            registry.register(&b, Duration::from_secs(60)).await.unwrap();
            assert_eq!(next_event(&mut watcher).await.action, Action::Create);
            assert_eq!(next_event(&mut watcher).await.action, Action::Create);
            // Past DIR_STAMP_SETTLED, rescans take both directories as they were while their
            // stamps stay the same.
            tokio::time::sleep(DIR_STAMP_SETTLED + Duration::from_millis(300)).await;
            registry.register(&b, Duration::from_secs(60)).await.unwrap();
            let event = next_event(&mut watcher).await;
            assert_eq!((event.action, event.service.name.as_str()), (Action::Update, "b"), "polling: {polling}");
            registry.deregister(&a).await.unwrap();
            let event = next_event(&mut watcher).await;
            assert_eq!((event.action, event.service.name.as_str()), (Action::Delete, "a"), "polling: {polling}");
            let quiet = tokio::time::timeout(Duration::from_millis(300), watcher.next()).await;
            assert!(quiet.is_err(), "nothing else changed, polling: {polling}: {quiet:?}");
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_change_is_placed_in_its_service_directory() {
        let root = Path::new("/registry");
        let layout = Layout { root: Arc::new(root.to_path_buf()) };
        let temp = layout.temp_path("tmp", Some("go.micro.http.broker-t%2Fx"));
        assert_eq!(changed_dir(root, &temp).as_deref(), Some("go.micro.http.broker-t%2Fx"));
        assert_eq!(changed_dir(root, &root.join("svc")).as_deref(), Some("svc"));
        // Unknown: the root itself, a path below a service directory, a temporary name without
        // its directory (one that did not fit, or an older version's).
        assert_eq!(changed_dir(root, root), None);
        assert_eq!(changed_dir(root, &root.join("svc").join("n.json")), None);
        assert_eq!(changed_dir(root, &layout.temp_path("del", None)), None);
        assert_eq!(changed_dir(root, &root.join(".tmp-1-2-3")), None);
        let temp = layout.temp_path("gc", Some(&"x".repeat(240)));
        assert!(temp.file_name().unwrap().len() <= MAX_FILE_NAME);
        assert_eq!(changed_dir(root, &temp), None);
    }

    #[test]
    fn the_change_log_names_what_changed_or_says_it_cannot() {
        let names = |names: &[&str]| Some(names.iter().map(|name| name.to_string()).collect::<BTreeSet<_>>());
        let mut log = ChangeLog::default();
        let mut seen = log.end();
        for name in ["a", "b", "a"] {
            log.push(Some(name.into()));
        }
        assert_eq!(log.since(&mut seen), names(&["a", "b"]));
        assert_eq!(log.since(&mut seen), names(&[]));
        log.push(None);
        assert_eq!(log.since(&mut seen), None, "a change that was not placed");
        assert_eq!(log.since(&mut seen), names(&[]));
        let mut lagging = log.end();
        for _ in 0..=ChangeLog::CAPACITY {
            log.push(Some("c".into()));
        }
        assert_eq!(log.since(&mut lagging), None, "a watcher that fell behind the log");
        assert_eq!(log.since(&mut lagging), names(&[]));
    }

    #[tokio::test]
    async fn polling_watcher_sees_changes() {
        let dir = temp_dir("poll");
        let registry = LocalRegistry::with_dir(&dir).unwrap().poll_only(Duration::from_millis(5));
        let mut watcher = registry.watch(Some("s")).await.unwrap();
        registry.register(&service("other", "v", "x"), Duration::ZERO).await.unwrap();
        registry.register(&service("s", "v", "n"), Duration::ZERO).await.unwrap();
        let event = next_event(&mut watcher).await;
        assert_eq!((event.action, event.service.name.as_str()), (Action::Create, "s"));
        registry.deregister(&service("s", "v", "n")).await.unwrap();
        assert_eq!(next_event(&mut watcher).await.action, Action::Delete);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn watch_breaks_with_an_error_when_the_directory_vanishes() {
        let dir = temp_dir("vanish");
        let registry = LocalRegistry::with_dir(&dir).unwrap().poll_only(Duration::from_millis(5));
        let mut watcher = registry.watch(None).await.unwrap();
        fs::remove_dir_all(&dir).unwrap();
        let item = tokio::time::timeout(Duration::from_secs(5), watcher.next()).await.unwrap();
        assert!(matches!(item, Some(Err(_))), "{item:?}");
        assert!(tokio::time::timeout(Duration::from_secs(5), watcher.next()).await.unwrap().is_none());
    }

    #[test]
    fn default_dir_is_private_and_per_user() {
        let uid = current_uid().unwrap();
        let probe = temp_dir("uid");
        fs::write(&probe, b"").unwrap();
        assert_eq!(uid, fs::metadata(&probe).unwrap().uid());
        fs::remove_file(&probe).unwrap();
        let dir = LocalRegistry::default_dir().unwrap();
        let expected_tail = if std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).is_dir()) {
            LOCAL_DIR_NAME.to_owned()
        } else {
            format!("{LOCAL_DIR_NAME}-{uid}")
        };
        assert_eq!(dir.file_name().and_then(|n| n.to_str()), Some(expected_tail.as_str()));

        let private = temp_dir("private");
        fs::create_dir(&private).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o755)).unwrap();
        prepare_private_dir(&private).unwrap();
        assert_eq!(fs::metadata(&private).unwrap().mode() & 0o777, 0o700);
        // A symlink is refused.
        let link = temp_dir("link");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        let err = prepare_private_dir(&link).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        fs::remove_file(&link).unwrap();
        fs::remove_dir_all(&private).unwrap();
        let fresh = temp_dir("fresh").join("inner");
        prepare_private_dir(&fresh).unwrap();
        assert_eq!(fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        fs::remove_dir_all(fresh.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn the_directory_is_made_again_when_removed() {
        let dir = temp_dir("recreate");
        let registry = LocalRegistry::with_dir(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        let mut watcher = registry.watch(None).await.unwrap();
        assert!(dir.is_dir());
        fs::remove_dir_all(&dir).unwrap();
        registry.register(&service("s", "v", "n"), Duration::ZERO).await.unwrap();
        assert_eq!(registry.get_service("s").await.unwrap().len(), 1);
        // The old watcher broke or sees the node; either way it does not hang.
        let item = tokio::time::timeout(Duration::from_secs(5), watcher.next()).await.unwrap();
        assert!(item.is_some());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_is_not_a_registry_dir() {
        let path = temp_dir("file");
        fs::write(&path, b"x").unwrap();
        assert!(LocalRegistry::with_dir(&path).is_err());
        fs::remove_file(&path).unwrap();
    }
}
