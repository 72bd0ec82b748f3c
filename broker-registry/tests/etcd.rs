//! The etcd registry against a real etcd (`scripts/services/etcd.sh` starts one).
//!
//! The endpoint comes from `BROKER_TEST_ETCD_URL` (e.g. `http://127.0.0.1:2379`). Without it the
//! tests print why and pass, unless `BROKER_TEST_REQUIRE` is `all` or names `etcd`: then they fail.
#![cfg(feature = "etcd")]

use std::time::Duration;

use broker_registry::etcd::{ETCD_PREFIX, EtcdOptions, etcd_key};
use broker_registry::{Action, EtcdRegistry, Node, Registry, Service, WatchEvent, Watcher};
use etcd_client::{Client, GetOptions};
use futures::StreamExt;

const ENV_URL: &str = "BROKER_TEST_ETCD_URL";
const WAIT: Duration = Duration::from_secs(10);

fn required() -> bool {
    std::env::var("BROKER_TEST_REQUIRE").is_ok_and(|value| {
        value.split(',').map(|part| part.trim().to_ascii_lowercase()).any(|part| part == "all" || part == "etcd")
    })
}

/// The etcd endpoint, or `None` (after printing why) when the test should be skipped.
fn endpoint() -> Option<String> {
    match std::env::var(ENV_URL) {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_owned()),
        _ if required() => {
            panic!(
                "{ENV_URL} is not set and BROKER_TEST_REQUIRE requires etcd: run `eval \"$(scripts/services/etcd.sh)\"`"
            )
        }
        _ => {
            println!("SKIP: {ENV_URL} is not set (run `eval \"$(scripts/services/etcd.sh)\"` to test against etcd)");
            None
        }
    }
}

async fn setup() -> Option<(EtcdRegistry, Client)> {
    let url = endpoint()?;
    let registry = EtcdRegistry::connect(std::slice::from_ref(&url)).await.unwrap();
    let raw = Client::connect([url.as_str()], None).await.unwrap();
    Some((registry, raw))
}

/// A service name no other test (or run) uses.
fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("test.{tag}.{}.{nanos}", std::process::id())
}

fn service(name: &str, version: &str, id: &str) -> Service {
    Service::new(name, version).with_node(
        Node::new(id, "127.0.0.1:40123")
            .with_metadata("topic", "events")
            .with_metadata("secure", "false")
            .with_metadata("broker", "http"),
    )
}

async fn next_event(watcher: &mut Watcher, name: &str) -> WatchEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, watcher.next()).await {
            Ok(Some(Ok(event))) if event.service.name == name => return event,
            Ok(Some(Ok(_))) => continue, // another test's service
            other => panic!("expected a watch event for {name}, got {other:?}"),
        }
    }
}

async fn raw_get(raw: &Client, key: &str) -> Option<etcd_client::KeyValue> {
    raw.clone().get(key, None).await.unwrap().kvs().first().cloned()
}

#[tokio::test]
async fn reads_a_service_written_exactly_as_go_micro_writes_it() {
    let Some((registry, raw)) = setup().await else { return };
    let name = unique("go/written");
    let key_name = name.replace('/', "-");
    // Go's json.Marshal of registry.Service (field order of the Go structs, node metadata sorted).
    let go_value = |version: &str, id: &str, port: u16| {
        format!(
            r#"{{"name":"{name}","version":"{version}","metadata":null,"endpoints":null,"nodes":[{{"id":"{id}","address":"10.0.0.5:{port}","metadata":{{"broker":"http","secure":"false","topic":"events"}}}}]}}"#
        )
    };
    let mut client = raw.clone();
    let prefix = format!("{ETCD_PREFIX}{key_name}/");
    client.put(format!("{prefix}events-aaa"), go_value("ff.http.broadcast", "events-aaa", 1), None).await.unwrap();
    client.put(format!("{prefix}events-bbb"), go_value("ff.http.broadcast", "events-bbb", 2), None).await.unwrap();
    client.put(format!("{prefix}events-ccc"), go_value("emails", "events-ccc", 3), None).await.unwrap();
    // Older Go Micro nodes carried a "port" field; node metadata may be null.
    let old = format!(
        r#"{{"name":"{name}","version":"emails","metadata":{{"a":"b"}},"endpoints":[],"nodes":[{{"id":"events-ddd","address":"10.0.0.6","port":4,"metadata":null}}]}}"#
    );
    client.put(format!("{prefix}events-ddd"), old, None).await.unwrap();
    client.put(format!("{prefix}garbage"), "not json", None).await.unwrap();
    // A service whose name merely starts with ours is not ours.
    client.put(format!("{ETCD_PREFIX}{key_name}x/other"), go_value("v", "other", 5), None).await.unwrap();

    let found = registry.get_service(&name).await.unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].version, "emails");
    assert_eq!(found[0].nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["events-ccc", "events-ddd"]);
    assert!(found[0].nodes[1].metadata.is_empty());
    assert_eq!(found[1].version, "ff.http.broadcast");
    assert_eq!(found[1].name, name);
    assert_eq!(found[1].metadata, None);
    assert_eq!(found[1].nodes.len(), 2);
    let node = &found[1].nodes[0];
    assert_eq!((node.id.as_str(), node.address.as_str()), ("events-aaa", "10.0.0.5:1"));
    assert_eq!(node.metadata.get("topic").map(String::as_str), Some("events"));

    client.delete(prefix.as_str(), Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    client.delete(format!("{ETCD_PREFIX}{key_name}x/other"), None).await.unwrap();
    assert!(registry.get_service(&name).await.unwrap().is_empty());
}

