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
    // Written by hand: no copy of the header map, and `extra` replaces a header of its name. The
    // buffer is allocated at its exact final size: `Bytes::from(Vec)` then takes it over without
    // a second allocation (it needs one when the capacity is larger than the length).
    let mut out = Vec::with_capacity(envelope_len(message, extra));
    write_head(&mut out, message, extra);
    // Into the capacity reserved above, without zeroing it first.
    base64_simd::STANDARD.encode_append(&message.body, &mut out);
    out.extend_from_slice(ENVELOPE_TAIL);
    Bytes::from(out)
}

/// The length in bytes of [`encode_envelope`]`(message, extra)`, computed without encoding.
pub fn envelope_len(message: &Message, extra: Option<(&str, &str)>) -> usize {
    let mut len = b"{\"Header\":{".len() + b"},\"Body\":\"".len() + ENVELOPE_TAIL.len();
    let mut pairs: usize = 0;
    for (key, value) in &message.headers {
        if extra.is_some_and(|(name, _)| name == key) {
            continue;
        }
        pairs += 1;
        len += json_str_len(key) + 1 + json_str_len(value);
    }
    if let Some((name, value)) = extra {
        pairs += 1;
        len += json_str_len(name) + 1 + json_str_len(value);
    }
    len + pairs.saturating_sub(1) + base64::encoded_len(message.body.len(), true).unwrap_or(0)
}

/// Writes what [`encode_envelope`] returns to `out`, for a caller that has a buffer of its own
/// to fill (a client's command buffer), so that the envelope is not built apart and copied.
pub fn write_envelope<W: std::io::Write>(
    out: &mut W,
    message: &Message,
    extra: Option<(&str, &str)>,
) -> std::io::Result<()> {
    if message.headers.is_empty() && extra.is_none() {
        // The common case (no headers), without a detour through a buffer.
        out.write_all(b"{\"Header\":{},\"Body\":\"")?;
    } else {
        let mut head = Vec::with_capacity(64 + 32 * message.headers.len());
        write_head(&mut head, message, extra);
        out.write_all(&head)?;
    }
    // Base64 in chunks through a stack buffer: 3 input bytes make 4 output bytes, so every
    // chunk but the last is a multiple of 3 and needs no padding.
    let mut chunk = [0u8; 1024];
    for input in message.body.chunks(chunk.len() / 4 * 3) {
        let written = encode_base64(input, &mut chunk);
        out.write_all(&chunk[..written])?;
    }
    out.write_all(ENVELOPE_TAIL)
}

const ENVELOPE_TAIL: &[u8] = b"\"}";

// The body's base64 is most of the cost of an envelope: the bulk goes through base64-simd (SSE /
// AVX2, chosen at run time; with it a redis Pub/Sub message of 1 KiB took 28,532 instructions
// instead of 39,355 with lookup tables). Output and accepted inputs are the base64 crate's, which
// the serde path uses (the tests compare them on every length up to 200).

/// Writes the standard (padded) base64 of `input` to the start of `out`, which must hold
/// `base64::encoded_len(input.len(), true)` bytes; returns how many it wrote (0 when `out` is
/// too short, which the callers rule out).
fn encode_base64(input: &[u8], out: &mut [u8]) -> usize {
    let len = base64_simd::STANDARD.encoded_length(input.len());
    match out.get_mut(..len) {
        Some(out) => base64_simd::STANDARD.encode(input, base64_simd::Out::from_slice(out)).len(),
        None => 0,
    }
}

/// `{"Header":{…},"Body":"`: everything before the base64 body.
fn write_head(out: &mut Vec<u8>, message: &Message, extra: Option<(&str, &str)>) {
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
        push_json_pair(out, key, value);
    }
    if let Some((name, value)) = extra {
        if !first {
            out.push(b',');
        }
        push_json_pair(out, name, value);
    }
    out.extend_from_slice(b"},\"Body\":\"");
}

