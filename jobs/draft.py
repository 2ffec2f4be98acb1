"""DRaFT-K post-training on Ray: DeepSpeed learner ranks in Ray Train sample with the policy they
train and backpropagate the reward through the last K denoising steps, the VAE decode and the reward
model -- or, with StitchVM, stop at z_tau and backpropagate the value V(z_tau) through the K steps
before it (nothing decoded). No rollout actors: DRaFT is on-policy.

    python jobs/draft.py                                       # toy world, toy CLIP reward, DRaFT-1, CPU, local Ray
    python jobs/draft.py draft.estimator=stitchvm              # DRaFT-1 + StitchVM (the toy world's committed value model)
    python jobs/draft.py draft.backprop_steps=3                # DRaFT-3
    python jobs/draft.py "compare=[terminal,stitchvm]" "seeds=[0,1,2]"   # the comparison of docs/draft.md
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python jobs/draft.py --config jobs/configs/draft_sd35m_stitchvm.yaml   # SD3.5-M on a GPU cluster

Writes <storage_path>/<run_name>/files/ (what the learner ranks make, on whichever node they run) and
mirrors it into outputs/<run_name>/: config.yaml, metrics.jsonl (one line per optimizer step, learner
rank 0), eval_rewards.jsonl (every evaluation's per-image rewards; the paired gain over the base
policy and its standard error are in the summary), samples/ (evaluation grids), reward_curve.png,
lora/ (the EMA adapter as a diffusers LoRA: `python jobs/sample.py lora=outputs/draft/lora`) and
summary.json. Re-running the same run_name resumes from the last checkpoint under storage_path.
On a cluster of several machines storage_path must be shared by every node (a mount, or s3:// /
gs://), as for jobs/nft.py (docs/real-runs.md, "Storage"). Method and figures: docs/draft.md.
"""

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from stitchvm_rl import prompts as prompt_lists
from stitchvm_rl import memory_plan, memory_roles, rewards, runtime, storage, toyworld, training_runs, zoo
from stitchvm_rl.config import ConfigError, Range, check_names, load_config, run_main, to_dict
from stitchvm_rl.draft import DraftRolloutConfig, check_draft_config
from stitchvm_rl.draft_learner import DraftTrainConfig, train_loop
from stitchvm_rl.faults import DraftFaults
from stitchvm_rl.learner import run_learner
from stitchvm_rl.memory_plan import MemoryConfig
from stitchvm_rl.tracking import RunDir, WandbConfig
from stitchvm_rl.value import default_value_model
from stitchvm_rl.value.model import check_value_model_dir

ESTIMATORS = ("terminal", "stitchvm")


