"""Value estimators on noisy latents: the paper's Table 5 measures, for StitchVM, Tweedie and MC-K.

Clean images with captions (the toy world's renderings, or a JSONL of image files) are VAE-encoded
and forward-noised to z_sigma = (1 - sigma) z0 + sigma eps. Each estimator gives a value matrix
V[i, c] = V(z_sigma_i, caption c) for every image i and every caption c of the set, as alignment
would use it (the caption is the prompt: StitchVM's head reads it where it does, Tweedie and MC-K
denoise conditioned on it). From V, with the clean reward R[i, c] = r(x0_i, c) as the reference:

    latent -> caption   top-1: the caption of highest V for latent i is i's own
    caption -> latent   top-1: the latent of highest V for caption c is one of c's images
    preference          over every pair of images (i, j) judged under every caption c: V orders
                        them as the clean reward does (pairs the clean reward ties are left out)

plus the seconds and forward FLOPs of one estimate. Each noise level runs as one Ray task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

import torch

from stitchvm_rl import toyworld
from stitchvm_rl.config import Range


@dataclass
class NoisyConfig:
    """What is measured and how (jobs/evaluate_values.py's `bench` section)."""

    sigmas: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9])
    """Noise levels (the paper's Table 5)."""
    estimators: list[str] = field(default_factory=lambda: ["stitchvm", "tweedie", "mc"])
    """Estimators compared: stitchvm, tweedie, mc."""
    mc_k: Annotated[int, Range(1)] = 4
    """SDE completions per Monte Carlo estimate."""
    steps: Annotated[int, Range(2)] = 20
    """Steps of the sampling schedule that completions follow."""
    cfg_scale: Annotated[float, Range(1)] = 1.0
    """CFG of Tweedie's velocity and of the completions."""
    noise_level: Annotated[float, Range(0)] = 0.7
    """Flow-SDE noise level of the completions."""
    batch_size: Annotated[int, Range(1)] = 256
    """(latent, caption) pairs per transformer or value-model pass."""
    decode_batch_size: Annotated[int, Range(1)] = 64
    """Latents per VAE decode + reward."""
    num_gpus: Annotated[float, Range(0)] = 0.0
    """GPUs of each noise level's task (1 at real scale)."""
    num_cpus: Annotated[float, Range(0)] = 1.0
    """CPUs of each noise level's task."""


@dataclass
class ImageSource:
    """The clean images with captions: the toy world's renderings, or a JSONL of image files."""

    jsonl: str = ""
    """A JSONL of {"path", "prompt"} lines (relative paths: from its folder), read on the node of each task (empty: the toy world)."""
    per_caption: Annotated[int, Range(1)] = 1
    """Toy world: renderings of every caption."""
    max_images: Annotated[int, Range(0)] = 0
    """Use only the first images (0: all); the value matrices are images x captions."""
    resolution: Annotated[int, Range(0)] = 0
    """Side the JSONL's images are resized to (0: the backbone VAE's native size)."""


def load_images(source: ImageSource, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, H, W) in [0, 1] and each image's caption."""
    if source.jsonl:
        from stitchvm_rl.value.data import read_images, read_jsonl

        rows = read_jsonl(source.jsonl)[: source.max_images or None]
        return read_images([r["path"] for r in rows], source.resolution or size), [r["prompt"] for r in rows]
    captions = [c for c in toyworld.CAPTIONS for _ in range(source.per_caption)][: source.max_images or None]
    return toyworld.render(captions, torch.Generator().manual_seed(seed)), captions


def retrieval(values: torch.Tensor, own: torch.Tensor) -> dict:
    """Top-1 retrieval both ways from V (N images x C captions); `own[i]` is image i's caption index."""
    latent_to_caption = (values.argmax(1) == own).double().mean().item()
    caption_to_latent = (own[values.argmax(0)] == torch.arange(values.shape[1])).double().mean().item()
    return {"latent_to_caption": latent_to_caption, "caption_to_latent": caption_to_latent}


def preference(values: torch.Tensor, reward: torch.Tensor) -> float:
    """Share of pairs (i < j) under each caption that V orders as the clean reward R does (ties in R left out)."""
    i, j = torch.triu_indices(len(values), len(values), offset=1)
    truth = torch.sign(reward[i] - reward[j])
    agree = torch.sign(values[i] - values[j]) == truth
    counted = truth != 0
    return (agree & counted).sum().item() / counted.sum().item()


