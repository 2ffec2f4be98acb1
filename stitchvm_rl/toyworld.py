"""The toy world: coloured shapes at 32x32, a tiny SD3 that follows its captions (loosely, as SD3.5 does), a toy CLIP.

Everything here is real model code at toy size, so the whole system can learn on a CPU in minutes:
- `render` draws a caption ("a red circle on the left": 6 colours x 3 shapes x 2 sides);
- `caption_accuracy` is a heuristic caption classifier (colour, shape, position) -- the held-out
  quality measure of later issues;
- `train_toyworld` trains, from scratch, an AutoencoderKL, an SD3 transformer *with* its three text
  encoders (whole-word vocabularies, frozen afterwards like SD3's) by flow matching on loose
  captions (`loosen_captions`), and a toy `CLIPModel` contrastively on exact ones, punishing blur.
  `jobs/train_toyworld.py` runs it; the result is committed under `stitchvm_rl/assets/toyworld/`
  and loaded through `from_pretrained` like real weights.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from tqdm import tqdm

from stitchvm_rl import zoo
from stitchvm_rl.config import Range

IMAGE_SIZE = 32
BACKGROUND = 0.2
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.9, 0.1, 0.9),
    "cyan": (0.1, 0.9, 0.9),
}
SHAPES = ("square", "circle", "triangle")
SIDES = ("left", "right")


def caption(colour: str, shape: str, side: str) -> str:
    """('red', 'circle', 'left') -> 'a red circle on the left' (the inverse of `parse_caption`)."""
    return f"a {colour} {shape} on the {side}"


CAPTIONS = [caption(c, s, p) for c in COLOURS for s in SHAPES for p in SIDES]
TOY_SD3 = zoo.SD3Sizes(
    layers=4, heads=4, head_dim=32, latent_size=8, vae_channels=(16, 32, 32), vae_groups=8, shift=1.0
)
# patch 8: a 4x4 grid, no finer than the toy DiT's 4x4 token grid -- as CLIP-L/336 (24x24) is no finer than
# SD3.5-M's 32x32 or 64x64. A finer reward grid would make the stitch invent detail by upsampling.
TOY_CLIP = zoo.CLIPSizes(hidden=64, layers=6, heads=4, image_size=32, patch_size=8, projection=64)


def parse_caption(caption: str) -> tuple[str, str, str]:
    """'a red circle on the left' -> ('red', 'circle', 'left')."""
    words = caption.split()
    if len(words) != 6 or words[1] not in COLOURS or words[2] not in SHAPES or words[5] not in SIDES:
        raise ValueError(f"'{caption}' is not a toy-world caption like 'a red circle on the left'")
    return words[1], words[2], words[5]


def is_caption(prompt: str) -> bool:
    """Whether `prompt` is one of the 36 toy-world captions."""
    try:
        parse_caption(prompt)
        return True
    except ValueError:
        return False


def random_captions(n: int, generator: torch.Generator) -> list[str]:
    return [CAPTIONS[i] for i in torch.randint(len(CAPTIONS), (n,), generator=generator).tolist()]


def render(captions: list[str], generator: torch.Generator, supersample: int = 4) -> torch.Tensor:
    """Draw each caption once: (B, 3, 32, 32) in [0, 1], random size and jitter, anti-aliased."""
    n = len(captions)
    res = IMAGE_SIZE * supersample
    coords = (torch.arange(res) + 0.5) / supersample
    ys, xs = coords.view(1, res, 1), coords.view(1, 1, res)
    parsed = [parse_caption(c) for c in captions]
    side = torch.tensor([9.0 if p[2] == "left" else 23.0 for p in parsed])
    cx = (side + (torch.rand(n, generator=generator) * 4 - 2)).view(n, 1, 1)
    cy = (16 + (torch.rand(n, generator=generator) * 12 - 6)).view(n, 1, 1)
    r = (4 + torch.rand(n, generator=generator) * 2.5).view(n, 1, 1)
    dx, dy = xs - cx, ys - cy
    square = (dx.abs() <= r) & (dy.abs() <= r)
    circle = dx**2 + dy**2 <= r**2
    triangle = (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2)  # apex up
    kind = torch.tensor([SHAPES.index(p[1]) for p in parsed]).view(n, 1, 1)
    mask = torch.where(kind == 0, square, torch.where(kind == 1, circle, triangle)).float()
    mask = F.avg_pool2d(mask.unsqueeze(1), supersample)  # (n, 1, 32, 32) coverage
    colour = torch.tensor([COLOURS[p[0]] for p in parsed]).view(n, 3, 1, 1)
    return BACKGROUND + mask * (colour - BACKGROUND)


def classify(images: torch.Tensor) -> list[tuple[str | None, str | None, str | None]]:
    """Heuristic caption classifier: (colour, shape, side) of the one shape in each image.

    Foreground = pixels more than 0.3 from the background. Colour = nearest palette colour of the
    mean foreground; side = foreground centroid; shape = triangle if the top third is much
    narrower than the bottom third, else square if the shape fills its bounding box, else circle.
    """
    palette = torch.tensor(list(COLOURS.values()))
    out = []
    for img in images.detach().float().cpu():
        fg = (img - BACKGROUND).abs().amax(0) > 0.3
        if fg.sum() < 4:
            out.append((None, None, None))
            continue
        mean = img[:, fg].mean(1)
        colour = list(COLOURS)[int(((palette - mean) ** 2).sum(1).argmin())]
        rows, cols = fg.nonzero(as_tuple=True)
        side = "left" if cols.float().mean() < IMAGE_SIZE / 2 else "right"
        top, bottom = int(rows.min()), int(rows.max())
        left, right = int(cols.min()), int(cols.max())
        height = bottom - top + 1
        widths = fg[top : bottom + 1].sum(1).float()
        third = max(1, height // 3)
        top_w, bottom_w = widths[:third].mean(), widths[-third:].mean()
        fill = fg.sum().float() / (height * (right - left + 1))
        if top_w < 0.6 * bottom_w:
            shape = "triangle"
        elif fill > 0.89:
            shape = "square"
        else:
            shape = "circle"
        out.append((colour, shape, side))
    return out


def caption_accuracy(images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Fraction of images whose colour, shape, position (and all three) match their caption."""
    predicted = classify(images)
    truth = [parse_caption(c) for c in captions]
    hits = {"colour": 0, "shape": 0, "position": 0, "all": 0}
    for p, t in zip(predicted, truth):
        hits["colour"] += p[0] == t[0]
        hits["shape"] += p[1] == t[1]
        hits["position"] += p[2] == t[2]
        hits["all"] += p == t
    return {k: v / len(captions) for k, v in hits.items()}


