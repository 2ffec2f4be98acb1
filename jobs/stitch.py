"""Build a stitched value model: stage 1 (closed-form stitch search) + stage 2 (Ray Train finetuning).

    python jobs/stitch.py                                  # toy world + toy CLIP, CPU, local Ray (minutes)
    python jobs/stitch.py head=scalar train.objective=regress analytic_reward=exact_colour run_name=stitch_exact_colour
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/stitch.py
    python jobs/stitch.py --config jobs/configs/stitch_sd35m_clip.yaml   # SD3.5-M + CLIP ViT-L/14-336, GPUs

Writes outputs/<run_name>/: config.yaml, stitch_search.json (error of every (i, j)), value_model/
(value_model.json + .safetensors), summary.json (training metrics and value accuracy against noise
level: StitchVM vs Tweedie vs Monte Carlo), accuracy.png.
"""

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch

from stitchvm_rl import prompts as prompt_lists
from stitchvm_rl import rewards, runtime, zoo
from stitchvm_rl.config import ConfigError, Range, load_config, run_main
from stitchvm_rl.tracking import RunDir
from stitchvm_rl.value.evaluate import ValueEvalConfig, evaluate_value_accuracy, plot_accuracy
from stitchvm_rl.value.search import build_value_model
from stitchvm_rl.value.train import PolicyImages, StitchDataConfig, StitchTrainConfig, build_dataset, read_image_folder, run_training, scan_image_folder


@dataclass
class StitchConfig:
    run_name: str = "stitch"
    """Name of the run folder (and of the Ray Train run: re-running the same name resumes)."""
    output_dir: str = "outputs"
    """Where run folders go."""
    storage_path: str = ""
    """Ray Train checkpoint storage: shared FS, s3:// or gs:// on clusters (empty: <output_dir>/ray)."""
    backbone: str = "toyworld"
    """SD3 pipeline whose first blocks form the head: hub id, local dir, 'toyworld'."""
    reward_model: str = "toyworld-clip"
    """CLIP reward model whose later blocks form the tail: hub id, local dir, 'toyworld-clip'."""
    head_conditioning: Literal["empty", "prompt"] = "prompt"
    """What the DiT head reads: the policy's embedding of the sample's prompt, or the empty prompt (the paper's)."""
    embed_target: Literal["unit", "mean"] = "mean"
    """What the value model's embedding learns: E[e | z_t] (its cosine score is E[score | z_t]) or the paper's normalize(E[e | z_t]) ('unit')."""
    head: Literal["clip", "aesthetic", "scalar"] = "clip"
    """Value head: CLIP cosine with the prompt, aesthetic MLP, or a scalar (for analytic rewards)."""
    analytic_reward: str = ""
    """Analytic reward the scalar head regresses (e.g. colour_match); empty for the reward model's own score."""
    score_scale: float = 1.0
    """Multiplier on the CLIP cosine (1: the toy CLIP score; 100: 'CLIP score' convention)."""
    probe_images: Annotated[int, Range(8)] = 200
    """Images for the stage-1 stitch search (paper: 200)."""
    max_dit_block: Annotated[int, Range(0)] = 0
    """Largest DiT block i the search tries (0: all)."""
    seed: int = 0
    """Seed of data, noise and initialisation."""
    ray_cpus: Annotated[int, Range(1)] = 8
    """Logical CPUs of a local Ray cluster (ignored when joining a cluster)."""
    data: StitchDataConfig = field(default_factory=StitchDataConfig)
    """Training images (Ray Data)."""
    train: StitchTrainConfig = field(default_factory=StitchTrainConfig)
    """Stage-2 optimisation (Ray Train + DeepSpeed)."""
    eval: ValueEvalConfig = field(default_factory=ValueEvalConfig)
    """Value accuracy against noise level."""


def check(cfg: StitchConfig) -> None:
    """Refuse inconsistent settings before any model is loaded."""
    if cfg.analytic_reward and cfg.analytic_reward not in rewards.ANALYTIC:
        raise ConfigError(f"analytic_reward '{cfg.analytic_reward}' is unknown; choose one of {', '.join(rewards.ANALYTIC)}")
    if cfg.train.objective == "regress" and (cfg.head != "scalar" or not cfg.analytic_reward):
        raise ConfigError("train.objective=regress needs head=scalar and an analytic_reward (e.g. colour_match)")
    if cfg.head == "scalar" and cfg.train.objective != "regress":
        raise ConfigError("head=scalar has no teacher to distil; use train.objective=regress with an analytic_reward")
    if cfg.data.source == "folder" and cfg.head == "clip" and cfg.train.score_weight > 0:
        raise ConfigError("train.score_weight scores the student against the image's caption, which folder images do not have; set it to 0 (or data.source=policy)")
    num_images = cfg.data.num_images
    if cfg.data.source == "folder":
        try:
            num_images = len(scan_image_folder(cfg.data.folder, cfg.data.skip_broken_images))  # every image readable, before any model loads
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.folder: {err}") from None
    if cfg.data.source == "folder" and cfg.head_conditioning == "prompt":
        raise ConfigError("folder images have no captions, so a head that reads the prompt cannot learn from them; set head_conditioning=empty (or data.source=policy)")
    if cfg.data.source == "folder" and cfg.analytic_reward in rewards.TOY_CAPTION_REWARDS:
        raise ConfigError(f"{cfg.analytic_reward} reads toy captions, which folder images do not have; use data.source=policy")
    if num_images < cfg.train.num_workers * cfg.train.batch_size:  # every rank drops its last partial batch
        raise ConfigError(
            f"{num_images} training images give each of the {cfg.train.num_workers} learner workers less than one batch of {cfg.train.batch_size}, "
            "so stage 2 would train nothing; raise data.num_images (or add images), or lower train.batch_size or train.num_workers"
        )


