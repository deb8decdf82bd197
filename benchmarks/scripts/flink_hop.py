"""The quickstart HOP(5 min, 1 h) feature view in Apache Flink SQL (PyFlink,
local mini-cluster, filesystem JSON source, blackhole sink).

usage: python flink_hop.py WARMUP_FILE FILE [PARALLELISM]   (default 1)
Prints one JSON line: {"events": N, "seconds": S, "events_per_sec": R}.
Run by `sluice-bench hop --flink-python PYTHON` (see docs/benchmarks.md); the warm-up job runs
first so JVM start-up and class loading are not timed.
"""
import json
import sys
import time

from pyflink.table import EnvironmentSettings, TableEnvironment


def run(path: str, parallelism: int) -> float:
    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    env.get_config().set("parallelism.default", str(parallelism))
    env.execute_sql(f"""
        CREATE TABLE clicks (
            user_id STRING, item_id STRING, price DOUBLE, ts STRING,
            event_ts AS TO_TIMESTAMP(REPLACE(REPLACE(ts, 'T', ' '), 'Z', ''), 'yyyy-MM-dd HH:mm:ss.SSS'),
            WATERMARK FOR event_ts AS event_ts - INTERVAL '5' SECOND
        ) WITH ('connector' = 'filesystem', 'path' = '{path}', 'format' = 'json',
                'json.ignore-parse-errors' = 'true')
    """)
    env.execute_sql("""
        CREATE TABLE sink (user_id STRING, window_end TIMESTAMP(3), clicks_1h BIGINT,
                           spend_1h DOUBLE, avg_price_1h DOUBLE, distinct_items_1h BIGINT)
        WITH ('connector' = 'blackhole')
    """)
    t0 = time.perf_counter()
    env.execute_sql("""
        INSERT INTO sink
        SELECT user_id, HOP_END(event_ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR),
               COUNT(*), SUM(price), AVG(price), COUNT(DISTINCT item_id)
        FROM clicks WHERE price >= 0
        GROUP BY user_id, HOP(event_ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR)
    """).wait()
    return time.perf_counter() - t0


def main() -> None:
    warmup, path = sys.argv[1], sys.argv[2]
    parallelism = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    run(warmup, parallelism)
    with open(path, "rb") as f:
        n = sum(1 for _ in f)
    s = run(path, parallelism)
    print(json.dumps({"events": n, "seconds": s, "events_per_sec": n / s}))


if __name__ == "__main__":
    main()