#[tokio::test]
async fn writes_go_micro_keys_and_json_with_a_lease() {
    let Some((registry, raw)) = setup().await else { return };
    let name = unique("we/write");
    let svc = service(&name, "ff.http.broadcast", "events/1234");
    registry.register(&svc, Duration::from_secs(30)).await.unwrap();

    let key = format!("/micro/registry/{}/events-1234", name.replace('/', "-"));
    assert_eq!(etcd_key(&name, "events/1234"), key);
    let kv = raw_get(&raw, &key).await.expect("the key Go Micro would read");
    let expected = format!(
        r#"{{"name":"{name}","version":"ff.http.broadcast","metadata":null,"endpoints":null,"nodes":[{{"id":"events/1234","address":"127.0.0.1:40123","metadata":{{"broker":"http","secure":"false","topic":"events"}}}}]}}"#
    );
    assert_eq!(kv.value_str().unwrap(), expected);
    assert_ne!(kv.lease(), 0, "registered with a lease");
    let ttl = raw.clone().lease_time_to_live(kv.lease(), None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 30);
    assert!(ttl.ttl() > 25, "{}", ttl.ttl());

    // Nothing else was written under our prefix.
    let prefix = format!("/micro/registry/{}/", name.replace('/', "-"));
    let all = raw.clone().get(prefix, Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(all.kvs().len(), 1);

    // A zero TTL writes no lease.
    let forever = service(&name, "ff.http.broadcast", "forever");
    registry.register(&forever, Duration::ZERO).await.unwrap();
    assert_eq!(raw_get(&raw, &etcd_key(&name, "forever")).await.unwrap().lease(), 0);

    // Deregistering another version leaves the key; the right version deletes it.
    registry.deregister(&service(&name, "other-version", "events/1234")).await.unwrap();
    assert!(raw_get(&raw, &key).await.is_some());
    registry.deregister(&svc).await.unwrap();
    registry.deregister(&forever).await.unwrap();
    assert!(raw_get(&raw, &key).await.is_none());
    assert!(registry.get_service(&name).await.unwrap().is_empty());
    // Deregistering what is not there is fine.
    registry.deregister(&svc).await.unwrap();
}

#[tokio::test]
async fn reregistering_keeps_the_lease_alive_and_replaces_a_lost_one() {
    let Some((registry, raw)) = setup().await else { return };
    let name = unique("lease");
    let svc = service(&name, "v", "n1");
    let key = etcd_key(&name, "n1");
    let ttl = Duration::from_secs(2);
    registry.register(&svc, ttl).await.unwrap();
    let lease = raw_get(&raw, &key).await.unwrap().lease();
    // Heartbeats for three times the TTL keep the node, on the same lease.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(750)).await;
        registry.register(&svc, ttl).await.unwrap();
        let kv = raw_get(&raw, &key).await.expect("kept alive");
        assert_eq!(kv.lease(), lease, "the same lease, kept alive");
    }
    // The lease vanishes (as after a long pause): the next registration grants a new one.
    raw.clone().lease_revoke(lease).await.unwrap();
    assert!(raw_get(&raw, &key).await.is_none());
    registry.register(&svc, ttl).await.unwrap();
    let kv = raw_get(&raw, &key).await.expect("registered again");
    assert_ne!(kv.lease(), lease);
    // A different TTL gets a lease of its own.
    registry.register(&svc, Duration::from_secs(20)).await.unwrap();
    let kv2 = raw_get(&raw, &key).await.unwrap();
    assert_eq!(raw.clone().lease_time_to_live(kv2.lease(), None).await.unwrap().granted_ttl(), 20);
    registry.deregister(&svc).await.unwrap();
    assert!(raw_get(&raw, &key).await.is_none());
}

