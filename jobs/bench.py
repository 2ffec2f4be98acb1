"""Benchmarks as ratios: every comparison measured side by side in one process, interleaved
(a, b, a, b, ...), repeated; the table shows median and [min, max].

    python jobs/bench.py                               # CPU, toy world, every CPU section (< 15 min on 2 cores)
    python jobs/bench.py quick=true                    # seconds per section: proves it still runs (CI)
    python jobs/bench.py "sections=[dps,value]" repeats=10
    python jobs/bench.py device=cuda dtype=bfloat16 "sections=[dps,value,real_scale,real_scale_timed]"   # one GPU
    python jobs/bench.py device=cuda dtype=bfloat16 "sections=[real_scale_timed]" compile=true   # + torch.compile
    python jobs/bench.py device=cuda dtype=bfloat16 "sections=[real_scale_nft]" "resolutions=[512]"   # SD3.5-M NFT group

Sections:
    nft_epoch         one NFT epoch, terminal vs stitchvm, in process: seconds per phase (sample,
                      score, train), samples/s, transformer evaluations per sample
    draft_step        one DRaFT-K micro-step (K = backprop_steps), terminal vs stitchvm, in process:
                      seconds per step, transformer rows / decodes / value evaluations per sample
    nft_reach         jobs/nft.py on Ray, terminal (reach_epochs) then stitchvm (reach_epochs_stitchvm):
                      seconds/epoch, and the time until stitchvm's evaluation reward reaches terminal's final one
    dps               guided sampling, none vs tweedie vs stitchvm: seconds per sample, peak memory
    value             one value estimate, StitchVM vs Tweedie vs MC-K: seconds per estimate
    rollout_scaling   samples/s of 1, 2, 4 RolloutWorker actors vs the same work in this process
    weight_sync       seconds to push an SD3.5-Medium-size LoRA (r = lora_rank) to 1, 2, 4 actors
    real_scale        SD3.5-M + CLIP ViT-L/14-336 on `meta`: FLOPs and activations of a DPS step,
                      model evaluations of an NFT epoch (no GPU needed)
    real_scale_timed  the same DPS step with random SD3.5-M weights on the GPU: seconds, peak memory
                      (compile=true: each method also with its SD3 / CLIP blocks torch.compile'd)
    real_scale_nft    one prompt group of an NFT epoch with random SD3.5-M weights on the GPU, terminal
                      vs stitchvm at the SD3.5-M configs' settings: seconds per phase (rollout + training)

Writes outputs/<run_name>/bench.json (every repeat) and bench.md (the table). The sections are
`stitchvm_rl.bench_sections`, the table `stitchvm_rl.bench_table`.
"""

import dataclasses
import importlib.util
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch

from stitchvm_rl import bench_sections as sections
from stitchvm_rl import benchmark, rewards, zoo
from stitchvm_rl.bench_table import table
from stitchvm_rl.config import ConfigError, Range, did_you_mean, load_config, run_main
from stitchvm_rl.tracking import RunDir
from stitchvm_rl.value import default_value_model
from stitchvm_rl.value.model import check_value_model_dir


SECTIONS = ("nft_epoch", "draft_step", "nft_reach", "dps", "value", "rollout_scaling", "weight_sync", "real_scale", "real_scale_timed", "real_scale_nft")
CPU_SECTIONS = ["nft_epoch", "draft_step", "nft_reach", "dps", "value", "rollout_scaling", "weight_sync", "real_scale"]


