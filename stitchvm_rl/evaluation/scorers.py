"""Scorers: the clean reward models of the paper's tables, on saved uint8 images.

Training rewards (`stitchvm_rl.rewards`) preprocess in torch so that guidance can differentiate
through them. A reported score instead follows each reference implementation, PIL preprocessing
included, on the uint8 image a user would save:

    name       weights (default source)                       preprocessing        score
    hpsv2      HPS_v2_compressed.pt, converted                 open_clip val (224)  cos   (hpsv2.score)
    hpsv21     HPS_v2.1_compressed.pt, converted               open_clip val (224)  cos   (hpsv2.score, v2.1)
    pickscore  yuvalkirstain/PickScore_v1                      transformers CLIP    exp(logit_scale) cos (PickScore README)
    aesthetic  CLIP ViT-L/14 + sac+logos+ava1-l14 MLP, conv.   OpenAI clip (224)    MLP(unit image embedding)
    dfn_clip   apple/DFN5B-CLIP-ViT-H-14-378, converted        open_clip squash (378) cos
    clipscore  openai/clip-vit-large-patch14                   transformers CLIP    100 max(cos, 0) (torchmetrics)
    toy_clip   the toy world's CLIP                            transformers CLIP    cos
    caption    the toy world's caption classifier              --                   1 if colour, shape and side match
    image_reward  ImageReward.pt, converted (BLIP, `image_reward`)  OpenAI clip (224)  (MLP - mean) / std (ImageReward.score)
    geneval    GenEval's mmdet Mask2Former, converted          mmdet's test pipeline  1 if GenEval's checks pass
               + openai/clip-vit-large-patch14 (`geneval_clip`: the colour classifier; `evaluation.geneval_scorer`)

"open_clip val" and "OpenAI clip" are the same torchvision pipeline on a PIL image (bicubic resize of
the short side, centre crop rounded as torchvision does, /255, normalise with the CLIP mean and
std), written here in PIL and numpy so that torchvision is not needed. DFN5B's open_clip pretrained
config asks instead for resize_mode="squash": a bicubic resize of the whole image to size x size, no
crop. "transformers CLIP" is transformers' own PIL image processor with the checkpoint's size and
statistics.

Weights come from `ScorerSpec.source` unless `scorer_sources` names another (hub id, a path on every
node, or a storage URI), as for rewards; `aesthetic_head` names the MLP file and `geneval_clip` the
colour classifier's CLIP. On a toy backbone the detector and ImageReward default to tiny offline
models (`TOY_SOURCES`): their scores exercise the pipeline, they are not GenEval's or ImageReward's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stitchvm_rl import rewards, storage, toyworld, zoo
from stitchvm_rl.config import ConfigError, check_names


@dataclass(frozen=True)
class ScorerSpec:
    """Where a scorer's weights come from and how it preprocesses and scores."""

    source: str
    """Default weights: hub id, local directory or storage URI of a transformers CLIPModel ('' for none)."""
    preprocess: str
    """'hf' (transformers' CLIP image processor, PIL backend), 'torchvision' (open_clip / OpenAI clip: short side, centre crop), 'squash' (open_clip's DFN5B) or 'none'."""
    score: str
    """'cosine', 'logit_scale_cosine', 'clipscore', 'aesthetic' or 'caption'."""
    tokenizer: str | None = None
    """Where the tokenizer lives when the weights have none."""
    head: str | None = None
    """Aesthetic MLP safetensors file."""
    convert: str | None = None
    """For weights published as pickles: the `jobs/convert_weights.py` kind that makes `source`."""


P = rewards.PUBLISHED
SCORERS = {
    "hpsv2": ScorerSpec("weights/hpsv2", "torchvision", "cosine", convert="hpsv2"),
    "hpsv21": ScorerSpec(P["hpsv2"].source, "torchvision", "cosine", convert="hpsv2"),
    "pickscore": ScorerSpec(P["pickscore"].source, "hf", "logit_scale_cosine", tokenizer=P["pickscore"].tokenizer),
    "aesthetic": ScorerSpec(P["aesthetic"].source, "torchvision", "aesthetic", head=P["aesthetic"].head, convert="aesthetic"),
    "dfn_clip": ScorerSpec(P["dfn_clip"].source, "squash", "cosine", convert="dfn_clip"),
    "clipscore": ScorerSpec(P["clipscore"].source, "hf", "clipscore"),
    "toy_clip": ScorerSpec("toyworld-clip", "hf", "cosine"),
    "caption": ScorerSpec("", "none", "caption"),
    "image_reward": ScorerSpec(P["image_reward"].source, "torchvision", "image_reward", convert="image_reward"),
    # GenEval's own mmdet weights converted (jobs/convert_weights.py kind=geneval_detector); or, other
    # weights of the same architecture, scorer_sources.geneval=facebook/mask2former-swin-small-coco-instance
    "geneval": ScorerSpec("weights/geneval-mask2former", "mmdet", "geneval", convert="geneval_detector"),
}
HEAD_SOURCE = rewards.HEAD_SOURCE  # the scorer_sources key of the aesthetic MLP file
GENEVAL_CLIP = rewards.GENEVAL_CLIP  # the scorer_sources key of GenEval's colour classifier
GENEVAL_CLIP_SOURCE = "openai/clip-vit-large-patch14"  # open_clip ViT-L-14 "openai", as GenEval loads it
SOURCE_KEYS = (*SCORERS, HEAD_SOURCE, GENEVAL_CLIP)
TOY_SOURCES = {"geneval": "tiny-mask2former", GENEVAL_CLIP: "toyworld-clip", "image_reward": "tiny-image-reward"}


