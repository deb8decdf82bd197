"""The walk-through of examples/training, and training sets from Python
against the CLI's on the same inputs."""

from __future__ import annotations

import json
import os
import runpy
import subprocess

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import sluice

FEATURES = ["user_activity", "item_popularity:clicks_30m"]
FEATURE_COLUMNS = [
    "user_activity__clicks_1h",
    "user_activity__spend_1h",
    "user_activity__distinct_items_1h",
    "item_popularity__clicks_30m",
]


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory, repo):
    """Runs examples/training/walkthrough.py as a user would, and keeps its cells' results."""
    work = tmp_path_factory.mktemp("walkthrough")
    old = {k: os.environ.get(k) for k in ("SLUICE_WALKTHROUGH_DIR", "SLUICE_LAKE")}
    os.environ["SLUICE_WALKTHROUGH_DIR"] = str(work)
    os.environ["SLUICE_LAKE"] = str(work / "lake")
    try:
        g = runpy.run_path(str(repo / "examples" / "training" / "walkthrough.py"), run_name="__main__")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    g["WORK"] = work
    return g


def cli_training_set(sluice_bin, repo, work, out, *extra):
    env = dict(os.environ, SLUICE_LAKE=str(work / "lake"))
    args = [
        sluice_bin,
        "training-set",
        str(repo / "examples" / "training" / "pipeline.sql"),
        "--spine",
        str(repo / "examples" / "training" / "spine.csv"),
        "--source",
        f"clicks={work / 'history'}",
        "--key",
        "user_id=uid",
        "--time-column",
        "ts",
        "--out",
        str(out),
    ]
    for f in FEATURES:
        args += ["--features", f]
    subprocess.run(args + list(extra), check=True, env=env, capture_output=True)
    return pq.read_table(out)


def test_walkthrough_cells(walkthrough):
    report = walkthrough["report"]
    history = walkthrough["history"]
    assert report["events"] == history.num_rows
    # Every 1000th event is ten minutes late: dead-lettered, not folded in.
    assert report["late"] > 0
    assert report["dead_letters"] == report["late"]
    dl = walkthrough["WORK"] / "state" / "backfill_dead_letters.jsonl"
    assert sum(1 for _ in open(dl)) == report["late"]
    views = {v["view"]: v for v in report["views"]}
    assert views["user_activity"]["rows"] > 0
    training = walkthrough["training"]
    assert isinstance(training, pa.Table)
    assert training.num_rows == 10
    assert training.column_names[:4] == ["uid", "item_id", "ts", "label"]
    assert training.column_names[4:] == FEATURE_COLUMNS
    served = walkthrough["served"]
    assert served.column("key").to_pylist() == ["u00001", "u00002", "u99999"]
    assert served.column("found").to_pylist() == [True, True, False]


def test_training_set_equals_cli(walkthrough, sluice_bin, repo, tmp_path):
    work = walkthrough["WORK"]
    cli = cli_training_set(sluice_bin, repo, work, tmp_path / "train.parquet")
    p = walkthrough["pipeline"]
    kwargs = dict(
        features=FEATURES,
        key_map={"user_id": "uid"},
        time_column="ts",
        sources={"clicks": str(work / "history")},
        dead_letters=tmp_path / "dl.jsonl",
    )
    # The same spine file: the same table, schema included.
    from_path = p.training_set(repo / "examples" / "training" / "spine.csv", **kwargs)
    assert from_path.equals(cli), f"{from_path.to_pandas()}\n!=\n{cli.to_pandas()}"
    # The walk-through's pandas spine (ts parsed by pandas, nanoseconds): the
    # same features and labels, the same instants.
    frame = walkthrough["training"]
    for c in ["uid", "item_id", "label"] + FEATURE_COLUMNS:
        assert frame.column(c).to_pylist() == cli.column(c).to_pylist(), c
    assert pc.cast(frame.column("ts"), pa.timestamp("ms", "UTC")).equals(
        pc.cast(cli.column("ts"), pa.timestamp("ms", "UTC"))
    )
    # A pyarrow and a polars spine with the CLI's ts column.
    spine = cli.select(["uid", "item_id", "ts", "label"])
    from_arrow = p.training_set(spine, **kwargs)
    assert from_arrow.equals(cli)
    from_polars = p.training_set(pl.from_arrow(spine), **kwargs)
    for c in FEATURE_COLUMNS:
        assert from_polars.column(c).to_pylist() == cli.column(c).to_pylist(), c
    # A spine in several chunks joins as one.
    chunked = pa.Table.from_batches(spine.to_batches(max_chunksize=3))
    assert p.training_set(chunked, **kwargs).equals(cli)
    # The features as a dict, and the stats.
    t, stats = p.training_set(
        spine, **{**kwargs, "features": {"user_activity": None, "item_popularity": ["clicks_30m"]}}, return_stats=True
    )
    assert t.equals(cli)
    assert stats["rows"] == 10
    assert [v["view"] for v in stats["views"]] == ["user_activity", "item_popularity"]
    assert all(v["replayed"] for v in stats["views"])
    assert stats["replays"][0]["late"] == walkthrough["report"]["late"]


