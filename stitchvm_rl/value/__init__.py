"""The stitched value model: architecture (model), stage 1 (search), stage 2 (train), accuracy
(evaluate), the whole build (build), and the default model the jobs fall back on."""

from pathlib import Path

# The value model of jobs/stitch.py's defaults, committed with the toy world: `python jobs/stitch.py
# run_name=stitch-default` (about 5 minutes on 2 cores), then outputs/stitch-default/value_model/
# copied here (that run's summary.json is value_model_build.json beside it).
TOYWORLD_VALUE_MODEL = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "value_model"
TOYWORLD_VALUE_NAME = "toyworld-value"  # a name, resolved on each node to its own installed copy


def default_value_model(backbone: str = "toyworld") -> str:
    """The value model a job uses when none is named: the toy world's committed one (by name, so
    each node finds its own package's copy). Any other backbone needs a value model built for it
    (its values describe only its own latents)."""
    from stitchvm_rl.config import ConfigError

    if backbone != "toyworld":
        raise ConfigError(
            f"backbone '{backbone}' has no default value model (only 'toyworld' has: a value model describes only its own backbone's latents); "
            f"build one with `python jobs/stitch.py --config jobs/configs/stitch_sd35m_hpsv2.yaml backbone={backbone}` (or another jobs/configs/stitch_*.yaml) "
            "and pass its value_model directory: value_models=[<storage_path>/<run_name>/files/value_model]"
        )
    return TOYWORLD_VALUE_NAME


def value_model_path(source: str | Path) -> Path:
    """A value-model source -> a directory on this node: the committed toy one by name, a storage
    URI downloaded once into the node's cache (`storage.local_copy`), or a path as it is."""
    from stitchvm_rl.storage import local_copy

    if str(source) == TOYWORLD_VALUE_NAME:
        return TOYWORLD_VALUE_MODEL
    return Path(local_copy(str(source)))
