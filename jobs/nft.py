"""DiffusionNFT post-training on Ray: rollout actors score prompt groups, a DeepSpeed learner in
Ray Train runs the NFT updates, the `old` adapter is synced back to the actors after every update.

    python jobs/nft.py                                     # toy world, toy CLIP reward, stitchvm, CPU, local Ray
    python jobs/nft.py rollout.estimator=terminal          # the Monte Carlo (full-rollout) baseline
    python jobs/nft.py rollout.async=true wandb.mode=offline
    python jobs/nft.py "compare=[terminal,stitchvm]" "seeds=[0,1]"   # the comparison jobs/report.py reads
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/nft.py
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python jobs/nft.py --config jobs/configs/nft_sd35m_stitchvm.yaml    # SD3.5-M on a GPU cluster

With estimator=stitchvm and no `value_models`, the toy world's committed value model is used (the
one `python jobs/stitch.py` builds with its defaults); other backbones name theirs. Writes <storage_path>/<run_name>/files/
(what the learner ranks make, on whichever node they run) and mirrors it into outputs/<run_name>/: config.yaml,
metrics.jsonl (one line per epoch, learner rank 0), eval_rewards.jsonl (every evaluation's per-image
rewards: the gain over the base policy is paired, its standard error is in the summary), samples/ (evaluation grids), reward_curve.png,
lora/ (the EMA adapter as a diffusers LoRA: `python jobs/sample.py lora=outputs/nft/lora`) and
summary.json. Re-running the same run_name resumes from the last checkpoint under storage_path.
On a cluster of several machines storage_path must be shared by every node (a mount, or s3:// / gs://);
under `ray job submit` relative paths are taken from $STITCHVM_JOB_ROOT (default ~/stitchvm-rl) on
the head, never from Ray's temporary copy of the working directory (docs/real-runs.md, "Storage").
"""

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from stitchvm_rl import prompts as prompt_lists
from stitchvm_rl import memory_plan, memory_roles, reward_actors, rewards, runtime, storage, toyworld, training_runs, zoo
from stitchvm_rl.config import ConfigError, Range, check_names, load_config, run_main, to_dict
from stitchvm_rl.learner import NFTTrainConfig, run_learner
from stitchvm_rl.memory_plan import MemoryConfig
from stitchvm_rl.estimators import ESTIMATORS
from stitchvm_rl.faults import NFTFaults
from stitchvm_rl.rollout import RolloutConfig, RolloutWorker, actor_needs_rewards, check_rollout_config
from stitchvm_rl.tracking import RunDir, WandbConfig
from stitchvm_rl.value import default_value_model
from stitchvm_rl.value.model import check_value_model_dir