@dataclass
class BenchConfig:
    run_name: str = "bench"
    """Name of the run folder under output_dir."""
    output_dir: str = "outputs"
    """Where run folders go."""
    sections: list[str] = field(default_factory=lambda: list(CPU_SECTIONS))
    """Sections to run (see the module docstring); real_scale_timed needs device=cuda."""
    quick: bool = False
    """Tiny sizes and one repeat: proves every section still runs (CI); the numbers mean little."""
    repeats: Annotated[int, Range(1)] = 5
    """Timed repeats per method (after one warm-up round)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the in-process sections run."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model dtype of the in-process sections (bfloat16 on GPU)."""
    backbone: str = "toyworld"
    """SD3 policy: hub id, local dir, 'toyworld'."""
    rewards: dict[str, float] = field(default_factory=lambda: {"toy_clip": 1.0})
    """Pixel rewards {name: weight} (terminal, Tweedie, MC)."""
    value_model: str = ""
    """Value-model directory (empty: the backbone's default, the toy world's committed one)."""
    groups: Annotated[int, Range(1)] = 4
    """Prompt groups (of rollout.group_size = 8 images) per NFT epoch, rollout and DPS batch."""
    reach_epochs: Annotated[int, Range(1)] = 20
    """nft_reach: epochs of the terminal (baseline) run; its final evaluation reward is the target."""
    reach_epochs_stitchvm: Annotated[int, Range(1)] = 40
    """nft_reach: epochs of the stitchvm run (more, so its curve can cross the target; the time is read where it does)."""
    backprop_steps: list[int] = field(default_factory=lambda: [1, 3])
    """draft_step: the K of DRaFT-K to time (the paper's 1 and 3)."""
    actors: list[int] = field(default_factory=lambda: [1, 2, 4])
    """rollout_scaling and weight_sync: actor counts."""
    lora_rank: Annotated[int, Range(1)] = 32
    """weight_sync: LoRA rank of the SD3.5-Medium-size adapter."""
    resolutions: list[int] = field(default_factory=lambda: [512, 1024])
    """real_scale / real_scale_timed: image sides (real_scale_nft: the first)."""
    compile: bool = False
    """real_scale_timed / real_scale_nft: also time every method with its SD3 and CLIP blocks torch.compile'd, beside eager."""
    ray_cpus: Annotated[int, Range(1)] = 8
    """Logical CPUs of a local Ray cluster."""


VALUE_SECTIONS = {"nft_epoch", "draft_step", "nft_reach", "dps", "value", "rollout_scaling"}
"""The sections that score with a value model."""


def check(cfg: BenchConfig) -> None:
    zoo.check_source(cfg.backbone, "backbone")
    rewards.check_reward_weights(cfg.rewards, "rewards")
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown or not cfg.sections:
        hint = did_you_mean(unknown[0], SECTIONS) if unknown else ""
        raise ConfigError(f"sections {unknown or '[]'} unknown or empty; choose from {', '.join(SECTIONS)}{hint}")
    for section in {"real_scale_timed", "real_scale_nft"} & set(cfg.sections):
        if cfg.device != "cuda":
            raise ConfigError(f"section {section} times SD3.5-M-size models and needs device=cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no GPU; use device=cpu")
    if cfg.value_model:
        check_value_model_dir(cfg.value_model, cfg.backbone)
    elif VALUE_SECTIONS & set(cfg.sections):
        default_value_model(cfg.backbone)  # refuses a backbone that has no default value model


def load_job(name: str):
    """A sibling job module (jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_job", Path(__file__).with_name(f"{name}.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def main(argv: list[str]) -> dict:
    cfg = load_config(BenchConfig, argv)
    check(cfg)
    if cfg.quick:
        cfg = dataclasses.replace(cfg, repeats=1, groups=1, actors=[1, 2], backprop_steps=[1])
    run = RunDir(cfg.output_dir, cfg.run_name, cfg)
    results = {"machine": benchmark.machine(cfg.device), "quick": cfg.quick, "repeats": cfg.repeats}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        value_dir = sections.value_model_dir(cfg) if VALUE_SECTIONS & set(cfg.sections) else ""
        run_section = {
            "nft_epoch": lambda: sections.bench_nft_epoch(cfg, value_dir),
            "draft_step": lambda: sections.bench_draft_step(cfg, value_dir),
            "nft_reach": lambda: sections.bench_nft_reach(cfg, value_dir, scratch, load_job("nft").main),
            "dps": lambda: sections.bench_dps(cfg, value_dir, load_job("dps").DPSConfig().scales),
            "value": lambda: sections.bench_value(cfg, value_dir),
            "rollout_scaling": lambda: sections.bench_rollout_scaling(cfg, value_dir),
            "weight_sync": lambda: sections.bench_weight_sync(cfg),
            "real_scale": lambda: sections.bench_real_scale(cfg),
            "real_scale_timed": lambda: sections.bench_real_scale_timed(cfg),
            "real_scale_nft": lambda: sections.bench_real_scale_nft(cfg),
        }
        results["section_seconds"] = {}
        for section in cfg.sections:
            print(f"-- {section}", flush=True)
            start = time.perf_counter()
            results[section] = run_section[section]()
            results["section_seconds"][section] = time.perf_counter() - start  # what each section costs to run
            run.write_json("bench.json", results)  # after every section: a late failure keeps the rest
    text = table(results)
    (run.path / "bench.md").write_text(text + "\n")
    print(text)
    print(f"wrote {run.path}")
    return results


if __name__ == "__main__":
    run_main(main)
