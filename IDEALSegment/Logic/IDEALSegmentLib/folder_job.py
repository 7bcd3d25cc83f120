"""A chain of worker runs over a private temporary folder: the common part of segmenting and comparing."""
from __future__ import annotations

import shutil
from pathlib import Path

from .jobs import JobChain


class FolderJob:
    """State, progress, cancel and clean-up of a :class:`JobChain` whose files live in ``self.folder``.

    Subclasses create the folder and the chain in ``start()`` and read the results from the folder;
    a failed or cancelled run removes the folder, so nothing is left behind.
    """

    folder: Path | None = None
    chain: JobChain | None = None

    @property
    def state(self) -> str:
        """``new``, ``running``, ``done``, ``failed`` or ``cancelled``."""
        return self.chain.state if self.chain is not None else "new"

    @property
    def error(self) -> str | None:
        return self.chain.error if self.chain is not None else None

    @property
    def fraction(self) -> float:
        return self.chain.fraction if self.chain is not None else 0.0

    def poll(self) -> str:
        """Read progress (never blocks); the state. The folder is removed once the job failed or was cancelled."""
        if self.chain is not None:
            self.chain.poll()
            if self.state in ("failed", "cancelled"):
                self.discard()
        return self.state

    def cancel(self) -> None:
        """Stop the child process tree (returns at once); :meth:`poll` reports ``cancelled`` once it has ended."""
        if self.chain is not None:
            self.chain.cancel()

    def discard(self) -> None:
        """Remove the temporary folder (inputs, outputs, log)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
