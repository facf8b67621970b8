"""Reading pickles that hold only data, without running code a file could smuggle in.

Some checkpoints are distributed only as pickles: fairseq HuBERT ``.pt`` files (an
``argparse.Namespace`` and a ``Dictionary`` beside the tensors, so ``torch.load(weights_only=True)``
refuses them) and scikit-learn k-means models saved with joblib (fairseq's ``*_km500.bin``).
A pickle names the globals it needs; an unpickler here admits exactly an allow-list of them,
mapped to the real data types or to inert stand-ins, and refuses every other global.
"""

from __future__ import annotations

import io
import pickle
import types
from collections.abc import Callable

import numpy as np
from joblib import numpy_pickle

try:  # where numpy keeps the functions its pickles name
    import numpy._core.multiarray as numpy_multiarray  # numpy >= 2
except ImportError:  # numpy 1.x
    import numpy.core.multiarray as numpy_multiarray


def numpy_data_globals() -> dict:
    """The globals that pickled numpy arrays and scalars need (they build data, run no code)."""
    allowed = {("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "scalar")] = numpy_multiarray.scalar
        allowed[(module, "_reconstruct")] = numpy_multiarray._reconstruct
    for name in ("float64", "float32", "int64", "int32"):  # dtype classes (numpy >= 1.25 pickles them)
        allowed[("numpy.dtypes", type(np.dtype(name)).__name__)] = type(np.dtype(name))
    return allowed


def _refuse(module: str, name: str, what: str):
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: not something {what} contains (restricted unpickler)")


def restricted_pickle_module(allowed: Callable[[], dict], what: str) -> types.SimpleNamespace:
    """A stand-in for the ``pickle`` module (what ``torch.load(pickle_module=...)`` takes) whose
    unpickler admits only ``allowed()`` (built on first use) — ``(module, name) -> object``."""
    table: dict = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if not table:
                table.update(allowed())
            try:
                return table[(module, name)]
            except KeyError:
                _refuse(module, name, what)

    return types.SimpleNamespace(
        Unpickler=RestrictedUnpickler,
        load=lambda f, **kw: RestrictedUnpickler(f, **kw).load(),
        loads=lambda b, **kw: RestrictedUnpickler(io.BytesIO(b), **kw).load(),
        __name__="soundstage_restricted_pickle",
    )


def load_joblib(path: str, allowed: dict, what: str):
    """A joblib pickle (numpy arrays stored beside it) read with only ``allowed`` globals."""
    allowed = {**numpy_data_globals(), **allowed, ("joblib.numpy_pickle", "NumpyArrayWrapper"): numpy_pickle.NumpyArrayWrapper}

    class RestrictedJoblibUnpickler(numpy_pickle.NumpyUnpickler):
        def find_class(self, module, name):
            try:
                return allowed[(module, name)]
            except KeyError:
                _refuse(module, name, what)

    with open(path, "rb") as f, numpy_pickle._validate_fileobject_and_memmap(f, path, None) as (fobj, _):
        return RestrictedJoblibUnpickler(path, fobj, True).load()


def load_tensors(path: str, what: str, map_location="cpu", **load_kwargs):
    """``torch.load(path, weights_only=True)`` (data only, no code), with a file that is not such a
    checkpoint reported as one ``ValueError`` naming it and ``what`` was expected, instead of what
    torch raises for it (``KeyError: 101`` for a text file, a long advice to drop ``weights_only``)."""
    import torch  # not at module level: the units stage imports this module in every decoding worker

    try:
        return torch.load(path, map_location=map_location, weights_only=True, **load_kwargs)
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, ValueError, IndexError) as e:
        with open(path, "rb") as f:
            head = f.read(4)
        if not head:
            why = "the file is empty"
        elif head.startswith(b"PK"):  # torch's zip format: cut short or damaged
            why = f"a damaged or truncated torch file ({str(e).splitlines()[0]})"
        elif isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            found = next(line for line in str(e).splitlines() if "Unsupported global" in line)
            why = f"it holds Python objects, not only tensors ({found.strip()})"
        else:
            why = "not a torch checkpoint file (neither torch's zip format nor a pickle)"
        raise ValueError(f"{path}: {why}; expected {what}") from None
