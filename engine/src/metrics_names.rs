//! The metrics Sluice reports, with their help texts.

/// `(name, kind, help)` of every metric.
pub const METRICS: &[(&str, &str, &str)] = &[
    (
        "sluice_serving_rejected_total",
        "counter",
        "Requests the serving limits turned away: every slot of the route busy, the deadline passed, or a Host not served (labels: route, reason)",
    ),
    (
        "sluice_serving_connections",
        "gauge",
        "Open connections of the serving API",
    ),
    (
        "sluice_serving_connections_refused_total",
        "counter",
        "Connections past --max-connections, answered 503 and closed",
    ),
    (
        "sluice_serving_accept_errors_total",
        "counter",
        "Connections the server failed to accept (out of file descriptors)",
    ),
    (
        "sluice_dead_letters_dropped_total",
        "counter",
        "Dead letters past --dead-letter-limit: counted, not written (labels: source, kind)",
    ),
    (
        "sluice_index_rejected_total",
        "counter",
        "Vectors the index cannot hold (wrong length, not finite); the key leaves the index (label: view)",
    ),
    (
        "sluice_events_in_total",
        "counter",
        "Rows decoded from a source (label: source)",
    ),
    (
        "sluice_decode_errors_total",
        "counter",
        "Records a source could not decode or that did not fit the schema (labels: source, kind)",
    ),
    (
        "sluice_dead_letters_total",
        "counter",
        "Records dead-lettered, to the file or the source's dead_letter_topic (labels: source, kind)",
    ),
    (
        "sluice_served_log_rows_total",
        "counter",
        "Online reads written to the view's served-value log (log_served) (label: view)",
    ),
    (
        "sluice_served_log_dropped_total",
        "counter",
        "Sampled reads not logged because a million were already waiting for the writer (label: view)",
    ),
    (
        "sluice_expectation_failures_total",
        "counter",
        "Emitted rows an expect rule of their view is false for or cannot compute; the rows are kept (labels: view, rule)",
    ),
    (
        "sluice_check_failures_total",
        "counter",
        "Rows a CHECK rule of their source is false for, dead-lettered as check_failed (labels: source, rule)",
    ),
    (
        "sluice_view_newest_event_ms",
        "gauge",
        "Newest event time (ms) the view's source delivered, as of the last checkpoint (label: view)",
    ),
    (
        "sluice_view_watermark_ms",
        "gauge",
        "The view's committed watermark, ms (label: view)",
    ),
    (
        "sluice_stats_days_total",
        "counter",
        "Days of the view's lake described by its daily statistics (stats = 'daily') (label: view)",
    ),
    (
        "sluice_stats_errors_total",
        "counter",
        "Days whose daily statistics could not be computed or written; see the log (label: view)",
    ),
    (
        "sluice_stats_day_ms",
        "gauge",
        "Start (ms, UTC) of the newest day the view's daily statistics describe (label: view)",
    ),
    (
        "sluice_stats_rows",
        "gauge",
        "Lake rows of the newest day described (label: view)",
    ),
    (
        "sluice_feature_null_rate",
        "gauge",
        "NULL share of a feature on the newest day described (labels: view, feature)",
    ),
    (
        "sluice_feature_mean",
        "gauge",
        "Mean of a numeric feature on the newest day described (labels: view, feature)",
    ),
    (
        "sluice_feature_psi",
        "gauge",
        "Population stability index of a feature on the newest day described against the view's stats_reference (labels: view, feature)",
    ),
    (
        "sluice_served_value_age_seconds",
        "histogram",
        "Age of each served value: its read clock (as_of) minus the newest event in the key's window (lifetime and per-event views: the watermark minus the row's event time) (label: view)",
    ),
    (
        "sluice_view_event_lag_seconds",
        "gauge",
        "Wall clock minus the view's committed watermark, seconds, computed at each scrape (label: view)",
    ),
    (
        "sluice_view_fresh",
        "gauge",
        "1 while the view's event lag is within its freshness_slo, else 0 (label: view)",
    ),
    (
        "sluice_checkpoint_age_seconds",
        "gauge",
        "Seconds since the last checkpoint committed, computed at each scrape",
    ),
    (
        "sluice_view_errors_total",
        "counter",
        "Rows a view's expression cannot compute for (division by zero, a cast that does not fit), dead-lettered as view_error (label: view)",
    ),
    (
        "sluice_late_events_total",
        "counter",
        "Events that arrived after all their windows closed (label: view)",
    ),
    (
        "sluice_watermark_ms",
        "gauge",
        "Watermark of a source, ms since the epoch (label: source)",
    ),
    (
        "sluice_rows_emitted_total",
        "counter",
        "Feature rows emitted: windows closed, lifetime updates, per-event rows (label: view)",
    ),
    (
        "sluice_online_writes_total",
        "counter",
        "Rows committed to the online store (label: view)",
    ),
    (
        "sluice_lake_rows_total",
        "counter",
        "Rows written to the Parquet lake (label: view)",
    ),
    (
        "sluice_archive_rows_total",
        "counter",
        "Accepted events written to a source's event archive (label: source)",
    ),
    (
        "sluice_checkpoints_total",
        "counter",
        "Checkpoints committed",
    ),
    (
        "sluice_checkpoint_duration_seconds",
        "histogram",
        "Time to take a checkpoint",
    ),
    (
        "sluice_tiles_written_total",
        "counter",
        "Tiles written at checkpoints (label: view)",
    ),
    (
        "sluice_tiles_expired_total",
        "counter",
        "Tiles deleted because the watermark passed every window holding them (label: view)",
    ),
    (
        "sluice_tile_store_reads_total",
        "counter",
        "Tiles a checkpoint read back from RocksDB because they were not cached (label: view)",
    ),
    (
        "sluice_tile_cache_evictions_total",
        "counter",
        "Clean tiles evicted from the tile cache to stay within the memory budget (label: view)",
    ),
    (
        "sluice_tile_cache_bytes",
        "gauge",
        "Bytes of tile states cached in memory after a checkpoint (label: view)",
    ),
    (
        "sluice_state_keys",
        "gauge",
        "Distinct keys in a view's window operator, set at each checkpoint; the key dictionary does not shrink in this build (label: view)",
    ),
    (
        "sluice_source_up",
        "gauge",
        "1 while a source can make progress, 0 while it cannot, e.g. no broker reachable (label: source)",
    ),
    (
        "sluice_kafka_messages_total",
        "counter",
        "Kafka messages consumed (label: source)",
    ),
    (
        "sluice_kafka_payload_bytes_total",
        "counter",
        "Payload bytes of consumed Kafka messages (label: source)",
    ),
    (
        "sluice_kafka_bytes_received_total",
        "counter",
        "Bytes received from brokers, librdkafka statistics (label: client)",
    ),
    (
        "sluice_kafka_consumer_lag",
        "gauge",
        "Messages between a partition's high watermark and the next offset Sluice reads (labels: source, partition)",
    ),
    (
        "sluice_kafka_checkpoint_offset",
        "gauge",
        "Next offset per partition in the last committed checkpoint (labels: source, partition)",
    ),
    (
        "sluice_kafka_rebalances_total",
        "counter",
        "Partition assignments: Sluice assigns every partition of the topic itself at start (label: source)",
    ),
    (
        "sluice_kafka_fetch_errors_total",
        "counter",
        "Errors returned while fetching messages (labels: source, code)",
    ),
    (
        "sluice_kafka_errors_total",
        "counter",
        "Errors librdkafka reported: broker down, transport, authentication (labels: client, code)",
    ),
    (
        "sluice_kafka_feature_updates_total",
        "counter",
        "Feature rows published to a view's kafka_topic (label: view)",
    ),
    (
        "sluice_serving_requests_total",
        "counter",
        "Serving API requests (labels: route, status)",
    ),
    (
        "sluice_serving_latency_seconds",
        "histogram",
        "Serving API latency (label: route)",
    ),
    (
        "sluice_lake_files_total",
        "counter",
        "Parquet files committed to the lake (label: view)",
    ),
    (
        "sluice_source_retries_total",
        "counter",
        "Polls of a source that failed with an error worth retrying, retried with backoff (label: source)",
    ),
    (
        "sluice_index_updates_total",
        "counter",
        "Vector index upserts and removals applied at checkpoints (label: view)",
    ),
    (
        "sluice_index_expired_total",
        "counter",
        "Keys removed from a vector index because their windowed row expired (label: view)",
    ),
    (
        "sluice_index_commit_seconds",
        "histogram",
        "Time of a vector index's LMDB transaction at a checkpoint (label: view)",
    ),
    (
        "sluice_index_snapshot_seconds",
        "histogram",
        "Time to make a vector index's in-memory snapshot of the next epoch (copy on write of the touched chunks; label: view)",
    ),
    (
        "sluice_index_keys",
        "gauge",
        "Keys in a vector index at its last committed epoch (label: view)",
    ),
];

