"""Evaluate policies on a prompt suite with the clean reward models, as the paper reports them.

    python jobs/evaluate.py                               # toy world: base vs the README run's LoRA, CPU, local Ray (a minute)
    python jobs/evaluate.py "policies={base: base, mine: outputs/nft}"           # a jobs/nft.py run (its lora/)
    python jobs/evaluate.py --config jobs/configs/evaluate_sd35m_drawbench.yaml  # SD3.5-M on DrawBench, GPUs
    python jobs/evaluate.py run_name=eval_b baseline=outputs/eval_a              # paired against another evaluation
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/evaluate.py --config ...

Every policy samples N images per prompt from the same fixed seeds (the suite's protocol: DrawBench
40 steps, CFG 1.0, 512^2; `stitchvm_rl.evaluation.suites`). Images are sampled by Ray Data actors (one
per GPU), saved as PNG under the run's storage, scored by scorer actors on the saved uint8 images
(`stitchvm_rl.evaluation.scorers`), and each prompt's scores are appended to scores.jsonl as soon as
they are in: re-running the same command continues where it stopped.

Writes <storage>/<run>/files/ (mirrored to outputs/<run_name>/): evaluation.json (the settings),
scores.jsonl (per image), images/<policy>/, table.json and table.md (mean ± s.e. over prompts per
policy and scorer; paired differences against the first policy and `baseline`), grid.png (captioned:
a row per prompt, a column per policy), summary.json.
"""

import dataclasses
import json
from collections import Counter
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal

from stitchvm_rl import memory_plan, memory_roles, rewards, runtime, storage, toyworld, zoo
from stitchvm_rl.config import ConfigError, Range, did_you_mean, load_config, run_main
from stitchvm_rl.evaluation import results, scorers, suites
from stitchvm_rl.evaluation.workers import Guidance, Sampling, guided_method, image_name, noise_seed
from stitchvm_rl.guidance import GuidanceConfig
from stitchvm_rl.memory_plan import MemoryConfig
from stitchvm_rl.tracking import RunDir
from stitchvm_rl.value import default_value_model
from stitchvm_rl.value.model import check_value_model_dir

TOY_NFT_LORA = zoo.TOYWORLD_DIR / "nft_lora"  # `python jobs/nft.py` (the README's main command), its lora/
POLICY_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
GUIDED_METHODS = ("tweedie", "stitchvm", "fk_tweedie", "fk_stitchvm", "best_of_n")  # jobs/dps.py's, as 'dps:<method>' policies


