"""Sample a grid of images from a policy and score it.

    python jobs/sample.py                                   # toy world on CPU (seconds)
    python jobs/sample.py cfg_scale=1 seed=3 run_name=mine  # any field: key=value
    python jobs/sample.py --config jobs/configs/sample_sd35m.yaml    # SD3.5-Medium, 1 GPU
    python jobs/sample.py lora=outputs/nft/lora cfg_scale=1            # a policy trained by jobs/nft.py

Writes outputs/<run_name>/: config.yaml, samples.png (a prompt's images side by side), summary.json (reward
of every image, per reward model, and -- for toy-world captions -- the caption-classifier accuracy).
"""

import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch

from stitchvm_rl import prompts as prompt_lists
from stitchvm_rl import memory_plan, memory_roles, rewards, storage, toyworld, zoo
from stitchvm_rl.memory_plan import MemoryConfig
from stitchvm_rl.config import ConfigError, Range, load_config, run_main
from stitchvm_rl.policy import SD3Policy
from stitchvm_rl.tracking import RunDir


@dataclass
class SampleConfig:
    run_name: str = "sample"
    """Name of the run folder under output_dir."""
    output_dir: str = "outputs"
    """Where run folders go."""
    model: str = "toyworld"
    """SD3 pipeline: hub id, local directory, 'toyworld' or 'tiny-sd3'."""
    lora: str = ""
    """A diffusers LoRA directory or storage URI to load into the pipeline (e.g. jobs/nft.py's <run>/lora, or <storage>/<run>/files/lora)."""
    prompts: list[str] = field(default_factory=list)
    """Prompts to sample (empty: prompt_file, else every toy-world caption)."""
    prompt_file: str = ""
    """UTF-8 text file with one prompt per line."""
    images_per_prompt: Annotated[int, Range(1)] = 4
    """Images per prompt (side by side in the grid)."""
    num_steps: Annotated[int, Range(1)] = 20
    """Sampling steps."""
    sampler: Literal["dpm2", "euler", "sde"] = "dpm2"
    """dpm2 (DiffusionNFT's ODE solver), euler (ODE) or sde (Flow-GRPO's flow SDE)."""
    cfg_scale: Annotated[float, Range(1)] = 3.0
    """Classifier-free guidance scale (1 = off)."""
    resolution: Annotated[int, Range(0)] = 0
    """Image side in pixels (0: the model's native size)."""
    seed: int = 0
    """Seed of the initial noise."""
    batch_size: Annotated[int, Range(1)] = 48
    """Images per forward batch."""
    device: str = "cpu"
    """torch device."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model dtype (bfloat16 on GPU; float32 on CPU)."""
    rewards: dict[str, float] = field(default_factory=lambda: {"toy_clip": 1.0, "colour_match": 1.0})
    """Reward models that score the samples, {name: weight} (see stitchvm_rl/rewards.py)."""
    reward_sources: dict[str, str] = field(default_factory=dict)
    """Where published rewards' weights come from {name or aesthetic_head: hub id, path on every node, or s3:// / gs:// URI} (empty: rewards.PUBLISHED's)."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The GPU memory plan checked on a cuda device before any model loads (jobs/plan.py)."""


def check(cfg: SampleConfig) -> None:
    """Refuse bad names and sources before any model is loaded."""
    zoo.check_source(cfg.model, "model")
    rewards.check_reward_weights(cfg.rewards, "rewards", cfg.reward_sources)
    try:
        torch.device(cfg.device)
    except RuntimeError as err:  # e.g. 'gpu': torch's message lists the device types it knows
        raise ConfigError(f"device '{cfg.device}' is not a torch device ({err}); e.g. device=cpu or device=cuda") from None
    if cfg.device.startswith("cuda"):
        memory_plan.check(plan_memory(cfg), cfg.memory.enforce)
    if cfg.lora and not storage.source_exists(storage.join(cfg.lora, "pytorch_lora_weights.safetensors")):
        raise ConfigError(f"lora '{cfg.lora}' holds no pytorch_lora_weights.safetensors; pass the lora/ directory of a jobs/nft.py run")


def plan_memory(cfg: SampleConfig) -> list[memory_plan.RolePlan]:
    """The sampling process's GPU memory plan (`stitchvm_rl.memory_roles.sample_roles`)."""
    sources = rewards.published_sources(cfg.rewards, cfg.reward_sources)
    try:
        images = len(prompt_lists.resolve_prompts(cfg.prompts, cfg.prompt_file)) * cfg.images_per_prompt
    except OSError:
        images = cfg.batch_size
    return memory_roles.sample_roles(cfg, sources, images)


def main(argv: list[str]) -> dict:
    cfg = load_config(SampleConfig, argv)
    check(cfg)
    prompts = prompt_lists.resolve_prompts(cfg.prompts, cfg.prompt_file)
    toy_captions = all(toyworld.is_caption(p) for p in prompts)
    caption_rewards = [n for n in rewards.TOY_CAPTION_REWARDS if n in cfg.rewards]
    if caption_rewards and not toy_captions:
        raise ValueError(f"reward '{caption_rewards[0]}' reads toy-world captions only; drop it from 'rewards' for other prompts")
    run = RunDir(cfg.output_dir, cfg.run_name, cfg)
    torch.manual_seed(cfg.seed)
    policy = SD3Policy.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device)
    if cfg.lora:
        policy.pipe.load_lora_weights(storage.local_copy(cfg.lora))  # a storage URI: downloaded here
    reward = rewards.build_rewards(cfg.rewards, cfg.reward_sources, device=cfg.device)

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    todo = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    images = []
    for i in range(0, len(todo), cfg.batch_size):
        batch = todo[i : i + cfg.batch_size]
        traj = policy.sample(batch, cfg.num_steps, cfg.cfg_scale, cfg.sampler, generator=gen, resolution=cfg.resolution or None)
        with torch.no_grad():
            images.append(policy.decode(traj.final).cpu())
        print(f"sampled {min(i + cfg.batch_size, len(todo))}/{len(todo)} images", flush=True)
    images = torch.cat(images)
    seconds = time.perf_counter() - start

    scores = {name: v.tolist() for name, v in reward.components(images, todo).items()}
    summary = {
        "images": len(todo),
        "seconds_per_image": seconds / len(todo),
        "reward_mean": {name: sum(v) / len(v) for name, v in scores.items()},
        "rewards": scores,
    }
    if toy_captions:
        summary["caption_accuracy"] = toyworld.caption_accuracy(images, todo)
    # a prompt's images stay side by side; several prompts share a row so the grid is not a tower
    per_row = cfg.images_per_prompt * max(1, 12 // cfg.images_per_prompt)
    toyworld.save_grid(images, run.path / "samples.png", nrow=per_row)
    run.write_json("summary.json", summary)
    print({k: v for k, v in summary.items() if k != "rewards"})
    print(f"wrote {run.path}")
    return summary


if __name__ == "__main__":
    run_main(main)
