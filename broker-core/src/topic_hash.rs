//! [`TopicHash`]: a cheap hash for maps keyed by the application's topic names.

/// For backends: the hasher of maps keyed by topic names that a publish looks up (the memory
/// backend's topics, the nats backend's subjects): a word-at-a-time multiplicative hash
/// (FxHash's), a fraction of SipHash's cost for a topic name. Only for maps whose keys the
/// application or this process chose (flooding such a map with colliding keys would take
/// publishing or subscribing to them); looking a key from the network up in such a map is fine,
/// inserting keys from the network is not.
///
/// ```
/// use std::collections::HashMap;
/// let mut subjects: HashMap<String, u32, broker_core::TopicHash> = HashMap::default();
/// subjects.insert("user.registered".into(), 1);
/// assert_eq!(subjects.get("user.registered"), Some(&1));
/// ```
pub type TopicHash = std::hash::BuildHasherDefault<TopicHasher>;

/// The [`std::hash::Hasher`] of [`TopicHash`].
#[derive(Debug, Default)]
pub struct TopicHasher(u64);

impl TopicHasher {
    const SEED: u64 = 0xf135_7aea_2e62_a9c5;

    fn add(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(Self::SEED);
    }
}

impl std::hash::Hasher for TopicHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.add(u64::from(byte));
    }

    fn finish(&self) -> u64 {
        // The table takes its buckets from the low bits and its tags from the top 7: fold the
        // well-mixed high bits down.
        self.0.rotate_left(26)
    }
}
