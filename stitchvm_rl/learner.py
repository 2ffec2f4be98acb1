"""The DiffusionNFT learner: one `TorchTrainer.fit()` for the whole run, controller inside the loop.

Rank layout (`num_workers` data-parallel learner ranks, DeepSpeed ZeRO over the LoRA `default` weights):
    rank 0   pushes the `old` adapter to every actor after each update (checked by version +
             checksum), evaluates the EMA adapter, watches value drift, owns wandb, appends
             metrics.jsonl and eval_rewards.jsonl, exports the final LoRA -- all into the run's
             files in storage (`storage.RunFiles`), whichever node it is on; the driver mirrors them
    rank r   asks the actors for its share of the epoch's prompt groups (groups r, r + W, ...; group n
             goes to actor n mod A with a seed fixed by (seed, epoch, n), so any actor can redo it);
             the raw scores of all ranks are all-gathered so rewards are normalised over the whole
             epoch (per-prompt mean, global std); trains one optimizer step (gradients accumulated
             over groups x timesteps); soft-updates `old` and the EMA exactly like rank 0
Rollout actors are created by the driver and looked up by name, so they outlive a learner restart.

Versions: v_e is the `old` adapter after e updates. Synchronous: epoch e is sampled with v_e.
With rollout.async, epoch e + 1 is requested before epoch e trains, so it is sampled with v_e
(staleness one version); the checkpoint keeps v_{e-1} so that a resumed async run replays exactly.

`train_loop` reads as its steps; all but the NFT update live in modules of their own, or in
functions here, for every trainer that needs them (the DRaFT learner, `draft_learner`, uses them too):
    setup      build_learner, run_state.resume, open_run, RolloutClient (rollout_client), Evaluator
               (evaluator), log_base_evaluation
    per epoch  collect groups (rollout_client) -> normalise (across_ranks.gather_scores +
               nft.optimality_probability) -> NFT update (nft_update) -> sync (weight_sync)
               -> watch and log (watch, evaluator) -> checkpoint (run_state.save)
    end        finish_run (save_lora)
Prompts and seeds of every request follow prompt_schedule.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch

from stitchvm_rl import flow, nft, run_state, zoo
from stitchvm_rl.across_ranks import EpochScores, gather_scores, mean_over_ranks, sum_over_ranks
from stitchvm_rl.config import Range, from_dict, to_dict
from stitchvm_rl.evaluator import Evaluator
from stitchvm_rl.faults import NFTFaults, crash_once
from stitchvm_rl.policy import PromptEmbeds, SD3Policy
from stitchvm_rl.prompt_schedule import epoch_prompts, epoch_seed
from stitchvm_rl.rollout import RolloutBatch, RolloutConfig
from stitchvm_rl.rollout_client import RolloutClient
from stitchvm_rl.storage import RunFiles
from stitchvm_rl.weight_sync import sync_actors


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
    """DeepSpeed ZeRO stage of the LoRA weights' optimizer state and gradients (3 is refused: rank 0 evaluates and exports alone)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the learner's frozen base weights (bfloat16 on GPU); LoRA weights, gradients, optimizer state and the old / EMA copies stay float32."""
    gradient_checkpointing: bool = False
    """Recompute the transformer's block activations in the backward: memory for ~1/3 more compute (large groups at 512^2+)."""
    compile: bool = False
    """torch.compile each SD3 block of the learner's transformer, LoRA layers included (GPU, or CPU with a C++ compiler; the first epoch compiles)."""
    max_failures: Annotated[int, Range(-1)] = 2
    """Learner-group restarts Ray Train may make (FailureConfig)."""


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


