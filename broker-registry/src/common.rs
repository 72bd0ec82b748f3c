//! Helpers shared by the implementations: validation, the one-node-per-entry model, grouping by
//! version, name escaping, lock handling and Go-compatible JSON.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serializer;

use crate::{Error, Result, Service};

/// Locks `mutex`, ignoring poisoning: every critical section here leaves the state consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Checks what every `register` needs: a name, at least one node, and node ids.
pub(crate) fn validate_for_register(service: &Service) -> Result<()> {
    validate_name(&service.name)?;
    if service.nodes.is_empty() {
        return Err(Error::invalid_input(format!(
            "service {:?} has no node to register: require at least one node",
            service.name
        )));
    }
    for node in &service.nodes {
        if node.id.is_empty() {
            return Err(Error::invalid_input(format!("a node of service {:?} has an empty id", service.name)));
        }
    }
    Ok(())
}

/// Checks a service name given to `get_service`, `deregister` or `watch`.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_input("the service name must not be empty"));
    }
    Ok(())
}

/// The registry entries of `service`: one [`Service`] per node, holding just that node, as Go
/// Micro stores them (one etcd key per node).
pub(crate) fn split_nodes(service: &Service) -> impl Iterator<Item = Service> + '_ {
    service.nodes.iter().map(move |node| Service {
        name: service.name.clone(),
        version: service.version.clone(),
        metadata: service.metadata.clone(),
        endpoints: service.endpoints.clone(),
        nodes: vec![node.clone()],
    })
}

/// Groups one-node entries (or any services of one name) into one [`Service`] per version, the
/// versions sorted and the nodes of each sorted by id, so that results are deterministic.
pub(crate) fn group_by_version(entries: impl IntoIterator<Item = Service>) -> Vec<Service> {
    // Usually every entry has one version: that one is gathered without a map (a map's first
    // insert allocates a node, on every lookup and every watch event).
    let mut entries = entries.into_iter();
    let Some(mut first) = entries.next() else { return Vec::new() };
    let mut others: BTreeMap<String, Service> = BTreeMap::new();
    for entry in entries {
        if entry.version == first.version {
            first.nodes.extend(entry.nodes);
            continue;
        }
        match others.get_mut(&entry.version) {
            Some(service) => service.nodes.extend(entry.nodes),
            None => {
                others.insert(entry.version.clone(), entry);
            }
        }
    }
    let versions: Vec<Service> = if others.is_empty() {
        vec![first]
    } else {
        others.insert(first.version.clone(), first);
        others.into_values().collect()
    };
    versions
        .into_iter()
        .filter_map(|mut service| {
            service.nodes.sort_by(|a, b| a.id.cmp(&b.id));
            service.nodes.dedup_by(|a, b| a.id == b.id);
            (!service.nodes.is_empty()).then_some(service)
        })
        .collect()
}

/// Escapes `name` into one file name component: ASCII letters, digits, `-`, `_` and `.` are
/// kept (except a leading `.`), every other byte becomes `%XX`. Reversible and never `.`/`..`.
pub(crate) fn escape_component(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, byte) in name.bytes().enumerate() {
        let keep = byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' || (byte == b'.' && i > 0);
        if keep {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Serializes a string map with sorted keys, as Go's `encoding/json` does.
pub(crate) fn sorted_map<S: Serializer>(map: &HashMap<String, String>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_map(map.iter().collect::<BTreeMap<_, _>>())
}

/// [`sorted_map`] for an optional map (`null` when absent).
pub(crate) fn sorted_optional_map<S: Serializer>(
    map: &Option<HashMap<String, String>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match map {
        Some(map) => sorted_map(map, serializer),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Node;

    #[test]
    fn escape_keeps_safe_bytes_and_escapes_the_rest() {
        assert_eq!(escape_component("topic:a/b c"), "topic%3Aa%2Fb%20c");
        assert_eq!(escape_component("micro.http.broker"), "micro.http.broker");
        assert_eq!(escape_component(".."), "%2E.");
        assert_eq!(escape_component("."), "%2E");
        assert_eq!(escape_component("100%"), "100%25");
        assert_eq!(escape_component("é"), "%C3%A9");
        // Distinct names stay distinct.
        assert_ne!(escape_component("a/b"), escape_component("a%2Fb"));
    }

    #[test]
    fn grouping_merges_versions_and_sorts() {
        let a = Service::new("s", "v2").with_node(Node::new("b", "h:2"));
        let b = Service::new("s", "v1").with_node(Node::new("z", "h:3"));
        let c = Service::new("s", "v2").with_node(Node::new("a", "h:1"));
        let grouped = group_by_version([a, b, c]);
        assert_eq!(grouped.len(), 2);
        assert_eq!(grouped[0].version, "v1");
        assert_eq!(grouped[1].version, "v2");
        let ids: Vec<_> = grouped[1].nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(group_by_version([Service::new("s", "v")]).is_empty());
        // One version (the usual case): its nodes sorted, a repeated id kept once.
        let node = |id: &str| Service::new("s", "v").with_node(Node::new(id, "h:1"));
        let grouped = group_by_version([node("b"), node("a"), node("b")]);
        assert_eq!(grouped.len(), 1);
        let ids: Vec<_> = grouped[0].nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn json_is_go_micro_shape_with_sorted_metadata() {
        let service = Service::new("micro.http.broker", "ff.http.broadcast").with_node(
            Node::new("events-1", "10.0.0.5:40123")
                .with_metadata("topic", "events")
                .with_metadata("secure", "false")
                .with_metadata("broker", "http"),
        );
        let json = serde_json::to_string(&service).unwrap();
        assert_eq!(
            json,
            r#"{"name":"micro.http.broker","version":"ff.http.broadcast","metadata":null,"endpoints":null,"nodes":[{"id":"events-1","address":"10.0.0.5:40123","metadata":{"broker":"http","secure":"false","topic":"events"}}]}"#
        );
        let back: Service = serde_json::from_str(&json).unwrap();
        assert_eq!(back, service);
    }

    #[test]
    fn go_json_with_nulls_and_extra_fields_is_read() {
        let json = r#"{"name":"s","version":"v","metadata":{"k":"v"},"endpoints":[{"name":"x"}],"nodes":[{"metadata":null,"id":"n","address":"a:1","port":0}]}"#;
        let service: Service = serde_json::from_str(json).unwrap();
        assert_eq!(service.nodes[0].metadata.len(), 0);
        assert_eq!(service.metadata.as_ref().and_then(|m| m.get("k")).map(String::as_str), Some("v"));
        assert!(service.endpoints.is_some());
        let nodes_null: Service = serde_json::from_str(r#"{"name":"s","version":"v","nodes":null}"#).unwrap();
        assert!(nodes_null.nodes.is_empty());
    }

    #[test]
    fn register_validation() {
        assert!(validate_for_register(&Service::new("s", "v")).is_err());
        assert!(validate_for_register(&Service::new("", "v").with_node(Node::new("n", "a"))).is_err());
        assert!(validate_for_register(&Service::new("s", "v").with_node(Node::new("", "a"))).is_err());
        assert!(validate_for_register(&Service::new("s", "").with_node(Node::new("n", "a"))).is_ok());
    }
}
