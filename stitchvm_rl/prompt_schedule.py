"""The prompt schedule: which prompts an epoch samples, in which rollout requests, with which seeds.
All of it is a function of (seed, epoch), so a resumed run draws what the first attempt drew and any
actor can redo a lost request bit for bit."""

from __future__ import annotations

import torch


def epoch_prompts(prompts: list[str], n: int, seed: int, epoch: int) -> list[str]:
    """`n` prompts for an epoch: a seeded permutation, so a resumed run draws the same ones."""
    gen = torch.Generator().manual_seed(seed * 31 + epoch)
    return [prompts[i % len(prompts)] for i in torch.randperm(max(n, len(prompts)), generator=gen)[:n].tolist()]


def epoch_requests(prompts: list[str], groups: int, seed: int, epoch: int) -> list[list[str]]:
    """The epoch's prompt groups, one per rollout request (actors share the work finely)."""
    return [[p] for p in epoch_prompts(prompts, groups, seed, epoch)]


def epoch_seed(seed: int, epoch: int) -> int:
    """Request n of an epoch uses seed (epoch_seed + n): the same samples whichever actor serves it."""
    return seed * 100_003 + epoch * 1009
