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

Mamba (hybrid backbones): ``megatron.core.ssm.mamba_mixer`` refuses to build without mamba-ssm and
binds its kernels (chunked SSD scan, causal conv1d and its decode step, gated RMSNorm, single-step
state update) at import. When mamba-ssm did not import there, :func:`apply` rebinds exactly those
module globals (``HAVE_MAMBA_SSM``, ``ExtendedRMSNorm``, ``mamba_chunk_scan_combined``,
``causal_conv1d_fn``, ``causal_conv1d_update``, ``selective_state_update``) to the dispatcher in
``rlp_kernels.dispatch``, which runs the plain-PyTorch references on CPU tensors. Megatron's own
mixer code (projections, splits, TP sharding, the static inference cache) is used unchanged.
Tied embeddings under PP: ``LanguageModule.setup_embeddings_and_output_layer`` moves the shared
weight with ``weight.data.cuda()`` before all-reducing it over the embedding group; the patched method
runs the original with ``Tensor.cuda`` answering the tensor itself for the duration of that call.
That mixer module also imports Triton helpers used only by dynamic-batching inference
(``...attention_context.triton.tensor_ops``); without Triton installed, a stand-in module whose
functions raise a clear error is registered under that name so the mixer imports.

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


class _MambaGatedNorm:  # built lazily: rlp_kernels imports torch-only code, cheap
    cls = None


def _extended_rmsnorm_cls():
    """The gated RMSNorm megatron's mixer builds, with its TP-sharded state dict (weight on dim 0)."""
    if _MambaGatedNorm.cls is None:
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        from rlp_kernels.dispatch import RMSNormGated

        class ExtendedRMSNorm(RMSNormGated):
            def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
                tp_group = getattr(self, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
                return make_sharded_tensors_for_checkpoint(
                    self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
                    tp_group=tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))

        _MambaGatedNorm.cls = ExtendedRMSNorm
    return _MambaGatedNorm.cls


_TRITON_TENSOR_OPS = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"


def _stand_in_triton_tensor_ops(saved: dict) -> None:
    """Without Triton, megatron's mamba_mixer cannot import; give it a module that fails on use."""
    import importlib.util
    import sys

    if _TRITON_TENSOR_OPS in sys.modules or importlib.util.find_spec("triton") is not None:
        return

    def unavailable(*_a, **_k):
        raise NotImplementedError("megatron's dynamic-batching Mamba inference needs Triton and "
                                  "mamba-ssm (GPU); on CPU use a StaticInferenceContext")

    mod = types.ModuleType(_TRITON_TENSOR_OPS)
    for name in ("tensor_get_slice_after", "tensor_masked_update", "tensor_merge"):
        setattr(mod, name, unavailable)
    sys.modules[_TRITON_TENSOR_OPS] = mod
    saved["triton_stand_in"] = True


def _bind_mamba_kernels(saved: dict) -> None:
    """Point megatron's Mamba mixer at our kernel dispatcher when mamba-ssm is absent."""
    try:
        mixer = importlib.import_module("megatron.core.ssm.mamba_mixer")
    except ImportError:
        return
    if mixer.HAVE_MAMBA_SSM:  # mamba-ssm imported: megatron already has the real kernels
        return
    from rlp_kernels import dispatch

    new = {
        "HAVE_MAMBA_SSM": True,
        "ExtendedRMSNorm": _extended_rmsnorm_cls(),
        "mamba_chunk_scan_combined": dispatch.mamba_chunk_scan_combined,
        "selective_state_update": dispatch.selective_state_update,
        "causal_conv1d_fn": dispatch.causal_conv1d_fn,
        "causal_conv1d_update": dispatch.causal_conv1d_update,
    }
    saved["mamba_mixer_globals"] = {k: getattr(mixer, k, None) for k in new}
    for k, v in new.items():
        setattr(mixer, k, v)


def _unbind_mamba_kernels(saved: dict) -> None:
    if saved.pop("triton_stand_in", False):
        import sys

        sys.modules.pop(_TRITON_TENSOR_OPS, None)
    old = saved.pop("mamba_mixer_globals", None)
    if old:
        mixer = importlib.import_module("megatron.core.ssm.mamba_mixer")
        for k, v in old.items():
            setattr(mixer, k, v)


def _patch_embedding_setup(saved: dict) -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t  # CPU: `weight.data.cuda()` stays on the CPU
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    saved["embedding_setup"] = original
    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def bind_mamba_kernels() -> bool:
    """On a GPU machine whose mamba-ssm did not import whole (its CUDA extension is not built: a
    Python-only install carries just the Triton kernels), megatron's mixer refuses to build; point it at
    ``rlp_kernels.dispatch``, which loads mamba-ssm's Triton kernels itself (or runs the references).
    Not a CUDA workaround: on CPU :func:`apply` does the same. Idempotent; True if it bound them now."""
    if _state["applied"] or _state.get("gpu_mamba_bound"):
        return False
    saved: dict = {}
    _bind_mamba_kernels(saved)
    _state["gpu_mamba_bound"] = bool(saved)
    return bool(saved)


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
    _stand_in_triton_tensor_ops(saved)  # before importing megatron's mamba_mixer below
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
    _bind_mamba_kernels(saved)
    _patch_embedding_setup(saved)
    _state.update(applied=True, saved=saved)
    return True


def revert() -> None:
    """Undo :func:`apply` (used by tests)."""
    if not _state["applied"]:
        return
    saved = _state["saved"]
    from megatron.core.tensor_parallel import random as mrandom

    _unbind_mamba_kernels(saved)
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = saved.pop("embedding_setup")
    mrandom.CudaRNGStatesTracker.fork = saved.pop("tracker_fork")
    mrandom._get_cuda_rng_state = saved.pop("_get_cuda_rng_state")
    mrandom._set_cuda_rng_state = saved.pop("_set_cuda_rng_state")
    for mod_name, original in saved.items():
        importlib.import_module(mod_name).torch = original
    _state.update(applied=False, saved={})
