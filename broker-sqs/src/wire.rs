//! The mapping between a [`Message`] and an SNS / SQS message: body text plus string message
//! attributes.
//!
//! - **Headers** travel as message attributes of type `String`, one per header, when all of them
//!   fit SQS's rules: at most [`MAX_ATTRIBUTES`] (10) attributes in all (this backend's own count),
//!   names of at most 256 characters of `[A-Za-z0-9_.-]`, not beginning with `AWS.` or `Amazon.`,
//!   not beginning or ending with `.`, without `..`, not one of this backend's own names, and
//!   non-empty values. Otherwise (11 headers, a Unicode or empty name, an empty value, ...) **all**
//!   headers travel in one attribute, [`HEADERS_ATTRIBUTE`] (`x-micro-headers`), whose value is the
//!   JSON object `{"name":"value",...}`: the envelope. A receiver reads either form.
//! - **Body**: SNS and SQS carry text (and only the characters XML allows). A body that is
//!   non-empty UTF-8 of allowed characters travels as it is; any other is standard base64 with the
//!   attribute [`BODY_ATTRIBUTE`] = `base64`; an empty body is the text `-` with
//!   [`BODY_ATTRIBUTE`] = `empty`.
//! - **Size**: SNS and SQS take at most [`MAX_MESSAGE_BYTES`] (256 KiB) of body and attributes
//!   together; a larger message is an `InvalidInput` error at publish, never truncated.
//! - A received message without these attributes (sent by another SQS producer) is delivered with
//!   its body as it is and its string (and number) attributes as headers.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use broker_core::{Error, Headers, Message, Result};

/// The attribute saying how the body is encoded (`base64` or `empty`); absent: as it is.
pub const BODY_ATTRIBUTE: &str = "x-micro-body";

/// The attribute carrying every header as one JSON object, when they do not fit as attributes.
pub const HEADERS_ATTRIBUTE: &str = "x-micro-headers";

/// SQS's limit on message attributes per message (SNS delivers at most as many to SQS).
pub const MAX_ATTRIBUTES: usize = 10;

/// SNS's and SQS's limit on one message: body plus attribute names, types and values.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// A message as SNS takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The message text.
    pub body: String,
    /// String message attributes, name and value.
    pub attributes: Vec<(String, String)>,
}

/// Whether SQS accepts `c` in a body or attribute value (the XML character set).
fn xml_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Whether `name` may be a message attribute name.
fn legal_attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && name != BODY_ATTRIBUTE
        && name != HEADERS_ATTRIBUTE
}

