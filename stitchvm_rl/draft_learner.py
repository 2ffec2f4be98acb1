"""The DRaFT-K learner: one `TorchTrainer.fit()` for the whole run; every rank samples for itself.

Rank layout (`num_workers` data-parallel learner ranks, DeepSpeed ZeRO over the LoRA `default` weights):
    rank r   holds the whole pipeline (its text encoders encode its own prompts) and the objective's
             models: the pixel rewards (terminal) or the value models (stitchvm); each epoch takes
             prompts r, r + W, ... of the epoch's W x grad_accum x batch_size (prompt_schedule),
             samples them with the trained adapter from noise seeded by (seed, epoch, r), and runs
             grad_accum DRaFT micro-steps (`stitchvm_rl.draft`); DeepSpeed averages the gradients
             over the ranks and steps the optimizer once; then the EMA follows on every rank alike
    rank 0   also evaluates the EMA adapter (evaluator), owns wandb, appends metrics.jsonl and
             eval_rewards.jsonl and exports the final LoRA, into the run's files in storage
             (`storage.RunFiles`), whichever node it is on; the driver mirrors them

`train_loop` reads as the NFT learner's does, with the rollout actors' part done in place:
    setup      build_learner, run_state.resume, open_run, the objective, Evaluator
    per epoch  draft_update -> EMA -> evaluate and log (rank 0) -> checkpoint (run_state.save)
    end        finish_run (the EMA LoRA)
DRaFT is on-policy: the `old` adapter is the policy that samples the next epoch (a copy of
`default` after each update), so run_state checkpoints it exactly as the NFT learner's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch

from stitchvm_rl import nft, run_state
from stitchvm_rl.across_ranks import mean_over_ranks
from stitchvm_rl.config import Range, from_dict
from stitchvm_rl.draft import DraftRolloutConfig, Objective, draft_loss, stop_index, terminal_objective, value_objective
from stitchvm_rl.evaluator import Evaluator
from stitchvm_rl.faults import DraftFaults, crash_once
from stitchvm_rl.learner import build_learner, finish_run, log_base_evaluation, open_run
from stitchvm_rl.policy import SD3Policy
from stitchvm_rl.prompt_schedule import epoch_prompts, epoch_seed


@dataclass
class DraftTrainConfig:
    """DRaFT-K optimisation (the paper's SD3.5-M values: AdamW lr 5e-5, weight decay 0, clip 1.0, EMA)."""

    lr: Annotated[float, Range(0)] = 5e-5
    """AdamW learning rate of the LoRA weights."""
    weight_decay: Annotated[float, Range(0)] = 0.0
    """AdamW weight decay."""
    grad_clip: Annotated[float, Range(0)] = 1.0
    """Gradient-norm clip."""
    ema_max_decay: Annotated[float, Range(0, 1)] = 0.9
    """Cap of the evaluation EMA's decay min((1 + step) / (10 + step), cap)."""
    num_workers: Annotated[int, Range(1)] = 2
    """Ray Train learner ranks (each samples its own share of the batch)."""
    use_gpu: bool = False
    """Learner ranks on GPUs."""
    gpus_per_worker: Annotated[float, Range(0)] = 1.0
    """GPUs per learner rank with use_gpu."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom resources per learner rank, e.g. {learner: 1} on clusters from cluster/*.yaml."""
    zero_stage: Annotated[int, Range(0, 3)] = 2
    """DeepSpeed ZeRO stage of the LoRA weights' optimizer state and gradients (3 is refused: rank 0 evaluates and exports alone)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the frozen base weights, VAE, text encoders and value models (bfloat16 on GPU); LoRA weights, gradients and optimizer state stay float32."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward: each transformer block inside a grad step (on top of draft.checkpoint_steps), and the VAE decoder's blocks (terminal)."""
    compile: bool = False
    """torch.compile each SD3 block of the learner's transformer, LoRA layers included (GPU, or CPU with a C++ compiler)."""
    max_failures: Annotated[int, Range(-1)] = 2
    """Learner-group restarts Ray Train may make (FailureConfig)."""


def train_loop(loop: dict) -> None:
    """Ray Train worker (see the module docstring for the rank layout)."""
    from stitchvm_rl.runtime import setup_deepspeed

    device = setup_deepspeed()  # before deepspeed is imported
    import ray.train

    from stitchvm_rl import rewards

    # ---------------------------------------------------------------- setup
    draft, train = from_dict(DraftRolloutConfig, loop["draft"]), from_dict(DraftTrainConfig, loop["train"])
    faults = from_dict(DraftFaults, loop["testing"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    policy, engine = build_learner(loop["backbone"], loop["seed"], draft, train, draft.batch_size, draft.grad_accum, device, prompt_cache=draft.prompt_cache)
    if train.gradient_checkpointing:  # the terminal objective decodes with the graph: 4 images at 512^2 keep ~10 GiB without it
        policy.vae.enable_gradient_checkpointing()
    run = run_state.resume(engine, policy, keep_previous=False)
    start, epochs = run.start, loop["epochs"]
    files, scratch, tracker = open_run(loop, rank, run)
    needs_reward = rank == 0 or draft.estimator == "terminal"  # rank 0 evaluates with the clean reward
    reward = rewards.build_rewards(loop["reward_weights"], loop["reward_sources"], device=device) if needs_reward else None
    objective = build_objective(policy, draft, reward, loop["value_models"], device, train.dtype)
    evaluate = None
    if rank == 0:
        evaluate = Evaluator(policy, reward, loop["eval_prompts"], loop["eval_steps"] or draft.num_steps, loop["seed"], draft.resolution, loop["eval_batch_size"], files, scratch, tracker)
        if start == 0 and loop["eval_every"]:
            log_base_evaluation(evaluate, files, tracker)

    # ---------------------------------------------------------------- train
    for epoch in range(start, epochs):
        began = time.perf_counter()
        share = world * draft.grad_accum * draft.batch_size
        prompts = epoch_prompts(loop["prompts"], share, loop["seed"], epoch)[rank::world]
        gen = torch.Generator().manual_seed(epoch_seed(loop["seed"], epoch) * 64 + rank)
        totals = draft_update(engine, policy, draft, prompts, objective, gen)
        global_step = epoch + 1
        policy.soft_update("ema", nft.ema_decay(global_step, train.ema_max_decay))
        policy.soft_update("old", 0.0)  # the policy that samples the next epoch
        run.advance(epoch, policy.export_adapter("old", version=global_step))
        seconds = time.perf_counter() - began

        # ------------------------------------------------------------ log (rank 0)
        metrics = {"epoch": epoch, "global_step": global_step, "resumed_from_epoch": start, "world_size": world, **mean_over_ranks(totals, draft.grad_accum)}
        metrics |= {"samples": share, "seconds_epoch": seconds, "samples_per_second": share / seconds}
        if rank == 0:
            if loop["eval_every"] and (global_step % loop["eval_every"] == 0 or global_step == epochs):
                metrics |= evaluate(global_step)
            run.device_hours += seconds * world / 3600
            metrics |= {"device_hours": run.device_hours, "wandb_run_id": tracker.run_id}
            files.append_jsonl("metrics.jsonl", metrics)
            tracker.log(metrics, step=global_step)

        # checkpoint (fault injection: die after the engine state is written, before the manifest and the report)
        crash = (lambda d: crash_once(files)) if epoch == faults.crash_in_checkpoint and rank == min(1, world - 1) else None
        run_state.save(run, metrics, engine, policy, prompt_groups_seen=global_step * share, write_extra=crash)

    # ---------------------------------------------------------------- save
    finish_run(rank, policy, files, scratch, tracker)


def build_objective(policy: SD3Policy, draft: DraftRolloutConfig, reward, value_models: list[str], device: str, dtype: str) -> Objective:
    """What the gradient ascends: the pixel reward (terminal) or the sum of the frozen value models (stitchvm)."""
    if draft.estimator == "terminal":
        return terminal_objective(policy, reward)
    from stitchvm_rl.value.model import StitchedValueModel

    return value_objective(policy, [StitchedValueModel.from_pretrained(d, device=device, dtype=dtype).requires_grad_(False) for d in value_models])


def draft_update(engine, policy: SD3Policy, draft: DraftRolloutConfig, prompts: list[str], objective: Objective, gen: torch.Generator) -> dict[str, float]:
    """This rank's share of one optimizer step: `grad_accum` micro-steps of `batch_size` prompts,
    each from its own noise and stop, gradients accumulated (DeepSpeed steps after the last);
    returns the summed loss parts."""
    totals: dict[str, float] = {}
    for n in range(draft.grad_accum):
        batch = prompts[n * draft.batch_size : (n + 1) * draft.batch_size]
        noise = policy.initial_noise(len(batch), gen, resolution=draft.resolution or None)
        loss, parts = draft_loss(policy, draft, batch, noise, stop_index(draft, gen), objective)
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer once per epoch (gradient accumulation)
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
    return totals
