"""Build a stitched value model end to end, the body of jobs/stitch.py:

    stage 1   one Ray task (`search.num_gpus`): probe images -> closed-form stitch search -> init/ in storage
    stage 2   Ray Train learner ranks, each streaming its rows through Ray Data (`value.data`) -> value_model/
    accuracy  one Ray task per noise level (`eval.num_gpus`): StitchVM vs Tweedie vs Monte Carlo
              (`evaluate_only=<value model>` runs only this, on an exported model)

Writes <output_dir>/<run_name>/: config.yaml, stitch_search.json (error of every (i, j)),
value_model/ (value_model.json + .safetensors), summary.json, accuracy.png -- and the same files
under <storage>/<run_name>/files/ (`storage.RunFiles`), with init/ (the stage-1 model): the learner
ranks read init/ there on any node, the accuracy tasks read value_model/ there, and
`value_models=[<storage>/<run_name>/files/value_model]` of jobs/nft.py reads the result there.
"""

from __future__ import annotations

import json
import shutil
import tempfile
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
from stitchvm_rl.value.data import PolicyImages, read_images, sample_policy, source_rows
from stitchvm_rl.value.evaluate import ValueEvalConfig, evaluate_value_accuracy, plot_accuracy
from stitchvm_rl.value.search import SearchConfig, build_value_model
from stitchvm_rl.value.train import StitchDataConfig, StitchTrainConfig, run_training


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
    aesthetic_head: str = ""
    """head=aesthetic: the published aesthetic MLP (.safetensors, `jobs/convert_weights.py kind=aesthetic`), which scores the value model's embedding."""
    evaluate_only: str = ""
    """An exported value model (its value_model/ directory or storage URI) to measure alone: skips stages 1 and 2."""
    seed: int = 0
    """Seed of data, noise and initialisation."""
    ray_cpus: Annotated[int, Range(1)] = 8
    """Logical CPUs of a local Ray cluster (ignored when joining a cluster)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """Stage 1: the closed-form stitch search (a Ray task)."""
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
    sources = (("backbone", backbone), ("reward_model", reward_model), ("evaluate_only", cfg.evaluate_only))  # the accuracy tasks read the value model on any node
    shared = {"storage_path": storage.node_marker(root)} | {k: v for k, v in sources if v and storage.is_located(v)}
    images = {"folder": ("data.folder", cfg.data.folder), "jsonl": ("data.jsonl", str(Path(cfg.data.jsonl).parent))}.get(cfg.data.source)
    runtime.check_every_node_sees(shared | ({images[0]: storage.job_path(images[1])} if images else {}))
    run = RunDir(cfg.output_dir, cfg.run_name, cfg)
    files = storage.RunFiles(root, cfg.run_name)
    if cfg.evaluate_only:
        return evaluate(cfg, cfg.evaluate_only, run, files, {})
    start = time.perf_counter()

    # Stage 1: one Ray task searches (i, j) on the first rows and writes the stage-1 model to storage.
    rows = source_rows(cfg.data, prompts, cfg.seed)
    search = stage1(cfg, prompts, backbone, reward_model, root, rows[: cfg.search.probe_images])
    run.write_json("stitch_search.json", search)
    print(f"stage 1: stitching DiT block {search['best'][0]} to reward-model block {search['best'][1]} ({time.perf_counter() - start:.0f} s, on {search['resources']})")

    # Stage 2: Ray Train ranks, each streaming its rows through Ray Data (policy samples: made once first).
    # The autoscaler is asked for the readers and the learners up front.
    if cfg.data.source == "policy":
        rows = sample_policy(rows, cfg.data, backbone, root, cfg.run_name)
    learner_bundles = [runtime.learner_bundle(cfg.train.use_gpu)] * cfg.train.num_workers
    runtime.request_resources([{"CPU": cfg.data.actor_cpus}] * cfg.data.actors * cfg.train.num_workers + learner_bundles)
    try:
        runtime.wait_for_bundles(learner_bundles, f"group of {cfg.train.num_workers} learner ranks", 0)
        result = run_training(
            files.uri("init"), root, cfg.run_name, cfg.train, cfg.data, rows, cfg.seed, backbone, reward_model, image_size(cfg), cfg.analytic_reward, cfg.testing.crash_after_epoch
        )
    finally:
        runtime.request_resources([])
    with result.checkpoint.as_directory() as d:
        shutil.rmtree(run.path / "value_model", ignore_errors=True)
        shutil.copytree(Path(d) / "value_model", run.path / "value_model")
    files.upload_dir(run.path / "value_model", "value_model")  # exported before the evaluation starts
    build = {
        "stitch": {"dit_block": search["best"][0], "rm_block": search["best"][1]},
        "train_metrics": result.metrics,
        "build_seconds": time.perf_counter() - start,
    }
    print(f"stage 2 done: {result.metrics}")
    return evaluate(cfg, files.uri("value_model"), run, files, build)


def stage1(cfg: StitchConfig, prompts: list[str], backbone: str, reward_model: str, root: str, probe_rows: list[dict] | None = None) -> dict:
    """Run the stitch search as one Ray task placed by `cfg.search`; it writes init/ to the run's
    storage and returns {best, table, resources} (the resources the task was given). `probe_rows`:
    the image files to probe with (folder and JSONL data; policy probes are sampled in the task)."""
    import ray

    task = ray.remote(num_gpus=cfg.search.num_gpus, num_cpus=cfg.search.num_cpus)(_search_task)
    ref = task.remote(cfg, prompts, backbone, reward_model, root, probe_rows or [])
    runtime.wait_for_placement([ref], "stitch-search task", {"CPU": cfg.search.num_cpus, "GPU": cfg.search.num_gpus}, timeout_s=0)
    return ray.get(ref)


def _search_task(cfg: StitchConfig, prompts: list[str], backbone: str, reward_model: str, root: str, probe_rows: list[dict]) -> dict:
    """Stage 1 on whichever node Ray placed it: probe images (policy samples, or the first image files),
    the search, and the stage-1 model uploaded to storage as init/."""
    import ray

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = cfg.search.probe_images
    probe_prompts = [prompts[k % len(prompts)] for k in range(n)]
    latents = None  # policy probes bring their own latents (as stage 2's rows do); image files are encoded
    if cfg.data.source == "policy":
        sampler = PolicyImages(backbone, cfg.data.sample_steps, cfg.data.cfg_scale, cfg.data.resolution)
        probes, latents = sampler.sample(probe_prompts, [10**9 + k for k in range(n)])
        del sampler
    else:
        probes = read_images([r["path"] for r in probe_rows], image_size(cfg))
        probe_prompts = [r["prompt"] for r in probe_rows]
    has_captions = cfg.data.source != "folder"
    model, result = build_value_model(
        backbone, reward_model, probes, cfg.head, cfg.search.max_dit_block or None, tuple(cfg.search.rm_blocks), cfg.score_scale, device, cfg.seed, latents,
        cfg.search.batch_size, cfg.head_conditioning, probe_prompts if has_captions else None, cfg.embed_target, cfg.aesthetic_head,
    )
    with tempfile.TemporaryDirectory() as tmp:
        storage.RunFiles(root, cfg.run_name).upload_dir(model.save(Path(tmp) / "init"), "init")  # the learner ranks read it from storage
    resources = {k: v for k, v in ray.get_runtime_context().get_assigned_resources().items() if v}
    return {"best": [result.best_i, result.best_j], "table": result.table, "resources": resources}


def evaluate(cfg: StitchConfig, value_model: str, run: RunDir, files: storage.RunFiles, build: dict) -> dict:
    """The value accuracy of `value_model` (a path every node sees or a storage URI), written with
    the build's figures as summary.json and accuracy.png, here and in storage."""
    accuracy = evaluate_value_accuracy(value_model, cfg.eval, cfg.analytic_reward, cfg.seed)
    plot_accuracy(accuracy, run.path / "accuracy.png")
    summary = {**build, "value_model": value_model, "value_accuracy": accuracy}
    run.write_json("summary.json", summary)
    for name in ("config.yaml", "stitch_search.json", "accuracy.png", "summary.json"):
        if (run.path / name).is_file():
            files.upload_file(run.path / name, name)
    print(json.dumps(accuracy["table"], indent=1))
    print(f"wrote {run.path} (and {files.root}; jobs/nft.py reads value_models=[{files.uri('value_model')}])")
    return summary