# ---------------------------------------------------------------- training
@dataclass
class ToyWorldConfig:
    """How `jobs/train_toyworld.py` trains the toy world (the committed weights used these defaults)."""

    out_dir: str = str(zoo.TOYWORLD_DIR)
    """Where to write sd3/, clip/, grid.png and report.json."""
    seed: int = 0
    """Seed of data, initialisation and sampling."""
    threads: Annotated[int, Range(1)] = 2
    """torch CPU threads."""
    num_images: Annotated[int, Range(36)] = 8192
    """Rendered training images (pre-encoded once by the VAE)."""
    vae_steps: Annotated[int, Range(1)] = 400
    """AutoencoderKL optimisation steps."""
    vae_batch: Annotated[int, Range(1)] = 32
    """AutoencoderKL batch size."""
    vae_lr: Annotated[float, Range(0)] = 2e-3
    """AutoencoderKL learning rate (AdamW)."""
    vae_linear_weight: Annotated[float, Range(0)] = 1.0
    """Weight of the linear-decodability loss (latents a linear map can already paint, as SD's can)."""
    dit_steps: Annotated[int, Range(1)] = 3000
    """Transformer + text-encoder flow-matching steps."""
    dit_batch: Annotated[int, Range(1)] = 128
    """Flow-matching batch size."""
    dit_lr: Annotated[float, Range(0)] = 1e-3
    """Flow-matching learning rate (AdamW, linear warm-up)."""
    warmup: Annotated[int, Range(0)] = 100
    """Warm-up steps of the flow-matching learning rate."""
    ema: Annotated[float, Range(0, 1)] = 0.995
    """EMA decay of the transformer and text encoders; the EMA weights are saved."""
    caption_dropout: Annotated[float, Range(0, 1)] = 0.1
    """Probability of training on the empty caption (enables CFG)."""
    loose_side: Annotated[float, Range(0, 1)] = 0.25
    """Share of the transformer's training captions that name the wrong side (loose web captions)."""
    loose_shape: Annotated[float, Range(0, 1)] = 0.2
    """Share of the transformer's training captions that name another shape than the one drawn."""
    clip_steps: Annotated[int, Range(1)] = 1000
    """Toy CLIP contrastive steps (batch = every caption x 4 images)."""
    clip_lr: Annotated[float, Range(0)] = 3e-4
    """Toy CLIP learning rate (AdamW, same warm-up; 1e-3 collapses to a constant embedding)."""
    clip_blur_margin: Annotated[float, Range(0)] = 0.05
    """Per pixel of Gaussian blur, how much lower the toy CLIP must score a blurred copy with its caption."""
    eval_images: Annotated[int, Range(1)] = 144
    """Images sampled for the final caption-accuracy check."""
    eval_steps: Annotated[int, Range(1)] = 20
    """Sampling steps of the final check."""
    eval_cfg: Annotated[float, Range(1)] = 3.0
    """CFG scale of the final check (it also reports CFG 1)."""


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, mininterval=5.0, dynamic_ncols=True)


