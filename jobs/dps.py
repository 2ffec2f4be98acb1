"""Inference-time guidance with a value: DPS guided by StitchVM vs by Tweedie, and FK steering.

    python jobs/dps.py                                     # toy world, toy CLIP reward, CPU, local Ray (minutes)
    python jobs/dps.py "methods=[none,stitchvm]" scales.stitchvm=0.01 guidance.cfg_scale=3
    python jobs/dps.py device=cuda dtype=bfloat16 compile=true             # one GPU, compiled blocks
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/dps.py

Every method samples the same prompts from the same initial noise (FK steering: the first of its
particles is that noise too) in its own Ray task -- a fresh worker process -- so its peak memory is
its own (CUDA peak allocated on GPU; on CPU the process's peak resident set, reset after loading).
The final images of every method are scored by the clean reward models. With no `value_model`, the
toy world's committed value model is used (as jobs/nft.py does).

Writes outputs/<run_name>/: config.yaml, grid.png (one column per method, same noise per row),
summary.json (reward and caption accuracy per method, seconds per sample, peak memory, model
evaluations per image -- transformer rows and value or reward rows -- and the stitchvm / tweedie
ratios). best_of_n (N unguided samples, the best by the clean reward) runs at the budget the fk_*
method before it spent, unless guidance.bon_samples sets N.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch

from stitchvm_rl import prompts as prompt_lists
from stitchvm_rl import memory_plan, memory_roles, rewards, runtime, storage, toyworld, zoo
from stitchvm_rl.config import ConfigError, Range, check_names, did_you_mean, load_config, run_main
from stitchvm_rl.guidance import GuidanceConfig, matched_samples, run_guided
from stitchvm_rl.memory_plan import MemoryConfig
from stitchvm_rl.tracking import RunDir
from stitchvm_rl.value import default_value_model
from stitchvm_rl.value.model import check_value_model_dir

METHODS = ("none", "tweedie", "stitchvm", "fk_tweedie", "fk_stitchvm", "best_of_n")


@dataclass
class DPSConfig:
    run_name: str = "dps"
    """Name of the run folder under output_dir."""
    output_dir: str = "outputs"
    """Where run folders go."""
    backbone: str = "toyworld"
    """SD3 pipeline: hub id, local dir, 'toyworld'."""
    rewards: dict[str, float] = field(default_factory=lambda: {"toy_clip": 1.0})
    """Pixel rewards {name: weight}: Tweedie's value and the final score of every method."""
    reward_sources: dict[str, str] = field(default_factory=dict)
    """Where published rewards' weights come from {name or aesthetic_head: hub id, path on every node, or s3:// / gs:// URI} (empty: rewards.PUBLISHED's)."""
    value_model: str = ""
    """Value-model directory or storage URI for stitchvm (empty: the toy world's committed one)."""
    methods: list[str] = field(default_factory=lambda: ["none", "tweedie", "stitchvm", "fk_stitchvm", "best_of_n"])
    """Methods to run: none, tweedie, stitchvm, fk_tweedie, fk_stitchvm, best_of_n (after an fk_* method: at its budget)."""
    scales: dict[str, float] = field(default_factory=lambda: {"tweedie": 0.02, "stitchvm": 0.02})
    """DPS scale per value, swept separately as in the paper (toy world: the best reward of 0.005-0.1 for each)."""
    prompts: list[str] = field(default_factory=list)
    """Prompts (empty: prompt_file, else every toy-world caption)."""
    prompt_file: str = ""
    """UTF-8 text file with one prompt per line."""
    images_per_prompt: Annotated[int, Range(1)] = 2
    """Images per prompt and method."""
    batch_size: Annotated[int, Range(1)] = 24
    """Images per guided batch."""
    resolution: Annotated[int, Range(0)] = 0
    """Image side in pixels (0: the model's native size)."""
    seed: int = 0
    """Seed of the initial noise and of the SDE noise."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where each method runs (one GPU per task on cuda)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model dtype (bfloat16 on GPU)."""
    compile: bool = False
    """torch.compile each SD3 / CLIP block (GPU; one untimed batch per method compiles them)."""
    ray_cpus: Annotated[int, Range(1)] = 4
    """Logical CPUs of a local Ray cluster (ignored when joining a cluster)."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """The guided sampler, shared by every method."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The GPU memory plan each method's worker is checked against on device=cuda (jobs/plan.py)."""


def check(cfg: DPSConfig) -> None:
    """Refuse inconsistent settings before any model is loaded."""
    zoo.check_source(cfg.backbone, "backbone")
    rewards.check_reward_weights(cfg.rewards, "rewards", cfg.reward_sources)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not cfg.methods:
        hint = did_you_mean(unknown[0], METHODS) if unknown else ""
        raise ConfigError(f"methods {unknown or '[]'} unknown or empty; choose from {', '.join(METHODS)}{hint}")
    check_names("scales", cfg.scales, ("tweedie", "stitchvm"), "guidance value")  # the values a DPS scale is for (fk_* share them)
    for kind in {m.removeprefix("fk_") for m in cfg.methods if m.removeprefix("fk_") not in ("none", "best_of_n")}:
        if kind not in cfg.scales:
            raise ConfigError(f"method '{kind}' has no DPS scale; set scales.{kind}=...")
    if cfg.value_model:
        check_value_model_dir(cfg.value_model, cfg.backbone)
    elif any(m.removeprefix("fk_") == "stitchvm" for m in cfg.methods):
        default_value_model(cfg.backbone)  # refuses a backbone without one
    if cfg.compile:
        zoo.check_compile_toolchain(cfg.device)
    if cfg.device == "cuda":
        memory_plan.check(plan_memory(cfg), cfg.memory.enforce)


