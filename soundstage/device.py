"""Device and precision names shared by every model stage (``--device``, ``--dtype``)."""

from __future__ import annotations

from soundstage.pipeline.stage import Param

#: the ``--dtype`` choices of every model stage, and the torch dtype each stands for
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_CHOICES = tuple(DTYPES)


def torch_dtype(name):
    """``fp32``/``fp16``/``bf16`` (or a torch dtype, or its torch name) -> ``torch.dtype``."""
    import torch  # not at module level: decoding workers import stage modules and need no torch

    if isinstance(name, torch.dtype):
        return name
    torch_name = DTYPES.get(str(name), str(name))
    if torch_name not in DTYPES.values():
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, torch_name)


class DeviceError(ValueError):
    """A --device this machine cannot give (a CUDA device on a CPU-only torch, a missing GPU)."""


def resolve_device(device: str | None) -> str:
    """``auto`` (or empty) -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is
    checked (a name torch knows, a GPU that is there) and returned unchanged."""
    import torch  # not at module level (see torch_dtype)

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device}: not a device name (cpu, cuda, cuda:1, ..., or auto)") from None
    if kind.type == "cuda":
        if torch.version.cuda is None:
            raise DeviceError(
                f"--device {device}: this torch is a CPU-only build (no CUDA); use --device cpu, or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if count == 0:
            raise DeviceError(f"--device {device}: no GPU is visible (driver, CUDA_VISIBLE_DEVICES); use --device cpu")
        if kind.index is not None and kind.index >= count:
            raise DeviceError(f"--device {device}: only {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
    return device


def device_param(help: str = "cpu, cuda, cuda:1, ... (auto: cuda when available)"):
    """The ``--device`` parameter of a model stage (not in the fingerprint)."""
    return Param("device", str, "auto", help, fingerprint=False)


def dtype_param(default: str = "fp32", help: str = "inference precision (fp16/bf16 are for GPUs)"):
    """The ``--dtype`` parameter of a model stage (in the fingerprint: it changes the numbers)."""
    return Param("dtype", str, default, help, choices=DTYPE_CHOICES)