def _linear_warmup(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps)))


def _train_vae(vae, cfg: ToyWorldConfig, gen: torch.Generator) -> dict:
    """Reconstruction + tiny KL + linear decodability: a throw-away linear decoder (one transposed
    conv) must also paint the image from the latent mean. SD's latents have this property (a 16->3
    linear map gives a recognisable preview); without it the toy latents are so non-linear that no
    stitch can align them with a reward model's patch features (within-prompt CLIP-score Spearman of
    the best linear stitch: 0.26 without, 0.59 with, on renders)."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)  # latent-to-pixel scale
    linear = torch.nn.ConvTranspose2d(vae.config.latent_channels, 3, kernel_size=2 * f, stride=f, padding=f // 2)
    opt = torch.optim.AdamW([*vae.parameters(), *linear.parameters()], lr=cfg.vae_lr)
    vae.train()
    with _progress(cfg.vae_steps, "vae") as bar:
        for _ in range(cfg.vae_steps):
            x = render(random_captions(cfg.vae_batch, gen), gen) * 2 - 1
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            rec = vae.decode(z).sample
            kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).mean()
            linear_rec = F.mse_loss(linear(post.mean), x)
            loss = F.mse_loss(rec, x) + 1e-4 * kl + cfg.vae_linear_weight * linear_rec
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update()
    vae.eval().requires_grad_(False)
    return {"vae_final_loss": loss.item(), "vae_linear_decoder_mse": linear_rec.item()}


def loosen_captions(captions: list[str], side: float, shape: float, gen: torch.Generator) -> list[str]:
    """The transformer's training captions, as loose as web alt-text: a share `side` names the other
    side, a share `shape` another shape. The base policy then makes the compositional mistakes SD3.5
    makes -- where an object goes is decided at high noise -- and a reward model trained on exact
    captions (the toy CLIP) catches them; that is the room reward fine-tuning has."""
    n = len(captions)
    flip_side = (torch.rand(n, generator=gen) < side).tolist()
    swap_shape = (torch.rand(n, generator=gen) < shape).tolist()
    shift = torch.randint(1, len(SHAPES), (n,), generator=gen).tolist()  # to one of the other shapes
    out = []
    for exact, flip, swap, other in zip(captions, flip_side, swap_shape, shift):
        colour, kind, where = parse_caption(exact)
        if flip:
            where = SIDES[1 - SIDES.index(where)]
        if swap:
            kind = SHAPES[(SHAPES.index(kind) + other) % len(SHAPES)]
        out.append(caption(colour, kind, where))
    return out


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each (3, H, W) image by its own Gaussian width `sigma` (pixels), reflect-padded."""
    radius = 6
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x.view(1, -1) / sigma.view(-1, 1).clamp_min(1e-3)) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, 2r+1)
    b, c, h, w = images.shape
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect").reshape(1, b * c, h + 2 * radius, w + 2 * radius)
    k = kernel.repeat_interleave(c, 0)
    out = F.conv2d(out, k.view(b * c, 1, 1, -1), groups=b * c)
    out = F.conv2d(out, k.view(b * c, 1, -1, 1), groups=b * c)
    return out.view(b, c, h, w)


def _text_parameters(pipe) -> list[torch.nn.Parameter]:
    return [p for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) for p in m.parameters()]


