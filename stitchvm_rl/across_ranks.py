"""What the learner ranks combine: the epoch's raw scores, all-gathered so that every rank
normalises rewards over the whole epoch (each keeps its own share), and metrics averaged or summed
over every rank's share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stitchvm_rl.rollout import RolloutBatch


@dataclass
class EpochScores:
    """The raw scores of every request of an epoch, from every rank, request 0 first."""

    scores: torch.Tensor  # (samples,)
    groups: torch.Tensor  # (samples,) prompt-group ids, unique over the epoch
    sizes: list[int]  # samples per request
    versions: list[int]  # adapter version each batch was sampled with
    seconds_sample: float  # actor-side, summed over requests
    seconds_score: float

    def per_request(self, values: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-sample `values` (e.g. normalised rewards) split back into {request n: values}."""
        return dict(zip(range(len(self.sizes)), values.split(self.sizes)))


def gather_scores(mine: dict[int, RolloutBatch], requests: int) -> EpochScores:
    """Every rank's (small) score vectors of the epoch's `requests`, on every rank."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {n: (b.scores, b.groups, b.version, b.seconds_sample, b.seconds_score) for n, b in mine.items()})
    parts = {n: part for per_rank in gathered for n, part in per_rank.items()}
    groups, offset = [], 0
    for n in range(requests):  # a request's group ids 0, 1, ... follow those of the requests before it
        groups.append(parts[n][1] + offset)
        offset += int(parts[n][1].max()) + 1
    return EpochScores(
        scores=torch.cat([parts[n][0] for n in range(requests)]),
        groups=torch.cat(groups),
        sizes=[len(parts[n][0]) for n in range(requests)],
        versions=[part[2] for part in parts.values()],
        seconds_sample=sum(part[3] for part in parts.values()),
        seconds_score=sum(part[4] for part in parts.values()),
    )


def mean_over_ranks(totals: dict[str, float], steps: int) -> dict[str, float]:
    """Per-micro-step means of the loss parts over every rank's share."""
    import torch.distributed as dist

    keys = sorted(totals)
    vec = torch.tensor([totals[k] for k in keys] + [steps], dtype=torch.float64)
    dist.all_reduce(vec)
    return {k: (vec[n] / vec[-1].clamp_min(1)).item() for n, k in enumerate(keys)}


def sum_over_ranks(value: int) -> int:
    import torch.distributed as dist

    vec = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(vec)
    return int(vec.item())