/// The length of `s` as serde_json writes it: quoted, `"` and `\\` and the control characters
/// escaped (\b \t \n \f \r in two bytes, the others as \u00XX).
fn json_str_len(s: &str) -> usize {
    2 + s.len()
        + s.bytes()
            .map(|b| match b {
                b'"' | b'\\' | 0x08 | 0x09 | 0x0a | 0x0c | 0x0d => 1,
                0x00..=0x1f => 5,
                _ => 0,
            })
            .sum::<usize>()
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
    // What this crate and Go Micro write (no whitespace, no escapes) is read without serde;
    // anything else, errors included, goes the general way, which gives the same result.
    match decode_plain(bytes) {
        Some(message) => Ok(message),
        None => decode_general(bytes),
    }
}

/// The envelope exactly as [`encode_envelope`] writes it, with header strings and the body free
/// of escapes: `{"Header":{"k":"v",…},"Body":"<base64>"}`. `None` for anything else (then the
/// serde path decides, with its error messages).
fn decode_plain(bytes: &[u8]) -> Option<Message> {
    let mut rest = bytes.strip_prefix(b"{\"Header\":{")?;
    let mut headers = Headers::new();
    if let Some(after) = rest.strip_prefix(b"}") {
        rest = after;
    } else {
        loop {
            let (key, after) = plain_json_str(rest)?;
            let (value, after) = plain_json_str(after.strip_prefix(b":")?)?;
            // A repeated key: the last one wins, as in the serde path.
            headers.insert(key.to_owned(), value.to_owned());
            if let Some(after) = after.strip_prefix(b",") {
                rest = after;
            } else {
                rest = after.strip_prefix(b"}")?;
                break;
            }
        }
    }
    // A `"` or `\\` inside `text` (an escape, or more after the body) is not base64: refused below.
    let text = rest.strip_prefix(b",\"Body\":\"")?.strip_suffix(ENVELOPE_TAIL)?;
    let body = if text.is_empty() { Bytes::new() } else { Bytes::from(decode_base64_exact(text)?) };
    Some(Message::with_headers(headers, body))
}

/// `"…"` at the start of `bytes` without escapes or control characters, and what follows it.
fn plain_json_str(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let rest = bytes.strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    if rest[end] != b'"' {
        return None;
    }
    Some((std::str::from_utf8(&rest[..end]).ok()?, &rest[end + 1..]))
}

/// Standard base64 (padded, or unpadded as the serde path also accepts), into a buffer of
/// exactly the decoded size (so that `Bytes::from` keeps it without another allocation).
fn decode_base64_exact(text: &[u8]) -> Option<Vec<u8>> {
    // base64-simd allocates the output uninitialised at its exact size (a zeroed `vec!` cost a
    // calloc and a memset per message) and, not being "forgiving", refuses what the base64
    // crate refuses: characters outside the alphabet, misplaced padding, and a last group whose
    // unused bits are not zero (the tests compare the two).
    let engine = if text.len() % 4 == 0 {
        &base64_simd::STANDARD
    } else if !text.ends_with(b"=") {
        &base64_simd::STANDARD_NO_PAD
    } else {
        return None;
    };
    engine.decode_to_vec(text).ok()
}

