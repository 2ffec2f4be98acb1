"""Build a stitched value model end to end, the body of jobs/stitch.py: stage 1 (closed-form stitch
search on probe images), stage 2 (Ray Data -> Ray Train finetuning) and the value-accuracy
evaluation (StitchVM vs Tweedie vs Monte Carlo against noise level).

Writes <output_dir>/<run_name>/: config.yaml, stitch_search.json (error of every (i, j)), init/ (the
stage-1 model), value_model/ (value_model.json + .safetensors), summary.json, accuracy.png -- and the
same files under <storage>/<run_name>/files/ (`storage.RunFiles`): the learner ranks read init/ from
there on any node, and `value_models=[<storage>/<run_name>/files/value_model]` of jobs/nft.py reads
the result there.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch

from stitchvm_rl import prompts as prompt_lists
from stitchvm_rl import runtime, storage, zoo
from stitchvm_rl.config import Range
from stitchvm_rl.faults import StitchFaults
from stitchvm_rl.memory_plan import MemoryConfig
from stitchvm_rl.tracking import RunDir
from stitchvm_rl.value.evaluate import ValueEvalConfig, evaluate_value_accuracy, plot_accuracy
from stitchvm_rl.value.search import build_value_model
from stitchvm_rl.value.train import PolicyImages, StitchDataConfig, StitchTrainConfig, build_dataset, read_image_folder, run_training


@dataclass
class StitchConfig:
    """A stitched value model to build (jobs/stitch.py; its defaults built the toy world's committed one, `stitchvm_rl.value.default_value_model()`)."""

    run_name: str = "stitch"
    """Name of the run folder (and of the Ray Train run: re-running the same name resumes)."""
    output_dir: str = "outputs"
    """Where the driver writes run folders (relative: from the working directory; in a submitted job from $STITCHVM_JOB_ROOT)."""
    storage_path: str = ""
    """Checkpoints and run files, shared by every node: a path every node mounts, s3:// or gs:// (empty: <output_dir>/ray, one machine only)."""
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
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The GPU memory plan the data actors and learner ranks are checked against before anything is placed (jobs/plan.py)."""
    testing: StitchFaults = field(default_factory=StitchFaults)
    """Fault injection for tests (-1: never)."""


def image_size(cfg: StitchConfig) -> int:
    """Training image side: the configured resolution, else the backbone VAE's native size."""
    return cfg.data.resolution or zoo.vae_config(cfg.backbone)["sample_size"]


def build_and_evaluate(cfg: StitchConfig) -> dict:
    """Stage 1, stage 2 and the evaluation of `cfg` (checked by the caller); returns the summary."""
    prompts = prompt_lists.resolve_prompts(cfg.data.prompts, "")
    root = storage.storage_root(cfg.storage_path, cfg.output_dir)
    backbone, reward_model = storage.local_source(cfg.backbone), storage.local_source(cfg.reward_model)
    runtime.init_ray(cfg.ray_cpus)
    shared = {"storage_path": storage.node_marker(root)} | {k: v for k, v in (("backbone", backbone), ("reward_model", reward_model)) if storage.is_located(v)}
    runtime.check_every_node_sees(shared | ({"data.folder": storage.job_path(cfg.data.folder)} if cfg.data.source == "folder" else {}))
    run = RunDir(cfg.output_dir, cfg.run_name, cfg)
    files = storage.RunFiles(root, cfg.run_name)
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
    files.upload_dir(model.save(run.path / "init"), "init")  # the learner ranks read it from storage
    del model

    # Stage 2: Ray Data -> Ray Train (DeepSpeed). The autoscaler is asked for both up front.
    data_bundle = {"CPU": cfg.data.actor_cpus, "GPU": cfg.data.actor_gpus}
    learner_bundles = [runtime.learner_bundle(cfg.train.use_gpu)] * cfg.train.num_workers
    runtime.request_resources([data_bundle] * 2 * cfg.data.actors + learner_bundles)  # two actor pools
    try:
        dataset = build_dataset(backbone, reward_model, cfg.analytic_reward, cfg.data, prompts, cfg.seed, image_size(cfg))
        runtime.wait_for_bundles(learner_bundles, f"group of {cfg.train.num_workers} learner ranks", 0)
        row_prompts = prompts if cfg.data.source == "policy" else [""]  # folder images have no captions
        result = run_training(files.uri("init"), root, cfg.run_name, cfg.train, dataset, cfg.seed, backbone, row_prompts, cfg.testing.crash_after_epoch)
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
    for name in ("config.yaml", "stitch_search.json", "accuracy.png", "summary.json"):
        files.upload_file(run.path / name, name)
    files.upload_dir(run.path / "value_model", "value_model")
    print(json.dumps(accuracy["table"], indent=1))
    print(f"wrote {run.path} (and {files.root}; jobs/nft.py reads value_models=[{files.uri('value_model')}])")
    return summary

