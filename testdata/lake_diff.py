"""Compares two Sluice lakes view by view, as DuckDB reads them.

usage: python lake_diff.py LAKE_A LAKE_B VIEW [VIEW ...]

Rows are paired on their non-floating-point columns (NULL-safe); floating
point values must agree to 1e-9 relative (partial aggregates merged in a
different order differ in the last bits). Prints one line per view and
exits 1 if any view differs.
"""

import sys

import duckdb


def main() -> int:
    a, b, views = sys.argv[1], sys.argv[2], sys.argv[3:]
    con = duckdb.connect()
    failed = False
    for view in views:
        src = {
            side: f"read_parquet('{root}/{view}/**/*.parquet', hive_partitioning = false)"
            for side, root in (("a", a), ("b", b))
        }
        cols = con.execute(f"DESCRIBE SELECT * FROM {src['a']}").fetchall()
        cols_b = con.execute(f"DESCRIBE SELECT * FROM {src['b']}").fetchall()
        if [c[:2] for c in cols] != [c[:2] for c in cols_b]:
            print(f"{view}: schemas differ: {cols} vs {cols_b}")
            failed = True
            continue
        floats = [c[0] for c in cols if c[1] in ("DOUBLE", "FLOAT", "REAL")]
        exact = [c[0] for c in cols if c[0] not in floats]
        q = lambda n: '"' + n.replace('"', '""') + '"'
        part = ", ".join(q(c) for c in exact) or "1"
        order = ", ".join(q(c) for c in floats) or "1"
        numbered = {
            side: f"SELECT *, row_number() OVER (PARTITION BY {part} ORDER BY {order}) AS __rn FROM {s}"
            for side, s in src.items()
        }
        on = " AND ".join(
            [f"x.{q(c)} IS NOT DISTINCT FROM y.{q(c)}" for c in exact] + ["x.__rn = y.__rn"]
        )
        differs = " OR ".join(
            ["x.__rn IS NULL", "y.__rn IS NULL"]
            + [
                f"(x.{q(c)} IS DISTINCT FROM y.{q(c)} AND NOT (abs(x.{q(c)} - y.{q(c)}) "
                f"<= 1e-9 * greatest(abs(x.{q(c)}), abs(y.{q(c)}), 1.0)))"
                for c in floats
            ]
        )
        rows_a = con.execute(f"SELECT count(*) FROM {src['a']}").fetchone()[0]
        rows_b = con.execute(f"SELECT count(*) FROM {src['b']}").fetchone()[0]
        bad = con.execute(
            f"SELECT count(*) FROM ({numbered['a']}) x FULL OUTER JOIN ({numbered['b']}) y ON {on} WHERE {differs}"
        ).fetchone()[0]
        print(f"{view}: {rows_a} rows vs {rows_b} rows, {bad} unmatched")
        if bad or rows_a != rows_b or rows_a == 0:
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
