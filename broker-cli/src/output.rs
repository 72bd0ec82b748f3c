//! How `broker sub` prints a message: one JSON object per line.
//!
//! `{"topic":"t","headers":{"k":"v"},"body":"text"}`: headers sorted by key; a body that is valid
//! UTF-8 is a JSON string, any other body is `{"base64":"..."}` (standard alphabet, padded).

use std::collections::BTreeMap;
use std::io::Write;

use base64::Engine as _;
use micro_broker::Message;
use serde::Serialize;

#[derive(Serialize)]
struct Line<'a> {
    topic: &'a str,
    headers: BTreeMap<&'a str, &'a str>,
    body: Body<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Body<'a> {
    Text(&'a str),
    Binary { base64: String },
}

/// The JSON line for `message` received on `topic` (no trailing newline).
pub(crate) fn json_line(topic: &str, message: &Message) -> Result<String, serde_json::Error> {
    let headers = message.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let body = match message.body_str() {
        Some(text) => Body::Text(text),
        None => Body::Binary { base64: base64::engine::general_purpose::STANDARD.encode(message.body()) },
    };
    serde_json::to_string(&Line { topic, headers, body })
}

/// Prints a line of progress to standard output. A closed standard output (`broker demo | head`)
/// is not an error for progress lines: the command goes on and its exit status still tells.
pub(crate) fn write_line(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// `say!("...", args)`: [`write_line`] with `format!` syntax.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}
pub(crate) use say;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn text_body_is_a_json_string() {
        let msg = Message::new("héllo \"world\"\n").with_header("b", "2").with_header("a", "1");
        let line = json_line("user.registered", &msg).unwrap();
        assert_eq!(line, r#"{"topic":"user.registered","headers":{"a":"1","b":"2"},"body":"héllo \"world\"\n"}"#);
        assert!(!line.contains('\n'), "one line: {line}");
    }

    #[test]
    fn binary_body_is_base64() {
        let msg = Message::new(vec![0xffu8, 0x00, 0x10]);
        let line = json_line("t", &msg).unwrap();
        assert_eq!(line, r#"{"topic":"t","headers":{},"body":{"base64":"/wAQ"}}"#);
    }

    #[test]
    fn json_body_stays_a_string_and_empty_body_is_empty_text() {
        let msg = Message::new(r#"{"id":1}"#);
        let value: Value = serde_json::from_str(&json_line("t", &msg).unwrap()).unwrap();
        assert_eq!(value["body"], json!(r#"{"id":1}"#));
        let value: Value = serde_json::from_str(&json_line("t", &Message::new("")).unwrap()).unwrap();
        assert_eq!(value["body"], json!(""));
    }
}
