"""A learner rank's side of the rollout actors: it asks them for its share of an epoch's prompt
groups and collects the batches, redoing any that a restarted actor sampled with another adapter.

Request n of an epoch goes to actor n mod A with seed (epoch_seed + n), so any actor can redo it:
one that is lost with its actor or node, or runs past rollout_call_timeout_s, is redone by the next.
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

    def __init__(self, actors: list, prompts: list[str], groups_per_epoch: int, seed: int, rank: int, world: int, timeout_s: float = 3600.0):
        self.actors, self.prompts, self.groups_per_epoch, self.seed, self.timeout_s = actors, prompts, groups_per_epoch, seed, timeout_s
        self.mine = list(range(rank, groups_per_epoch, world))
        self.pending: dict[int, dict] = {}  # epoch -> its requests already in flight

    def ask(self, epoch: int) -> None:
        self.pending[epoch] = request(self.actors, self._requests(epoch), self.mine, epoch_seed(self.seed, epoch))

    def collect(self, epoch: int, expected: AdapterState, restore: AdapterState) -> tuple[dict[int, RolloutBatch], int]:
        """This rank's batches of `epoch` {request n: batch}, all sampled with `expected`, and how many were redone."""
        requests, seed = self._requests(epoch), epoch_seed(self.seed, epoch)
        refs = self.pending.pop(epoch, None) or request(self.actors, requests, self.mine, seed)
        return collect(self.actors, requests, refs, seed, expected, restore, self.timeout_s)

    def _requests(self, epoch: int) -> list[list[str]]:
        return epoch_requests(self.prompts, self.groups_per_epoch, self.seed, epoch)


def request(actors: list, requests: list[list[str]], ids: list[int], seed: int) -> dict:
    """Request n to actor n mod A with seed (seed + n); returns {n: ObjectRef}."""
    return {n: actors[n % len(actors)].rollout.remote(requests[n], seed=seed + n) for n in ids}


def gather(refs: dict, timeout_s: float) -> dict:
    """{n: batch}, or {n: None} where the call's actor or result was lost, or it ran past `timeout_s`."""
    import ray

    from stitchvm_rl.weight_sync import actor_failures

    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out = {}
    for n, ref in refs.items():
        try:
            out[n] = ray.get(ref, timeout=0)
        except actor_failures():
            out[n] = None
    return out


def next_live(start: int, count: int, down: set[int]) -> int:
    """The first actor index from `start` on (cyclically) that is not down; when all are down, the
    one at `start` (the next sync to it waits for it to come back)."""
    for j in range(count):
        if (start + j) % count not in down:
            return (start + j) % count
    return start % count


def collect(actors: list, requests: list[list[str]], refs: dict, seed: int, expected: AdapterState, restore: AdapterState, timeout_s: float = 3600.0) -> tuple[dict[int, RolloutBatch], int]:
    """The batches behind `refs`, all sampled with adapter `expected`; returns them and how many were redone.

    Two things are redone by a live actor, never by waiting for a lost node's replacement: a request
    whose actor died or ran past `timeout_s` (the next live actor in turn takes it), and a batch of
    another adapter version (a restarted actor is back at the base adapter). Each actor that redoes
    one is first synced by this rank (whose adapters equal rank 0's) to `expected`, then back to
    `restore`, the adapter the actors hold now. The seed of request n is fixed, so any actor's
    answer is the same: no sample lost, none counted twice."""
    batches = gather(refs, timeout_s)
    redone, down, count = 0, set(), len(actors)
    for attempt in range(1, count + 3):
        lost = [n for n, b in batches.items() if b is None]
        stale = [n for n, b in batches.items() if b is not None and b.version != expected.version]
        if not lost and not stale:
            return batches, redone
        redone += len(lost) + len(stale)
        if len(down) == count:  # nothing is up: wait for the actors to come back rather than give up
            down.clear()
        target = {n: n % count for n in stale} | {n: next_live(n + attempt, count, down) for n in lost}
        used = sorted(set(target.values()))
        down |= {used[i] for i in push_adapter(expected, [actors[i] for i in used])}
        redo = {n: actors[i].rollout.remote(requests[n], seed=seed + n) for n, i in target.items() if i not in down}
        batches |= {n: None for n, i in target.items() if i in down} | gather(redo, timeout_s)
        if restore.version != expected.version:
            push_adapter(restore, [actors[i] for i in used if i not in down])
    raise RuntimeError(f"rollout actors keep failing or returning batches of another adapter version than {expected.version}")
