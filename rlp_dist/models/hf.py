"""Hugging Face (transformers) checkpoints in and out of the TP/PP-sharded megatron-core backbones.

Supported: ``qwen3`` (Qwen3ForCausalLM -> arch ``transformer``) and ``nemotron_h``
(NemotronHForCausalLM -> arch ``hybrid``; layer types ``linear_attention``/``full_attention``/``mlp``,
no MoE). Each megatron parameter of this rank is described by an :class:`Entry`: the row ranges of
HF tensors it is made of and how tensor parallelism splits it:

    rep   replicated (norm weights, per-head QK-norm)
    col   rows split over TP; a fused weight is the concatenation, per rank, of each piece's slice:
          SwiGLU fc1 = [gate_r; up_r], Mamba in_proj = [z_r; x_r; B_r; C_r; dt_r],
          Mamba conv1d = [x_r; B_r; C_r], and A_log, D, dt_bias, gated-norm weight, vocab rows
    row   columns split over TP (o_proj, down_proj, out_proj)
    qkv   megatron's grouped layout: for each local KV group g, [q heads of g; k_g; v_g]

Import reads only this rank's slices (``safe_open(...).get_slice``), from one ``model.safetensors``,
an index-sharded set, or several ``*.safetensors`` files. Export all-gathers each parameter over TP,
reassembles the HF tensors, and every pipeline stage's TP rank 0 writes its own safetensors shard;
global rank 0 writes the index and ``config.json``. The result loads with
``transformers.AutoModelForCausalLM.from_pretrained``. Vocabulary rows beyond the checkpoint's (added
thought tokens) are filled with the mean embedding on import and kept on export.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from rlp_dist.config.schema import ConfigError, ModelConfig

LAYER_TYPES = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-"}
# released Nemotron-H config.json files predate transformers' names: (current, legacy)
LEGACY = (("n_groups", "mamba_n_groups"), ("conv_kernel", "mamba_d_conv"), ("use_conv_bias", "mamba_conv_bias"),
          ("head_dim", "attention_head_dim"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


# ---- config.json <-> ModelConfig ---------------------------------------------------------------
def read_hf_config(hf_dir: Union[str, pathlib.Path]) -> dict:
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json; pass a transformers checkpoint directory")
    return json.loads(path.read_text())


def _require(cfg: dict, key: str, ok, want: str) -> None:
    if key in cfg and not ok(cfg[key]):
        raise ConfigError(f"HF config {key}={cfg[key]!r} is unsupported: rlp-dist needs {want}")


def model_config_from_hf(hf: Union[str, pathlib.Path, dict], name: Optional[str] = None) -> ModelConfig:
    """The ModelConfig of a transformers ``config.json`` (a directory or the parsed dict)."""
    cfg = hf if isinstance(hf, dict) else read_hf_config(hf)
    name = name or (pathlib.Path(hf).name if not isinstance(hf, dict) else cfg.get("model_type", "hf"))
    mt = cfg.get("model_type")
    common = dict(name=name, hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
                  num_attention_heads=cfg["num_attention_heads"],
                  num_query_groups=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                  vocab_size=cfg["vocab_size"], max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                  tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    _require(cfg, "attention_bias", lambda v: not v, "attention_bias=false")
    if mt == "qwen3":
        _require(cfg, "hidden_act", lambda v: v == "silu", "hidden_act='silu' (SwiGLU)")
        _require(cfg, "use_sliding_window", lambda v: not v, "use_sliding_window=false (full attention)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        _require({"rope_type": rope.get("rope_type", "default")}, "rope_type", lambda v: v == "default",
                 "plain RoPE (rope_type 'default'); scaled RoPE variants are not implemented")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        return ModelConfig(arch="transformer", num_layers=cfg["num_hidden_layers"], kv_channels=head_dim,
                           position_embedding="rope", rope_base=float(theta), norm_eps=cfg.get("rms_norm_eps", 1e-6),
                           qk_layernorm=True, activation="swiglu", **common)
    if mt == "nemotron_h":
        cfg = {**{old: None for _, old in LEGACY}, **cfg}
        cfg.update({new: cfg[old] for new, old in LEGACY if new not in cfg and cfg[old] is not None})
        head_dim = cfg.get("head_dim") or head_dim
        types = cfg.get("layers_block_type") or cfg.get("layer_types")
        if not types and cfg.get("hybrid_override_pattern"):  # released checkpoints: "M-M*-..."
            types = [{"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}.get(c, c)
                     for c in cfg["hybrid_override_pattern"]]
        if not types:
            raise ConfigError("HF config has neither layers_block_type nor hybrid_override_pattern; "
                              "it is not a Nemotron-H config")
        bad = sorted({t for t in types if t not in LAYER_TYPES})
        if bad:
            raise ConfigError(f"HF config layers_block_type has {bad}: only linear_attention (Mamba2), "
                              f"full_attention and mlp layers are supported (no MoE)")
        for key, want in (("use_bias", False), ("mlp_bias", False), ("mamba_proj_bias", False),
                          ("use_conv_bias", True), ("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
            _require(cfg, key, lambda v, w=want: v == w, f"{key}={want!r}")
        pattern = "".join(LAYER_TYPES[t] for t in types)
        return ModelConfig(arch="hybrid", num_layers=len(pattern), hybrid_pattern=pattern, kv_channels=head_dim,
                           position_embedding="none", norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                           qk_layernorm=False, activation="squared_relu",
                           mamba_num_heads=cfg["mamba_num_heads"], mamba_head_dim=cfg["mamba_head_dim"],
                           mamba_state_dim=cfg["ssm_state_size"], mamba_num_groups=cfg["n_groups"],
                           mamba_conv_kernel=cfg.get("conv_kernel", 4), **common)
    raise ConfigError(f"HF config model_type={mt!r} is unsupported; rlp-dist imports 'qwen3' and 'nemotron_h'")


def hf_config_from_model_config(mcfg: ModelConfig, base: Optional[dict] = None) -> dict:
    """A transformers config.json dict for ``mcfg`` (over ``base``, e.g. the imported checkpoint's)."""
    out = dict(base or {})
    common = dict(hidden_size=mcfg.hidden_size, intermediate_size=mcfg.ffn_hidden_size,
                  num_attention_heads=mcfg.num_attention_heads, num_key_value_heads=mcfg.num_query_groups,
                  head_dim=mcfg.kv_channels, vocab_size=mcfg.vocab_size, attention_bias=False,
                  max_position_embeddings=mcfg.max_position_embeddings, tie_word_embeddings=mcfg.tie_embeddings)
    if mcfg.arch == "transformer":
        out.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", num_hidden_layers=mcfg.num_layers,
                   rms_norm_eps=mcfg.norm_eps, hidden_act="silu",
                   rope_parameters={"rope_type": "default", "rope_theta": mcfg.rope_base}, **common)
        out.pop("rope_scaling", None)
        out.pop("rope_theta", None)
    else:
        inv = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
        out.update(architectures=["NemotronHForCausalLM"], model_type="nemotron_h",
                   layers_block_type=[inv[c] for c in mcfg.hybrid_pattern], layer_norm_epsilon=mcfg.norm_eps,
                   mamba_num_heads=mcfg.mamba_num_heads, mamba_head_dim=mcfg.mamba_head_dim,
                   ssm_state_size=mcfg.mamba_state_dim, n_groups=mcfg.mamba_num_groups,
                   conv_kernel=mcfg.mamba_conv_kernel, use_conv_bias=True, use_bias=False, mlp_bias=False,
                   mlp_hidden_act="relu2", mamba_hidden_act="silu", **common)
        out.pop("hybrid_override_pattern", None)
        out.pop("num_hidden_layers", None)
    out.setdefault("dtype", "float32")
    return out