@dataclass
class NFTConfig:
    run_name: str = "nft"
    """Name of the run folder (and of the Ray Train run: re-running the same name resumes)."""
    output_dir: str = "outputs"
    """Where the driver mirrors finished run folders (relative: from the working directory; in a submitted job from $STITCHVM_JOB_ROOT)."""
    storage_path: str = ""
    """Checkpoints and run files, written by the workers: a path every node mounts, s3:// or gs:// (empty: <output_dir>/ray, one machine only)."""
    backbone: str = "toyworld"
    """SD3 policy: hub id, local dir, 'toyworld'."""
    rewards: dict[str, float] = field(default_factory=lambda: {"toy_clip": 1.0})
    """Pixel rewards {name: weight} for terminal / tweedie / mc and for evaluation."""
    reward_sources: dict[str, str] = field(default_factory=dict)
    """Where published rewards' weights come from {name or aesthetic_head: hub id, path on every node, or s3:// / gs:// URI} (empty: rewards.PUBLISHED's)."""
    value_models: list[str] = field(default_factory=list)
    """Value-model directories or storage URIs summed by estimator=stitchvm (empty: the toy world's committed one)."""
    prompts: list[str] = field(default_factory=list)
    """Training prompts (empty: the toy captions)."""
    prompt_file: str = ""
    """UTF-8 file of training prompts, one per line."""
    epochs: Annotated[int, Range(1)] = 20
    """Epochs; each is one sampling round and one optimizer step."""
    groups_per_epoch: Annotated[int, Range(1)] = 8
    """Prompt groups sampled per epoch (a multiple of train.num_workers)."""
    eval_every: Annotated[int, Range(0)] = 5
    """Evaluate (the EMA adapter) every this many epochs and after the last (0: never)."""
    eval_prompts: Annotated[int, Range(1)] = 288
    """Evaluation prompts (training prompts cycled; 288 = every toy caption x 8), fixed held-out noise, ODE sampling."""
    eval_steps: Annotated[int, Range(0)] = 0
    """ODE steps of the evaluation sampler (0: rollout.num_steps; the official SD3.5 runs use 40)."""
    eval_batch_size: Annotated[int, Range(1)] = 64
    """Evaluation prompts sampled, decoded and rewarded per batch on learner rank 0 (8 at SD3.5-M 512^2)."""
    drift_every: Annotated[int, Range(0)] = 5
    """Every this many epochs, full rollouts check the estimator against the terminal reward (0: never)."""
    drift_groups: Annotated[int, Range(1)] = 2
    """Prompt groups in each drift check."""
    seed: int = 0
    """Seed of prompts, noise and LoRA initialisation."""
    ray_cpus: Annotated[int, Range(1)] = 8
    """Logical CPUs of a local Ray cluster (ignored when joining a cluster)."""
    rollout_workers: Annotated[int, Range(1)] = 2
    """RolloutWorker actors."""
    rollout_cpus: Annotated[float, Range(0)] = 1.0
    """CPUs per rollout actor."""
    rollout_gpus: Annotated[float, Range(0)] = 0.0
    """GPUs per rollout actor (a fraction shares a GPU, e.g. with learner ranks)."""
    rollout_resources: dict[str, float] = field(default_factory=dict)
    """Custom resources per rollout actor, e.g. {rollout: 1} on clusters from cluster/*.yaml."""
    rollout_max_restarts: Annotated[int, Range(0)] = 3
    """Restarts Ray gives a rollout actor that died (its node lost, out of memory); one that dies more often stops the run, named."""
    reward_actors: Annotated[int, Range(1)] = 1
    """Actors per served reward (geneval, image_reward: their models sit there, not in every rollout actor)."""
    reward_gpus: Annotated[float, Range(0)] = 0.0
    """GPUs per reward actor (0: CPU, the toy world's; a fraction shares a GPU)."""
    reward_batch_size: Annotated[int, Range(1)] = 8
    """Images per forward pass of a reward actor (GenEval's detector runs at 800^2)."""
    rollout_call_timeout_s: Annotated[float, Range(1)] = 3600.0
    """A rollout call running longer than this is given up and redone by another actor (a hung GPU, a lost node)."""
    resource_wait_s: Annotated[float, Range(0)] = 1800.0
    """Give up, naming what is missing, if actors or learner ranks cannot be placed in this time (0: never)."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The GPU memory plan every GPU role is checked against before anything is placed (jobs/plan.py)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling and advantage estimation."""
    compare: list[str] = field(default_factory=list)
    """Estimators to train one after another with everything else equal, e.g. [terminal, stitchvm] (runs <run_name>-<estimator>-seed<seed>, one wandb group)."""
    seeds: list[int] = field(default_factory=list)
    """Seeds to repeat the run or the comparison with (empty: just `seed`)."""
    train: NFTTrainConfig = field(default_factory=lambda: NFTTrainConfig(lr=1e-3))
    """NFT optimisation (Ray Train + DeepSpeed); lr 1e-3 for the toy world's short default run."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Tracking (learner rank 0)."""
    testing: NFTFaults = field(default_factory=NFTFaults)
    """Fault injection for tests (-1: never)."""


def stitch_value_models(cfg: NFTConfig) -> list[str]:
    """The value models estimator=stitchvm sums: the named ones, else the backbone's default."""
    if cfg.value_models or cfg.rollout.estimator != "stitchvm":
        return list(cfg.value_models)
    return [default_value_model(cfg.backbone)]


def reward_sources_of(cfg: NFTConfig) -> dict[str, str]:
    """The config's reward sources, and on a toy backbone the tiny GenEval detector and ImageReward."""
    from stitchvm_rl.evaluation.scorers import default_sources

    return default_sources(cfg.backbone, cfg.reward_sources)


def check_geneval_prompts(cfg: NFTConfig) -> None:
    """GenEval scores an image by its prompt's metadata: every training prompt must carry it."""
    if not cfg.prompt_file.endswith(".jsonl"):
        raise ConfigError("rewards.geneval reads each prompt's GenEval metadata: pass prompt_file=<a .jsonl of {prompt, tag, include, ...}>, e.g. GenEval's training metadata")
    try:
        rows = prompt_lists.read_prompt_metadata(cfg.prompt_file)
    except (OSError, ValueError) as err:
        raise ConfigError(f"prompt_file: {err}") from None
    lacking = [p for p, meta in rows.items() if not {"tag", "include"} <= meta.keys()]
    if lacking:
        raise ConfigError(f"prompt_file: {len(lacking)} prompts lack GenEval metadata (tag, include), e.g. '{lacking[0]}'")


