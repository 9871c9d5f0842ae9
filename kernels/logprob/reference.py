"""Fused output projection + tempered log-softmax + target gather, chunked over tokens and vocab-parallel.

For final-norm hidden states h (N, H), this TP rank's output-layer slice W (V_local, H) (rank r of the TP
group owns global ids [r*V_local, (r+1)*V_local)), temperature T and targets y (N,):

    z = h @ W^T                              in the input dtype (bf16 model -> bf16 logits, as megatron's
                                             output layer makes them), one chunk of C rows at a time
    m_r = max_v z_rv / T                     per rank, then one MAX all-reduce -> M
    S   = sum_ranks e^{m_r - M} sum_v e^{z_v/T - m_r}                  } one SUM all-reduce of an (N, 3)
    t   = z_y / T from the rank that owns y (0 elsewhere)              } tensor for the whole call
    A   = sum_ranks e^{m_r - M} (a_r + (m_r - M) s_r),  a_r = sum_v e^{z_v/T - m_r}(z_v/T - m_r)   }
    lse = M + log S;   logp = t - lse;   entropy = log S - A / S  (= -sum_v p_v log p_v, detached)

all softmax statistics in fp32. Backward (:class:`LinearLogprob`) saves h, W, y, valid and lse (N,) fp32
only and recomputes the logits a chunk at a time:

    grad_z = (g / T) (onehot(y) - e^{z/T - lse})      cast to the input dtype
    grad_h = grad_z @ W, SUM all-reduced over the TP group (this op *is* megatron's column-parallel output
             layer: its copy_to_tensor_model_parallel_region does that all-reduce)
    grad_W = grad_z^T @ h

Chunks are C rows x all V_local ids (grad_h rows written once, grad_W summed over chunks in fp32, cast at
the end) or, when V_local > N > C (:func:`vocab_major`: TP=1 or 2 at the paper's N=32768), blocks of
all N rows x B ids with B*N = C*V_local (grad_W rows written once by one GEMM over N, grad_h summed over
blocks in fp32): the running sum is always the smaller of the two gradients.

Memory. The naive path materialises (N, V_local) logits and their fp32 copies: at G=16, L=2048 (N=32768
thought tokens) and V=151936 the fp32 logits alone are 32768 * 151936 * 4 B = 20 GB per TP=1 rank, before
the bf16 copy, exp(), and their gradient. Here the extra memory is O(chunk_tokens x V_local): the default
chunk (:func:`default_chunk_tokens`) keeps one fp32 chunk of logits at ~256 MB whatever V_local is. Buffers
are allocated once per call and reused by every chunk: the logits chunk in the input dtype, plus (this
PyTorch path only) an fp32 copy when the input is bf16 and one more fp32 buffer for the entropy: at
V_local=151936 fp32 263 MB without entropy, bf16 394 MB (+263 MB with entropy); the Triton path
(triton.py) only the logits chunk. The accumulated gradient of bf16 inputs needs an fp32 sum and one bf16
partial product of its size (6 B per element: grad_h at N=32768, H=2048 0.4 GB; grad_W at V_local=151936
1.9 GB, used only when N >= V_local); fp32 inputs accumulate straight into the gradient.

Rows with valid=False get logp = entropy = 0 and no gradient; their targets may be any value (they are
never used as an index). Their hidden states must be finite (they still go through the matmul: skipping
them would need their count on the host, a device sync). Targets of valid rows must lie in [0, V).

Collectives per call: forward one MAX (N,) and one SUM (N, 2) all-reduce ((N, 3) with the entropy);
backward one SUM (N, H) all-reduce of grad_h (in fp32 for bf16 inputs). The vocabulary is never gathered.

:func:`linear_logprob` is the reference (CPU) implementation; :func:`naive_linear_logprob` is the
full-logits computation it must equal, kept for tests and benchmarks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# One fp32 chunk of logits is chunk_tokens * V_local * 4 B. 256 MiB / (151936 * 4 B) = 441.7 -> 432 rows
# (rounded down to a multiple of 16 for the tensor cores): 432 * 151936 * 4 B = 263 MB at TP=1; at TP=8
# (V_local = 18992) the same budget gives 3520 rows.
CHUNK_BYTES = 256 * 2**20


def default_chunk_tokens(v_local: int) -> int:
    rows = CHUNK_BYTES // (4 * max(v_local, 1))
    return max(16, rows // 16 * 16)


def _tp(group) -> tuple[int, int]:
    """(size, rank) of the TP group; (1, 0) without one."""
    if group is None or dist.get_world_size(group) == 1:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# ---- per-chunk kernels (triton.py provides the same two; they ignore the workspace) ---------------------
class Workspace:
    """Flat fp32 buffers of one chunk's size, reused by every chunk of one call, allocated on first use. (A
    fresh chunk-sized tensor per chunk page-faults on CPU: measured 0.14 s per 263 MB, as long as two exp
    passes.)"""

    def __init__(self, numel: int, device):
        self.numel, self.device, self.bufs = numel, device, {}

    def get(self, k: int, shape) -> torch.Tensor:
        if k not in self.bufs:
            self.bufs[k] = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        return self.bufs[k][:shape[0] * shape[1]].view(shape)  # (C, V) of this chunk


def _fp32(z: torch.Tensor, work: Workspace) -> torch.Tensor:
    """z itself when fp32 (then overwritten), else its fp32 copy in the workspace's first buffer."""
    return z if z.dtype == torch.float32 else work.get(0, z.shape).copy_(z)