def default_sources(backbone: str, sources: dict[str, str] | None = None) -> dict[str, str]:
    """`sources` with, on a toy backbone, the tiny offline detector and ImageReward filled in."""
    return (TOY_SOURCES if backbone in zoo.TOY_BACKBONES else {}) | dict(sources or {})


def scorer_source(name: str, sources: dict[str, str] | None = None) -> str:
    if name == GENEVAL_CLIP:
        return (sources or {}).get(name) or GENEVAL_CLIP_SOURCE
    return (sources or {}).get(name) or SCORERS[name].source


def head_source(sources: dict[str, str] | None = None) -> str:
    return (sources or {}).get(HEAD_SOURCE) or SCORERS["aesthetic"].head


def _weights_problem(name: str, sources: dict[str, str] | None, sources_key: str) -> str:
    """Why scorer `name`'s weights cannot load here, else '' (`sources_key`: the config key of `sources`)."""
    spec = SCORERS[name]
    if not spec.source:
        return ""
    problem = _weights_problem_of(name, spec, scorer_source(name, sources), sources, sources_key)
    if name == "geneval" and not problem:  # and its colour classifier, a CLIP from the hub or a directory
        clip = ScorerSpec(GENEVAL_CLIP_SOURCE, "torchvision", "cosine")
        problem = _weights_problem_of(GENEVAL_CLIP, clip, scorer_source(GENEVAL_CLIP, sources), sources, sources_key)
    return problem


def _weights_problem_of(name: str, spec: ScorerSpec, source: str, sources: dict[str, str] | None, sources_key: str) -> str:
    # the default of a scorer published as a pickle is its converted copy: say how to make it
    converted, key = (head_source(sources), HEAD_SOURCE) if spec.head else (source, name)
    if spec.convert and (spec.head or source == spec.source) and not storage.source_exists(converted):
        return (
            f"scorer '{name}' needs converted weights at '{converted}', which do not exist; make them once with "
            f"`python jobs/convert_weights.py kind={spec.convert} checkpoint=<published file> out=<path>` "
            f"and pass that path (or its storage URI) as {sources_key}.{key}"
        )
    if source in zoo.BUILT_IN:
        return ""
    if storage.is_uri(source):
        return "" if storage.source_exists(source) else f"scorer '{name}': '{source}' does not exist in its storage"
    for needed in [source] + ([spec.tokenizer] if spec.tokenizer and source == spec.source else []):
        try:
            path = zoo.resolve(needed)
        except zoo.ModelSourceError as err:
            return f"scorer '{name}': {err}"
        if not Path(path).is_dir() and not _in_hub_cache(path):
            return f"scorer '{name}': '{path}' is not in the hub cache and the hub is off (HF_HUB_OFFLINE=1); download it once, or pass a local copy as {sources_key}.{name}"
    return ""


