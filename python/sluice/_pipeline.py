"""`sluice.Pipeline`: a planned pipeline file."""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import pyarrow as pa

from . import _sluice
from ._tables import as_arrow_stream

PathLike = Union[str, "os.PathLike[str]"]
#: A time: a ``datetime`` (naive means UTC), a ``date``, RFC 3339 or
#: ``YYYY-MM-DD`` text, or epoch milliseconds.
TimeLike = Union[_dt.datetime, _dt.date, str, int]
#: Requested features: ``["view", "view:col,col"]`` or ``{"view": None | ["col", …]}``.
Features = Union[str, Sequence[str], Mapping[str, Optional[Sequence[str]]]]


@dataclass(frozen=True)
class View:
    """A feature view of a pipeline.

    Attributes:
        name: The name reads use (``user_activity``, ``user_activity@2``).
        base_name: The name without its version.
        version: 1 unless the view says ``VERSION n``.
        source: The source it reads.
        keys: Its key columns.
        features: Its feature columns (output columns that are not keys).
        schema: The rows it emits, as its lake holds them: ``window_start``,
            ``window_end``, then its keys and features.
        kind: ``"windowed"``, ``"lifetime"`` or ``"per_event"``.
        online: Whether it writes the online store.
        lake: Its folder in the lake, if it writes one.
        event_time: The event-time column of its source.
    """

    name: str
    base_name: str
    version: int
    source: str
    keys: List[str]
    features: List[str]
    schema: pa.Schema
    kind: str
    online: bool
    lake: Optional[str]
    event_time: Optional[str]


def _time_text(t: Optional[TimeLike], what: str) -> Optional[str]:
    if t is None:
        return None
    if isinstance(t, bool):
        raise TypeError(f"{what}: expected a time, not a bool")
    if isinstance(t, int):
        return str(t)
    if isinstance(t, _dt.datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=_dt.timezone.utc)
        return str(int(t.timestamp() * 1000))
    if isinstance(t, _dt.date):
        return t.isoformat()
    if isinstance(t, str):
        return t
    raise TypeError(f"{what}: expected a datetime, date, str or epoch milliseconds, not {type(t).__name__}")


def _time_ms(t: Optional[TimeLike], what: str) -> Optional[int]:
    text = _time_text(t, what)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    s = text.strip().replace("Z", "+00:00")
    try:
        d = _dt.datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"{what}: `{text}` is not a time (use RFC 3339, YYYY-MM-DD or epoch milliseconds)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return int(d.timestamp() * 1000)


def _feature_specs(features: Features) -> List[str]:
    if isinstance(features, str):
        return [features]
    if isinstance(features, Mapping):
        out = []
        for view, cols in features.items():
            out.append(view if not cols else f"{view}:{','.join(cols)}")
        return out
    return [str(f) for f in features]


def _source_specs(sources: Optional[Mapping[str, Union[PathLike, Sequence[PathLike]]]]) -> List[str]:
    out: List[str] = []
    for name, paths in (sources or {}).items():
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        for p in paths:
            out.append(f"{name}={os.fspath(p)}")
    return out


