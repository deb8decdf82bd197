//! A deterministic generator of click events (JSON lines, Parquet or CSV)
//! for the quickstart, the tests and the benchmarks.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringBuilder, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// 2024-01-01T00:00:00Z in ms.
pub const BASE_TS: i64 = 1_704_067_200_000;

/// Options of `sluice gen`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenArgs {
    /// Number of events.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Number of distinct users.
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Output file.
    #[arg(long, default_value = "events.jsonl")]
    pub out: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Event-time span in minutes, starting 2024-01-01T00:00:00Z.
    #[arg(long, default_value_t = 180)]
    pub minutes: u64,
    /// Make every N-th event late: its time moved back by `--late-ms` (0: none).
    #[arg(long, default_value_t = 0)]
    pub late_every: u64,
    /// How far back a late event's time moves.
    #[arg(long, default_value_t = 1_200_000)]
    pub late_ms: i64,
}

impl GenArgs {
    /// `events` events over `minutes` for `keys` users, written to `out`.
    pub fn new(events: u64, keys: u64, minutes: u64, out: PathBuf) -> Self {
        GenArgs {
            events,
            keys,
            out,
            seed: 42,
            minutes,
            late_every: 0,
            late_ms: 1_200_000,
        }
    }

    /// The `i`-th event.
    pub fn event(&self, rng: &mut Rng, i: u64) -> Event {
        let mut e = event(rng, i, self.events, self.keys, self.minutes);
        if self.late_every > 0 && i % self.late_every == self.late_every - 1 {
            e.ts -= self.late_ms;
        }
        e
    }
}

/// SplitMix64: small, fast, deterministic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// One generated event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// User key index.
    pub user: u64,
    /// Item index.
    pub item: u64,
    /// Price in cents (may be negative: refunds, filtered by the quickstart view).
    pub price_cents: i64,
    /// Event time, ms.
    pub ts: i64,
}

/// The `i`-th of `n` events over `minutes`: time increases with `i`, with up
/// to 2 s of disorder (inside the quickstart's 5 s watermark).
pub fn event(rng: &mut Rng, i: u64, n: u64, keys: u64, minutes: u64) -> Event {
    let span = (minutes * 60_000) as i64;
    let base = BASE_TS + (i as i128 * span as i128 / n.max(1) as i128) as i64;
    let jitter = rng.below(2000) as i64;
    let user = rng.below(keys);
    let item = rng.below(5000);
    let r = rng.below(10_000) as i64;
    let price_cents = if r < 50 { -r } else { r };
    Event {
        user,
        item,
        price_cents,
        ts: (base - jitter).max(BASE_TS),
    }
}

/// Formats ms since the epoch as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

/// One event as a JSON object (no newline).
pub fn event_json(e: &Event) -> String {
    format!(
        "{{\"user_id\":\"u{:05}\",\"item_id\":\"i{}\",\"price\":{}.{:02},\"ts\":\"{}\"}}",
        e.user,
        e.item,
        if e.price_cents < 0 {
            "-0".to_string()
        } else {
            (e.price_cents / 100).to_string()
        },
        e.price_cents.abs() % 100,
        rfc3339(e.ts)
    )
}

/// The clickstream fields of an event beyond [`event_json`]'s: session id,
/// page, device and referrer (the JSON, Avro and Protobuf records carry the same).
pub struct ClickContext {
    /// `s` and 8 hex digits: the user and the half hour.
    pub session_id: String,
    /// `/item/i{item}`.
    pub page: String,
    /// By user.
    pub device: &'static str,
    /// By item.
    pub referrer: &'static str,
}

impl ClickContext {
    /// The context of `e`.
    pub fn of(e: &Event) -> Self {
        const DEVICES: [&str; 3] = ["mobile", "desktop", "tablet"];
        const REFERRERS: [&str; 5] = ["search", "direct", "email", "social", "ads"];
        let session =
            (e.user.wrapping_mul(2_654_435_761) ^ (e.ts as u64 / 1_800_000)) & 0xffff_ffff;
        ClickContext {
            session_id: format!("s{session:08x}"),
            page: format!("/item/i{}", e.item),
            device: DEVICES[(e.user % 3) as usize],
            referrer: REFERRERS[(e.item % 5) as usize],
        }
    }
}

