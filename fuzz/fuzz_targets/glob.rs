//! Any glob over a fixed folder tree: a sorted list of existing files or an
//! error, never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn tree() -> &'static tempfile::TempDir {
    static TREE: OnceLock<tempfile::TempDir> = OnceLock::new();
    TREE.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        for f in ["a.jsonl", "b.csv", "date=2024-01-01/c.parquet", "x/y/z.jsonl", "_skip/d.jsonl", ".hidden.jsonl"] {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, b"").expect("write");
        }
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(pattern) = std::str::from_utf8(data) else {
        return;
    };
    if pattern.len() > 64 || pattern.contains("..") {
        return;
    }
    let spec = format!("{}/{pattern}", tree().path().display());
    if let Ok(files) = sluice_connectors::expand_paths(&spec) {
        assert!(files.windows(2).all(|w| w[0].path < w[1].path), "sorted and unique");
        assert!(files.iter().all(|f| f.path.exists()));
    }
});
