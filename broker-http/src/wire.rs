//! Go Micro's HTTP broker wire format, in its two dialects.
//!
//! The body of every delivery is Go Micro's JSON codec of `broker.Message`:
//! `{"Header":{…},"Body":"<standard base64>"}`. The topic travels inside the headers: as `:topic`
//! (removed before the handler sees the headers) in the article's dialect, Go Micro ≤ 1.12, and as
//! `Micro-Topic` (kept) in today's, Go Micro 2.5 – 6. The endpoint reads both, whatever it writes.

use std::fmt;

use broker_core::{Message, codec};
use bytes::Bytes;

/// The article's path (Go Micro ≤ 1.18 and the go-plugins HTTP broker).
pub const LEGACY_PATH: &str = "/_sub";
/// Today's path (Go Micro 2.5 – 6).
pub const CURRENT_PATH: &str = "/";
/// The topic header of the article's dialect, removed before the handler runs.
pub const LEGACY_TOPIC_HEADER: &str = ":topic";
/// The topic header of today's dialect, kept.
pub const CURRENT_TOPIC_HEADER: &str = "Micro-Topic";
/// The registry version of broadcast subscriptions.
pub const BROADCAST_VERSION: &str = "ff.http.broadcast";
/// The one registry service name of today's dialect.
pub const CURRENT_SERVICE: &str = "micro.http.broker";

/// Which Go Micro HTTP broker this one speaks when it publishes and registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// The article's: Go Micro ≤ 1.12 (`/_sub`, `:topic`, service `topic:<topic>`).
    #[default]
    Legacy,
    /// Today's: Go Micro 2.5 – 6 (`/`, `Micro-Topic`, service `micro.http.broker`).
    Current,
}

impl Dialect {
    /// Parses `legacy` or `current`.
    pub fn parse(value: &str) -> Option<Dialect> {
        match value.trim().to_ascii_lowercase().as_str() {
            "legacy" => Some(Dialect::Legacy),
            "current" => Some(Dialect::Current),
            _ => None,
        }
    }

    /// The request path.
    pub fn path(self) -> &'static str {
        match self {
            Dialect::Legacy => LEGACY_PATH,
            Dialect::Current => CURRENT_PATH,
        }
    }

    /// The registry service name of `topic`'s subscriptions.
    pub fn service_name(self, topic: &str) -> String {
        match self {
            Dialect::Legacy => format!("topic:{topic}"),
            Dialect::Current => CURRENT_SERVICE.to_string(),
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::Legacy => "legacy",
            Dialect::Current => "current",
        })
    }
}

/// Encodes `message` for `topic` as the JSON body of a delivery (Go Micro's envelope, with the
/// dialect's topic header replacing any header of that name).
pub fn encode(topic: &str, message: &Message, dialect: Dialect) -> Bytes {
    let topic_header = match dialect {
        Dialect::Legacy => LEGACY_TOPIC_HEADER,
        Dialect::Current => CURRENT_TOPIC_HEADER,
    };
    codec::encode_envelope(message, Some((topic_header, topic)))
}

/// Why a delivery body was rejected (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not Go Micro's envelope: not JSON of its shape, or a body that is not base64.
    Envelope(String),
    /// Neither `:topic` nor `Micro-Topic` names a topic.
    MissingTopic,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Envelope(e) => f.write_str(e),
            DecodeError::MissingTopic => {
                write!(f, "no topic: the header \":topic\" or \"Micro-Topic\" is missing or empty")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// A decoded delivery: the topic and the message the handler sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The topic, from `:topic` (removed) or `Micro-Topic` (kept).
    pub topic: String,
    /// Headers and body.
    pub message: Message,
}

/// Decodes a delivery body of either dialect.
pub fn decode(body: &[u8]) -> Result<Decoded, DecodeError> {
    let mut message = codec::decode_envelope(body).map_err(|e| DecodeError::Envelope(e.message().to_string()))?;
    let topic = match message.headers.remove(LEGACY_TOPIC_HEADER) {
        Some(topic) => topic,
        None => message.header(CURRENT_TOPIC_HEADER).unwrap_or_default().to_string(),
    };
    if topic.is_empty() {
        return Err(DecodeError::MissingTopic);
    }
    Ok(Decoded { topic, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_round_trip_removes_topic_header() {
        let msg = Message::new(&b"\x00\xffhello"[..]).with_header("Content-Type", "text/plain").with_header("é", "ü");
        let body = encode("user.registered", &msg, Dialect::Legacy);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["Header"][":topic"], "user.registered");
        assert_eq!(json["Body"], "AP9oZWxsbw==");
        let decoded = decode(&body).unwrap();
        assert_eq!(decoded.topic, "user.registered");
        assert_eq!(decoded.message, msg);
    }

    #[test]
    fn current_dialect_keeps_micro_topic() {
        let msg = Message::new("x").with_header(CURRENT_TOPIC_HEADER, "spoofed");
        let body = encode("events", &msg, Dialect::Current);
        let decoded = decode(&body).unwrap();
        assert_eq!(decoded.topic, "events");
        assert_eq!(decoded.message.header(CURRENT_TOPIC_HEADER), Some("events"));
    }

    #[test]
    fn decodes_go_micro_bodies() {
        // As Go Micro's current HTTP broker writes it.
        let go = br#"{"Header":{"Content-Type":"application/json","Micro-Id":"1","Micro-Topic":"events"},"Body":"eyJmb28iOjF9"}"#;
        let decoded = decode(go).unwrap();
        assert_eq!(decoded.topic, "events");
        assert_eq!(decoded.message.body(), br#"{"foo":1}"#);
        // Go's decoder matches keys case-insensitively; unknown keys are ignored; null body is empty.
        let odd = br#"{"header":{":topic":"t"},"BODY":null,"extra":[1,2]}"#;
        let decoded = decode(odd).unwrap();
        assert_eq!(decoded.topic, "t");
        assert!(decoded.message.body.is_empty() && decoded.message.headers.is_empty());
    }

    #[test]
    fn rejects_bad_bodies() {
        assert!(matches!(decode(b"null"), Err(DecodeError::Envelope(_))));
        assert!(matches!(decode(b"{not json"), Err(DecodeError::Envelope(_))));
        assert!(matches!(decode(b"[1]"), Err(DecodeError::Envelope(_))));
        assert!(matches!(decode(br#"{"Header":{"a":1}}"#), Err(DecodeError::Envelope(_))));
        assert!(
            matches!(decode(br#"{"Header":{":topic":"t"},"Body":"!!"}"#), Err(DecodeError::Envelope(e)) if e.contains("base64"))
        );
        assert_eq!(decode(br#"{"Header":{},"Body":""}"#), Err(DecodeError::MissingTopic));
        assert_eq!(decode(br#"{"Header":{":topic":""}}"#), Err(DecodeError::MissingTopic));
    }

    #[test]
    fn dialect_names() {
        assert_eq!(Dialect::parse("Current"), Some(Dialect::Current));
        assert_eq!(Dialect::parse("legacy"), Some(Dialect::Legacy));
        assert_eq!(Dialect::parse("v2"), None);
        assert_eq!(Dialect::Legacy.service_name("a.b"), "topic:a.b");
        assert_eq!(Dialect::Current.service_name("a.b"), CURRENT_SERVICE);
    }
}
