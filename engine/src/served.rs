//! The served-value log: a sample of a view's online reads (`log_served`),
//! chosen by key hash so a key is always or never logged, kept in memory
//! until the job's writer drains it into the lake (`_served/{view}`).

use std::sync::Mutex;

use serde_json::Value;

/// One logged read.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedRow {
    /// The online key (key columns joined by `|`).
    pub key: String,
    /// The read's clock (ms), when the read had one.
    pub as_of: Option<i64>,
    /// The features served; `None` when the key was not found.
    pub features: Option<serde_json::Map<String, Value>>,
    /// The request's `x-request-id`, or one the server made.
    pub request_id: String,
    /// Wall clock of the read (ms since the epoch).
    pub served_at: i64,
}

/// The reads of one view waiting to be written.
#[derive(Debug)]
pub struct ServedLog {
    /// Share of keys logged.
    pub fraction: f64,
    rows: Mutex<Vec<ServedRow>>,
}

/// A key's place in `[0, 1)`: FNV-1a of its bytes, so every process and
/// every run picks the same keys.
pub fn key_share(key: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Finish so nearby keys spread over the range.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Epoch ms of `YYYY-MM-DDTHH:MM:SS[.fff]Z`, the form reads give `as_of` in.
pub fn parse_utc_ms(t: &str) -> Option<i64> {
    let t = t.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut h = hms.splitn(3, ':');
    let hh: i64 = h.next()?.parse().ok()?;
    let mm: i64 = h.next()?.parse().ok()?;
    let ss: i64 = h.next()?.parse().ok()?;
    let ms: i64 = if frac.is_empty() {
        0
    } else {
        format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms)
}

/// At most this many reads wait per view; past it reads are counted in
/// `sluice_served_log_dropped_total` and not logged (the writer is behind).
pub const MAX_PENDING: usize = 1_000_000;

impl ServedLog {
    /// A log of `fraction` of the keys.
    pub fn new(fraction: f64) -> Self {
        ServedLog {
            fraction,
            rows: Mutex::new(Vec::new()),
        }
    }

    /// Whether reads of `key` are logged.
    pub fn samples(&self, key: &str) -> bool {
        key_share(key) < self.fraction
    }

    /// Logs `row` (the caller checked [`ServedLog::samples`]).
    pub fn push(&self, view: &str, row: ServedRow) {
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        if rows.len() >= MAX_PENDING {
            metrics::counter!("sluice_served_log_dropped_total", "view" => view.to_string())
                .increment(1);
            return;
        }
        rows.push(row);
    }

    /// Takes the reads logged so far.
    pub fn drain(&self) -> Vec<ServedRow> {
        std::mem::take(&mut *self.rows.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_always_or_never_sampled_and_the_share_holds() {
        let log = ServedLog::new(0.1);
        let n = 100_000;
        let picked = (0..n).filter(|i| log.samples(&format!("u{i:06}"))).count();
        assert!((picked as f64 / n as f64 - 0.1).abs() < 0.005, "{picked}");
        for i in 0..1000 {
            let k = format!("user-{i}");
            assert_eq!(log.samples(&k), log.samples(&k));
        }
        assert!(ServedLog::new(1.0).samples("anything"));
    }

    #[test]
    fn as_of_strings_parse_to_epoch_ms() {
        assert_eq!(parse_utc_ms("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            parse_utc_ms("2024-01-01T00:04:30.000Z"),
            Some(1_704_067_470_000)
        );
        assert_eq!(
            parse_utc_ms("2024-02-29T23:59:59.5Z"),
            Some(1_709_251_199_500)
        );
        assert_eq!(parse_utc_ms("1969-12-31T23:59:59.999Z"), Some(-1));
        assert_eq!(parse_utc_ms("2024-01-01 00:00:00"), None);
    }
}
