//! The mapping between broker names and messages and Pub/Sub's.
//!
//! ## Names
//! Pub/Sub topic and subscription ids are 3–255 characters of `[A-Za-z0-9-_.~+%]`, start with a
//! letter and do not start with `goog`. A broker topic (any [`validate_topic`](broker_core::validate_topic)
//! name) maps to a legal id with [`topic_id`], reversibly, so two broker topics never share a
//! Pub/Sub topic:
//! - ASCII letters, digits and `- _ . +` stay as they are, so `user.registered` is the Pub/Sub
//!   topic `user.registered`;
//! - every other byte of the UTF-8 name (`~`, `%`, `/`, `:`, non-ASCII, ...) becomes `~XX`
//!   (upper-case hex): `orders/eu` → `orders~2Feu`. Not `%XX`: Pub/Sub allows `%` in ids, but
//!   the emulator answers the admin (REST) calls naming such an id with HTTP 404;
//! - when the result does not start with a letter, starts with `goog` (any case) or is shorter
//!   than 3 characters, it gets the prefix `mb~~` (the escaping never writes `~~`, so the prefix
//!   cannot collide): `1` → `mb~~1`, `google.x` → `mb~~google.x`;
//! - a result longer than 255 characters is an [`InvalidInput`](broker_core::ErrorKind::InvalidInput)
//!   error naming the topic.
//!
//! A queue group's subscription is `<topic id>~~<group, escaped the same way>` (one subscription
//! per topic and group, shared by the group's members); a broadcast subscriber's is
//! `<topic id>~~b~~<unique>`, of its own (an escaped group never holds `~~`, so the two cannot meet). Dead letters of `<topic>` go to the broker topic
//! `<topic>.dlq`, mapped like any other.
//!
//! ## Messages
//! Body = the message `data`; headers = message attributes, as Go Micro's Google Pub/Sub plugin
//! maps them. An ordering key becomes the message's `ordering_key`. Pub/Sub refuses a message
//! with neither data nor attributes: such a message (empty body, no headers) carries the internal
//! attribute [`EMPTY_ATTRIBUTE`], removed on receipt. Attributes are checked before publishing
//! against Pub/Sub's limits ([`check_attributes`]) so that a bad header is an `InvalidInput` error
//! naming it, not a server error.

use std::collections::HashMap;

use broker_core::{Error, Headers, Message, Result};

/// The longest topic or subscription id Pub/Sub accepts.
pub const MAX_ID_LEN: usize = 255;

/// Pub/Sub's limits on attributes: key bytes, value bytes, and count.
pub const MAX_ATTRIBUTE_KEY: usize = 256;
/// The longest attribute value Pub/Sub accepts, in bytes.
pub const MAX_ATTRIBUTE_VALUE: usize = 1024;
/// The most attributes a Pub/Sub message may carry.
pub const MAX_ATTRIBUTES: usize = 100;

/// The internal attribute on a message with an empty body and no headers (Pub/Sub needs one of
/// the two); removed before the handler sees the message.
pub const EMPTY_ATTRIBUTE: &str = "x-micro-empty";

/// The prefix of ids that would otherwise not start with a letter, or start with `goog`.
const PREFIX: &str = "mb~~";

/// Between a topic id and the rest of a subscription id.
const SEPARATOR: &str = "~~";

/// Escapes `name` into Pub/Sub's id alphabet (see the [module docs](self)).
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'+' => out.push(char::from(byte)),
            other => out.push_str(&format!("~{other:02X}")),
        }
    }
    out
}

/// Whether `id` needs [`PREFIX`]: too short, not starting with a letter, or starting with `goog`.
fn needs_prefix(id: &str) -> bool {
    id.len() < 3
        || !id.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
        || id.get(..4).is_some_and(|start| start.eq_ignore_ascii_case("goog"))
}

fn checked(id: String, what: &str) -> Result<String> {
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid_input(format!(
            "{what} maps to the Pub/Sub id {:?}… of {} characters; Pub/Sub ids are at most {MAX_ID_LEN} \
             (characters other than letters, digits and - _ . + take three): use a shorter name",
            id.chars().take(40).collect::<String>(),
            id.len()
        )));
    }
    Ok(id)
}

/// The Pub/Sub topic id of broker topic `topic` (see the [module docs](self)).
///
/// ```
/// use broker_gcp_pubsub::wire::topic_id;
/// assert_eq!(topic_id("user.registered").unwrap(), "user.registered");
/// assert_eq!(topic_id("orders/eu").unwrap(), "orders~2Feu");
/// assert_eq!(topic_id("1").unwrap(), "mb~~1");
/// assert_eq!(topic_id("google.events").unwrap(), "mb~~google.events");
/// ```
pub fn topic_id(topic: &str) -> Result<String> {
    let escaped = escape(topic);
    let id = if needs_prefix(&escaped) { format!("{PREFIX}{escaped}") } else { escaped };
    checked(id, &format!("the topic {topic:?}"))
}

/// The subscription id of queue group `group` on broker topic `topic`: `<topic id>~~<group>`.
pub fn group_subscription_id(topic: &str, group: &str) -> Result<String> {
    let id = format!("{}{SEPARATOR}{}", topic_id(topic)?, escape(group));
    checked(id, &format!("the queue group {group:?} of the topic {topic:?}"))
}

/// The subscription id of a broadcast subscriber of `topic`: `<topic id>~~b~~<unique>`.
pub fn broadcast_subscription_id(topic: &str, unique: &str) -> Result<String> {
    let id = format!("{}{SEPARATOR}b{SEPARATOR}{}", topic_id(topic)?, escape(unique));
    checked(id, &format!("a broadcast subscription of the topic {topic:?}"))
}