# ---- parameter <-> HF tensor map ----------------------------------------------------------------
@dataclass
class Piece:
    """Rows [start, start + length) of HF tensor ``key`` (length None: all rows)."""

    key: str
    start: int = 0
    length: Optional[int] = None


@dataclass
class Entry:
    mkey: str  # this rank's megatron state-dict key
    split: str  # rep | col | row | qkv
    pieces: list[Piece] = field(default_factory=list)
    vocab: bool = False  # vocabulary rows: may be grown beyond the checkpoint's


def _ranks() -> tuple[int, int, Any]:
    """(tp_rank, tp_size, tp_group) of megatron's layout (set up by rlp_dist.distributed)."""
    from rlp_dist.distributed.parallel import megatron_layout

    layout = megatron_layout()
    return layout.tp_rank, layout.tp, layout.tp_group


def _attention_entries(m: str, h: str, mcfg: ModelConfig, q_norm: bool) -> list[Entry]:
    out = [Entry(f"{m}.self_attention.linear_qkv.weight", "qkv",
                 [Piece(f"{h}.q_proj.weight"), Piece(f"{h}.k_proj.weight"), Piece(f"{h}.v_proj.weight")]),
           Entry(f"{m}.self_attention.linear_proj.weight", "row", [Piece(f"{h}.o_proj.weight")])]
    if q_norm:
        out += [Entry(f"{m}.self_attention.q_layernorm.weight", "rep", [Piece(f"{h}.q_norm.weight")]),
                Entry(f"{m}.self_attention.k_layernorm.weight", "rep", [Piece(f"{h}.k_norm.weight")])]
    return out


