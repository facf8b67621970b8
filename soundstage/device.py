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


def resolve_device(device: str | None) -> str:
    """``auto`` (or empty) -> ``cuda`` when a GPU is visible, else ``cpu``; anything else unchanged."""
    if device not in (None, "", "auto"):
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_param(help: str = "cpu, cuda, cuda:1, ... (auto: cuda when available)"):
    """The ``--device`` parameter of a model stage (not in the fingerprint)."""
    return Param("device", str, "auto", help, fingerprint=False)


def dtype_param(default: str = "fp32", help: str = "inference precision (fp16/bf16 are for GPUs)"):
    """The ``--dtype`` parameter of a model stage (in the fingerprint: it changes the numbers)."""
    return Param("dtype", str, default, help, choices=DTYPE_CHOICES)
