"""Weight sync: after each update the learner's `old` adapter goes to every rollout actor, and each
actor's answer (version, checksum of the adapter read back from its model) proves it holds exactly
that adapter -- a stale or damaged copy stops the run instead of sampling silently."""

from __future__ import annotations

from stitchvm_rl.policy import AdapterState


def push_adapter(state: AdapterState, actors: list) -> None:
    """Put one exported adapter in the object store, have every actor load it, verify the answers."""
    import ray

    ref = ray.put(state)
    answers = ray.get([actor.load_adapter.remote(ref) for actor in actors])
    if any(answer != (state.version, state.checksum) for answer in answers):
        raise RuntimeError(f"adapter sync failed: sent version {state.version} ({state.checksum[:12]}), actors answered {answers}")


def sync_actors(state: AdapterState, actors: list, rank: int) -> None:
    """Learner rank 0 pushes `state`; every rank waits for it, so no rank samples before every actor holds it."""
    import torch.distributed as dist

    if rank == 0:
        push_adapter(state, actors)
    dist.barrier()
