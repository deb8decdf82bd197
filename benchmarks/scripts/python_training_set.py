"""Training sets from Python: `Pipeline.training_set` against `sluice
training-set` and pandas `merge_asof`, measured in the same run.

Run by hand on release builds (docs/benchmarks.md):

    maturin develop --release -m python/Cargo.toml     # into the venv running this
    cargo build --release -p sluice
    python benchmarks/scripts/python_training_set.py --sluice target/release/sluice

It writes a history of clicks, backfills the examples/training views from
it with the package, then joins a spine of random users and times with
`user_activity` as of each spine time, from the lake's closed windows (each
row valid from its window's end until the next slide's end), three ways:

- the CLI: `sluice training-set --closed-windows` (spine and output Parquet
  files, the process start included);
- Python from the same spine file (`Pipeline.training_set(path)`), and from
  a pyarrow Table in memory, the output written as the CLI writes it and not;
- pandas: the lake read into a DataFrame, both sides sorted, `merge_asof`
  backward by user with a tolerance of one slide.

It prints the times, the ratios and how many feature values pandas and
Sluice agree on.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import tempfile
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import sluice

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PIPELINE = os.path.join(REPO, "examples", "training", "pipeline.sql")
START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
SLIDE_MS = 5 * 60_000


def history(events: int, keys: int, hours: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ts = START_MS + np.sort(rng.integers(0, hours * 3_600_000, events))
    return pa.table(
        {
            "user_id": pa.array([f"u{k:06d}" for k in rng.integers(0, keys, events)]),
            "item_id": pa.array([f"i{k}" for k in rng.integers(0, 1000, events)]),
            "price": pa.array(np.round(rng.uniform(1, 100, events), 2)),
            "ts": pa.array(ts, pa.timestamp("ms", "UTC")),
        }
    )


def spine(rows: int, keys: int, hours: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed + 1)
    ts = START_MS + rng.integers(0, hours * 3_600_000, rows)
    return pa.table(
        {
            "uid": pa.array([f"u{k:06d}" for k in rng.integers(0, keys, rows)]),
            "ts": pa.array(ts, pa.timestamp("ms", "UTC")),
            "label": pa.array(rng.integers(0, 2, rows)),
        }
    )


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sluice", default=os.path.join(REPO, "target", "release", "sluice"))
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--hours", type=int, default=4)
    ap.add_argument("--spine-rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each join; the best is reported")
    ap.add_argument("--dir", default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()

    work = a.dir or tempfile.mkdtemp(prefix="sluice-pybench-")
    os.environ["SLUICE_LAKE"] = os.path.join(work, "lake")
    hist_dir = os.path.join(work, "history")
    os.makedirs(hist_dir, exist_ok=True)
    h, secs = timed(lambda: history(a.events, a.keys, a.hours, a.seed))
    pq.write_table(h, os.path.join(hist_dir, "events.parquet"))
    print(f"history: {h.num_rows:,} events, {a.keys:,} users, {a.hours} h ({secs:.1f} s to make)")

    p = sluice.Pipeline(PIPELINE)
    report = p.backfill(sources={"clicks": hist_dir}, state_dir=os.path.join(work, "state"), replace=True, progress=False)
    rows = {v["view"]: v["rows"] for v in report["views"]}
    print(
        f"backfill from Python: {report['events']:,} events in {report['seconds']:.2f} s "
        f"({report['events'] / report['seconds']:,.0f} events/s); user_activity lake rows {rows['user_activity']:,}"
    )

    s = spine(a.spine_rows, a.keys, a.hours, a.seed)
    spine_path = os.path.join(work, "spine.parquet")
    pq.write_table(s, spine_path)
    env = dict(os.environ)
    best = {}

    def keep(name, secs):
        best[name] = min(best.get(name, float("inf")), secs)

    cli_out = os.path.join(work, "train_cli.parquet")
    py_out = os.path.join(work, "train_py.parquet")
    kwargs = dict(features=["user_activity"], key_map={"user_id": "uid"}, time_column="ts", closed_windows=True)
    for _ in range(a.repeat):
        cmd = [
            a.sluice, "training-set", PIPELINE, "--spine", spine_path, "--features", "user_activity",
            "--key", "user_id=uid", "--time-column", "ts", "--closed-windows", "--out", cli_out,
        ]
        _, secs = timed(lambda: subprocess.run(cmd, check=True, env=env, capture_output=True))
        keep("cli", secs)
        out, secs = timed(lambda: pq.write_table(p.training_set(spine_path, **kwargs), py_out))
        keep("python_path", secs)
        table, secs = timed(lambda: p.training_set(s, **kwargs))
        keep("python_memory", secs)

    cli = pq.read_table(cli_out)
    same = table.equals(cli) and pq.read_table(py_out).equals(cli)

    lake_dir = os.path.join(work, "lake", "user_activity")

    def pandas_join():
        lake = pq.read_table(lake_dir, columns=["window_end", "user_id", "clicks_1h", "spend_1h", "distinct_items_1h"]).to_pandas()
        lake = lake.sort_values("window_end")
        left = s.to_pandas()
        left["row"] = np.arange(len(left))
        left = left.sort_values("ts")
        j = pd.merge_asof(
            left, lake, left_on="ts", right_on="window_end", left_by="uid", right_by="user_id",
            direction="backward", tolerance=pd.Timedelta(milliseconds=SLIDE_MS - 1),
        )
        # A window without the user's events has no lake row; its count is
        # 0 once the lake has a window that closed by then (before, NULL).
        covered = j["ts"] >= lake["window_end"].iloc[0]
        j.loc[covered, "clicks_1h"] = j.loc[covered, "clicks_1h"].fillna(0)
        return j.sort_values("row").reset_index(drop=True)

    for _ in range(a.repeat):
        joined, secs = timed(pandas_join)
        keep("pandas", secs)

    ours = table.column("user_activity__clicks_1h").to_numpy(zero_copy_only=False)
    theirs = joined["clicks_1h"].to_numpy()
    both_null = pd.isna(ours) & pd.isna(theirs)
    agree = int(((ours == theirs) | both_null).sum())

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = a.spine_rows
    print(f"training set, {n:,} spine rows x {rows['user_activity']:,} lake rows (closed windows), best of {a.repeat}:")
    print(f"  sluice training-set (CLI)        {best['cli']:7.2f} s   {n / best['cli']:>12,.0f} rows/s")
    print(f"  Pipeline.training_set(path)+write {best['python_path']:6.2f} s   {n / best['python_path']:>12,.0f} rows/s   {best['python_path'] / best['cli']:.2f}x the CLI's time")
    print(f"  Pipeline.training_set(Table)     {best['python_memory']:7.2f} s   {n / best['python_memory']:>12,.0f} rows/s   {best['python_memory'] / best['cli']:.2f}x the CLI's time")
    print(f"  pandas merge_asof                {best['pandas']:7.2f} s   {n / best['pandas']:>12,.0f} rows/s   {best['pandas'] / best['python_memory']:.2f}x the in-memory join's time")
    print(f"  outputs: Python equals the CLI: {same}; pandas agrees on {agree:,} of {n:,} clicks_1h values")
    print(f"  peak RSS of this Python process: {rss:,.0f} MiB")


if __name__ == "__main__":
    main()
