"""The one precision vocabulary of latentdit, and the one autocast.

    with autocast(device, resolve_precision("auto", device)):  # bf16 on CUDA, fp32 elsewhere
        y = model(x)

`fp32` runs as is; `bf16` and `fp16` autocast; `auto` (where an option allows it) means bf16 on
CUDA and fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
from enum import Enum
from typing import TYPE_CHECKING

from foundation.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a dtype is needed, so configs import this cheaply
    import torch

AUTO = "auto"


class Precision(str, Enum):
    """A compute precision: the values every `--precision` / `--dtype` option takes."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    def __str__(self) -> str:
        return self.value

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of this precision."""
        import torch

        return getattr(torch, TORCH_DTYPE_NAMES[self])


TORCH_DTYPE_NAMES = {
    Precision.fp32: "float32",
    Precision.bf16: "bfloat16",
    Precision.fp16: "float16",
}
NAMES = tuple(p.value for p in Precision)


def parse_precision(value: str | Precision, option: str = "--precision") -> Precision:
    """`value` as a Precision, or a ConfigError naming the option and the allowed values."""
    try:
        return Precision(value)
    except ValueError:
        raise ConfigError(f"{option} {value!r} is not one of {', '.join(NAMES)}") from None


def resolve_precision(value: str | Precision | None, device: torch.device | str) -> Precision:
    """`auto` or None: bf16 on CUDA, fp32 elsewhere; any other value is parsed as is."""
    if value is None or value == AUTO:
        return Precision.bf16 if _device_type(device) == "cuda" else Precision.fp32
    return parse_precision(value)


def torch_dtype(precision: str | Precision) -> torch.dtype:
    """The torch dtype of a precision name."""
    return parse_precision(precision).dtype


def autocast(
    device: torch.device | str, precision: str | Precision
) -> contextlib.AbstractContextManager:
    """Autocast to `precision` on `device`; fp32 runs as is (no autocast)."""
    import torch

    p = parse_precision(precision)
    if p is Precision.fp32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=p.dtype)


def _device_type(device: torch.device | str) -> str:
    return device.type if hasattr(device, "type") else str(device).split(":")[0]
