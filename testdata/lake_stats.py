"""What DuckDB says of a Sluice view's lake rows, for `sluice stats` tests.

usage: python lake_stats.py LAKE_VIEW_DIR OUT_DIR FEATURE [FEATURE ...]

Prints JSON: the row count, the rows per `date=` folder, and per feature
its non-NULL count, NULL count, min, max, mean, sample standard deviation,
exact distinct count and every non-NULL value in order (so the test can
measure the rank error of approximate quantiles). Writes into OUT_DIR
`same.parquet` (the features as `VIEW__FEATURE` columns, as a training set
names them) and `shifted.parquet` (the same with every numeric feature
times 1.5 plus 10, and text values renamed), as references.
"""

import json
import os
import sys

import duckdb


def main() -> int:
    lake, out, features = sys.argv[1], sys.argv[2], sys.argv[3:]
    view = os.path.basename(lake.rstrip("/"))
    con = duckdb.connect()
    con.execute(
        f"CREATE VIEW t AS SELECT * FROM read_parquet('{lake}/**/*.parquet', hive_partitioning = true)"
    )
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE t)").fetchall())
    report = {
        "rows": con.execute("SELECT COUNT(*) FROM t").fetchone()[0],
        "days": {
            str(d): n
            for d, n in con.execute("SELECT date, COUNT(*) FROM t GROUP BY date").fetchall()
        },
        "features": {},
    }
    same, shifted = [], []
    for f in features:
        c = f'"{f}"'
        numeric = types[f] not in ("VARCHAR",)
        count, nulls, lo, hi = con.execute(
            f"SELECT COUNT({c}), COUNT(*) - COUNT({c}), MIN({c}), MAX({c}) FROM t"
        ).fetchone()
        entry = {"count": count, "nulls": nulls, "min": lo, "max": hi}
        if numeric:
            mean, sd = con.execute(
                f"SELECT AVG({c}::DOUBLE), STDDEV_SAMP({c}::DOUBLE) FROM t"
            ).fetchone()
            entry.update(mean=mean, stddev=sd)
            entry["values"] = [
                r[0]
                for r in con.execute(
                    f"SELECT {c}::DOUBLE FROM t WHERE {c} IS NOT NULL ORDER BY 1"
                ).fetchall()
            ]
            shifted.append(f'{c} * 1.5 + 10 AS "{view}__{f}"')
        else:
            entry["distinct"] = con.execute(f"SELECT COUNT(DISTINCT {c}) FROM t").fetchone()[0]
            shifted.append(f"'x' || {c} AS \"{view}__{f}\"")
        same.append(f'{c} AS "{view}__{f}"')
        report["features"][f] = entry
    con.execute(f"COPY (SELECT {', '.join(same)} FROM t) TO '{out}/same.parquet' (FORMAT parquet)")
    con.execute(
        f"COPY (SELECT {', '.join(shifted)} FROM t) TO '{out}/shifted.parquet' (FORMAT parquet)"
    )
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