def chunk_stats(z: torch.Tensor, local: torch.Tensor, temperature: float, entropy: bool, work: Workspace):
    """Softmax statistics of one chunk of logits, in fp32. May overwrite z (a buffer of the caller).

    z: (C, V_local) logits in the input dtype; local: (C,) int64 target index in this slice, -1 where this
    rank does not own the target (or the row is not valid). Returns (m, s, t, a), each (C,) fp32:
    m = max_v z_v/T, s = sum_v e^{z_v/T - m}, t = z_local/T (0 where local < 0),
    a = sum_v e^{z_v/T - m}(z_v/T - m) (None unless entropy).
    """
    zf = _fp32(z, work)  # (C, V_local) fp32
    if temperature != 1.0:
        zf.div_(temperature)
    m = zf.amax(dim=-1)  # (C,)
    owned = local >= 0
    t = zf.gather(-1, local.clamp(min=0)[:, None]).squeeze(-1)
    t = torch.where(owned, t, torch.zeros_like(t))
    zf.sub_(m[:, None])
    if not entropy:
        return m, zf.exp_().sum(dim=-1), t, None
    e = torch.exp(zf, out=work.get(1, zf.shape))  # (C, V_local): entropy needs z/T - m and its exp
    s = e.sum(dim=-1)
    return m, s, t, e.mul_(zf).sum(dim=-1)


def chunk_grad_logits(z: torch.Tensor, lse: torch.Tensor, local: torch.Tensor, scale: torch.Tensor,
                      temperature: float, work: Workspace) -> torch.Tensor:
    """grad of sum_r g_r logp_r with respect to one chunk's logits z: scale (onehot - e^{z/T - lse}).

    z: (C, V_local) input dtype, overwritten with the result; lse, scale (= g/T, 0 on rows that are not
    valid): (C,) fp32; local: (C,) as in :func:`chunk_stats`. Returns z.
    """
    p = _fp32(z, work)  # (C, V_local) fp32
    if temperature != 1.0:
        p.div_(temperature)
    p.sub_(lse[:, None]).exp_().mul_(-scale[:, None])  # -scale * softmax
    owned = local >= 0
    p.scatter_add_(1, local.clamp(min=0)[:, None], torch.where(owned, scale, torch.zeros_like(scale))[:, None])
    return z if p is z else z.copy_(p)  # rounded to the input dtype, as autograd through .float() does


TORCH_OPS = (chunk_stats, chunk_grad_logits)