def _mamba_entries(m: str, h: str, mcfg: ModelConfig) -> list[Entry]:
    d_inner = mcfg.mamba_num_heads * mcfg.mamba_head_dim
    gn = mcfg.mamba_num_groups * mcfg.mamba_state_dim
    in_sizes = [d_inner, d_inner, gn, gn, mcfg.mamba_num_heads]  # z, x, B, C, dt
    starts = [sum(in_sizes[:i]) for i in range(len(in_sizes))]
    return [
        Entry(f"{m}.mixer.in_proj.weight", "col",
              [Piece(f"{h}.in_proj.weight", s, n) for s, n in zip(starts, in_sizes)]),
        *[Entry(f"{m}.mixer.conv1d.{w}", "col",
                [Piece(f"{h}.conv1d.{w}", s, n) for s, n in zip([0, d_inner, d_inner + gn], in_sizes[1:4])])
          for w in ("weight", "bias")],
        *[Entry(f"{m}.mixer.{p}", "col", [Piece(f"{h}.{p}")]) for p in ("A_log", "D", "dt_bias", "norm.weight")],
        Entry(f"{m}.mixer.out_proj.weight", "row", [Piece(f"{h}.out_proj.weight")]),
    ]


def entries(model: torch.nn.Module, mcfg: ModelConfig, hf_prefix: Optional[str] = None) -> list[Entry]:
    """The HF source of every parameter this rank holds (its pipeline stage, its TP shard)."""
    hybrid = mcfg.arch == "hybrid"
    p = hf_prefix or ("backbone" if hybrid else "model")
    names = set(model.state_dict())
    out: list[Entry] = []
    if "embedding.word_embeddings.weight" in names:
        out.append(Entry("embedding.word_embeddings.weight", "col",
                         [Piece(f"{p}.embeddings.weight" if hybrid else f"{p}.embed_tokens.weight")], vocab=True))
    for i, layer in enumerate(model.decoder.layers):
        g = layer.layer_number - 1  # global layer index (megatron numbers layers across stages)
        m, h = f"decoder.layers.{i}", f"{p}.layers.{g}"
        if not hybrid:
            out += [Entry(f"{m}.input_layernorm.weight", "rep", [Piece(f"{h}.input_layernorm.weight")]),
                    *_attention_entries(m, f"{h}.self_attn", mcfg, mcfg.qk_layernorm),
                    Entry(f"{m}.pre_mlp_layernorm.weight", "rep", [Piece(f"{h}.post_attention_layernorm.weight")]),
                    Entry(f"{m}.mlp.linear_fc1.weight", "col",
                          [Piece(f"{h}.mlp.gate_proj.weight"), Piece(f"{h}.mlp.up_proj.weight")]),
                    Entry(f"{m}.mlp.linear_fc2.weight", "row", [Piece(f"{h}.mlp.down_proj.weight")])]
            continue
        kind = mcfg.hybrid_pattern[g]
        norm = {"M": "norm", "*": "input_layernorm", "-": "pre_mlp_layernorm"}[kind]
        out.append(Entry(f"{m}.{norm}.weight", "rep", [Piece(f"{h}.norm.weight")]))
        if kind == "M":
            out += _mamba_entries(m, f"{h}.mixer", mcfg)
        elif kind == "*":
            out += _attention_entries(m, f"{h}.mixer", mcfg, False)
        else:
            out += [Entry(f"{m}.mlp.linear_fc1.weight", "col", [Piece(f"{h}.mixer.up_proj.weight")]),
                    Entry(f"{m}.mlp.linear_fc2.weight", "row", [Piece(f"{h}.mixer.down_proj.weight")])]
    for final in ("decoder.final_norm.weight", "decoder.final_layernorm.weight"):
        if final in names:
            out.append(Entry(final, "rep", [Piece(f"{p}.norm_f.weight" if hybrid else f"{p}.norm.weight")]))
    if "output_layer.weight" in names:  # absent when tied on a single stage
        out.append(Entry("output_layer.weight", "col", [Piece("lm_head.weight")], vocab=True))
    missing = names - {e.mkey for e in out} - {n for n in names if n.endswith("_extra_state")}
    if missing:
        raise RuntimeError(f"hf.entries: no HF mapping for {sorted(missing)[:4]}; the {mcfg.arch} "
                           f"layer spec changed without updating rlp_dist/models/hf.py")
    return out


