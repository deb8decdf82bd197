"""`sluice.Client`: reads a running Sluice server over HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.parse
from typing import Any, Dict, Optional, Sequence, Union

import pyarrow as pa

from ._sluice import NotFound, SluiceError
from ._tables import convert, key_text, reads_table


class Unavailable(SluiceError):
    """The server cannot be reached, timed out, or answered 503 (not ready)."""


class Unauthorized(SluiceError):
    """The server wants a bearer token, or another one (HTTP 401)."""


class BadRequest(SluiceError):
    """The server refused the request as malformed (HTTP 400): a wrong window,
    vector length or filter."""


class Client:
    """A client of ``sluice run``'s HTTP server.

    One keep-alive connection is reused across calls (and reopened when the
    server closed it); calls are safe from several threads.

    Args:
        url: The server, e.g. ``http://127.0.0.1:8080``.
        token: The bearer token the server was started with, if any.
        timeout: Seconds to wait for a connection or an answer.
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 10.0) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"url: expected http://HOST:PORT, not {url!r}")
        self.url = url.rstrip("/")
        self._https = u.scheme == "https"
        self._host = u.hostname
        self._port = u.port or (443 if self._https else 80)
        self._prefix = u.path.rstrip("/")
        self._token = token
        self.timeout = timeout
        self._conn: Optional[http.client.HTTPConnection] = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Closes the connection (the next call opens a new one)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn

    def _request(self, method: str, path: str, body: Optional[dict] = None) -> tuple:
        """(status, parsed JSON or text) of one request; a request on a
        connection the server closed is sent again on a new one."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        with self._lock:
            for attempt in range(2):
                conn = self._connection()
                try:
                    conn.request(method, self._prefix + path, body=data, headers=headers)
                    resp = conn.getresponse()
                    raw = resp.read()
                    break
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                    conn.close()
                    self._conn = None
                    if attempt == 1:
                        raise Unavailable(f"{self.url}: the connection was closed ({e})") from e
                except (socket.timeout, TimeoutError) as e:
                    conn.close()
                    self._conn = None
                    raise Unavailable(f"{self.url}: no answer within {self.timeout} s") from e
                except OSError as e:
                    conn.close()
                    self._conn = None
                    raise Unavailable(f"{self.url}: cannot connect ({e})") from e
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                self._conn = None
        text = raw.decode("utf-8", "replace")
        try:
            parsed: Any = json.loads(text) if text else None
        except ValueError:
            parsed = text
        return resp.status, parsed

    @staticmethod
    def _raise(status: int, body: Any, what: str) -> None:
        msg = body.get("error") if isinstance(body, dict) else body
        text = f"{what}: {msg}" if msg else f"{what}: HTTP {status}"
        if status == 404:
            raise NotFound(text)
        if status == 401:
            raise Unauthorized(text)
        if status == 400:
            raise BadRequest(text)
        if status == 503:
            raise Unavailable(text)
        raise SluiceError(f"{text} (HTTP {status})")

    def get(
        self,
        view: str,
        keys: Union[Any, Sequence[Any]],
        *,
        window: Optional[str] = None,
        output: str = "arrow",
    ) -> Any:
        """The features of ``keys`` (one key or a list), in key order, in one request.

        Args:
            view: The view; an unversioned name serves the newest version
                that has caught up, ``name@2`` a given version.
            keys: Keys; a multi-column key is a tuple (or text joined by ``|``).
            window: ``fresh``, ``closed`` or ``current`` (the view's default if None).
            output: ``"arrow"`` (a ``pyarrow.Table``), ``"pandas"`` or ``"polars"``.

        Returns:
            Columns ``key``, ``found``, the read's time columns (``as_of``, …)
            and the features; a key without a value has ``found`` false.

        Raises:
            sluice.NotFound: No such view. sluice.Unavailable, sluice.Unauthorized,
            sluice.BadRequest as the server answers.
        """
        if isinstance(keys, (str, tuple)) or not isinstance(keys, Sequence):
            keys = [keys]
        path = f"/v1/features/{urllib.parse.quote(view, safe='@')}"
        if window is not None:
            path += "?" + urllib.parse.urlencode({"window": window})
        status, body = self._request("POST", path, {"keys": [key_text(k) for k in keys]})
        if status != 200:
            self._raise(status, body, f"view {view}")
        results = body.get("results", []) if isinstance(body, dict) else []
        reads = [r if r.get("found", True) else None for r in results]
        return convert(reads_table(keys, reads), output)

    def nearest(
        self,
        view: str,
        vector: Optional[Sequence[float]] = None,
        k: int = 10,
        *,
        key: Optional[str] = None,
        key_view: Optional[str] = None,
        filter: Optional[str] = None,
        features: bool = False,
        exact: bool = False,
        output: str = "arrow",
    ) -> Any:
        """The ``k`` nearest neighbours of ``vector``, or of the vector ``key`` has.

        Args:
            view: A view with a vector index.
            vector: The query vector (or give ``key``).
            k: How many neighbours.
            key: Query with this key's current vector instead.
            key_view: The view whose index holds ``key`` (default: ``view``).
            filter: A SQL condition over the index's filter columns.
            features: Include each neighbour's features.
            exact: Scan exactly instead of searching the trees.
            output: ``"arrow"``, ``"pandas"`` or ``"polars"``.

        Returns:
            Columns ``key`` and ``distance``, nearest first (and the features
            with ``features=True``).
        """
        if (vector is None) == (key is None):
            raise ValueError("give exactly one of vector and key")
        body: Dict[str, Any] = {"k": int(k), "features": features, "exact": exact}
        if vector is not None:
            body["vector"] = [float(x) for x in vector]
        if key is not None:
            body["key"] = key_text(key)
        if key_view is not None:
            body["key_view"] = key_view
        if filter is not None:
            body["filter"] = filter
        path = f"/v1/features/{urllib.parse.quote(view, safe='@')}/nearest"
        status, resp = self._request("POST", path, body)
        if status != 200:
            self._raise(status, resp, f"nearest in {view}")
        rows = []
        for n in resp.get("neighbours", []):
            row = {"key": n.get("key"), "distance": n.get("distance")}
            for f, v in (n.get("features") or {}).items():
                row[f] = v
            rows.append(row)
        if not rows:
            table = pa.table({"key": pa.array([], pa.string()), "distance": pa.array([], pa.float64())})
        else:
            table = pa.Table.from_pylist(rows)
        return convert(table, output)

    def health(self) -> Dict[str, Any]:
        """Whether the server is live (``/healthz``) and ready (``/readyz``).

        Returns:
            ``{"live": bool, "ready": bool, "reasons": [...]}``; ``reasons``
            say why the server is not ready (recovering, a source that cannot
            reach its brokers, a view past its ``freshness_slo``).

        Raises:
            sluice.Unavailable: The server cannot be reached.
        """
        live, _ = self._request("GET", "/healthz")
        status, body = self._request("GET", "/readyz")
        reasons: list = []
        if status != 200:
            # /readyz answers 503 with the reasons as text, one per line.
            reasons = [line.strip() for line in str(body or "").splitlines() if line.strip()]
        return {"live": live == 200, "ready": status == 200, "reasons": reasons}