@dataclass
class EvaluateConfig:
    run_name: str = "evaluate"
    """Name of the run (its folder under output_dir and under storage_path)."""
    output_dir: str = "outputs"
    """Where the driver's copy of run folders goes."""
    storage_path: str = ""
    """Storage every node reaches: a shared path or s3:// / gs:// URI (empty: <output_dir>/ray, one machine)."""
    backbone: str = "toyworld"
    """SD3 pipeline: hub id, local dir, storage URI, 'toyworld'."""
    policies: dict[str, str] = field(default_factory=lambda: {"base": "base", "nft": "toyworld-nft"})
    """{name: policy}: 'base', a LoRA directory or URI, a jobs/nft.py run (its lora/), 'toyworld-nft' (committed), 'dps:<method>' (jobs/dps.py's); paired against the first."""
    suite: str = "toyworld"
    """Prompt suite: drawbench, geneval, toyworld, or a .jsonl / .txt file."""
    max_prompts: Annotated[int, Range(0)] = 0
    """Evaluate only the suite's first prompts (0: all)."""
    per_category: Annotated[int, Range(0)] = 0
    """Evaluate only the first this many prompts of each category, e.g. of each GenEval task (0: all)."""
    scorers: list[str] = field(default_factory=list)
    """Scorers (empty: the suite's): hpsv2, hpsv21, pickscore, aesthetic, dfn_clip, clipscore, image_reward, geneval, toy_clip, caption."""
    scorer_sources: dict[str, str] = field(default_factory=dict)
    """Where scorers' weights come from {name, aesthetic_head or geneval_clip: hub id, path on every node, or URI} (empty: the defaults; a toy backbone: tiny detector and ImageReward)."""
    images_per_prompt: Annotated[int, Range(1)] = 4
    """Images per prompt and policy (N), each from its own fixed seed."""
    num_steps: Annotated[int, Range(0)] = 0
    """ODE steps (0: the suite's protocol; DrawBench 40)."""
    cfg_scale: Annotated[float, Range(0)] = 0.0
    """Classifier-free guidance scale (0: the suite's protocol, 1.0 = off)."""
    resolution: Annotated[int, Range(0)] = 0
    """Image side in pixels (0: the suite's protocol, DrawBench and GenEval 512; a toy backbone's native size)."""
    sampler: Literal["dpm2", "euler"] = "dpm2"
    """ODE solver: dpm2 (DiffusionNFT's, as the training-time evaluation) or euler (diffusers' default)."""
    seed: int = 0
    """Seed of every image's initial noise (image k of prompt i: the same for every policy and re-run)."""
    baseline: str = ""
    """Another evaluation (its output or storage folder) to pair every policy against (its first policy)."""
    grid_prompts: Annotated[int, Range(0)] = 8
    """Prompts (rows) in grid.png."""
    sample_actors: Annotated[int, Range(1)] = 1
    """Sampling actors (one GPU each on device=cuda)."""
    prompts_per_batch: Annotated[int, Range(1)] = 8
    """Prompts per sampling call (times N images; a short call is padded to it, so a re-run with the same value reproduces every image bit for bit)."""
    score_actors: Annotated[int, Range(1)] = 1
    """Scoring actors, each holding every scorer."""
    score_gpus: Annotated[float, Range(0, 1)] = 1.0
    """GPUs per scoring actor on device=cuda (below 1: it shares a GPU)."""
    score_batch_size: Annotated[int, Range(1)] = 32
    """Images per scorer forward pass."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the actors run."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Sampling dtype (bfloat16 on GPU); scorers run in float32 as their reference implementations do."""
    ray_cpus: Annotated[int, Range(1)] = 4
    """Logical CPUs of a local Ray cluster (ignored when joining a cluster)."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """The sampler of 'dps:<method>' policies (jobs/dps.py's; its num_steps and cfg_scale are the protocol's)."""
    guidance_scales: dict[str, float] = field(default_factory=lambda: {"tweedie": 0.02, "stitchvm": 0.02})
    """DPS scale per value of the 'dps:' policies (fk_* share them)."""
    value_model: str = ""
    """Value-model directory or URI of 'dps:stitchvm' / 'dps:fk_stitchvm' (empty: the toy world's committed one)."""
    guidance_rewards: dict[str, float] = field(default_factory=lambda: {"toy_clip": 1.0})
    """Pixel rewards {name: weight} of 'dps:tweedie', 'dps:fk_tweedie' and 'dps:best_of_n' (rewards.py's names)."""
    reward_sources: dict[str, str] = field(default_factory=dict)
    """Where guidance_rewards' weights come from {name or aesthetic_head: source} (empty: rewards.PUBLISHED's)."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The GPU memory plan each actor is checked against on device=cuda (jobs/plan.py)."""
    crash_after_prompts: Annotated[int, Range(0)] = 0
    """Testing: fail after this many prompts are recorded in this run (0: never), to test resuming."""


# ---------------------------------------------------------------- checks, before Ray starts or a model loads
def lora_of(name: str, source: str) -> str:
    """The LoRA directory (path or URI) of policy `source`, '' for the base and guided policies; a missing one is refused."""
    if source == "base" or guided_method(source):
        return ""
    if source == "toyworld-nft":
        return str(TOY_NFT_LORA)
    located = storage.local_source(source)
    for candidate in (located, storage.join(located, "lora"), storage.join(located, "files", "lora")):
        if storage.source_exists(storage.join(candidate, "pytorch_lora_weights.safetensors")):
            return candidate
    raise ConfigError(
        f"policies.{name}: '{source}' is not a LoRA directory (no pytorch_lora_weights.safetensors) nor a jobs/nft.py run "
        "(no lora/ inside); pass a run's output folder, its lora/, a storage URI of either, 'base' or 'toyworld-nft'"
    )


def resolve(cfg: EvaluateConfig) -> tuple[suites.Suite, Sampling, list[str], dict[str, str]]:
    """(suite with max_prompts applied, sampling settings, scorers, {policy: LoRA or ''}) of `cfg`."""
    suite = suites.load_suite(storage.job_path(cfg.suite) if cfg.suite.endswith((".jsonl", ".txt")) else cfg.suite)
    if cfg.per_category:
        kept, taken = [], Counter()
        for p in suite.prompts:
            if taken[p.category] < cfg.per_category:
                kept.append(p)
                taken[p.category] += 1
        suite = suites.Suite(suite.name, suite.source, kept, suite.protocol)
    if cfg.max_prompts:
        suite = suites.Suite(suite.name, suite.source, suite.prompts[: cfg.max_prompts], suite.protocol)
    p = suite.protocol
    native = 0 if cfg.backbone in zoo.TOY_BACKBONES else p.resolution  # a toy pipeline samples at its own size
    sampling = Sampling(cfg.num_steps or p.num_steps, cfg.cfg_scale or p.cfg_scale, cfg.resolution or native, cfg.sampler, cfg.images_per_prompt)
    names = list(cfg.scorers or p.scorers)
    if not cfg.policies:
        raise ConfigError("policies: none given; e.g. policies={base: base, mine: outputs/nft}")
    for name in cfg.policies:
        if not POLICY_NAME.match(name):
            raise ConfigError(f"policies: '{name}' cannot name a folder; use letters, digits, '_', '-' and '.'")
    return suite, sampling, names, {name: lora_of(name, source) for name, source in cfg.policies.items()}


def guidance_of(cfg: EvaluateConfig) -> Guidance:
    """What the 'dps:' policies share (the value model made absolute: the actors run on any node)."""
    uses_value = any(guided_method(s).removeprefix("fk_") == "stitchvm" for s in cfg.policies.values())
    value_model = (storage.local_source(cfg.value_model) or default_value_model(cfg.backbone)) if uses_value else ""
    return Guidance(cfg.guidance, dict(cfg.guidance_scales), value_model, dict(cfg.guidance_rewards), {k: storage.local_source(v) for k, v in cfg.reward_sources.items()})


def settings_of(cfg: EvaluateConfig, suite: suites.Suite, sampling: Sampling, names: list[str]) -> dict:
    """What makes two evaluations' images comparable (evaluation.json)."""
    settings = {"suite": suite.name, "prompts": len(suite.prompts), "backbone": cfg.backbone, "sampling": asdict(sampling), "seed": cfg.seed, "scorers": names, "policies": dict(cfg.policies),
                "selection": {"max_prompts": cfg.max_prompts, "per_category": cfg.per_category}}
    settings["scorer_sources"] = used_scorer_sources(cfg, names)
    if any(guided_method(s) for s in cfg.policies.values()):
        settings["guidance"] = {"sampler": asdict(cfg.guidance), "scales": dict(cfg.guidance_scales), "value_model": cfg.value_model, "rewards": dict(cfg.guidance_rewards)}
    return settings


def scorer_sources(cfg: EvaluateConfig) -> dict[str, str]:
    """The scorers' sources: the config's, and on a toy backbone the tiny detector and ImageReward."""
    return scorers.default_sources(cfg.backbone, cfg.scorer_sources)


def worker_scorer_sources(cfg: EvaluateConfig, names: list[str]) -> dict[str, str]:
    """Every weight the scoring actors open (the aesthetic head too), relative paths made absolute on
    the driver, so that each node looks for the same path."""
    used = used_scorer_sources(cfg, names) | ({scorers.HEAD_SOURCE: scorers.head_source(cfg.scorer_sources)} if "aesthetic" in names else {})
    return {k: storage.local_source(v) for k, v in used.items()}


def used_scorer_sources(cfg: EvaluateConfig, names: list[str]) -> dict[str, str]:
    """{scorer (and geneval_clip): the weights it loads} of the scorers with weights."""
    keys = [n for n in names if scorers.SCORERS[n].source] + ([scorers.GENEVAL_CLIP] if "geneval" in names else [])
    return {k: scorers.scorer_source(k, scorer_sources(cfg)) for k in keys}


def check_guided(cfg: EvaluateConfig) -> None:
    """Refuse an unknown guidance method, a missing DPS scale, value model or reward."""
    methods = {name: guided_method(source) for name, source in cfg.policies.items() if guided_method(source)}
    for name, method in methods.items():
        if method not in GUIDED_METHODS:
            raise ConfigError(f"policies.{name}: 'dps:{method}' is not a guidance method; choose dps:{', dps:'.join(GUIDED_METHODS)}{did_you_mean(method, GUIDED_METHODS)}")
        kind = method.removeprefix("fk_")
        if kind in ("tweedie", "stitchvm") and kind not in cfg.guidance_scales:
            raise ConfigError(f"policies.{name}: 'dps:{method}' has no DPS scale; set guidance_scales.{kind}=...")
    kinds = {m.removeprefix("fk_") for m in methods.values()}
    if "stitchvm" in kinds:
        if cfg.value_model:
            check_value_model_dir(cfg.value_model, cfg.backbone)
        else:
            default_value_model(cfg.backbone)  # refuses a backbone without one
    if kinds & {"tweedie", "best_of_n"}:
        rewards.check_reward_weights(cfg.guidance_rewards, "guidance_rewards", cfg.reward_sources)


def check_same_images(mine: dict, other: dict, what: str, fix: str) -> None:
    """Refuse to pair or continue `other` unless its prompts, sampling and seed are `mine`."""
    keys = ("suite", "prompts", "sampling", "seed", "selection")
    differ = [k for k in keys if mine[k] != other.get(k, mine[k] if k == "selection" else None)]  # evaluations before `selection`: max_prompts only
    if differ:
        raise ConfigError(f"{what} differs in {', '.join(differ)} ({', '.join(f'{k}={other.get(k)}' for k in differ)}); {fix}")


def check(cfg: EvaluateConfig) -> None:
    """Refuse bad input before Ray starts or a model loads."""
    zoo.check_source(cfg.backbone, "backbone")
    suite, sampling, names, _ = resolve(cfg)
    scorers.check_scorers(names, scorer_sources(cfg))
    check_guided(cfg)
    if "caption" in names and not all(toyworld.is_caption(p.prompt) for p in suite.prompts):
        raise ConfigError("scorers: 'caption' reads toy-world captions only; drop it for this suite")
    if "geneval" in names and not all("include" in p.metadata and "tag" in p.metadata for p in suite.prompts):
        raise ConfigError("scorers: 'geneval' needs GenEval metadata (tag, include) with every prompt; use suite=geneval or a .jsonl in its format")
    root = storage.storage_root(cfg.storage_path, cfg.output_dir)
    storage.check_reachable(root, "storage_path")
    mine = json.loads(json.dumps(settings_of(cfg, suite, sampling, names)))  # as evaluation.json holds it (tuples as lists)
    earlier = storage.read_text(storage.join(root, cfg.run_name, "files"), results.SETTINGS)
    if earlier:  # a re-run continues the same evaluation, or adds policies to it
        earlier = json.loads(earlier)
        check_same_images(mine, earlier, f"run '{cfg.run_name}' holds an evaluation that", "give another run_name")
        changed = [n for n, s in earlier["policies"].items() if n in cfg.policies and cfg.policies[n] != s]
        other_sources = earlier.get("scorer_sources", mine["scorer_sources"]) != mine["scorer_sources"]
        if earlier["scorers"] != names or earlier["backbone"] != cfg.backbone or changed or other_sources or earlier.get("guidance", mine.get("guidance")) != mine.get("guidance"):
            raise ConfigError(f"run '{cfg.run_name}' holds an evaluation with other scorers, scorer weights, backbone, policy sources or guidance ({changed or earlier['scorers']}); give another run_name")
    if cfg.baseline:
        base = storage.read_text(storage.local_source(cfg.baseline), results.SETTINGS)
        if base is None:
            raise ConfigError(f"baseline: '{cfg.baseline}' holds no evaluation.json; pass the output folder (or <storage>/<run>/files) of a finished jobs/evaluate.py run")

        base = json.loads(base)
        check_same_images(mine, base, f"baseline '{cfg.baseline}'", "evaluate with the same suite, sampling and seed to pair against it")
        other = {k: v for k, v in base.get("scorer_sources", {}).items() if k in mine["scorer_sources"] and v != mine["scorer_sources"][k]}
        if other:
            raise ConfigError(f"baseline '{cfg.baseline}' scored with other weights ({other}); pair evaluations scored by the same models")
    if cfg.device == "cuda":
        memory_plan.check(plan_memory(cfg), cfg.memory.enforce)


def plan_memory(cfg: EvaluateConfig) -> list[memory_plan.RolePlan]:
    """The sampling and scoring actors' GPU memory plan (`stitchvm_rl.memory_roles.evaluate_roles`)."""
    _, sampling, names, loras = resolve(cfg)
    sources = used_scorer_sources(cfg, names)
    lora_bytes = {}
    for name, lora in loras.items():
        if lora and not storage.is_uri(lora):
            lora_bytes[name] = (Path(lora) / "pytorch_lora_weights.safetensors").stat().st_size
    guided = [guided_method(s) for s in cfg.policies.values() if guided_method(s)]
    guided_plans = []
    if guided:  # jobs/dps.py's worker plan of each method, at one prompt's N images (how the actor runs them)
        protocol = dataclasses.replace(cfg.guidance, num_steps=sampling.num_steps, cfg_scale=sampling.cfg_scale)
        as_dps = SimpleNamespace(device=cfg.device, backbone=cfg.backbone, dtype=cfg.dtype, resolution=sampling.resolution, guidance=protocol,
                                 methods=guided, batch_size=sampling.images_per_prompt, memory=cfg.memory)
        guided_plans = memory_roles.dps_roles(as_dps, rewards.published_sources(cfg.guidance_rewards, cfg.reward_sources), guidance_of(cfg).value_model)
    return memory_roles.evaluate_roles(cfg, sampling, sources, lora_bytes, guided_plans)


# ---------------------------------------------------------------- the run
def todo_rows(suite: suites.Suite, policies: list[str], done: set, seed: int) -> list[dict]:
    return [
        {"policy": policy, "index": p.index, "prompt": p.prompt, "noise_seed": noise_seed(seed, p.index), "metadata": json.dumps(p.metadata)}
        for policy in policies
        for p in suite.prompts
        if (policy, p.index) not in done
    ]


def sample_and_score(cfg: EvaluateConfig, rows: list[dict], loras: dict[str, str], sampling: Sampling, names: list[str], root: str):
    """The Ray Data pipeline over `rows`: sampling actors, then scoring actors; yields scored rows."""
    import ray

    from stitchvm_rl.evaluation.workers import SampleImages, ScoreImages

    gpu = cfg.device == "cuda"
    backbone = storage.local_source(cfg.backbone)
    sources = worker_scorer_sources(cfg, names)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // cfg.prompts_per_batch)))
    ds = ds.map_batches(
        SampleImages, fn_constructor_args=(backbone, dict(cfg.policies), loras, sampling, guidance_of(cfg), (root, cfg.run_name), cfg.device, cfg.dtype, cfg.prompts_per_batch),
        batch_size=cfg.prompts_per_batch, compute=ray.data.ActorPoolStrategy(size=cfg.sample_actors), num_gpus=1 if gpu else 0, num_cpus=1,
    )
    ds = ds.map_batches(
        ScoreImages, fn_constructor_args=(names, sources, cfg.device, "float32", cfg.score_batch_size),
        batch_size=cfg.prompts_per_batch, compute=ray.data.ActorPoolStrategy(size=cfg.score_actors), num_gpus=cfg.score_gpus if gpu else 0, num_cpus=1,
    )
    return ds.iter_rows()


def record_of(row: dict, suite_prompt: suites.SuitePrompt, names: list[str], n: int) -> dict:
    policy, index = str(row["policy"]), int(row["index"])
    record = {
        "policy": policy, "index": index, "prompt": suite_prompt.prompt, "category": suite_prompt.category,
        "noise_seed": int(row["noise_seed"]), "scores": {s: [float(v) for v in row[f"score:{s}"]] for s in names},
        "images": [image_name(policy, index, k) for k in range(n)],
    }
    notes = {s: json.loads(row[f"notes:{s}"]) for s in names if f"notes:{s}" in row}
    return record | ({"notes": notes} if notes else {})


def write_grid(files: storage.RunFiles, suite: suites.Suite, policies: list[str], count: int, images: int) -> None:
    """grid.png: the first `count` prompts, each policy's first `images` images side by side."""
    import io

    import numpy as np
    from PIL import Image

    from stitchvm_rl.evaluation.grids import captioned_grid

    shown = suite.prompts[:count]
    cells = [[np.asarray(Image.open(io.BytesIO(files.read_bytes(image_name(p, sp.index, k))))) for p in policies for k in range(images)] for sp in shown]
    files.write_bytes("grid.png", captioned_grid(cells, [sp.prompt for sp in shown], policies))


def main(argv: list[str]) -> dict:
    from tqdm import tqdm

    cfg = load_config(EvaluateConfig, argv)
    check(cfg)
    suite, sampling, names, loras = resolve(cfg)
    root = storage.storage_root(cfg.storage_path, cfg.output_dir)
    run = RunDir(cfg.output_dir, cfg.run_name, cfg)
    files = storage.RunFiles(root, cfg.run_name)
    settings = settings_of(cfg, suite, sampling, names)
    earlier = json.loads(files.read_bytes(results.SETTINGS) or b"{}")
    files.write_json(results.SETTINGS, settings | {"policies": earlier.get("policies", {}) | dict(cfg.policies)})

    records = results.read_records((files.read_bytes(results.SCORES) or b"").decode())
    rows = todo_rows(suite, list(cfg.policies), results.done_keys(records), cfg.seed)
    print(f"{suite.name}: {len(suite.prompts)} prompts x {len(cfg.policies)} policies, {len(rows)} to sample ({sampling})", flush=True)
    start, scored = time.perf_counter(), 0
    if rows:
        runtime.init_ray(cfg.ray_cpus)
        located = {"storage_path": storage.node_marker(root)} | {f"policies.{n}": v for n, v in loras.items() if v and storage.is_located(v)}
        located |= {f"scorer_sources.{k}": v for k, v in worker_scorer_sources(cfg, names).items() if v not in zoo.BUILT_IN and storage.is_located(v)}
        runtime.check_every_node_sees(located)
        by_index = {p.index: p for p in suite.prompts}
        for row in tqdm(sample_and_score(cfg, rows, loras, sampling, names, root), total=len(rows), desc="prompts scored"):
            files.append_jsonl(results.SCORES, record_of(row, by_index[int(row["index"])], names, sampling.images_per_prompt))
            scored += 1
            if scored == cfg.crash_after_prompts:
                raise RuntimeError(f"testing: stopped after {scored} prompts (crash_after_prompts)")
    seconds = time.perf_counter() - start

    records = results.read_records(files.read_bytes(results.SCORES).decode())
    baseline = None
    if cfg.baseline:
        text = storage.read_text(storage.local_source(cfg.baseline), results.SCORES)
        baseline = ("baseline", results.read_records(text))
    table = results.build_table(records, list(cfg.policies), names, baseline)
    files.write_json("table.json", table)
    files.write_bytes("table.md", results.to_markdown(table, names, f"{suite.name}: {len(suite.prompts)} prompts x {sampling.images_per_prompt} images").encode())
    if cfg.grid_prompts:
        write_grid(files, suite, list(cfg.policies), cfg.grid_prompts, min(sampling.images_per_prompt, 4))
    summary = {"suite": suite.name, "source": suite.source, "settings": settings, "prompts_scored_this_run": scored, "seconds": seconds, **table}
    files.write_json("summary.json", summary)
    files.mirror(run.path)
    print(results.to_markdown(table, names, suite.name))
    print(f"wrote {run.path}")
    return summary


if __name__ == "__main__":
    run_main(main)