# ---- reading ------------------------------------------------------------------------------------
class SafetensorsReader:
    """Lazy access to the tensors of a transformers directory; reads only the requested slices."""

    def __init__(self, hf_dir: Union[str, pathlib.Path]):
        from safetensors import safe_open

        self.dir = pathlib.Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: self.dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{hf_dir}: no *.safetensors files (pytorch_model.bin is not read); "
                                        f"re-save the model with save_pretrained(safe_serialization=True)")
            self.where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self.where.update({k: f for k in h.keys()})
        self._open = safe_open
        self._handles: dict[pathlib.Path, Any] = {}

    def has(self, key: str) -> bool:
        return key in self.where

    def _slice(self, key: str):
        if key not in self.where:
            raise KeyError(f"{self.dir}: checkpoint has no tensor {key!r}; it is not a checkpoint of this "
                           f"architecture/preset (derive the preset with rlp_dist.models.hf.model_config_from_hf)")
        f = self.where[key]
        if f not in self._handles:
            self._handles[f] = self._open(str(f), framework="pt")
        return self._handles[f].get_slice(key)

    def shape(self, key: str) -> list[int]:
        return list(self._slice(key).get_shape())

    def rows(self, key: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        sl = self._slice(key)
        return sl[start:sl.get_shape()[0] if stop is None else stop]

    def cols(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._slice(key)[:, start:stop]


def _hf_prefix(reader: SafetensorsReader, mcfg: ModelConfig) -> str:
    if mcfg.arch == "hybrid" and any(k.startswith("backbone.") for k in reader.where):
        return "backbone"  # released Nemotron-H checkpoints; transformers 5 itself names it model.
    return "model"


def _even(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ConfigError(f"{what}: {n} does not split over tensor parallel size {tp}; use a tp dividing {n}")
    return n // tp


def _grow_vocab(full: torch.Tensor, rows: int, key: str) -> torch.Tensor:
    if full.shape[0] > rows:
        raise ConfigError(f"{key} has {full.shape[0]} vocabulary rows, the model only {rows}; set "
                          f"model.vocab_size >= {full.shape[0]}")
    extra = full.mean(0, keepdim=True).expand(rows - full.shape[0], *full.shape[1:])
    return torch.cat([full, extra], 0)


def _read_local(reader: SafetensorsReader, e: Entry, mcfg: ModelConfig, param: torch.Tensor,
                tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of entry ``e``, assembled from the HF tensors."""
    if e.split == "rep":
        return reader.rows(e.pieces[0].key)
    if e.split == "row":
        n = _even(reader.shape(e.pieces[0].key)[1], tp, e.pieces[0].key)
        return reader.cols(e.pieces[0].key, tp_rank * n, (tp_rank + 1) * n)
    if e.split == "qkv":
        q, k, v = (pc.key for pc in e.pieces)
        ng, hd = mcfg.num_query_groups, mcfg.kv_channels
        per = mcfg.num_attention_heads // ng * hd  # query rows per KV group
        blocks = []
        for g in range(tp_rank * _even(ng, tp, "num_key_value_heads"), (tp_rank + 1) * (ng // tp)):
            blocks += [reader.rows(q, g * per, (g + 1) * per), reader.rows(k, g * hd, (g + 1) * hd),
                       reader.rows(v, g * hd, (g + 1) * hd)]
        return torch.cat(blocks, 0)  # (ng/tp * (np/ng + 2) * hd, H)
    if e.vocab:
        full = _grow_vocab(reader.rows(e.pieces[0].key), param.shape[0] * tp, e.pieces[0].key)
        return full.chunk(tp, 0)[tp_rank]
    parts = []
    for pc in e.pieces:
        n = pc.length if pc.length is not None else reader.shape(pc.key)[0]
        c = _even(n, tp, pc.key)
        parts.append(reader.rows(pc.key, pc.start + tp_rank * c, pc.start + (tp_rank + 1) * c))
    return torch.cat(parts, 0)


def local_tensors(model: torch.nn.Module, hf_dir: Union[str, pathlib.Path], mcfg: ModelConfig):
    """Yield (megatron key, tensor) for this rank's shard, read from a transformers checkpoint.

    ``model`` only supplies names and shapes (it may live on the meta device). Raises ConfigError
    when the checkpoint's architecture differs from ``mcfg`` and ValueError naming the tensor on a
    shape mismatch."""
    _check_matches(model_config_from_hf(hf_dir), mcfg, hf_dir)
    reader = SafetensorsReader(hf_dir)
    tp_rank, tp, _ = _ranks()
    prefix = _hf_prefix(reader, mcfg)
    params = model.state_dict(keep_vars=True)
    embed_key = f"{prefix}.embeddings.weight" if mcfg.arch == "hybrid" else f"{prefix}.embed_tokens.weight"
    for e in entries(model, mcfg, prefix):
        if e.mkey == "output_layer.weight" and not reader.has("lm_head.weight"):
            if not mcfg.tie_embeddings:
                raise ValueError(f"{hf_dir}: no lm_head.weight but model.tie_embeddings=false; "
                                 f"set model.tie_embeddings=true or use an untied checkpoint")
            e = Entry(e.mkey, "col", [Piece(embed_key)], vocab=True)  # tied, last stage of PP > 1
        p = params[e.mkey]
        t = _read_local(reader, e, mcfg, p, tp_rank, tp)
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{hf_dir}: {'+'.join(sorted({pc.key for pc in e.pieces}))} gives shape "
                             f"{tuple(t.shape)} for {e.mkey} (tp rank {tp_rank}/{tp}), the model needs "
                             f"{tuple(p.shape)}; the checkpoint does not match preset {mcfg.name!r}")
        yield e.mkey, t


def load_into(model: torch.nn.Module, hf_dir: Union[str, pathlib.Path], mcfg: ModelConfig) -> None:
    """Copy a transformers checkpoint into this rank's TP/PP shard of ``model`` (built from ``mcfg``)."""
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, t in local_tensors(model, hf_dir, mcfg):
            params[key].copy_(t.to(params[key].dtype))


def _check_matches(src: ModelConfig, mcfg: ModelConfig, hf_dir) -> None:
    fields = ["arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "qk_layernorm", "activation", "tie_embeddings", "position_embedding", "norm_eps"]
    if mcfg.arch == "transformer":
        fields.append("rope_base")
    else:
        fields += ["hybrid_pattern", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups",
                   "mamba_conv_kernel"]
    for f in fields:
        a, b = getattr(src, f), getattr(mcfg, f)
        if a != b and not (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-9)):
            raise ConfigError(f"model.{f}={b!r} but {hf_dir}/config.json has {a!r}; use the checkpoint's "
                              f"value (rlp_dist.models.hf.model_config_from_hf derives the whole preset)")
    if mcfg.vocab_size < src.vocab_size:
        raise ConfigError(f"model.vocab_size={mcfg.vocab_size} is smaller than the checkpoint's "
                          f"{src.vocab_size}; use at least {src.vocab_size}")


# ---- writing ------------------------------------------------------------------------------------
def _gather_tp(t: torch.Tensor, tp: int, group) -> list[torch.Tensor]:
    if tp == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(out, t.contiguous(), group=group)  # every TP rank holds an equal-shaped shard
    return out


def _assemble(e: Entry, shards: list[torch.Tensor], mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full HF tensors of entry ``e`` from its TP shards (rank order)."""
    if e.split == "rep":
        return {e.pieces[0].key: shards[0]}
    if e.split == "row":
        return {e.pieces[0].key: torch.cat(shards, 1)}
    if e.split == "qkv":
        hd, per = mcfg.kv_channels, mcfg.num_attention_heads // mcfg.num_query_groups * mcfg.kv_channels
        q, k, v = [], [], []
        for s in shards:
            for blk in s.split(per + 2 * hd, 0):  # one KV group: [q heads; k; v]
                q.append(blk[:per]), k.append(blk[per:per + hd]), v.append(blk[per + hd:])
        return {pc.key: torch.cat(x, 0) for pc, x in zip(e.pieces, (q, k, v))}
    tp = len(shards)
    local = shards[0].shape[0]
    sizes = [pc.length // tp if pc.length is not None else local // len(e.pieces) for pc in e.pieces]
    per_piece = [torch.cat([s.split(sizes, 0)[i] for s in shards], 0) for i in range(len(e.pieces))]
    out: dict[str, list[torch.Tensor]] = {}
    for pc, t in zip(e.pieces, per_piece):  # pieces of one key are consecutive row ranges, in order
        out.setdefault(pc.key, []).append(t)
    return {k: torch.cat(v, 0) for k, v in out.items()}


def hf_state_dict(model: torch.nn.Module, mcfg: ModelConfig, dtype: Optional[torch.dtype] = None,
                  prefix: Optional[str] = None, local: Optional[dict[str, torch.Tensor]] = None
                  ) -> dict[str, torch.Tensor]:
    """The HF tensors of this pipeline stage (collective over the TP group: call on every TP rank).

    ``local`` maps megatron keys to tensors shaped like the parameters (e.g. their gradients) to
    assemble instead of the parameters themselves."""
    _, tp, group = _ranks()
    params = model.state_dict() if local is None else local
    out: dict[str, torch.Tensor] = {}
    for e in entries(model, mcfg, prefix):
        if e.mkey == "output_layer.weight" and mcfg.tie_embeddings:
            continue  # the tied copy on the last stage: the first stage writes the embedding
        for k, t in _assemble(e, _gather_tp(params[e.mkey].detach(), tp, group), mcfg).items():
            out[k] = t.to(dtype or t.dtype).contiguous()
    return out


def export(model: torch.nn.Module, mcfg: ModelConfig, out_dir: Union[str, pathlib.Path],
           base_config: Optional[dict] = None, dtype: Optional[torch.dtype] = None,
           tokenizer_from: Optional[Union[str, pathlib.Path]] = None) -> pathlib.Path:
    """Write this (sharded) model as a transformers checkpoint directory. Call on every rank.

    Each pipeline stage's TP rank 0 (of DP replica 0) writes ``model-XXXXX-of-YYYYY.safetensors`` (``model.safetensors``
    without PP); global rank 0 writes the index, ``config.json`` and copies tokenizer files."""
    from safetensors.torch import save_file

    from rlp_dist.distributed.parallel import megatron_layout

    out = pathlib.Path(out_dir)
    hybrid = mcfg.arch == "hybrid"
    tensors = hf_state_dict(model, mcfg, dtype, prefix="backbone" if hybrid else "model")
    tp_rank, _, _ = _ranks()
    layout = megatron_layout()
    pp, pp_rank = layout.pp, layout.pp_rank
    writer = tp_rank == 0 and layout.dp_rank == 0
    fname = "model.safetensors" if pp == 1 else f"model-{pp_rank + 1:05d}-of-{pp:05d}.safetensors"
    if writer:  # one writer per stage: TP rank 0 of data-parallel replica 0
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
    keys = {fname: sorted(tensors) if writer else []}
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, keys)
    else:
        gathered = [keys]
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg = hf_config_from_model_config(mcfg, base_config)
        if dtype is not None:
            cfg["dtype"] = str(dtype).replace("torch.", "")
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if pp > 1:
            weight_map = {k: f for g in gathered for f, ks in g.items() for k in ks}
            (out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                src = pathlib.Path(tokenizer_from) / name
                if src.is_file():
                    shutil.copy(src, out / name)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return out
