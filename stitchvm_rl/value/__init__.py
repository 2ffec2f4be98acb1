"""The stitched value model: architecture (model), stage 1 (search), stage 2 (train), accuracy
(evaluate), the whole build (build), and the default model the jobs fall back on."""

from pathlib import Path

# The value model of jobs/stitch.py's defaults, committed with the toy world: `python jobs/stitch.py
# run_name=stitch-default` (about 5 minutes on 2 cores), then outputs/stitch-default/value_model/
# copied here (that run's summary.json is value_model_build.json beside it).
TOYWORLD_VALUE_MODEL = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "value_model"


def default_value_model(backbone: str = "toyworld") -> str:
    """The value model a job uses when none is named: the toy world's committed one. Any other
    backbone needs a value model built for it (its values describe only its own latents)."""
    from stitchvm_rl.config import ConfigError

    if backbone != "toyworld":
        raise ConfigError(f"backbone '{backbone}' has no default value model (only 'toyworld' has); build one with `python jobs/stitch.py backbone={backbone}` and pass its value_model directory")
    return str(TOYWORLD_VALUE_MODEL)
