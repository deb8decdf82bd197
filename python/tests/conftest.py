"""Shared fixtures: the `sluice` binary the cargo build made, and the repository."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _binary() -> pathlib.Path:
    if os.environ.get("SLUICE_BIN"):
        return pathlib.Path(os.environ["SLUICE_BIN"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "sluice"


@pytest.fixture(scope="session")
def sluice_bin() -> str:
    """The CLI, to compare the package against (built by `cargo test --workspace`)."""
    b = _binary()
    if not b.is_file():
        pytest.fail(f"no sluice binary at {b}: run `cargo build -p sluice` or set SLUICE_BIN")
    return str(b)


@pytest.fixture(scope="session")
def repo() -> pathlib.Path:
    return REPO


@pytest.fixture
def lake_env(tmp_path, monkeypatch) -> pathlib.Path:
    """`$SLUICE_LAKE` pointed into the test's folder (pipelines read it when planned)."""
    lake = tmp_path / "lake"
    monkeypatch.setenv("SLUICE_LAKE", str(lake))
    return lake


def copy_example(repo: pathlib.Path, name: str, dest: pathlib.Path) -> pathlib.Path:
    """Copies examples/NAME/pipeline.sql into DEST and returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(repo / "examples" / name / "pipeline.sql", dest / "pipeline.sql")
    return dest / "pipeline.sql"
