"""Cancelling long Logic operations: a token the GUI sets and the work checks between steps."""
from __future__ import annotations

import threading

from IDEALTrain.errors import IdealError


class Cancelled(IdealError):
    """The user cancelled the operation; nothing it would have added to the scene was added."""


class CancelToken:
    """Thread-safe flag: ``cancel()`` from the GUI thread, ``check()`` from the worker."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self, what: str = "the operation") -> None:
        """Raise :class:`Cancelled` if ``cancel()`` has been called."""
        if self._event.is_set():
            raise Cancelled(f"{what} was cancelled; the scene is unchanged")
