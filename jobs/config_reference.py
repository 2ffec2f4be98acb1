"""Write docs/configuration.md: every job's keys, defaults, types and one-line docstrings, read from
the typed configs themselves (tests/test_config.py fails when the committed page is stale).

    python jobs/config_reference.py            # rewrites docs/configuration.md
"""

import importlib.util
import sys
from pathlib import Path

from stitchvm_rl.config import format_markdown

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"

# job script -> the config class its main() loads (every jobs/*.py that takes key=value arguments)
JOB_CONFIGS = {
    "nft": "NFTConfig",
    "draft": "DraftConfig",
    "stitch": "StitchConfig",
    "dps": "DPSConfig",
    "sample": "SampleConfig",
    "evaluate": "EvaluateConfig",
    "evaluate_values": "ValuesConfig",
    "report": "ReportConfig",
    "bench": "BenchConfig",
    "cost": "CostConfig",
    "convert_weights": "ConvertConfig",
    "train_toyworld": "ToyWorldConfig",
}


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # inspect reads the field docstrings from the module's file
    spec.loader.exec_module(module)
    return module


def render() -> str:
    parts = [
        "# Configuration reference",
        "",
        "Generated from the typed configs' field docstrings by `python jobs/config_reference.py`; do not edit by hand.",
        "",
        "Every job takes `[--config FILE.yaml] [key.sub=value ...]`: a YAML file of these keys (see `jobs/configs/`),",
        "then overrides, each value read as YAML (`epochs=4`, `\"seeds=[0,1]\"`, `\"rewards={pickscore: 1.0}\"`).",
        "A key that is not listed here, a value of the wrong type or out of range stops the job before any work.",
        "",
    ]
    for job, config in JOB_CONFIGS.items():
        module = load_job(job)
        summary = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())  # its first paragraph
        parts += [f"## `jobs/{job}.py`", "", summary, "", format_markdown(getattr(module, config)), ""]
    return "\n".join(parts).replace(f"{ROOT}/", "")  # a default inside the checkout, as a path relative to it


def main() -> None:
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(render())
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
