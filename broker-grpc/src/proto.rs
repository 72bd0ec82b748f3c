//! Go Micro's gRPC broker proto (go-micro/plugins `broker/grpc/proto/grpc.proto`), hand-written
//! as prost structs so that building needs no `protoc`:
//!
//! ```proto
//! // no `package`: the method path is /Broker/Publish
//! service Broker { rpc Publish(Message) returns (Empty) {} }
//! message Message { string topic = 1; string id = 2; map<string,string> header = 3; bytes body = 4; }
//! message Empty {}
//! ```
//!
//! The field numbers and types above are the whole wire contract; `tests/interop_grpc.rs` checks
//! them against stubs that Google's own `protoc` generates from this text.

use std::collections::HashMap;

use bytes::{BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};

/// The service name: the proto has no package.
pub const SERVICE: &str = "Broker";
/// The one method's path.
pub const PUBLISH_PATH: &str = "/Broker/Publish";

/// `message Message { string topic = 1; string id = 2; map<string,string> header = 3; bytes body = 4; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct Message {
    /// The topic (an empty topic is rejected).
    #[prost(string, tag = "1")]
    pub topic: String,
    /// The node id of the subscription the publisher chose (from the registry).
    #[prost(string, tag = "2")]
    pub id: String,
    /// String headers.
    #[prost(map = "string, string", tag = "3")]
    pub header: HashMap<String, String>,
    /// The body, as is.
    #[prost(bytes = "bytes", tag = "4")]
    pub body: Bytes,
}

/// `message Empty {}`
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Empty {}

/// A `Message` as a publisher sends it to one node: `topic`, `header` and `body` encoded once per
/// publish (`encoded`, without an id), and the node's `id` appended as field 2. Protobuf parsers
/// accept fields in any order, so this is the same message, without re-encoding the body per node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outgoing {
    /// `Message` without its `id`, encoded.
    pub encoded: Bytes,
    /// The node id.
    pub id: String,
}

impl prost::Message for Outgoing {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.encoded);
        if !self.id.is_empty() {
            encoding::string::encode(2, &self.id, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Never decoded: a publisher only sends it.
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.encoded.len() + if self.id.is_empty() { 0 } else { encoding::string::encoded_len(2, &self.id) }
    }

    fn clear(&mut self) {
        self.encoded = Bytes::new();
        self.id.clear();
    }
}

/// Encodes `topic`, `header` and `body` (no id) for [`Outgoing::encoded`].
pub fn encode_without_id(topic: &str, message: &broker_core::Message) -> Bytes {
    let message = Message {
        topic: topic.to_string(),
        id: String::new(),
        header: message.headers.clone(),
        body: message.body.clone(),
    };
    Bytes::from(prost::Message::encode_to_vec(&message))
}

/// The encoded size of `Message` for `topic` with `message` and the node id `id`, at most
/// (an empty header key or value counted as if written): checked against `max_message_bytes`
/// before a publish enters the inbox.
pub fn encoded_len(topic: &str, id: &str, message: &broker_core::Message) -> usize {
    fn field(len: usize) -> usize {
        1 + encoding::encoded_len_varint(len as u64) + len
    }
    let header: usize = message.headers.iter().map(|(k, v)| field(field(k.len()) + field(v.len()))).sum();
    field(topic.len()) + field(id.len()) + header + field(message.body.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn outgoing_is_the_message_with_its_id() {
        let ours = broker_core::Message::new(&b"\x00\xffbody"[..]).with_header("Content-Type", "text/plain");
        let outgoing = Outgoing { encoded: encode_without_id("events", &ours), id: "broker-1.2".into() };
        let bytes = outgoing.encode_to_vec();
        assert_eq!(bytes.len(), outgoing.encoded_len());
        let decoded = Message::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.topic, "events");
        assert_eq!(decoded.id, "broker-1.2");
        assert_eq!(decoded.header.get("Content-Type").map(String::as_str), Some("text/plain"));
        assert_eq!(decoded.body.as_ref(), b"\x00\xffbody");
        assert!(encoded_len("events", "broker-1.2", &ours) >= bytes.len());
        assert!(encoded_len("events", "broker-1.2", &ours) <= bytes.len() + 4);
    }

    #[test]
    fn field_numbers_are_go_micros() {
        // topic = 1 (0x0a), id = 2 (0x12), header = 3 (0x1a, an entry of key 1 / value 2), body = 4 (0x22).
        let message = Message {
            topic: "t".into(),
            id: "i".into(),
            header: [("k".to_string(), "v".to_string())].into(),
            body: Bytes::from_static(b"b"),
        };
        assert_eq!(
            message.encode_to_vec(),
            [0x0a, 1, b't', 0x12, 1, b'i', 0x1a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', 0x22, 1, b'b']
        );
        assert!(Empty {}.encode_to_vec().is_empty());
    }
}
