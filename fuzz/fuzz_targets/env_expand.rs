//! Any option value through `${ENV}` expansion: text or an error, never a panic;
//! text without `${` comes back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let out = sluice_sql::expand_env(text);
    if !text.contains("${") {
        assert_eq!(out.as_deref(), Ok(text));
    }
});
