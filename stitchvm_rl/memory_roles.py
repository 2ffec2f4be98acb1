"""What each job's roles hold on their GPUs, as `memory_plan.RolePlan`s: the models they load built
on `meta` from their real configs (a local backbone's own config files; SD3.5-Medium and the reward
CLIPs from the published configs in zoo_configs/), and the phases they run traced through them.

Roles of jobs/nft.py (`nft_roles`; the rank and node layout is jobs/nft.py's and learner.py's):
    rollout actor       `rollout_workers` of them, `rollout_gpus` each: the pipeline in rollout.dtype
                        with its three LoRA adapters, the value models (stitchvm), the reward models
                        (float32) where its estimator or the drift watch needs them
                        (`rollout.actor_needs_rewards`); scoring and decoding rollout.batch_size at a time
    learner rank        `train.num_workers` of them, `train.gpus_per_worker` each: the transformer and
                        VAE in train.dtype (no text encoders: embeddings come with the rollouts),
                        float32 LoRA (three adapters), AdamW state and gradients (ZeRO partitions
                        them over the ranks), one NFT micro-step (a whole group)
    learner rank 0      the same, plus the reward models and the evaluation (eval_batch_size prompts
                        at a time); the text encoders only while it encodes its evaluation prompts
Roles of jobs/stitch.py (`stitch_roles`):
    search task         one, `search.num_gpus`: the pipeline (float32; its text encoders, bf16 on a GPU,
                        only while the probe prompts are encoded), the reward's CLIP, float64 Gram matrices of every
                        candidate block, one probe batch's features after every block
    data actor          source=policy: `data.actors`, `data.actor_gpus` each, sampling and decoding the
                        training images once before stage 2 (the pipeline, float32); the readers that
                        stream images into the learner ranks use CPUs only
    learner rank        `train.num_workers`, a GPU each with train.use_gpu: the value model in bf16
                        (DeepSpeed), its trainable parts' float32 master, AdamW state and gradients
                        (ZeRO-2 partitions them), the teacher (the reward's image tower, bf16) and for
                        image files the VAE (float32); one batch through head, stitch and tail
    accuracy task       one per noise level, `eval.num_gpus` each: the pipeline and value model in bf16,
                        the reward's CLIP (float32); eval.batch_size latents per transformer pass,
                        eval.decode_batch_size per decode
Roles of jobs/dps.py (`dps_roles`): one DPS worker per method, a GPU each with device=cuda: the
pipeline in dtype, the value model (stitchvm) or the rewards (tweedie), one guided batch.
jobs/sample.py (`sample_roles`): one process, the pipeline, the rewards, batch_size images at a time.
jobs/evaluate.py (`evaluate_roles`): sampling actors (the pipeline with every policy's LoRA, a GPU each)
and scoring actors (every scorer's CLIP in float32, score_gpus each).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from stitchvm_rl import zoo
from stitchvm_rl.memory_plan import GPU, Call, Item, RolePlan, model_key, peak_live_bytes, role_gpu, saved_bytes, weight_bytes

# The reward models' CLIP architectures (zoo_configs/), for rewards whose weights are not at hand:
# by reward name, and by the hub ids and converted folders (README) a source may name
REWARD_ARCHITECTURES = {"clipscore": "clip_vit_l14", "aesthetic": "clip_vit_l14", "pickscore": "clip_vit_h14", "hpsv2": "clip_vit_h14", "dfn_clip": "clip_vit_h14_378"}
SOURCE_ARCHITECTURES = {
    "openai/clip-vit-large-patch14": "clip_vit_l14", zoo.CLIP_VIT_L14_336: "clip_vit_l14_336", "yuvalkirstain/PickScore_v1": "clip_vit_h14",
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": "clip_vit_h14", "apple/DFN5B-CLIP-ViT-H-14-378": "clip_vit_h14_378",
    "hpsv2": "clip_vit_h14", "dfn5b-clip-vit-h-14-378": "clip_vit_h14_378",  # folder names of jobs/convert_weights.py's outputs
}
SD3_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
CLIP_TEXT_TOKENS = 77  # SD3 joins 77 CLIP tokens to the T5 tokens
PLANNED_DIT_BLOCK = 4  # a value model not at hand is planned as StitchVM(4, 1) (the paper's SD3.5-M choice) over its reward


# ---------------------------------------------------------------- models on meta, and calls to trace
def sd3_parts(backbone: str, dtype: str) -> dict[str, torch.nn.Module]:
    """The SD3 pipeline's models on `meta` in `dtype`: SD3.5-Medium from the published configs, any
    other backbone (a directory, 'tiny-sd3', 'toyworld') from its own config files."""
    if backbone == zoo.SD35_MEDIUM:
        return {part: zoo.published_model(f"sd35_medium_{part}", "meta", dtype) for part in SD3_PARTS}
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoConfig, CLIPTextModelWithProjection, T5EncoderModel

    path = Path(zoo.resolve(backbone))
    builders = {
        "transformer": lambda d: SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(d)),
        "vae": lambda d: AutoencoderKL.from_config(AutoencoderKL.load_config(d)),
        "text_encoder": lambda d: CLIPTextModelWithProjection(AutoConfig.from_pretrained(d)),
        "text_encoder_2": lambda d: CLIPTextModelWithProjection(AutoConfig.from_pretrained(d)),
        "text_encoder_3": lambda d: T5EncoderModel(AutoConfig.from_pretrained(d)),
    }
    with torch.device("meta"):
        return {part: build(str(path / part)).to(zoo.DTYPES[dtype]) for part, build in builders.items() if (path / part).is_dir()}


def reward_model(name: str, source: str, clip_source: str = "") -> torch.nn.Module:
    """A reward's model(s) on `meta` in float32 (as rewards load): its own config where the weights
    are at hand (a local directory), else its published architecture. ImageReward is BLIP; GenEval
    (`clip_source`: its colour classifier) is a detector and a CLIP (`GenEvalModels`)."""
    if name == "image_reward":
        return image_reward_model(source)
    if name == "geneval":
        return GenEvalModels(source, clip_source)
    return reward_clip(name, source)


def _at_hand(source: str) -> Path:
    """The local directory a source names (a built-in one resolved), which may not exist."""
    path = Path(source).expanduser()
    return Path(zoo.resolve(source)) if source in zoo.BUILT_IN else path


def reward_clip(name: str, source: str) -> torch.nn.Module:
    """A reward's CLIP on `meta` in float32 (see `reward_model`)."""
    from transformers import CLIPConfig, CLIPModel

    path = _at_hand(source)
    with torch.device("meta"):
        if (path / "config.json").is_file():
            return CLIPModel(CLIPConfig.from_pretrained(str(path)))
    named = [arch for key, arch in SOURCE_ARCHITECTURES.items() if source == key or key in path.name]
    if name not in REWARD_ARCHITECTURES and not named:
        raise ValueError(f"the reward model {name or ''} {source} is not at hand and is not a published architecture to plan with; plan where its config.json can be read")
    return zoo.meta_model(REWARD_ARCHITECTURES.get(name) or named[0])