/// The SNS message of `message`.
pub fn encode(message: &Message) -> Result<Encoded> {
    let mut attributes = Vec::with_capacity(message.headers.len() + 1);
    let body = match std::str::from_utf8(&message.body) {
        _ if message.body.is_empty() => {
            attributes.push((BODY_ATTRIBUTE.to_string(), "empty".to_string()));
            "-".to_string()
        }
        Ok(text) if text.chars().all(xml_char) => text.to_string(),
        _ => {
            attributes.push((BODY_ATTRIBUTE.to_string(), "base64".to_string()));
            STANDARD.encode(&message.body)
        }
    };
    let native = attributes.len() + message.headers.len() <= MAX_ATTRIBUTES
        && message.headers.iter().all(|(k, v)| legal_attribute_name(k) && !v.is_empty() && v.chars().all(xml_char));
    if native {
        attributes.extend(message.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    } else if !message.headers.is_empty() {
        // serde_json escapes every control character, so the JSON is valid attribute text.
        let json = serde_json::to_string(&message.headers)
            .map_err(|e| Error::codec(format!("cannot encode the headers as JSON: {e}")))?;
        attributes.push((HEADERS_ATTRIBUTE.to_string(), json));
    }
    let size = body.len() + attributes.iter().map(|(k, v)| k.len() + "String".len() + v.len()).sum::<usize>();
    if size > MAX_MESSAGE_BYTES {
        return Err(Error::invalid_input(format!(
            "the message is {size} bytes as SNS carries it (a {} byte body{}, and its headers), more than the \
             {MAX_MESSAGE_BYTES} bytes SNS and SQS take: send a smaller body, or a reference to where the data is",
            message.body.len(),
            if attributes.iter().any(|(k, v)| k == BODY_ATTRIBUTE && v == "base64") {
                " in base64, as it is not text"
            } else {
                ""
            }
        )));
    }
    Ok(Encoded { body, attributes })
}

/// The message of a received SQS body and its string attributes.
pub fn decode<'a>(body: &str, attributes: impl IntoIterator<Item = (&'a str, &'a str)>) -> Message {
    let mut headers = Headers::new();
    let mut body_encoding = None;
    let mut envelope = None;
    for (name, value) in attributes {
        match name {
            BODY_ATTRIBUTE => body_encoding = Some(value),
            HEADERS_ATTRIBUTE => envelope = Some(value),
            _ => {
                headers.insert(name.to_string(), value.to_string());
            }
        }
    }
    if let Some(json) = envelope {
        match serde_json::from_str::<Headers>(json) {
            Ok(all) => headers.extend(all),
            Err(error) => {
                tracing::warn!(%error, "sqs broker: the {HEADERS_ATTRIBUTE} attribute is not a JSON object of strings; kept as a header");
                headers.insert(HEADERS_ATTRIBUTE.to_string(), json.to_string());
            }
        }
    }
    let body: Vec<u8> = match body_encoding {
        Some("empty") => Vec::new(),
        Some("base64") => STANDARD.decode(body).unwrap_or_else(|error| {
            tracing::warn!(%error, "sqs broker: a body marked base64 is not base64; delivered as it is");
            body.as_bytes().to_vec()
        }),
        _ => body.as_bytes().to_vec(),
    };
    Message::with_headers(headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: &Message) -> (Encoded, Message) {
        let encoded = encode(message).unwrap();
        let decoded = decode(&encoded.body, encoded.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        (encoded, decoded)
    }

    #[test]
    fn text_and_few_headers_are_native() {
        let message = Message::new("hello").with_header("Content-Type", "text/plain").with_header("a.b", "c");
        let (encoded, decoded) = round_trip(&message);
        assert_eq!(encoded.body, "hello");
        assert_eq!(encoded.attributes.len(), 2);
        assert_eq!(decoded, message);
    }

    #[test]
    fn many_or_odd_headers_travel_in_the_envelope() {
        let mut many = Message::new("x");
        for i in 0..11 {
            many = many.with_header(format!("h{i}"), "v");
        }
        for message in [
            many,
            Message::new("x").with_header("x-ключ", "значение"),
            Message::new("x").with_header("empty", ""),
            Message::new("x").with_header("AWS.reserved", "v"),
            Message::new("x").with_header(HEADERS_ATTRIBUTE, "mine"),
            Message::new("x").with_header("ctl", "a\u{1}b"),
        ] {
            let (encoded, decoded) = round_trip(&message);
            assert_eq!(encoded.attributes.len(), 1, "{message:?}");
            assert_eq!(encoded.attributes[0].0, HEADERS_ATTRIBUTE);
            assert_eq!(decoded, message);
        }
        // Ten headers fit, but not with the body attribute of a binary body.
        let mut ten = Message::new(vec![0xffu8]);
        for i in 0..10 {
            ten = ten.with_header(format!("h{i}"), "v");
        }
        let (encoded, decoded) = round_trip(&ten);
        assert_eq!(encoded.attributes.len(), 2);
        assert_eq!(decoded, ten);
    }

    #[test]
    fn binary_empty_and_control_bodies() {
        for body in [vec![], vec![0u8, 1, 2, 255], b"a\x00b".to_vec(), "ü".as_bytes().to_vec()] {
            let message = Message::new(body.clone());
            let (_, decoded) = round_trip(&message);
            assert_eq!(decoded.body(), body.as_slice());
        }
    }

    #[test]
    fn oversized_messages_are_rejected() {
        let error = encode(&Message::new(vec![b'a'; MAX_MESSAGE_BYTES + 1])).unwrap_err();
        assert_eq!(error.kind(), broker_core::ErrorKind::InvalidInput);
        assert!(encode(&Message::new(vec![b'a'; MAX_MESSAGE_BYTES - 100])).is_ok());
    }

    #[test]
    fn foreign_messages_and_bad_envelopes() {
        let message = decode("plain", [("n", "42")]);
        assert_eq!(message, Message::new("plain").with_header("n", "42"));
        let message = decode("b", [(HEADERS_ATTRIBUTE, "not json"), (BODY_ATTRIBUTE, "base64")]);
        assert_eq!(message.header(HEADERS_ATTRIBUTE), Some("not json"));
        assert_eq!(message.body(), b"b");
    }
}
