"""Named finetuning plans: ``idealtrain finetune --preset continue`` is the Slicer module's retraining plan.

One definition (:data:`CONTINUE`): the IDEALTrainer panel (``IDEALSegmentLib.retraining``) builds
its finetune command from it, and the command line expands ``--preset continue`` into the same
flags, placed before the user's own so that any flag given explicitly wins.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PRESET_FLAG = "--preset"


@dataclass(frozen=True)
class ContinueSettings:
    """The default retraining ("continue the current model"): keeps what the model knew, fits minutes on a CPU.

    Chosen and measured with ``benchmarks/site_adaptation.py`` (docs/retraining.md): the finest encoder
    levels stay frozen, the old model is distilled wherever the labels leave the class open,
    training runs few iterations of small batches on random crops, with the site's unlabelled scans
    in IDEAL's two-stream consistency term, and the new weights are a weighted mean of the old and the
    trained ones (0.6 of the old).
    """

    iterations: int = 200
    batch_size: int = 4
    unlabeled_batch_size: int = 4
    crop: int = 128
    frozen_levels: int = 3
    frozen_norm: bool = True
    distill: float = 2.0
    lr: float = 0.001
    #: Final weights: 0.6 of the old model's, 0.4 of the trained ones (weight-space ensembling). 0.6, not 0.5, since
    #: issue 31: on 3 splits it kept ACDC val within 0.004 (0.5: up to 0.0055) at the same site gain (docs/retraining.md).
    keep_old: float = 0.6
    #: Measured by benchmarks/site_adaptation.py on this project's shared 2-core CPU (one thread, 6-9 busy processes):
    #: 200 iterations with 104 volumes took 149-157 s with bf16 autocast (the CPU has AVX-512 BF16), 352 s in fp32.
    #: Only the estimate shown before Train; while training, the panel measures the speed of the first iterations.
    seconds_per_iteration: float = 0.6
    seconds_per_iteration_fp32: float = 1.6
    seconds_per_volume: float = 0.3  # reading and resampling one training or pool volume

    def flags(self) -> list[str]:
        """The idealtrain finetune flags of these settings (the iteration count is passed separately)."""
        return [
            "--batch-size", str(self.batch_size), "--unlabeled-batch-size", str(self.unlabeled_batch_size),
            "--crop", str(self.crop), "--frozen-levels", str(self.frozen_levels), "--distill", str(self.distill),
            "--lr", str(self.lr), "--keep-old", str(self.keep_old), *(["--frozen-norm"] if self.frozen_norm else []),
        ]

    def estimate_seconds(self, volumes: int, iterations: int | None = None, bf16: bool = True) -> float:
        """Wall-clock estimate of a retraining on ``volumes`` training and pool volumes (before any iteration ran)."""
        per_iteration = self.seconds_per_iteration if bf16 else self.seconds_per_iteration_fp32
        return (iterations or self.iterations) * per_iteration + volumes * self.seconds_per_volume + 30.0


CONTINUE = ContinueSettings()
PRESETS = {"continue": CONTINUE}


def expand_preset(argv: Sequence[str]) -> list[str]:
    """``finetune --preset continue ...`` -> ``finetune <the plan's flags, --iterations too> --preset continue ...``.

    The preset's flags come first, so every flag the user gives explicitly overrides it (argparse keeps
    the last value). Other commands and unknown names pass through (the parser reports them).
    """
    argv = list(argv)
    if not argv or argv[0] != "finetune":
        return argv
    name = None
    for index, token in enumerate(argv):
        if token == PRESET_FLAG and index + 1 < len(argv):
            name = argv[index + 1]
        elif token.startswith(PRESET_FLAG + "="):
            name = token.split("=", 1)[1]
    settings = PRESETS.get(name or "")
    if settings is None:
        return argv
    return [argv[0], "--iterations", str(settings.iterations), *settings.flags(), *argv[1:]]
