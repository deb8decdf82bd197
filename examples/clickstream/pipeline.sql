-- Clickstream: click events from a Kafka topic (written by `sluice produce`),
-- two feature views served online, written to the Parquet lake, and
-- published as feature updates to a topic. Brokers come from $KAFKA_BROKERS
-- (default 127.0.0.1:9092). See README.md beside this file.

CREATE SOURCE clicks (
    user_id    TEXT NOT NULL,
    item_id    TEXT,
    price      DOUBLE,
    device     TEXT,
    ts         TIMESTAMP NOT NULL,
    -- Filled from the Kafka record, not the JSON payload:
    kafka_partition INT    METADATA FROM 'partition',
    kafka_offset    BIGINT METADATA FROM 'offset',
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (
    connector = 'kafka',
    topic = 'clicks',
    brokers = '${KAFKA_BROKERS:-127.0.0.1:9092}',
    format = 'json',
    group_id = 'sluice-clickstream',
    start = 'earliest',
    -- A partition without new records for 30 s stops holding windows open.
    idle_timeout = '30 seconds',
    -- Undecodable and late records, with headers naming partition, offset, reason.
    dead_letter_topic = 'clicks_dead_letters'
);

-- Spend and activity over the last hour, refreshed every 5 minutes.
CREATE FEATURE VIEW user_activity
    KEY user_id
    WITH (online = true, offline = '${SLUICE_LAKE:-lake}', kafka_topic = 'user_activity_updates')
AS SELECT
    user_id,
    COUNT(*)                 AS clicks_1h,
    SUM(price)               AS spend_1h,
    AVG(price)               AS avg_price_1h,
    APPROX_DISTINCT(item_id) AS distinct_items_1h
FROM clicks
WHERE price >= 0
GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR);

-- Device mix over the last minute.
CREATE FEATURE VIEW user_devices_1m
    KEY user_id
    WITH (online = true, offline = '${SLUICE_LAKE:-lake}')
AS SELECT
    user_id,
    COUNT(*) FILTER (WHERE device = 'mobile')  AS mobile_clicks_1m,
    COUNT(*) FILTER (WHERE device = 'desktop') AS desktop_clicks_1m,
    MAX(kafka_offset)                          AS last_offset
FROM clicks
GROUP BY user_id, TUMBLE(ts, INTERVAL '1' MINUTE);
