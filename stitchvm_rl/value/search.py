"""Stage 1: choose where to stitch, in closed form (paper eq. 7, App. D.1).

For N probe images: DiT features of the forward-noised latent (t ~ U[0, 1]) after every candidate
block i, bilinearly resampled to the reward model's patch grid; reward-model features of the clean
image entering block j <= 4. An affine map per (i, j) is fit by float64 least squares on the
accumulated Gram matrices (so N never has to fit in memory at once); the lowest error wins and
initialises the stitch's F.

jobs/stitch.py runs it as one Ray task placed by `SearchConfig` (a GPU at real scale): the task
loads the backbone once (its blocks are read in place, never copied, until the chosen head is
built), writes the stage-1 model to the run's storage and hands the driver only the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F

from stitchvm_rl.config import Range
from stitchvm_rl.value.model import clip_reference_features


@dataclass
class SearchConfig:
    """Stage 1: where to stitch, fit in closed form on probe images (one Ray task)."""

    probe_images: Annotated[int, Range(8)] = 200
    """Images for the stitch search (paper: 200)."""
    max_dit_block: Annotated[int, Range(0)] = 0
    """Largest DiT block i the search tries (0: all)."""
    rm_blocks: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    """Reward-model blocks j the search tries (paper: j <= 4)."""
    batch_size: Annotated[int, Range(1)] = 16
    """Probe images per forward pass."""
    num_gpus: Annotated[float, Range(0)] = 0.0
    """GPUs of the search task (1 at real scale: it holds the backbone, the reward model and float64 Gram matrices)."""
    num_cpus: Annotated[float, Range(0)] = 1.0
    """CPUs of the search task."""


class AffineLeastSquares:
    """Streaming least squares for y = W x + b over many (x, y) rows, in float64 on the rows' device."""

    def __init__(self, c_in: int, c_out: int, device: str | torch.device = "cpu"):
        self.xtx = torch.zeros(c_in + 1, c_in + 1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(c_in + 1, c_out, dtype=torch.float64, device=device)
        self.yty = torch.zeros(c_out, dtype=torch.float64, device=device)  # per output column
        self.ysum = torch.zeros(c_out, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        dev = self.xtx.device
        x = torch.cat([x.to(dev, torch.float64), torch.ones(x.shape[0], 1, dtype=torch.float64, device=dev)], 1)
        y = y.to(dev, torch.float64)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yty += (y * y).sum(0)
        self.ysum += y.sum(0)
        self.n += x.shape[0]

    def solve(self, ridge: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W (c_out, c_in), b (c_out,), residual sum of squares per output column)."""
        scale = self.xtx.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(self.xtx.shape[0], dtype=torch.float64, device=self.xtx.device)
        sol = torch.linalg.solve(self.xtx + ridge * scale * eye, self.xty)  # (c_in + 1, c_out)
        rss = self.yty - 2 * (sol * self.xty).sum(0) + (sol * (self.xtx @ sol)).sum(0)
        return sol[:-1].T.cpu().contiguous(), sol[-1].cpu().contiguous(), rss.clamp_min(0).cpu()


@dataclass
class StitchSearchResult:
    """The error of every (i, j) and the chosen interface with its least-squares map."""

    table: list[dict] = field(default_factory=list)  # {i, j, mse, relative_mse}
    best_i: int = 0
    best_j: int = 0
    weight: torch.Tensor | None = None  # (C_rm, C_dit) for the best pair
    bias: torch.Tensor | None = None
    cls_mean: torch.Tensor | None = None  # mean CLS token entering block best_j (used when j > 1)


def _tokens(grid: torch.Tensor) -> torch.Tensor:
    return grid.flatten(2).transpose(1, 2).reshape(-1, grid.shape[1])


@torch.no_grad()
def stitch_search(head, clip_model, clip_pixels, batches, rm_blocks=(1, 2, 3, 4), seed: int = 0) -> StitchSearchResult:
    """Fit every (i, j): i over all blocks of `head` (a `DiTHead`), j over `rm_blocks`.

    `batches` yields (images in [0, 1], their normalised latents, the head's prompt embeddings or None
    for the empty prompt); `clip_pixels` maps images to the reward model's pixel values.
    """
    gen = torch.Generator().manual_seed(seed)
    n_dit = len(head.blocks)
    c_rm = clip_model.config.vision_config.hidden_size
    rm_blocks = [j for j in rm_blocks if j <= len(clip_model.vision_model.encoder.layers)]
    fits = [AffineLeastSquares(head.width, c_rm * len(rm_blocks), head.null_embeds.device) for _ in range(n_dit)]
    cls_sum = torch.zeros(len(rm_blocks), c_rm, dtype=torch.float64)
    count = 0
    for x, z0, cond in batches:
        count += len(x)
        t = torch.rand(len(x), generator=gen).to(z0.device, z0.dtype)
        eps = torch.randn(z0.shape, generator=gen).to(z0.device, z0.dtype)
        z_t = (1 - t.view(-1, 1, 1, 1)) * z0 + t.view(-1, 1, 1, 1) * eps
        pixels = clip_pixels(x)
        targets, grid = [], None
        for n, j in enumerate(rm_blocks):
            patch, cls = clip_reference_features(clip_model, pixels, j)
            targets.append(_tokens(patch))
            cls_sum[n] += cls.double().sum(0).cpu()
            grid = patch.shape[-1]
        y = torch.cat(targets, 1)
        for i, feats in enumerate(head.features(z_t, t, cond=cond)):
            up = F.interpolate(feats.float(), size=(grid, grid), mode="bilinear", align_corners=False)
            fits[i].add(_tokens(up), y)

    result = StitchSearchResult()
    best = (float("inf"), 0, 0)
    solutions = {}
    for i, fit in enumerate(fits, start=1):
        weight, bias, rss = fit.solve()
        solutions[i] = (weight, bias)
        variance = (fit.yty / fit.n - (fit.ysum / fit.n) ** 2).cpu()
        for n, j in enumerate(rm_blocks):
            cols = slice(n * c_rm, (n + 1) * c_rm)
            mse = (rss[cols].sum() / (fit.n * c_rm)).item()
            relative = (rss[cols].sum() / (fit.n * variance[cols].sum())).item()
            result.table.append({"i": i, "j": j, "mse": mse, "relative_mse": relative})
            best = min(best, (mse, i, j))  # the paper's criterion: lowest feature-matching MSE
    _, result.best_i, result.best_j = best
    n = rm_blocks.index(result.best_j)
    weight, bias = solutions[result.best_i]
    result.weight = weight[n * c_rm : (n + 1) * c_rm].float()
    result.bias = bias[n * c_rm : (n + 1) * c_rm].float()
    result.cls_mean = (cls_sum[n] / count).float()
    return result


def init_stitch(model, result: StitchSearchResult) -> None:
    """Set F (and the CLS token for j > 1) of a value model built at (best_i, best_j)."""
    cfg = model.config
    if (cfg.dit_block, cfg.rm_block) != (result.best_i, result.best_j):
        raise ValueError(f"value model is stitched at ({cfg.dit_block}, {cfg.rm_block}) but the search chose ({result.best_i}, {result.best_j})")
    with torch.no_grad():
        model.stitch.proj.weight.copy_(result.weight[:, :, None, None])
        model.stitch.proj.bias.copy_(result.bias)
        if cfg.rm_block > 1:
            model.tail.class_embedding.copy_(result.cls_mean)
    cfg.stitch_mse = {f"{row['i']},{row['j']}": row["mse"] for row in result.table}


def build_value_model(backbone: str, reward_model: str, images: torch.Tensor, head: str = "clip", max_dit_block: int | None = None, rm_blocks=(1, 2, 3, 4), score_scale: float = 1.0, device: str = "cpu", seed: int = 0, latents: torch.Tensor | None = None, batch_size: int = 16, head_conditioning: str = "empty", prompts: list[str] | None = None, embed_target: str = "unit", aesthetic_head: str = ""):
    """Stage 1 end to end: load both sources, search (i, j) on `images`, build the value model there
    with F from least squares. `latents`: the images' own latents when they are policy samples (else
    the VAE encodes them, batch by batch); `prompts`: the images' prompts, which a prompt-conditioned
    head reads (None: empty prompts); `aesthetic_head`: the published aesthetic MLP (head=aesthetic).
    Returns (model, search result)."""
    from stitchvm_rl import rewards, zoo
    from stitchvm_rl.policy import SD3Policy
    from stitchvm_rl.value.model import DiTHead, StitchedValueModel, null_prompt_embeds

    pipe = zoo.load_sd3_pipeline(backbone)  # float32, on the CPU until each part is placed
    pipe.transformer.to(device), pipe.vae.to(device)
    text_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32  # T5-XXL alone is 19 GB in float32
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        encoder.to(device, text_dtype)
    policy = SD3Policy(pipe)
    head_prompts = prompts or [""] * len(images)
    conds = [policy.encode_prompts(head_prompts[s : s + batch_size]) for s in range(0, len(images), batch_size)] if head_conditioning == "prompt" else None
    null = null_prompt_embeds(policy.pipe)
    policy.drop_text_encoders()  # every prompt the search reads is encoded: T5-XXL alone is 19 GB in float32
    clip = zoo.load_clip(reward_model, device=device)
    blocks = len(policy.transformer.transformer_blocks)
    candidates = DiTHead(policy.transformer, min(max_dit_block or blocks, blocks), *null, share=True)

    def batches():
        for n, s in enumerate(range(0, len(images), batch_size)):
            x = images[s : s + batch_size].to(device)
            z0 = latents[s : s + batch_size].to(device) if latents is not None else torch.cat([policy.encode_images(c) for c in x.split(4)])  # a VAE encode at 1024^2 keeps ~1.5 GiB an image
            yield x, z0, conds[n] if conds is not None else None

    result = stitch_search(candidates, clip.model, lambda x: rewards.clip_pixels(x, clip), batches(), rm_blocks, seed=seed)
    embed_scale = 1.0
    if embed_target == "mean":  # start the un-normalised embedding near unit norm, as its target is
        with torch.no_grad():
            raw = clip.model.get_image_features(pixel_values=rewards.clip_pixels(images[:64].to(device), clip)).pooler_output
        embed_scale = float(raw.float().norm(dim=-1).mean())
    model = StitchedValueModel.from_parts(
        policy.pipe, clip, result.best_i, result.best_j, head, backbone, reward_model, score_scale, head_conditioning, embed_target, embed_scale, null=null
    )
    if aesthetic_head:  # the published predictor scores the value model's embedding as it scores CLIP's
        from safetensors.torch import load_file

        from stitchvm_rl.storage import local_copy

        model.aesthetic.load_state_dict(load_file(local_copy(aesthetic_head)))
    init_stitch(model, result)
    return model, result
