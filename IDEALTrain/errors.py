"""The one exception type users see: a clear, single-line message that says what to do."""


class IdealError(Exception):
    """A problem with the user's input or files, explained in one line (never a deep traceback)."""


class TrainingStopped(Exception):
    """Training stopped early on request (signal or callback); its checkpoint holds the state."""

    def __init__(self, iteration: int, checkpoint_dir: object = None) -> None:
        where = f"; resume with --resume --checkpoint-dir {checkpoint_dir}" if checkpoint_dir else " (no --checkpoint-dir: progress is lost)"
        super().__init__(f"training stopped at iteration {iteration}{where}")
        self.iteration = iteration
