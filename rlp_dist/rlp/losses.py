"""RLP rewards, group-relative advantages and the clipped surrogate (RLP.md, Algorithm 1, steps 5-9).

Pure tensor functions: no process groups, no DeepSpeed, no ``.item()`` (a device sync). Metrics are
returned as 0-dim tensors; the trainer reduces and logs them.

Notation (per context b, thought i of G, thought token u):
    r^(i)   = S_pred^(i) - S_ema                              information gain, nats
    A^(i)   = G/(G-1) * (r^(i) - mean_j r^(j))                no gradient
    rho_u   = exp(logp_theta(l_u) - logp_old(l_u))
    L^(i)   = -(1/|c^(i)|) sum_u min(rho_u A^(i), clip(rho_u, 1-eps_low, 1+eps_high) A^(i))
    L       = mean over the B*G thoughts of L^(i)
There is no next-token term and no KL term (the paper's recipe).
"""

from __future__ import annotations

import torch


def rewards(s_pred: torch.Tensor, s_ema: torch.Tensor) -> torch.Tensor:
    """r = S_pred - S_ema.

    s_pred: (B, G) log p_theta(x_t | x_<t, c^(i)); s_ema: (B,) log p_phi(x_t | x_<t). Returns (B, G).
    """
    return s_pred - s_ema[:, None]


def group_advantages(r: torch.Tensor) -> torch.Tensor:
    """A^(i) = G/(G-1) * (r^(i) - mean_j r^(j)) over the group dim. r: (B, G) -> (B, G), detached.

    The G/(G-1) factor corrects for the inclusive mean (r^(i) itself is part of the mean), making
    A^(i) the unbiased difference between r^(i) and the mean of the other G-1 rewards.
    """
    g = r.shape[-1]
    if g < 2:
        raise ValueError(f"group size {g} < 2: the group-relative advantage needs two thoughts")
    r = r.detach()
    return (g / (g - 1)) * (r - r.mean(dim=-1, keepdim=True))


def clipped_surrogate(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped policy-gradient loss over thought tokens, normalised per thought.

    logp:       (N, T) log pi_theta of each thought token (with grad); N = thoughts in this batch
    logp_old:   (N, T) behaviour log-probs recorded at sampling time (no grad)
    advantages: (N,)   A^(i), one per thought
    mask:       (N, T) 1.0 for thought (policy) tokens, 0.0 for padding
    Returns (loss, metrics): loss is the mean over the N thoughts of L^(i); a thought with no
    tokens (cannot happen: length >= 1) would contribute 0.
    """
    mask = mask.to(logp.dtype)
    log_ratio = (logp - logp_old.detach()) * mask  # masked before exp: padding may hold anything
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()[:, None]  # (N, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (N, T)
    lengths = mask.sum(dim=-1).clamp(min=1.0)  # (N,)
    per_thought = (per_token * mask).sum(dim=-1) / lengths  # (N,)
    loss = per_thought.mean()

    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1.0)
        was_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
        metrics = {
            "clip_frac": (was_clipped.to(mask.dtype) * mask).sum() / n_tok,
            "ratio_mean": (ratio * mask).sum() / n_tok,
            "approx_kl": (((ratio - 1) - log_ratio) * mask).sum() / n_tok,
        }
    return loss, metrics


def ntp_loss(logp_targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood over unmasked positions. (N, S) -> scalar."""
    mask = mask.to(logp_targets.dtype)
    return -(logp_targets * mask).sum() / mask.sum().clamp(min=1.0)