/// One event as a clickstream record (~170 bytes): the fields of
/// [`event_json`] plus session, page, device and referrer, which pipelines
/// may declare or ignore.
pub fn clickstream_json(e: &Event) -> String {
    let base = event_json(e);
    let c = ClickContext::of(e);
    format!(
        "{},\"session_id\":\"{}\",\"page\":\"{}\",\"device\":\"{}\",\"referrer\":\"{}\"}}",
        &base[..base.len() - 1],
        c.session_id,
        c.page,
        c.device,
        c.referrer
    )
}

/// Writes the events; the format follows the file name (.jsonl, .parquet, .csv).
pub fn run(a: &GenArgs) -> anyhow::Result<()> {
    if let Some(d) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    let ext = a
        .out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "parquet" | "csv" => return write_columnar(a, &ext),
        _ => {}
    }
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&a.out)?);
    let mut rng = Rng::new(a.seed);
    for i in 0..a.events {
        let e = a.event(&mut rng, i);
        writeln!(w, "{}", event_json(&e))?;
    }
    w.flush()?;
    Ok(())
}

/// The events as Arrow columns: user_id, item_id, price, ts (TIMESTAMP ms UTC).
pub fn events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("item_id", DataType::Utf8, false),
        Field::new("price", DataType::Float64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// Events `i0..i0 + n` as one batch.
pub fn events_batch(a: &GenArgs, rng: &mut Rng, i0: u64, n: u64) -> anyhow::Result<RecordBatch> {
    let mut users = StringBuilder::with_capacity(n as usize, n as usize * 6);
    let mut items = StringBuilder::with_capacity(n as usize, n as usize * 5);
    let mut prices = Vec::with_capacity(n as usize);
    let mut ts = Vec::with_capacity(n as usize);
    for i in i0..i0 + n {
        let e = a.event(rng, i);
        users.append_value(format!("u{:05}", e.user));
        items.append_value(format!("i{}", e.item));
        prices.push(e.price_cents as f64 / 100.0);
        ts.push(e.ts);
    }
    Ok(RecordBatch::try_new(
        events_schema(),
        vec![
            Arc::new(users.finish()),
            Arc::new(items.finish()),
            Arc::new(Float64Array::from(prices)),
            Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
        ],
    )?)
}

fn write_columnar(a: &GenArgs, ext: &str) -> anyhow::Result<()> {
    let f = std::fs::File::create(&a.out)?;
    let mut rng = Rng::new(a.seed);
    let chunk = 65_536u64;
    if ext == "parquet" {
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, events_schema(), Some(props))?;
        let mut i = 0;
        while i < a.events {
            let n = chunk.min(a.events - i);
            w.write(&events_batch(a, &mut rng, i, n)?)?;
            i += n;
        }
        w.close()?;
    } else {
        let mut w = arrow::csv::WriterBuilder::new()
            .with_header(true)
            .with_timestamp_tz_format("%Y-%m-%dT%H:%M:%S%.3fZ".to_string())
            .build(BufWriter::with_capacity(1 << 20, f));
        let mut i = 0;
        while i < a.events {
            let n = chunk.min(a.events - i);
            w.write(&events_batch(a, &mut rng, i, n)?)?;
            i += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clickstream_record_keeps_its_fields() {
        let e = Event {
            user: 7,
            item: 123,
            price_cents: 1999,
            ts: 1_704_067_200_000,
        };
        assert_eq!(
            clickstream_json(&e),
            r#"{"user_id":"u00007","item_id":"i123","price":19.99,"ts":"2024-01-01T00:00:00.000Z","session_id":"s538a21c7","page":"/item/i123","device":"desktop","referrer":"social"}"#
        );
    }
}
