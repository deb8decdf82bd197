-- Quickstart: click events from a JSON-lines file, one hopping-window
-- feature view served online and written to the Parquet lake.
-- `sluice demo` generates events.jsonl next to this file's copy;
-- `sluice gen --out examples/quickstart/events.jsonl` makes one here.

CREATE SOURCE clicks (
    user_id  TEXT NOT NULL,
    item_id  TEXT,
    price    DOUBLE,
    ts       TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (
    connector = 'file',
    path = 'events.jsonl',
    format = 'json'
);

CREATE FEATURE VIEW user_activity
    KEY user_id
    WITH (online = true, offline = 'lake')
AS SELECT
    user_id,
    COUNT(*)                 AS clicks_1h,
    SUM(price)               AS spend_1h,
    AVG(price)               AS avg_price_1h,
    APPROX_DISTINCT(item_id) AS distinct_items_1h
FROM clicks
WHERE price >= 0
GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR);