def image_reward_model(source: str) -> torch.nn.Module:
    """ImageReward (BLIP ViT-L + BERT-base, `stitchvm_rl.image_reward`) on `meta`: the converted
    directory's config.json, else the published sizes."""
    from transformers import BlipConfig

    from stitchvm_rl.image_reward import ImageRewardModel, published_config

    path = _at_hand(source)
    config = BlipConfig.from_pretrained(str(path)) if (path / "config.json").is_file() else published_config()
    with torch.device("meta"):
        return ImageRewardModel(config).to("meta").eval()


class GenEvalModels(torch.nn.Module):
    """GenEval's scorer on `meta`: the Mask2Former detector (its config where at hand, else GenEval's
    Swin-S architecture) run at its test scale, and the colour CLIP."""

    def __init__(self, source: str, clip_source: str):
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

        from stitchvm_rl.evaluation import detector

        super().__init__()
        path = _at_hand(source)
        config = Mask2FormerConfig.from_pretrained(str(path)) if (path / "config.json").is_file() else detector.published_config()
        with torch.device("meta"):
            self.detector = Mask2FormerForUniversalSegmentation(config).to("meta").eval()  # some of its tensors are made on the CPU
        self.clip = reward_clip("clipscore", clip_source)
        self.test_scale = detector.test_scale_of(path)


def reward_call(model: torch.nn.Module, batch: int, grad: bool = False) -> Call:
    """One reward forward of `batch` images: a CLIP's image tower, ImageReward's two towers at 35
    tokens, or GenEval's detector at its test scale (its colour CLIP sees a few crops after)."""
    from stitchvm_rl.image_reward import MAX_LENGTH, ImageRewardModel

    if isinstance(model, ImageRewardModel):
        size = model.config.vision_config.image_size

        def run(device):
            with torch.device(device):
                ids = torch.zeros(batch, MAX_LENGTH, dtype=torch.long)
                return model(torch.randn(batch, 3, size, size, requires_grad=grad), ids, None)  # no padding mask: it would read values

        return Call(("image reward", model_key(model), batch, grad), run)
    if isinstance(model, GenEvalModels):
        side = min(model.test_scale)  # a square image fits the short edge

        def run(device):
            with torch.device(device):
                return model.detector(pixel_values=torch.randn(batch, 3, side, side)).masks_queries_logits

        return Call(("geneval detector", model_key(model.detector), batch, side), run)
    return clip_image_call(model, batch, grad)


def value_model(path: str, backbone: str, rewards: dict[str, str], dtype: str) -> tuple[str, torch.nn.Module]:
    """A value model on `meta` in `dtype`: from its value_model.json where the directory is at hand
    (the committed toy one included), else StitchVM(PLANNED_DIT_BLOCK, 1) over the CLIP of the run's
    reward that its path names, or the largest one (`rewards`: {name: source}); returns (what it is,
    the model)."""
    import json

    from stitchvm_rl.value.model import CONFIG_FILE, ValueModelConfig, value_model_path

    try:
        config = ValueModelConfig(**json.loads((value_model_path(path) / CONFIG_FILE).read_text()))
        what, clip = f"value model {path}", reward_clip("", config.reward_model)
    except (OSError, ValueError):
        clips = {name: reward_clip(name, source) for name, source in rewards.items() if name not in ("image_reward", "geneval")}  # StitchVM stitches CLIP rewards
        named = [n for n in clips if n in Path(path).as_posix()]
        name = named[0] if named else max(clips, key=lambda n: zoo.count_params(clips[n]))
        what, clip = f"value model {path} (not at hand: planned as StitchVM({PLANNED_DIT_BLOCK}, 1) over {name}'s CLIP)", clips[name]
        config = ValueModelConfig(PLANNED_DIT_BLOCK, 1, "clip", backbone, "", "")
    return what, stitched_on_meta(config, clip, dtype)


def stitched_on_meta(config, clip, dtype: str) -> torch.nn.Module:
    """StitchedValueModel(`config`) over the `meta` CLIP `clip`, its head cut from the backbone's transformer."""
    from stitchvm_rl.value.model import DiTHead, StitchedValueModel

    transformer = sd3_parts(config.backbone, "float32")["transformer"]
    with torch.device("meta"):
        null = torch.empty(1, 1, transformer.config.joint_attention_dim), torch.empty(1, transformer.config.pooled_projection_dim)
        model = StitchedValueModel(config, DiTHead(transformer, min(config.dit_block, len(transformer.transformer_blocks)), *null), clip)
    return model.to(zoo.DTYPES[dtype])


def add_lora(transformer, rank: int, alpha: float, dtype: torch.dtype | None) -> None:
    """The policy's trained adapter "default" (SD3Policy.add_lora) in `dtype` (None: the base
    weights'); only it runs at a time, and `lora_bytes` counts its two copies "old" and "ema" with it."""
    from peft import LoraConfig

    from stitchvm_rl.policy import LORA_TARGETS

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS), adapter_name="default")
    for n, p in transformer.named_parameters():
        if ".lora_" in n and dtype is not None:
            p.data = p.data.to(dtype)
        p.requires_grad_(".lora_" in n)


def lora_bytes(module) -> int:
    """The three adapters' bytes (default, old, ema: `SD3Policy.add_lora`), of which `add_lora` made one."""
    from stitchvm_rl.policy import ADAPTERS

    return len(ADAPTERS) * injected_lora_bytes(module)


def injected_lora_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if ".lora_" in n)


def trainable_params(transformer) -> int:
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def latent_side(vae, transformer, resolution: int) -> int:
    """Latent side at `resolution` pixels (0: the transformer's native sample size)."""
    return resolution // (2 ** (len(vae.config.block_out_channels) - 1)) if resolution else transformer.config.sample_size


