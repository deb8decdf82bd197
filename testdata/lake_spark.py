"""Reads a Sluice lake with Apache Spark and checks it against DuckDB.

usage: python lake_spark.py LAKE VIEW [VIEW ...]

For each view, Spark (pyspark, local mode) reads every Parquet file under
LAKE/VIEW. The check fails when Spark maps a column to a type a model
pipeline would not expect (a decimal for an integer feature, which is how
Spark reads unsigned 64-bit integers), or when its rows differ from the
rows DuckDB reads from the same files: integers, text and timestamps
exactly (timestamps as epoch milliseconds), floating point to 1e-9
relative. Prints each view's Spark schema and row count; exits 1 on a
difference.
"""

import math
import os
import sys

import duckdb
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T


def spark_rows(spark, root, view):
    df = (
        spark.read.option("recursiveFileLookup", "true")
        .option("pathGlobFilter", "*.parquet")
        .parquet(os.path.join(root, view))
    )
    schema = [(f.name, f.dataType) for f in df.schema.fields]
    cols = []
    for name, t in schema:
        c = F.col(f"`{name}`")
        if isinstance(t, (T.TimestampType, T.TimestampNTZType)):
            c = F.unix_millis(c)
        cols.append(c.alias(name))
    return schema, [tuple(r) for r in df.select(*cols).collect()]


def duckdb_rows(root, view, names, timestamps):
    con = duckdb.connect()
    q = lambda n: '"' + n.replace('"', '""') + '"'
    sel = ", ".join(
        f"epoch_ms({q(n)})" if n in timestamps else q(n) for n in names
    )
    src = f"read_parquet('{root}/{view}/**/*.parquet', hive_partitioning = false)"
    return [tuple(r) for r in con.execute(f"SELECT {sel} FROM {src}").fetchall()]


def key(row):
    return tuple((v is None, "" if v is None else str(v)) for v in row)


def same(a, b):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) or isinstance(b, float):
        fa, fb = float(a), float(b)
        if math.isnan(fa) or math.isnan(fb):
            return math.isnan(fa) and math.isnan(fb)
        return abs(fa - fb) <= 1e-9 * max(1.0, abs(fa), abs(fb))
    return a == b


def main() -> int:
    root, views = sys.argv[1], sys.argv[2:]
    spark = (
        SparkSession.builder.master("local[1]")
        .appName("sluice-lake-check")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    failed = False
    for view in views:
        schema, got = spark_rows(spark, root, view)
        print(f"{view}: " + ", ".join(f"{n} {t.simpleString()}" for n, t in schema))
        for n, t in schema:
            if isinstance(t, T.DecimalType):
                print(f"{view}: column {n} reads as {t.simpleString()} in Spark")
                failed = True
        names = [n for n, _ in schema]
        timestamps = {
            n
            for n, t in schema
            if isinstance(t, (T.TimestampType, T.TimestampNTZType))
        }
        want = duckdb_rows(root, view, names, timestamps)
        got.sort(key=key)
        want.sort(key=key)
        print(f"{view}: {len(got)} rows in Spark, {len(want)} in DuckDB")
        if len(got) != len(want):
            failed = True
            continue
        for g, w in zip(got, want):
            if not all(same(x, y) for x, y in zip(g, w)):
                print(f"{view}: Spark row {g} but DuckDB row {w}")
                failed = True
                break
    spark.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
