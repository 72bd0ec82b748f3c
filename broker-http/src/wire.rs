//! Go Micro's HTTP broker wire format, in its two dialects.
//!
//! The body of every delivery is Go Micro's JSON codec of `broker.Message`:
//! `{"Header":{…},"Body":"<standard base64>"}`. The topic travels inside the headers: as `:topic`
//! (removed before the handler sees the headers) in the article's dialect, Go Micro ≤ 1.12, and as
//! `Micro-Topic` (kept) in today's, Go Micro 2.5 – 6. The endpoint reads both, whatever it writes.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use broker_core::{Headers, Message};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

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

/// Encodes `message` for `topic` as the JSON body of a delivery.
pub fn encode(topic: &str, message: &Message, dialect: Dialect) -> Bytes {
    let topic_header = match dialect {
        Dialect::Legacy => LEGACY_TOPIC_HEADER,
        Dialect::Current => CURRENT_TOPIC_HEADER,
    };
    // Serialize by hand: no copy of the header map, and the topic header overrides a caller's one.
    let mut out = Vec::with_capacity(message.body.len() * 4 / 3 + 64 + 32 * message.headers.len());
    out.extend_from_slice(b"{\"Header\":{");
    let mut first = true;
    for (key, value) in &message.headers {
        if key == topic_header {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        push_json_pair(&mut out, key, value);
    }
    if !first {
        out.push(b',');
    }
    push_json_pair(&mut out, topic_header, topic);
    out.extend_from_slice(b"},\"Body\":\"");
    let start = out.len();
    let encoded_len = base64::encoded_len(message.body.len(), true).unwrap_or(0);
    out.resize(start + encoded_len, 0);
    // The slice is exactly as long as the encoding needs, so this cannot fail.
    let written = STANDARD.encode_slice(&message.body, &mut out[start..]).unwrap_or(0);
    out.truncate(start + written);
    out.extend_from_slice(b"\"}");
    Bytes::from(out)
}

fn push_json_pair(out: &mut Vec<u8>, key: &str, value: &str) {
    // serde_json writes a str as a JSON string; it cannot fail on a Vec.
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
    let _ = serde_json::to_writer(&mut *out, value);
}

/// Why a delivery body was rejected (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not JSON of the envelope's shape.
    Json(String),
    /// `Body` is not base64.
    Base64(String),
    /// Neither `:topic` nor `Micro-Topic` names a topic.
    MissingTopic,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Json(e) => write!(
                f,
                "the body is not a Go Micro broker message (JSON {{\"Header\":{{…}},\"Body\":\"<base64>\"}}): {e}"
            ),
            DecodeError::Base64(e) => write!(f, "the \"Body\" field is not standard base64: {e}"),
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

/// Decodes a delivery body of either dialect. Keys match case-insensitively, as Go's decoder does.
pub fn decode(body: &[u8]) -> Result<Decoded, DecodeError> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
    let Some(envelope) = envelope.0 else {
        return Err(DecodeError::Json("the body is JSON null".into()));
    };
    let mut headers = envelope.headers;
    let topic = match headers.remove(LEGACY_TOPIC_HEADER) {
        Some(topic) => topic,
        None => headers.get(CURRENT_TOPIC_HEADER).cloned().unwrap_or_default(),
    };
    if topic.is_empty() {
        return Err(DecodeError::MissingTopic);
    }
    let body = match envelope.body {
        None => Bytes::new(),
        Some(text) => STANDARD
            .decode(text.as_bytes())
            .or_else(|_| STANDARD_NO_PAD.decode(text.as_bytes()))
            .map_err(|e| DecodeError::Base64(e.to_string()))?
            .into(),
    };
    Ok(Decoded { topic, message: Message::with_headers(headers, body) })
}

struct EnvelopeFields {
    headers: Headers,
    body: Option<String>,
}

/// `null` or an object with `Header` and `Body` in any letter case.
struct Envelope(Option<EnvelopeFields>);

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor;
        impl<'de> Visitor<'de> for EnvelopeVisitor {
            type Value = Envelope;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object with \"Header\" and \"Body\"")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Envelope, E> {
                Ok(Envelope(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
                let mut fields = EnvelopeFields { headers: Headers::new(), body: None };
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key.eq_ignore_ascii_case("header") {
                        fields.headers = map.next_value::<Option<Headers>>()?.unwrap_or_default();
                    } else if key.eq_ignore_ascii_case("body") {
                        fields.body = map.next_value::<Option<String>>()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Envelope(Some(fields)))
            }
        }
        deserializer.deserialize_any(EnvelopeVisitor)
    }
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
        assert_eq!(json["Body"], STANDARD.encode(b"\x00\xffhello"));
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
        assert!(matches!(decode(b"null"), Err(DecodeError::Json(_))));
        assert!(matches!(decode(b"{not json"), Err(DecodeError::Json(_))));
        assert!(matches!(decode(b"[1]"), Err(DecodeError::Json(_))));
        assert!(matches!(decode(br#"{"Header":{"a":1}}"#), Err(DecodeError::Json(_))));
        assert!(matches!(decode(br#"{"Header":{":topic":"t"},"Body":"!!"}"#), Err(DecodeError::Base64(_))));
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
