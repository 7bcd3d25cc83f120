"""Driving the web app from a real browser: start the server, find Chromium, wait for the page, list workers.

Shared by the end-to-end tests and ``benchmarks/web_latency.py``. Playwright cannot download its own
browser on these machines: Debian's ``chromium`` is launched headless with ``--no-sandbox``.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

#: Flags that let Debian's Chromium run headless as root in a container, quietly and offline.
CHROMIUM_ARGS = (
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
)
REPOSITORY = Path(__file__).resolve().parents[1]


def chromium_executable() -> str | None:
    """The Chromium to drive ($IDEAL_CHROMIUM, else chromium / chromium-browser on PATH), None when there is none."""
    for candidate in (os.environ.get("IDEAL_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def browser_problem() -> str | None:
    """Why no browser can be driven here (None when Playwright and Chromium are both installed)."""
    try:
        import playwright.sync_api  # noqa: F401
        import trame_slicer  # noqa: F401
    except ImportError as error:
        return f"the web extra is not installed ({error.name}): pip install -e '.[web]'"
    if chromium_executable() is None:
        return "no Chromium: apt-get install -y chromium (or set IDEAL_CHROMIUM)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m IDEALWeb.app`` in a child process on a free loopback port."""

    def __init__(self, data: Path, output: Path, device: str = "cpu", extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = Path(output).parent / f"web-server-{self.port}.log"
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), str(REPOSITORY / "IDEALSegment" / "Logic"), env.get("PYTHONPATH", "")])
        self.log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "IDEALWeb.app", "--data", str(data), "--output", str(output), "--port", str(self.port), "--device", device, *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(REPOSITORY),
        )

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Block until the one console line says where it is served; that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("IDEALSegment web: serving"):
                    return line
            if self.process.poll() is not None:
                raise RuntimeError(f"the web app exited with {self.process.returncode}:\n{self.output()}")
            time.sleep(0.2)
        raise RuntimeError(f"the web app did not start within {timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a service manager stops it; its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        return self.process.returncode


def child_workers(pid: int, marker: bytes = b"IDEALTrain") -> list[int]:
    """PIDs of the child processes of ``pid`` whose command line holds ``marker`` (workers, training jobs; Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == pid and marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.append(pid)
    return running


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition`` until it returns a true value (returned), else AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def launch_chromium(playwright: object, headless: bool = True) -> object:
    return playwright.chromium.launch(executable_path=chromium_executable(), args=list(CHROMIUM_ARGS), headless=headless)