def _train_dit(pipe, latents, caption_ids, cfg: ToyWorldConfig, gen: torch.Generator) -> dict:
    """Flow matching of the transformer together with the three text encoders, EMA of both."""
    params = list(pipe.transformer.parameters()) + _text_parameters(pipe)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        m.train().requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=0.0)
    sched = _linear_warmup(opt, cfg.warmup)
    strings = CAPTIONS + [""]  # every step encodes the 37 distinct strings once, with gradients
    losses = []
    with _progress(cfg.dit_steps, "transformer") as bar:
        for step in range(cfg.dit_steps):
            idx = torch.randint(len(latents), (cfg.dit_batch,), generator=gen)
            z0, cap = latents[idx], caption_ids[idx].clone()
            cap[torch.rand(cfg.dit_batch, generator=gen) < cfg.caption_dropout] = len(CAPTIONS)
            embeds, _, pooled, _ = pipe.encode_prompt(
                strings, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=TOY_SD3.max_length
            )
            t = torch.sigmoid(torch.randn(cfg.dit_batch, generator=gen))  # logit-normal, as SD3 trains
            eps = torch.randn(z0.shape, generator=gen)
            tc = t.view(-1, 1, 1, 1)
            v = pipe.transformer(
                hidden_states=(1 - tc) * z0 + tc * eps,
                timestep=1000 * t,
                encoder_hidden_states=embeds[cap],
                pooled_projections=pooled[cap],
            ).sample
            loss = F.mse_loss(v, eps - z0)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - cfg.ema)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
            bar.update()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        m.eval().requires_grad_(False)  # frozen from now on, as SD3's text encoders are
    curve = [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)]
    return {"dit_loss_curve_per_50": curve, "dit_final_loss": curve[-1]}


