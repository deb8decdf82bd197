-- Protobuf clicks from Kafka, framed as Confluent's serializers write them
-- (a zero byte, a 4-byte schema id and the message indexes before each
-- record). Schema id 1 was written with clicks_v1.proto, id 2 with
-- clicks.proto; every record is read as message Click of clicks.proto. See
-- README.md beside this file.

CREATE SOURCE clicks (
    user_id  TEXT NOT NULL,
    item_id  TEXT,
    price    DOUBLE,
    ts       TIMESTAMP NOT NULL,
    CHECK (price IS NULL OR price >= 0),
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (
    connector = 'kafka',
    topic = 'clicks_protobuf',
    brokers = '${KAFKA_BROKERS:-127.0.0.1:9092}',
    format = 'protobuf',
    schema = 'clicks.proto',
    message = 'Click',
    schema.1 = 'clicks_v1.proto',
    schema.2 = 'clicks.proto'
);

CREATE FEATURE VIEW user_activity KEY user_id
WITH (online = true, offline = 'lake') AS
SELECT user_id,
       COUNT(*)                AS clicks_1h,
       SUM(price)              AS spend_1h,
       APPROX_DISTINCT(item_id) AS distinct_items_1h
FROM clicks
GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR);