def value_matrix(est, name: str, z: torch.Tensor, sigma: float, captions: list[str], mc_k: int, seed: int) -> torch.Tensor:
    """V[i, c] of estimator `name` (`stitchvm_rl.estimators.Estimators`) for every latent and caption."""
    pairs = z.repeat_interleave(len(captions), 0)
    prompts = [c for _ in range(len(z)) for c in captions]
    return est.score(name, pairs, sigma, prompts, mc_k, seed).float().view(len(z), len(captions))


def measure_level(value_dir: str, cfg: NoisyConfig, source: ImageSource, sigma: float, seed: int) -> dict:
    """One noise level, in a Ray task: the latents noised to `sigma`, each estimator's value matrix,
    its retrieval, preference accuracy, seconds and FLOPs per estimate; the clean reward's own
    retrieval as the reference."""
    from stitchvm_rl import rewards, zoo
    from stitchvm_rl.costs import count_flops
    from stitchvm_rl.estimators import Estimators
    from stitchvm_rl.policy import SD3Policy
    from stitchvm_rl.value.model import StitchedValueModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    value_model = StitchedValueModel.from_pretrained(value_dir, device=device, dtype=dtype)
    policy = SD3Policy.from_pretrained(value_model.config.backbone, dtype=dtype, device=device)
    reward = rewards.CLIPScore(zoo.load_clip(value_model.config.reward_model, device=device), scale=value_model.config.score_scale)
    est = Estimators(policy, value_model, reward, cfg.steps, cfg.cfg_scale, cfg.noise_level, cfg.batch_size, cfg.decode_batch_size)
    images, image_captions = load_images(source, policy.pipe.vae.config.sample_size, seed)
    captions = list(dict.fromkeys(image_captions))
    own = torch.tensor([captions.index(c) for c in image_captions])
    with torch.no_grad():
        x = images.to(device, policy.dtype)
        clean = torch.stack([reward(x, [c] * len(x)).float().cpu() for c in captions], 1)  # R[i, c]
        z0 = torch.cat([policy.encode_images(x[i : i + cfg.decode_batch_size]) for i in range(0, len(x), cfg.decode_batch_size)])
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0)
    z = (1 - sigma) * z0 + sigma * eps
    rows = [{"sigma": sigma, "estimator": "clean reward (sigma 0)", **retrieval(clean, own), "preference": 1.0}]
    cost = {}
    for name in cfg.estimators:
        start = time.perf_counter()
        values = value_matrix(est, name, z, sigma, captions, cfg.mc_k, seed + 1)
        seconds = time.perf_counter() - start
        rows.append({"sigma": sigma, "estimator": name, **retrieval(values, own), "preference": preference(values, clean)})
        flops = count_flops(lambda: est.score(name, z[:1], sigma, captions[:1], cfg.mc_k, seed=0))
        cost[name] = {"seconds_per_estimate": seconds / values.numel(), "flops_per_estimate": flops}
    return {"rows": rows, "cost": cost, "images": len(images), "captions": len(captions)}


def plot(table: list[dict], cost: dict, path) -> None:
    """Retrieval both ways and preference accuracy against sigma, one line per estimator, and the
    FLOPs of one estimate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    names = list(dict.fromkeys(r["estimator"] for r in table))
    for k, (key, title) in enumerate([("latent_to_caption", "latent -> caption, top-1"), ("caption_to_latent", "caption -> latent, top-1"), ("preference", "preference accuracy vs clean reward")]):
        for name in names:
            rows = [r for r in table if r["estimator"] == name]
            style = {"linestyle": "--", "color": "grey"} if name.startswith("clean") else {"marker": "o"}
            axes[k].plot([r["sigma"] for r in rows], [r[key] for r in rows], label=name, **style)
        axes[k].set(xlabel="sigma (noise level)", title=title, ylim=(0, 1.02))
        axes[k].grid(alpha=0.3)
    axes[0].legend()
    axes[3].bar(list(cost), [c["flops_per_estimate"] for c in cost.values()], color=["C0", "C1", "C2"][: len(cost)])
    axes[3].set(yscale="log", ylabel="forward FLOPs", title="cost of one estimate (mid sigma)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
