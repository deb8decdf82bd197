"""`sluice.Client` against a `sluice run` server the test starts on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pandas as pd
import polars as pl
import pytest

import sluice

from conftest import copy_example

TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, repo, sluice_bin):
    """The recsys example (a vector index and a windowed view) served with a token."""
    work = tmp_path_factory.mktemp("recsys")
    pipeline = copy_example(repo, "recsys", work)
    subprocess.run(
        [sluice_bin, "gen-recsys", "--dir", str(work), "--items", "300", "--users", "40", "--clicks", "4000"],
        check=True,
        capture_output=True,
    )
    (work / "token").write_text(TOKEN)
    port = free_port()
    log = open(work / "run.log", "w")
    proc = subprocess.Popen(
        [
            sluice_bin,
            "run",
            str(pipeline),
            "--state-dir",
            str(work / "state"),
            "--serve",
            f"127.0.0.1:{port}",
            "--auth-token-file",
            str(work / "token"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    client = sluice.Client(url, token=TOKEN, timeout=5)
    deadline = time.time() + 60
    while True:
        try:
            if client.health()["ready"]:
                break
        except sluice.Unavailable:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"server did not get ready: {(work / 'run.log').read_text()}")
        time.sleep(0.2)
    yield {"url": url, "client": client, "work": work, "proc": proc}
    client.close()
    proc.terminate()
    proc.wait(timeout=30)


def settled(read, timeout=30.0):
    """The value of `read()` once two reads a second apart agree (the file
    sources are read to their end)."""
    deadline = time.time() + timeout
    last = read()
    while time.time() < deadline:
        time.sleep(1.0)
        now = read()
        if now.equals(last):
            return now
        last = now
    raise AssertionError("reads did not settle")


def test_get_in_key_order_with_found(server):
    c = server["client"]
    keys = ["user3", "nobody", "user1", "user2"]
    t = settled(lambda: c.get("user_taste", keys))
    assert t.column("key").to_pylist() == keys
    assert t.column("found").to_pylist() == [True, False, True, True]
    assert {"as_of", "clicks_1h", "taste"} <= set(t.column_names)
    assert t.column("clicks_1h").to_pylist()[1] is None
    # The same values as a state-dir read of what the job committed.
    local = settled(lambda: sluice.open_state(server["work"] / "state").get("user_taste", keys))
    assert t.column("clicks_1h").to_pylist() == local.column("clicks_1h").to_pylist()
    # One key, and data frames.
    one = c.get("user_taste", "user1", output="pandas")
    assert isinstance(one, pd.DataFrame) and list(one["key"]) == ["user1"]
    frame = c.get("user_taste", keys, output="polars")
    assert isinstance(frame, pl.DataFrame) and frame["found"].to_list() == [True, False, True, True]


def test_connection_reused(server):
    c = sluice.Client(server["url"], token=TOKEN)
    c.get("user_taste", ["user1"])
    first = c._conn.sock
    for _ in range(5):
        c.get("user_taste", ["user1"])
    assert c._conn.sock is first
    c.close()


def test_versioned_name_and_window(server):
    c = server["client"]
    assert c.get("user_taste@1", ["user1"]).column("found").to_pylist() == [True]
    closed = c.get("user_taste", ["user1"], window="closed")
    assert "window_end" in closed.column_names


def test_nearest_equals_cli(server, sluice_bin):
    c = server["client"]
    got = c.nearest("item_vectors", key="item1", k=5, exact=True)
    assert got.column_names[:2] == ["key", "distance"]
    assert got.num_rows == 5
    d = got.column("distance").to_pylist()
    assert d == sorted(d)
    out = subprocess.run(
        [sluice_bin, "nearest", "item_vectors", "--key", "item1", "-k", "5", "--exact", "--state-dir", str(server["work"] / "state")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    want = [json.loads(line)["key"] for line in out.splitlines() if line.strip()]
    assert got.column("key").to_pylist() == want
    vec = c.get("item_vectors", ["item1"]).column("embedding").to_pylist()[0]
    by_vector = c.nearest("item_vectors", vec, k=5, exact=True, features=True)
    # By vector the item itself is the nearest (by key it is left out).
    assert by_vector.column("key").to_pylist() == ["item1"] + want[:4]
    assert by_vector.column("distance").to_pylist()[0] == pytest.approx(0.0, abs=1e-6)
    assert "category" in by_vector.column_names
    with pytest.raises(ValueError):
        c.nearest("item_vectors")


def test_errors(server):
    c = server["client"]
    with pytest.raises(sluice.NotFound):
        c.get("no_such_view", ["user1"])
    with pytest.raises(sluice.BadRequest, match="window"):
        c.get("user_taste", ["user1"], window="sideways")
    with pytest.raises(sluice.Unauthorized):
        sluice.Client(server["url"]).get("user_taste", ["user1"])
    with pytest.raises(sluice.Unauthorized):
        sluice.Client(server["url"], token="wrong").get("user_taste", ["user1"])
    with pytest.raises(sluice.BadRequest):
        c.nearest("item_vectors", [0.1, 0.2], k=3)
    # Every client error is a SluiceError.
    assert issubclass(sluice.Unavailable, sluice.SluiceError)
    with pytest.raises(ValueError):
        sluice.Client("127.0.0.1:8080")


def test_unavailable_when_nothing_listens():
    c = sluice.Client(f"http://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(sluice.Unavailable, match="cannot connect"):
        c.get("user_taste", ["user1"])
    with pytest.raises(sluice.Unavailable):
        c.health()


def test_timeout_is_unavailable():
    # A listener that accepts and never answers.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        c = sluice.Client(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=0.5)
        t0 = time.time()
        with pytest.raises(sluice.Unavailable, match="no answer"):
            c.get("user_taste", ["user1"])
        assert time.time() - t0 < 5


def test_health(server):
    h = server["client"].health()
    assert h == {"live": True, "ready": True, "reasons": []}


def test_composite_keys_are_written_unambiguously():
    from sluice._tables import key_text

    assert key_text(("x|y", "z")) == "x\\|y|z"
    assert key_text(("x", "y|z")) == "x|y\\|z"
    assert key_text((None, "")) == "\\N|"
    assert key_text(("\\N",)) == "\\\\N"
    assert key_text("already|text") == "already|text"
    assert key_text(None) == "\\N"
    assert key_text((True, 7)) == "true|7"
