"""Log-probabilities of chosen tokens and sampling, over vocab-parallel logits.

With tensor parallelism the output layer returns each TP rank's slice of the vocabulary
(``(..., V/tp)``). :func:`token_logprobs` computes ``log softmax(logits / T)[target]`` in fp32 without
gathering the vocabulary: a max and a sum-of-exponentials are all-reduced over the TP group
(autograd-aware), and the target logit is taken on the rank that owns it. With ``tp_group=None``
(or a group of one) it is the plain computation.

:func:`sample` draws from full-vocabulary logits; :func:`sample_vocab_parallel` draws the same token (for
the same generator state) from vocab-parallel logits while moving O(N * tp) numbers per call
(O(N * k * tp) with top-k) instead of the (N, V) vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _ReplicatedAllReduce(torch.autograd.Function):
    """Sum over the TP group in forward; identity in backward.

    Every TP rank computes the same loss from the reduced value, so the gradient arriving at each
    rank is already the full gradient with respect to its local contribution. (An autograd all-reduce
    would sum those identical gradients again and scale every gradient by tp.)"""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _all_reduce(x: torch.Tensor, op, group, differentiable: bool) -> torch.Tensor:
    if differentiable:
        assert op == dist.ReduceOp.SUM
        return _ReplicatedAllReduce.apply(x, group)
    x = x.clone()
    dist.all_reduce(x, op=op, group=group)
    return x


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group=None,
) -> torch.Tensor:
    """log p(target) under softmax(logits / temperature), in fp32.

    logits: (..., V_local) this rank's vocabulary slice (V_local = V / tp, rank r owns
    [r*V_local, (r+1)*V_local)); targets: (...) global token ids. Returns (...) fp32.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    tp = _tp_size(tp_group)
    if tp == 1:
        return torch.log_softmax(z, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    grad = z.requires_grad
    v_local = z.shape[-1]
    start = dist.get_rank(tp_group) * v_local
    # The max is a shift for stability only: no gradient needed through it.
    m = _all_reduce(z.detach().amax(dim=-1), dist.ReduceOp.MAX, tp_group, differentiable=False)
    z = z - m.unsqueeze(-1)
    sum_exp = _all_reduce(z.exp().sum(dim=-1), dist.ReduceOp.SUM, tp_group, differentiable=grad)
    local = targets - start
    owned = (local >= 0) & (local < v_local)
    picked = z.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1) * owned
    picked = _all_reduce(picked, dist.ReduceOp.SUM, tp_group, differentiable=grad)
    return picked - torch.log(sum_exp)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits outside the top-k / nucleus (top-p) set with -inf. (N, V) -> (N, V), fp32."""
    z = logits.float()
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        # Stable: tokens tied at the nucleus boundary are kept in vocabulary order (lower id first), so the
        # kept set does not depend on the sort's implementation (sample_vocab_parallel relies on this).
        sorted_z, idx = torch.sort(z, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # keep a token if the mass strictly before it is < top_p (the first token is always kept)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_z = sorted_z.masked_fill(drop, float("-inf"))
        z = torch.full_like(z, float("-inf")).scatter(-1, idx, sorted_z)
    return z


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from full-vocabulary logits (N, V).

    Returns (tokens (N,), logp (N,)). The token is drawn from softmax(logits / T) renormalised over
    the top-k/top-p set; ``logp`` is its log-probability under the *policy* pi_theta, the full
    tempered softmax(logits / T) — the same quantity the training forward computes, so the first
    importance ratio is exactly 1 (top-k/top-p only restrict which tokens can be drawn).

    Drawn by inverse CDF: one uniform per row against the cumulative (unnormalised, filtered)
    probabilities, instead of ``torch.multinomial``'s exponential draw per vocabulary entry (measured
    10x cheaper per decode step on CPU). The CDF is accumulated in float64 so that, at a 150k
    vocabulary, rounding in the running sum cannot shift probability between tokens.
    Memory: a few (N, V) temporaries per call, N = live rows of one micro-batch.
    """
    u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64, device=logits.device)
    return _inverse_cdf(logits.float() / temperature, u, top_k, top_p)


