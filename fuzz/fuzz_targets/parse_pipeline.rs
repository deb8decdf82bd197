//! Any text as a pipeline file: a plan, or an error with a line and column.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = sluice_sql::plan_pipeline("p.sql", text, std::path::Path::new("/tmp")) {
        assert!(
            e.pos.is_some_and(|p| p.line >= 1 && p.column >= 1),
            "error without a position: {e}"
        );
    }
});
