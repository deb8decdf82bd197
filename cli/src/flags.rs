//! What the values of command-line flags mean: times and byte sizes,
//! parsed the same way by every command.

use anyhow::bail;

/// A time given on the command line, in epoch milliseconds.
pub fn parse_time(s: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S") {
        return Ok(t.and_utc().timestamp_millis());
    }
    if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S") {
        return Ok(t.and_utc().timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc().timestamp_millis());
    }
    bail!(
        "`{s}` is not a time: use RFC 3339 (2024-05-01T12:00:00Z), YYYY-MM-DD or epoch milliseconds"
    )
}

/// A byte size flag (`2MiB`, `512KiB`, `100000`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size_from(s, 1)
}

/// Parses a memory budget: a byte size (see [`parse_size_from`]) of at
/// least 16MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size_from(s, 16 << 20).map_err(|e| {
        if e.contains("below") {
            format!("`{s}` is below the smallest budget, 16MiB")
        } else {
            e
        }
    })
}

/// Parses a byte size of at least `min`: a number with an optional unit
/// (`B`, `KB`, `MB`, `GB` in powers of 1000; `KiB`, `MiB`, `GiB` in powers
/// of 1024).
pub fn parse_size_from(s: &str, min: u64) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 512KiB or 2MiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown size unit `{u}` (use B, KB, MB, GB, KiB, MiB or GiB)"
            ));
        }
    };
    let bytes = n * mult;
    if bytes.is_nan() || bytes < min as f64 {
        return Err(format!("`{s}` is below the smallest size, {min} bytes"));
    }
    Ok(bytes as u64)
}

/// A byte size for people: `512MiB`, `1.5GiB`.
pub fn format_size(b: u64) -> String {
    let mib = b as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.1}GiB", mib / 1024.0)
    } else {
        format!("{mib:.0}MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_both_unit_systems() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("100000000"), Ok(100_000_000));
        assert!(parse_size("1MiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(format_size(512 << 20), "512MiB");
    }
}
