"""The one place where megatron-core's CUDA assumptions are bent for CPU runs.

megatron-core 0.16 hard-codes CUDA in a handful of call sites that our CPU code path reaches
(see ../shared/docs/STACK.md): ``torch.cuda.current_device()`` as a tensor device (rotary
embeddings, KV-cache allocation, tensor-parallel mappings, p2p buffers), ``device="cuda"`` literals
in the pipeline schedules, ``torch.cuda.synchronize`` in p2p communication, and the CUDA RNG
tracker used around attention dropout.

Rather than editing functions, :func:`apply` swaps the module-global name ``torch`` inside exactly
the megatron modules listed in :data:`PATCHED_MODULES` for a thin proxy whose ``cuda`` namespace
answers with the CPU (``current_device() -> cpu``, ``synchronize()`` a no-op, RNG calls on the CPU
generator) and whose tensor factories map ``device="cuda"`` to the CPU. Everything else is the real
``torch``. The RNG tracker's ``fork`` is replaced by a CPU-generator fork.

Rules: applied once at start-up, only when CUDA is absent (``apply()`` is a no-op on a GPU
machine), reversible with :func:`revert` (tests check both ways), and nothing outside this module
patches a third-party library.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any

import torch

# Megatron modules whose module-level ``torch`` is replaced by the CPU proxy.
PATCHED_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.ssm.mamba_mixer",
    "megatron.core.ssm.mamba_block",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
)

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "zeros_like",
              "empty_like", "ones_like")

_state: dict[str, Any] = {"applied": False, "saved": {}}


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int):  # a CUDA ordinal from current_device()
        return "cpu"
    return device


class _CudaShim(types.SimpleNamespace):
    """``torch.cuda`` as seen by patched megatron modules on a CPU machine."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_args: Any, **_kwargs: Any) -> None:
        return None

    @staticmethod
    def get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def is_available() -> bool:
        return False


class _TorchProxy(types.ModuleType):
    """The real ``torch`` module except for ``cuda`` and device-taking factories."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaShim()
        for name in _FACTORIES:
            setattr(self, name, self._wrap_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def _wrap_factory(fn):
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        factory.__name__ = fn.__name__
        return factory


@contextlib.contextmanager
def _cpu_fork(self, name: str = "model-parallel-rng"):
    """CPU replacement for ``CudaRNGStatesTracker.fork``: run under the tracked generator state."""
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    orig = torch.get_rng_state()
    torch.set_rng_state(self.states_[name])
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)


def is_needed() -> bool:
    return not torch.cuda.is_available()


def is_applied() -> bool:
    return _state["applied"]


def apply(force: bool = False) -> bool:
    """Patch megatron-core for CPU. Returns True if patches were applied (False on GPU or if already)."""
    if _state["applied"] or (not force and not is_needed()):
        return False
    proxy = _TorchProxy()
    saved = {}
    for mod_name in PATCHED_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:  # optional pieces (e.g. mamba without its deps) stay unpatched
            continue
        if not hasattr(mod, "torch"):
            continue
        saved[mod_name] = mod.torch
        mod.torch = proxy
    from megatron.core.tensor_parallel import random as mrandom

    saved["tracker_fork"] = mrandom.CudaRNGStatesTracker.fork
    mrandom.CudaRNGStatesTracker.fork = _cpu_fork
    saved["_get_cuda_rng_state"] = mrandom._get_cuda_rng_state
    saved["_set_cuda_rng_state"] = mrandom._set_cuda_rng_state
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _state.update(applied=True, saved=saved)
    return True


def revert() -> None:
    """Undo :func:`apply` (used by tests)."""
    if not _state["applied"]:
        return
    saved = _state["saved"]
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker.fork = saved.pop("tracker_fork")
    mrandom._get_cuda_rng_state = saved.pop("_get_cuda_rng_state")
    mrandom._set_cuda_rng_state = saved.pop("_set_cuda_rng_state")
    for mod_name, original in saved.items():
        importlib.import_module(mod_name).torch = original
    _state.update(applied=False, saved={})
