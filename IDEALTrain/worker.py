"""A long-lived ``idealtrain`` process for the Slicer panels: one command per JSON line on stdin, run in-process.

Starting Python, importing torch and reading a model costs seconds; the panels start this worker
once (in its own process group, before the first click) and send each ``segment`` / ``evaluate``
command line as ``{"args": [...]}``. The command's own output (JSON progress lines with
``--progress-json``) goes to stdout as usual, then ``{"event": "exit", "returncode": N, "error": ...}``
(0 done, 2 a user error, 1 a bug). Training runs as its own process instead (its cancel saves a
checkpoint). Cancelling a command ends the worker's process group; the next command starts a new one.

    python -m IDEALTrain.worker
"""
from __future__ import annotations

import json
import sys

from .cli import build_parser
from .errors import IdealError
from .io.output_guard import exit_status, sigterm_as_interrupt

WORKER_COMMANDS = ("segment", "evaluate", "refine")


def run(arguments: list[str]) -> tuple[int, str | None]:
    """Run one idealtrain command in this process: (exit status, error message or None)."""
    try:
        args = build_parser().parse_args(arguments)
    except SystemExit as exit_:  # argparse has printed the usage error to stderr
        return int(exit_.code or 2), f"invalid idealtrain arguments: {' '.join(arguments)}"
    if args.command not in WORKER_COMMANDS:
        return 2, f"the worker runs only {', '.join(WORKER_COMMANDS)}, not {args.command}"
    try:
        with sigterm_as_interrupt():  # a Cancel (SIGTERM) unwinds the command, so its temporary files are removed
            args.func(args)
    except IdealError as error:
        return 2, str(error)
    except Exception as error:  # reported to the panel; the worker stays up for the next command
        return 1, f"{type(error).__name__}: {error}"
    return 0, None


def main() -> None:
    """Read commands until stdin closes; announce readiness once torch is imported."""
    # The seconds of importing torch, SimpleITK and the metrics are spent before the first command arrives.
    from .evaluation import metrics  # noqa: F401
    from .inference import predictor  # noqa: F401
    from .io import datasets, volume_files  # noqa: F401

    print(json.dumps({"event": "ready"}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            arguments = [str(a) for a in json.loads(line)["args"]]
        except (ValueError, KeyError, TypeError):
            print(json.dumps({"event": "exit", "returncode": 2, "error": f"not a worker request: {line.strip()[:200]}"}), flush=True)
            continue
        try:
            code, error = run(arguments)
        except KeyboardInterrupt as interruption:  # cancelled: the command has cleaned up; the worker ends
            sys.exit(exit_status(interruption))
        sys.stdout.flush()
        print(json.dumps({"event": "exit", "returncode": code, "error": error}), flush=True)


if __name__ == "__main__":
    main()