def clip_image_features(bundle_model, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings of [0, 1] images already at the model's resolution."""
    pixels = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return F.normalize(bundle_model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)


def _train_clip(model, tokenizer, vae, cfg: ToyWorldConfig, gen: torch.Generator) -> dict:
    """Contrastive training on every caption x 4 images per step; half the images pass the VAE,
    so the toy CLIP also reads the softer images the generator makes. A hinge makes a blurred copy
    score lower with its caption by `clip_blur_margin` per pixel of blur, as aesthetic and preference
    models punish blur -- and as a posterior-mean (Tweedie) image is blurred where the sample is
    still undecided."""
    mean, std = torch.tensor(zoo.CLIP_MEAN), torch.tensor(zoo.CLIP_STD)
    tokens = tokenizer(CAPTIONS, padding="max_length", max_length=TOY_CLIP.max_length, truncation=True, return_tensors="pt")
    per = 4
    labels = torch.arange(len(CAPTIONS)).repeat_interleave(per)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.0)
    sched = _linear_warmup(opt, cfg.warmup)
    model.train()
    with _progress(cfg.clip_steps, "toy clip") as bar:
        for _ in range(cfg.clip_steps):
            images = render([c for c in CAPTIONS for _ in range(per)], gen)
            with torch.no_grad():
                half = images[::2] * 2 - 1
                images[::2] = ((vae.decode(vae.encode(half).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
            images = (images + 0.03 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
            blur = 0.5 + 1.5 * torch.rand(len(images), generator=gen)  # 0.5-2 px
            both = clip_image_features(model, torch.cat([images, gaussian_blur(images, blur)]), mean, std)
            img, blurred = both[: len(images)], both[len(images) :]
            txt = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T  # (images, captions)
            targets_t2i = (labels.unsqueeze(0) == torch.arange(len(CAPTIONS)).unsqueeze(1)).float() / per
            loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, targets_t2i))
            own = txt[labels]
            sharp_minus_blurred = ((img - blurred) * own).sum(1)
            loss = loss + F.relu(cfg.clip_blur_margin * blur - sharp_minus_blurred).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    model.eval().requires_grad_(False)
    return {"clip_final_loss": loss.item()}


def clip_caption_retrieval(model, tokenizer, images: torch.Tensor, captions: list[str]) -> float:
    """Fraction of images whose own caption ranks first among all 36 toy captions."""
    mean, std = torch.tensor(zoo.CLIP_MEAN), torch.tensor(zoo.CLIP_STD)
    tokens = tokenizer(CAPTIONS, padding="max_length", max_length=TOY_CLIP.max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = clip_image_features(model, images, mean, std)
        txt = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    best = (img @ txt.T).argmax(1)
    return sum(CAPTIONS[int(b)] == c for b, c in zip(best, captions)) / len(captions)


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """Save a (B, 3, H, W) [0, 1] batch as one PNG grid (rows of `nrow`), scaled up 4x."""
    from PIL import Image

    b, c, h, w = images.shape
    rows = math.ceil(b / nrow)
    grid = torch.ones(c, rows * (h + 2), nrow * (w + 2))
    for i, img in enumerate(images.detach().float().cpu()):
        r, col = divmod(i, nrow)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, col * (w + 2) + 1 : col * (w + 2) + 1 + w] = img
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).resize((arr.shape[1] * 4, arr.shape[0] * 4), Image.NEAREST).save(path)


def evaluate_policy(policy, n: int, steps: int, cfg_scale: float, seed: int) -> tuple[torch.Tensor, list[str], dict]:
    """Sample `n` captions (cycling through all 36) and score them with the caption classifier."""
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    traj = policy.sample(captions, num_steps=steps, cfg_scale=cfg_scale, generator=gen)
    with torch.no_grad():
        images = policy.decode(traj.final)
    return images, captions, caption_accuracy(images, captions)


def train_toyworld(cfg: ToyWorldConfig) -> dict:
    """Train VAE -> (transformer + text encoders) -> toy CLIP, save them, and report accuracies."""
    from stitchvm_rl.policy import SD3Policy

    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    report: dict = {"config": cfg.__dict__}
    pipe = zoo.random_sd3_pipeline(TOY_SD3, seed=cfg.seed)
    start = time.perf_counter()

    report |= _train_vae(pipe.vae, cfg, gen)
    report["vae_seconds"] = round(time.perf_counter() - start, 1)

    mark = time.perf_counter()
    captions = random_captions(cfg.num_images, gen)
    caption_ids = torch.tensor([CAPTIONS.index(c) for c in loosen_captions(captions, cfg.loose_side, cfg.loose_shape, gen)])
    with torch.no_grad():
        raw = torch.cat([pipe.vae.encode(render(captions[i : i + 256], gen) * 2 - 1).latent_dist.mean for i in range(0, len(captions), 256)])
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (raw - shift) * scale
    report["encode_seconds"] = round(time.perf_counter() - mark, 1)

    mark = time.perf_counter()
    report |= _train_dit(pipe, latents, caption_ids, cfg, gen)
    report["dit_seconds"] = round(time.perf_counter() - mark, 1)

    mark = time.perf_counter()
    clip, tokenizer = zoo.random_clip(TOY_CLIP, seed=cfg.seed)
    report |= _train_clip(clip, tokenizer, pipe.vae, cfg, gen)
    report["clip_seconds"] = round(time.perf_counter() - mark, 1)

    out.mkdir(parents=True, exist_ok=True)
    for sub, save in (("sd3", pipe.save_pretrained), ("clip", lambda p: zoo.save_clip(clip, tokenizer, p))):
        zoo.write_dir_atomically(out / sub, save, overwrite=True)

    # Evaluate through the saved files, i.e. exactly what users and later jobs load.
    policy = SD3Policy.from_pretrained(str(out / "sd3"))
    clip_bundle = zoo.load_clip(str(out / "clip"))
    held_out = torch.Generator().manual_seed(cfg.seed + 1)
    truth_caps = random_captions(cfg.eval_images, held_out)
    truth = render(truth_caps, held_out)
    report["classifier_on_ground_truth"] = caption_accuracy(truth, truth_caps)
    report["clip_retrieval_top1_held_out"] = clip_caption_retrieval(clip_bundle.model, clip_bundle.tokenizer, truth, truth_caps)
    _, _, report["samples_accuracy_cfg1"] = evaluate_policy(policy, cfg.eval_images, cfg.eval_steps, 1.0, cfg.seed)
    images, caps, report[f"samples_accuracy_cfg{cfg.eval_cfg:g}"] = evaluate_policy(
        policy, cfg.eval_images, cfg.eval_steps, cfg.eval_cfg, cfg.seed
    )
    report["clip_retrieval_top1_samples"] = clip_caption_retrieval(clip_bundle.model, clip_bundle.tokenizer, images, caps)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    save_grid(torch.cat([render(CAPTIONS, held_out), images[:36]]), out / "grid.png", nrow=12)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
