"""Stage 2: finetune the stitched value model -- a Ray Train job (DeepSpeed) fed by Ray Data.

    Ray Data:  each rank, each epoch, streams its rows of a seeded order (`value.data`): image files
               read by CPU actors, or policy samples made by GPU actors, as uint8 images (+ z0)
    Ray Train: every rank computes the teacher's targets from the images (`Teacher`: frozen reward
               model, + VAE encode of files), noises z0 to z_t (t ~ logit-normal, seeded by (seed,
               epoch, rank) so a resumed run draws the same noise), and trains the stitch + reward
               tail (+ the DiT head's blocks: train_head) with DeepSpeed (ZeRO-2; CPU: gloo + fp32);
               a head that reads the prompt gets each row's SD3 prompt embedding.

Rank layout: `num_workers` identical learner ranks (data parallel); rank 0 also writes the value
model into each checkpoint. Checkpoints are DeepSpeed engine states reported with `ray.train.report`,
so a restarted worker group (FailureConfig) or a re-run with the same name resumes from the last one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from stitchvm_rl import rewards, zoo
from stitchvm_rl.config import Range, from_dict, to_dict
from stitchvm_rl.policy import PromptEmbeds, SD3Policy, vae_encode


@dataclass
class StitchDataConfig:
    """Where the clean images come from."""

    source: Literal["policy", "folder", "jsonl"] = "policy"
    """policy: samples of the backbone for `prompts`; folder: images in `folder` (no captions); jsonl: the images (and captions) `jsonl` lists."""
    folder: str = ""
    """Image folder when source=folder (a path every node sees)."""
    jsonl: str = ""
    """source=jsonl: a file of {"path": ..., "prompt": ...} lines (relative paths: from its folder; every node sees them)."""
    num_images: Annotated[int, Range(1)] = 2048
    """Policy samples to generate (source=policy)."""
    prompts: list[str] = field(default_factory=list)
    """Prompts for the policy samples (empty: every toy-world caption)."""
    sample_steps: Annotated[int, Range(1)] = 20
    """Sampling steps of the policy samples."""
    cfg_scale: Annotated[float, Range(1)] = 1.0
    """CFG scale of the policy samples (1: like the CFG-free rollouts the value model will score)."""
    resolution: Annotated[int, Range(0)] = 0
    """Image side in pixels (0: the backbone's native size)."""
    batch_size: Annotated[int, Range(1)] = 64
    """Rows per Ray Data batch."""
    actors: Annotated[int, Range(1)] = 1
    """Ray Data actors that read or sample images, per learner rank (each rank streams its own rows)."""
    actor_cpus: Annotated[float, Range(0)] = 0.5
    """CPUs reserved per Ray Data actor (fractional, so data and learners share a small machine)."""
    actor_gpus: Annotated[float, Range(0)] = 0.0
    """GPUs per Ray Data actor of source=policy (file readers use none: the learner encodes their images)."""
    skip_broken_images: bool = False
    """source=folder or jsonl: skip unreadable or missing images with a counted warning (default: stop, naming the first)."""


@dataclass
class StitchTrainConfig:
    """Stage 2 optimisation (paper: AdamW 1e-5, x5 on the stitch, 100 warm-up steps, batch 128)."""

    objective: Literal["distill", "regress"] = "distill"
    """distill: match the clean reward model's embedding + tokens; regress: ||V(z_t) - r(z0)||^2."""
    epochs: Annotated[int, Range(1)] = 24
    """Passes over the data (the default: 768 steps; 192 were too few to learn anything)."""
    batch_size: Annotated[int, Range(1)] = 32
    """Per-worker batch size."""
    lr: Annotated[float, Range(0)] = 1e-3
    """Peak learning rate of the reward tail and the head (AdamW; the paper's 1e-5 is for a pretrained CLIP-L)."""
    stitch_lr_mult: Annotated[float, Range(0)] = 5.0
    """Learning-rate multiplier of the stitch."""
    warmup_steps: Annotated[int, Range(0)] = 20
    """Linear warm-up steps."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """After warm-up: hold the rate (the paper's) or decay it to zero by the last step."""
    weight_decay: Annotated[float, Range(0)] = 0.0
    """AdamW weight decay."""
    train_head: bool = True
    """Train the DiT head's blocks too (the paper freezes them; on the toy world this ranks far better at the same budget)."""
    token_weight: Annotated[float, Range(0)] = 1.0
    """Weight of the per-token distillation term."""
    score_weight: Annotated[float, Range(0)] = 0.0
    """Weight of the score-level term: the value head on the student's vs the teacher's embedding (eq. 79; the paper: 1, aesthetic only)."""
    t_logit_mean: float = 0.0
    """Mean of logit(t) (noise levels are centre-biased: logit-normal)."""
    t_logit_std: Annotated[float, Range(0)] = 1.0
    """Std of logit(t)."""
    num_workers: Annotated[int, Range(1)] = 2
    """Ray Train learner workers."""
    use_gpu: bool = False
    """One GPU per learner worker."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage (3 is refused: rank 0 exports the value model alone)."""
    checkpoint_every: Annotated[int, Range(1)] = 4
    """Checkpoint every this many epochs (and after the last)."""
    max_failures: Annotated[int, Range(-1)] = 2
    """Worker-group restarts Ray Train may make (FailureConfig)."""


class Teacher:
    """The frozen reward model's targets, computed on the learner from the streamed uint8 images: the
    unit image embedding and the tokens of its last layer (the distillation targets), and the VAE
    latents of images that come without the policy's own (folder and JSONL rows)."""

    ENCODE_BATCH = 4  # images per VAE encode: its activations at 1024^2 are ~1.5 GiB an image in float32

    def __init__(self, backbone: str, reward_model: str, device: str, dtype: str, encode: bool):
        self.clip = zoo.load_clip(reward_model, dtype=dtype, device=device)
        self.clip.model.text_model = None  # the value model holds its own text tower; the teacher reads images only
        self.vae = zoo.load_vae(backbone, device=device) if encode else None  # float32, as diffusers' SD3 trainers keep it
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        """A numpy batch of the stream -> {z0, embeds, tokens, reward} tensors on the device."""
        images = torch.as_tensor(batch["image"]).to(self.device).float() / 255
        out = self.clip.model.vision_model(pixel_values=rewards.clip_pixels(images, self.clip))
        if "z0" in batch:
            z0 = torch.as_tensor(batch["z0"]).to(self.device).float()
        else:
            z0 = torch.cat([vae_encode(self.vae, chunk).float() for chunk in images.split(self.ENCODE_BATCH)])
        return {
            "z0": z0,
            "embeds": F.normalize(self.clip.model.visual_projection(out.pooler_output).float(), dim=-1),
            "tokens": out.last_hidden_state.float(),
            "reward": torch.as_tensor(batch["reward"]).to(self.device).float(),
        }


def distill_loss(student_embeds, student_tokens, batch, token_weight: float, smooth_l1: bool = False, score=None, score_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Paper's multi-level distillation: image embedding + per-token tail outputs (eq. 78), and with
    `score` (the value head as a function of an embedding) the score-level term of eq. 79."""
    loss_fn = F.smooth_l1_loss if smooth_l1 else F.mse_loss
    emb = loss_fn(student_embeds, batch["embeds"], reduction="none").sum(-1).mean()  # = 2 - 2 cos for MSE of unit vectors
    tok = loss_fn(student_tokens.float(), batch["tokens"])
    loss, parts = emb + token_weight * tok, {"loss_embed": emb.item(), "loss_tokens": tok.item()}
    if score is not None and score_weight > 0:
        sc = loss_fn(score(student_embeds).float(), score(batch["embeds"]).float())
        loss, parts["loss_score"] = loss + score_weight * sc, sc.item()
    return loss, parts


def prompt_table(backbone: str, prompts: list[str], device: str) -> dict[str, PromptEmbeds]:
    """The backbone's SD3 embedding of every training prompt, on the CPU, computed once (a learner of a
    prompt-conditioned head needs only these; the pipeline is freed on return)."""
    policy = SD3Policy.from_pretrained(backbone, device=device)
    unique = sorted(set(prompts))
    cond = policy.encode_prompts(unique)
    return {p: PromptEmbeds(cond.embeds[n : n + 1].cpu(), cond.pooled[n : n + 1].cpu()) for n, p in enumerate(unique)}


def lr_factor(step: int, train: StitchTrainConfig, total_steps: int) -> float:
    """Multiplier on the peak rate at optimizer step `step`: linear warm-up, then constant or a
    half-cosine reaching zero at `total_steps` (a decayed rate lets a short run settle: on the toy
    world it lifts the within-prompt Spearman at sigma = 0.5 by ~0.09 at the same budget)."""
    warm = min(1.0, (step + 1) / max(1, train.warmup_steps))
    if train.lr_schedule == "constant":
        return warm
    return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def train_loop(loop_config: dict) -> None:
    """Ray Train worker: DeepSpeed engine over the value model's trainable parts."""
    from stitchvm_rl.faults import crash_once
    from stitchvm_rl.storage import RunFiles
    from stitchvm_rl.runtime import deepspeed_config, report_checkpoint, resume_epoch, setup_deepspeed

    device = setup_deepspeed()  # before deepspeed is imported: it picks its accelerator on import
    import deepspeed
    import ray.train

    from stitchvm_rl.value.data import epoch_rows, stream
    from stitchvm_rl.value.model import StitchedValueModel

    train, data = from_dict(StitchTrainConfig, loop_config["train"]), from_dict(StitchDataConfig, loop_config["data"])
    seed, crash_after_epoch = loop_config["seed"], loop_config["crash_after_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(seed)
    model = StitchedValueModel.from_pretrained(loop_config["init_dir"], device=device)
    model.config.head_trained = train.train_head
    model.train()
    if model.aesthetic is not None:  # the published predictor scores, frozen: no dropout
        model.aesthetic.eval()
    stitch = list(model.stitch.parameters())
    rest = [p for p in model.trainable_parameters() if all(p is not q for q in stitch)]
    model.requires_grad_(False)  # only what the optimizer steps builds gradients
    for p in model.trainable_parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [{"params": stitch, "lr": train.lr * train.stitch_lr_mult}, {"params": rest, "lr": train.lr}], weight_decay=train.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train, loop_config["total_steps"]))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(train.zero_stage, train.batch_size, 1, bf16=device == "cuda")
    )
    dtype = next(p.dtype for p in engine.module.stitch.parameters())
    rows = ray.get(loop_config["rows"])
    table = prompt_table(loop_config["backbone"], sorted({r["prompt"] for r in rows}), device) if model.config.head_conditioning == "prompt" else None
    teacher = Teacher(loop_config["backbone"], loop_config["reward_model"], device, "bfloat16" if device == "cuda" else "float32", encode=not rows[0]["latent"])

    # One stream over every epoch still to train (its actors start once), in each epoch's seeded order.
    start = resume_epoch(engine)
    epochs = {epoch: epoch_rows(rows, seed, epoch, rank, world, train.batch_size) for epoch in range(start, train.epochs)}
    everything = [row for mine in epochs.values() for row in mine]
    batches = iter(stream(everything, data, loop_config["size"], loop_config["analytic"]).iter_batches(
        batch_size=train.batch_size, batch_format="numpy", drop_last=True
    ))  # one iterator: each epoch takes the next len(mine) rows of it
    for epoch, mine in epochs.items():
        gen = torch.Generator().manual_seed(seed * 7919 + epoch * 131 + rank)
        totals: dict[str, float] = {}
        steps, streamed = 0, 0
        for batch in itertools.islice(batches, len(mine) // train.batch_size):
            prompts = [str(p) for p in batch["prompt"]]
            streamed += sum(v.nbytes for v in batch.values())
            cond = PromptEmbeds.cat([table[p] for p in prompts]) if table is not None else None
            batch = teacher(batch)
            z0 = batch["z0"]
            t = torch.sigmoid(train.t_logit_mean + train.t_logit_std * torch.randn(len(z0), generator=gen)).to(engine.device)
            eps = torch.randn(z0.shape, generator=gen).to(engine.device)
            z_t = ((1 - t.view(-1, 1, 1, 1)) * z0 + t.view(-1, 1, 1, 1) * eps).to(dtype)
            embeds, tokens = engine.module.embed(z_t, t.to(dtype), cond)
            if train.objective == "regress":
                loss = F.mse_loss(engine.module.score(embeds).float(), batch["reward"])
                parts = {"loss_value": loss.item()}
            else:
                loss, parts = distill_loss(
                    embeds, tokens, batch, train.token_weight, smooth_l1=engine.module.config.head == "aesthetic",
                    score=lambda e: engine.module.score(e, prompts), score_weight=train.score_weight,
                )
            engine.backward(loss)
            engine.step()
            steps += 1
            if crash_after_epoch >= 0 and epoch == crash_after_epoch + 1 and rank == min(1, world - 1):
                crash_once(RunFiles(loop_config["storage"], loop_config["run_name"]))
            for k, v in {"loss": loss.item(), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v
        metrics = {
            "epoch": epoch, "steps": steps, "world_size": world, "resumed_from_epoch": start, "streamed_bytes": streamed,
            "order_digest": order_digest(mine), **{k: v / max(steps, 1) for k, v in totals.items()},
        }
        last = epoch == train.epochs - 1
        if (epoch + 1) % train.checkpoint_every == 0 or last:
            export = (lambda d: engine.module.save(d / "value_model")) if rank == 0 else None
            report_checkpoint(metrics, engine, {"epoch": epoch}, write_extra=export)
        else:
            ray.train.report(metrics)


def order_digest(rows: list[dict]) -> str:
    """A short fingerprint of the order a rank trained on in one epoch (reported with its metrics)."""
    import hashlib

    return hashlib.sha256("\n".join(f"{r['path']}|{r['prompt']}|{r['seed']}" for r in rows).encode()).hexdigest()[:12]


def run_training(
    init: str, storage_path: str, run_name: str, train: StitchTrainConfig, data: StitchDataConfig, rows: list[dict], seed: int,
    backbone: str, reward_model: str, size: int, analytic: str = "", crash_after_epoch: int = -1,
):
    """One TorchTrainer.fit(); returns the ray.train Result (its checkpoint holds the value model).
    `init`: the stage-1 model where every rank can read it (a shared path or a storage URI);
    `rows`: every training row (`value.data.source_rows`), which each rank streams its epochs from;
    `size`: the training images' side; `crash_after_epoch`: fault injection for tests (`StitchFaults`)."""
    import ray

    from stitchvm_rl.runtime import fit, torch_trainer

    # Every rank takes the same number of full batches (`value.data.epoch_rows`): the decay's horizon.
    total_steps = train.epochs * (len(rows) // (train.num_workers * train.batch_size))
    loop_config = {"train": to_dict(train), "data": to_dict(data), "rows": ray.put(rows), "seed": seed, "total_steps": total_steps, "init_dir": init,
                   "storage": storage_path, "run_name": run_name, "backbone": backbone, "reward_model": reward_model, "size": size, "analytic": analytic,
                   "crash_after_epoch": crash_after_epoch}
    trainer = torch_trainer(train_loop, loop_config, train.num_workers, train.use_gpu, train.max_failures, storage_path, run_name)
    return fit(trainer, "stage 2 (stitch finetuning)")
