"""The GPU memory plan of a job's config: what every role holds on its GPU, counted on `meta`
(`stitchvm_rl.memory_plan`, the roles in `stitchvm_rl.memory_roles`), against the GPU each role
gets. jobs/nft.py, jobs/stitch.py, jobs/dps.py, jobs/sample.py, jobs/evaluate.py and jobs/evaluate_values.py check the same plan before they
place or load anything; so does jobs/draft.py.

    python jobs/plan.py --config jobs/configs/nft_sd35m_stitchvm.yaml        # GPUs of cluster/aws.yaml's node types
    python jobs/plan.py --config jobs/configs/nft_sd35m_stitchvm.yaml --config jobs/configs/nft_layout_one_node_8x80gb.yaml
    python jobs/plan.py --config jobs/configs/nft_sd35m_terminal.yaml memory.cluster_yaml=cluster/gcp.yaml
    python jobs/plan.py --config jobs/configs/stitch_sd35m_hpsv2.yaml memory.gpu_gib=79.6
    python jobs/plan.py --job dps backbone=stabilityai/stable-diffusion-3.5-medium device=cuda dtype=bfloat16 resolution=1024 memory.gpu_gib=24 ...

The job is the one whose config has every top-level key of the --config files (or --job nft | draft |
stitch | dps | sample | evaluate | evaluate_values; no config: nft). Any key can be overridden as in the job itself. Exits 2 naming
every role that does not fit its GPU and what would (batch sizes, gradient checkpointing, dtype,
a larger GPU); without GPUs (the toy defaults) there is nothing to check.
"""

import sys
from pathlib import Path

import yaml

from stitchvm_rl import memory_plan
from stitchvm_rl.config import ConfigError, load_config, run_main

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the job scripts beside this one
import dps  # noqa: E402
import draft  # noqa: E402
import evaluate  # noqa: E402
import evaluate_values  # noqa: E402
import nft  # noqa: E402
import sample  # noqa: E402
import stitch  # noqa: E402

JOBS = {"nft": (nft, nft.NFTConfig), "draft": (draft, draft.DraftConfig), "stitch": (stitch, stitch.StitchConfig), "dps": (dps, dps.DPSConfig), "sample": (sample, sample.SampleConfig), "evaluate": (evaluate, evaluate.EvaluateConfig), "evaluate_values": (evaluate_values, evaluate_values.ValuesConfig)}


def which_job(argv: list[str]) -> tuple[str, list[str]]:
    """(job name, the rest of argv): --job if given, else the one job whose config has every top-level key of the --config files."""
    if "--job" in argv:
        at = argv.index("--job")
        name = argv[at + 1] if at + 1 < len(argv) else ""
        if name not in JOBS:
            raise ConfigError(f"--job '{name}' is not a job with a memory plan; choose {', '.join(JOBS)}")
        return name, argv[:at] + argv[at + 2 :]
    keys = set()
    for n, arg in enumerate(argv):
        path = argv[n + 1] if arg == "--config" and n + 1 < len(argv) else arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path and Path(path).is_file():
            keys |= set(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
    if not keys:
        return "nft", argv
    fits = [name for name, (_, cls) in JOBS.items() if keys <= set(cls.__dataclass_fields__) | {"async"}]
    if len(fits) != 1:
        raise ConfigError(f"cannot tell which job the config is for (it fits {fits or 'none'} of {', '.join(JOBS)}); pass --job NAME")
    return fits[0], argv


def main(argv: list[str]) -> dict:
    name, argv = which_job(argv)
    job, config_class = JOBS[name]
    cfg = load_config(config_class, argv)
    plans = job.plan_memory(cfg)
    print(f"{name}: " + memory_plan.describe(plans))
    memory_plan.check(plans)
    return {p.role: {"peak_gib": p.total_gib, "budget_gib": p.budget_gib, "fits": p.fits} for p in plans}


if __name__ == "__main__":
    run_main(main)
