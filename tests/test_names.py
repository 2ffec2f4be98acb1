"""Every name a job takes from its config (reward names, estimators, DPS methods and values, bench
sections, model sources, OpenCLIP architectures) is checked before Ray starts or a model loads: a bad
one stops with one ConfigError naming the key, the value and what is allowed (did-you-mean where close)."""

import pytest
import ray
import torch
from conftest import load_job

from stitchvm_rl import runtime, zoo
from stitchvm_rl.config import ConfigError

# (job, arguments, the message it must give)
BAD_NAMES = [
    ("nft", ["rewards={nope: 1.0}"], "rewards: unknown reward 'nope'; choose from clipscore, pickscore"),
    ("nft", ["rewards={toy_clp: 1.0}"], "did you mean 'toy_clip'?"),
    ("nft", ["rewards={}"], "rewards: no reward given"),
    ("nft", ["rewards={hpsv2: 1.0}"], "needs converted weights at 'weights/hpsv2.1'"),
    ("nft", ["compare=[terminal,stichvm]"], "compare: unknown estimator 'stichvm'; choose from terminal, stitchvm, tweedie, mc; did you mean 'stitchvm'?"),
    ("dps", ["rewards={nope: 1.0}"], "rewards: unknown reward 'nope'"),
    ("dps", ["methods=[none,stitchv]"], "unknown or empty; choose from none, tweedie, stitchvm, fk_tweedie, fk_stitchvm, best_of_n; did you mean 'stitchvm'?"),
    ("dps", ["scales={stitchmv: 0.02}"], "scales: unknown guidance value 'stitchmv'; choose from tweedie, stitchvm; did you mean 'stitchvm'?"),
    ("sample", ["rewards={nope: 1.0}"], "rewards: unknown reward 'nope'"),
    ("sample", ["device=gpu"], "device 'gpu' is not a torch device"),
    ("sample", ["model=toyworld_sd3"], "model: model source 'toyworld_sd3' is neither an existing directory nor a hub id"),
    ("stitch", ["backbone=tiny_sd3"], "did you mean 'tiny-sd3'?"),
    ("stitch", ["reward_model=toy_clip"], "reward_model 'toy_clip' is a reward name, not a model source; pass its CLIP model, e.g. reward_model=toyworld-clip"),
    ("stitch", ["reward_model=toyworld_clip"], "did you mean 'toyworld-clip'?"),
    ("stitch", ["analytic_reward=colour_mach"], "analytic_reward 'colour_mach' is unknown; choose one of redness, brightness, colour_match, exact_colour; did you mean 'colour_match'?"),
    ("bench", ["rewards={nope: 1.0}"], "rewards: unknown reward 'nope'"),
    ("bench", ["sections=[dsp]"], "did you mean 'dps'?"),
]


@pytest.fixture
def nothing_may_start(monkeypatch, tmp_path):
    """Ray, model loading and checkpoint reading all fail loudly, so a name checked too late shows up
    as another error. (`ray.is_initialized()` would not tell: other tests may have started Ray.)"""

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was called before the bad name was refused")

        return fail

    monkeypatch.setattr(runtime, "init_ray", forbidden("runtime.init_ray"))
    monkeypatch.setattr(ray, "init", forbidden("ray.init"))
    for loader in ("load_sd3_pipeline", "load_clip", "_load_part"):
        monkeypatch.setattr(zoo, loader, forbidden(f"zoo.{loader}"))
    monkeypatch.setattr(torch, "load", forbidden("torch.load"))
    monkeypatch.chdir(tmp_path)  # no weights/ here: published rewards are unconverted


@pytest.mark.parametrize("job, args, message", BAD_NAMES, ids=[f"{j}:{' '.join(a)}" for j, a, _ in BAD_NAMES])
def test_a_bad_name_stops_the_job_before_ray_or_any_model(nothing_may_start, tmp_path, job, args, message):
    out = tmp_path / "outputs"
    with pytest.raises(ConfigError) as err:
        load_job(job).main([f"output_dir={out}", *args])
    assert message in str(err.value)
    assert not out.exists()  # no run directory either


@pytest.mark.parametrize(
    "args, message",
    [
        (["architecture=ViT-H-14-378"], "architecture: unknown OpenCLIP architecture 'ViT-H-14-378'; choose from ViT-H-14, ViT-H-14-quickgelu, ViT-H-14-378-quickgelu; did you mean 'ViT-H-14-378-quickgelu'?"),
        (["kind=dfn_clip"], "cannot tell whether"),  # no open_clip_config.json beside it, no architecture
    ],
)
def test_convert_weights_refuses_an_unknown_activation_before_reading_the_checkpoint(nothing_may_start, tmp_path, args, message):
    (tmp_path / "model.bin").write_bytes(b"not read")
    with pytest.raises(ConfigError) as err:
        load_job("convert_weights").main(["checkpoint=model.bin", "out=converted", *args])
    assert message in str(err.value)
    assert not (tmp_path / "converted").exists()