/// Checks `headers` against Pub/Sub's attribute limits, naming the first that breaks one.
pub fn check_attributes(headers: &Headers) -> Result<()> {
    if headers.len() > MAX_ATTRIBUTES {
        return Err(Error::invalid_input(format!(
            "the message has {} headers; a Pub/Sub message carries at most {MAX_ATTRIBUTES} attributes",
            headers.len()
        )));
    }
    for (key, value) in headers {
        let shown = || key.chars().take(32).collect::<String>();
        if key.is_empty() {
            return Err(Error::invalid_input("a header name is empty; Pub/Sub attribute keys must not be empty"));
        }
        if key.len() > MAX_ATTRIBUTE_KEY {
            return Err(Error::invalid_input(format!(
                "header name {:?}… is {} bytes; Pub/Sub attribute keys are at most {MAX_ATTRIBUTE_KEY} bytes",
                shown(),
                key.len()
            )));
        }
        if key.get(..4).is_some_and(|start| start.eq_ignore_ascii_case("goog")) {
            return Err(Error::invalid_input(format!(
                "header name {key:?} starts with \"goog\", which Pub/Sub reserves for itself"
            )));
        }
        if value.len() > MAX_ATTRIBUTE_VALUE {
            return Err(Error::invalid_input(format!(
                "the value of header {:?} is {} bytes; Pub/Sub attribute values are at most {MAX_ATTRIBUTE_VALUE} bytes",
                shown(),
                value.len()
            )));
        }
    }
    Ok(())
}

/// The Pub/Sub message of `message`, with `ordering_key` (empty: none).
pub fn encode(message: &Message, ordering_key: &str) -> Result<google_cloud_pubsub::model::Message> {
    check_attributes(&message.headers)?;
    let mut attributes: HashMap<String, String> = message.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    if message.body.is_empty() && attributes.is_empty() {
        attributes.insert(EMPTY_ATTRIBUTE.to_string(), "1".to_string());
    }
    Ok(google_cloud_pubsub::model::Message::new()
        .set_data(message.body.clone())
        .set_attributes(attributes)
        .set_ordering_key(ordering_key))
}

/// The broker message of a received Pub/Sub message.
pub fn decode(message: google_cloud_pubsub::model::Message) -> Message {
    let mut headers: Headers = message.attributes.into_iter().collect();
    headers.remove(EMPTY_ATTRIBUTE);
    Message::with_headers(headers, message.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_legal_and_distinct() {
        let topics = [
            "user.registered",
            "a",
            "ab",
            "9lives",
            "goog",
            "GOOGle",
            "orders/eu",
            "x~y",
            "x~7Ey",
            "ü-topic",
            "mb~~1",
            "1",
        ];
        let ids: Vec<String> = topics.iter().map(|t| topic_id(t).unwrap()).collect();
        for id in &ids {
            assert!(id.len() >= 3 && id.len() <= MAX_ID_LEN, "{id}");
            assert!(id.as_bytes()[0].is_ascii_alphabetic(), "{id}");
            assert!(!id.to_ascii_lowercase().starts_with("goog"), "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~+".contains(&b)), "{id}");
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "{ids:?}");
        assert_eq!(topic_id("a").unwrap(), "mb~~a");
        assert_eq!(topic_id("x~y").unwrap(), "x~7Ey");
        assert_eq!(topic_id("mb~~1").unwrap(), "mb~7E~7E1");
        assert_eq!(topic_id("100%").unwrap(), "mb~~100~25");
        assert_eq!(group_subscription_id("orders", "billing").unwrap(), "orders~~billing");
        assert_eq!(broadcast_subscription_id("orders", "42").unwrap(), "orders~~b~~42");
        assert_ne!(
            group_subscription_id("orders", "b~~42").unwrap(),
            broadcast_subscription_id("orders", "42").unwrap()
        );
    }

    #[test]
    fn overlong_ids_are_invalid_input() {
        let err = topic_id(&"é".repeat(100)).unwrap_err();
        assert_eq!(err.kind(), broker_core::ErrorKind::InvalidInput);
        assert!(topic_id(&"a".repeat(255)).is_ok());
        assert!(group_subscription_id(&"a".repeat(250), "group").is_err());
    }

    #[test]
    fn attributes_round_trip_and_limits() {
        let message = Message::new("body").with_header("Content-Type", "application/json");
        let encoded = encode(&message, "key").unwrap();
        assert_eq!(encoded.ordering_key, "key");
        assert_eq!(decode(encoded), message);
        let empty = encode(&Message::new(""), "").unwrap();
        assert!(empty.attributes.contains_key(EMPTY_ATTRIBUTE));
        assert_eq!(decode(empty), Message::new(""));
        for bad in [
            Message::new("x").with_header("k".repeat(257), "v"),
            Message::new("x").with_header("k", "v".repeat(1025)),
            Message::new("x").with_header("googthing", "v"),
            Message::new("x").with_header("", "v"),
        ] {
            assert_eq!(encode(&bad, "").unwrap_err().kind(), broker_core::ErrorKind::InvalidInput);
        }
        let mut many = Message::new("x");
        for i in 0..101 {
            many = many.with_header(format!("h{i}"), "v");
        }
        assert_eq!(encode(&many, "").unwrap_err().kind(), broker_core::ErrorKind::InvalidInput);
    }
}
