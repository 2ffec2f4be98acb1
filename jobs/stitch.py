"""Build a stitched value model: stage 1 (closed-form stitch search) + stage 2 (Ray Train finetuning).

    python jobs/stitch.py                                  # toy world + toy CLIP, CPU, local Ray (minutes)
    python jobs/stitch.py head=scalar train.objective=regress analytic_reward=exact_colour run_name=stitch_exact_colour
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/stitch.py
    python jobs/stitch.py --config jobs/configs/stitch_sd35m_clip.yaml   # SD3.5-M + CLIP ViT-L/14-336, GPUs

    python jobs/stitch.py evaluate_only=outputs/ray/stitch/files/value_model   # the accuracy of an exported model alone

Stage 1 runs as one Ray task (`search.num_gpus`), stage 2 on Ray Train ranks that stream their images
through Ray Data (nothing is materialised), the accuracy as one Ray task per noise level (`eval.num_gpus`).
Writes outputs/<run_name>/: config.yaml, stitch_search.json (error of every (i, j)), value_model/
(value_model.json + .safetensors), summary.json (training metrics and value accuracy against noise
level: StitchVM vs Tweedie vs Monte Carlo), accuracy.png. The config and the pipeline are
`stitchvm_rl.value.build` (its defaults built the toy world's committed value model, `stitchvm_rl.value.default_value_model()`).
"""

from stitchvm_rl import memory_plan, memory_roles, rewards, runtime, storage, zoo
from stitchvm_rl.config import ConfigError, did_you_mean, load_config, run_main
from stitchvm_rl.value.build import StitchConfig, build_and_evaluate
from stitchvm_rl.value.data import read_jsonl, scan_image_folder


def check(cfg: StitchConfig) -> None:
    """Refuse inconsistent settings before any model is loaded."""
    zoo.check_source(cfg.backbone, "backbone")
    if cfg.reward_model in rewards.PUBLISHED:  # a reward's name where its model's source belongs
        raise ConfigError(f"reward_model '{cfg.reward_model}' is a reward name, not a model source; pass its CLIP model, e.g. reward_model={rewards.PUBLISHED[cfg.reward_model].source}")
    zoo.check_source(cfg.reward_model, "reward_model")
    storage.check_reachable(storage.storage_root(cfg.storage_path, cfg.output_dir), "storage_path")
    runtime.check_zero_stage(cfg.train.zero_stage, "train.zero_stage", "the value model is exported")
    if cfg.analytic_reward and cfg.analytic_reward not in rewards.ANALYTIC:
        raise ConfigError(f"analytic_reward '{cfg.analytic_reward}' is unknown; choose one of {', '.join(rewards.ANALYTIC)}{did_you_mean(cfg.analytic_reward, rewards.ANALYTIC)}")
    if cfg.train.objective == "regress" and (cfg.head != "scalar" or not cfg.analytic_reward):
        raise ConfigError("train.objective=regress needs head=scalar and an analytic_reward (e.g. colour_match)")
    if cfg.head == "scalar" and cfg.train.objective != "regress":
        raise ConfigError("head=scalar has no teacher to distil; use train.objective=regress with an analytic_reward")
    check_stitch_points(cfg)
    if cfg.head == "aesthetic" and not cfg.aesthetic_head:
        raise ConfigError(f"head=aesthetic needs the published aesthetic MLP: aesthetic_head={rewards.PUBLISHED['aesthetic'].head} (convert it once with `python jobs/convert_weights.py kind=aesthetic ...`)")
    if cfg.aesthetic_head and not storage.source_exists(storage.job_path(cfg.aesthetic_head)):
        raise ConfigError(f"aesthetic_head '{cfg.aesthetic_head}' does not exist; convert the published MLP once with `python jobs/convert_weights.py kind=aesthetic ...`")
    if cfg.evaluate_only:
        if storage.read_text(cfg.evaluate_only, "value_model.json") is None:
            raise ConfigError(f"evaluate_only: '{cfg.evaluate_only}' is not an exported value model (no value_model.json); pass <storage_path>/<run_name>/files/value_model of a finished jobs/stitch.py run")
        return
    captions = cfg.data.source != "folder"  # policy samples carry their prompts, JSONL lines may
    if not captions and cfg.head == "clip" and cfg.train.score_weight > 0:
        raise ConfigError("train.score_weight scores the student against the image's caption, which folder images do not have; set it to 0 (or data.source=policy, or jsonl with prompts)")
    num_images = cfg.data.num_images
    try:  # every image readable, before any model loads
        if cfg.data.source == "folder":
            num_images = len(scan_image_folder(storage.job_path(cfg.data.folder), cfg.data.skip_broken_images))
        elif cfg.data.source == "jsonl":
            num_images = len(read_jsonl(storage.job_path(cfg.data.jsonl), cfg.data.skip_broken_images))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.{cfg.data.source}: {err}") from None
    if not captions and cfg.head_conditioning == "prompt":
        raise ConfigError("folder images have no captions, so a head that reads the prompt cannot learn from them; set head_conditioning=empty (or data.source=policy, or jsonl with prompts)")
    if cfg.data.source != "policy" and cfg.analytic_reward in rewards.TOY_CAPTION_REWARDS:
        raise ConfigError(f"{cfg.analytic_reward} reads toy captions, which image files do not have; use data.source=policy")
    if cfg.train.use_gpu or cfg.data.actor_gpus or cfg.search.num_gpus or cfg.eval.num_gpus:
        memory_plan.check(plan_memory(cfg), cfg.memory.enforce)
    if num_images < cfg.train.num_workers * cfg.train.batch_size:  # every rank drops its last partial batch
        raise ConfigError(
            f"{num_images} training images give each of the {cfg.train.num_workers} learner workers less than one batch of {cfg.train.batch_size}, "
            "so stage 2 would train nothing; raise data.num_images (or add images), or lower train.batch_size or train.num_workers"
        )


def check_stitch_points(cfg: StitchConfig) -> None:
    """Refuse, from the models' config files alone, a reward model without an image tower and
    search blocks outside the two models' depths."""
    transformer = zoo.config_file(cfg.backbone, "transformer/config.json")
    clip = zoo.config_file(cfg.reward_model)
    if clip is not None and "vision_config" not in clip:
        raise ConfigError(f"reward_model '{cfg.reward_model}' has no image tower (its config.json has no vision_config: a text-only model?); pass a CLIP model with both towers, e.g. {rewards.PUBLISHED['clipscore'].source}")
    if transformer and cfg.search.max_dit_block > transformer["num_layers"]:
        raise ConfigError(f"search.max_dit_block={cfg.search.max_dit_block} is beyond the backbone's {transformer['num_layers']} transformer blocks; choose 1..{transformer['num_layers']} (0: all)")
    layers = (clip or {}).get("vision_config", {}).get("num_hidden_layers")
    outside = [j for j in cfg.search.rm_blocks if j < 1 or (layers and j > layers)]
    if outside or not cfg.search.rm_blocks:
        raise ConfigError(f"search.rm_blocks {cfg.search.rm_blocks} must be reward-model blocks within 1..{layers or 'its depth'} (paper: [1, 2, 3, 4])")


def plan_memory(cfg: StitchConfig) -> list[memory_plan.RolePlan]:
    """The data actors' and learner ranks' GPU memory plan (`stitchvm_rl.memory_roles.stitch_roles`)."""
    return memory_roles.stitch_roles(cfg)


def main(argv: list[str]) -> dict:
    cfg = load_config(StitchConfig, argv)
    check(cfg)
    return build_and_evaluate(cfg)


if __name__ == "__main__":
    run_main(main)