/// Registers the help texts with the installed recorder.
pub fn describe() {
    for (name, kind, help) in METRICS {
        match *kind {
            "counter" => metrics::describe_counter!(*name, *help),
            "gauge" => metrics::describe_gauge!(*name, *help),
            _ => metrics::describe_histogram!(*name, *help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::METRICS;

    /// Every `sluice_…` metric the code reports is described here, and every
    /// one described here is documented in `docs/operations.md`.
    #[test]
    fn every_metric_is_described_and_documented() {
        // The checkout the test runs in (cargo sets the variable), not
        // only the one it was compiled in: CI shares a target dir.
        let root = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
            .join("..");
        let mut used = std::collections::BTreeSet::new();
        for dir in ["engine/src", "connectors/src", "cli/src"] {
            let mut stack = vec![root.join(dir)];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).unwrap().flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|x| x == "rs") {
                        let text = std::fs::read_to_string(&p).unwrap();
                        for part in text.split("metrics::").skip(1) {
                            let Some(start) = part.find("\"sluice_") else {
                                continue;
                            };
                            if start > 40 {
                                continue;
                            }
                            let name: String = part[start + 1..]
                                .chars()
                                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                                .collect();
                            used.insert(name);
                        }
                    }
                }
            }
        }
        let described: std::collections::BTreeSet<String> =
            METRICS.iter().map(|m| m.0.to_string()).collect();
        let missing: Vec<&String> = used.difference(&described).collect();
        assert!(
            missing.is_empty(),
            "reported but not in METRICS: {missing:?}"
        );
        let docs = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
        let undocumented: Vec<&String> = described
            .iter()
            .filter(|m| !docs.contains(&format!("`{m}`")))
            .collect();
        assert!(
            undocumented.is_empty(),
            "not in docs/operations.md: {undocumented:?}"
        );
    }
}
