"""Weight sync: after each update the learner's `old` adapter goes to every rollout actor, and each
actor's answer (version, its dtype, checksum of the adapter read back from its model) proves it holds
exactly that adapter -- a stale or damaged copy stops the run instead of sampling silently. The
checksum is of the canonical form: the learner's (float32) adapter cast to the actor's dtype.

An actor that is down (its node lost, Ray restarting it) is waited for up to DOWN_TIMEOUT_S, then
left out: it comes back with the base adapter, and the learner redoes whatever it samples with
another version (rollout_client). An actor that is dead for good (it used up rollout_max_restarts,
e.g. out of memory on every start) stops the run with one message naming it."""

from __future__ import annotations

import time

from stitchvm_rl.policy import AdapterState

DOWN_TIMEOUT_S = 60.0  # how long a silent actor is given to answer a sync before it counts as down


def actor_failures():
    """The errors that mean a call's actor or its result was lost with a process or a node."""
    import ray.exceptions as rex

    return (rex.RayActorError, rex.ObjectLostError, rex.OwnerDiedError, rex.GetTimeoutError, rex.NodeDiedError, rex.WorkerCrashedError)


def check_alive(actor, timeout_s: float = DOWN_TIMEOUT_S) -> bool:
    """True once `actor` answers (a restarting one is waited for, up to `timeout_s`), False if it
    does not in that time; raises RuntimeError, naming it, when it is dead for good."""
    import ray
    import ray.exceptions as rex

    deadline, died = time.monotonic() + timeout_s, 0
    while (left := deadline - time.monotonic()) > 0:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=left)
            return True
        except rex.ActorUnavailableError:  # restarting: a call now fails at once, so ask again
            time.sleep(1.0)
        except rex.GetTimeoutError:
            return False
        except rex.ActorDiedError as err:
            died += 1
            if died < 5:  # just died: Ray may not have marked it restarting yet
                time.sleep(1.0)
                continue
            first = str(err).strip().splitlines()[0]
            raise RuntimeError(
                f"rollout actor {actor_name(actor)} is dead and will not be restarted again ({first}); it died more often than "
                "rollout_max_restarts allows -- look at its node's logs (out of memory on every start?) and lower rollout.batch_size "
                "or give it a larger GPU"
            ) from None
    return False


def actor_name(actor) -> str:
    import ray

    try:
        return repr(ray.util.state.get_actor(actor._actor_id.hex()).name)
    except Exception:  # the State API needs the dashboard; the id still names it
        return actor._actor_id.hex()[:12]


def push_adapter(state: AdapterState, actors: list) -> list:
    """Put one exported adapter in the object store, have every actor load it, verify the answers;
    returns the positions in `actors` of those that were down (they did not answer; see the module docstring)."""
    import ray

    ref = ray.put(state)
    calls = [actor.load_adapter.remote(ref) for actor in actors]
    answers, down = [], []
    for i, (actor, call) in enumerate(zip(actors, calls)):
        try:
            answers.append(ray.get(call, timeout=DOWN_TIMEOUT_S))
        except actor_failures():
            if check_alive(actor):  # it died during the call and is back: it holds the base adapter
                answers.append(ray.get(actor.load_adapter.remote(ref)))
            else:
                down.append(i)
    check_answers(state, answers)
    return down


def check_answers(state: AdapterState, answers: list[tuple[int, str, str]]) -> None:
    """Every (version, dtype, checksum) answer must be `state` cast to that dtype; else RuntimeError."""
    expected = {dtype: state.checksum_as(dtype) for dtype in {a[1] for a in answers}}
    if any(version != state.version or checksum != expected[dtype] for version, dtype, checksum in answers):
        raise RuntimeError(f"adapter sync failed: sent version {state.version} ({state.checksum[:12]}), actors answered {answers}")


def sync_actors(state: AdapterState, actors: list, rank: int) -> None:
    """Learner rank 0 pushes `state`; every rank waits for it, so no rank samples before every actor holds it."""
    import torch.distributed as dist

    if rank == 0:
        down = push_adapter(state, actors)
        if down:
            print(f"adapter v{state.version}: {len(down)} of {len(actors)} rollout actors are down (restarting); their groups go to the others", flush=True)
    dist.barrier()