def velocity_call(transformer, batch: int, side: int, tokens: int, grad: bool = False) -> Call:
    """One transformer forward of `batch` latents of side `side` with `tokens` text tokens."""
    dt, cfg = next(transformer.parameters()).dtype, transformer.config

    def run(device):
        with torch.device(device):
            z = torch.randn(batch, cfg.in_channels, side, side, dtype=dt, requires_grad=grad)
            embeds, pooled = torch.randn(batch, tokens, cfg.joint_attention_dim, dtype=dt), torch.randn(batch, cfg.pooled_projection_dim, dtype=dt)
            return transformer(hidden_states=z, timestep=1000 * torch.rand(batch), encoder_hidden_states=embeds, pooled_projections=pooled).sample

    return Call(("velocity", model_key(transformer), batch, side, tokens, grad), run)


def decode_call(vae, batch: int, side: int, grad: bool = False) -> Call:
    dt = next(vae.parameters()).dtype

    def run(device):
        with torch.device(device):
            return vae.decode(torch.randn(batch, vae.config.latent_channels, side, side, dtype=dt, requires_grad=grad)).sample

    return Call(("decode", model_key(vae), batch, side, grad), run)


def encode_call(vae, batch: int, size: int) -> Call:
    dt = next(vae.parameters()).dtype

    def run(device):
        with torch.device(device):
            return vae.encode(torch.rand(batch, 3, size, size, dtype=dt)).latent_dist.mean

    return Call(("encode", model_key(vae), batch, size), run)


def clip_image_call(clip, batch: int, grad: bool = False) -> Call:
    size, dt = clip.config.vision_config.image_size, next(clip.parameters()).dtype

    def run(device):
        with torch.device(device):
            features = clip.get_image_features(pixel_values=torch.randn(batch, 3, size, size, dtype=dt, requires_grad=grad))
            return getattr(features, "pooler_output", features)  # transformers 5 returns an output object

    return Call(("clip image", model_key(clip), batch, grad), run)


def value_call(model, batch: int, side: int, channels: int, tokens: int, grad: bool = False) -> Call:
    """One value-model forward; its head reads `tokens` prompt tokens (head_conditioning=prompt) or the empty prompt."""
    from stitchvm_rl.policy import PromptEmbeds

    dt = next(model.parameters()).dtype
    width, pooled_width = model.head.null_embeds.shape[-1], model.head.null_pooled.shape[-1]

    def run(device):
        with torch.device(device):
            z = torch.randn(batch, channels, side, side, dtype=dt, requires_grad=grad)
            cond = PromptEmbeds(torch.randn(batch, tokens, width, dtype=dt), torch.randn(batch, pooled_width, dtype=dt))
            return model.embed(z, torch.rand(batch), cond)[0]

    return Call(("value", model_key(model), model.config.head_conditioning, batch, side, tokens, grad), run)


def text_tokens(parts: dict, max_sequence_length: int) -> int:
    """Joint-attention text tokens of SD3: 77 CLIP + the T5 tokens (none without T5)."""
    return CLIP_TEXT_TOKENS + (max_sequence_length if "text_encoder_3" in parts else 0)


def t5_tokens(backbone: str, max_sequence_length: int) -> int:
    """T5 tokens per prompt as SD3Policy encodes them: min(the tokenizer's maximum, max_sequence_length)."""
    if backbone == zoo.SD35_MEDIUM:
        return max_sequence_length
    import json

    path = Path(zoo.resolve(backbone)) / "tokenizer_3" / "tokenizer_config.json"
    limit = json.loads(path.read_text()).get("model_max_length", max_sequence_length) if path.is_file() else max_sequence_length
    return min(int(limit), max_sequence_length)


def prompt_embedding_bytes(parts: dict, tokens: int, dtype: str) -> int:
    """One prompt's cached SD3 embeddings: joint tokens x joint_attention_dim, and the pooled vector."""
    cfg = parts["transformer"].config
    return (tokens * cfg.joint_attention_dim + cfg.pooled_projection_dim) * zoo.DTYPES[dtype].itemsize


def parts_items(parts: dict, dtype: str) -> list[Item]:
    """The pipeline's base weights (LoRA layers counted apart)."""
    return [Item(f"{part} weights ({dtype})", sum(weight_bytes(m).values()) - injected_lora_bytes(m)) for part, m in parts.items()]


def reward_items(rewards: dict[str, torch.nn.Module]) -> list[Item]:
    return [Item(f"reward {name} (float32)", sum(weight_bytes(m).values())) for name, m in rewards.items()]


