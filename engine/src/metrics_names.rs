//! The metrics Sluice reports, with their help texts.

/// `(name, kind, help)` of every metric.
pub const METRICS: &[(&str, &str, &str)] = &[
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
