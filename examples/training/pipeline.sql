-- From stream to training set: the same feature views run live by
-- `sluice run` and over history by `sluice backfill`; `sluice training-set`
-- reads their lake point-in-time-correctly. See README.md here.

CREATE SOURCE clicks (
    user_id  TEXT NOT NULL,
    item_id  TEXT NOT NULL,
    price    DOUBLE,
    ts       TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (
    connector = 'file',
    path = 'events.jsonl'
);

-- What the user did in the last hour, every 5 minutes.
CREATE FEATURE VIEW user_activity
    KEY user_id
    WITH (online = true, offline = '${SLUICE_LAKE:-lake}')
AS SELECT
    user_id,
    COUNT(*)                 AS clicks_1h,
    SUM(price)               AS spend_1h,
    APPROX_DISTINCT(item_id) AS distinct_items_1h
FROM clicks
WHERE price >= 0
GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR);

-- How popular the item was over the last 30 minutes.
CREATE FEATURE VIEW item_popularity
    KEY item_id
    WITH (online = true, offline = '${SLUICE_LAKE:-lake}')
AS SELECT
    item_id,
    COUNT(*)           AS clicks_30m,
    AVG(price)         AS avg_price_30m
FROM clicks
GROUP BY item_id, TUMBLE(ts, INTERVAL '30' MINUTE);
