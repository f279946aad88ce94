"""``torch.compile``d kernels and their fallbacks, shared by the loss (``compile_loss``) and the
base-statistics pass (``compile_stats``).

A feature's kernels are compiled once per process. Compiling happens at a kernel's first call, so
that is where a missing C++ compiler or Triton shows: then one warning, the feature switched off
for the rest of the process, and ``CompileFailed`` for the caller, which runs its eager pass (same
values, slower). Anything else raised inside a kernel (a CUDA error, out of memory) is the
caller's, as it is.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

_KERNELS: dict[str, Optional[tuple]] = {}


class CompileFailed(Exception):
    """torch.compile could not build a feature's kernels on this machine (warned once)."""


def by_default(device: torch.device | str) -> bool:
    """The default of ``compile_loss`` and ``compile_stats``: on CUDA when Triton is there
    (Inductor's GPU code generator), off elsewhere."""
    if torch.device(device).type != "cuda":
        return False
    from torch.utils._triton import has_triton

    return has_triton()


def disabled() -> bool:
    """torch.compile switched off (``TORCH_COMPILE_DISABLE=1`` or ``TORCHDYNAMO_DISABLE=1``): the
    kernels' formulas would then run eagerly over whole tensors, so callers take their eager pass."""
    import torch._dynamo as dynamo

    return bool(dynamo.config.disable) or os.environ.get("TORCHDYNAMO_DISABLE") == "1"


def kernels(feature: str, fns: tuple[Callable, ...], **options) -> Optional[tuple]:
    """The compiled ``fns`` of ``feature`` (fullgraph; ``options`` go to ``torch.compile``), or None
    once compiling them has failed in this process."""
    if feature not in _KERNELS:
        _KERNELS[feature] = tuple(torch.compile(fn, fullgraph=True, **options) for fn in fns)
    return _KERNELS[feature]


def run(feature: str, what: str, fallback: str, kernel: Callable, *args):
    """``kernel(*args)``; if torch.compile fails to build it, warn once (``what`` could not be
    built; ``fallback`` says what runs instead), switch ``feature`` off and raise CompileFailed."""
    from torch._dynamo.exc import TorchDynamoException  # Inductor's errors (no compiler, no Triton) derive from it

    try:
        return kernel(*args)
    except TorchDynamoException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings.warn(f"{feature}: torch.compile could not build {what} here ({type(exc).__name__}: {first}); "
                      f"{fallback} instead (same values, slower)", stacklevel=5)  # at the caller of the loss or of compute_base_stats
        _KERNELS[feature] = None
        raise CompileFailed from exc