def _inverse_cdf(z: torch.Tensor, u: torch.Tensor, top_k: int, top_p: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample` given its uniforms. z: (N, V) tempered fp32 logits; u: (N, 1) float64 in [0, 1)."""
    m = z.amax(dim=-1, keepdim=True)
    e = torch.exp(z - m)  # (N, V)
    log_total = torch.log(e.sum(dim=-1))  # (N,)
    if top_k or top_p < 1.0:
        e = torch.exp(filter_logits(z, top_k, top_p) - m)  # filtered entries: exp(-inf) = 0
    cdf = e.double().cumsum(dim=-1)  # (N, V)
    tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (N, 1): first cdf > u * mass
    tok = tok.clamp_(max=z.shape[-1] - 1).squeeze(-1)
    logp = z.gather(-1, tok[:, None]).squeeze(-1) - m.squeeze(-1) - log_total
    return tok, logp


def gather_vocab(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """(N, V/tp) vocab-parallel logits -> (N, V) on every TP rank (rank r holds slice r)."""
    if _tp_size(tp_group) == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(_tp_size(tp_group))]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def _gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """(N, c) on each TP rank -> (N, tp, c), index 1 = TP rank."""
    parts = [torch.empty_like(x) for _ in range(_tp_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts, dim=1)


def sample_vocab_parallel(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    tp_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample` over vocab-parallel logits, without gathering the vocabulary.

    logits: (N, V/tp), this rank's slice (rank r of ``tp_group`` owns ids [r*V/tp, (r+1)*V/tp)).
    Returns (tokens (N,) global ids, logp (N,) fp32), the same on every TP rank and the same as
    ``sample(full_logits, temperature, top_k, top_p, generator)``: every TP rank must pass an identically
    seeded generator, and one float64 uniform is drawn per row, as :func:`sample` does, so the two
    samplers can replace each other mid-stream. Tokens agree unless a uniform falls within float64
    rounding (~1e-16 relative) of a CDF boundary; ``logp`` (under the full tempered softmax) to
    float32 rounding (~1e-7 relative: its total mass is summed in a different order).

    - top_k=0, top_p=1 (the paper's recipe): a max all-reduce (N,), an all-gather of each rank's float64
      mass of exp(z/T - max) (N, tp), and a sum all-reduce (N, 2) of the token id and its logit from the
      rank whose slice the uniform falls in (the full CDF lists rank 0's slice first). No host sync.
    - top_k>0: the global top-k lies in the union of the local top-ks: one all-gather of each rank's
      top-k (logits, ids), its next-best logit and its mass (N, tp * (2k + 3)); then every rank runs
      :func:`filter_logits` (top-k, then top-p) and the inverse CDF on that candidate set in vocabulary
      order. In a row where a rank holds more tokens tied with the k-th largest logit than it sent
      (bf16 logits tie often), the kept set is not all among the candidates: such rows gather their
      vocabulary and run :func:`sample`'s computation with the same uniform. Finding them reads their
      count on the host (a device sync), in this mode only.
    - top_p<1 with top_k=0: the nucleus needs the sorted full distribution: the vocabulary is gathered
      ((N, V) per rank) and :func:`sample` is called.
    - tp_group None or of size 1: :func:`sample`.
    """
    tp = _tp_size(tp_group)
    if tp == 1:
        return sample(logits, temperature, top_k, top_p, generator)
    if top_k >= logits.shape[-1] * tp:  # filter_logits applies top-k only when k < V
        top_k = 0
    if top_k > 0:
        return _sample_top_k(logits, temperature, top_k, top_p, generator, tp_group)
    if top_p < 1.0:
        return sample(gather_vocab(logits, tp_group), temperature, top_k, top_p, generator)
    return _sample_tempered(logits, temperature, generator, tp_group)


def _sample_tempered(logits, temperature, generator, tp_group):
    """Inverse CDF of softmax(z / T) over the vocab-parallel slices (see :func:`sample_vocab_parallel`)."""
    tp, rank = _tp_size(tp_group), dist.get_rank(tp_group)
    n, v_local = logits.shape
    z = logits.float() / temperature  # (N, V_local)
    m = _all_reduce(z.amax(dim=-1), dist.ReduceOp.MAX, tp_group, differentiable=False)  # (N,) global max
    cdf = torch.exp(z - m[:, None]).double().cumsum(dim=-1)  # (N, V_local): this slice's CDF, from 0
    masses = _gather_rows(cdf[:, -1:], tp_group).squeeze(-1)  # (N, tp)
    ends = masses.cumsum(dim=-1)  # (N, tp): full-vocabulary CDF at the end of each rank's slice
    starts = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=-1)  # (N, tp)
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64, device=z.device) * ends[:, -1:]  # (N, 1)
    owner = torch.searchsorted(ends, u, right=True).clamp_(max=tp - 1)  # (N, 1): first slice ending > u
    local = torch.searchsorted(cdf, u - starts.gather(-1, owner), right=True)  # (N, 1): first cdf > u
    # u - start can round up to the slice's mass: stay on its last token that has mass.
    local = torch.minimum(local, torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False))
    picked = torch.cat([(local + rank * v_local).double(), z.gather(-1, local).double()], dim=-1)  # (N, 2)
    picked = torch.where(owner == rank, picked, torch.zeros_like(picked))  # a zero sum from the non-owners
    picked = _all_reduce(picked, dist.ReduceOp.SUM, tp_group, differentiable=False)
    tok = picked[:, 0].long()
    logp = picked[:, 1].float() - m - torch.log(ends[:, -1]).float()
    return tok, logp


def _sample_top_k(logits, temperature, top_k, top_p, generator, tp_group):
    """:func:`sample`'s top-k (then top-p) draw on the union of the local top-ks (see
    :func:`sample_vocab_parallel`)."""
    tp, rank = _tp_size(tp_group), dist.get_rank(tp_group)
    n, v_local = logits.shape
    k = min(top_k, v_local)
    z = logits.float() / temperature  # (N, V_local)
    vals, idx = torch.topk(z, min(k + 1, v_local), dim=-1)  # (N, k or k+1), descending
    unsent = vals[:, k:] if k < v_local else torch.full_like(vals[:, :1], float("-inf"))  # (N, 1) best not sent
    vals, idx = vals[:, :k], idx[:, :k]  # (N, k)
    mass = torch.exp(z - vals[:, :1]).double().sum(dim=-1, keepdim=True)  # (N, 1) relative to the local max
    packed = torch.cat([vals.double(), (idx + rank * v_local).double(), unsent.double(), vals[:, :1].double(),
                        mass], dim=-1)  # (N, 2k + 3); float32 logits and ids are exact in float64
    allp = _gather_rows(packed, tp_group)  # (N, tp, 2k + 3)
    cand_id = allp[..., k:2 * k].reshape(n, tp * k).long()  # (N, C), C = tp * k
    order = cand_id.argsort(dim=-1)  # vocabulary order: the full CDF's order, and the sort's tie order
    cand_id = cand_id.gather(-1, order)
    cand_z = allp[..., :k].reshape(n, tp * k).float().gather(-1, order)  # (N, C)
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64, device=z.device)  # (N, 1), as sample draws
    m = cand_z.amax(dim=-1, keepdim=True)  # (N, 1): the global max is a candidate
    total = (allp[..., 2 * k + 2] * torch.exp(allp[..., 2 * k + 1] - m.double())).sum(dim=-1)  # (N,)
    cdf = torch.exp(filter_logits(cand_z, top_k, top_p) - m).double().cumsum(dim=-1)  # (N, C)
    pos = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (N, 1): first cdf > u * mass
    pos = pos.clamp_(max=cdf.shape[-1] - 1)
    tok = cand_id.gather(-1, pos).squeeze(-1)
    logp = cand_z.gather(-1, pos).squeeze(-1) - m.squeeze(-1) - torch.log(total).float()
    # A row where some rank holds more tokens tied with the k-th largest logit than it sent: its kept set
    # is not all among the candidates. Those rows (identical on every rank) gather their vocabulary.
    kth = torch.topk(cand_z, top_k, dim=-1).values[:, -1:]  # (N, 1): the global k-th largest
    short = (allp[..., 2 * k] >= kth).any(dim=-1).nonzero().squeeze(-1)  # host sync (data-dependent size)
    if short.numel():
        full = gather_vocab(logits[short], tp_group).float() / temperature  # (n_short, V)
        tok[short], logp[short] = _inverse_cdf(full, u[short], top_k, top_p)
    return tok, logp