@dataclass
class DraftConfig:
    run_name: str = "draft"
    """Name of the run folder (and of the Ray Train run: re-running the same name resumes)."""
    output_dir: str = "outputs"
    """Where the driver mirrors finished run folders (relative: from the working directory; in a submitted job from $STITCHVM_JOB_ROOT)."""
    storage_path: str = ""
    """Checkpoints and run files, written by the workers: a path every node mounts, s3:// or gs:// (empty: <output_dir>/ray, one machine only)."""
    backbone: str = "toyworld"
    """SD3 policy: hub id, local dir, 'toyworld'."""
    rewards: dict[str, float] = field(default_factory=lambda: {"toy_clip": 1.0})
    """Differentiable pixel rewards {name: weight}: the terminal objective, and the evaluation's reward."""
    reward_sources: dict[str, str] = field(default_factory=dict)
    """Where published rewards' weights come from {name or aesthetic_head: hub id, path on every node, or s3:// / gs:// URI} (empty: rewards.PUBLISHED's)."""
    value_models: list[str] = field(default_factory=list)
    """Value-model directories or storage URIs summed by draft.estimator=stitchvm (empty: the toy world's committed one)."""
    prompts: list[str] = field(default_factory=list)
    """Training prompts (empty: the toy captions)."""
    prompt_file: str = ""
    """UTF-8 file of training prompts, one per line (the paper: HPDv2's)."""
    epochs: Annotated[int, Range(1)] = 30
    """Optimizer steps (each samples num_workers x draft.grad_accum x draft.batch_size prompts)."""
    eval_every: Annotated[int, Range(0)] = 5
    """Evaluate (the EMA adapter) every this many steps and after the last (0: never)."""
    eval_prompts: Annotated[int, Range(1)] = 288
    """Evaluation prompts (training prompts cycled; 288 = every toy caption x 8), fixed held-out noise, DPM-2 sampling."""
    eval_steps: Annotated[int, Range(0)] = 0
    """ODE steps of the evaluation sampler (0: draft.num_steps; the paper evaluates with 40)."""
    eval_batch_size: Annotated[int, Range(1)] = 64
    """Evaluation prompts sampled, decoded and rewarded per batch on learner rank 0 (8 at SD3.5-M 512^2)."""
    seed: int = 0
    """Seed of prompts, noise, stops and LoRA initialisation."""
    ray_cpus: Annotated[int, Range(1)] = 8
    """Logical CPUs of a local Ray cluster (ignored when joining a cluster)."""
    resource_wait_s: Annotated[float, Range(0)] = 1800.0
    """Give up, naming what is missing, if the learner ranks cannot be placed in this time (0: never)."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The GPU memory plan every learner rank is checked against before anything is placed (jobs/plan.py)."""
    compare: list[str] = field(default_factory=list)
    """Estimators to train one after another with everything else equal, e.g. [terminal, stitchvm] (runs <run_name>-<estimator>-seed<seed>, one wandb group)."""
    seeds: list[int] = field(default_factory=list)
    """Seeds to repeat the run or the comparison with (empty: just `seed`)."""
    draft: DraftRolloutConfig = field(default_factory=lambda: DraftRolloutConfig(batch_size=8, grad_accum=4))
    """What is sampled and backpropagated; toy default: 2 ranks x 4 micro-steps x 8 prompts = 64 samples a step."""
    train: DraftTrainConfig = field(default_factory=lambda: DraftTrainConfig(lr=1e-3))
    """Optimisation (Ray Train + DeepSpeed); lr 1e-3 for the toy world's short default run."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Tracking (learner rank 0)."""
    testing: DraftFaults = field(default_factory=DraftFaults)
    """Fault injection for tests (-1: never)."""


def stitch_value_models(cfg: DraftConfig) -> list[str]:
    """The value models draft.estimator=stitchvm sums: the named ones, else the backbone's default."""
    if cfg.value_models or cfg.draft.estimator != "stitchvm":
        return list(cfg.value_models)
    return [default_value_model(cfg.backbone)]


def check(cfg: DraftConfig) -> None:
    """Refuse inconsistent settings before Ray starts or any model is loaded."""
    zoo.check_source(cfg.backbone, "backbone")
    try:
        check_draft_config(cfg.draft)
    except ValueError as err:
        raise ConfigError(f"draft: {err}") from None
    check_names("compare", cfg.compare, ESTIMATORS, "estimator")
    from stitchvm_rl.evaluation.scorers import default_sources

    rewards.check_reward_weights(cfg.rewards, "rewards", default_sources(cfg.backbone, cfg.reward_sources))
    stitch_value_models(cfg)  # a backbone without a default value model is refused, naming the fix
    for d in cfg.value_models:
        check_value_model_dir(d, cfg.backbone)
    storage.check_reachable(storage.storage_root(cfg.storage_path, cfg.output_dir), "storage_path")
    runtime.check_zero_stage(cfg.train.zero_stage, "train.zero_stage", "the evaluation and the LoRA export run")
    runtime.check_learner_gpus(cfg.train, "train", "on a GPU shared with other work")
    if cfg.train.compile:
        zoo.check_compile_toolchain("cuda" if cfg.train.use_gpu else "cpu", "train.compile")
    if cfg.train.use_gpu:
        memory_plan.check(plan_memory(cfg), cfg.memory.enforce)


def plan_memory(cfg: DraftConfig) -> list[memory_plan.RolePlan]:
    """The learner ranks' GPU memory plan (`stitchvm_rl.memory_roles.draft_roles`): what `check`
    refuses before anything is placed, and jobs/plan.py prints."""
    try:
        prompt_count = len(set(prompt_lists.resolve_prompts(cfg.prompts, cfg.prompt_file)))
    except OSError:  # the prompt file lives where the job runs
        prompt_count = None
    return memory_roles.draft_roles(cfg, rewards.published_sources(cfg.rewards, cfg.reward_sources), stitch_value_models(cfg), prompt_count)


