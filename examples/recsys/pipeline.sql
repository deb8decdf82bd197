-- Recommendations from one pipeline: item embeddings in a nearest-neighbour
-- index, and each user's taste as the mean embedding of the items they
-- clicked in the last hour, indexed the same way.
-- `sluice gen-recsys --dir examples/recsys` writes items.jsonl and clicks.jsonl here.

CREATE SOURCE items (
    item_id    TEXT NOT NULL,
    category   TEXT,
    embedding  FLOAT[32] NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    WATERMARK FOR updated_at AS updated_at - INTERVAL '1' MINUTE
) WITH (
    connector = 'file',
    path = 'items.jsonl',
    format = 'json'
);

-- The clicks carry the clicked item's embedding (the click logger attaches
-- it; Sluice has no stream-table join yet).
CREATE SOURCE clicks (
    user_id        TEXT NOT NULL,
    item_id        TEXT NOT NULL,
    item_embedding FLOAT[32],
    ts             TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '10' SECOND
) WITH (
    connector = 'file',
    path = 'clicks.jsonl',
    format = 'json'
);

-- Each item's latest embedding (by event time), searchable by cosine
-- distance, and filterable by category ("similar items in this category").
CREATE FEATURE VIEW item_vectors
    KEY item_id
    WITH (online = true, vector_index = 'embedding', distance = 'cosine',
          index_filter_columns = 'category')
AS SELECT
    item_id,
    LAST_VALUE(embedding) AS embedding,
    LAST_VALUE(category)  AS category
FROM items
GROUP BY item_id;

-- Each user's taste: the mean embedding of the last hour's clicks,
-- refreshed every 5 minutes; a user without clicks in the hour drops out
-- of the index when the window passes.
CREATE FEATURE VIEW user_taste
    KEY user_id
    WITH (online = true, offline = 'lake', vector_index = 'taste')
AS SELECT
    user_id,
    VECTOR_AVG(item_embedding) AS taste,
    COUNT(*)                   AS clicks_1h
FROM clicks
GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR);
