"""Model zoo: real `from_pretrained` loading, tiny offline builds, and published configs on `meta`.

Sources are resolved in one place (`resolve`):
    "toyworld", "toyworld-clip"  the trained toy world committed in `stitchvm_rl/assets/toyworld/`
    "tiny-sd3", "tiny-clip"      tiny *random* models, built offline on first use into the cache
                                 ($STITCHVM_CACHE, default ~/.cache/stitchvm_rl) and then loaded
                                 through the same `from_pretrained` path as real weights
    an existing directory        a diffusers / transformers `save_pretrained` layout (on a cluster:
                                 present on every node that loads it, e.g. a shared mount)
    "s3://...", "gs://..."       such a directory in an object store, downloaded once per node
                                 into the cache (`storage.local_copy`) on the node that loads it
    "org/name"                   a Hugging Face hub id (needs network or a filled hub cache)

Published architectures (SD3.5-Medium transformer + VAE, CLIP ViT-L/14-336) are checked in as JSON
under `zoo_configs/` and can be instantiated on the `meta` device to count parameters and FLOPs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "zoo_configs"
TOYWORLD_DIR = PACKAGE_DIR / "assets" / "toyworld"
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
CLIP_VIT_L14_336 = "openai/clip-vit-large-patch14-336"

# The toy world's whole-word vocabulary: a caption is ~6 tokens instead of ~30 byte-level ones.
TOY_WORDS = "a red green blue yellow magenta cyan square circle triangle on the left right".split()

# Loading progress bars add nothing for models that load in a second; errors still show.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSourceError(ValueError):
    """A model source that cannot be loaded; the message says what to pass instead."""


def cache_dir() -> Path:
    return Path(os.environ.get("STITCHVM_CACHE", Path.home() / ".cache" / "stitchvm_rl"))


# ---------------------------------------------------------------- tokenizers built in code
def _apply_bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def word_clip_tokenizer(words: list[str], max_length: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell each word as one token (bytes still cover any text)."""
    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab.setdefault(c + suffix, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Merges added later have lower priority, so they never change how earlier words split.
        pieces = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _apply_bpe(pieces, ranks)
    return CLIPTokenizer(
        vocab=vocab,
        merges=list(ranks),
        model_max_length=max_length,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def word_t5_tokenizer(words: list[str], max_length: int) -> T5TokenizerFast:
    """A T5 unigram tokenizer with one piece per word, falling back to characters."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [("\u2581", -5.0)] + [(c, -8.0) for c in alphabet]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


# ---------------------------------------------------------------- random builds
@dataclass
class SD3Sizes:
    """Sizes of a small SD3-architecture pipeline (16 latent channels, like SD3)."""

    layers: int = 2
    heads: int = 2
    head_dim: int = 16
    latent_size: int = 4
    vae_channels: tuple[int, ...] = (8, 16)
    vae_groups: int = 4
    clip_hidden: int = 32
    t5_dim: int = 64
    max_length: int = 8
    shift: float = 3.0


def random_sd3_pipeline(sizes: SD3Sizes, words: list[str] = TOY_WORDS, seed: int = 0) -> StableDiffusion3Pipeline:
    """An SD3 pipeline with random weights: transformer, VAE, two CLIP text encoders and T5."""
    torch.manual_seed(seed)
    clip_text = dict(
        hidden_size=sizes.clip_hidden,
        intermediate_size=2 * sizes.clip_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=sizes.clip_hidden,
        max_position_embeddings=sizes.max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    tokenizer = word_clip_tokenizer(words, sizes.max_length)
    tokenizer_3 = word_t5_tokenizer(words, sizes.max_length)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer), **clip_text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer), **clip_text))
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=sizes.t5_dim,
            d_kv=sizes.t5_dim // 4,
            d_ff=2 * sizes.t5_dim,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
        )
    )
    width = sizes.heads * sizes.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=sizes.latent_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        attention_head_dim=sizes.head_dim,
        joint_attention_dim=sizes.t5_dim,
        caption_projection_dim=width,
        pooled_projection_dim=2 * sizes.clip_hidden,
        pos_embed_max_size=sizes.latent_size,
        qk_norm="rms_norm",
    )
    n = len(sizes.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=sizes.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=sizes.vae_groups,
        sample_size=sizes.latent_size * 2 ** (n - 1),
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=sizes.shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=word_clip_tokenizer(words, sizes.max_length),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


@dataclass
class CLIPSizes:
    """Sizes of a small transformers CLIPModel (vision + text towers)."""

    hidden: int = 32
    layers: int = 4
    heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    projection: int = 32
    max_length: int = 8


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def random_clip(sizes: CLIPSizes, words: list[str] = TOY_WORDS, seed: int = 0) -> tuple[CLIPModel, CLIPTokenizer]:
    """A CLIPModel with random weights and a whole-word tokenizer."""
    torch.manual_seed(seed)
    tokenizer = word_clip_tokenizer(words, sizes.max_length)
    tower = dict(
        hidden_size=sizes.hidden,
        intermediate_size=4 * sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        projection_dim=sizes.projection,
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=sizes.max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **tower,
        ),
        vision_config=dict(image_size=sizes.image_size, patch_size=sizes.patch_size, **tower),
        projection_dim=sizes.projection,
    )
    return CLIPModel(config), tokenizer


def save_clip(model: CLIPModel, tokenizer: CLIPTokenizer, path: Path) -> None:
    """`save_pretrained` of model + tokenizer, plus the preprocessing stats CLIP readers expect."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    size = model.config.vision_config.image_size
    (Path(path) / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "crop_size": {"height": size, "width": size},
                "size": {"shortest_edge": size},
                "do_resize": True,
                "do_center_crop": True,
                "do_normalize": True,
                "image_mean": CLIP_MEAN,
                "image_std": CLIP_STD,
            },
            indent=2,
        )
    )


