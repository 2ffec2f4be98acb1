"""The memory plan against a real GPU: every role of an NFT config and each DPS method's worker,
their models at full size with uninitialised weights, each planned phase run for real (an NFT
rollout group's steps: sampling, scoring, decoding and rewarding; a learner's micro-step forward +
backward; the evaluation; a DPS step), planned GiB against measured peak allocated / reserved, and
seconds (`memory_plan.measure`). One process, one GPU, one role at a time.

    python jobs/device_check.py                  # SD3.5-M, the shipped NFT stitchvm config in the one-node layout + DPS at 1024^2
    python jobs/device_check.py --dry-run        # the same code on the CPU with the toy world (seconds only), before a GPU is lent

Writes <out>/device_check.json and device_check.md (out: $OUT if set, else outputs/device_check).
It needs torch, diffusers, transformers, peft, safetensors, pyyaml and this package, no Ray, no
DeepSpeed, no weights: on a machine with its own CUDA torch,
    pip install --no-deps <wheels of diffusers transformers peft safetensors tokenizers huggingface_hub> && pip install --no-deps -e .
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from stitchvm_rl import memory_plan, memory_roles, rewards
from stitchvm_rl.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the job scripts beside this one
import dps  # noqa: E402
import nft  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
GPU_NFT = ["--config", str(CONFIGS / "nft_sd35m_stitchvm.yaml"), "--config", str(CONFIGS / "nft_layout_one_node_8x80gb.yaml")]
GPU_DPS = ["backbone=stabilityai/stable-diffusion-3.5-medium", "device=cuda", "dtype=bfloat16", "resolution=1024", "batch_size=1",
           "methods=[none,tweedie,stitchvm]", "rewards={clipscore: 1.0}", "guidance.cfg_scale=4.5", "guidance.num_steps=28"]
DRY_NFT = ["rollout_gpus=1", "train.use_gpu=true", "rollout.group_size=4", "rollout.batch_size=2", "eval_prompts=4", "eval_batch_size=2"]
DRY_DPS = ["device=cuda", "batch_size=2", "methods=[none,tweedie,stitchvm]"]
SD35M_VALUE_MODEL = "stitch_sd35m_clipscore/value_model"  # not at hand: planned as StitchVM(4, 1) over the reward's CLIP


def plans(dry_run: bool, gpu_gib: float) -> list[memory_plan.RolePlan]:
    """The NFT roles and the DPS workers to check, planned against `gpu_gib` of GPU."""
    memory = [f"memory.gpu_gib={gpu_gib}"]
    nft_cfg = load_config(nft.NFTConfig, (DRY_NFT if dry_run else GPU_NFT) + memory)
    dps_cfg = load_config(dps.DPSConfig, (DRY_DPS if dry_run else GPU_DPS) + memory)
    sources = rewards.published_sources(dps_cfg.rewards, dps_cfg.reward_sources)
    value_model = dps.default_value_model(dps_cfg.backbone) if dry_run else SD35M_VALUE_MODEL
    return [*nft.plan_memory(nft_cfg), *memory_roles.dps_roles(dps_cfg, sources, value_model)]


def device_facts(device: str) -> dict:
    """The machine, and the CUDA context + library memory torch does not see (used - reserved)."""
    facts = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        torch.cuda.init()
        torch.zeros(1, device="cuda") @ torch.zeros(1, device="cuda")  # context and cuBLAS up
        free, total = torch.cuda.mem_get_info()
        facts |= {"gpu": torch.cuda.get_device_name(), "gpu_gib": total / 2**30, "context_gib": (total - free - torch.cuda.memory_reserved()) / 2**30}
    return facts


def table(results: list[dict]) -> str:
    lines = ["| role | phase | planned GiB | measured GiB | seconds |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['role']} | resident (weights; optimizer state stays planned) | {r['planned_resident_gib']:.2f} | {r['measured_resident_gib']:.2f} | |")
        lines += [f"| | {p['phase']} | {p['planned_gib']:.2f} | {p['measured_gib']:.2f} | {p['seconds']:.3f} |" for p in r["phases"]]
        lines.append(f"| | **peak**: planned tensors / measured allocated; planned total / measured reserved | {r['planned_peak_tensors_gib']:.2f} / {r['planned_total_gib']:.2f} | {r['measured_peak_allocated_gib']:.2f} / {r['measured_max_reserved_gib']:.2f} | |")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    dry_run = "--dry-run" in argv
    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    facts = device_facts(device)
    out = Path(os.environ.get("OUT") or "outputs/device_check")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []
    for plan in plans(dry_run, facts.get("gpu_gib", 80.0)):
        results.append(memory_plan.measure(plan, device))
        print(table(results[-1:]), flush=True)
    report = {"facts": facts, "seconds": time.perf_counter() - start, "roles": results}
    (out / "device_check.json").write_text(json.dumps(report, indent=1))
    (out / "device_check.md").write_text(f"{json.dumps(facts)}\n\n{table(results)}\n")
    print(f"wrote {out}/device_check.json and .md ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
