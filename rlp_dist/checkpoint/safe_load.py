"""Loading checkpoint files without running code from them.

A ``.pt`` file is a pickle, and unpickling can call any Python function a crafted file names
(``__reduce__`` -> ``os.system``). Every checkpoint file a user can point us at — ``model.init_from``,
``rlp-dist convert ckpt-to-hf``, the run directory we resume from — is read with
``torch.load(weights_only=True)``: tensors, containers, numbers and strings, plus exactly the classes
DeepSpeed 0.19 writes into its own files (measured on checkpoints of the tiny run at ZeRO 0/1/3,
fp32 and bf16, with ``torch.serialization.get_unsafe_globals_in_checkpoint``):

    deepspeed.runtime.fp16.loss_scaler.LossScaler      optimizer state (every ZeRO stage)
    deepspeed.runtime.zero.config.ZeroStageEnum        optimizer state (every ZeRO stage)
    deepspeed.utils.tensor_fragment.fragment_address   ZeRO-1/2 and bf16 optimizer state
    numpy ndarray / dtype (+ _reconstruct)             numpy's RNG state in our rank_*.pt files

DeepSpeed's ``engine.load_checkpoint`` and ``zero_to_fp32`` call ``torch.load(weights_only=False)``
themselves; :func:`guarded_loads` makes every ``torch.load`` inside it weights-only with that
allow-list, and turns any failure into one :class:`CheckpointLoadError` line naming the file: a
refused class (``set <flag>=true to trust the file``) or a truncated/corrupt file. With ``trust`` the
loads are left as DeepSpeed makes them (full unpickling) and only the file naming is added.

Flags: ``model.trust_checkpoint=true`` (``model.init_from``), ``--trust-checkpoint`` (``rlp-dist convert ckpt-to-hf``;
every other ``rlp-dist`` subcommand's loads are guarded by cli.py too),
``checkpoint.trust=true`` (resume from ``run.dir``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import threading
from typing import Iterator

import torch

from rlp_dist.config.schema import ConfigError

INIT_FLAG = "model.trust_checkpoint=true"
RESUME_FLAG = "checkpoint.trust=true"
CONVERT_FLAG = "--trust-checkpoint (rlp-dist convert ckpt-to-hf)"

_lock = threading.RLock()
_TORCH_LOAD = torch.load


class CheckpointLoadError(ConfigError):
    """A checkpoint file that cannot be loaded: one line naming the file and the reason.
    ``unsafe``: the file asks to unpickle a class outside the allow-list (never fall back past it)."""

    def __init__(self, msg: str, path: str = "", unsafe: bool = False):
        super().__init__(msg)
        self.path, self.unsafe = path, unsafe


def allowed_globals() -> list:
    """The classes DeepSpeed stores in its checkpoint files (module docstring)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    import numpy as np

    numpy_rng = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct]
    return [LossScaler, ZeroStageEnum, fragment_address, *numpy_rng]


def describe_failure(path, exc: BaseException, flag: str) -> CheckpointLoadError:
    """One line for a failed torch.load of ``path``."""
    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        m = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", text)
        what = m.group(1) if m else "a non-tensor object"
        return CheckpointLoadError(
            f"{path}: refused to unpickle {what} (a checkpoint file can run code when loaded; only tensors and "
            f"DeepSpeed's own classes are allowed); if you trust this file, set {flag}", str(path), unsafe=True)
    if isinstance(exc, FileNotFoundError):
        return CheckpointLoadError(f"{path}: the file is missing from the checkpoint", str(path))
    reason = text.split(". ")[0][:200] if text else "the file ends early"
    return CheckpointLoadError(f"{path}: cannot be loaded, the file is truncated or corrupt "
                               f"({type(exc).__name__}: {reason})", str(path))


def load(path, flag: str, trust: bool = False, map_location="cpu"):
    """torch.load of one checkpoint file, weights-only with DeepSpeed's classes unless ``trust``."""
    with guarded_loads(flag, trust):
        return torch.load(path, map_location=map_location, weights_only=not trust)


@contextlib.contextmanager
def guarded_loads(flag: str, trust: bool = False) -> Iterator[None]:
    """Inside: every ``torch.load`` (ours, DeepSpeed's engine, zero_to_fp32) is weights-only with
    :func:`allowed_globals` (unless ``trust``) and raises :class:`CheckpointLoadError` naming the file.
    A nested guard (resume inside set-up) applies its own flag until it exits."""
    original = _TORCH_LOAD  # a nested guard replaces the outer one until it exits
    allowed = allowed_globals()

    def guarded(f, *args, **kwargs):
        if not trust:
            kwargs["weights_only"] = True
            kwargs.pop("pickle_module", None)
        try:
            if trust:
                return original(f, *args, **kwargs)
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except CheckpointLoadError:
            raise
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, KeyError,
                AttributeError, TypeError) as e:
            where = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "<stream>")
            raise describe_failure(where, e, flag) from None

    with _lock:
        outer, torch.load = torch.load, guarded
        try:
            yield
        finally:
            torch.load = outer