def write_dir_atomically(target: Path, write, overwrite: bool = False) -> Path:
    """Run `write(tmp_dir)` and rename the finished directory to `target`, so readers only ever
    see a complete directory. An existing `target` is kept unless `overwrite`."""
    target = Path(target)
    if target.is_dir() and not overwrite:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    old = target.parent / f".{target.name}-old"
    try:
        write(tmp)
        if target.is_dir() and overwrite:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race with another builder: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def _tiny_mask2former(path: Path) -> None:
    from stitchvm_rl.evaluation.detector import save_tiny_detector

    save_tiny_detector(path)


def _tiny_image_reward(path: Path) -> None:
    from stitchvm_rl.image_reward import save_tiny_image_reward

    save_tiny_image_reward(path)


TINY_BUILDS = {
    "tiny-sd3": lambda path: random_sd3_pipeline(SD3Sizes()).save_pretrained(path),
    "tiny-clip": lambda path: save_clip(*random_clip(CLIPSizes()), path),
    "tiny-mask2former": _tiny_mask2former,  # GenEval's detector, random, COCO's 80 classes, run at 64 px
    "tiny-image-reward": _tiny_image_reward,
}
TOYWORLD_NAMES = {"toyworld": TOYWORLD_DIR / "sd3", "toyworld-clip": TOYWORLD_DIR / "clip"}
BUILT_IN = (*TOYWORLD_NAMES, *TINY_BUILDS)  # sources that need no download
TOY_BACKBONES = ("toyworld", "tiny-sd3")  # pipelines of a fixed small native size
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- resolve and load
def resolve(source: str) -> str:
    """A model source -> a local directory or a hub id (see the module docstring)."""
    from stitchvm_rl import storage

    if storage.is_uri(source):
        return storage.local_copy(source)
    if source in TOYWORLD_NAMES:
        path = TOYWORLD_NAMES[source]
        if not path.is_dir():
            raise ModelSourceError(
                f"the toy world weights are missing at {path}; rebuild them with `python jobs/train_toyworld.py`"
            )
        return str(path)
    if source in TINY_BUILDS:
        # Keyed by the builders' files: changing a builder (or a tokenizer) never serves a stale build.
        built_by = [Path(__file__), PACKAGE_DIR / "image_reward.py", PACKAGE_DIR / "evaluation" / "detector.py"]
        stamp = hashlib.sha256(b"".join(f.read_bytes() for f in built_by)).hexdigest()[:10]
        return str(write_dir_atomically(cache_dir() / f"{source}-{stamp}", TINY_BUILDS[source]))
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelSourceError(f"model source '{source}' is a file; pass the directory `save_pretrained` wrote")
    if HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return source
    from stitchvm_rl.config import did_you_mean

    names = [*TOYWORLD_NAMES, *TINY_BUILDS]
    raise ModelSourceError(
        f"model source '{source}' is neither an existing directory nor a hub id 'org/name'; "
        f"pass a local directory, a hub id, or one of: {', '.join(names)}{did_you_mean(source, names)}"
    )


def check_source(source: str, key: str) -> None:
    """A job's config check: refuse a model source that cannot resolve (a missing directory, a file),
    naming the config key -- before any actor or worker tries to load it."""
    from stitchvm_rl import storage
    from stitchvm_rl.config import ConfigError

    if storage.is_uri(source):  # checked where it is, downloaded only on the nodes that load it
        if not storage.source_exists(source):
            raise ConfigError(f"{key}: '{source}' does not exist in its storage; upload the `save_pretrained` directory there, or pass a hub id or a path every node has")
        return
    try:
        resolve(source)
    except ModelSourceError as err:
        raise ConfigError(f"{key}: {err}") from None


