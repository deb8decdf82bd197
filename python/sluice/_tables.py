"""Conversions between what users hand us and Arrow."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional, Sequence

import pyarrow as pa

#: Output kinds of reads: a pyarrow Table, or a data frame.
OUTPUTS = ("arrow", "pandas", "polars")


def as_arrow_stream(data: Any) -> Any:
    """``data`` as a path string or an object with ``__arrow_c_stream__``.

    pyarrow tables and readers pass as they are; polars frames through
    ``to_arrow()`` (no copy); pandas frames through ``pyarrow.Table.from_pandas``
    (the index dropped).
    """
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, (pa.Table, pa.RecordBatchReader)):
        return data
    module = type(data).__module__.split(".")[0]
    if module == "polars" and hasattr(data, "to_arrow"):
        return data.to_arrow()
    if module == "pandas":
        return pa.Table.from_pandas(data, preserve_index=False)
    if hasattr(data, "__arrow_c_stream__"):
        return data
    raise TypeError(
        "expected a path, a pyarrow Table, a pandas or polars DataFrame, or an "
        f"object with __arrow_c_stream__; got {type(data).__name__}"
    )


def convert(table: pa.Table, output: str) -> Any:
    """``table`` as ``output`` (one of :data:`OUTPUTS`)."""
    if output == "arrow":
        return table
    if output == "pandas":
        return table.to_pandas()
    if output == "polars":
        import polars

        return polars.from_arrow(table)
    raise ValueError(f"output: expected one of {', '.join(OUTPUTS)}, not {output!r}")


def key_text(key: Any) -> str:
    """A key as the online store names it.

    A multi-column key (a tuple or list) is its columns joined by ``|``;
    inside a value ``|`` is written ``\\|`` and ``\\`` is ``\\\\``; a column
    that is ``None`` is ``\\N``. A plain string is taken as already written
    in that form (so ``"x|y"`` names two columns).
    """
    if isinstance(key, (tuple, list)):
        return "|".join(_column_text(k) for k in key)
    if isinstance(key, str):
        return key
    return _column_text(key)


def _column_text(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        # As the engine writes a BOOLEAN key column.
        return "true" if value else "false"
    return str(value).replace("\\", "\\\\").replace("|", "\\|")


def reads_table(keys: Sequence[Any], reads: Iterable[Optional[dict]]) -> pa.Table:
    """Online reads as a table in key order.

    Columns: ``key``, ``found``, then the read's time columns (``as_of``,
    ``window_start``, ``window_end``, ``valid_until`` as the view has them)
    and one column per feature. A key without a value has ``found`` false
    and NULL everywhere else.
    """
    rows = []
    meta: list[str] = []
    features: list[str] = []
    for key, read in zip(keys, reads):
        row: dict[str, Any] = {"key": key_text(key), "found": read is not None}
        if read is not None:
            for name, value in read.items():
                if name in ("key", "found"):
                    continue
                if name == "features" and isinstance(value, dict):
                    for f, v in value.items():
                        if f not in features:
                            features.append(f)
                        row[f] = v
                else:
                    if name not in meta:
                        meta.append(name)
                    row[name] = value
        rows.append(row)
    names = ["key", "found"] + meta + [f for f in features if f not in meta]
    columns = {n: [r.get(n) for r in rows] for n in names}
    if not rows:
        return pa.table({"key": pa.array([], pa.string()), "found": pa.array([], pa.bool_())})
    table = pa.table(columns)
    for n in meta:
        if n in ("as_of", "window_start", "window_end", "valid_until"):
            table = _as_timestamp(table, n)
    return table


def _as_timestamp(table: pa.Table, name: str) -> pa.Table:
    """Turns an RFC 3339 text column into ``timestamp[ms, UTC]`` (left as text if it is not one)."""
    col = table.column(name)
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        return table
    import pyarrow.compute as pc

    try:
        ts = pc.cast(col, pa.timestamp("ms", "UTC"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return table
    return table.set_column(table.schema.get_field_index(name), name, ts)


def parse_json_reads(texts: Iterable[Optional[str]]) -> list:
    """The native reader's JSON texts as dicts (``None`` stays ``None``)."""
    return [None if t is None else json.loads(t) for t in texts]