def test_closed_windows_equal_cli(walkthrough, sluice_bin, repo, tmp_path):
    work = walkthrough["WORK"]
    cli = cli_training_set(sluice_bin, repo, work, tmp_path / "closed.parquet", "--closed-windows")
    p = walkthrough["pipeline"]
    t = p.training_set(
        pd.read_csv(repo / "examples" / "training" / "spine.csv").assign(
            ts=lambda d: pd.to_datetime(d["ts"], utc=True, format="ISO8601")
        ),
        FEATURES,
        {"user_id": "uid"},
        "ts",
        closed_windows=True,
    )
    for c in FEATURE_COLUMNS:
        assert t.column(c).to_pylist() == cli.column(c).to_pylist(), c
    # Closed windows read the lake, so the key nobody clicked gets the
    # empty window's count, not NULL.
    assert t.column("user_activity__clicks_1h").to_pylist()[7] == 0


def test_read_lake_equals_duckdb(walkthrough):
    duckdb = pytest.importorskip("duckdb")
    p = walkthrough["pipeline"]
    lake = walkthrough["WORK"] / "lake" / "user_activity"
    whole = p.read_lake("user_activity")
    con = duckdb.connect()
    n, clicks = con.execute(
        f"SELECT count(*), sum(clicks_1h) FROM read_parquet('{lake}/**/*.parquet')"
    ).fetchone()
    assert whole.num_rows == n
    assert pc.sum(whole.column("clicks_1h")).as_py() == clicks
    hour = p.read_lake("user_activity", start="2024-01-01T01:00:00Z", end="2024-01-01T02:00:00Z")
    (m,) = con.execute(
        f"SELECT count(*) FROM read_parquet('{lake}/**/*.parquet') "
        "WHERE window_end >= TIMESTAMPTZ '2024-01-01 01:00:00+00' AND window_end < TIMESTAMPTZ '2024-01-01 02:00:00+00'"
    ).fetchone()
    assert hour.num_rows == m > 0
    assert hour.equals(walkthrough["lake"])
    assert p.read_lake("user_activity", dataset=True).count_rows() == n
    assert hour.schema.names[:2] == ["window_start", "window_end"]


def test_open_state_equals_sluice_get(walkthrough, sluice_bin):
    state = walkthrough["WORK"] / "state"
    got = sluice.open_state(state).get("user_activity", ["u00001", "u00042"], output="pandas")
    for i, key in enumerate(["u00001", "u00042"]):
        out = subprocess.run(
            [sluice_bin, "get", "user_activity", key, "--state-dir", str(state)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        want = json.loads(out)
        assert got["found"][i]
        for f, v in want["features"].items():
            assert got[f][i] == v, f
        assert got["as_of"][i] == pd.Timestamp(want["as_of"])


def test_backfill_progress_callback(tmp_path, lake_env, repo, walkthrough):
    calls = []
    p = sluice.Pipeline(repo / "examples" / "training" / "pipeline.sql")
    out = p.backfill(
        sources={"clicks": [walkthrough["WORK"] / "history"]},
        start="2024-01-01T01:00:00Z",
        end="2024-01-02",
        state_dir=tmp_path / "s",
        progress=lambda *a: calls.append(a),
    )
    assert out["events"] == walkthrough["history"].num_rows
    assert calls and calls[-1][0] == "clicks" and calls[-1][3] is True
    assert calls[-1][1] == out["events"]
    # `end` before `start` is refused before anything runs.
    with pytest.raises(ValueError, match="start must be before end"):
        p.backfill(sources={"clicks": str(walkthrough["WORK"] / "history")}, start="2024-01-02", end="2024-01-01", state_dir=tmp_path / "s2")
    # A second backfill over the same lake asks for replace=True.
    with pytest.raises(sluice.SluiceError, match="replace"):
        p.backfill(sources={"clicks": str(walkthrough["WORK"] / "history")}, state_dir=tmp_path / "s", progress=False)