def config_file(source: str, file: str = "config.json") -> dict | None:
    """A model source's config (`file` inside it) read without any weights: from storage, a directory,
    the published configs (SD3.5-Medium, the published CLIPs) or the hub's cache. {} when the source
    has no such file; None where it cannot be read here (a hub id not in the cache)."""
    from stitchvm_rl import storage

    if storage.is_uri(source):
        text = storage.read_text(source, file)
        return json.loads(text) if text else {}
    if source == SD35_MEDIUM and file.endswith("config.json") and file.count("/") == 1:
        return published_config(f"sd35_medium_{file.split('/')[0]}")
    path = Path(resolve(source))
    if path.is_dir():
        return json.loads((path / file).read_text()) if (path / file).is_file() else {}
    from stitchvm_rl.memory_roles import SOURCE_ARCHITECTURES

    if file == "config.json" and source in SOURCE_ARCHITECTURES:
        return published_config(SOURCE_ARCHITECTURES[source])
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, file)
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def _load_error(source: str, kind: str, err: Exception) -> ModelSourceError:
    if Path(source).is_dir():
        return ModelSourceError(f"'{source}' is not a loadable {kind} directory ({type(err).__name__}: {err})")
    return ModelSourceError(
        f"could not load {kind} '{source}' from the hub or its cache ({type(err).__name__}: {err}); "
        f"download it first (`hf download {source}`) or pass a local directory"
    )


def load_sd3_pipeline(source: str, dtype: str = "float32", device: str = "cpu", text_encoders: bool = True) -> StableDiffusion3Pipeline:
    """SD3 / SD3.5 pipeline (transformer, VAE, 3 text encoders + tokenizers, scheduler) via `from_pretrained`.
    `text_encoders=False`: without the three encoders (11 GB at SD3.5-M in bf16), for processes that
    are handed prompt embeddings (learner ranks) -- `SD3Policy.encode_prompts` then refuses new prompts."""
    path = resolve(source)
    skip = {} if text_encoders else {"text_encoder": None, "text_encoder_2": None, "text_encoder_3": None}
    if Path(path).is_dir() and not (Path(path) / "model_index.json").is_file():
        raise ModelSourceError(
            f"'{source}' has no model_index.json, so it is not an SD3 pipeline directory; "
            "pass the folder `StableDiffusion3Pipeline.save_pretrained` wrote"
        )
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=Path(path).is_dir(), **skip)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(path, "SD3 pipeline", err) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_part(cls, source: str, subfolder: str, dtype: str, device: str):
    """One component of an SD3 pipeline directory / repo, without loading the rest."""
    path = resolve(source)
    try:
        part = cls.from_pretrained(path, subfolder=subfolder, dtype=DTYPES[dtype], local_files_only=Path(path).is_dir())
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(path, f"SD3 {subfolder}", err) from None
    return part.to(device).eval().requires_grad_(False)


def load_vae(source: str, dtype: str = "float32", device: str = "cpu") -> AutoencoderKL:
    """Only the VAE of an SD3 pipeline (workers that encode images need nothing else)."""
    return _load_part(AutoencoderKL, source, "vae", dtype, device)


def load_sd3_transformer(source: str, dtype: str = "float32", device: str = "cpu") -> SD3Transformer2DModel:
    """Only the transformer of an SD3 pipeline (a value model's head needs no text encoders)."""
    return _load_part(SD3Transformer2DModel, source, "transformer", dtype, device)


def vae_config(source: str) -> dict:
    """The VAE's config without its weights."""
    path = resolve(source)
    return AutoencoderKL.load_config(path, subfolder="vae", local_files_only=Path(path).is_dir())


@dataclass
class CLIPBundle:
    """A CLIP model with what it needs to read `[0, 1]` images and text: tokenizer and pixel stats."""

    model: CLIPModel
    tokenizer: CLIPTokenizer
    image_size: int
    image_mean: torch.Tensor  # (3,)
    image_std: torch.Tensor  # (3,)


