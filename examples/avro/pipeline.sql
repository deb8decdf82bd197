-- Avro clicks from Kafka, framed as Confluent's serializers write them (a
-- zero byte and a 4-byte schema id before each record). Schema id 1 was
-- written with clicks_v1.avsc, id 2 with clicks.avsc; both are read as
-- clicks.avsc, the reader schema. See README.md beside this file.

CREATE SOURCE clicks (
    user_id  TEXT NOT NULL,
    item_id  TEXT,
    price    DOUBLE,
    ts       TIMESTAMP NOT NULL,
    CHECK (price IS NULL OR price >= 0),
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (
    connector = 'kafka',
    topic = 'clicks_avro',
    brokers = '${KAFKA_BROKERS:-127.0.0.1:9092}',
    format = 'avro',
    schema = 'clicks.avsc',
    schema.1 = 'clicks_v1.avsc',
    schema.2 = 'clicks.avsc'
);

CREATE FEATURE VIEW user_activity KEY user_id
WITH (online = true, offline = 'lake') AS
SELECT user_id,
       COUNT(*)                AS clicks_1h,
       SUM(price)              AS spend_1h,
       APPROX_DISTINCT(item_id) AS distinct_items_1h
FROM clicks
GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR);
