//! [`Message`]: string headers and a byte body, as Go Micro's `broker.Message`.

use std::collections::HashMap;

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};

/// Message headers: string keys to string values.
pub type Headers = HashMap<String, String>;

/// Well-known header names.
pub mod headers {
    /// The MIME type of the body (`application/json` for the typed helpers).
    pub const CONTENT_TYPE: &str = "Content-Type";
    /// Set on a dead-lettered message: why it was given up on.
    pub const DEAD_LETTER_REASON: &str = "x-dead-letter-reason";
    /// Set on a dead-lettered message: how many times delivery was tried.
    pub const DELIVERY_ATTEMPTS: &str = "x-delivery-attempts";
    /// Set on a dead-lettered message: the topic it was first published to.
    pub const ORIGINAL_TOPIC: &str = "x-original-topic";
}

/// The content type the JSON helpers write and accept.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// A message: headers and a body. Cloning is cheap for the body ([`Bytes`] is reference counted).
///
/// ```
/// use broker_core::Message;
/// let msg = Message::new("hello").with_header("lang", "en");
/// assert_eq!(msg.body(), b"hello".as_slice());
/// assert_eq!(msg.header("lang"), Some("en"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Header key/value pairs.
    pub headers: Headers,
    /// The payload, passed through untouched by every backend.
    pub body: Bytes,
}

impl Message {
    /// A message with `body` and no headers.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Message { headers: Headers::new(), body: body.into() }
    }

    /// A message with the given headers and body.
    pub fn with_headers(headers: Headers, body: impl Into<Bytes>) -> Self {
        Message { headers, body: body.into() }
    }

    /// Adds or replaces one header (builder style).
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// The value of header `key`, if present (exact match).
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.get(key).map(String::as_str)
    }

    /// The value of header `key` matched without regard to ASCII case (HTTP-style names such as
    /// `Content-Type`, which some transports lower-case); an exact match wins.
    pub fn header_ignore_case(&self, key: &str) -> Option<&str> {
        self.header(key)
            .or_else(|| self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.as_str()))
    }

    /// The body as bytes.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as UTF-8 text, if it is valid UTF-8.
    pub fn body_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }

    /// A message whose body is `value` as JSON, with `Content-Type: application/json`.
    ///
    /// ```
    /// use broker_core::Message;
    /// #[derive(serde::Serialize)]
    /// struct User { name: String }
    /// let msg = Message::json(&User { name: "Ada".into() }).unwrap();
    /// assert_eq!(msg.body(), br#"{"name":"Ada"}"#.as_slice());
    /// assert_eq!(msg.header("Content-Type"), Some("application/json"));
    /// ```
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Error::codec(format!("cannot encode the message body as JSON: {e}")).with_source(e))?;
        Ok(Message::new(body).with_header(headers::CONTENT_TYPE, JSON_CONTENT_TYPE))
    }

    /// Decodes the body as JSON into `T`.
    ///
    /// A `Content-Type` header that is present and names something other than JSON is a
    /// [`Codec`](crate::ErrorKind::Codec) error, as is a body that does not decode.
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<T> {
        if let Some(content_type) = self.header_ignore_case(headers::CONTENT_TYPE) {
            if !is_json_content_type(content_type) {
                return Err(Error::codec(format!(
                    "expected a JSON body (Content-Type {JSON_CONTENT_TYPE}), got Content-Type {content_type:?}"
                )));
            }
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            Error::codec(format!("the message body is not the expected JSON ({} bytes): {e}", self.body.len()))
                .with_source(e)
        })
    }
}

/// Whether a `Content-Type` value names JSON (`application/json`, `application/cloudevents+json`, with parameters).
fn is_json_content_type(value: &str) -> bool {
    let mime = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == JSON_CONTENT_TYPE || (mime.starts_with("application/") && mime.ends_with("+json"))
}

impl From<Bytes> for Message {
    fn from(body: Bytes) -> Self {
        Message::new(body)
    }
}

impl From<Vec<u8>> for Message {
    fn from(body: Vec<u8>) -> Self {
        Message::new(body)
    }
}

impl From<&'static str> for Message {
    fn from(body: &'static str) -> Self {
        Message::new(body)
    }
}

impl From<String> for Message {
    fn from(body: String) -> Self {
        Message::new(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct User {
        id: u64,
        email: String,
    }

    #[test]
    fn json_round_trip() {
        let user = User { id: 7, email: "ada@example.com".into() };
        let msg = Message::json(&user).unwrap();
        assert_eq!(msg.header(headers::CONTENT_TYPE), Some(JSON_CONTENT_TYPE));
        assert_eq!(msg.decode_json::<User>().unwrap(), user);
    }

    #[test]
    fn garbage_body_is_codec_error() {
        let msg = Message::new(&b"\xff\x00not json"[..]);
        let err = msg.decode_json::<User>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec);
        assert!(err.to_string().contains("not the expected JSON"), "{err}");
    }

    #[test]
    fn wrong_shape_is_codec_error() {
        let msg = Message::new(r#"{"id":"seven"}"#);
        assert_eq!(msg.decode_json::<User>().unwrap_err().kind(), ErrorKind::Codec);
    }

    #[test]
    fn non_json_content_type_is_rejected() {
        let msg = Message::new(r#"{"id":1,"email":"a"}"#).with_header(headers::CONTENT_TYPE, "application/protobuf");
        let err = msg.decode_json::<User>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec);
        assert!(err.to_string().contains("application/protobuf"), "{err}");
        let ok = Message::new(r#"{"id":1,"email":"a"}"#)
            .with_header(headers::CONTENT_TYPE, "application/json; charset=utf-8");
        assert_eq!(ok.decode_json::<User>().unwrap().id, 1);
        let cloud =
            Message::new(r#"{"id":2,"email":"a"}"#).with_header(headers::CONTENT_TYPE, "application/cloudevents+json");
        assert_eq!(cloud.decode_json::<User>().unwrap().id, 2);
    }

    #[test]
    fn constructors() {
        assert_eq!(Message::from("x").body(), b"x");
        assert_eq!(Message::from(vec![1u8, 2]).body(), &[1, 2]);
        assert_eq!(Message::from(String::from("é")).body_str(), Some("é"));
        assert_eq!(Message::new(vec![0xffu8]).body_str(), None);
        let mut h = Headers::new();
        h.insert("a".into(), "b".into());
        assert_eq!(Message::with_headers(h, "").header("a"), Some("b"));
    }
}
