"""A kvd connection that survives the daemon going away.

An inference engine must keep serving when kvd is down: every call through ``Link`` either
returns a usable client/namespace or ``None`` (after one clear warning), and the link tries
again every ``retry_s`` seconds, so the engine picks kvd back up when it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kvd._kvd import Client, KvdError, KvdUnavailable, Namespace

log = logging.getLogger("kvd.connector")

#: Namespaces kept open per link (one per distinct tenant/salt); older ones are closed first.
MAX_NAMESPACES = 64


class Link:
    """Lazily connected, self-healing access to one kvd socket.

    Calls wait at most ``timeout_s`` for kvd; a daemon that stops answering counts as down
    (the engine must never hang on its cache)."""

    def __init__(
        self,
        socket: str,
        name: str,
        retry_s: float = 5.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger = log,
    ) -> None:
        self._log = log
        self.socket = socket
        self.name = name
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._namespaces: dict[tuple[Any, ...], Namespace] = {}
        self._refused: set[tuple[Any, ...]] = set()
        self._next_try = 0.0
        self._down_since: float | None = None

    @property
    def up(self) -> bool:
        return self._client is not None

    def client(self) -> Client | None:
        """The connected client, connecting first if due; None while kvd is unavailable."""
        with self._lock:
            if self._client is not None:
                return self._client
            now = self._clock()
            if now < self._next_try:
                return None
            try:
                self._client = Client(self.socket, name=self.name, timeout_s=self.timeout_s)
            except (KvdError, OSError) as e:
                self._mark_down(str(e))
                return None
            if self._down_since is not None:
                self._log.warning(
                    "kvd is back at %s after %.0f s; using the external KV cache again",
                    self.socket,
                    now - self._down_since,
                )
            self._down_since = None
            return self._client

    def namespace(self, **desc: Any) -> tuple[Client, Namespace] | None:
        """The client and an open namespace for ``desc`` (see ``Client.open_namespace``);
        None while kvd is unavailable or when it (or validation) refuses the namespace."""
        client = self.client()
        if client is None:
            return None
        key = tuple(sorted(desc.items()))
        with self._lock:
            ns = self._namespaces.get(key)
        if ns is not None:
            return client, ns
        try:
            ns = client.open_namespace(**desc)
        except KvdUnavailable as e:
            self.failed(e)
            return None
        except (KvdError, ValueError) as e:
            if key not in self._refused:
                self._refused.add(key)
                self._log.warning("kvd refused namespace %s: %s; no caching for it", desc, e)
            return None
        with self._lock:
            if len(self._namespaces) >= MAX_NAMESPACES:
                self._namespaces.pop(next(iter(self._namespaces)))
            self._namespaces[key] = ns
        return client, ns

    def failed(self, err: BaseException) -> None:
        """Reports that a call through this link failed; drops the connection if it is gone."""
        if isinstance(err, KvdUnavailable):
            with self._lock:
                self._client = None
                self._namespaces.clear()
                self._mark_down(str(err))

    def _mark_down(self, why: str) -> None:
        now = self._clock()
        self._next_try = now + self.retry_s
        if self._down_since is None:
            self._down_since = now
            self._log.warning(
                "kvd is unavailable at %s (%s); serving without the external KV cache "
                "(no hits, nothing saved) and retrying every %.0f s",
                self.socket,
                why,
                self.retry_s,
            )
