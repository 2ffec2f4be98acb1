"""Stage 2: finetune the stitched value model -- a Ray Train job (DeepSpeed) fed by Ray Data.

    Ray Data:  prompts --[PolicyImages actors: sample + decode]--> clean images   (or an image folder)
               images  --[TeacherTargets actors: frozen reward model (+ VAE encode of folder images)]--> z0, targets
    Ray Train: every worker takes its shard, noises z0 to z_t (t ~ logit-normal, fresh each epoch,
               seeded by (seed, epoch, rank) so a resumed run draws the same noise), and trains the
               stitch + reward tail (+ the DiT head's blocks: train_head) with DeepSpeed (ZeRO-2;
               CPU: gloo + fp32); a head that reads the prompt gets each row's SD3 prompt embedding.

Rank layout: `num_workers` identical learner ranks (data parallel); rank 0 also writes the value
model into each checkpoint. Checkpoints are DeepSpeed engine states reported with `ray.train.report`,
so a restarted worker group (FailureConfig) or a re-run with the same name resumes from the last one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F

from stitchvm_rl import rewards, zoo
from stitchvm_rl.config import Range, from_dict, to_dict
from stitchvm_rl.policy import PromptEmbeds, SD3Policy, vae_encode


@dataclass
class StitchDataConfig:
    """Where the clean images come from."""

    source: Literal["policy", "folder"] = "policy"
    """policy: samples of the backbone for `prompts`; folder: images in `folder` (no captions)."""
    folder: str = ""
    """Image folder (read by Ray Data) when source=folder."""
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
    """Actors in each Ray Data actor pool."""
    actor_cpus: Annotated[float, Range(0)] = 0.5
    """CPUs reserved per Ray Data actor (fractional, so data and learners share a small machine)."""
    actor_gpus: Annotated[float, Range(0)] = 0.0
    """GPUs per Ray Data actor."""
    skip_broken_images: bool = False
    """source=folder: skip unreadable images with a counted warning (default: stop, naming the first)."""


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


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class PolicyImages:
    """Ray Data actor: clean images sampled from the (base) policy, one noise seed per row, with
    the policy's own final latents (the value model must read those, not a VAE re-encoding of the
    decoded image: on the toy world the two differ by 11 %)."""

    def __init__(self, backbone: str, steps: int, cfg_scale: float, resolution: int):
        self.policy = SD3Policy.from_pretrained(backbone, device=_device())
        self.steps, self.cfg_scale, self.resolution = steps, cfg_scale, resolution or None

    def __call__(self, batch: dict) -> dict:
        prompts = [str(p) for p in batch["prompt"]]
        shape = self.policy.latent_shape_at(self.resolution)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in batch["seed"]])
        with torch.no_grad():
            traj = self.policy.sample(prompts, self.steps, self.cfg_scale, noise=noise)
            images = self.policy.decode(traj.final)
        return {"prompt": np.array(prompts, dtype=object), "image": images.cpu().numpy(), "z0": traj.final.float().cpu().numpy()}


class TeacherTargets:
    """Ray Data actor: the frozen reward model's targets on clean images, and their latents (VAE
    encoded with `encode`; policy rows already carry the policy's own)."""

    def __init__(self, backbone: str, reward_model: str, analytic: str, encode: bool):
        self.device = _device()
        self.vae = zoo.load_vae(backbone, device=self.device) if encode else None
        self.clip = zoo.load_clip(reward_model, device=self.device)
        self.analytic = rewards.ANALYTIC[analytic] if analytic else None

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        images = torch.as_tensor(np.asarray(batch["image"], dtype=np.float32)).to(self.device)
        if images.shape[-1] == 3:  # folder images arrive as HWC uint8
            images = images.permute(0, 3, 1, 2) / 255.0
        prompts = [str(p) for p in batch.get("prompt", [""] * len(images))]
        out = self.clip.model.vision_model(pixel_values=rewards.clip_pixels(images, self.clip))
        embeds = F.normalize(self.clip.model.visual_projection(out.pooler_output).float(), dim=-1)
        reward = self.analytic(images, prompts) if self.analytic else torch.zeros(len(images))
        return {
            "prompt": np.array(prompts, dtype=object),
            "z0": vae_encode(self.vae, images).float().cpu().numpy() if self.vae is not None else np.asarray(batch["z0"], dtype=np.float32),
            "embeds": embeds.cpu().numpy(),
            "tokens": out.last_hidden_state.float().cpu().numpy(),
            "reward": reward.float().cpu().numpy(),
        }


