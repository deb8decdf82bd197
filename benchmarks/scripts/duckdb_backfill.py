"""DuckDB baselines for `sluice-bench backfill`, timed inside DuckDB's process.

usage:
  python duckdb_backfill.py hop EVENTS.parquet OUT.parquet WATERMARK_DELAY_MS
  python duckdb_backfill.py asof SPINE.parquet LAKE_GLOB OUT.parquet
  python duckdb_backfill.py sawtooth EVENTS.parquet SPINE.parquet OUT.parquet WATERMARK_DELAY_MS

`hop`: the quickstart view (COUNT, SUM, AVG, approx distinct, WHERE price >= 0,
HOP 5 min / 1 h) computed the usual way — each event repeated for the 12
windows holding it with time_bucket + unnest(range(size/slide)) — keeping the
windows the final watermark closed, written to Parquet.
`asof`: spine ASOF LEFT JOIN feature rows (latest window_end <= ts per key),
written to Parquet.
`sawtooth`: for each spine row (user_id, ts), COUNT, SUM and AVG of price
over the user's events that an online read of the fresh HOP(5 min, 1 h) view
at clock ts counts: WHERE price >= 0, not late (their last window had not
closed when they arrived, by the row-by-row watermark), arrived before the
watermark first reached ts, and with times in
[floor(ts / 5 min) * 5 min - 1 h, ts). NULL where none (for a one-level
window a key without such an event has no tile left). Written in spine
order with the spine's columns.
Prints one JSON line: {"seconds": ..., "rows": ...}.
"""

import json
import sys
import resource
import time

import duckdb


def main() -> None:
    mode = sys.argv[1]
    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET preserve_insertion_order = false")
    t0 = time.perf_counter()
    if mode == "hop":
        events, out, delay_ms = sys.argv[2], sys.argv[3], int(sys.argv[4])
        con.execute(
            f"""
            COPY (
              WITH e AS (SELECT * FROM read_parquet('{events}') WHERE price >= 0),
              wm AS (SELECT max(ts) - INTERVAL ({delay_ms}) MILLISECOND AS wm FROM read_parquet('{events}'))
              SELECT ws AS window_start, ws + INTERVAL 1 HOUR AS window_end, user_id,
                     count(*) AS clicks_1h, sum(price) AS spend_1h, avg(price) AS avg_price_1h,
                     approx_count_distinct(item_id) AS distinct_items_1h
              FROM (
                SELECT e.*, time_bucket(INTERVAL 5 MINUTE, ts) - to_minutes(5 * k) AS ws
                FROM e, unnest(range(12)) AS r(k)
              )
              WHERE ws + INTERVAL 1 HOUR <= (SELECT wm FROM wm)
              GROUP BY ws, user_id
            ) TO '{out}' (FORMAT parquet)
            """
        )
    elif mode == "asof":
        spine, lake, out = sys.argv[2], sys.argv[3], sys.argv[4]
        con.execute(
            f"""
            COPY (
              SELECT s.*, f.clicks_1h, f.spend_1h, f.avg_price_1h, f.distinct_items_1h
              FROM read_parquet('{spine}') s
              ASOF LEFT JOIN read_parquet('{lake}', hive_partitioning = false) f
                ON s.user_id = f.user_id AND s.ts >= f.window_end
            ) TO '{out}' (FORMAT parquet)
            """
        )
    elif mode == "sawtooth":
        events, spine, out, delay_ms = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        slide, size = 300_000, 3_600_000
        con.execute(
            f"""
            COPY (
              WITH e AS (
                SELECT file_row_number AS i, user_id, price, epoch_ms(ts) AS t
                FROM read_parquet('{events}', file_row_number = true)
              ),
              w AS (
                SELECT *,
                  max(t) OVER (ORDER BY i ROWS UNBOUNDED PRECEDING) - {delay_ms} AS wm_after,
                  max(t) OVER (ORDER BY i ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) - {delay_ms} AS wm_before
                FROM e
              ),
              acc AS (
                SELECT i, user_id, price, t FROM w
                WHERE price >= 0
                  AND (wm_before IS NULL OR (t // {slide}) * {slide} + {size} > wm_before)
              ),
              reach AS (SELECT wm_after, min(i) AS i FROM w GROUP BY wm_after),
              s AS (
                SELECT row_number() OVER () AS rid, *, epoch_ms(ts) AS st FROM read_parquet('{spine}')
              ),
              cut AS (
                SELECT s.*, r.i AS cut FROM s ASOF JOIN reach r ON s.st <= r.wm_after
              ),
              agg AS (
                SELECT c.rid, count(a.t) AS n, sum(a.price) AS total
                FROM cut c JOIN acc a
                  ON a.user_id = c.user_id AND a.i <= c.cut
                 AND a.t >= (c.st // {slide}) * {slide} - {size} AND a.t < c.st
                GROUP BY c.rid
              )
              SELECT s.* EXCLUDE (rid, st),
                     agg.n AS clicks_1h, agg.total AS spend_1h, agg.total / agg.n AS avg_price_1h
              FROM s LEFT JOIN agg USING (rid)
              ORDER BY s.rid
            ) TO '{out}' (FORMAT parquet)
            """
        )
    else:
        raise SystemExit(f"unknown mode {mode}")
    secs = time.perf_counter() - t0
    rows = con.execute(f"SELECT count(*) FROM read_parquet('{sys.argv[3] if mode == 'hop' else sys.argv[4]}')").fetchone()[0]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": secs, "rows": rows, "max_rss_mib": peak_mib}))


if __name__ == "__main__":
    main()