# ---- the fused op --------------------------------------------------------------------------------------
def _local_targets(targets, valid, rank, v_local):
    """(N,) index of the target in this rank's slice, -1 where it is not owned or the row is not valid."""
    local = targets - rank * v_local
    owned = (local >= 0) & (local < v_local)
    if valid is not None:
        owned &= valid
    return torch.where(owned, local, torch.full_like(local, -1))


class _Chunks:
    """One flat logits buffer in the input dtype and an fp32 workspace, both of ``numel`` elements, reused
    by every chunk; ``logits(a, b)`` = a @ b.T written into the buffer, as an (a rows, b rows) view."""

    def __init__(self, numel, weight):
        self.buf = torch.empty(numel, dtype=weight.dtype, device=weight.device)
        self.work = Workspace(numel, weight.device)

    def logits(self, a, b):
        return torch.mm(a, b.t(), out=self.buf[:a.shape[0] * b.shape[0]].view(a.shape[0], b.shape[0]))


def vocab_major(n: int, v_local: int, chunk: int) -> bool:
    """Backward loops over vocabulary blocks (all N rows each) instead of token chunks when the weight
    gradient is the larger of the two to accumulate: then each (V_block, H) slice of grad_W is one GEMM over
    all N rows, written once, and only grad_h (N, H) accumulates (in fp32). At N=32768, H=2048, V_local=
    151936 that moves the running sum from 1.24 GB (fp32 grad_W, read and written per chunk: 76 chunks) to
    268 MB (fp32 grad_h, 74 blocks of 2048 ids)."""
    return n > chunk and v_local > n


