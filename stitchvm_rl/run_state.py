"""The checkpointed state of a run beside the DeepSpeed engine's own (the trainable LoRA and the
optimizer): the last finished epoch, the `old` adapter now and one version before (a resumed async
run replays its epoch with that one), the EMA adapter, the torch RNG, the device-hours so far and
the wandb run id (a resumed run continues its curves). `resume` and `save` are each other's inverse."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stitchvm_rl.policy import AdapterState, SD3Policy, tensor_checksum


@dataclass
class RunState:
    """Where a run stands; versions: v_e is the `old` adapter after e updates."""

    epoch: int  # the last finished epoch (-1: none yet)
    current: AdapterState  # v_{epoch + 1}: what the actors hold
    previous: AdapterState  # v_epoch (async: what the next epoch was sampled with)
    device_hours: float = 0.0
    wandb_run_id: str = ""

    @property
    def start(self) -> int:
        """The first epoch still to run."""
        return self.epoch + 1

    def advance(self, epoch: int, current: AdapterState) -> None:
        """`epoch` is trained and `current` is the `old` adapter it made."""
        self.epoch, self.previous, self.current = epoch, self.current, current


def resume(engine, policy: SD3Policy, keep_previous: bool) -> RunState:
    """Load the latest checkpoint into `engine` and `policy` (adapters `old`, `ema`, the torch RNG),
    or start fresh; `keep_previous` (rollout.async) restores v_{e-1} too, else it is v_e."""
    from stitchvm_rl.runtime import resume_state

    state = resume_state(engine, load_module_strict=False)
    start = state.get("epoch", -1) + 1
    if state:
        policy.load_adapter(_adapter_state(state["old"], 0), "old")
        policy.load_adapter(_adapter_state(state["ema"], 0), "ema")
        torch.set_rng_state(state["rng"])
    current = policy.export_adapter("old", version=start)
    previous = _adapter_state(state["old_prev"], start - 1) if state and keep_previous else current
    return RunState(start - 1, current, previous, state.get("device_hours", 0.0), state.get("wandb_run_id", ""))


def save(run: RunState, metrics: dict, engine, policy: SD3Policy, prompt_groups_seen: int, write_extra=None) -> None:
    """Report `metrics` with this rank's checkpoint (Ray Train registers it once every rank has
    reported); `write_extra(dir)` may add files (fault injection uses it to die mid-write)."""
    from stitchvm_rl.runtime import report_checkpoint

    client = {
        "epoch": run.epoch,
        "old": run.current.tensors,
        "old_prev": run.previous.tensors,
        "ema": policy.export_adapter("ema").tensors,
        "rng": torch.get_rng_state(),
        "prompt_groups_seen": prompt_groups_seen,  # prompt order is a function of (seed, epoch)
        "device_hours": run.device_hours,
        "wandb_run_id": run.wandb_run_id,
    }
    report_checkpoint(metrics, engine, client, exclude_frozen=True, write_extra=write_extra)


def _adapter_state(tensors: dict[str, torch.Tensor], version: int) -> AdapterState:
    return AdapterState(tensors, version, tensor_checksum(tensors))
