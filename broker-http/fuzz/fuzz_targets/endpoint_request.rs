//! Feeds arbitrary bytes to what the endpoint does with a request before a handler runs:
//! the query string (subscriber id, attempt, version) and the JSON envelope of either dialect.
//! Anything may be rejected; nothing may panic, and what decodes must encode back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    broker_http::fuzzing::request(data);
});
