"""The DiffusionNFT learner: one `TorchTrainer.fit()` for the whole run, controller inside the loop.

Rank layout (`num_workers` data-parallel learner ranks, DeepSpeed ZeRO over the LoRA `default` weights):
    rank 0   pushes the `old` adapter to every actor after each update (checked by version +
             checksum), evaluates the EMA adapter, watches value drift, owns wandb, appends
             metrics.jsonl and eval_rewards.jsonl, exports the final LoRA
    rank r   asks the actors for its share of the epoch's prompt groups (groups r, r + W, ...; group n
             goes to actor n mod A with a seed fixed by (seed, epoch, n), so any actor can redo it);
             the raw scores of all ranks are all-gathered so rewards are normalised over the whole
             epoch (per-prompt mean, global std); trains one optimizer step (gradients accumulated
             over groups x timesteps); soft-updates `old` and the EMA exactly like rank 0
Rollout actors are created by the driver and looked up by name, so they outlive a learner restart.

Versions: v_e is the `old` adapter after e updates. Synchronous: epoch e is sampled with v_e.
With rollout.async, epoch e + 1 is requested before epoch e trains, so it is sampled with v_e
(staleness one version); the checkpoint keeps v_{e-1} so that a resumed async run replays exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from stitchvm_rl import flow, nft, toyworld, zoo
from stitchvm_rl.config import Range, from_dict, to_dict
from stitchvm_rl.policy import AdapterState, PromptEmbeds, SD3Policy, tensor_checksum
from stitchvm_rl.rollout import RolloutBatch, RolloutConfig


@dataclass
class NFTTrainConfig:
    """DiffusionNFT optimisation (official SD3.5-M values: lr 3e-4, wd 1e-4, beta 1 (0.1 multi-reward))."""

    lr: Annotated[float, Range(0)] = 3e-4
    """AdamW learning rate of the LoRA weights."""
    weight_decay: Annotated[float, Range(0)] = 1e-4
    """AdamW weight decay."""
    beta: Annotated[float, Range(0)] = 1.0
    """NFT mixing strength of the implicit policies (config.beta)."""
    kl_weight: Annotated[float, Range(0)] = 1e-4
    """Weight of ||v_theta - v_ref||^2 (config.train.beta)."""
    adv_clip: Annotated[float, Range(0)] = 5.0
    """Advantage clip; also scales the policy loss, as in the official code."""
    timestep_fraction: Annotated[float, Range(0, 1)] = 0.99
    """Share of the schedule's timesteps (t > tau) trained per group."""
    grad_clip: Annotated[float, Range(0)] = 1.0
    """Gradient-norm clip."""
    ema_max_decay: Annotated[float, Range(0, 1)] = 0.9
    """Cap of the evaluation EMA's decay min((1 + step) / (10 + step), cap)."""
    num_workers: Annotated[int, Range(1)] = 2
    """Ray Train learner ranks."""
    use_gpu: bool = False
    """Learner ranks on GPUs."""
    gpus_per_worker: Annotated[float, Range(0)] = 1.0
    """GPUs per learner rank with use_gpu (a fraction colocates ranks with rollout actors on one GPU)."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom resources per learner rank, e.g. {learner: 1} on clusters from cluster/*.yaml."""
    zero_stage: Annotated[int, Range(0, 3)] = 2
    """DeepSpeed ZeRO stage."""
    gradient_checkpointing: bool = False
    """Recompute the transformer's block activations in the backward: memory for ~1/3 more compute (large groups at 512^2+)."""
    compile: bool = False
    """torch.compile each SD3 block of the learner's transformer, LoRA layers included (GPU, or CPU with a C++ compiler; the first epoch compiles)."""
    max_failures: Annotated[int, Range(-1)] = 2
    """Learner-group restarts Ray Train may make (FailureConfig)."""
    crash_in_checkpoint: int = -1
    """Fault injection for tests: rank 1 dies once while writing this epoch's checkpoint (-1: never)."""


