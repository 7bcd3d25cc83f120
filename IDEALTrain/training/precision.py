"""Training precision: bf16 autocast where the device runs it fast, fp32 on request or where it does not.

On CPUs with AVX-512 BF16 or AMX, bf16 autocast with channels-last activations roughly halves the
time of memory-bound 2D convolutions; on CUDA bf16 is the usual mixed precision. Weights, the
optimiser and the losses stay fp32 either way (autocast only lowers the matrix and conv maths).
"""
from __future__ import annotations

import torch

from ..errors import IdealError

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX); emulated bf16 is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'bf16' or 'fp32' for this device: 'auto' takes bf16 on CUDA and on CPUs with native bf16."""
    if precision not in PRECISIONS:
        raise IdealError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native = device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16())
    if precision == "bf16" and not native:
        raise IdealError(f"bf16 training needs a CUDA device or a CPU with AVX-512 BF16 or AMX; this {device.type} has neither: use fp32")
    if precision == "auto":
        return "bf16" if native else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of a resolved precision on ``device`` (disabled for fp32)."""
    device_type = device.type if device.type in ("cuda", "cpu") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
