"""DiffusionNFT: raw scores -> optimality probabilities, and the NFT loss.

    scores (B,) in prompt groups --optimality_probability--> r in [0, 1]
    r, v_theta, v_old, v_ref at z_t --nft_loss--> loss (the form the official code optimises)

The implicit policies are v+ = (1 - beta) v_old + beta v_theta and v- = (1 + beta) v_old - beta v_theta.
The paper writes the loss as r ||v+ - u||^2 + (1 - r) ||v- - u||^2 (tests/test_nft.py); the official
code (NVlabs/DiffusionNFT, train_nft_sd3.py) measures the error in anchor space, normalises it per
sample and scales it by adv_clip / beta, and its published hyper-parameters are tuned for that form,
so that is what training uses. Anchors: the clean latent z0 (tau = 0, the terminal estimator) or
the early-stopped z_tau (bridge-anchored V-NFT: the forward process conditioned on z_tau, flow.bridge_sample).
"""

from __future__ import annotations

import torch

from stitchvm_rl import flow


def optimality_probability(scores: torch.Tensor, groups: torch.Tensor, adv_clip: float = 5.0) -> torch.Tensor:
    """r = clip(A / (2 adv_clip) + 1/2, 0, 1), A = clip((R - mean of R's prompt group) / (global std + 1e-4), +-adv_clip).

    `groups[k]` names sample k's prompt group (any integers). With adv_clip = 5 this is DiffusionNFT's
    `r = clip(A/10 + 1/2, 0, 1)` (per-prompt mean, std over the whole epoch batch).
    """
    scores = scores.double()
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise ValueError(f"{bad} of {len(scores)} rewards are NaN or infinite; check the reward model and its inputs (decoded images, prompts)")
    _, index = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(index.max()) + 1, dtype=torch.float64).index_add_(0, index, torch.ones_like(scores))
    mean = torch.zeros_like(count).index_add_(0, index, scores) / count
    advantage = ((scores - mean[index]) / (scores.std(unbiased=False) + 1e-4)).clamp(-adv_clip, adv_clip)
    return (advantage / (2 * adv_clip) + 0.5).clamp(0, 1).float()


def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v+, v-): the positive and negative policies NFT trains implicitly through v_theta."""
    v_old = v_old.detach()
    return (1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta


def _anchor_prediction(v: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The anchor a velocity implies: u = (s'/s) z_t + b z_tau on the bridge from z_tau, so
    z_tau_hat(v) = (v - (s'/s) z_t) / b; for tau = 0 this is Tweedie's z_t - t v."""
    c = flow.bridge_coefficients(t.cpu(), tau.cpu())
    ratio = (c.dsigma / c.sigma).to(v.device, v.dtype).view(-1, *[1] * (v.dim() - 1))
    b = (c.dalpha - c.alpha * c.dsigma / c.sigma).to(v.device, v.dtype).view(-1, *[1] * (v.dim() - 1))
    return (v - ratio * z_t) / b


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor,
    z_t: torch.Tensor,
    anchor: torch.Tensor,
    t: torch.Tensor,
    tau: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    kl_weight: float = 1e-4,
    adv_clip: float = 5.0,
) -> tuple[torch.Tensor, dict]:
    """The official DiffusionNFT objective, anchored at `anchor` = z_tau (z0 when tau = 0).

    Per sample: e+- = anchor-space error of v+-, normalised by its own (stop-gradient) mean absolute
    value; policy = adv_clip * mean(r e+ / beta + (1 - r) e- / beta); plus kl_weight ||v_theta - v_ref||^2.
    Returns (loss, parts for logging).
    """
    v_pos, v_neg = implicit_policies(v_theta, v_old, beta)
    dims = tuple(range(1, v_theta.dim()))

    def normalised_error(v):
        err = _anchor_prediction(v, z_t, t, tau) - anchor
        scale = err.detach().abs().mean(dims).clamp_min(1e-5)
        return (err**2).mean(dims) / scale

    pos, neg = normalised_error(v_pos), normalised_error(v_neg)
    x0_norm = _anchor_prediction(v_theta.detach(), z_t, t, tau).pow(2).mean().sqrt()  # blows up if training diverges
    policy = adv_clip * (r * pos / beta + (1 - r) * neg / beta).mean()
    kl = ((v_theta - v_ref.detach()) ** 2).mean()
    loss = policy + kl_weight * kl
    return loss, {"loss": loss.item(), "loss_policy": policy.item(), "kl": kl.item(), "loss_pos": pos.mean().item(), "loss_neg": neg.mean().item(), "x0_norm": x0_norm.item()}


def old_policy_decay(step: int) -> float:
    """eta of the soft update theta_old <- eta theta_old + (1 - eta) theta (DiffusionNFT decay type 1)."""
    return min(0.001 * step, 0.5)


def ema_decay(step: int, cap: float = 0.9) -> float:
    """Decay of the evaluation EMA after optimizer step `step`: min((1 + s) / (10 + s), cap) (official)."""
    return min((1 + step) / (10 + step), cap)