def load_clip(source: str, dtype: str = "float32", device: str = "cpu", tokenizer_source: str | None = None) -> CLIPBundle:
    """A transformers `CLIPModel` + tokenizer (from `tokenizer_source` if the model repo has none)
    + preprocessing stats, via `from_pretrained`."""
    from transformers.utils import cached_file

    path = resolve(source)
    local = Path(path).is_dir()
    try:
        model = CLIPModel.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=local).to(device).eval()
        tok_path = resolve(tokenizer_source) if tokenizer_source else path
        tokenizer = CLIPTokenizer.from_pretrained(tok_path, local_files_only=Path(tok_path).is_dir())
        stats_file = cached_file(path, "preprocessor_config.json", local_files_only=local)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(path, "CLIP model", err) from None
    stats = json.loads(Path(stats_file).read_text())
    size = stats.get("crop_size", model.config.vision_config.image_size)
    size = size["height"] if isinstance(size, dict) else int(size)
    return CLIPBundle(
        model=model,
        tokenizer=tokenizer,
        image_size=size,
        image_mean=torch.tensor(stats.get("image_mean", CLIP_MEAN), device=device),
        image_std=torch.tensor(stats.get("image_std", CLIP_STD), device=device),
    )


# ---------------------------------------------------------------- published configs on meta
def published_config(name: str) -> dict:
    """A checked-in published config (a file stem under zoo_configs/)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ModelSourceError(f"no published config '{name}'; known: {known}")
    return json.loads(path.read_text())


def clip_config(name: str) -> CLIPConfig:
    """A checked-in CLIP architecture (clip_vit_l14_336, clip_vit_h14, clip_vit_h14_378) as a CLIPConfig."""
    return CLIPConfig(**{k: v for k, v in published_config(name).items() if k != "architectures"})


def meta_model(name: str) -> torch.nn.Module:
    """Instantiate a published architecture on the `meta` device (no memory, no weights)."""
    return published_model(name, "meta")


def published_model(name: str, device: str = "meta", dtype: str = "float32") -> torch.nn.Module:
    """A published architecture with random weights on `device` (`meta`: shapes only) -- for cost
    models and benchmarks at real scale when the real weights are not at hand."""
    config = published_config(name)
    with torch.device(device):
        if name == "sd35_medium_transformer":
            model = SD3Transformer2DModel.from_config(config)
        elif name == "sd35_medium_vae":
            model = AutoencoderKL.from_config(config)
        elif name.startswith("clip_"):
            model = CLIPModel(clip_config(name))
        elif config["architectures"] == ["CLIPTextModelWithProjection"]:  # SD3's text encoders 1 and 2
            model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
        elif config["architectures"] == ["T5EncoderModel"]:  # SD3's text encoder 3 (T5-XXL)
            model = T5EncoderModel(T5Config(**config))
        else:
            raise ModelSourceError(f"no builder for published architecture '{name}'")
    return model.to(DTYPES[dtype])


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# The blocks SD3 and CLIP repeat. Compiling each one (regional compilation) fuses the same kernels a
# whole-model torch.compile would, in a fraction of its compile time: identical blocks share one graph.
REPEATED_BLOCKS = ("JointTransformerBlock", "CLIPEncoderLayer")


def check_compile_toolchain(device: str, setting: str = "compile") -> None:
    """Refuse `<setting>=true` on the CPU where inductor finds no C++ compiler ($CXX, else g++): it writes
    C++ there and would otherwise fail only at the first compiled call, after the models are loaded.
    Checked where the job starts; CPU workers on other nodes are assumed to match."""
    from torch._inductor import cpp_builder, exc

    from stitchvm_rl.config import ConfigError

    if device != "cpu":
        return
    try:
        cpp_builder.get_cpp_compiler()  # the search inductor itself runs
    except exc.InvalidCxxCompiler:
        raise ConfigError(f"{setting}=true on the CPU needs a C++ compiler (torch.compile's inductor generates C++); install g++ (or set $CXX), or set {setting}=false") from None


def compile_repeated_blocks(*models: torch.nn.Module, **compile_kwargs) -> int:
    """`torch.compile` every SD3 joint block and CLIP image-side encoder layer inside `models`, in
    place (the modules keep their parameters and state dict keys); returns how many were compiled.
    CLIP's text tower stays eager: prompts are encoded once and cached, in batches of whatever size
    is new, so compiling it would only buy recompiles."""
    # SD3.5 mixes block variants (dual attention, the context-only last block), each run with and
    # without autograd and at one or two batch sizes: more graphs than dynamo's default limit of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = 0
    for model in models:
        text = [name for name, m in model.named_modules() if type(m).__name__.startswith("CLIPText")]  # CLIPTextModel, ...Transformer
        for name, module in model.named_modules():
            if type(module).__name__ in REPEATED_BLOCKS and not any(name.startswith(t + ".") for t in text):
                module.compile(**compile_kwargs)
                compiled += 1
    return compiled
