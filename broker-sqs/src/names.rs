//! How broker topics and queue groups become SQS queue and SNS topic names.
//!
//! SQS queue names are 1 to 80 characters of `[A-Za-z0-9_-]` (a FIFO queue's end in `.fifo`, which
//! counts); SNS topic names are 1 to 256 of the same (FIFO: `.fifo`). A broker topic may hold dots
//! and any other character, and be 255 bytes long, so a name is a readable part plus a hash:
//!
//! | what | name |
//! |---|---|
//! | SNS topic of `topic` | `<prefix>-<readable topic, 40>-<hash of topic>` |
//! | queue of group `group` on `topic` | `<prefix>-<readable topic, 24>-<readable group, 12>-<hash of topic and group>` |
//! | broadcast subscriber's queue | `<prefix>-<readable topic, 24>-b-<8 hex of the topic hash>-<12 random hex>` |
//! | redrive (dead-letter) queue of `topic` | `<SNS topic name>-dlq` |
//!
//! (plus `.fifo` with `fifo=true`). *Readable* keeps `[A-Za-z0-9_-]`, turns `.` into `-` and any other
//! character into `_`, and truncates to the given number of characters; the *hash* is the 64-bit
//! FNV-1a of the exact UTF-8 bytes in 16 hex digits, so two topics that read alike (`a.b` and
//! `a-b`, or two long topics with one beginning) still get different names, and the same topic
//! gets the same name in every process and version. With the default prefix `micro` the longest
//! name is 77 characters.

/// The 64-bit FNV-1a hash of `parts`, separated by a NUL byte (which no topic holds), as 16 hex digits.
fn hash(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        let bytes = part.as_bytes();
        let separator: &[u8] = if i == 0 { &[] } else { &[0] };
        for byte in separator.iter().chain(bytes) {
            h ^= u64::from(*byte);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// `text` with `.` as `-` and every character outside `[A-Za-z0-9_-]` as `_`, at most `max` characters.
fn readable(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '-' => c,
            '.' => '-',
            _ => '_',
        })
        .collect()
}

fn fifo_suffix(fifo: bool) -> &'static str {
    if fifo { ".fifo" } else { "" }
}

/// The SNS topic name of broker topic `topic`.
pub fn sns_topic(prefix: &str, topic: &str, fifo: bool) -> String {
    format!("{prefix}-{}-{}{}", readable(topic, 40), hash(&[topic]), fifo_suffix(fifo))
}

/// The queue shared by the members of queue group `group` on `topic`.
pub fn group_queue(prefix: &str, topic: &str, group: &str, fifo: bool) -> String {
    format!(
        "{prefix}-{}-{}-{}{}",
        readable(topic, 24),
        readable(group, 12),
        hash(&["group", topic, group]),
        fifo_suffix(fifo)
    )
}

/// A broadcast subscriber's own (temporary) queue; `unique` is 12 random hex digits.
pub fn broadcast_queue(prefix: &str, topic: &str, unique: &str, fifo: bool) -> String {
    let topic_hash = hash(&[topic]);
    format!("{prefix}-{}-b-{}-{}{}", readable(topic, 24), &topic_hash[..8], unique, fifo_suffix(fifo))
}

/// The queue the redrive policy moves a message to after too many receives.
pub fn redrive_queue(prefix: &str, topic: &str, fifo: bool) -> String {
    format!("{}-dlq{}", sns_topic(prefix, topic, false), fifo_suffix(fifo))
}

/// Whether `name` is a legal SQS queue name (80 characters of `[A-Za-z0-9_-]`, `.fifo` for FIFO).
pub fn is_legal_queue_name(name: &str, fifo: bool) -> bool {
    let stem = if fifo {
        match name.strip_suffix(".fifo") {
            Some(stem) => stem,
            None => return false,
        }
    } else {
        name
    };
    !stem.is_empty() && name.len() <= 80 && stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_legal_stable_and_distinct() {
        let long = "x.".repeat(127) + "y";
        for fifo in [false, true] {
            for topic in ["user.registered", "a", "é.ü/#?", long.as_str()] {
                for name in [
                    sns_topic("micro", topic, fifo),
                    group_queue("micro", topic, &"g".repeat(200), fifo),
                    broadcast_queue("0123456789", topic, "0123456789ab", fifo),
                    redrive_queue("0123456789", topic, fifo),
                ] {
                    assert!(is_legal_queue_name(&name, fifo), "{name} ({} chars)", name.len());
                }
            }
        }
        assert_eq!(sns_topic("micro", "user.registered", false), sns_topic("micro", "user.registered", false));
        assert!(sns_topic("micro", "user.registered", false).starts_with("micro-user-registered-"));
        assert_ne!(sns_topic("micro", "a.b", false), sns_topic("micro", "a-b", false));
        assert_ne!(group_queue("micro", "a", "b.c", false), group_queue("micro", "a.b", "c", false));
        assert_ne!(sns_topic("micro", &format!("{long}1"), false), sns_topic("micro", &format!("{long}2"), false));
        assert!(sns_topic("micro", "t", true).ends_with(".fifo"));
        // FNV-1a of "a", as published.
        assert_eq!(hash(&["a"]), "af63dc4c8601ec8c");
    }

    #[test]
    fn illegal_names() {
        assert!(!is_legal_queue_name("has.dot", false));
        assert!(!is_legal_queue_name(&"x".repeat(81), false));
        assert!(!is_legal_queue_name("plain", true));
        assert!(!is_legal_queue_name(".fifo", true));
        assert!(!is_legal_queue_name("", false));
    }
}