#[tokio::test]
async fn watch_sees_create_update_delete_and_ttl_expiry() {
    let Some((registry, raw)) = setup().await else { return };
    let name = unique("watch");
    let mut one = registry.watch(Some(&name)).await.unwrap();
    let mut all = registry.watch(None).await.unwrap();
    let svc = service(&name, "v", "n1");
    registry.register(&svc, Duration::from_secs(30)).await.unwrap();
    registry.register(&svc, Duration::from_secs(30)).await.unwrap();
    registry.deregister(&svc).await.unwrap();
    for watcher in [&mut one, &mut all] {
        for expected in [Action::Create, Action::Update, Action::Delete] {
            let event = next_event(watcher, &name).await;
            assert_eq!(event.action, expected);
            assert_eq!(event.service, svc);
        }
    }

    // A node that is not kept alive expires (etcd's minimum lease TTL is about 2 s).
    let short = service(&name, "v", "short-lived");
    registry.register(&short, Duration::from_secs(2)).await.unwrap();
    assert_eq!(next_event(&mut one, &name).await.action, Action::Create);
    let started = std::time::Instant::now();
    let event = next_event(&mut one, &name).await;
    assert_eq!((event.action, event.service.nodes[0].id.as_str()), (Action::Delete, "short-lived"));
    assert_eq!(event.service.version, "v", "the deleted node's service, from the previous value");
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());
    assert!(registry.get_service(&name).await.unwrap().is_empty());

    // A key Go Micro writes is seen too.
    let go = format!(
        r#"{{"name":"{name}","version":"g","metadata":null,"endpoints":null,"nodes":[{{"id":"go","address":"a:1","metadata":{{}}}}]}}"#
    );
    raw.clone().put(etcd_key(&name, "go"), go, None).await.unwrap();
    let event = next_event(&mut one, &name).await;
    assert_eq!((event.action, event.service.version.as_str()), (Action::Create, "g"));
    raw.clone().delete(etcd_key(&name, "go"), None).await.unwrap();
    assert_eq!(next_event(&mut one, &name).await.action, Action::Delete);
}

#[tokio::test]
async fn selected_by_name_and_env() {
    let Some(url) = endpoint() else { return };
    let registry = broker_registry::from_name("etcd", std::slice::from_ref(&url)).await.unwrap();
    assert_eq!(registry.name(), "etcd");
    let lookup = |key: &str| match key {
        "MICRO_REGISTRY" => Some("etcd".to_owned()),
        "MICRO_REGISTRY_ADDRESS" => Some(format!(" {url} , ")),
        _ => None,
    };
    let registry = broker_registry::from_lookup(lookup).await.unwrap();
    let name = unique("select");
    registry.register(&service(&name, "v", "n"), Duration::from_secs(30)).await.unwrap();
    assert_eq!(registry.get_service(&name).await.unwrap().len(), 1);
    registry.deregister(&service(&name, "v", "n")).await.unwrap();
    // Options as a deployment would set them.
    let options = EtcdOptions::new(vec![url.clone()]).with_request_timeout(Duration::from_secs(2));
    assert_eq!(options.endpoints(), [url]);
    let registry = EtcdRegistry::connect_with(options).await.unwrap();
    assert_eq!(registry.endpoints().len(), 1);
}

#[tokio::test]
async fn cache_over_etcd_sees_a_late_node() {
    let Some((registry, _raw)) = setup().await else { return };
    let registry: broker_registry::SharedRegistry = std::sync::Arc::new(registry);
    let cache = broker_registry::Cache::new(registry.clone());
    let deadline = std::time::Instant::now() + WAIT;
    while !cache.is_watching() {
        assert!(std::time::Instant::now() < deadline, "the cache never started watching");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let name = unique("cache");
    assert!(cache.get_service(&name).await.unwrap().is_empty());
    let mut changes = cache.changes();
    registry.register(&service(&name, "v", "late"), Duration::from_secs(30)).await.unwrap();
    loop {
        tokio::time::timeout(WAIT, changes.changed()).await.unwrap().unwrap();
        if !cache.get_service(&name).await.unwrap().is_empty() {
            break;
        }
    }
    registry.deregister(&service(&name, "v", "late")).await.unwrap();
}
