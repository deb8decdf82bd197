"""Sluice from Python.

Sluice compiles feature definitions written in SQL into streaming jobs that
keep an online store (served over HTTP) and a Parquet lake, and answers
point-in-time-correct training-set queries with the same code. This package
is the data scientist's side of it:

- :class:`Pipeline` plans a pipeline file: its views, keys and features,
  :meth:`Pipeline.explain`, :meth:`Pipeline.training_set`,
  :meth:`Pipeline.backfill` and :meth:`Pipeline.read_lake`.
- :class:`Client` reads a running ``sluice run`` server: :meth:`Client.get`,
  :meth:`Client.nearest`, :meth:`Client.health`.
- :func:`open_state` reads a state dir's online store without a server (as
  ``sluice get`` does).

Tables are ``pyarrow.Table``; ``.to_pandas()`` or ``polars.from_arrow``
turn them into data frames. Inputs may be pyarrow tables, pandas or polars
data frames, anything with ``__arrow_c_stream__``, or file paths. Arrow data
crosses between Python and the engine over the Arrow C stream interface,
without copies.

Errors are exceptions derived from :class:`SluiceError`; a mistake in a
pipeline file is a :class:`PipelineError` with ``file``, ``line``,
``column`` and ``hint`` attributes.

Example::

    import sluice
    p = sluice.Pipeline("examples/training/pipeline.sql")
    ts = p.training_set("examples/training/spine.csv",
                        features=["user_activity"])
    df = ts.to_pandas()
"""

from __future__ import annotations

from ._sluice import NotFound, PipelineError, SluiceError, __version__
from ._client import BadRequest, Client, Unauthorized, Unavailable
from ._pipeline import Pipeline, View
from ._state import State, open_state

__all__ = [
    "Pipeline",
    "View",
    "Client",
    "State",
    "open_state",
    "SluiceError",
    "PipelineError",
    "NotFound",
    "Unavailable",
    "Unauthorized",
    "BadRequest",
    "__version__",
]
