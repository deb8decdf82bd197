"""`sluice.open_state`: a state dir's online store, read without a server."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

from . import _sluice
from ._tables import convert, key_text, parse_json_reads, reads_table


class State:
    """A state dir opened for reading, as ``sluice get`` reads it.

    Each :meth:`get` opens the store read-only, so it sees what the job that
    writes it (``sluice run`` or ``sluice backfill --online``) committed last.
    """

    def __init__(self, state_dir: Union[str, "os.PathLike[str]"]) -> None:
        self.state_dir = os.fspath(state_dir)

    def get(
        self,
        view: str,
        keys: Union[Any, Sequence[Any]],
        *,
        window: Optional[str] = None,
        output: str = "arrow",
    ) -> Any:
        """The features of ``keys`` (one key or a list) in key order.

        Args:
            view: The view; an unversioned name reads the newest version that
                has caught up, ``name@2`` a given version.
            keys: Keys; a multi-column key is a tuple (or text joined by ``|``).
            window: ``fresh``, ``closed`` or ``current`` (the view's default if None).
            output: ``"arrow"`` (a ``pyarrow.Table``), ``"pandas"`` or ``"polars"``.

        Returns:
            Columns ``key``, ``found``, the read's time columns and the
            features; a key without a value has ``found`` false.

        Raises:
            KeyError: No view of that name in the state dir.
            sluice.NotFound: ``state_dir`` holds no online store.
        """
        if isinstance(keys, (str, tuple)) or not isinstance(keys, Sequence):
            keys = [keys]
        texts = _sluice.read_online(self.state_dir, view, [key_text(k) for k in keys], window)
        return convert(reads_table(keys, parse_json_reads(texts)), output)

    def __repr__(self) -> str:
        return f"State({self.state_dir!r})"


def open_state(state_dir: Union[str, "os.PathLike[str]"]) -> State:
    """Opens ``state_dir`` for reading (see :class:`State`)."""
    if not os.path.isdir(state_dir):
        raise _sluice.NotFound(f"no state dir {os.fspath(state_dir)}")
    return State(state_dir)