def build_dataset(backbone: str, reward_model: str, analytic: str, data: StitchDataConfig, prompts: list[str], seed: int, size: int):
    """The Ray Data pipeline of clean latents + teacher targets, materialised once (every epoch
    re-reads it; only the noise is new per epoch)."""
    import ray

    common = dict(batch_size=data.batch_size, num_cpus=data.actor_cpus, num_gpus=data.actor_gpus, compute=ray.data.ActorPoolStrategy(size=data.actors))
    if data.source == "folder":
        from stitchvm_rl.storage import job_path

        paths = [str(p) for p in scan_image_folder(job_path(data.folder), data.skip_broken_images)]  # absolute: read on any node
        images = ray.data.read_images(paths, size=(size, size), mode="RGB", ignore_missing_paths=False)
    else:
        rows = [{"prompt": prompts[n % len(prompts)], "seed": seed * 1_000_003 + n} for n in range(data.num_images)]
        images = ray.data.from_items(rows).map_batches(
            PolicyImages, fn_constructor_args=(backbone, data.sample_steps, data.cfg_scale, data.resolution), **common
        )
    targets = images.map_batches(TeacherTargets, fn_constructor_args=(backbone, reward_model, analytic, data.source == "folder"), **common)
    return targets.materialize()


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def scan_image_folder(folder: str, skip_broken: bool = False) -> list[Path]:
    """The readable images of a folder, checked before any work starts (PIL's header check, no
    decode). A broken one stops the job, naming it -- or, with `skip_broken`, is left out and counted."""
    import warnings

    from PIL import Image

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"image folder '{folder}' does not exist; set data.folder or use data.source=policy")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    good, broken = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
            good.append(path)
        except Exception as err:  # PIL raises many types for damaged files
            if not skip_broken:
                raise ValueError(f"image '{path}' cannot be read ({type(err).__name__}); remove it, or set data.skip_broken_images=true to skip such files") from None
            broken.append(path)
    if broken:
        warnings.warn(f"skipped {len(broken)} unreadable image(s) of {len(paths)} in '{folder}', e.g. '{broken[0].name}'", stacklevel=2)
    if not good:
        raise FileNotFoundError(f"image folder '{folder}' holds no readable .png/.jpg/.webp images")
    return good


def read_image_folder(folder: str, n: int, size: int, skip_broken: bool = False) -> torch.Tensor:
    """Up to `n` images of a folder as (n, 3, size, size) in [0, 1] (the stage-1 probes)."""
    from PIL import Image

    paths = scan_image_folder(folder, skip_broken)[:n]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32) / 255.0 for p in paths]
    return torch.as_tensor(np.stack(arrays)).permute(0, 3, 1, 2)


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

    from stitchvm_rl.value.model import StitchedValueModel

    train = from_dict(StitchTrainConfig, loop_config["train"])
    seed, crash_after_epoch = loop_config["seed"], loop_config["crash_after_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(seed)
    model = StitchedValueModel.from_pretrained(loop_config["init_dir"], device=device)
    model.config.head_trained = train.train_head
    model.train()
    stitch = list(model.stitch.parameters())
    rest = [p for p in model.trainable_parameters() if all(p is not q for q in stitch)]
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
    table = prompt_table(loop_config["backbone"], loop_config["prompts"], device) if model.config.head_conditioning == "prompt" else None

    start = resume_epoch(engine)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, train.epochs):
        gen = torch.Generator().manual_seed(seed * 7919 + epoch * 131 + rank)
        totals: dict[str, float] = {}
        steps = 0
        for batch in shard.iter_batches(batch_size=train.batch_size, batch_format="numpy", drop_last=True):
            prompts = [str(p) for p in batch["prompt"]]
            cond = PromptEmbeds.cat([table[p] for p in prompts]) if table is not None else None
            batch = {k: torch.as_tensor(v).to(engine.device) for k, v in batch.items() if k != "prompt"}
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
        metrics = {"epoch": epoch, "steps": steps, "world_size": world, "resumed_from_epoch": start, **{k: v / max(steps, 1) for k, v in totals.items()}}
        last = epoch == train.epochs - 1
        if (epoch + 1) % train.checkpoint_every == 0 or last:
            export = (lambda d: engine.module.save(d / "value_model")) if rank == 0 else None
            report_checkpoint(metrics, engine, {"epoch": epoch}, write_extra=export)
        else:
            ray.train.report(metrics)


def run_training(
    init: str, storage_path: str, run_name: str, train: StitchTrainConfig, dataset, seed: int, backbone: str, prompts: list[str], crash_after_epoch: int = -1
):
    """One TorchTrainer.fit(); returns the ray.train Result (its checkpoint holds the value model).
    `init`: the stage-1 model where every rank can read it (a shared path or a storage URI);
    `prompts`: every prompt the dataset's rows carry (a prompt-conditioned head reads their embeddings);
    `crash_after_epoch`: fault injection for tests (`StitchFaults`)."""
    from stitchvm_rl.runtime import fit, torch_trainer

    # Each rank gets ~1/num_workers of the rows and drops its last partial batch (the decay's horizon).
    total_steps = train.epochs * (dataset.count() // train.num_workers // train.batch_size)
    loop_config = {"train": to_dict(train), "seed": seed, "total_steps": total_steps, "init_dir": init, "storage": storage_path, "run_name": run_name, "backbone": backbone, "prompts": prompts,
                   "crash_after_epoch": crash_after_epoch}
    trainer = torch_trainer(train_loop, loop_config, train.num_workers, train.use_gpu, train.max_failures, storage_path, run_name, datasets={"train": dataset})
    return fit(trainer, "stage 2 (stitch finetuning)")
