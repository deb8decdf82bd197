//! The lake reads the same in Apache Spark as in DuckDB, with the types a
//! model pipeline expects: every integer feature a signed 64-bit integer
//! (`APPROX_DISTINCT` included, which DataFusion computes as an unsigned
//! one and Spark would read as `decimal(20,0)`), timestamps as timestamps.

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use arrow::datatypes::DataType;

const PIPELINE: &str = r#"
CREATE SOURCE clicks (
    user_id  TEXT NOT NULL,
    item_id  TEXT,
    price    DOUBLE,
    qty      BIGINT,
    ts       TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'file', path = 'events.jsonl');

CREATE FEATURE VIEW shop KEY user_id WITH (online = true, offline = 'lake') AS
SELECT user_id, COUNT(*) AS n, SUM(qty) AS units, AVG(price) AS avg_price,
       MAX(item_id) AS top_item, APPROX_DISTINCT(item_id) AS items,
       MAX(ts) AS last_click
FROM clicks
GROUP BY user_id, HOP(ts, INTERVAL '30' MINUTE, INTERVAL '2' HOUR);

CREATE FEATURE VIEW recent KEY user_id WITH (offline = 'lake') AS
SELECT user_id, price, qty, CHARACTER_LENGTH(item_id) AS item_len, ts FROM clicks;
"#;

fn events(path: &Path) {
    let mut out = String::new();
    for i in 0..4_000i64 {
        let ts = 1_704_067_200_000 + i * 9_000;
        let item = if i % 9 == 0 {
            "null".to_string()
        } else {
            format!("\"item-{}\"", (i * 7919) % 250)
        };
        let price = if i % 13 == 0 {
            "null".to_string()
        } else {
            format!("{}", ((i * 31) % 5000) as f64 / 7.0)
        };
        writeln!(
            out,
            r#"{{"user_id":"u{}","item_id":{item},"price":{price},"qty":{},"ts":"{}"}}"#,
            (i * 17) % 60,
            i % 5,
            sluice_connectors::rfc3339_ms(ts)
        )
        .expect("write");
    }
    std::fs::write(path, out).expect("events");
}

#[test]
fn spark_reads_the_lake_as_duckdb_does_with_signed_integers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    events(&d.join("events.jsonl"));
    std::fs::write(d.join("p.sql"), PIPELINE).expect("pipeline");
    let o = common::sluice(&[
        "run",
        &d.join("p.sql").display().to_string(),
        "--state-dir",
        &d.join("state").display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The files' own types: no unsigned integer anywhere.
    for view in ["shop", "recent"] {
        let files = common::parquet_files(&d.join("lake").join(view));
        assert!(!files.is_empty(), "no lake files for {view}");
        for f in &files {
            for b in common::read_parquet(f) {
                for field in b.schema().fields() {
                    assert!(
                        !matches!(
                            field.data_type(),
                            DataType::UInt8
                                | DataType::UInt16
                                | DataType::UInt32
                                | DataType::UInt64
                        ),
                        "{view}.{} is {} in {}",
                        field.name(),
                        field.data_type(),
                        f.display()
                    );
                }
                let items = b
                    .schema()
                    .field_with_name("items")
                    .map(|f| f.data_type().clone());
                if view == "shop" {
                    assert_eq!(items.ok(), Some(DataType::Int64));
                }
            }
        }
    }
    // The online store's value for a key is still a number.
    let got = common::get(&d.join("state"), "shop", "u1").expect("u1 online");
    assert!(got["features"]["items"].is_i64(), "{got}");

    let Some(py) = common::spark_python() else {
        if std::env::var_os("SLUICE_SKIP_SPARK").is_some() {
            eprintln!("SLUICE_SKIP_SPARK set: the Spark read is skipped");
            return;
        }
        panic!(
            "no Python with pyspark and duckdb (pip install pyspark duckdb, or set SLUICE_PYTHON; SLUICE_SKIP_SPARK=1 skips)"
        );
    };
    let script = common::repo_root().join("testdata/lake_spark.py");
    let o = Command::new(py)
        .args([
            script.display().to_string(),
            d.join("lake").display().to_string(),
            "shop".into(),
            "recent".into(),
        ])
        .output()
        .expect("python");
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "Spark reads the lake differently:\n{report}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(report.contains("items bigint"), "{report}");
    assert!(report.contains("last_click timestamp"), "{report}");
    assert!(report.contains("item_len"), "{report}");
}
