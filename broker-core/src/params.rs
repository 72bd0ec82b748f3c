//! Parsing of backend parameters ([`BrokerOptions::params`](crate::BrokerOptions::params)), in
//! one place so that every backend rejects a bad value with the same kind of message:
//! ``parameter `key` = "value": expected …``.

use std::str::FromStr;

use crate::error::{Error, Result};

/// The `InvalidInput` error for parameter `key` whose `value` is not `expected`.
pub fn bad_value(key: &str, value: &str, expected: &str) -> Error {
    Error::invalid_input(format!("parameter `{key}` = {value:?}: expected {expected}"))
}

/// A whole number of at least 1 (any integer type).
///
/// ```
/// assert_eq!(broker_core::params::positive::<u32>("prefetch", "8").unwrap(), 8);
/// assert!(broker_core::params::positive::<u32>("prefetch", "0").is_err());
/// ```
pub fn positive<T: FromStr + PartialOrd + Default>(key: &str, value: &str) -> Result<T> {
    match value.trim().parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err(bad_value(key, value, "a whole number of at least 1")),
    }
}

/// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`, any case).
pub fn boolean(key: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(bad_value(key, value, "true or false")),
    }
}

/// A value that is not empty.
pub fn non_empty(key: &str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(bad_value(key, value, "a non-empty value"));
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn values() {
        assert_eq!(positive::<usize>("n", " 3 ").unwrap(), 3);
        for bad in ["0", "-1", "x", ""] {
            let err = positive::<i64>("n", bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            assert!(err.to_string().contains("parameter `n`"), "{err}");
        }
        assert!(positive::<i64>("n", "9223372036854775808").is_err(), "over i64::MAX");
        assert!(boolean("b", "Yes").unwrap());
        assert!(!boolean("b", "off").unwrap());
        assert!(boolean("b", "maybe").unwrap_err().to_string().contains("true or false"));
        assert_eq!(non_empty("s", "x").unwrap(), "x");
        assert!(non_empty("s", "").is_err());
    }
}
