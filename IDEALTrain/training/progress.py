"""Progress reporting: a tqdm bar for people, JSON lines on stdout for programs (the Slicer module)."""
from __future__ import annotations

import json
import sys
import time
from typing import Any

from tqdm import tqdm


class Progress:
    """Reports iterations of one phase; ``json_lines`` switches from tqdm to JSON events, and a
    disabled reporter (any rank but the first of a multi-process run) stays silent."""

    def __init__(self, phase: str, total: int, start: int = 0, json_lines: bool = False, enabled: bool = True) -> None:
        self.phase, self.total, self.json_lines, self.enabled = phase, total, json_lines, enabled
        self.start_iteration, self.start_time = start, time.monotonic()
        show_bar = enabled and not json_lines
        self.bar = tqdm(total=total, initial=start, desc=phase, file=sys.stderr, dynamic_ncols=True) if show_bar else None

    def event(self, event: str, **fields: Any) -> None:
        """A one-off event (checkpoint, validation, done); printed as JSON or as a tqdm note."""
        if not self.enabled:
            return
        if self.json_lines:
            print(json.dumps({"event": event, "phase": self.phase, **fields}), flush=True)
        elif self.bar is not None:
            self.bar.write(f"{event}: " + ", ".join(f"{k}={_short(v)}" for k, v in fields.items()))

    def update(self, iteration: int, **metrics: float) -> None:
        """Iteration ``iteration`` (1-based) finished with these metrics."""
        if not self.enabled:
            return
        done = iteration - self.start_iteration
        elapsed = time.monotonic() - self.start_time
        eta = elapsed / done * (self.total - iteration) if done > 0 else None
        if self.json_lines:
            line = {"event": "progress", "phase": self.phase, "iteration": iteration, "total": self.total}
            line.update({k: round(v, 6) for k, v in metrics.items()})
            line["eta_s"] = None if eta is None else round(eta, 1)
            print(json.dumps(line), flush=True)
        else:
            self.bar.n = iteration
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
