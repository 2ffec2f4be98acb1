"""Run directories: `outputs/<run name>/` with the resolved config.yaml and JSON results."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from stitchvm_rl.config import save_config


def _clean(value: Any) -> Any:
    """JSON-safe numbers: NaN and inf become null instead of invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunDir:
    """One run's output folder; JSON files are written to a temporary name and renamed."""

    def __init__(self, output_dir: str, run_name: str, cfg: Any):
        self.path = (Path(output_dir) / run_name).resolve()  # absolute: Ray workers run elsewhere
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.path / "config.yaml")

    def write_json(self, name: str, data: dict) -> Path:
        target = self.path / name
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_text(json.dumps(_clean(data), indent=2))
        os.replace(tmp, target)
        return target
