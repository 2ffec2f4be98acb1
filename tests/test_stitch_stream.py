"""Stage 2's data at real scale, on the toy world: the rows stream through Ray Data into the learner
ranks (never materialised), reshuffled every epoch with a seed, so a resumed run equals an
uninterrupted one. Stage 1 runs as a Ray task where its config places it."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stitchvm_rl.config import from_dict
from stitchvm_rl.value import TOYWORLD_VALUE_MODEL
from stitchvm_rl.value.data import epoch_rows, source_rows
from stitchvm_rl.value.train import StitchDataConfig, StitchTrainConfig, run_training

STORE_MIB = 8  # the object store of the streaming test's Ray cluster


def test_every_epoch_reshuffles_and_the_ranks_split_every_global_batch():
    rows = [{"path": f"{n}.png", "prompt": "", "seed": n} for n in range(100)]
    first, second = (epoch_rows(rows, 0, epoch, 0, 1, 10) for epoch in (0, 1))
    assert first != second and sorted(r["seed"] for r in first) == sorted(r["seed"] for r in second)
    assert epoch_rows(rows, 0, 1, 0, 1, 10) == second  # the order depends only on (seed, epoch)
    ranks = [epoch_rows(rows, 0, 1, rank, 2, 8) for rank in (0, 1)]  # 100 rows, global batch 16: 6 full batches
    assert [len(r) for r in ranks] == [48, 48]
    for step in range(6):  # each global batch = the ranks' slices, in the single-rank order
        assert ranks[0][8 * step : 8 * step + 8] + ranks[1][8 * step : 8 * step + 8] == epoch_rows(rows, 0, 1, 0, 1, 16)[16 * step : 16 * step + 16]


@pytest.fixture()
def small_object_store():
    """A local Ray cluster whose object store holds STORE_MIB (below Ray's 75 MiB floor, lowered
    for this test), so a dataset several times larger can only pass through it streamed."""
    import ray
    from ray._private import ray_constants

    from stitchvm_rl import runtime

    ray.shutdown()
    floor = ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES
    ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES = 2**20
    for key, value in runtime.LOCAL_RAY_ENV.items():
        import os

        os.environ.setdefault(key, value)
    ray.init(num_cpus=6, object_store_memory=STORE_MIB * 2**20, include_dashboard=False)
    yield
    ray.shutdown()
    ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES = floor


def _image_list(tmp_path, rows: int) -> str:
    """A JSONL of `rows` lines over 32 distinct 64x64 images."""
    gen = np.random.default_rng(0)
    for n in range(32):
        Image.fromarray(gen.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{n}.png")
    path = tmp_path / "images.jsonl"
    path.write_text("".join(json.dumps({"path": f"{n % 32}.png"}) + "\n" for n in range(rows)))
    return str(path)


@pytest.mark.slow
def test_a_dataset_larger_than_the_object_store_streams_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, small_object_store):
    from ray._private.internal_api import memory_summary

    data = from_dict(StitchDataConfig, {"source": "jsonl", "jsonl": _image_list(tmp_path, 768), "resolution": 64, "batch_size": 32})
    train = from_dict(StitchTrainConfig, {"epochs": 2, "batch_size": 64, "checkpoint_every": 1, "warmup_steps": 2, "train_head": False})
    rows = source_rows(data, [], 0)

    def run(name: str, crash_after_epoch: int = -1):
        result = run_training(str(TOYWORLD_VALUE_MODEL), str(tmp_path / "ray"), name, train, data, rows, 0, "toyworld", "toyworld-clip", 64, "", crash_after_epoch)
        with result.checkpoint.as_directory() as d:
            return result, load_file(f"{d}/value_model/value_model.safetensors")

    straight, weights = run("straight")
    # 768 rows of 12 KiB a pass (9 MiB) through an 8 MiB store, twice, and nothing spilled to disk
    assert straight.metrics["streamed_bytes"] * 2 > STORE_MIB * 2**20  # one rank's half of one epoch
    assert "Spilled" not in memory_summary(stats_only=True)
    digests = [metrics["order_digest"] for _, metrics in straight.best_checkpoints]
    assert len(digests) == 2 and digests[0] != digests[1]  # epoch 1 trains in another order than epoch 0

    resumed, resumed_weights = run("resumed", crash_after_epoch=0)  # rank 1 dies in epoch 1; the group restarts from a checkpoint
    assert (tmp_path / "ray" / "resumed" / "files" / ".crash-injected").is_file() and resumed.metrics["resumed_from_epoch"] >= 1
    assert weights.keys() == resumed_weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("source", ["policy", "jsonl"])
def test_stage_1_runs_where_its_config_places_it_and_finds_todays_closed_form_solution(tmp_path, source):
    """The search as a Ray task (the backbone's blocks read in place, its text encoders dropped)
    picks the same (i, j) and the same least-squares F as the search run in this process, on policy
    samples (made in the task) or on image files (read there)."""
    from stitchvm_rl import runtime, toyworld
    from stitchvm_rl.config import load_config
    from stitchvm_rl.value.build import StitchConfig, stage1
    from stitchvm_rl.value.data import PolicyImages, read_images
    from stitchvm_rl.value.model import StitchedValueModel
    from stitchvm_rl.value.search import build_value_model

    runtime.init_ray(8)
    files = (["data.source=jsonl", f"data.jsonl={_image_list(tmp_path, 16)}", "data.resolution=64"] if source == "jsonl" else [])
    cfg = load_config(StitchConfig, ["search.probe_images=16", "search.num_cpus=2", "search.max_dit_block=3", "search.rm_blocks=[1,2]", "data.sample_steps=4", *files])
    prompts = toyworld.CAPTIONS
    rows = source_rows(cfg.data, prompts, 0)[:16]
    found = stage1(cfg, prompts, "toyworld", "toyworld-clip", str(tmp_path), rows)
    assert found["resources"] == {"CPU": 2.0}

    if source == "policy":
        probe_prompts = [prompts[k % len(prompts)] for k in range(16)]
        images, latents = PolicyImages("toyworld", 4, 1.0, 0).sample(probe_prompts, [10**9 + k for k in range(16)])
    else:
        probe_prompts, images, latents = [r["prompt"] for r in rows], read_images([r["path"] for r in rows], 64), None
    _, here = build_value_model("toyworld", "toyworld-clip", images, "clip", 3, (1, 2), 1.0, "cpu", 0, latents, 16, "prompt", probe_prompts, "mean")
    assert found["best"] == [here.best_i, here.best_j] and len(found["table"]) == 6
    for theirs, mine in zip(found["table"], here.table):
        assert theirs["mse"] == pytest.approx(mine["mse"], rel=1e-6)
    init = StitchedValueModel.from_pretrained(tmp_path / "stitch" / "files" / "init")
    torch.testing.assert_close(init.stitch.proj.weight[:, :, 0, 0], here.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(init.stitch.proj.bias, here.bias, rtol=0, atol=1e-6)
