"""DuckDB's side of `sluice-bench stats`: the same per-feature statistics
`sluice stats` computes (count, NULLs, min, max, mean, sample stddev, nine
approximate quantiles) over the same lake, over all rows and per day.

usage: python duckdb_stats.py LAKE_VIEW_DIR FEATURE [FEATURE ...]
Prints one JSON line: seconds (whole range), seconds_by_day, rows.
"""

import json
import sys
import time

import duckdb

QS = [0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99]


def main() -> int:
    lake, features = sys.argv[1], sys.argv[2:]
    con = duckdb.connect()
    src = f"read_parquet('{lake}/**/*.parquet', hive_partitioning = true)"
    sel = ["COUNT(*)"]
    for f in features:
        c = f'"{f}"'
        sel += [
            f"COUNT({c})",
            f"MIN({c})",
            f"MAX({c})",
            f"AVG({c}::DOUBLE)",
            f"STDDEV_SAMP({c}::DOUBLE)",
            f"approx_quantile({c}::DOUBLE, {QS})",
        ]
    t0 = time.perf_counter()
    rows = con.execute(f"SELECT {', '.join(sel)} FROM {src}").fetchone()[0]
    t1 = time.perf_counter()
    con.execute(f"SELECT date, {', '.join(sel)} FROM {src} GROUP BY date").fetchall()
    t2 = time.perf_counter()
    print(json.dumps({"seconds": t1 - t0, "seconds_by_day": t2 - t1, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
