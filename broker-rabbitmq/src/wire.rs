//! The mapping between a [`Message`] and an AMQP message, as Go Micro's RabbitMQ plugin does it:
//! the raw body as the AMQP body, the headers as strings in the AMQP header table.
//!
//! - Publishing: every header becomes a long-string entry of the header table; the
//!   `Content-Type` header (any case) is also copied to the `content_type` property; delivery
//!   mode 2 (persistent).
//! - Receiving: every header-table entry becomes a string (strings as they are, numbers and
//!   booleans in their text form, as Go Micro's `fmt.Sprintf("%v")`); the `content_type`
//!   property becomes `Content-Type` when the table has no such header. The internal header
//!   headers [`ATTEMPT_HEADER`] and [`REASON_HEADER`] are removed and read as the delivery
//!   attempt and the previous attempt's failure.

use broker_core::{Error, Headers, Message, Result, headers};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// The internal header carrying the delivery attempt of a message redelivered by this backend
/// (republished to its queue after a nack); removed before the handler sees the message.
pub const ATTEMPT_HEADER: &str = "x-micro-delivery-attempt";

/// The internal header carrying why the previous attempt failed, on a message redelivered by
/// this backend; removed before the handler sees the message and offered as [`broker_core::Event::error`].
pub const REASON_HEADER: &str = "x-micro-redelivery-reason";

/// AMQP delivery mode "persistent".
pub const PERSISTENT: u8 = 2;

/// The AMQP properties (header table, content type, persistence) of `message`.
pub fn properties(message: &Message) -> Result<BasicProperties> {
    let mut table = FieldTable::default();
    for (key, value) in &message.headers {
        if key.len() > 255 {
            return Err(Error::invalid_input(format!(
                "header name {:?}… is {} bytes long; AMQP header names are at most 255 bytes",
                key.chars().take(32).collect::<String>(),
                key.len()
            )));
        }
        table.insert(ShortString::from(key.as_str()), AMQPValue::LongString(LongString::from(value.as_bytes())));
    }
    let mut properties = BasicProperties::default().with_headers(table).with_delivery_mode(PERSISTENT);
    if let Some(content_type) = message.header_ignore_case(headers::CONTENT_TYPE).filter(|c| c.len() <= 255) {
        properties = properties.with_content_type(ShortString::from(content_type));
    }
    Ok(properties)
}

/// What [`decode`] found: the message, the attempt it carries (1 when none), and why the previous
/// attempt failed (on a redelivery by this backend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The message as the handler sees it.
    pub message: Message,
    /// The delivery attempt carried by [`ATTEMPT_HEADER`] (1 when absent).
    pub attempt: u32,
    /// The reason carried by [`REASON_HEADER`].
    pub previous_failure: Option<String>,
}

/// The message of a received AMQP body and properties.
pub fn decode(body: Vec<u8>, properties: &BasicProperties) -> Decoded {
    let mut headers = Headers::new();
    if let Some(table) = properties.headers() {
        for (key, value) in table {
            if let Some(text) = value_text(value) {
                headers.insert(key.as_str().to_string(), text);
            }
        }
    }
    let attempt = headers.remove(ATTEMPT_HEADER).and_then(|a| a.trim().parse::<u32>().ok()).unwrap_or(1).max(1);
    let previous_failure = headers.remove(REASON_HEADER);
    if let Some(content_type) = properties.content_type()
        && !headers.keys().any(|k| k.eq_ignore_ascii_case(headers::CONTENT_TYPE))
    {
        headers.insert(headers::CONTENT_TYPE.to_string(), content_type.as_str().to_string());
    }
    Decoded { message: Message::with_headers(headers, body), attempt, previous_failure }
}

/// A header-table value as text; `None` for nested tables, arrays and void.
fn value_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::DecimalValue(_) | AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) | AMQPValue::Void => {
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_content_type_round_trip() {
        let message = Message::new("body").with_header("Content-Type", "application/json").with_header("a", "ü");
        let props = properties(&message).unwrap();
        assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(props.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
        let decoded = decode(b"body".to_vec(), &props);
        assert_eq!(decoded.message, message);
        assert_eq!(decoded.attempt, 1);
        assert_eq!(decoded.previous_failure, None);
    }

    #[test]
    fn attempt_header_is_read_and_removed() {
        let message = Message::new("x").with_header(ATTEMPT_HEADER, "3").with_header(REASON_HEADER, "db down");
        let decoded = decode(b"x".to_vec(), &properties(&message).unwrap());
        assert_eq!(decoded.attempt, 3);
        assert_eq!(decoded.previous_failure.as_deref(), Some("db down"));
        assert!(decoded.message.headers.is_empty());
    }

    #[test]
    fn foreign_values_become_text_and_content_type_property_a_header() {
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::LongInt(42));
        table.insert("b".into(), AMQPValue::Boolean(true));
        table.insert("s".into(), AMQPValue::ShortString("short".into()));
        let props = BasicProperties::default().with_headers(table).with_content_type("text/plain".into());
        let message = decode(Vec::new(), &props).message;
        assert_eq!(message.header("n"), Some("42"));
        assert_eq!(message.header("b"), Some("true"));
        assert_eq!(message.header("s"), Some("short"));
        assert_eq!(message.header("Content-Type"), Some("text/plain"));
    }

    #[test]
    fn overlong_header_names_are_rejected() {
        let message = Message::new("x").with_header("k".repeat(256), "v");
        assert_eq!(properties(&message).unwrap_err().kind(), broker_core::ErrorKind::InvalidInput);
    }
}