def train_loop(loop: dict) -> None:
    """Ray Train worker (see the module docstring for the rank layout)."""
    from stitchvm_rl.runtime import setup_deepspeed

    device = setup_deepspeed()  # before deepspeed is imported
    import ray
    import ray.train
    import torch.distributed as dist

    from stitchvm_rl import rewards

    # ---------------------------------------------------------------- setup
    train = from_dict(NFTTrainConfig, loop["train"])
    rollout = from_dict(RolloutConfig, loop["rollout"])
    faults = from_dict(NFTFaults, loop["testing"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    per_group = timesteps_per_group(rollout, train.timestep_fraction)
    policy, engine = build_learner(loop["backbone"], loop["seed"], rollout, train, rollout.group_size, loop["groups_per_epoch"] // world * per_group, device, text_encoders=rank == 0)
    schedule = flow.sd3_sigmas(rollout.num_steps, scheduler_config=policy.pipe.scheduler.config)
    run = run_state.resume(engine, policy, keep_previous=rollout.async_)
    start, epochs = run.start, loop["epochs"]

    actors = [ray.get_actor(name) for name in loop["actor_names"]]
    client = RolloutClient(actors, loop["prompts"], loop["groups_per_epoch"], loop["seed"], rank, world, loop["rollout_call_timeout_s"])
    files, scratch, tracker = open_run(loop, rank, run)
    evaluate = None
    if rank == 0:
        policy.encode_prompts(loop["eval_prompts"])  # cached on the CPU: the text encoders are not needed again
        policy.drop_text_encoders()
        reward = rewards.build_rewards(loop["reward_weights"], loop["reward_sources"], device=device, served=loop["served_rewards"])
        evaluate = Evaluator(policy, reward, loop["eval_prompts"], loop["eval_steps"] or rollout.num_steps, loop["seed"], rollout.resolution, loop["eval_batch_size"], files, scratch, tracker)
    sync_actors(run.previous, actors, rank)  # async: the resumed epoch replays with v_{e-1}, as it ran
    if rank == 0 and start == 0 and loop["eval_every"]:
        log_base_evaluation(evaluate, files, tracker)

    # ---------------------------------------------------------------- train
    for epoch in range(start, epochs):
        marks = {"start": time.perf_counter()}
        # collect this rank's prompt groups (async: asked for during the previous epoch, sampled with v_{e-1})
        mine, redone = client.collect(epoch, expected=run.previous if rollout.async_ else run.current, restore=run.current)
        if rollout.async_ and epoch == start and start > 0:  # the replayed epoch is in: actors move on to v_e
            dist.barrier()
            sync_actors(run.current, actors, rank)
        if rollout.async_ and epoch + 1 < epochs:
            client.ask(epoch + 1)
        marks["sampled"] = time.perf_counter()

        # normalise over the whole epoch: every rank sees every (small) score vector, keeps its own r
        scores = gather_scores(mine, loop["groups_per_epoch"])
        r_all = nft.optimality_probability(scores.scores, scores.groups, train.adv_clip)

        # one NFT update, then the `old` and EMA adapters follow it on every rank alike
        gen = torch.Generator().manual_seed(loop["seed"] * 7919 + epoch * 131 + rank)
        totals, steps = nft_update(engine, policy, mine, scores.per_request(r_all), schedule, per_group, train, gen)
        global_step = epoch + 1
        policy.soft_update("old", nft.old_policy_decay(global_step))
        policy.soft_update("ema", nft.ema_decay(global_step, train.ema_max_decay))
        run.advance(epoch, policy.export_adapter("old", version=global_step))
        marks["trained"] = time.perf_counter()

        sync_actors(run.current, actors, rank)
        marks["synced"] = time.perf_counter()

        # ------------------------------------------------------------ watch and log (rank 0)
        metrics = epoch_metrics(epoch, start, world, scores, r_all, totals, steps, redone, policy)  # every rank: it reduces over them
        if rank == 0:
            metrics |= watch(loop, rollout, actors, evaluate, epoch)
            seconds = marks["synced"] - marks["start"]
            run.device_hours += seconds * loop["devices"] / 3600
            metrics |= epoch_timings(marks, len(scores.scores)) | {"device_hours": run.device_hours, "wandb_run_id": tracker.run_id}
            files.append_jsonl("metrics.jsonl", metrics)
            tracker.log(metrics, step=global_step)

        # checkpoint (fault injection: die after the engine state is written, before the manifest and the report)
        crash = (lambda d: crash_once(files)) if epoch == faults.crash_in_checkpoint and rank == min(1, world - 1) else None
        run_state.save(run, metrics, engine, policy, prompt_groups_seen=global_step * loop["groups_per_epoch"], write_extra=crash)

    # ---------------------------------------------------------------- save
    finish_run(rank, policy, files, scratch, tracker)


def open_run(loop: dict, rank: int, run: run_state.RunState) -> tuple[RunFiles, Path, object]:
    """The run's files in storage, this node's scratch directory (grids, wandb, the LoRA before
    upload) and the tracker: wandb on rank 0, continuing the run's curves after a resume."""
    from stitchvm_rl.tracking import NoTracker, WandbConfig, make_tracker

    files = RunFiles(loop["storage"], loop["run_name"])
    scratch = Path(tempfile.mkdtemp(prefix=f"{loop['run_name']}-rank{rank}-"))
    tracker = make_tracker(from_dict(WandbConfig, loop["wandb"]), loop["run_name"], loop["config"], scratch, run.wandb_run_id) if rank == 0 else NoTracker()
    run.wandb_run_id = tracker.run_id
    return files, scratch, tracker


def log_base_evaluation(evaluate: Evaluator, files: RunFiles, tracker) -> None:
    """The base policy's evaluation (step 0, epoch -1 in metrics.jsonl): what every gain is measured against."""
    base = evaluate(0)
    files.append_jsonl("metrics.jsonl", {"epoch": -1, "global_step": 0, **base})
    tracker.log(base, step=0)


def finish_run(rank: int, policy: SD3Policy, files: RunFiles, scratch: Path, tracker) -> None:
    """The end of every learner's run: rank 0 exports the EMA LoRA and closes wandb (an offline
    run's files go to storage: `wandb sync <run>/wandb/offline-run-*`); every rank drops its scratch."""
    if rank == 0:
        save_lora(policy, files, scratch)
        tracker.finish()
        if (scratch / "wandb").is_dir():
            files.upload_dir(scratch / "wandb", "wandb")
    shutil.rmtree(scratch, ignore_errors=True)


def build_learner(backbone: str, seed: int, sampling, train, micro_batch: int, grad_accum: int, device: str, text_encoders: bool = True, prompt_cache: int | None = None) -> tuple[SD3Policy, object]:
    """The policy with LoRA adapters (the same initialisation on every rank) and the DeepSpeed
    engine over its trainable `default` weights; `grad_accum` micro-steps of `micro_batch` samples
    make one optimizer step. `sampling` (RolloutConfig, DraftRolloutConfig) gives the LoRA shape and the T5
    length, `train` (NFTTrainConfig, DraftTrainConfig) the optimisation. An NFT learner reads the
    prompt embeddings the rollouts carry: only its rank 0, which encodes its evaluation prompts,
    loads the text encoders (`text_encoders`)."""
    import deepspeed

    from stitchvm_rl.runtime import deepspeed_config

    torch.manual_seed(seed)  # identical LoRA init on every rank
    policy = SD3Policy.from_pretrained(backbone, dtype=train.dtype, device=device, text_encoders=text_encoders, max_sequence_length=sampling.max_sequence_length, prompt_cache=prompt_cache)
    policy.add_lora(sampling.lora_rank, sampling.lora_alpha, float32=True)
    if train.gradient_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    if train.compile:  # after the LoRA layers are in; the evaluation's no-grad ODE sampling runs compiled too
        zoo.compile_repeated_blocks(policy.transformer)
    trainable = [p for p in policy.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    # DeepSpeed's bf16 mode would cast the float32 LoRA weights (and `old`, `ema`) to bf16: the trainable weights are float32, so is its optimizer
    ds_config = deepspeed_config(train.zero_stage, micro_batch, grad_accum, bf16=False, grad_clip=train.grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=policy.transformer, optimizer=optimizer, config=ds_config)
    return policy, engine


def nft_update(engine, policy: SD3Policy, batches: dict[int, RolloutBatch], r: dict[int, torch.Tensor], schedule: torch.Tensor, per_group: int, train: NFTTrainConfig, gen: torch.Generator) -> tuple[dict[str, float], int]:
    """This rank's share of one optimizer step: an NFT micro-step per (group, timestep), gradients
    accumulated (DeepSpeed steps the optimizer after the last); returns the summed loss parts and
    the number of micro-steps."""
    totals: dict[str, float] = {}
    steps = 0
    for n, batch in batches.items():
        for group in range(len(batch.group_prompts)):
            tau = float(batch.tau[batch.groups == group][0])
            for t in train_timesteps(schedule, tau, per_group, gen).tolist():
                loss, loss_parts = nft_micro_step(policy, batch, group, r[n], t, train, gen)
                engine.backward(loss)
                engine.step()  # DeepSpeed steps the optimizer once per epoch (gradient accumulation)
                steps += 1
                for k, v in loss_parts.items():
                    totals[k] = totals.get(k, 0.0) + v
    return totals, steps


def watch(loop: dict, rollout: RolloutConfig, actors: list, evaluate: Evaluator, epoch: int) -> dict:
    """Rank 0's checks beside training: value drift (the estimator against the terminal reward of
    full rollouts, on the first actor that is up) and the evaluation, each at its own interval."""
    import ray

    from stitchvm_rl.weight_sync import actor_failures

    out, global_step = {}, epoch + 1
    if loop["drift_every"] and rollout.estimator != "terminal" and global_step % loop["drift_every"] == 0:
        drift_prompts = epoch_prompts(loop["prompts"], loop["drift_groups"], loop["seed"] + 1, epoch)
        for actor in actors:
            try:
                out |= ray.get(actor.value_drift.remote(drift_prompts, seed=epoch_seed(loop["seed"], epoch) + 7), timeout=loop["rollout_call_timeout_s"])
                break
            except actor_failures():
                continue
    if loop["eval_every"] and (global_step % loop["eval_every"] == 0 or global_step == loop["epochs"]):
        out |= evaluate(global_step)
    return out


def epoch_metrics(epoch: int, start: int, world: int, scores: EpochScores, r: torch.Tensor, totals: dict[str, float], steps: int, redone: int, policy: SD3Policy) -> dict:
    """What an epoch's line of metrics.jsonl says about the training itself (loss parts averaged over all ranks)."""
    return {
        "epoch": epoch,
        "global_step": epoch + 1,
        "resumed_from_epoch": start,
        "world_size": world,
        "reward_mean": scores.scores.mean().item(),
        "reward_std": scores.scores.std().item(),
        "r_mean": r.mean().item(),
        "version_lag": epoch - min(scores.versions),  # 0 synchronous, 1 async
        **mean_over_ranks(totals, steps),
        "old_deviation": policy.adapter_distance("old"),
        "rollouts_redone": sum_over_ranks(redone),
        "samples": len(scores.scores),
        "actor_seconds_sample": scores.seconds_sample,
        "actor_seconds_score": scores.seconds_score,
    }


def epoch_timings(marks: dict[str, float], samples: int) -> dict:
    """Seconds of each phase. An epoch's own work is sample, score, train and sync, apart from the
    watching: the evaluation (the same for every estimator) and the drift check (of a value, not part
    of the method). With rollout.async the actors also sample during the watching; that overlap is
    not counted."""
    seconds = marks["synced"] - marks["start"]
    return {
        "seconds_wait_rollouts": marks["sampled"] - marks["start"],
        "seconds_train": marks["trained"] - marks["sampled"],
        "seconds_sync": marks["synced"] - marks["trained"],
        "seconds_epoch": seconds,
        "seconds_watch": time.perf_counter() - marks["synced"],
        "samples_per_second": samples / seconds,
    }


def save_lora(policy: SD3Policy, files: RunFiles, scratch: Path) -> None:
    """The EMA adapter (what evaluation measured) as a diffusers LoRA: saved on this node, then
    uploaded whole as the run's lora/ (`RunFiles.upload_dir`), so a crash never leaves half a LoRA."""
    policy.save_lora(str(scratch / "lora"), "ema")
    files.upload_dir(scratch / "lora", "lora")


def run_learner(loop: dict, train, storage_path: str, run_name: str, train_fn=train_loop, what: str = "NFT training"):
    """One TorchTrainer.fit() of `train_fn` for the whole run (`train`: NFTTrainConfig or
    DraftTrainConfig, which place the ranks alike); returns the ray.train Result."""
    from stitchvm_rl.runtime import fit, torch_trainer

    loop_config = {**loop, "train": to_dict(train)}
    trainer = torch_trainer(
        train_fn, loop_config, train.num_workers, train.use_gpu, train.max_failures, storage_path, run_name,
        gpus_per_worker=train.gpus_per_worker, resources=train.resources_per_worker,
    )
    return fit(trainer, what)