def train_timesteps(schedule: torch.Tensor, tau: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` of the schedule's noise levels strictly above `tau` (never t = tau: the bridge target
    grows like 1/sigma there), in random order."""
    valid = schedule[schedule > tau + 1e-6]
    return valid[torch.randperm(len(valid), generator=generator)[:count]]


def timesteps_per_group(rollout: RolloutConfig, fraction: float) -> int:
    """The same number for every group (every rank then takes the same number of micro-steps):
    a fraction of the fewest valid timesteps any stop can leave."""
    fewest = rollout.num_steps if rollout.estimator == "terminal" else rollout.stop_min
    return max(1, int(fewest * fraction))


def nft_micro_step(policy: SD3Policy, batch: RolloutBatch, group: int, r: torch.Tensor, t: float, train: NFTTrainConfig, generator: torch.Generator):
    """NFT loss of one prompt group at one noise level t > tau (bridge-anchored at the batch's anchors)."""
    rows = batch.groups == group
    anchor = batch.anchors[rows].to(policy.device, policy.dtype)
    tau = batch.tau[rows].to(policy.device)
    t_vec = torch.full_like(tau, t)
    eps = torch.randn(anchor.shape, generator=generator).to(anchor)
    z_t, _ = flow.bridge_sample(anchor, tau, t_vec, eps)
    z_t = z_t.to(policy.dtype)
    cond = PromptEmbeds(
        batch.group_embeds.embeds[group : group + 1].expand(len(anchor), -1, -1).to(policy.device, policy.dtype),
        batch.group_embeds.pooled[group : group + 1].expand(len(anchor), -1).to(policy.device, policy.dtype),
    )
    with torch.no_grad():
        with policy.adapter("old"):
            v_old = policy.velocity(z_t, t_vec, cond)
        with policy.adapter(None):
            v_ref = policy.velocity(z_t, t_vec, cond)
    v_theta = policy.velocity(z_t, t_vec, cond)
    return nft.nft_loss(v_theta.float(), v_old.float(), v_ref.float(), z_t.float(), anchor.float(), t_vec, tau, r[rows].to(policy.device), train.beta, train.kl_weight, train.adv_clip)


# The evaluation's noise has its own seed stream, far above every rollout seed (`_epoch_seed`, below
# 2**40 for any seed < 10**7): a policy is never scored on the starting noise it was trained on.
EVAL_NOISE_SEED = 2**40


@torch.no_grad()
def evaluate_on_fixed_prompts(policy: SD3Policy, reward, prompts: list[str], steps: int, seed: int, adapter: str | None = "ema", resolution: int = 0) -> tuple[dict, torch.Tensor, list[float]]:
    """Fixed prompts and held-out noise, ODE (DPM-2) sampling with `adapter`, clean reward; returns
    (metrics, images, per-image rewards -- for paired comparisons between evaluations)."""
    noise = policy.initial_noise(len(prompts), torch.Generator().manual_seed(EVAL_NOISE_SEED + seed), resolution=resolution or None)
    with policy.adapter(adapter):
        images = policy.decode(policy.sample(prompts, steps, 1.0, "dpm2", noise=noise).final)
    scores = reward(images, prompts).float()
    out = {"eval_reward_mean": scores.mean().item(), "eval_reward_std": scores.std().item()}
    if all(toyworld.is_caption(p) for p in prompts):
        out["eval_caption_accuracy"] = toyworld.caption_accuracy(images, prompts)["all"]
    return out, images.cpu(), scores.tolist()


def train_loop(loop: dict) -> None:
    """Ray Train worker (see the module docstring for the rank layout)."""
    from stitchvm_rl.runtime import crash_once, deepspeed_config, report_checkpoint, resume_state, setup_deepspeed

    device = setup_deepspeed()  # before deepspeed is imported
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist

    from stitchvm_rl import rewards
    from stitchvm_rl.tracking import NoTracker, WandbConfig, make_tracker

    # ---------------------------------------------------------------- setup
    train = from_dict(NFTTrainConfig, loop["train"])
    rollout = from_dict(RolloutConfig, loop["rollout"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(loop["seed"])  # identical LoRA init on every rank
    policy = SD3Policy.from_pretrained(loop["backbone"], device=device)
    policy.add_lora(rollout.lora_rank, rollout.lora_alpha)
    if train.gradient_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    if train.compile:  # after the LoRA layers are in; the evaluation's no-grad ODE sampling runs compiled too
        zoo.compile_repeated_blocks(policy.transformer)
    trainable = [p for p in policy.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    groups_per_rank = loop["groups_per_epoch"] // world
    per_group = timesteps_per_group(rollout, train.timestep_fraction)
    ds_config = deepspeed_config(train.zero_stage, rollout.group_size, groups_per_rank * per_group, device, train.grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=policy.transformer, optimizer=optimizer, config=ds_config)
    schedule = flow.sd3_sigmas(rollout.num_steps, scheduler_config=policy.pipe.scheduler.config)

    # the checkpoint holds the trainable LoRA + optimizer (DeepSpeed) and the rest in its client state
    state = resume_state(engine, load_module_strict=False)
    start = state.get("epoch", -1) + 1
    if state:
        _set_adapter(policy, "old", state["old"])
        _set_adapter(policy, "ema", state["ema"])
        torch.set_rng_state(state["rng"])
    current = policy.export_adapter("old", version=start)  # v_e: `old` after e updates
    previous = _adapter_state(state["old_prev"], start - 1) if state and rollout.async_ else current
    device_hours = state.get("device_hours", 0.0)

    actors = [ray.get_actor(name) for name in loop["actor_names"]]
    run_dir = Path(loop["run_dir"])
    reward = rewards.build_rewards(loop["reward_weights"], device=device) if rank == 0 else None
    wandb_cfg = from_dict(WandbConfig, loop["wandb"])
    tracker = make_tracker(wandb_cfg, loop["run_name"], loop["config"], run_dir, state.get("wandb_run_id", "")) if rank == 0 else NoTracker()
    if rank == 0:
        _push_adapter(previous, actors)  # async: the resumed epoch replays with v_{e-1}, as it ran
    dist.barrier()  # no rank samples before every actor holds the adapter

    def evaluate(step: int) -> dict:
        """Rank 0: the EMA adapter on the fixed prompts; its per-image rewards and grid go to the run dir."""
        evaluation, images, per_image = evaluate_on_fixed_prompts(policy, reward, loop["eval_prompts"], loop["eval_steps"] or rollout.num_steps, loop["seed"], resolution=rollout.resolution)
        _append_jsonl(run_dir / "eval_rewards.jsonl", {"global_step": step, "rewards": per_image})
        _save_samples(tracker, run_dir, images, step=step)
        return evaluation

    if rank == 0 and start == 0 and loop["eval_every"]:  # the base policy, for comparison
        base = evaluate(0)
        _append_jsonl(run_dir / "metrics.jsonl", {"epoch": -1, "global_step": 0, **base})
        tracker.log(base, step=0)

    # ---------------------------------------------------------------- train
    pending = None  # async: this rank's requests for the next epoch, already in flight
    for epoch in range(start, loop["epochs"]):
        marks = {"start": time.perf_counter()}
        chunks, seed = _epoch_chunks(loop, epoch), _epoch_seed(loop, epoch)
        my_chunks = list(range(rank, len(chunks), world))  # every rank requests its own share (ObjectRefs handed between ranks hang in ray.get)
        refs = pending or _request(actors, chunks, my_chunks, seed)
        mine, redone = _collect(actors, chunks, refs, seed, expected=previous if rollout.async_ else current, restore=current)
        if rollout.async_ and epoch == start and start > 0:  # the replayed epoch is in: actors move on to v_e
            dist.barrier()
            if rank == 0:
                _push_adapter(current, actors)
            dist.barrier()
        pending = _request(actors, _epoch_chunks(loop, epoch + 1), my_chunks, _epoch_seed(loop, epoch + 1)) if rollout.async_ and epoch + 1 < loop["epochs"] else None
        marks["sampled"] = time.perf_counter()

        # normalise over the whole epoch: every rank sees every (small) score vector, keeps its own r
        gathered = [None] * world
        dist.all_gather_object(gathered, {n: (b.scores, b.groups, b.version, b.seconds_sample, b.seconds_score) for n, b in mine.items()})
        parts = {n: part for per_rank in gathered for n, part in per_rank.items()}
        scores = torch.cat([parts[n][0] for n in range(len(chunks))])
        groups = torch.cat([parts[n][1] + n * len(chunks[0]) for n in range(len(chunks))])  # globally unique ids
        r_all = nft.optimality_probability(scores, groups, train.adv_clip)
        r_by_chunk = dict(zip(range(len(chunks)), r_all.split([len(parts[n][0]) for n in range(len(chunks))])))

        gen = torch.Generator().manual_seed(loop["seed"] * 7919 + epoch * 131 + rank)
        totals: dict[str, float] = {}
        steps = 0
        for n, batch in mine.items():
            for group in range(len(batch.group_prompts)):
                tau = float(batch.tau[batch.groups == group][0])
                for t in train_timesteps(schedule, tau, per_group, gen).tolist():
                    loss, loss_parts = nft_micro_step(policy, batch, group, r_by_chunk[n], t, train, gen)
                    engine.backward(loss)
                    engine.step()  # DeepSpeed steps the optimizer once per epoch (gradient accumulation)
                    steps += 1
                    for k, v in loss_parts.items():
                        totals[k] = totals.get(k, 0.0) + v
        global_step = epoch + 1
        policy.soft_update("old", nft.old_policy_decay(global_step))
        policy.soft_update("ema", nft.ema_decay(global_step, train.ema_max_decay))
        previous, current = current, policy.export_adapter("old", version=global_step)
        marks["trained"] = time.perf_counter()
        if rank == 0:
            _push_adapter(current, actors)
        dist.barrier()
        marks["synced"] = time.perf_counter()

        # ------------------------------------------------------------ watch and log (rank 0)
        metrics = {
            "epoch": epoch,
            "global_step": global_step,
            "resumed_from_epoch": start,
            "world_size": world,
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std().item(),
            "r_mean": r_all.mean().item(),
            "version_lag": epoch - min(part[2] for part in parts.values()),  # 0 synchronous, 1 async
            **_mean_over_ranks(totals, steps),
            "old_deviation": policy.adapter_distance("old"),
            "rollouts_redone": _sum_over_ranks(redone),
            "samples": len(scores),
            "actor_seconds_sample": sum(part[3] for part in parts.values()),
            "actor_seconds_score": sum(part[4] for part in parts.values()),
        }
        if rank == 0:
            if loop["drift_every"] and rollout.estimator != "terminal" and global_step % loop["drift_every"] == 0:
                drift_prompts = _epoch_prompts(loop["prompts"], loop["drift_groups"], loop["seed"] + 1, epoch)
                metrics |= ray.get(actors[0].value_drift.remote(drift_prompts, seed=seed + 7))
            if loop["eval_every"] and (global_step % loop["eval_every"] == 0 or global_step == loop["epochs"]):
                metrics |= evaluate(global_step)
            # an epoch's own work (sample, score, train, sync), apart from the watching: the evaluation
            # (the same for every estimator) and the drift check (of a value, not part of the method).
            # With rollout.async the actors also sample during the watching; that overlap is not counted.
            seconds = marks["synced"] - marks["start"]
            device_hours += seconds * loop["devices"] / 3600
            metrics |= {
                "seconds_wait_rollouts": marks["sampled"] - marks["start"],
                "seconds_train": marks["trained"] - marks["sampled"],
                "seconds_sync": marks["synced"] - marks["trained"],
                "seconds_epoch": seconds,
                "seconds_watch": time.perf_counter() - marks["synced"],
                "samples_per_second": len(scores) / seconds,
                "device_hours": device_hours,
                "wandb_run_id": tracker.run_id,
            }
            _append_jsonl(run_dir / "metrics.jsonl", metrics)
            tracker.log(metrics, step=global_step)
        client = {
            "epoch": epoch,
            "old": current.tensors,
            "old_prev": previous.tensors,
            "ema": policy.export_adapter("ema").tensors,
            "rng": torch.get_rng_state(),
            "prompt_groups_seen": global_step * loop["groups_per_epoch"],  # prompt order is a function of (seed, epoch)
            "device_hours": device_hours,
            "wandb_run_id": tracker.run_id,
        }
        # fault injection: die after the engine state is written, before the manifest and the report
        crash = (lambda d: crash_once(run_dir / ".crash-injected")) if epoch == train.crash_in_checkpoint and rank == min(1, world - 1) else None
        report_checkpoint(metrics, engine, client, exclude_frozen=True, write_extra=crash)  # registered once every rank has reported

    # ---------------------------------------------------------------- save
    if rank == 0:
        _save_lora(policy, run_dir / "lora")
        tracker.finish()


def _set_adapter(policy: SD3Policy, name: str, tensors: dict[str, torch.Tensor]) -> None:
    policy.load_adapter(_adapter_state(tensors, 0), name)


def _adapter_state(tensors: dict[str, torch.Tensor], version: int) -> AdapterState:
    return AdapterState(tensors, version, tensor_checksum(tensors))


def _save_lora(policy: SD3Policy, path: Path) -> None:
    """The EMA adapter (what evaluation measured) as a diffusers LoRA, written to a temporary
    directory and renamed, so a crash never leaves half a LoRA behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_lora(str(tmp), "ema")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _save_samples(tracker, run_dir: Path, images: torch.Tensor, step: int) -> None:
    """The evaluation images as a grid (samples/step_XXXXX.png), also sent to wandb."""
    path = run_dir / "samples" / f"step_{step:05d}.png"
    path.parent.mkdir(exist_ok=True)
    toyworld.save_grid(images, path, nrow=12)
    tracker.log_image("eval_samples", path, step=step)


def _mean_over_ranks(totals: dict[str, float], steps: int) -> dict[str, float]:
    """Per-micro-step means of the loss parts over every rank's share."""
    import torch.distributed as dist

    keys = sorted(totals)
    vec = torch.tensor([totals[k] for k in keys] + [steps], dtype=torch.float64)
    dist.all_reduce(vec)
    return {k: (vec[n] / vec[-1].clamp_min(1)).item() for n, k in enumerate(keys)}


def _sum_over_ranks(value: int) -> int:
    import torch.distributed as dist

    vec = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(vec)
    return int(vec.item())


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _epoch_prompts(prompts: list[str], n: int, seed: int, epoch: int) -> list[str]:
    """`n` prompts for an epoch: a seeded permutation, so a resumed run draws the same ones."""
    gen = torch.Generator().manual_seed(seed * 31 + epoch)
    return [prompts[i % len(prompts)] for i in torch.randperm(max(n, len(prompts)), generator=gen)[:n].tolist()]


def _epoch_chunks(loop: dict, epoch: int) -> list[list[str]]:
    """The epoch's prompt groups, one per rollout request (actors share the work finely)."""
    return [[p] for p in _epoch_prompts(loop["prompts"], loop["groups_per_epoch"], loop["seed"], epoch)]


def _epoch_seed(loop: dict, epoch: int) -> int:
    """Request n of an epoch uses seed (_epoch_seed + n): the same samples whichever actor serves it."""
    return loop["seed"] * 100_003 + epoch * 1009


def _request(actors: list, chunks: list[list[str]], ids: list[int], seed: int) -> dict:
    """Chunk n to actor n mod A with seed (seed + n); returns {n: ObjectRef}."""
    return {n: actors[n % len(actors)].rollout.remote(chunks[n], seed=seed + n) for n in ids}


def _collect(actors: list, chunks: list[list[str]], refs: dict, seed: int, expected: AdapterState, restore: AdapterState) -> tuple[dict[int, RolloutBatch], int]:
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
        _push_adapter(expected, resync)
        batches |= dict(zip(stale, ray.get(list(_request(actors, chunks, stale, seed).values()))))
        if restore.version != expected.version:
            _push_adapter(restore, resync)
    raise RuntimeError(f"rollout actors keep returning batches of another adapter version than {expected.version}")


def _push_adapter(state: AdapterState, actors: list) -> None:
    """Put one exported adapter in the object store, have every actor load it, verify the answers."""
    import ray

    ref = ray.put(state)
    answers = ray.get([actor.load_adapter.remote(ref) for actor in actors])
    if any(answer != (state.version, state.checksum) for answer in answers):
        raise RuntimeError(f"adapter sync failed: sent version {state.version} ({state.checksum[:12]}), actors answered {answers}")


def run_learner(loop: dict, train: NFTTrainConfig, storage_path: str, run_name: str):
    """One TorchTrainer.fit() for the whole run; returns the ray.train Result."""
    from stitchvm_rl.runtime import fit, torch_trainer

    loop_config = {**loop, "train": to_dict(train)}
    trainer = torch_trainer(
        train_loop, loop_config, train.num_workers, train.use_gpu, train.max_failures, storage_path, run_name,
        gpus_per_worker=train.gpus_per_worker, resources=train.resources_per_worker,
    )
    return fit(trainer, "NFT training")