class LinearLogprob(torch.autograd.Function):
    """(hidden, weight) -> logp (N,) fp32 [, entropy (N,) fp32 detached]; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, valid, temperature, tp_group, chunk, return_entropy, ops):
        stats_fn, _ = ops
        tp, rank = _tp(tp_group)
        n = hidden.shape[0]
        local = _local_targets(targets, valid, rank, weight.shape[0])
        dev = hidden.device
        m, s, t = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(3))
        a = torch.empty(n, dtype=torch.float32, device=dev) if return_entropy else None
        bufs = _Chunks(min(chunk, n) * weight.shape[0], weight)
        for i in range(0, n, chunk):
            z = bufs.logits(hidden[i:i + chunk], weight)  # (C, V_local) logits, input dtype
            mc, sc, tc, ac = stats_fn(z, local[i:i + chunk], temperature, return_entropy, bufs.work)
            m[i:i + chunk], s[i:i + chunk], t[i:i + chunk] = mc, sc, tc
            if return_entropy:
                a[i:i + chunk] = ac
        del bufs
        if tp > 1:
            # Two all-reduces of (N,)-sized vectors for the whole call, not per chunk.
            m_glob = m.clone()
            dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=tp_group)
            shift = m - m_glob  # (N,) <= 0
            rescale = torch.exp(shift)
            parts = [s * rescale, t] + ([(a + shift * s) * rescale] if return_entropy else [])
            packed = torch.stack(parts, dim=1)  # (N, 2 or 3): the target logit rides with the sum-exp
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
            s, t = packed[:, 0], packed[:, 1]
            a = packed[:, 2] if return_entropy else None
            m = m_glob
        log_s = torch.log(s)
        lse = m + log_s  # (N,) fp32 log-normaliser: all that backward keeps besides the inputs
        logp = t - lse
        if valid is not None:
            logp = torch.where(valid, logp, torch.zeros_like(logp))
        ctx.save_for_backward(hidden, weight, targets, valid, lse)
        ctx.cfg = (temperature, tp_group, chunk, ops)
        if not return_entropy:
            return logp
        ent = log_s - a / s
        if valid is not None:
            ent = torch.where(valid, ent, torch.zeros_like(ent))
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, *unused):
        hidden, weight, targets, valid, lse = ctx.saved_tensors
        temperature, tp_group, chunk, (_, grad_fn) = ctx.cfg
        need = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tp, rank = _tp(tp_group)
        local = _local_targets(targets, valid, rank, weight.shape[0])
        scale = grad_logp.float() / temperature  # (N,): d logp / d (z/T) -> d / dz
        if valid is not None:
            scale = torch.where(valid, scale, torch.zeros_like(scale))
        args = (hidden, weight, lse, local, scale, temperature, chunk, grad_fn, need, tp > 1)
        if vocab_major(hidden.shape[0], weight.shape[0], chunk):
            gh, gw = _backward_vocab_major(*args)
        else:
            gh, gw = _backward_token_major(*args)
        if need[0] and tp > 1:
            dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=tp_group)
        return (gh.to(hidden.dtype) if need[0] else None), gw, None, None, None, None, None, None, None


def _backward_token_major(hidden, weight, lse, local, scale, temperature, chunk, grad_fn, need, summed):
    """Chunks of C rows: grad_h rows written once per chunk; grad_W accumulated over chunks in fp32.
    Returns grad_h (N, H) (fp32 when ``summed`` over TP ranks and the input is not; cast by the caller) and
    grad_W (V_local, H) in the input dtype."""
    n, dtype = hidden.shape[0], hidden.dtype
    gh = torch.empty(n, hidden.shape[1], dtype=torch.float32 if summed else dtype,
                     device=hidden.device) if need[0] else None  # (N, H)
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
    # (V_local, H) partial product in the input dtype, when that is not fp32; holds the result at the end
    wbuf = torch.empty_like(weight) if need[1] and dtype != torch.float32 else None
    bufs = _Chunks(min(chunk, n) * weight.shape[0], weight)
    for i in range(0, n, chunk):
        h_c = hidden[i:i + chunk]  # (C, H), a view
        z = bufs.logits(h_c, weight)  # (C, V_local): recomputed, never saved
        gz = grad_fn(z, lse[i:i + chunk], local[i:i + chunk], scale[i:i + chunk], temperature, bufs.work)
        if need[0]:
            if gh.dtype == dtype:
                torch.mm(gz, weight, out=gh[i:i + chunk])
            else:
                gh[i:i + chunk] = gz @ weight
        if need[1]:
            if wbuf is None:
                gw.addmm_(gz.t(), h_c)
            else:
                gw.add_(torch.mm(gz.t(), h_c, out=wbuf))
    if need[1] and wbuf is not None:
        gw = wbuf.copy_(gw)  # cast once, into the partial-product buffer
    return gh, gw


def _backward_vocab_major(hidden, weight, lse, local, scale, temperature, chunk, grad_fn, need, summed):
    """Blocks of B vocabulary ids, all N rows each (B * N ~ chunk * V_local elements, the same workspace as a
    token chunk): grad_W rows written once per block by one GEMM over all N rows; grad_h accumulated over
    blocks in fp32. Same returns as :func:`_backward_token_major`."""
    n, v_local, dtype = hidden.shape[0], weight.shape[0], hidden.dtype
    block = max(1, chunk * v_local // n)
    h = hidden.contiguous()  # (N, H): read by every block's GEMMs
    gh = torch.zeros(n, h.shape[1], dtype=torch.float32, device=h.device) if need[0] else None  # (N, H)
    hbuf = torch.empty_like(h) if need[0] and dtype != torch.float32 else None  # partial product (N, H)
    gw = torch.empty_like(weight) if need[1] else None
    bufs = _Chunks(n * min(block, v_local), weight)
    for v0 in range(0, v_local, block):
        w_b = weight[v0:v0 + block]  # (B, H), a view
        z = bufs.logits(h, w_b)  # (N, B): recomputed, never saved
        loc = local - v0
        loc = torch.where((loc >= 0) & (loc < w_b.shape[0]), loc, torch.full_like(loc, -1))  # (N,) in block
        gz = grad_fn(z, lse, loc, scale, temperature, bufs.work)
        if need[1]:
            torch.mm(gz.t(), h, out=gw[v0:v0 + block])
        if need[0]:
            if hbuf is None:
                gh.addmm_(gz, w_b)
            else:
                gh.add_(torch.mm(gz, w_b, out=hbuf))
    if need[0] and not summed and hbuf is not None:
        gh = hbuf.copy_(gh)  # cast once, into the partial-product buffer
    return gh, gw


def check_inputs(hidden, weight, targets, temperature, valid, chunk_tokens) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logprob: hidden (N, H) and weight (V_local, H) needed, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_logprob: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"linear_logprob: targets must be int64 of shape ({hidden.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if valid is not None and (valid.shape != targets.shape or valid.dtype != torch.bool):
        raise ValueError(f"linear_logprob: valid must be bool of shape {tuple(targets.shape)}, got "
                         f"{valid.dtype} {tuple(valid.shape)}")
    if not temperature > 0:
        raise ValueError(f"linear_logprob: temperature must be > 0, got {temperature}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"linear_logprob: chunk_tokens must be >= 1 (or None for the default), got {chunk_tokens}")


def linear_logprob(hidden, weight, targets, temperature=1.0, tp_group=None, valid=None,
                   return_entropy=False, chunk_tokens=None, ops=TORCH_OPS):
    """log softmax(hidden @ weight.T / temperature)[targets] over the full (TP-sharded) vocabulary.

    hidden (N, H), weight (V_local, H) same dtype; targets (N,) int64 global ids; valid (N,) bool or None.
    Returns logp (N,) fp32, or (logp, entropy) with return_entropy (entropy detached). ``ops`` are the
    per-chunk kernels (:data:`TORCH_OPS` here; triton.py passes its own).
    """
    check_inputs(hidden, weight, targets, temperature, valid, chunk_tokens)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    return LinearLogprob.apply(hidden, weight, targets, valid, float(temperature), tp_group, chunk,
                               bool(return_entropy), ops)


# ---- the naive full-logits computation ----------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    """Identity forward, SUM all-reduce backward: megatron's copy_to_tensor_model_parallel_region, which
    its column-parallel output layer applies to its input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def naive_linear_logprob(hidden, weight, targets, temperature=1.0, tp_group=None, valid=None,
                         return_entropy=False, chunk_tokens=None):
    """The same quantity through full (N, V_local) logits (20 GB fp32 at N=32768, V=151936, TP=1).

    logits = F.linear(hidden, weight) in the input dtype, then fp32 log-softmax: vocab-parallel through
    :func:`rlp_dist.rlp.logprobs.token_logprobs` when ``tp_group`` is given, with megatron's
    column-parallel backward (grad of hidden summed over the group). ``chunk_tokens`` is ignored.
    """
    from rlp_dist.rlp.logprobs import token_logprobs  # rlp_dist imports rlp_kernels, not the reverse, at load

    check_inputs(hidden, weight, targets, temperature, valid, chunk_tokens)
    tp, _ = _tp(tp_group)
    if tp > 1:
        hidden = _CopyToTP.apply(hidden, tp_group)
    logits = F.linear(hidden, weight)  # (N, V_local) input dtype
    safe = targets if valid is None else torch.where(valid, targets, torch.zeros_like(targets))
    logp = token_logprobs(logits, safe, temperature, tp_group if tp > 1 else None)  # (N,) fp32
    if valid is not None:
        logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    with torch.no_grad():
        z = logits.float() / temperature  # (N, V_local) fp32
        m = z.amax(dim=-1)
        if tp > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        z = z - m[:, None]
        e = z.exp()
        sa = torch.stack([e.sum(dim=-1), (e * z).sum(dim=-1)], dim=1)  # (N, 2)
        if tp > 1:
            dist.all_reduce(sa, op=dist.ReduceOp.SUM, group=tp_group)
        ent = torch.log(sa[:, 0]) - sa[:, 1] / sa[:, 0]
        if valid is not None:
            ent = torch.where(valid, ent, torch.zeros_like(ent))
    return logp, ent