def check(cfg: NFTConfig) -> None:
    """Refuse inconsistent settings before any model is loaded."""
    zoo.check_source(cfg.backbone, "backbone")
    rewards.check_reward_weights(cfg.rewards, "rewards", reward_sources_of(cfg), served=True)
    if "geneval" in cfg.rewards:
        check_geneval_prompts(cfg)
    served = [n for n in cfg.rewards if n in reward_actors.SERVED]
    if served and (cfg.rollout_gpus or cfg.train.use_gpu) and not cfg.reward_gpus:
        raise ConfigError(f"rewards {served} are served by reward actors, which run on the CPU with reward_gpus=0; give them a GPU share, e.g. reward_gpus=0.5")
    if cfg.rollout.estimator == "stitchvm" and all(n in reward_actors.SERVED for n in cfg.rewards):
        raise ConfigError(f"rollout.estimator=stitchvm scores with value models stitched onto CLIP rewards, and {list(cfg.rewards)} have none; train with rollout.estimator=terminal (or tweedie / mc)")
    storage.check_reachable(storage.storage_root(cfg.storage_path, cfg.output_dir), "storage_path")
    check_names("compare", cfg.compare, ESTIMATORS, "estimator")
    runtime.check_zero_stage(cfg.train.zero_stage, "train.zero_stage", "the evaluation and the LoRA export run")
    runtime.check_learner_gpus(cfg.train, "train", "to share a GPU with the rollout actors")
    if cfg.groups_per_epoch % cfg.train.num_workers:
        raise ConfigError(f"groups_per_epoch={cfg.groups_per_epoch} must be a multiple of train.num_workers={cfg.train.num_workers} (every learner rank takes the same share)")
    try:
        check_rollout_config(cfg.rollout, stitch_value_models(cfg))
    except ValueError as err:
        raise ConfigError(f"rollout: {err}") from None
    if cfg.rollout.compile:
        zoo.check_compile_toolchain("cuda" if cfg.rollout_gpus else "cpu", "rollout.compile")
    if cfg.train.compile:
        zoo.check_compile_toolchain("cuda" if cfg.train.use_gpu else "cpu", "train.compile")
    for d in cfg.value_models:
        check_value_model_dir(d, cfg.backbone)
    if cfg.rollout_gpus or cfg.train.use_gpu:
        memory_plan.check(plan_memory(cfg), cfg.memory.enforce)


def plan_memory(cfg: NFTConfig) -> list[memory_plan.RolePlan]:
    """Every role's GPU memory plan (`stitchvm_rl.memory_roles.nft_roles`): what `check` refuses
    before anything is placed, and jobs/plan.py prints."""
    try:
        prompt_count = len(set(prompt_lists.resolve_prompts(cfg.prompts, cfg.prompt_file)))
    except OSError:  # the prompt file lives where the job runs: a process sees at most its share of the run's groups
        prompt_count = None
    used = rewards.weight_sources(cfg.rewards, reward_sources_of(cfg))
    served = {k: v for k, v in used.items() if k in reward_actors.SERVED or k == rewards.GENEVAL_CLIP}
    in_process = {k: v for k, v in rewards.published_sources(cfg.rewards, cfg.reward_sources).items() if k not in served}
    roles = memory_roles.nft_roles(cfg, in_process, stitch_value_models(cfg), prompt_count)
    return roles + (memory_roles.reward_actor_roles(cfg, served) if cfg.reward_gpus else [])


def start_rollout_actors(cfg: NFTConfig, names: list[str], sources: dict, value_models: list[str], bundle: dict[str, float], served: dict[str, list[str]]) -> list:
    """Named actors owned by the driver (they outlive learner restarts; Ray restarts a dead one up to rollout_max_restarts times);
    returns them once every one is placed and loaded (the learner finds them by name)."""
    import ray

    actor_cls = ray.remote(RolloutWorker)
    # no task retries: a call lost with its actor is redone by another actor (rollout_client), not after a restart
    options = dict(num_cpus=cfg.rollout_cpus, num_gpus=cfg.rollout_gpus, resources=cfg.rollout_resources, max_restarts=cfg.rollout_max_restarts, max_task_retries=0)
    device = "cuda" if cfg.rollout_gpus else "cpu"
    reward_weights = cfg.rewards if actor_needs_rewards(cfg.rollout.estimator, cfg.drift_every) else {}
    actors = [actor_cls.options(name=name, **options).remote(sources["backbone"], cfg.rollout, reward_weights, value_models, device, cfg.testing.crash_on_call, sources["reward_sources"], served)
              for name in names]
    try:
        runtime.wait_for_placement([a.__ray_ready__.remote() for a in actors], "rollout actors", bundle, cfg.resource_wait_s)
    except RuntimeError:
        stop_actors(actors)
        raise
    return actors


