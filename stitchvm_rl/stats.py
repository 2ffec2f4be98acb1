"""Rank statistics: how alike two estimates order the same samples (advantages only need the order
within a prompt group to be right, so Spearman is the measure of a value estimator)."""

from __future__ import annotations

import torch


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.norm() * b.norm()).item()
    return float((a * b).sum().item() / denom) if denom > 0 else 0.0


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(ranks(a), ranks(b))