def image_size(cfg: StitchConfig) -> int:
    """Training image side: the configured resolution, else the backbone VAE's native size."""
    return cfg.data.resolution or zoo.vae_config(cfg.backbone)["sample_size"]


def main(argv: list[str]) -> dict:
    cfg = load_config(StitchConfig, argv)
    check(cfg)
    prompts = prompt_lists.resolve_prompts(cfg.data.prompts, "")
    run = RunDir(cfg.output_dir, cfg.run_name, cfg)
    storage = cfg.storage_path or str((Path(cfg.output_dir) / "ray").resolve())
    runtime.init_ray(cfg.ray_cpus)
    start = time.perf_counter()

    # Stage 1: closed-form stitch search on probe images, then the value model at the best (i, j).
    probe_prompts = [prompts[n % len(prompts)] for n in range(cfg.probe_images)]
    probe_latents = None  # policy probes bring their own latents (as stage 2's rows do); folder images are encoded
    if cfg.data.source == "policy":
        sampler = PolicyImages(cfg.backbone, cfg.data.sample_steps, cfg.data.cfg_scale, cfg.data.resolution)
        rows = sampler({"prompt": probe_prompts, "seed": [10**9 + n for n in range(cfg.probe_images)]})
        probes, probe_latents = torch.as_tensor(rows["image"]), torch.as_tensor(rows["z0"])
        del sampler
    else:
        probes = read_image_folder(cfg.data.folder, cfg.probe_images, image_size(cfg), cfg.data.skip_broken_images)
    model, search = build_value_model(
        cfg.backbone, cfg.reward_model, probes, cfg.head, cfg.max_dit_block or None, score_scale=cfg.score_scale, seed=cfg.seed, latents=probe_latents,
        head_conditioning=cfg.head_conditioning, prompts=probe_prompts if cfg.data.source == "policy" else None, embed_target=cfg.embed_target,
    )
    run.write_json("stitch_search.json", {"best": [search.best_i, search.best_j], "table": search.table})
    print(f"stage 1: stitching DiT block {search.best_i} to reward-model block {search.best_j} ({time.perf_counter() - start:.0f} s)")
    init_dir = model.save(run.path / "init")
    del model

    # Stage 2: Ray Data -> Ray Train (DeepSpeed). The autoscaler is asked for both up front.
    data_bundle = {"CPU": cfg.data.actor_cpus, "GPU": cfg.data.actor_gpus}
    learner_bundles = [runtime.learner_bundle(cfg.train.use_gpu)] * cfg.train.num_workers
    runtime.request_resources([data_bundle] * 2 * cfg.data.actors + learner_bundles)  # two actor pools
    try:
        dataset = build_dataset(cfg.backbone, cfg.reward_model, cfg.analytic_reward, cfg.data, prompts, cfg.seed, image_size(cfg))
        runtime.wait_for_bundles(learner_bundles, f"group of {cfg.train.num_workers} learner ranks", 0)
        row_prompts = prompts if cfg.data.source == "policy" else [""]  # folder images have no captions
        result = run_training(init_dir, run.path, storage, cfg.run_name, cfg.train, dataset, cfg.seed, cfg.backbone, row_prompts)
    finally:
        runtime.request_resources([])
    with result.checkpoint.as_directory() as d:
        shutil.rmtree(run.path / "value_model", ignore_errors=True)
        shutil.copytree(Path(d) / "value_model", run.path / "value_model")
    train_seconds = time.perf_counter() - start
    print(f"stage 2 done: {result.metrics}")

    accuracy = evaluate_value_accuracy(run.path / "value_model", cfg.eval, cfg.analytic_reward, cfg.seed)
    plot_accuracy(accuracy, run.path / "accuracy.png")
    summary = {
        "stitch": {"dit_block": search.best_i, "rm_block": search.best_j},
        "train_metrics": result.metrics,
        "build_seconds": train_seconds,
        "value_accuracy": accuracy,
    }
    run.write_json("summary.json", summary)
    print(json.dumps(accuracy["table"], indent=1))
    print(f"wrote {run.path}")
    return summary


if __name__ == "__main__":
    run_main(main)
