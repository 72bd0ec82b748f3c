//! How a [`Message`] travels on NATS: native headers and the raw body (default), or Go Micro's JSON
//! envelope as the whole payload (`envelope=go-micro`).
//!
//! NATS header names are ASCII without `:` or control characters, and values carry no CR/LF.
//! A header name outside that (the contract allows any UTF-8 name) travels as
//! `Micro-Enc-<percent-encoded UTF-8>` and is decoded back on receipt, so every name round-trips.

use broker_core::codec::{self, Envelope};
use broker_core::{Error, Headers, Message, Result};
use bytes::Bytes;

/// The prefix of a header name that had to be percent-encoded to travel as a NATS header name.
pub const ENCODED_NAME_PREFIX: &str = "Micro-Enc-";

/// A message ready for the wire: NATS headers (if any) and the payload.
pub(crate) struct Outgoing {
    pub(crate) headers: Option<async_nats::HeaderMap>,
    pub(crate) payload: Bytes,
}

/// Encodes `message` for `topic` in `envelope`.
pub(crate) fn encode(topic: &str, mut message: Message, envelope: Envelope) -> Result<Outgoing> {
    match envelope {
        Envelope::GoMicro => {
            codec::add_go_micro_headers(&mut message, topic);
            Ok(Outgoing { headers: None, payload: codec::encode_envelope(&message, None) })
        }
        Envelope::Native => {
            if message.headers.is_empty() {
                return Ok(Outgoing { headers: None, payload: message.body });
            }
            Ok(Outgoing { headers: Some(to_nats_headers(&message.headers)?), payload: message.body })
        }
    }
}

/// Decodes a received payload and headers in `envelope`. A payload that is not a Go Micro envelope
/// (with `envelope=go-micro`) is a [`Codec`](broker_core::ErrorKind::Codec) error.
pub(crate) fn decode(headers: Option<&async_nats::HeaderMap>, payload: Bytes, envelope: Envelope) -> Result<Message> {
    match envelope {
        Envelope::GoMicro => {
            let mut message = codec::decode_envelope(&payload)?;
            // Native headers, if a sender added some, are merged under the envelope's own.
            if let Some(headers) = headers {
                for (key, value) in from_nats_headers(headers) {
                    message.headers.entry(key).or_insert(value);
                }
            }
            Ok(message)
        }
        Envelope::Native => Ok(Message::with_headers(headers.map(from_nats_headers).unwrap_or_default(), payload)),
    }
}

/// Our headers as NATS headers, encoding names NATS cannot carry.
pub(crate) fn to_nats_headers(headers: &Headers) -> Result<async_nats::HeaderMap> {
    let mut map = async_nats::HeaderMap::new();
    for (key, value) in headers {
        let name = if plain_name(key) { async_nats::header::HeaderName::try_from(key.as_str()).ok() } else { None };
        let name = match name {
            Some(name) => name,
            None => async_nats::header::HeaderName::try_from(encode_name(key))
                .map_err(|_| Error::invalid_input(format!("header name {key:?} cannot be encoded for NATS")))?,
        };
        let value: async_nats::HeaderValue = value.parse().map_err(|_| {
            Error::invalid_input(format!("header {key:?}: NATS header values cannot contain CR or LF characters"))
        })?;
        map.insert(name, value);
    }
    Ok(map)
}

/// NATS headers as ours (the last value of a repeated name), decoding encoded names.
pub(crate) fn from_nats_headers(map: &async_nats::HeaderMap) -> Headers {
    let mut headers = Headers::with_capacity(map.len());
    for (name, values) in map.iter() {
        let Some(value) = values.last() else { continue };
        let name: &str = name.as_ref();
        let key = decode_name(name).unwrap_or_else(|| name.to_string());
        headers.insert(key, value.as_str().to_string());
    }
    headers
}

/// A name that travels as is: printable ASCII without `:` and not looking like an encoded one.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        && !name.get(..ENCODED_NAME_PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(ENCODED_NAME_PREFIX))
}

fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(ENCODED_NAME_PREFIX.len() + name.len() * 3);
    out.push_str(ENCODED_NAME_PREFIX);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENCODED_NAME_PREFIX)?;
    let bytes = rest.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::ErrorKind;

    #[test]
    fn any_header_name_round_trips() {
        let mut headers = Headers::new();
        for name in ["plain", "X-Mixed-Case", "x-ключ-1-日本", "a:b", "with space", "Micro-Enc-literal", "%41"] {
            headers.insert(name.to_string(), format!("value of {name} ✓"));
        }
        headers.insert("x-empty".into(), String::new());
        let map = to_nats_headers(&headers).unwrap();
        assert_eq!(from_nats_headers(&map), headers);
    }

    #[test]
    fn crlf_values_are_rejected() {
        let headers: Headers = [("a".to_string(), "x\r\ny".to_string())].into();
        assert_eq!(to_nats_headers(&headers).unwrap_err().kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn native_passes_the_body_through_untouched() {
        let body = Bytes::from_static(b"raw");
        let out = encode("t", Message::new(body.clone()), Envelope::Native).unwrap();
        assert!(out.headers.is_none());
        assert_eq!(out.payload.as_ptr(), body.as_ptr(), "no copy of the body");
    }

    #[test]
    fn go_micro_envelope_round_trips_and_garbage_is_a_codec_error() {
        let out = encode("user.registered", Message::new("{}").with_header("a", "b"), Envelope::GoMicro).unwrap();
        assert!(out.headers.is_none());
        let back = decode(None, out.payload, Envelope::GoMicro).unwrap();
        assert_eq!(back.header("a"), Some("b"));
        assert_eq!(back.header(codec::MICRO_TOPIC), Some("user.registered"));
        assert_eq!(back.body(), b"{}");
        let err = decode(None, Bytes::from_static(b"not json"), Envelope::GoMicro).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec);
    }
}
