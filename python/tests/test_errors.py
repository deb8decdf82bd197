"""Engine errors as Python exceptions, and the package's own documentation."""

from __future__ import annotations

import pydoc

import pyarrow as pa
import pytest

import sluice

BAD = """CREATE SOURCE clicks (
    user_id TEXT NOT NULL,
    price   DOUBLE,
    ts      TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'file', path = 'events.jsonl');

CREATE FEATURE VIEW spend
    KEY user_id
    WITH (online = true)
AS SELECT user_id, SUM(prise) AS spend_1h
FROM clicks
GROUP BY user_id, TUMBLE(ts, INTERVAL '1' HOUR);
"""


def test_pipeline_error_carries_place_and_hint(tmp_path):
    p = tmp_path / "bad.sql"
    p.write_text(BAD)
    with pytest.raises(sluice.PipelineError) as e:
        sluice.Pipeline(p)
    err = e.value
    assert err.file == str(p)
    assert err.line == 11
    assert err.column is not None and err.column > 1
    assert "prise" in err.message
    assert err.hint is not None and "price" in err.hint
    assert f"{p}:11:" in str(err)
    assert isinstance(err, sluice.SluiceError)


def test_missing_file_is_a_pipeline_error(tmp_path):
    with pytest.raises(sluice.PipelineError, match="cannot read the pipeline file") as e:
        sluice.Pipeline(tmp_path / "none.sql")
    assert e.value.line == 1


def good(tmp_path):
    p = tmp_path / "good.sql"
    p.write_text(BAD.replace("prise", "price"))
    return sluice.Pipeline(p)


def spine():
    return pa.table(
        {"user_id": ["u1"], "ts": pa.array([0], pa.timestamp("ms", "UTC"))}
    )


def test_training_set_errors(tmp_path):
    p = good(tmp_path)
    assert [v.name for v in p.views] == ["spend"]
    assert p.view("spend").features == ["spend_1h"]
    assert p.view("spend").schema.names == ["window_start", "window_end", "user_id", "spend_1h"]
    with pytest.raises(KeyError, match="views: spend"):
        p.view("nope")
    with pytest.raises(sluice.SluiceError, match="no feature view `nope`"):
        p.training_set(spine(), ["nope"])
    with pytest.raises(sluice.SluiceError, match="key_map|--key"):
        p.training_set(spine().rename_columns(["uid", "ts"]), ["spend"])
    with pytest.raises(sluice.SluiceError, match="no column `when`"):
        p.training_set(spine(), ["spend"], time_column="when")
    with pytest.raises(TypeError, match="pandas or polars"):
        p.training_set(42, ["spend"])
    with pytest.raises(sluice.SluiceError):
        p.training_set(tmp_path / "missing.parquet", ["spend"])


def test_state_errors(tmp_path):
    with pytest.raises(sluice.NotFound):
        sluice.open_state(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sluice.NotFound, match="not a state dir"):
        sluice.open_state(tmp_path / "empty").get("spend", ["u1"])


def test_help_text():
    text = pydoc.render_doc(sluice, renderer=pydoc.plaintext)
    for name in ["Pipeline", "Client", "open_state", "training_set", "PipelineError"]:
        assert name in text
    for f in [
        sluice.Pipeline.training_set,
        sluice.Pipeline.backfill,
        sluice.Pipeline.read_lake,
        sluice.Client.get,
        sluice.Client.nearest,
        sluice.Client.health,
        sluice.State.get,
    ]:
        assert f.__doc__ and "Returns" in f.__doc__, f
    assert sluice.__version__