# ---------------------------------------------------------------- the roles of jobs/nft.py
def prompts_seen(cfg, prompt_count: int | None, processes: int) -> int:
    """Distinct prompts one of `processes` encodes over the run: its share of the run's groups, at
    most the distinct training prompts (`prompt_count`, None when not at hand)."""
    share = -(-cfg.groups_per_epoch * cfg.epochs // processes)
    return share if prompt_count is None else min(prompt_count, share)


def cache_item(parts: dict, count: int, tokens: int, dtype: str, which: str) -> Item:
    """A CPU prompt-embedding cache of `count` prompts (`SD3Policy`)."""
    one = prompt_embedding_bytes(parts, tokens, dtype)
    return Item(f"prompt-embedding cache, {which} ({count} x {one / 2**20:.2f} MiB, {dtype})", count * one)


def text_encoder_bytes(parts: dict) -> int:
    return sum(sum(weight_bytes(m).values()) for part, m in parts.items() if part.startswith("text_encoder"))


def nft_roles(cfg, reward_sources: dict[str, str], value_models: list[str], prompt_count: int | None) -> list[RolePlan]:
    """The rollout actor, learner rank and learner rank 0 of an NFTConfig `cfg` (see the module
    docstring); `reward_sources`: {published reward: source}; `value_models`: what stitchvm loads;
    `prompt_count`: distinct training prompts (None when the prompt file is not at hand)."""
    from stitchvm_rl.rollout import actor_needs_rewards

    ro, train = cfg.rollout, cfg.train
    rollout_gpu = role_gpu(cfg.rollout_gpus, cfg.rollout_resources, cfg.memory, "rollout actor")
    learner_gpu = role_gpu(train.gpus_per_worker if train.use_gpu else 0, train.resources_per_worker, cfg.memory, "learner rank")
    published = {name: reward_model(name, source) for name, source in reward_sources.items()}
    return [
        rollout_actor(cfg, published if actor_needs_rewards(ro.estimator, cfg.drift_every) else {}, reward_sources, value_models, prompt_count, rollout_gpu),
        *learner_ranks(cfg, published, prompt_count, learner_gpu),
    ]


def reward_actor_roles(cfg, served_sources: dict[str, str]) -> list[RolePlan]:
    """jobs/nft.py's reward actors (`stitchvm_rl.reward_actors`), `reward_actors` per served reward,
    `reward_gpus` each: the reward's model(s) in float32, reward_batch_size images per forward pass."""
    gpu = role_gpu(cfg.reward_gpus, {}, cfg.memory, "reward actor")
    batch = cfg.reward_batch_size
    plans = []
    for name, source in served_sources.items():
        if name == "geneval_clip":
            continue
        model = reward_model(name, source, served_sources.get("geneval_clip", ""))
        plan = RolePlan(f"reward actor ({name})", cfg.reward_actors, cfg.reward_gpus, gpu.gib, reward_items({name: model}), models=[model], placement=gpu.where)
        call = reward_call(model, batch)
        plan.phases = [Item(f"scoring {batch} images", peak_live_bytes(call), (call,))]
        plan.fixes = ["a smaller reward_batch_size", "reward_gpus=1 (a GPU of its own)"]
        plans.append(plan)
    return plans


def rollout_actor(cfg, rewards: dict[str, torch.nn.Module], reward_sources: dict[str, str], value_models: list[str], prompt_count: int | None, gpu: GPU) -> RolePlan:
    """A rollout actor: the whole pipeline in rollout.dtype (it encodes its prompts) with three LoRA
    adapters, the value models (stitchvm), the rewards it needs; one phase at a time."""
    ro = cfg.rollout
    parts = sd3_parts(cfg.backbone, ro.dtype)
    transformer, vae = parts["transformer"], parts["vae"]
    add_lora(transformer, ro.lora_rank, ro.lora_alpha, None)
    side, tokens = latent_side(vae, transformer, ro.resolution), text_tokens(parts, t5_tokens(cfg.backbone, ro.max_sequence_length))
    plan = RolePlan("rollout actor", cfg.rollout_workers, cfg.rollout_gpus, gpu.gib, placement=gpu.where)
    plan.resident = [*parts_items(parts, ro.dtype), Item(f"LoRA adapters default, old, ema ({ro.dtype})", lora_bytes(transformer))]
    plan.models = [*parts.values()]
    sampling = velocity_call(transformer, ro.group_size, side, tokens)
    plan.phases = [Item(f"sampling {ro.group_size} latents (transformer)", peak_live_bytes(sampling), (sampling,))]
    scored = min(ro.batch_size, ro.group_size)
    if ro.estimator == "stitchvm":
        for path in value_models:
            what, model = value_model(path, cfg.backbone, reward_sources, ro.dtype)
            plan.resident.append(Item(f"{what} ({ro.dtype})", sum(weight_bytes(model).values())))
            plan.models.append(model)
            scoring = value_call(model, scored, side, transformer.config.in_channels, tokens)
            plan.phases.append(Item(f"scoring {scored} latents ({what})", peak_live_bytes(scoring), (scoring,)))
    if rewards:
        plan.resident += reward_items(rewards)
        plan.models += rewards.values()
        calls = (decode_call(vae, scored, side), *(reward_call(m, scored) for m in rewards.values()))
        decoding = peak_live_bytes(calls[0]) + max(peak_live_bytes(c) for c in calls[1:])
        why = "the terminal reward" if ro.estimator == "terminal" else ("the drift watch" if ro.estimator == "stitchvm" else f"{ro.estimator}'s reward")
        plan.phases.append(Item(f"decoding and rewarding {scored} images ({why})", decoding, calls))
    seen = min(ro.prompt_cache, prompts_seen(cfg, prompt_count, cfg.rollout_workers))
    plan.host = [cache_item(parts, seen, tokens, ro.dtype, f"at most rollout.prompt_cache={ro.prompt_cache} prompts")]
    plan.fixes = [
        *([] if ro.dtype != "float32" else ["rollout.dtype=bfloat16"]),
        f"a smaller rollout.batch_size (latents scored and images decoded at once: {ro.batch_size})",
        *(["drift_every=0 (stitchvm actors then load no reward)"] if rewards and ro.estimator == "stitchvm" else []),
        "a GPU with more memory (rollout_resources / the cluster's rollout node type)",
    ]
    return plan


def learner_ranks(cfg, rewards: dict[str, torch.nn.Module], prompt_count: int | None, gpu: GPU) -> list[RolePlan]:
    """A learner rank: the pipeline in train.dtype without text encoders (its prompt embeddings come
    with the rollouts), float32 LoRA (three adapters), AdamW state and gradients partitioned by ZeRO,
    one NFT micro-step (a whole group). Rank 0 also holds the rewards and evaluates; it loads the text
    encoders to encode its evaluation prompts once, and frees them."""
    ro, train = cfg.rollout, cfg.train
    parts = sd3_parts(cfg.backbone, train.dtype)
    transformer, vae = parts["transformer"], parts["vae"]
    add_lora(transformer, ro.lora_rank, ro.lora_alpha, torch.float32)
    side, tokens = latent_side(vae, transformer, ro.resolution), text_tokens(parts, t5_tokens(cfg.backbone, ro.max_sequence_length))
    without_text = {part: m for part, m in parts.items() if not part.startswith("text_encoder")}
    learner = RolePlan("learner rank", train.num_workers, train.gpus_per_worker, gpu.gib, models=[*without_text.values()], placement=gpu.where)
    learner.resident = [*parts_items(without_text, train.dtype), *trained_lora_items(transformer, train)]
    if train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    step = velocity_call(transformer, ro.group_size, side, tokens)
    mode = "with" if train.gradient_checkpointing else "without"
    learner.phases = [Item(f"NFT micro-step: {ro.group_size} latents, saved for the backward {mode} gradient checkpointing + one forward's transient", saved_bytes(step) + peak_live_bytes(step), (step,), backward=True)]
    learner.fixes = [
        *([] if train.gradient_checkpointing else ["train.gradient_checkpointing=true"]),
        *([] if train.dtype == "bfloat16" else ["train.dtype=bfloat16"]),
        f"a smaller rollout.group_size (each micro-step trains one group of {ro.group_size})",
        "a GPU with more memory (train.resources_per_worker / the cluster's learner node type)",
    ]

    rank0 = RolePlan("learner rank 0", 1, train.gpus_per_worker, gpu.gib, [*learner.resident, *reward_items(rewards)], list(learner.phases), models=[*learner.models, *rewards.values()], placement=gpu.where)
    evaluated = cfg.eval_prompts if prompt_count is None else min(cfg.eval_prompts, prompt_count)
    rank0.host = [cache_item(parts, evaluated, tokens, train.dtype, "evaluation prompts")]
    rank0.phases.insert(0, Item("encoding the evaluation prompts at start (text encoders, freed after)", text_encoder_bytes(parts)))
    rank0.phases.append(evaluation_phase(cfg, transformer, vae, rewards, side, tokens))
    rank0.fixes = [*learner.fixes, f"a smaller eval_batch_size ({cfg.eval_batch_size})"]
    return [learner, rank0]


def trained_lora_items(transformer, train) -> list[Item]:
    """A learner rank's LoRA and its optimisation (`train`: NFTTrainConfig or DraftTrainConfig): the
    three float32 adapters, gradients and AdamW state (ZeRO partitions them over the ranks), reduce buckets."""
    trainable = trainable_params(transformer)
    shards = train.num_workers if train.zero_stage >= 1 else 1
    return [
        Item("LoRA adapters default, old, ema (float32)", lora_bytes(transformer)),
        Item("gradients of the trainable LoRA (float32)", trainable * 4 // (shards if train.zero_stage >= 2 else 1)),
        Item(f"AdamW moments + ZeRO's float32 partition (float32, 1/{shards} of {trainable:,} parameters)", 3 * trainable * 4 // shards),
        Item("ZeRO reduce buckets (float32, at most the trainable parameters, x2)", 2 * trainable * 4),
    ]


def evaluation_phase(cfg, transformer, vae, rewards: dict[str, torch.nn.Module], side: int, tokens: int) -> Item:
    """Learner rank 0's evaluation: eval_batch_size prompts at a time sampled, decoded and rewarded."""
    batch = min(cfg.eval_batch_size, cfg.eval_prompts)
    calls = (velocity_call(transformer, batch, side, tokens), decode_call(vae, batch, side), *(reward_call(m, batch) for m in rewards.values()))
    return Item(f"evaluation: {batch} prompts at a time sampled, decoded and rewarded", max(peak_live_bytes(c) for c in calls), calls)


# ---------------------------------------------------------------- the roles of jobs/draft.py
def draft_roles(cfg, reward_sources: dict[str, str], value_models: list[str], prompt_count: int | None) -> list[RolePlan]:
    """The learner ranks of a DraftConfig `cfg`: each holds the whole pipeline in train.dtype (it
    encodes its own prompts), float32 LoRA and its optimisation, and the objective's models -- the
    rewards in float32 (terminal) or the value models in train.dtype (stitchvm); rank 0 also holds
    the rewards and evaluates. One DRaFT micro-step of draft.batch_size latents: the inputs of the K
    grad steps, one step's saved activations (K of them without draft.checkpoint_steps), and the
    decode and reward (terminal) or the value models (stitchvm) saved for the backward."""
    draft, train = cfg.draft, cfg.train
    gpu = role_gpu(train.gpus_per_worker if train.use_gpu else 0, train.resources_per_worker, cfg.memory, "learner rank")
    parts = sd3_parts(cfg.backbone, train.dtype)
    transformer, vae = parts["transformer"], parts["vae"]
    add_lora(transformer, draft.lora_rank, draft.lora_alpha, torch.float32)
    if train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    side, tokens = latent_side(vae, transformer, draft.resolution), text_tokens(parts, t5_tokens(cfg.backbone, draft.max_sequence_length))
    rewards = {name: reward_model(name, source).requires_grad_(False) for name, source in reward_sources.items()}
    n, k = draft.batch_size, draft.backprop_steps
    step = velocity_call(transformer, n, side, tokens, grad=True)
    kept = saved_bytes(step) * (1 if draft.checkpoint_steps else k)
    inputs = k * n * transformer.config.in_channels * side * side * zoo.DTYPES[train.dtype].itemsize
    learner = RolePlan("learner rank", train.num_workers, train.gpus_per_worker, gpu.gib, [*parts_items(parts, train.dtype), *trained_lora_items(transformer, train)], models=[*parts.values()], placement=gpu.where)
    if draft.estimator == "terminal":
        learner.resident += reward_items(rewards)
        learner.models += rewards.values()
        calls = [step, decode_call(vae, n, side, grad=True), *(reward_call(m, n, grad=True) for m in rewards.values())]
        what = "VAE decode and rewards"
    else:
        calls = [step]
        for path in value_models:
            described, model = value_model(path, cfg.backbone, reward_sources, train.dtype)
            model.requires_grad_(False)
            learner.resident.append(Item(f"{described} ({train.dtype})", sum(weight_bytes(model).values())))
            learner.models.append(model)
            calls.append(value_call(model, n, side, transformer.config.in_channels, tokens, grad=True))
        what = "value models"
    objective = sum(saved_bytes(c) for c in calls[1:])
    kept_what = "one step's activations (draft.checkpoint_steps)" if draft.checkpoint_steps else f"{k} steps' activations"
    learner.phases = [Item(f"DRaFT-{k} micro-step: {n} latents, {kept_what} + the {what} saved for the backward + one forward's transient", kept + inputs + objective + peak_live_bytes(step), tuple(calls), backward=True)]
    seen = min(draft.prompt_cache, cfg.epochs * draft.grad_accum * n if prompt_count is None else prompt_count)
    learner.host = [cache_item(parts, seen, tokens, train.dtype, f"at most draft.prompt_cache={draft.prompt_cache} prompts")]
    learner.fixes = [
        *([] if train.dtype == "bfloat16" else ["train.dtype=bfloat16"]),
        *([] if draft.checkpoint_steps else ["draft.checkpoint_steps=true"]),
        *([] if train.gradient_checkpointing else ["train.gradient_checkpointing=true"]),
        f"a smaller draft.batch_size ({n} latents per micro-step; raise draft.grad_accum to keep the batch)",
        "a GPU with more memory (train.resources_per_worker / the cluster's learner node type)",
    ]
    rank0 = dataclasses.replace(learner, role="learner rank 0", processes=1, resident=list(learner.resident), phases=list(learner.phases), models=list(learner.models))
    if draft.estimator != "terminal":
        rank0.resident += reward_items(rewards)
        rank0.models += rewards.values()
    rank0.phases.append(evaluation_phase(cfg, transformer, vae, rewards, side, tokens))
    rank0.fixes = [*learner.fixes, f"a smaller eval_batch_size ({cfg.eval_batch_size})"]
    return [learner, rank0]


# ---------------------------------------------------------------- the roles of jobs/stitch.py
def stitch_roles(cfg) -> list[RolePlan]:
    """The search task, data actors, learner ranks and accuracy tasks of a StitchConfig `cfg` (see the
    module docstring). The learners' value model is planned at the largest head the stage-1 search
    may pick (i = search.max_dit_block, j = 1): stage 1 runs before it is known."""
    from stitchvm_rl.value.train import Teacher

    data, train = cfg.data, cfg.train
    parts = sd3_parts(cfg.backbone, "float32")
    transformer, vae = parts["transformer"], parts["vae"]
    side = latent_side(vae, transformer, data.resolution)
    pixels = side * 2 ** (len(vae.config.block_out_channels) - 1)
    clip = reward_clip("", cfg.reward_model)
    tokens = text_tokens(parts, t5_tokens(cfg.backbone, 256))
    blocks = len(transformer.transformer_blocks)
    i = min(cfg.search.max_dit_block or blocks, blocks)
    plans = [search_task(cfg, parts, clip, side, pixels, tokens, i)]
    if data.source == "policy":  # PolicyImages: the pipeline in float32 samples and decodes
        data_gpu = role_gpu(data.actor_gpus, {}, cfg.memory, "stitch data actor")
        sampler = RolePlan("stitch data actor (policy samples, made once)", data.actors, data.actor_gpus, data_gpu.gib, parts_items(parts, "float32"), placement=data_gpu.where)
        cfg_batch = data.batch_size * (2 if data.cfg_scale != 1 else 1)
        sampler.phases = [
            Item(f"sampling {data.batch_size} images (transformer{', x2 with CFG' if cfg_batch > data.batch_size else ''})", peak_live_bytes(velocity_call(transformer, cfg_batch, side, tokens))),
            Item(f"decoding {data.batch_size} images", peak_live_bytes(decode_call(vae, data.batch_size, side))),
        ]
        sampler.fixes = ["a smaller data.batch_size", "a GPU with more memory"]
        plans.append(sampler)

    # learner rank: DeepSpeed's bf16 mode on GPU holds the model in bf16 and a float32 master of the trainable parts
    from stitchvm_rl.value.model import ValueModelConfig

    dtype = "bfloat16" if train.use_gpu else "float32"
    config = ValueModelConfig(i, 1, cfg.head, cfg.backbone, cfg.reward_model, "", head_conditioning=cfg.head_conditioning, head_trained=train.train_head)
    model = stitched_on_meta(config, clip, dtype)
    model.requires_grad_(False)
    trainable = model.trainable_parameters()
    for p in trainable:
        p.requires_grad_(True)
    count = sum(p.numel() for p in trainable)
    shards = train.num_workers if train.zero_stage >= 1 else 1
    learner_gpu = role_gpu(1.0 if train.use_gpu else 0, {}, cfg.memory, "stitch learner rank")
    learner = RolePlan("stitch learner rank", train.num_workers, 1.0, learner_gpu.gib, placement=learner_gpu.where)
    teacher = clip.to(zoo.DTYPES[dtype])  # the teacher's image tower (its text tower is dropped)
    learner.resident = [
        Item(f"value model StitchVM({i}, 1) over {cfg.reward_model} ({dtype})", sum(weight_bytes(model).values())),
        Item(f"gradients of the trainable parts ({dtype})", count * zoo.DTYPES[dtype].itemsize // (shards if train.zero_stage >= 2 else 1)),
        Item(f"AdamW moments + float32 master (1/{shards} of {count:,} parameters)", (3 if train.use_gpu else 2) * count * 4 // shards),
        Item(f"teacher: the reward's image tower ({dtype})", sum(weight_bytes(teacher.vision_model).values()) + sum(weight_bytes(teacher.visual_projection).values())),
    ]
    saved = saved_bytes(value_call(model, train.batch_size, side, transformer.config.in_channels, tokens))
    learner.phases = [
        Item(f"a training step: {train.batch_size} latents through head, stitch and tail, saved for the backward + transient", saved + peak_live_bytes(value_call(model, train.batch_size, side, transformer.config.in_channels, tokens))),
        Item(f"the teacher's targets of {train.batch_size} images", peak_live_bytes(clip_image_call(teacher, train.batch_size))),
    ]
    if data.source != "policy":  # image files come without latents: the learner encodes them
        learner.resident.append(Item("VAE (float32)", sum(weight_bytes(vae).values())))
        learner.phases.append(Item(f"encoding {Teacher.ENCODE_BATCH} images at {pixels}^2 (VAE)", peak_live_bytes(encode_call(vae, Teacher.ENCODE_BATCH, pixels))))
    if cfg.head_conditioning == "prompt":  # value.train.prompt_table: the pipeline encodes every training prompt once
        learner.phases.insert(0, Item("encoding the training prompts at start (the SD3 pipeline, float32, freed after)", sum(sum(weight_bytes(m).values()) for m in parts.values())))
    learner.fixes = ["a smaller train.batch_size", f"a smaller search.max_dit_block ({i})", "a GPU with more memory"]
    return [*plans, learner, accuracy_task(cfg, model, clip, side, tokens)]


def search_task(cfg, parts: dict, clip, side: int, pixels: int, tokens: int, blocks: int) -> RolePlan:
    """Stage 1's one task (`value.search.build_value_model`): float32 models, the text encoders
    freed once the probe prompts are encoded, a probe batch's features after every candidate block."""
    search, transformer, vae = cfg.search, parts["transformer"], parts["vae"]
    gpu = role_gpu(search.num_gpus, {}, cfg.memory, "stitch search task")
    plan = RolePlan("stitch search task (stage 1)", 1, search.num_gpus, gpu.gib, placement=gpu.where)
    encoders = {k: m for k, m in parts.items() if not k.startswith("text_encoder")}
    c_in, c_out = transformer.inner_dim + 1, clip.config.vision_config.hidden_size * len(search.rm_blocks)
    plan.resident = [*parts_items(encoders, "float32"), *reward_items({"model " + cfg.reward_model: clip}),
                     Item(f"float64 Gram matrices of {blocks} candidate blocks", blocks * (c_in * c_in + c_in * c_out + 2 * c_out) * 8)]
    grid = (clip.config.vision_config.image_size // clip.config.vision_config.patch_size) ** 2
    features = blocks * search.batch_size * (side // transformer.config.patch_size) ** 2 * transformer.inner_dim * 4
    rows = search.batch_size * grid * (c_in + c_out) * 8  # one batch's regression rows in float64
    text = text_encoder_bytes(parts) // (2 if search.num_gpus else 1)  # bfloat16 on a GPU
    plan.phases = [
        Item(f"encoding the probe prompts (the three text encoders in {'bfloat16' if search.num_gpus else 'float32'}, freed after)", text),
        Item(f"{search.batch_size} probes through {blocks} blocks, every block's features kept + their float64 rows",
             peak_live_bytes(velocity_call(transformer, search.batch_size, side, tokens)) + features + rows),
    ]
    if cfg.data.source != "policy":
        plan.phases.append(Item(f"encoding {search.batch_size} probes at {pixels}^2 (VAE, 4 at a time)", peak_live_bytes(encode_call(vae, 4, pixels))))
    plan.fixes = ["a smaller search.batch_size", "a smaller search.max_dit_block", "a GPU with more memory"]
    return plan


def accuracy_task(cfg, model, clip, side: int, tokens: int) -> RolePlan:
    """One noise level's task of the value-accuracy evaluation (`value.evaluate`)."""
    return noise_level_task("value-accuracy task (one per noise level)", cfg.eval, cfg.backbone, cfg.reward_model, cfg.memory, model, clip, side, tokens, "eval.")


def noise_level_task(role: str, ev, backbone: str, reward_model: str, memory, model, clip, side: int, tokens: int, prefix: str) -> RolePlan:
    """A task that scores latents at one noise level with every estimator (`ev`: its batch_size,
    decode_batch_size, cfg_scale, sigmas, num_gpus): policy and value model in bf16 on a GPU (float32
    on CPUs), the reward's CLIP in float32."""
    dtype = "bfloat16" if ev.num_gpus else "float32"
    parts = sd3_parts(backbone, dtype)
    gpu = role_gpu(ev.num_gpus, {}, memory, role)
    plan = RolePlan(role, len(ev.sigmas), ev.num_gpus, gpu.gib, placement=gpu.where)
    model = model.to(zoo.DTYPES[dtype])
    plan.resident = [*parts_items(parts, dtype), Item(f"value model ({dtype})", sum(weight_bytes(model).values())), *reward_items({"model " + reward_model: clip.float()})]
    with_cfg = 2 if ev.cfg_scale != 1 else 1
    plan.phases = [
        Item(f"{ev.batch_size} latents through the transformer{' (x2 with CFG)' if with_cfg > 1 else ''}", peak_live_bytes(velocity_call(parts["transformer"], ev.batch_size * with_cfg, side, tokens))),
        Item(f"{ev.batch_size} latents through the value model", peak_live_bytes(value_call(model, ev.batch_size, side, parts["transformer"].config.in_channels, tokens))),
        Item(f"decoding {ev.decode_batch_size} latents", peak_live_bytes(decode_call(parts["vae"], ev.decode_batch_size, side))),
    ]
    plan.fixes = [f"a smaller {prefix}batch_size or {prefix}decode_batch_size", "a GPU with more memory"]
    return plan


def value_bench_roles(cfg, value_dir: str, backbone: str, reward_model: str, resolution: int) -> list[RolePlan]:
    """jobs/evaluate_values.py's tasks, one per noise level (`cfg.bench.num_gpus` each)."""
    parts = sd3_parts(backbone, "float32")
    side, tokens = latent_side(parts["vae"], parts["transformer"], resolution), text_tokens(parts, t5_tokens(backbone, 256))
    _, model = value_model(value_dir, backbone, {}, "float32")
    return [noise_level_task("noise-level task", cfg.bench, backbone, reward_model, cfg.memory, model, reward_clip("", reward_model), side, tokens, "bench.")]


# ---------------------------------------------------------------- the roles of jobs/dps.py
def dps_roles(cfg, reward_sources: dict[str, str], value_model_dir: str) -> list[RolePlan]:
    """One DPS worker per method of a DPSConfig `cfg` (a Ray task with one GPU on device=cuda):
    the pipeline in cfg.dtype, the value model (stitchvm) or the rewards (tweedie), and one guided
    step of batch_size latents (x2 with CFG) under autograd."""
    gpu = role_gpu(1.0 if cfg.device == "cuda" else 0, {}, cfg.memory, "DPS worker")
    parts = sd3_parts(cfg.backbone, cfg.dtype)
    transformer, vae = parts["transformer"], parts["vae"]
    transformer.requires_grad_(False)
    side, tokens = latent_side(vae, transformer, cfg.resolution), text_tokens(parts, t5_tokens(cfg.backbone, 256))
    with_cfg = 2 if cfg.guidance.cfg_scale != 1 else 1  # CFG: the transformer sees each latent twice
    plans = []
    for method in cfg.methods:
        kind = method.removeprefix("fk_")
        plan = RolePlan(f"DPS worker ({method})", 1, 1.0, gpu.gib, parts_items(parts, cfg.dtype), models=[*parts.values()], placement=gpu.where)
        n = cfg.batch_size * (cfg.guidance.particles if method.startswith("fk_") else 1)  # FK: every prompt's particles
        if kind == "best_of_n":  # N samples per prompt (0: FK's budget, planned as `particles`, which it stays near)
            n = cfg.batch_size * (cfg.guidance.bon_samples or cfg.guidance.particles)
        velocity = velocity_call(transformer, n * with_cfg, side, tokens)
        sampling = peak_live_bytes(velocity)
        plan.phases = [Item(f"the velocity of {n} latents{' (x2 with CFG)' if with_cfg > 1 else ''}", sampling, (velocity,))]
        if kind == "tweedie":
            clips = {name: reward_model(name, source).requires_grad_(False) for name, source in reward_sources.items()}  # float32, as rewards load
            plan.resident += reward_items(clips)
            plan.models += clips.values()
            calls = (velocity_call(transformer, n * with_cfg, side, tokens, grad=True), decode_call(vae, n, side, grad=True), *(reward_call(m, n, grad=True) for m in clips.values()))
            grad = saved_bytes(calls[0]) + saved_bytes(calls[1]) + max((saved_bytes(c) for c in calls[2:]), default=0)
            plan.phases.append(Item(f"d reward / d z through the transformer, VAE decode and reward CLIP ({n} latents), saved for the backward + the velocity's transient", grad + sampling, calls, backward=True))
        if kind == "stitchvm":
            what, model = value_model(value_model_dir, cfg.backbone, reward_sources, cfg.dtype)
            model.requires_grad_(False)
            plan.resident.append(Item(f"{what} ({cfg.dtype})", sum(weight_bytes(model).values())))
            plan.models.append(model)
            call = value_call(model, n, side, transformer.config.in_channels, tokens, grad=True)
            plan.phases.append(Item(f"d value / d z through the value model ({n} latents), saved for the backward", saved_bytes(call), (call,), backward=True))
        if kind == "best_of_n":
            clips = {name: reward_model(name, source) for name, source in reward_sources.items()}
            plan.resident += reward_items(clips)
            calls = (decode_call(vae, n, side), *(reward_call(m, n) for m in clips.values()))
            plan.phases.append(Item(f"decoding and rewarding all {n} samples", max(peak_live_bytes(c) for c in calls), calls))
        decoding = decode_call(vae, cfg.batch_size, side)
        plan.phases.append(Item(f"decoding {cfg.batch_size} images", peak_live_bytes(decoding), (decoding,)))
        plan.fixes = ["a smaller batch_size", "dtype=bfloat16" if cfg.dtype == "float32" else "a GPU with more memory"]
        plans.append(plan)
    return plans


# ---------------------------------------------------------------- jobs/sample.py
def sample_roles(cfg, reward_sources: dict[str, str], images: int) -> list[RolePlan]:
    """jobs/sample.py's one process (SampleConfig `cfg`): the pipeline in cfg.dtype, the rewards in
    float32, batch_size images sampled (x2 with CFG) and decoded at a time, all `images` rewarded at once."""
    parts = sd3_parts(cfg.model, cfg.dtype)
    transformer, vae = parts["transformer"], parts["vae"]
    side, tokens = latent_side(vae, transformer, cfg.resolution), text_tokens(parts, t5_tokens(cfg.model, 256))
    clips = {name: reward_model(name, source) for name, source in reward_sources.items()}
    with_cfg = 2 if cfg.cfg_scale != 1 else 1
    gpu = role_gpu(1.0 if cfg.device.startswith("cuda") else 0, {}, cfg.memory, "sampler")
    plan = RolePlan("sampler (jobs/sample.py)", 1, 1.0, gpu.gib, placement=gpu.where)
    plan.resident = [*parts_items(parts, cfg.dtype), *reward_items(clips)]
    plan.phases = [
        Item(f"sampling {cfg.batch_size} images{' (x2 with CFG)' if with_cfg > 1 else ''}", peak_live_bytes(velocity_call(transformer, cfg.batch_size * with_cfg, side, tokens))),
        Item(f"decoding {cfg.batch_size} images", peak_live_bytes(decode_call(vae, cfg.batch_size, side))),
        *([Item(f"rewarding all {images} images", max(peak_live_bytes(reward_call(m, images)) for m in clips.values()))] if clips else []),
    ]
    plan.fixes = ["a smaller batch_size", "dtype=bfloat16" if cfg.dtype == "float32" else "a GPU with more memory"]
    return [plan]


# ---------------------------------------------------------------- the roles of jobs/evaluate.py
SCORER_REWARDS = {"hpsv2": "hpsv2", "hpsv21": "hpsv2", "pickscore": "pickscore", "aesthetic": "aesthetic", "dfn_clip": "dfn_clip", "clipscore": "clipscore", "toy_clip": "toy_clip",
                  "image_reward": "image_reward", "geneval": "geneval"}


def evaluate_roles(cfg, sampling, scorer_sources: dict[str, str], lora_files: dict[str, int], guided: list[RolePlan] | None = None) -> list[RolePlan]:
    """jobs/evaluate.py's actors (EvaluateConfig `cfg`, its `Sampling`): `sample_actors` sampling
    actors, a GPU each with device=cuda: the pipeline in cfg.dtype with every policy's LoRA
    (`lora_files`: {policy: bytes}), prompts_per_batch x N images sampled (x2 with CFG) and decoded
    at a time, and for guided policies (`guided`: `dps_roles`' plans at one prompt's N images) their
    value models and rewards held together, each method's phases in turn; `score_actors` scoring
    actors, `score_gpus` each: every scorer's CLIP in float32 (`scorer_sources`: {scorer: source}),
    score_batch_size images through the largest image tower."""
    gpu_count = 1.0 if cfg.device == "cuda" else 0
    parts = sd3_parts(cfg.backbone, cfg.dtype)
    transformer, vae = parts["transformer"], parts["vae"]
    side, tokens = latent_side(vae, transformer, sampling.resolution), text_tokens(parts, t5_tokens(cfg.backbone, 256))
    images = cfg.prompts_per_batch * sampling.images_per_prompt
    with_cfg = 2 if sampling.cfg_scale != 1 else 1
    gpu = role_gpu(gpu_count, {}, cfg.memory, "sampling actor")
    sampler = RolePlan("sampling actor", cfg.sample_actors, gpu_count, gpu.gib, placement=gpu.where)
    sampler.resident = [*parts_items(parts, cfg.dtype), *[Item(f"LoRA of {name}", size) for name, size in lora_files.items()]]
    sampler.phases = [
        Item(f"sampling {images} images{' (x2 with CFG)' if with_cfg > 1 else ''}", peak_live_bytes(velocity_call(transformer, images * with_cfg, side, tokens))),
        Item(f"decoding {images} images", peak_live_bytes(decode_call(vae, images, side))),
    ]
    for plan in guided or []:  # the pipeline is shared; value models and rewards come once each
        held = {item.what for item in sampler.resident}
        sampler.resident += [item for item in plan.resident if item.what not in held]
        sampler.phases += [dataclasses.replace(item, what=f"{plan.role.removeprefix('DPS worker ')}: {item.what}") for item in plan.phases]
    sampler.fixes = ["a smaller prompts_per_batch", "dtype=bfloat16" if cfg.dtype == "float32" else "a GPU with more memory"]
    clips = {name: reward_model(SCORER_REWARDS[name], source, scorer_sources.get("geneval_clip", "")) for name, source in scorer_sources.items() if name in SCORER_REWARDS}
    score_gpus = cfg.score_gpus if gpu_count else 0
    gpu = role_gpu(score_gpus, {}, cfg.memory, "scoring actor")
    scorer = RolePlan("scoring actor", cfg.score_actors, score_gpus, gpu.gib, placement=gpu.where)
    scorer.resident = reward_items(clips)
    scorer.phases = [Item(f"scoring {cfg.score_batch_size} images", max(peak_live_bytes(reward_call(m, cfg.score_batch_size)) for m in clips.values()))] if clips else []
    scorer.fixes = ["a smaller score_batch_size", "score_gpus=1 (a GPU of its own)", "fewer scorers per evaluation"]
    return [sampler, scorer]
