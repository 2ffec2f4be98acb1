"""Pixel rewards: `reward(images, prompts) -> (B,)` for images in [0, 1], NCHW.

No-grad by default; `reward(images, prompts, grad=True)` keeps the graph (guidance needs it).

    clip-family   CLIPScore (CLIP ViT-L/14), PickScore, HPSv2, DFN-CLIP, the toy CLIP:
                  `CLIPScore` = scale * cosine(image embedding, text embedding), transformers CLIPModel
                  (PickScore: exp(logit_scale) of its checkpoint * cosine / 26, as Flow-GRPO reports it)
    aesthetic     LAION aesthetic predictor v2: an MLP on the CLIP ViT-L/14 image embedding
    analytic      redness, brightness (linear in the pixels), colour_match (non-linear; toy world)
    weighted sum  `WeightedReward` of any of the above

HPSv2 and DFN-CLIP are OpenCLIP models published as pickles; `jobs/convert_weights.py` turns them
once into a transformers CLIPModel directory (safetensors), which `CLIPScore` then loads. We do not
depend on open-clip-torch: it requires torchvision, whose wheels pull a second (CUDA) torch.

Every published reward's weights come from its `RewardSpec.source` unless a job's `reward_sources`
names another (`{hpsv2: s3://bucket/weights/hpsv2.1, aesthetic_head: /mnt/shared/aesthetic.safetensors}`):
a hub id, a path present on every node, or a storage URI (downloaded on the node that loads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stitchvm_rl import toyworld, zoo
from stitchvm_rl.config import ConfigError, check_names, did_you_mean

RewardFn = Callable[..., torch.Tensor]


def resize_crop_normalise(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[0, 1] images -> a model's pixel values: bicubic resize of the short side, centre crop, normalise.

    Done in torch (not a PIL image processor) so it is batched, on device and differentiable.
    """
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        images = F.interpolate(images, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic", antialias=True, align_corners=False)
        top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
        images = images[..., top : top + size, left : left + size]
    mean, std = torch.as_tensor(mean, device=images.device).view(1, 3, 1, 1), torch.as_tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def clip_pixels(images: torch.Tensor, bundle: zoo.CLIPBundle) -> torch.Tensor:
    """[0, 1] images -> CLIP pixel values of `bundle`'s size and statistics, in its dtype."""
    return resize_crop_normalise(images, bundle.image_size, bundle.image_mean, bundle.image_std).to(bundle.model.dtype)


class CLIPScore:
    """scale * cos(image, text) of a transformers CLIPModel (CLIPScore, PickScore, HPSv2, DFN-CLIP, toy).

    `logit_scale=True` also multiplies by the checkpoint's own exp(logit_scale), the temperature its
    logits were trained with (PickScore reports exp(logit_scale) * cos)."""

    def __init__(self, bundle: zoo.CLIPBundle, scale: float = 1.0, logit_scale: bool = False):
        self.bundle = bundle
        self.scale = scale * (bundle.model.logit_scale.exp().item() if logit_scale else 1.0)
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, source: str, scale: float = 1.0, tokenizer: str | None = None, dtype: str = "float32", device: str = "cpu", logit_scale: bool = False):
        return cls(zoo.load_clip(source, dtype=dtype, device=device, tokenizer_source=tokenizer), scale, logit_scale)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings (B, P) of [0, 1] images."""
        return self.pixel_embeds(clip_pixels(images, self.bundle))

    def pixel_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings (B, P) of preprocessed CLIP pixel values."""
        out = self.bundle.model.get_image_features(pixel_values=pixel_values.to(self.bundle.model.device, self.bundle.model.dtype))
        return F.normalize(out.pooler_output.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings (B, P), each prompt encoded once."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            tok = self.bundle.tokenizer(missing, padding="max_length", truncation=True, return_tensors="pt")
            tok = {k: v.to(self.bundle.model.device) for k, v in tok.items()}
            emb = F.normalize(self.bundle.model.get_text_features(**tok).pooler_output.float(), dim=-1)
            self._text_cache.update(zip(missing, emb))
        return torch.stack([self._text_cache[p] for p in prompts])

    def __call__(self, images: torch.Tensor, prompts: list[str], grad: bool = False) -> torch.Tensor:
        text = self.text_embeds(prompts)
        with torch.set_grad_enabled(grad):
            return self.scale * (self.image_embeds(images) * text).sum(-1)


class AestheticMLP(torch.nn.Module):
    """The LAION aesthetic predictor v2 head (keys `layers.{0,2,4,6,7}` as published)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


class AestheticScore:
    """LAION aesthetic score: the MLP on the L2-normalised CLIP ViT-L/14 image embedding (prompt unused)."""

    def __init__(self, clip: CLIPScore, mlp: AestheticMLP):
        self.clip = clip
        self.mlp = mlp.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, clip_source: str, mlp_file: str, dtype: str = "float32", device: str = "cpu"):
        from stitchvm_rl.storage import local_copy

        path = Path(local_copy(mlp_file))
        if not mlp_file.endswith(".safetensors") or not path.is_file():
            raise FileNotFoundError(
                f"aesthetic head '{mlp_file}' must be an existing .safetensors file; convert the published "
                "sac+logos+ava1-l14-linearMSE.pth once with `python jobs/convert_weights.py kind=aesthetic ...`"
            )
        clip = CLIPScore.from_pretrained(clip_source, dtype=dtype, device=device)
        mlp = AestheticMLP(clip.bundle.model.config.projection_dim)
        mlp.load_state_dict(load_file(str(path)))
        return cls(clip, mlp.to(device))

    def __call__(self, images: torch.Tensor, prompts: list[str], grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return self.mlp(self.clip.image_embeds(images))


# ---------------------------------------------------------------- analytic rewards
def redness(images: torch.Tensor, prompts: list[str] | None = None, grad: bool = False) -> torch.Tensor:
    """Mean of R - (G + B)/2: linear in the pixels."""
    with torch.set_grad_enabled(grad):
        return (images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])).mean((1, 2))


def brightness(images: torch.Tensor, prompts: list[str] | None = None, grad: bool = False) -> torch.Tensor:
    """Mean Rec. 601 luma: linear in the pixels."""
    with torch.set_grad_enabled(grad):
        return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).mean((1, 2))


def colour_match(images: torch.Tensor, prompts: list[str], grad: bool = False, width: float = 0.25) -> torch.Tensor:
    """Toy world: share of the image whose colour is near the caption's colour (Gaussian kernel),
    i.e. how much of the named colour was painted -- non-linear in the pixels, so Tweedie is biased."""
    target = torch.tensor([toyworld.COLOURS[toyworld.parse_caption(p)[0]] for p in prompts], device=images.device)
    with torch.set_grad_enabled(grad):
        dist2 = ((images - target.view(-1, 3, 1, 1).to(images.dtype)) ** 2).sum(1)
        return torch.exp(-dist2 / (2 * width**2)).mean((1, 2)) * 10


def exact_colour(images: torch.Tensor, prompts: list[str], grad: bool = False) -> torch.Tensor:
    """Toy world: share of the image painted in the caption's *exact* colour (kernel width 0.05, a fifth
    of colour_match's). Strongly non-linear: an image whose colours are a little off scores near zero,
    so Tweedie, which scores the posterior-mean image, is biased wherever the outcome is still open."""
    return colour_match(images, prompts, grad=grad, width=0.05)


ANALYTIC = {"redness": redness, "brightness": brightness, "colour_match": colour_match, "exact_colour": exact_colour}
TOY_CAPTION_REWARDS = ("colour_match", "exact_colour")  # read the colour from a toy-world caption


@dataclass
class WeightedReward:
    """sum_k w_k r_k(images, prompts): DiffusionNFT's multi-reward is the plain (weight 1) sum."""

    parts: dict[str, tuple[RewardFn, float]]

    def __call__(self, images: torch.Tensor, prompts: list[str], grad: bool = False) -> torch.Tensor:
        return sum(w * fn(images, prompts, grad=grad) for fn, w in self.parts.values())

    def models(self) -> list[torch.nn.Module]:
        """The networks behind the parts (analytic parts have none), e.g. to compile them."""
        scorers = [getattr(fn, "clip", fn) for fn, _ in self.parts.values()]  # an aesthetic score holds its CLIP
        return [scorer.bundle.model for scorer in scorers if isinstance(scorer, CLIPScore)]

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each part's raw score (for logging)."""
        return {name: fn(images, prompts) for name, (fn, _) in self.parts.items()}


# ---------------------------------------------------------------- registry
@dataclass
class RewardSpec:
    """Where a published reward model comes from and how its score is scaled."""

    source: str
    """Hub id or local directory of a transformers CLIPModel."""
    scale: float = 1.0
    """Multiplier on the cosine (PickScore: 1/26, as Flow-GRPO reports it)."""
    logit_scale: bool = False
    """Also multiply by the checkpoint's exp(logit_scale) (PickScore: exp(logit_scale) * cos / 26)."""
    tokenizer: str | None = None
    """Where the tokenizer lives when the model directory has none."""
    head: str | None = None
    """Aesthetic MLP safetensors file (aesthetic only)."""
    convert: str | None = None
    """For weights published only as pickles: the `jobs/convert_weights.py` kind that makes `source`."""


PUBLISHED = {
    "clipscore": RewardSpec("openai/clip-vit-large-patch14"),
    "pickscore": RewardSpec("yuvalkirstain/PickScore_v1", scale=1 / 26, logit_scale=True, tokenizer="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    # OpenCLIP pickles, converted once by `jobs/convert_weights.py` into these directories:
    "hpsv2": RewardSpec("weights/hpsv2.1", convert="hpsv2"),
    "dfn_clip": RewardSpec("weights/dfn5b-clip-vit-h-14-378", convert="dfn_clip"),
    "aesthetic": RewardSpec("openai/clip-vit-large-patch14", head="weights/aesthetic-v2.safetensors", convert="aesthetic"),
    # BLIP, not CLIP (`stitchvm_rl.image_reward`): ImageReward.pt converted into this directory
    "image_reward": RewardSpec("weights/image-reward", convert="image_reward"),
    # offline stand-ins
    "toy_clip": RewardSpec("toyworld-clip"),
    "tiny_clip": RewardSpec("tiny-clip"),
}


# GenEval (detector + colour CLIP, `evaluation.geneval_scorer`): a non-differentiable reward of prompts
# with GenEval metadata, served by reward actors only (`stitchvm_rl.reward_actors`)
SERVED_ONLY = ("geneval",)
REWARD_NAMES = (*PUBLISHED, *ANALYTIC, *SERVED_ONLY)


HEAD_SOURCE = "aesthetic_head"  # the reward_sources key of the aesthetic MLP file (its CLIP: `aesthetic`)
GENEVAL_CLIP = "geneval_clip"  # the reward_sources key of GenEval's colour classifier (its detector: `geneval`)
SOURCE_KEYS = (*PUBLISHED, HEAD_SOURCE, *SERVED_ONLY, GENEVAL_CLIP)


def reward_source(name: str, sources: dict[str, str] | None = None) -> str:
    """Where published reward `name`'s model comes from: `sources[name]`, else its spec's."""
    return (sources or {}).get(name) or PUBLISHED[name].source


def published_sources(weights: dict[str, float], sources: dict[str, str] | None = None) -> dict[str, str]:
    """{name: source} of every published reward in `weights`: the CLIP models they load."""
    return {name: reward_source(name, sources) for name in weights if name in PUBLISHED}


def weight_sources(weights: dict[str, float], sources: dict[str, str] | None = None) -> dict[str, str]:
    """{reward_sources key: source} of every published reward in `weights` (the aesthetic head too):
    what the processes that build these rewards will open."""
    used = published_sources(weights, sources)
    if "aesthetic" in weights:
        used[HEAD_SOURCE] = (sources or {}).get(HEAD_SOURCE) or PUBLISHED["aesthetic"].head
    if "geneval" in weights:
        from stitchvm_rl.evaluation.scorers import scorer_source

        used |= {key: scorer_source(key, sources) for key in ("geneval", GENEVAL_CLIP)}
    return used


def _missing_conversion(name: str, sources: dict[str, str] | None = None) -> str:
    """Why published reward `name` cannot load yet (its converted weights are missing), else ''."""
    from stitchvm_rl.storage import source_exists

    spec = PUBLISHED[name]
    converted = ((sources or {}).get(HEAD_SOURCE) or spec.head) if spec.head is not None else reward_source(name, sources)
    if spec.convert is None or converted in zoo.BUILT_IN or source_exists(converted):
        return ""
    return (
        f"reward '{name}' needs converted weights at '{converted}', which do not exist; make them once with "
        f"`python jobs/convert_weights.py kind={spec.convert} checkpoint=<published file> out=<path>` "
        f"and pass that path (or its storage URI) as reward_sources.{HEAD_SOURCE if spec.head else name}"
    )


def check_reward_weights(weights: dict[str, float], key: str = "rewards", sources: dict[str, str] | None = None, sources_key: str = "reward_sources", served: bool = False) -> None:
    """A job's config check of `{name: weight}` and its `{name: source}` overrides, before Ray starts
    or a model loads: at least one reward, every name known, converted weights in place (else the
    actors would fail loading them). `served`: the job serves SERVED_ONLY rewards from reward actors."""
    if not weights:
        raise ConfigError(f"{key}: no reward given; name at least one, e.g. {key}={{toy_clip: 1.0}}")
    check_names(key, weights, REWARD_NAMES, "reward")
    check_names(sources_key, sources or {}, SOURCE_KEYS, "reward source")
    unserved = [name for name in weights if name in SERVED_ONLY and not served]
    if unserved:
        raise ConfigError(f"{key}: '{unserved[0]}' is a non-differentiable reward served by reward actors; jobs/nft.py trains with it, this job cannot use it")
    for name in weights:
        if name in SERVED_ONLY:
            from stitchvm_rl.evaluation.scorers import check_scorers

            check_scorers([name], {k: v for k, v in (sources or {}).items() if k in (name, GENEVAL_CLIP)}, key, sources_key)
            continue
        try:
            problem = _missing_conversion(name, sources) if name in PUBLISHED else ""
        except OSError as err:
            problem = f"the weights of reward '{name}' cannot be reached ({err}); check the storage credentials and endpoint"
        if problem:
            raise ConfigError(f"{key}: {problem}")


def build_reward(name: str, sources: dict[str, str] | None = None, device: str = "cpu", dtype: str = "float32") -> RewardFn:
    """One reward by name: a published model (from `sources[name]` if given) or an analytic one."""
    if name in ANALYTIC:
        return ANALYTIC[name]
    if name in SERVED_ONLY:
        raise ValueError(f"reward '{name}' is served by reward actors only (jobs/nft.py starts them); it cannot load in this process")
    if name not in PUBLISHED:
        raise ValueError(f"unknown reward '{name}'; known rewards: {', '.join(REWARD_NAMES)}{did_you_mean(name, REWARD_NAMES)}")
    spec = PUBLISHED[name]
    problem = _missing_conversion(name, sources)
    if problem:
        raise FileNotFoundError(problem)
    if name == "image_reward":
        from stitchvm_rl.image_reward import ImageRewardScore

        return ImageRewardScore.from_pretrained(reward_source(name, sources), device=device, dtype=dtype)
    if spec.head is not None:
        return AestheticScore.from_pretrained(reward_source(name, sources), (sources or {}).get(HEAD_SOURCE) or spec.head, dtype=dtype, device=device)
    return CLIPScore.from_pretrained(reward_source(name, sources), scale=spec.scale, tokenizer=spec.tokenizer, dtype=dtype, device=device, logit_scale=spec.logit_scale)


def build_rewards(weights: dict[str, float], sources: dict[str, str] | None = None, device: str = "cpu", served: dict[str, list[str]] | None = None) -> WeightedReward:
    """A weighted sum from `{name: weight}` (and optional `{name: source}` overrides); the rewards in
    `served` ({name: reward actor names}, `reward_actors`) are answered by those actors."""
    from stitchvm_rl.reward_actors import RemoteReward

    if not weights:
        raise ValueError("no reward given; name at least one, e.g. rewards={toy_clip: 1.0}")
    served = served or {}
    return WeightedReward({n: (RemoteReward(n, served[n]) if n in served else build_reward(n, sources, device=device), w) for n, w in weights.items()})
