"""Value estimators on noisy latents: caption retrieval both ways and preference accuracy against noise.

    python jobs/evaluate_values.py                                   # toy world: the committed value model, CPU, local Ray (minutes)
    python jobs/evaluate_values.py value_model=outputs/ray/stitch/files/value_model "bench.sigmas=[0.5]"
    python jobs/evaluate_values.py value_model=<storage>/stitch_sd35m_clip/files/value_model \\
        source.jsonl=/mnt/shared/coco_val.jsonl source.max_images=500 bench.num_gpus=1    # real image pairs

The paper's Table 5 measures (`stitchvm_rl.evaluation.noisy`) for the estimators this project
compares -- StitchVM, Tweedie and MC-K -- on clean images forward-noised to each sigma: latent ->
caption and caption -> latent top-1 retrieval among the set's captions, and how often a value orders
two images under a caption as the clean reward does; with the seconds and FLOPs of one estimate.
One Ray task per noise level (`bench.num_gpus` each). Writes outputs/<run_name>/: config.yaml,
summary.json (a row per sigma and estimator, the cost), values.png.
"""

import json
from dataclasses import dataclass, field
from typing import Annotated

from stitchvm_rl import memory_plan, memory_roles, runtime, storage
from stitchvm_rl.config import ConfigError, Range, check_names, load_config, run_main
from stitchvm_rl.memory_plan import MemoryConfig
from stitchvm_rl.evaluation.noisy import ImageSource, NoisyConfig, measure_level, plot
from stitchvm_rl.tracking import RunDir
from stitchvm_rl.value import default_value_model, value_model_path
from stitchvm_rl.value.model import CONFIG_FILE, check_value_model_dir

ESTIMATORS = ("stitchvm", "tweedie", "mc")


@dataclass
class ValuesConfig:
    run_name: str = "evaluate_values"
    """Name of the run folder under output_dir."""
    output_dir: str = "outputs"
    """Where run folders go."""
    value_model: str = ""
    """Value-model directory or storage URI (empty: the toy world's committed one); its backbone and reward model are the ones compared."""
    source: ImageSource = field(default_factory=ImageSource)
    """The clean images with captions."""
    bench: NoisyConfig = field(default_factory=NoisyConfig)
    """What is measured and where it runs."""
    seed: Annotated[int, Range(0)] = 0
    """Seed of the renderings, the forward noise and the completions."""
    ray_cpus: Annotated[int, Range(1)] = 4
    """Logical CPUs of a local Ray cluster (ignored when joining a cluster)."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The GPU memory plan each task is checked against with bench.num_gpus (jobs/plan.py)."""


def check(cfg: ValuesConfig) -> None:
    """Refuse bad input before Ray starts or a model loads."""
    if not cfg.bench.estimators:
        raise ConfigError(f"bench.estimators: none given; choose from {', '.join(ESTIMATORS)}")
    check_names("bench.estimators", dict.fromkeys(cfg.bench.estimators), ESTIMATORS, "estimator")
    bad = [s for s in cfg.bench.sigmas if not 0 < s < 1]
    if bad or not cfg.bench.sigmas:
        raise ConfigError(f"bench.sigmas {bad or '[]'}: give noise levels strictly between 0 and 1, e.g. [0.1, 0.5, 0.9]")
    if cfg.value_model:
        exported = exported_config(storage.local_source(cfg.value_model))
        if exported is None:
            raise ConfigError(f"value_model: '{cfg.value_model}' is not an exported value model (no value_model.json); pass <storage_path>/<run_name>/files/value_model of a jobs/stitch.py run")
        check_value_model_dir(cfg.value_model, exported["backbone"])
    if cfg.source.jsonl:
        from stitchvm_rl.value.data import read_jsonl

        try:
            rows = read_jsonl(storage.job_path(cfg.source.jsonl))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"source.jsonl: {err}") from None
        if any(not r["prompt"] for r in rows):
            raise ConfigError('source.jsonl: every line needs a "prompt" (retrieval and preference are judged against the captions)')
    if cfg.bench.num_gpus:
        memory_plan.check(plan_memory(cfg), cfg.memory.enforce)


def exported_config(value_dir: str) -> dict | None:
    """The value_model.json of a value model (a directory, a storage URI, or the toy one by name), or None."""
    where = value_dir if storage.is_uri(value_dir) else str(value_model_path(value_dir))  # a URI: its config file only
    text = storage.read_text(where, CONFIG_FILE)
    return json.loads(text) if text else None


def plan_memory(cfg: ValuesConfig) -> list[memory_plan.RolePlan]:
    """Each noise level's task's GPU memory plan (`stitchvm_rl.memory_roles.value_bench_roles`)."""
    value_dir = storage.local_source(cfg.value_model) or default_value_model("toyworld")
    exported = exported_config(value_dir)
    return memory_roles.value_bench_roles(cfg, value_dir, exported["backbone"], exported["reward_model"], cfg.source.resolution)


def main(argv: list[str]) -> dict:
    import ray

    cfg = load_config(ValuesConfig, argv)
    check(cfg)
    value_dir = storage.local_source(cfg.value_model) or default_value_model("toyworld")
    source = ImageSource(storage.job_path(cfg.source.jsonl) if cfg.source.jsonl else "", cfg.source.per_caption, cfg.source.max_images, cfg.source.resolution)
    run = RunDir(cfg.output_dir, cfg.run_name, cfg)
    runtime.init_ray(cfg.ray_cpus)
    task = ray.remote(num_gpus=cfg.bench.num_gpus, num_cpus=cfg.bench.num_cpus)(measure_level)
    refs = [task.remote(value_dir, cfg.bench, source, sigma, cfg.seed + 1000 * n) for n, sigma in enumerate(cfg.bench.sigmas)]
    runtime.wait_for_placement(refs, "noise-level tasks", {"CPU": cfg.bench.num_cpus, "GPU": cfg.bench.num_gpus}, timeout_s=0)
    levels = ray.get(refs)
    table = [row for level in levels for row in level["rows"]]
    cost = levels[len(levels) // 2]["cost"]
    summary = {"value_model": value_dir, "images": levels[0]["images"], "captions": levels[0]["captions"], "table": table, "cost_at_mid_sigma": cost}
    plot(table, cost, run.path / "values.png")
    run.write_json("summary.json", summary)
    for row in table:
        print(f"sigma {row['sigma']:.2f}  {row['estimator']:<24} latent->caption {row['latent_to_caption']:.3f}  caption->latent {row['caption_to_latent']:.3f}  preference {row['preference']:.3f}")
    print(f"wrote {run.path}")
    return summary


if __name__ == "__main__":
    run_main(main)