def stop_actors(actors: list) -> None:
    """Free the actors' resources now (not whenever their handles are collected): a next job in the
    same driver, e.g. a resumed run, needs them."""
    import ray

    for actor in actors:
        ray.kill(actor, no_restart=True)


def main(argv: list[str]) -> dict:
    cfg = load_config(NFTConfig, argv)
    check(cfg)
    if not cfg.compare and not cfg.seeds:
        return train_one(cfg)
    planned = training_runs.comparison_runs(cfg, cfg.compare or [cfg.rollout.estimator], lambda one, e: dataclasses.replace(one, rollout=dataclasses.replace(one.rollout, estimator=e)))
    runs = {}
    for name, one in planned.items():
        check(one)
        runs[name] = train_one(one)
    dirs = [str(Path(storage.job_path(cfg.output_dir)) / name) for name in runs]
    print("compare them with:\n  python jobs/report.py " + " ".join(dirs))
    return {"runs": runs, "run_dirs": dirs}


def train_one(cfg: NFTConfig) -> dict:
    """One run: place the actors and the learner, train, summarise."""
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

    # Ask the autoscaler for everything at once, then place the actors and the learner ranks.
    rollout_bundle = {"CPU": cfg.rollout_cpus, "GPU": cfg.rollout_gpus, **cfg.rollout_resources}
    learner_bundles = [runtime.learner_bundle(cfg.train.use_gpu, cfg.train.gpus_per_worker, cfg.train.resources_per_worker)] * cfg.train.num_workers
    served = reward_actors.actor_names(cfg.run_name, cfg.rewards, cfg.reward_actors)
    reward_bundles = [{"CPU": 1.0, "GPU": cfg.reward_gpus}] * sum(len(n) for n in served.values())
    runtime.request_resources([rollout_bundle] * cfg.rollout_workers + learner_bundles + reward_bundles)
    names, actors = [f"{cfg.run_name}-rollout-{n}" for n in range(cfg.rollout_workers)], []
    try:
        if served:  # before the rollout actors, which find them by name
            metadata = prompt_lists.read_prompt_metadata(cfg.prompt_file) if "geneval" in served else {}
            actors += reward_actors.start_reward_actors(served, sources["reward_sources"], metadata, cfg.reward_gpus, batch_size=cfg.reward_batch_size, wait_s=cfg.resource_wait_s)
        actors += start_rollout_actors(cfg, names, sources, value_models, rollout_bundle, served)
        runtime.wait_for_bundles(learner_bundles, f"group of {cfg.train.num_workers} learner ranks", cfg.resource_wait_s)
        loop = {
            "rollout": to_dict(cfg.rollout),
            "reward_weights": cfg.rewards,
            "prompts": prompts,
            "eval_prompts": [prompts[n % len(prompts)] for n in range(cfg.eval_prompts)],
            "epochs": cfg.epochs,
            "groups_per_epoch": cfg.groups_per_epoch,
            "eval_every": cfg.eval_every,
            "eval_steps": cfg.eval_steps,
            "eval_batch_size": cfg.eval_batch_size,
            "drift_every": cfg.drift_every,
            "drift_groups": cfg.drift_groups,
            "seed": cfg.seed,
            "actor_names": names,
            "rollout_call_timeout_s": cfg.rollout_call_timeout_s,
            "devices": cfg.train.num_workers + cfg.rollout_workers,  # for device-hours: one device per process
            "storage": root,
            "run_name": cfg.run_name,
            "backbone": sources["backbone"],
            "reward_sources": sources["reward_sources"],
            "served_rewards": served,
            "wandb": to_dict(cfg.wandb),
            "testing": to_dict(cfg.testing),
            "config": to_dict(cfg),
        }
        run_learner(loop, cfg.train, root, cfg.run_name)
    finally:
        stop_actors(actors)
        runtime.request_resources([])  # withdraw the request: the autoscaler may scale down
    files.mirror(run.path)  # what the learner ranks wrote, wherever they ran
    metrics = training_runs.read_metrics(run.path)
    epochs = [m for m in metrics if m["epoch"] >= 0]
    summary = {
        "estimator": cfg.rollout.estimator,
        "epochs": cfg.epochs,
        "seconds_total": time.perf_counter() - start,
        **training_runs.run_summary(run.path, metrics),
        "drift": [{k: m[k] for k in m if k.startswith("drift_") or k == "global_step"} for m in epochs if "drift_spearman" in m],
        "is_toy": all(toyworld.is_caption(p) for p in prompts),
    }
    return training_runs.finish_summary(run, files, summary, metrics, "DiffusionNFT", "reward_mean", f"rollout score ({cfg.rollout.estimator})")


if __name__ == "__main__":
    run_main(main)
