"""A learner rank's side of the rollout actors: it asks them for its share of an epoch's prompt
groups and collects the batches, redoing any that a restarted actor sampled with another adapter.

Request n of an epoch goes to actor n mod A with seed (epoch_seed + n), so any actor can redo it.
Every rank asks for its own share (requests rank, rank + W, ...): ObjectRefs handed between ranks
hang in ray.get.
"""

from __future__ import annotations

from stitchvm_rl.policy import AdapterState
from stitchvm_rl.prompt_schedule import epoch_requests, epoch_seed
from stitchvm_rl.rollout import RolloutBatch
from stitchvm_rl.weight_sync import push_adapter


class RolloutClient:
    """One rank's requests, epoch by epoch; `ask` sends an epoch's requests ahead (rollout.async:
    the actors sample it while the learner trains), `collect` waits for them."""

    def __init__(self, actors: list, prompts: list[str], groups_per_epoch: int, seed: int, rank: int, world: int):
        self.actors, self.prompts, self.groups_per_epoch, self.seed = actors, prompts, groups_per_epoch, seed
        self.mine = list(range(rank, groups_per_epoch, world))
        self.pending: dict[int, dict] = {}  # epoch -> its requests already in flight

    def ask(self, epoch: int) -> None:
        self.pending[epoch] = request(self.actors, self._requests(epoch), self.mine, epoch_seed(self.seed, epoch))

    def collect(self, epoch: int, expected: AdapterState, restore: AdapterState) -> tuple[dict[int, RolloutBatch], int]:
        """This rank's batches of `epoch` {request n: batch}, all sampled with `expected`, and how many were redone."""
        requests, seed = self._requests(epoch), epoch_seed(self.seed, epoch)
        refs = self.pending.pop(epoch, None) or request(self.actors, requests, self.mine, seed)
        return collect(self.actors, requests, refs, seed, expected, restore)

    def _requests(self, epoch: int) -> list[list[str]]:
        return epoch_requests(self.prompts, self.groups_per_epoch, self.seed, epoch)


def request(actors: list, requests: list[list[str]], ids: list[int], seed: int) -> dict:
    """Request n to actor n mod A with seed (seed + n); returns {n: ObjectRef}."""
    return {n: actors[n % len(actors)].rollout.remote(requests[n], seed=seed + n) for n in ids}


def collect(actors: list, requests: list[list[str]], refs: dict, seed: int, expected: AdapterState, restore: AdapterState) -> tuple[dict[int, RolloutBatch], int]:
    """The batches behind `refs`, all sampled with adapter `expected`. Ray restarts a dead actor and
    retries its task, but the restarted actor holds the base adapter: a batch of another version is
    redone after this rank (whose adapters equal rank 0's) re-syncs that actor, which then gets
    `restore` (the adapter actors hold now) -- no sample lost, none counted twice.
    Returns the batches and how many were redone."""
    import ray

    batches = dict(zip(refs, ray.get(list(refs.values()))))
    redone = 0
    for _ in range(3):
        stale = [n for n, b in batches.items() if b.version != expected.version]
        if not stale:
            return batches, redone
        redone += len(stale)
        resync = [actors[i] for i in sorted({n % len(actors) for n in stale})]
        push_adapter(expected, resync)
        batches |= dict(zip(stale, ray.get(list(request(actors, requests, stale, seed).values()))))
        if restore.version != expected.version:
            push_adapter(restore, resync)
    raise RuntimeError(f"rollout actors keep returning batches of another adapter version than {expected.version}")