def main(argv: list[str]) -> dict:
    cfg = load_config(DraftConfig, argv)
    check(cfg)
    if not cfg.compare and not cfg.seeds:
        return train_one(cfg)
    planned = training_runs.comparison_runs(cfg, cfg.compare or [cfg.draft.estimator], lambda one, e: dataclasses.replace(one, draft=dataclasses.replace(one.draft, estimator=e)))
    runs = {}
    for name, one in planned.items():
        check(one)
        runs[name] = train_one(one)
    dirs = [str(Path(storage.job_path(cfg.output_dir)) / name) for name in runs]
    print("compare them with:\n  python jobs/report.py " + " ".join(dirs))
    return {"runs": runs, "run_dirs": dirs}


def train_one(cfg: DraftConfig) -> dict:
    """One run: place the learner ranks, train, summarise."""
    prompts = prompt_lists.resolve_prompts(cfg.prompts, cfg.prompt_file)
    root = storage.storage_root(cfg.storage_path, cfg.output_dir)
    sources = training_runs.worker_sources(cfg.backbone, cfg.rewards, cfg.reward_sources)
    value_models = [storage.local_source(d) for d in stitch_value_models(cfg)]
    runtime.init_ray(cfg.ray_cpus)
    runtime.check_every_node_sees(training_runs.paths_every_node_needs(sources, value_models, storage.node_marker(root)))  # before anything is written
    run = RunDir(cfg.output_dir, cfg.run_name, cfg)
    files = storage.RunFiles(root, cfg.run_name)
    files.upload_file(run.path / "config.yaml", "config.yaml")
    start = time.perf_counter()

    bundles = [runtime.learner_bundle(cfg.train.use_gpu, cfg.train.gpus_per_worker, cfg.train.resources_per_worker)] * cfg.train.num_workers
    runtime.request_resources(bundles)  # ask the autoscaler for the whole group at once
    try:
        runtime.wait_for_bundles(bundles, f"group of {cfg.train.num_workers} learner ranks", cfg.resource_wait_s)
        loop = {
            "draft": to_dict(cfg.draft),
            "reward_weights": cfg.rewards,
            "reward_sources": sources["reward_sources"],
            "value_models": value_models,
            "prompts": prompts,
            "eval_prompts": [prompts[n % len(prompts)] for n in range(cfg.eval_prompts)],
            "epochs": cfg.epochs,
            "eval_every": cfg.eval_every,
            "eval_steps": cfg.eval_steps,
            "eval_batch_size": cfg.eval_batch_size,
            "seed": cfg.seed,
            "storage": root,
            "run_name": cfg.run_name,
            "backbone": sources["backbone"],
            "wandb": to_dict(cfg.wandb),
            "testing": to_dict(cfg.testing),
            "config": to_dict(cfg),
        }
        run_learner(loop, cfg.train, root, cfg.run_name, train_fn=train_loop, what="DRaFT training")
    finally:
        runtime.request_resources([])  # withdraw the request: the autoscaler may scale down
    files.mirror(run.path)  # what the learner ranks wrote, wherever they ran
    metrics = training_runs.read_metrics(run.path)
    summary = {
        "estimator": cfg.draft.estimator,
        "backprop_steps": cfg.draft.backprop_steps,
        "epochs": cfg.epochs,
        "seconds_total": time.perf_counter() - start,
        **training_runs.run_summary(run.path, metrics),
        "is_toy": all(toyworld.is_caption(p) for p in prompts),
    }
    name = f"DRaFT-{cfg.draft.backprop_steps}" + (" + StitchVM" if cfg.draft.estimator == "stitchvm" else "")
    label = "value V(z_tau) of the training samples" if cfg.draft.estimator == "stitchvm" else "reward of the training samples"
    return training_runs.finish_summary(run, files, summary, metrics, name, "objective", label)


if __name__ == "__main__":
    run_main(main)