class _Progress:
    """A tqdm bar per source when tqdm is installed (notebooks get the widget),
    else a line on standard error."""

    def __init__(self) -> None:
        try:
            from tqdm.auto import tqdm  # type: ignore[import-not-found]
        except ImportError:
            tqdm = None
        self._tqdm = tqdm
        self._bars: Dict[str, Any] = {}
        self._started = time.time()

    def __call__(self, source: str, rows: int, event_time: Optional[int], done: bool) -> None:
        when = ""
        if event_time is not None:
            when = _dt.datetime.fromtimestamp(event_time / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        if self._tqdm is None:
            end = "\n" if done else "\r"
            sys.stderr.write(f"backfill {source}: {rows} rows, event time {when or '-'}{end}")
            sys.stderr.flush()
            return
        bar = self._bars.get(source)
        if bar is None:
            # The rate is rows over the time since the backfill started.
            bar = self._tqdm(desc=f"backfill {source}", unit=" rows", unit_scale=True, smoothing=0)
            bar.start_t = self._started
            self._bars[source] = bar
        bar.update(rows - bar.n)
        if when:
            bar.set_postfix_str(f"event time {when}", refresh=False)
        if done:
            bar.close()


class Pipeline:
    """A pipeline file, planned: its views, training sets, backfills and lake.

    Planning checks the whole file; a mistake raises :class:`sluice.PipelineError`
    with ``file``, ``line``, ``column`` and ``hint``.

    >>> p = Pipeline("examples/training/pipeline.sql")   # doctest: +SKIP
    >>> [v.name for v in p.views]                         # doctest: +SKIP
    ['user_activity', 'user_profile']
    """

    def __init__(self, path: PathLike) -> None:
        self._native = _sluice.NativePipeline(os.fspath(path))
        self._views = [View(**v) for v in self._native.views()]

    @property
    def path(self) -> str:
        """The pipeline file."""
        return os.fspath(self._native.path)

    @property
    def views(self) -> List[View]:
        """The feature views, in the order the file declares them."""
        return list(self._views)

    def view(self, name: str) -> View:
        """The view called ``name`` (``KeyError`` naming the views if there is none)."""
        for v in self._views:
            if v.name == name:
                return v
        raise KeyError(f"no feature view `{name}` (views: {', '.join(v.name for v in self._views)})")

    def explain(self) -> str:
        """The streaming plan, as ``sluice explain`` prints it."""
        return self._native.explain()

    def __repr__(self) -> str:
        return f"Pipeline({self.path!r}, views={[v.name for v in self._views]!r})"

    def training_set(
        self,
        spine: Any,
        features: Features,
        key_map: Optional[Mapping[str, str]] = None,
        time_column: Optional[str] = None,
        *,
        sources: Optional[Mapping[str, Union[PathLike, Sequence[PathLike]]]] = None,
        closed_windows: bool = False,
        dead_letters: Optional[PathLike] = None,
        return_stats: bool = False,
    ) -> Any:
        """Every spine row with each requested view's features as of the row's time.

        The same join as ``sluice training-set``: a windowed view's value is
        what an online read at the spine time returned (its history replayed),
        other views come from the lake row valid at that time.

        Args:
            spine: Entity keys, a timestamp and labels: a pyarrow Table, a
                pandas or polars DataFrame, an Arrow stream, or a ``.parquet``,
                ``.csv`` or ``.jsonl`` path.
            features: ``["view"]``, ``["view:col,col"]`` or ``{"view": ["col"]}``;
                feature columns are named ``view__col``.
            key_map: View key column → spine column, where the names differ.
            time_column: The spine's time column (default: its only timestamp column).
            sources: A source's history for replays: ``{"clicks": "history/"}``
                (files, folders or globs). Without it a replay reads the
                source's event archive, or a file source's own path.
            closed_windows: Windowed views from their lake's closed-window rows
                instead of a replay.
            dead_letters: Where a replay's undecodable and late events go
                (default ``training_set.dead_letters.jsonl``).
            return_stats: Return ``(table, stats)``, stats being what each view
                contributed.

        Returns:
            A ``pyarrow.Table`` (``.to_pandas()`` for pandas): the spine's
            columns, then the features.
        """
        table, stats = self._native.training_set(
            as_arrow_stream(spine),
            _feature_specs(features),
            dict(key_map or {}),
            time_column,
            _source_specs(sources),
            closed_windows,
            os.fspath(dead_letters or "training_set.dead_letters.jsonl"),
        )
        return (table, stats) if return_stats else table

    def backfill(
        self,
        sources: Optional[Mapping[str, Union[PathLike, Sequence[PathLike]]]] = None,
        start: Optional[TimeLike] = None,
        end: Optional[TimeLike] = None,
        online: bool = False,
        *,
        state_dir: PathLike = "sluice-state",
        include_late: bool = False,
        replace: bool = False,
        threads: Optional[int] = None,
        progress: Union[bool, Callable[[str, int, Optional[int], bool], None]] = True,
    ) -> Dict[str, Any]:
        """Runs the views over bounded history (``sluice backfill``) into the lake.

        Args:
            sources: ``{"clicks": "history/2024-*.parquet"}``: files, folders
                or globs per source. Without it, each file source reads its own path.
            start: Emit windows starting at or after this time.
            end: Close every window ending at or before this time and emit none later.
            online: Also write each key's latest row into the online store of ``state_dir``.
            state_dir: Dead letters (``backfill_dead_letters.jsonl``) and the online store.
            include_late: Fold in events streaming would drop as late.
            replace: Delete the lake files of an earlier backfill of these views first.
            threads: Worker threads (default: one per core).
            progress: ``True`` for a progress bar (tqdm in notebooks and
                terminals if installed, else a line on stderr), ``False`` for
                none, or a callable ``(source, rows, event_time_ms, done)``.

        Returns:
            ``{"events", "late", "dead_letters", "seconds", "views": [{"view", "rows", "online_keys", "expect_failures"}]}``.
        """
        lo, hi = _time_ms(start, "start"), _time_ms(end, "end")
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"start must be before end (start {start}, end {end})")
        if progress is True:
            report: Optional[Callable[..., None]] = _Progress()
        elif progress is False or progress is None:
            report = None
        else:
            report = progress
        return self._native.backfill(
            _source_specs(sources),
            _time_text(start, "start"),
            _time_text(end, "end"),
            os.fspath(state_dir),
            online,
            include_late,
            replace,
            threads,
            report,
        )

    def read_lake(
        self,
        view: str,
        start: Optional[TimeLike] = None,
        end: Optional[TimeLike] = None,
        *,
        dataset: bool = False,
    ) -> Any:
        """A view's lake rows whose ``window_end`` is in ``[start, end)``.

        Args:
            view: The view (``name`` or ``name@version``).
            start: First ``window_end`` included.
            end: First ``window_end`` excluded.
            dataset: Return the ``pyarrow.dataset.Dataset`` (lazy, unfiltered
                by time) instead of a Table.

        Returns:
            A ``pyarrow.Table`` of the view's lake schema, or a Dataset.
        """
        import pyarrow.dataset as ds

        v = self.view(view)
        if v.lake is None:
            raise _sluice.SluiceError(f"view `{view}` writes no lake (no `offline` option)")
        schema = v.schema
        if not os.path.isdir(v.lake):
            d = ds.dataset(pa.table({n: pa.array([], t) for n, t in zip(schema.names, schema.types)}))
        else:
            # Files being written are hidden (`.name.tmp`) until renamed, and
            # dataset() skips hidden files.
            d = ds.dataset(v.lake, format="parquet", schema=schema, partitioning=None)
        if dataset:
            return d
        cond = None
        lo, hi = _time_ms(start, "start"), _time_ms(end, "end")
        if "window_end" in schema.names:
            field = ds.field("window_end")
            unit = schema.field("window_end").type
            if lo is not None:
                cond = field >= pa.scalar(lo, pa.int64()).cast(unit)
            if hi is not None:
                c = field < pa.scalar(hi, pa.int64()).cast(unit)
                cond = c if cond is None else cond & c
        return d.to_table(filter=cond)

