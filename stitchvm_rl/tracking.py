"""Run directories (`outputs/<run name>/` with the resolved config.yaml and JSON results) and
experiment tracking (wandb, or a no-op stand-in when it is off)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stitchvm_rl.config import save_config
from stitchvm_rl.storage import job_path


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
        self.path = Path(job_path(output_dir)) / run_name  # absolute; in a submitted job outside Ray's copy of the working dir
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.path / "config.yaml")

    def write_json(self, name: str, data: dict) -> Path:
        target = self.path / name
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_text(json.dumps(_clean(data), indent=2))
        os.replace(tmp, target)
        return target


@dataclass
class WandbConfig:
    """Weights & Biases tracking, owned by one process (learner rank 0)."""

    mode: Literal["disabled", "offline", "online"] = "disabled"
    """disabled: no wandb at all; offline: local files (`wandb sync` later); online: live."""
    project: str = "stitchvm-rl"
    """wandb project."""
    entity: str = ""
    """wandb entity (team or user; empty: your default)."""
    group: str = ""
    """Group runs to compare, e.g. the terminal baseline and stitchvm of one experiment."""
    tags: list[str] = field(default_factory=list)
    """Free-form tags."""


class NoTracker:
    """Stands in when wandb is off, so training code never branches on it."""

    run_id = ""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_image(self, key: str, path: Path, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    """A wandb run whose id survives resume (the id is kept in the checkpoint) and whose step axis
    is the global optimizer step, so a resumed run continues its curves instead of starting new ones."""

    def __init__(self, cfg: WandbConfig, name: str, config: dict, run_dir: Path, run_id: str = ""):
        import wandb

        # cluster/runtime_env.yaml passes ${WANDB_API_KEY} through; unset on a node it arrives literally
        if os.environ.get("WANDB_API_KEY", "").startswith("${"):
            del os.environ["WANDB_API_KEY"]

        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity or None,
            group=cfg.group or None,
            tags=cfg.tags or None,
            name=name,
            id=run_id or None,  # wandb picks a new id; resumed runs pass the one from the checkpoint
            resume="allow",
            mode=cfg.mode,
            dir=str(run_dir),
            config=config,
        )
        self.run_id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in _clean(metrics).items() if isinstance(v, (int, float))}, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_tracker(cfg: WandbConfig, name: str, config: dict, run_dir: Path, run_id: str = ""):
    """A WandbTracker, or a NoTracker when cfg.mode is disabled."""
    return NoTracker() if cfg.mode == "disabled" else WandbTracker(cfg, name, config, run_dir, run_id)
