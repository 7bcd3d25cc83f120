"""The devices a model can run on, probed in a child process and cached, so torch (and CUDA) never start in Slicer's process.

:class:`DeviceProbe` runs a three-line torch script with the same Python the jobs use and caches
its answer in a small JSON file (keyed by that Python), so the panels fill their device lists at
once from the cache and a GUI polls a fresh probe from a timer.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from IDEALTrain.io.atomic import atomic_path

from .jobs import _child_environment, no_console_window, python_executable

#: Prints [["cuda:0", "NVIDIA ..."], ...] (empty without CUDA, or without torch: exit status 1).
PROBE_CODE = (
    "import json, torch\n"
    "count = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps([[f'cuda:{i}', torch.cuda.get_device_name(i)] for i in range(count)]))\n"
)


class DeviceProbe:
    """The CUDA devices ([(device, name)]), from the cache file or from a child process polled with :meth:`poll`."""

    def __init__(self, cache_file: Path) -> None:
        self.cache_file = Path(cache_file)
        self._process: subprocess.Popen | None = None

    def cached(self) -> list[tuple[str, str]] | None:
        """The devices found by the last probe with this Python, None when it was never probed."""
        try:
            data = json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("python") != str(python_executable()) or not isinstance(data.get("devices"), list):
            return None
        return [(str(device), str(name)) for device, name in data["devices"]]

    def start(self) -> None:
        """Start probing (returns at once)."""
        if self._process is None:
            self._process = subprocess.Popen(
                [str(python_executable()), "-c", PROBE_CODE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True, env=_child_environment(), **no_console_window(),
            )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def poll(self) -> list[tuple[str, str]] | None:
        """The devices once the probe has ended, None while it runs or when it was not started.

        Only an answer is cached: a probe that failed (torch not installed yet) gives [] and leaves the
        cache alone, so the device list is probed again once torch is installed in the same session.
        """
        if self._process is None or self._process.poll() is None:
            return None
        output, _ = self._process.communicate()
        ok = self._process.returncode == 0
        self._process = None
        try:
            devices = [(str(d), str(n)) for d, n in json.loads(output.strip().splitlines()[-1])] if ok else None
        except (ValueError, IndexError, TypeError):
            devices = None
        if devices is None:
            return []
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.cache_file) as temp:
            temp.write_text(json.dumps({"python": str(python_executable()), "devices": [list(d) for d in devices]}))
        return devices