def plan_memory(cfg: DPSConfig) -> list[memory_plan.RolePlan]:
    """Each method's worker's GPU memory plan (`stitchvm_rl.memory_roles.dps_roles`)."""
    sources = rewards.published_sources(cfg.rewards, cfg.reward_sources)
    uses_value_model = any(m.removeprefix("fk_") == "stitchvm" for m in cfg.methods)
    return memory_roles.dps_roles(cfg, sources, (cfg.value_model or default_value_model(cfg.backbone)) if uses_value_model else "")


def best_of_n_budget(guidance: GuidanceConfig, results: dict) -> GuidanceConfig:
    """Best-of-N's guidance settings: `bon_samples` as given, else as many samples as the first FK
    method already run spent in counted evaluations per image (the paper's Table 2 compares them at
    equal compute), else `particles`."""
    if guidance.bon_samples:
        return guidance
    fk = next((r for m, r in results.items() if m.startswith("fk_")), None)
    samples = matched_samples(fk["transformer_rows_per_image"], fk["value_rows_per_image"], guidance.num_steps) if fk else guidance.particles
    return dataclasses.replace(guidance, bon_samples=samples)


def main(argv: list[str]) -> dict:
    import ray

    cfg = load_config(DPSConfig, argv)
    check(cfg)
    prompts = prompt_lists.resolve_prompts(cfg.prompts, cfg.prompt_file)
    run = RunDir(cfg.output_dir, cfg.run_name, cfg)
    runtime.init_ray(cfg.ray_cpus)
    needs_value = any(m.removeprefix("fk_") == "stitchvm" for m in cfg.methods)
    value_model = storage.local_source(cfg.value_model) or (default_value_model(cfg.backbone) if needs_value else "")
    backbone, sources = storage.local_source(cfg.backbone), {k: storage.local_source(v) for k, v in cfg.reward_sources.items()}  # absolute: the tasks run on any node

    # one fresh worker process per method (max_calls=1), one after another, so each peak is its own
    task = ray.remote(max_calls=1, num_cpus=1, num_gpus=1 if cfg.device == "cuda" else 0)(run_guided)
    runtime.request_resources([{"CPU": 1, "GPU": 1 if cfg.device == "cuda" else 0}])  # the autoscaler may start a node now
    todo = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    results = {}
    try:
        for method in cfg.methods:
            print(f"running {method} ...", flush=True)
            scale = cfg.scales.get(method.removeprefix("fk_"), 0.0)
            guidance = best_of_n_budget(cfg.guidance, results) if method == "best_of_n" else cfg.guidance
            results[method] = ray.get(task.remote(method, backbone, cfg.rewards, value_model, todo, guidance, scale, cfg.batch_size, cfg.resolution, cfg.seed, cfg.device, cfg.dtype, cfg.compile, sources))
            results[method]["samples_per_prompt"] = guidance.bon_samples if method == "best_of_n" else cfg.guidance.particles if method.startswith("fk_") else 1
    finally:
        runtime.request_resources([])

    reward = rewards.build_rewards(cfg.rewards, cfg.reward_sources)
    summary = {"methods": {}}
    for method, out in results.items():
        scores = reward.components(out["images"], todo)
        row = {
            "reward_mean": {name: v.mean().item() for name, v in scores.items()},
            "reward_total": sum(cfg.rewards[name] * v.mean().item() for name, v in scores.items()),
            "seconds_per_sample": out["seconds_per_sample"],
            "peak_memory_mib": out["peak_memory_mib"],
            "samples_per_prompt": out["samples_per_prompt"],
            "transformer_rows_per_image": out["transformer_rows_per_image"],
            "value_rows_per_image": out["value_rows_per_image"],
            "process": out["process"],
        }
        if out["head_shared_with"]:  # StitchVM's head was the start of this CFG pass (frozen base blocks)
            row["head_shared_with"] = out["head_shared_with"]
        if all(toyworld.is_caption(p) for p in prompts):
            row["caption_accuracy"] = toyworld.caption_accuracy(out["images"], todo)["all"]
        summary["methods"][method] = row
    rows = summary["methods"]
    if "tweedie" in rows and "stitchvm" in rows:
        summary["speedup_stitchvm_over_tweedie"] = rows["tweedie"]["seconds_per_sample"] / rows["stitchvm"]["seconds_per_sample"]
        summary["memory_ratio_stitchvm_over_tweedie"] = rows["stitchvm"]["peak_memory_mib"] / rows["tweedie"]["peak_memory_mib"]
        if "none" in rows:  # what guidance adds on top of sampling (resident weights excluded)
            extra = {m: rows[m]["peak_memory_mib"] - rows["none"]["peak_memory_mib"] for m in ("tweedie", "stitchvm")}
            summary["extra_memory_over_none_mib"] = extra
            summary["extra_memory_ratio_stitchvm_over_tweedie"] = extra["stitchvm"] / extra["tweedie"] if extra["tweedie"] > 0 else None
    if "none" in rows:
        summary["reward_gain_over_none"] = {m: r["reward_total"] - rows["none"]["reward_total"] for m, r in rows.items() if m != "none"}
    # one column per method, the same initial noise along each row
    grid = torch.stack([results[m]["images"] for m in cfg.methods], 1).flatten(0, 1)
    toyworld.save_grid(grid[: 24 * len(cfg.methods)], run.path / "grid.png", nrow=len(cfg.methods))
    run.write_json("summary.json", summary)
    print(json.dumps(summary, indent=1))
    print(f"wrote {run.path}")
    return summary


if __name__ == "__main__":
    run_main(main)
