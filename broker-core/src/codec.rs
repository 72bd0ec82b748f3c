//! Go Micro's wire envelope, in one place for every backend that needs it.
//!
//! Go Micro's brokers (HTTP, NATS, Redis, Kafka) carry a message as the JSON of its
//! `broker.Message`: `{"Header":{…},"Body":"<standard base64 of the body>"}`, and Go Micro's client
//! adds the headers `Micro-Topic`, `Micro-Id` and `Content-Type` when it publishes an event. A
//! backend whose [`Envelope`] is [`GoMicro`](Envelope::GoMicro) writes and reads that, so a Rust
//! service and a Go Micro service can exchange events on the same broker.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use std::fmt;

use crate::error::{Error, Result};
use crate::message::{Headers, JSON_CONTENT_TYPE, Message, headers};

/// The environment variable that picks the envelope for every backend (`go-micro` or `native`).
pub const ENV_ENVELOPE: &str = "MICRO_BROKER_ENVELOPE";
/// The broker parameter that picks the envelope (what [`ENV_ENVELOPE`] sets).
pub const PARAM_ENVELOPE: &str = "envelope";
/// The header Go Micro's client and router use for the topic.
pub const MICRO_TOPIC: &str = "Micro-Topic";
/// The header Go Micro's client sets to a fresh id per event.
pub const MICRO_ID: &str = "Micro-Id";

/// How a backend puts a message on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Envelope {
    /// The body as the payload and the headers in the system's own header fields (default).
    #[default]
    Native,
    /// Go Micro's JSON envelope as the whole payload, with Go Micro's event headers.
    GoMicro,
}

impl Envelope {
    /// Parses `native` or `go-micro`.
    pub fn parse(value: &str) -> Result<Envelope> {
        match value.trim().to_ascii_lowercase().as_str() {
            "native" => Ok(Envelope::Native),
            "go-micro" | "gomicro" => Ok(Envelope::GoMicro),
            other => Err(Error::invalid_input(format!("envelope {other:?}: expected \"native\" or \"go-micro\""))),
        }
    }

    /// The envelope named by the broker parameter `envelope`; native when absent.
    pub fn from_params(params: &std::collections::BTreeMap<String, String>) -> Result<Envelope> {
        params.get(PARAM_ENVELOPE).map_or(Ok(Envelope::Native), |v| Envelope::parse(v))
    }
}

/// Sets the headers Go Micro's client sets on an event: `Micro-Topic` (always the topic),
/// `Micro-Id` (a fresh uuid unless present) and `Content-Type` (JSON unless present).
pub fn add_go_micro_headers(message: &mut Message, topic: &str) {
    message.headers.insert(MICRO_TOPIC.to_string(), topic.to_string());
    message.headers.entry(MICRO_ID.to_string()).or_insert_with(|| uuid::Uuid::new_v4().to_string());
    if message.header_ignore_case(headers::CONTENT_TYPE).is_none() {
        message.headers.insert(headers::CONTENT_TYPE.to_string(), JSON_CONTENT_TYPE.to_string());
    }
}