fn decode_general(bytes: &[u8]) -> Result<Message> {
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

    #[test]
    fn lengths_writer_and_plain_decoding_agree_with_the_general_path() {
        let mut bodies: Vec<Vec<u8>> = (0..8).map(|n| (0..n).map(|i| i as u8 * 37).collect()).collect();
        bodies.push((0..2000).map(|i| (i * 7) as u8).collect());
        let odd = "q\"\\\u{1}\u{8}\t\n\u{c}\r\u{1f}\u{7f}é";
        for body in bodies {
            for msg in [
                Message::new(body.clone()),
                Message::new(body.clone()).with_header("a", "b").with_header(odd, odd).with_header("Micro-Topic", "x"),
            ] {
                for extra in [None, Some(("Micro-Topic", "t")), Some(("n", odd))] {
                    let json = encode_envelope(&msg, extra);
                    assert_eq!(envelope_len(&msg, extra), json.len());
                    let mut written = Vec::new();
                    write_envelope(&mut written, &msg, extra).unwrap();
                    assert_eq!(&written[..], &json[..]);
                    assert_eq!(decode_envelope(&json).unwrap(), decode_general(&json).unwrap());
                }
                if msg.headers.is_empty() {
                    let json = encode_envelope(&msg, None);
                    assert_eq!(decode_plain(&json), Some(msg.clone()), "the plain path reads our own envelope");
                }
            }
        }
        // Unpadded, repeated keys, whitespace, escapes: the same result either way.
        for json in [
            &br#"{"Header":{},"Body":"aGk"}"#[..],
            br#"{"Header":{"a":"1","a":"2"},"Body":"aGk="}"#,
            br#"{"Header":{"a":"\u0041"},"Body":"aGk="}"#,
            br#"{"Header":{}, "Body":"aGk="}"#,
            br#"{"Header":{},"Body":""}"#,
            br#"{"Header":{},"Body":"aGk="} "#,
        ] {
            assert_eq!(decode_envelope(json).unwrap(), decode_general(json).unwrap());
        }
        for bad in [
            &br#"{"Header":{},"Body":"aGk=="}"#[..],
            br#"{"Header":{},"Body":"a"}"#,
            br#"{"Header":{},"Body":"aG\k="}"#,
        ] {
            assert!(decode_plain(bad).is_none());
            assert_eq!(decode_envelope(bad).unwrap_err().kind(), ErrorKind::Codec);
        }
    }

    #[test]
    fn simd_base64_matches_the_crate() {
        let data: Vec<u8> = (0..3000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in (0..200).chain([767, 768, 769, 1024, 2047, 3000]) {
            let input = &data[..len];
            let expected = STANDARD.encode(input);
            let mut out = vec![0u8; expected.len()];
            assert_eq!(encode_base64(input, &mut out), expected.len());
            assert_eq!(out, expected.as_bytes(), "length {len}");
            assert_eq!(decode_base64_exact(expected.as_bytes()).as_deref(), Some(input), "length {len}");
            let unpadded = STANDARD_NO_PAD.encode(input);
            assert_eq!(decode_base64_exact(unpadded.as_bytes()).as_deref(), Some(input), "unpadded {len}");
            // The last group's unused bits set (not canonical): refused, as by the crate.
            if len % 3 != 0 {
                for text in [expected.clone(), unpadded.clone()] {
                    let mut text = text.into_bytes();
                    let last = text.iter().rposition(|&b| b != b'=').unwrap();
                    text[last] = if text[last] == b'B' { b'C' } else { b'B' };
                    let crate_says = STANDARD.decode(&text).or_else(|_| STANDARD_NO_PAD.decode(&text)).ok();
                    assert_eq!(crate_says, None, "{len}: {:?} should not be canonical", String::from_utf8_lossy(&text));
                    assert_eq!(decode_base64_exact(&text), None, "{len}");
                }
            }
            // A character outside the alphabet (or padding) anywhere: the same outcome as the
            // crate's (and the serde path's) decoding.
            let json = |text: &[u8]| [&br#"{"Header":{},"Body":""#[..], text, b"\"}"].concat();
            for at in (0..expected.len()).step_by(7) {
                for bad in [b'=', b'-', b'_', b' ', 0xc3] {
                    let mut text = expected.clone().into_bytes();
                    if text[at] == bad {
                        continue;
                    }
                    text[at] = bad;
                    let crate_says = STANDARD.decode(&text).or_else(|_| STANDARD_NO_PAD.decode(&text)).ok();
                    assert_eq!(decode_base64_exact(&text), crate_says, "{len} {at} {bad}");
                    match decode_general(&json(&text)) {
                        Ok(message) => assert_eq!(decode_envelope(&json(&text)).unwrap(), message),
                        Err(e) => assert_eq!(decode_envelope(&json(&text)).unwrap_err().to_string(), e.to_string()),
                    }
                }
            }
        }
    }
}