def _in_hub_cache(repo: str) -> bool:
    """A hub id that loads here: the hub is on, or its files are in the cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    return not constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(repo, "config.json"), str) or isinstance(try_to_load_from_cache(repo, "tokenizer_config.json"), str)


def check_scorers(names: list[str], sources: dict[str, str] | None = None, key: str = "scorers", sources_key: str = "scorer_sources") -> None:
    """A job's config check before Ray starts or a model loads: names known, weights reachable
    (`key` / `sources_key`: the config keys the messages name)."""
    if not names:
        raise ConfigError(f"{key}: none given; name at least one, e.g. scorers=[hpsv21, pickscore]")
    check_names(key, dict.fromkeys(names), SCORERS, "scorer")
    check_names(sources_key, sources or {}, SOURCE_KEYS, "scorer source")
    for name in names:
        problem = _weights_problem(name, sources, sources_key)
        if problem:
            raise ConfigError(f"{key}: {problem}")


# ---------------------------------------------------------------- preprocessing on PIL images
def torchvision_pixels(images: np.ndarray, size: int, mean: list[float], std: list[float], squash: bool = False) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, size, size) as open_clip's / OpenAI clip's eval transform:
    Resize(size, BICUBIC) on the PIL image (short side to `size`, long side truncated as torchvision
    does), CenterCrop(size) (offsets rounded as torchvision does), ToTensor, Normalize. `squash`:
    Resize((size, size), BICUBIC) instead, no crop (open_clip's resize_mode="squash")."""
    out = []
    for array in images:
        image = Image.fromarray(array).convert("RGB")
        if squash:
            out.append(np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0)
            continue
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        image = image.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
        w, h = image.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        out.append(np.asarray(image, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def hf_processor(bundle: zoo.CLIPBundle):
    """transformers' CLIP image processor (PIL backend) with the checkpoint's size and statistics."""
    from transformers import CLIPImageProcessorPil

    size = bundle.image_size
    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=bundle.image_mean.tolist(), image_std=bundle.image_std.tolist(),
    )


# ---------------------------------------------------------------- scoring
class Scorer:
    """One scorer: `scorer(images uint8 (B, H, W, 3), prompts) -> (B,) float64 scores` (GenEval: `load_scorer`)."""

    def __init__(self, name: str, clip: rewards.CLIPScore | None = None, head: rewards.AestheticMLP | None = None, image_reward=None):
        self.name, self.spec, self.clip, self.head, self.image_reward = name, SCORERS[name], clip, head, image_reward
        self.processor = hf_processor(clip.bundle) if clip is not None and self.spec.preprocess == "hf" else None

    @classmethod
    def load(cls, name: str, sources: dict[str, str] | None = None, device: str = "cpu", dtype: str = "float32") -> Scorer:
        spec = SCORERS[name]
        if spec.score == "caption":
            return cls(name)
        source = scorer_source(name, sources)
        if spec.score == "image_reward":
            from stitchvm_rl.image_reward import ImageRewardScore

            return cls(name, image_reward=ImageRewardScore.from_pretrained(source, device=device, dtype=dtype))
        tokenizer = spec.tokenizer if source == spec.source else None  # a given source brings its tokenizer
        clip = rewards.CLIPScore(zoo.load_clip(source, dtype=dtype, device=device, tokenizer_source=tokenizer))
        head = load_aesthetic_head(head_source(sources), clip.bundle.model.config.projection_dim, device) if spec.head else None
        return cls(name, clip, head)

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """The reference implementation's preprocessing of uint8 images."""
        if self.image_reward is not None:
            return torchvision_pixels(images, self.image_reward.image_size, zoo.CLIP_MEAN, zoo.CLIP_STD)
        if self.processor is not None:
            return self.processor(images=[Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
        b = self.clip.bundle
        return torchvision_pixels(images, b.image_size, b.image_mean.tolist(), b.image_std.tolist(), squash=self.spec.preprocess == "squash")

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        if self.spec.score == "caption":
            x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255.0
            truth = [toyworld.parse_caption(p) for p in prompts]
            return np.array([float(p == t) for p, t in zip(toyworld.classify(x), truth)])
        if self.image_reward is not None:
            return self.image_reward.pixel_rewards(self.pixels(images), prompts).double().cpu().numpy()
        embeds = self.clip.pixel_embeds(self.pixels(images))
        if self.spec.score == "aesthetic":
            return self.head(embeds.to(next(self.head.parameters()).dtype)).double().cpu().numpy()
        text = torch.cat([self.clip.text_embeds([p]) for p in prompts])  # each prompt encoded alone (a fixed batch), then cached
        cos = (embeds * text).sum(-1).double()
        if self.spec.score == "logit_scale_cosine":
            cos = cos * self.clip.bundle.model.logit_scale.exp().item()
        elif self.spec.score == "clipscore":
            cos = 100 * cos.clamp(min=0)
        return cos.cpu().numpy()


def load_scorer(name: str, sources: dict[str, str] | None = None, device: str = "cpu", dtype: str = "float32"):
    """Scorer `name`: a `Scorer`, or GenEval's detector-based `GenEvalScorer`."""
    if name == "geneval":
        from stitchvm_rl.evaluation.geneval_scorer import GenEvalScorer

        return GenEvalScorer.load(scorer_source(name, sources), scorer_source(GENEVAL_CLIP, sources), device=device)
    return Scorer.load(name, sources, device=device, dtype=dtype)


def score(scorer, images: np.ndarray, prompts: list[str], metadata: list[str]) -> tuple[np.ndarray, list[str] | None]:
    """(scores, per-image reasons or None): GenEval reads each prompt's metadata and says why an image failed."""
    if getattr(scorer, "name", "") == "geneval":
        return scorer(images, prompts, metadata)
    return scorer(images, prompts), None


def load_aesthetic_head(source: str, dim: int, device: str) -> rewards.AestheticMLP:
    from safetensors.torch import load_file

    mlp = rewards.AestheticMLP(dim)
    mlp.load_state_dict(load_file(storage.local_copy(source)))
    return mlp.to(device).eval().requires_grad_(False)
