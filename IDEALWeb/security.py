"""Where the web app may listen, what it may open and where it may write (patient images).

Pure Python, no trame: the app and its tests share these checks. It listens on 127.0.0.1 unless a
host is given; any other host needs an access token (or the app refuses to start). Files are opened
only under the data folder and written only under the output folder, symbolic links resolved first.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from IDEALTrain.errors import IdealError

LOOPBACK = "127.0.0.1"
#: The query parameter carrying the access token (trame's client sends it in its websocket hello).
TOKEN_PARAMETER = "secret"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServePolicy:
    """Where the app listens and who may use it."""

    host: str = LOOPBACK
    port: int = 0
    token: str | None = None

    def banner(self, port: int | None = None) -> str:
        """The one console line that says where the app is served and to whom."""
        port = self.port if port is None else port
        if is_loopback(self.host):
            return f"IDEALSegment web: serving http://{self.host}:{port}/ to this computer only (loopback)"
        return (
            f"IDEALSegment web: serving http://{self.host}:{port}/ to the network; only browsers that open "
            f"http://{self.host}:{port}/?{TOKEN_PARAMETER}=<access token> may use it"
        )


def serve_policy(host: str | None, port: int = 0, token: str | None = None) -> ServePolicy:
    """Check the listening address: any host but loopback needs an access token (of at least 16 characters)."""
    host = host or LOOPBACK
    if token is not None and len(token) < 16:
        raise IdealError("the access token is too short: use at least 16 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    if not is_loopback(host) and not token:
        raise IdealError(
            f"refusing to serve patient images on {host} without an access token: pass --token (or the environment "
            "variable IDEALSEGMENT_WEB_TOKEN), or serve on 127.0.0.1"
        )
    return ServePolicy(host, port, token)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class DataFolder:
    """The folder the app may open studies from; every path is checked after resolving links."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise IdealError(f"data folder {root} does not exist: pass --data with a folder holding the studies")
        self.root = root.resolve()

    def resolve(self, relative: str | Path) -> Path:
        """The absolute path of ``relative`` (to the data folder); refuses anything outside it or missing."""
        text = str(relative)
        if not text or "\x00" in text:
            raise IdealError("no study path given")
        path = (self.root / text).resolve()
        if not _inside(path, self.root):
            raise IdealError(f"{text} is outside the data folder {self.root}: only studies in the data folder can be opened")
        if not path.exists():
            raise IdealError(f"{text} does not exist in the data folder {self.root}")
        return path

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()


class OutputFolder:
    """The only folder the app writes to: results per study, reviewed cases, the pool, models, training runs."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    def path(self, *parts: str) -> Path:
        """``root/parts...`` (folders made); refuses a path that would leave the output folder."""
        path = self.root.joinpath(*parts).resolve()
        if not _inside(path, self.root):
            raise IdealError(f"{'/'.join(parts)} is outside the output folder {self.root}: nothing is written there")
        return path

    def folder(self, *parts: str) -> Path:
        path = self.path(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def corrections(self) -> Path:
        return self.folder("corrections")

    @property
    def models(self) -> Path:
        return self.folder("models")

    @property
    def training(self) -> Path:
        return self.folder("training")

    @property
    def scratch(self) -> Path:
        """Temporary files of this app and its child processes (TMPDIR points here)."""
        return self.folder(".scratch")