/// Encodes `message` as Go Micro's JSON envelope. `extra` is one more header written after the
/// message's own, replacing a header of the same name (the HTTP broker's topic header).
///
/// ```
/// use broker_core::{Message, codec};
/// let json = codec::encode_envelope(&Message::new("hi").with_header("a", "b"), None);
/// assert_eq!(&json[..], br#"{"Header":{"a":"b"},"Body":"aGk="}"#);
/// assert_eq!(codec::decode_envelope(&json).unwrap(), Message::new("hi").with_header("a", "b"));
/// ```
pub fn encode_envelope(message: &Message, extra: Option<(&str, &str)>) -> Bytes {
    // Written by hand: no copy of the header map, and `extra` replaces a header of its name.
    let mut out = Vec::with_capacity(message.body.len() * 4 / 3 + 64 + 32 * message.headers.len());
    out.extend_from_slice(b"{\"Header\":{");
    let mut first = true;
    for (key, value) in &message.headers {
        if extra.is_some_and(|(name, _)| name == key) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        push_json_pair(&mut out, key, value);
    }
    if let Some((name, value)) = extra {
        if !first {
            out.push(b',');
        }
        push_json_pair(&mut out, name, value);
    }
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

/// Decodes Go Micro's JSON envelope. Keys match case-insensitively and unknown keys are ignored,
/// as Go's decoder does; a `null` header map or body is empty. Anything else that is not an
/// envelope (not JSON, JSON `null`, a body that is not base64) is a [`Codec`](crate::ErrorKind::Codec) error.
pub fn decode_envelope(bytes: &[u8]) -> Result<Message> {
    let envelope: EnvelopeJson = serde_json::from_slice(bytes).map_err(|e| {
        Error::codec(format!("not a Go Micro message envelope (JSON {{\"Header\":{{…}},\"Body\":\"<base64>\"}}): {e}"))
    })?;
    let Some(fields) = envelope.0 else {
        return Err(Error::codec("not a Go Micro message envelope: the JSON is null"));
    };
    let body = match fields.body {
        None => Bytes::new(),
        Some(text) => STANDARD
            .decode(text.as_bytes())
            .or_else(|_| STANDARD_NO_PAD.decode(text.as_bytes()))
            .map_err(|e| Error::codec(format!("the envelope's \"Body\" is not standard base64: {e}")))?
            .into(),
    };
    Ok(Message::with_headers(fields.headers, body))
}

struct EnvelopeFields {
    headers: Headers,
    body: Option<String>,
}

/// `null`, or an object with `Header` and `Body` in any letter case.
struct EnvelopeJson(Option<EnvelopeFields>);

impl<'de> Deserialize<'de> for EnvelopeJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct EnvelopeVisitor;
        impl<'de> Visitor<'de> for EnvelopeVisitor {
            type Value = EnvelopeJson;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object with \"Header\" and \"Body\"")
            }
            fn visit_unit<E: de::Error>(self) -> std::result::Result<EnvelopeJson, E> {
                Ok(EnvelopeJson(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<EnvelopeJson, A::Error> {
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
                Ok(EnvelopeJson(Some(fields)))
            }
        }
        deserializer.deserialize_any(EnvelopeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn round_trip_with_binary_and_unicode() {
        let msg = Message::new(&b"\x00\xff\x10"[..]).with_header("é", "ü").with_header("q", "\"quoted\"");
        assert_eq!(decode_envelope(&encode_envelope(&msg, None)).unwrap(), msg);
    }

    #[test]
    fn extra_header_replaces_the_messages_own() {
        let msg = Message::new("x").with_header("Micro-Topic", "spoofed");
        let json: serde_json::Value =
            serde_json::from_slice(&encode_envelope(&msg, Some(("Micro-Topic", "t")))).unwrap();
        assert_eq!(json["Header"]["Micro-Topic"], "t");
        assert_eq!(json["Header"].as_object().unwrap().len(), 1);
    }

    #[test]
    fn reads_what_go_micro_writes() {
        let go = br#"{"Header":{"Content-Type":"application/json","Micro-Id":"1","Micro-Topic":"events"},"Body":"eyJmb28iOjF9"}"#;
        let msg = decode_envelope(go).unwrap();
        assert_eq!(msg.body(), br#"{"foo":1}"#);
        assert_eq!(msg.header("Micro-Topic"), Some("events"));
        let odd = decode_envelope(br#"{"header":null,"BODY":null,"extra":[1]}"#).unwrap();
        assert!(odd.headers.is_empty() && odd.body.is_empty());
    }

    #[test]
    fn garbage_is_a_codec_error() {
        for bad in [&b"null"[..], b"{not json", b"[1]", br#"{"Header":{"a":1}}"#, br#"{"Body":"!!"}"#] {
            assert_eq!(
                decode_envelope(bad).unwrap_err().kind(),
                ErrorKind::Codec,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn go_micro_headers_and_envelope_choice() {
        let mut msg = Message::new("{}");
        add_go_micro_headers(&mut msg, "user.registered");
        assert_eq!(msg.header(MICRO_TOPIC), Some("user.registered"));
        assert_eq!(msg.header(MICRO_ID).map(str::len), Some(36));
        assert_eq!(msg.header("Content-Type"), Some(JSON_CONTENT_TYPE));
        let mut keeps = Message::new("x").with_header("content-type", "text/plain").with_header(MICRO_ID, "7");
        add_go_micro_headers(&mut keeps, "t");
        assert_eq!(keeps.header(MICRO_ID), Some("7"));
        assert_eq!(keeps.header_ignore_case("Content-Type"), Some("text/plain"));
        assert_eq!(Envelope::parse(" Go-Micro ").unwrap(), Envelope::GoMicro);
        assert_eq!(Envelope::parse("native").unwrap(), Envelope::Native);
        assert_eq!(Envelope::parse("protobuf").unwrap_err().kind(), ErrorKind::InvalidInput);
    }
}
