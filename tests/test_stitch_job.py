"""jobs/stitch.py end to end on the toy world: stage 1 (a Ray task), Ray Data, Ray Train + DeepSpeed,
the evaluation (a Ray task per noise level), and its bad input. A killed learner and its resume:
tests/test_stitch_stream.py. Small sizes: the figures of the default run are in the README."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_job
from stitchvm_rl import toyworld, zoo
from stitchvm_rl.config import ConfigError
from stitchvm_rl.policy import SD3Policy
from stitchvm_rl.value.model import StitchedValueModel
from stitchvm_rl.value.data import ImageRows, PolicyImages, as_uint8
from stitchvm_rl.value.train import Teacher, distill_loss

SMALL = [
    "search.probe_images=32",
    "data.num_images=96",
    "data.batch_size=32",
    "train.epochs=2",
    "train.batch_size=16",
    "train.checkpoint_every=1",
    "eval.sigmas=[0.5]",
    "eval.prompts=2",
    "eval.group_size=4",
    "eval.mc_k=2",
    "eval.reference_k=4",
]


@pytest.mark.slow
def test_stitch_job_exports_a_value_model_that_learned(tmp_path):
    job = load_job("stitch")
    summary = job.main([f"output_dir={tmp_path}", *SMALL, "train.epochs=3", "search.num_cpus=2"])
    run = tmp_path / "stitch"
    for name in ("config.yaml", "stitch_search.json", "summary.json", "accuracy.png", "value_model/value_model.json"):
        assert (run / name).is_file(), name
    assert (tmp_path / "ray" / "stitch" / "files" / "init" / "value_model.json").is_file()  # stage 1's model, where every rank reads it
    assert summary["train_metrics"]["epoch"] == 2 and summary["train_metrics"]["world_size"] == 2
    search = json.loads((run / "stitch_search.json").read_text())
    assert len(search["table"]) == 16 and summary["stitch"]["dit_block"] == search["best"][0]
    assert search["resources"] == {"CPU": 2.0}  # the search task ran as search.num_cpus placed it
    rows = summary["value_accuracy"]["table"]
    assert {r["estimator"] for r in rows} == {"stitchvm", "tweedie", "mc"}
    cost = summary["value_accuracy"]["cost"]
    assert cost["stitchvm"]["flops_per_estimate_at_mid_sigma"] < cost["tweedie"]["flops_per_estimate_at_mid_sigma"] < cost["mc"]["flops_per_estimate_at_mid_sigma"]
    model = StitchedValueModel.from_pretrained(run / "value_model")
    assert model.config.head_conditioning == "prompt"  # the default: the head reads the policy's prompt embedding
    base = zoo.load_sd3_transformer("toyworld").transformer_blocks[0]
    assert model.config.head_trained and not torch.equal(model.head.blocks[0].attn.to_q.weight, base.attn.to_q.weight)  # train.train_head
    # stage 2 learned: on held-out images the finetuned model distils the reward model better than
    # the stage-1 model it started from, at every noise level (least at low noise, where the stage-1
    # fit is already closest: 0.280 -> 0.265 at t = 0.25, 0.876 -> 0.617 at t = 0.75)
    held_out = _held_out_batch()
    for t, gain in ((0.25, 0.97), (0.5, 0.9), (0.75, 0.9)):
        init, trained = (_held_out_loss(tmp_path / "ray" / "stitch" / "files" / name, held_out, t) for name in ("init", "value_model"))
        assert trained < gain * init, (t, trained, init)


def _held_out_batch() -> dict:
    """16 fresh policy images (latents z0 and the teacher's targets), for the stage-2 loss."""
    prompts = toyworld.CAPTIONS[:16]
    images, z0 = PolicyImages("toyworld", 20, 1.0, 0).sample(prompts, np.arange(16) + 7_000_000)
    rows = {"image": as_uint8(images), "z0": z0.half().numpy(), "reward": np.zeros(16, np.float32)}  # as the stream brings them
    batch = Teacher("toyworld", "toyworld-clip", "cpu", "float32", encode=False)(rows)
    return {**batch, "prompt_embeds": SD3Policy.from_pretrained("toyworld").encode_prompts(prompts)}


def _held_out_loss(model_dir: Path, batch: dict, t: float) -> float:
    """The stage-2 distillation loss (embedding + tokens) on the held-out images noised to t."""
    model = StitchedValueModel.from_pretrained(model_dir)
    z0 = batch["z0"]
    z_t = (1 - t) * z0 + t * torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds, tokens = model.embed(z_t, torch.full((len(z0),), t), batch["prompt_embeds"])
        return distill_loss(embeds, tokens, batch, token_weight=1.0)[0].item()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.objective=regress"], "needs head=scalar and an analytic_reward"),
        (["head=scalar"], "use train.objective=regress"),
        (["analytic_reward=blueness"], "analytic_reward 'blueness' is unknown"),
        (["data.source=folder", "data.folder=/no/such/folder"], "does not exist"),
        (["data.source=folder", "data.folder=/no/such/folder", "head_conditioning=empty", "train.score_weight=1"], "which folder images do not have"),
    ],
)
def test_inconsistent_settings_stop_before_any_work(tmp_path, args, message):
    job = load_job("stitch")
    with pytest.raises((ConfigError, FileNotFoundError), match=message):
        job.main([f"output_dir={tmp_path}", *args])


def test_policy_samples_keep_the_policys_own_latents(tmp_path):
    """The value model reads policy latents; a VAE re-encoding of the decoded image differs (~11 % on
    the toy world), so policy samples are stored with their latents (float16) beside the lossless
    PNG, streamed with them, and the learner's teacher keeps them; it encodes only image files."""
    from stitchvm_rl.policy import vae_encode

    sampler = PolicyImages("toyworld", 4, 1.0, 0, str(tmp_path), "run")
    written = sampler({"prompt": np.array(["a red circle on the left"] * 2, dtype=object), "seed": np.array([1, 2])})
    images, z0 = sampler.sample(["a red circle on the left"] * 2, [1, 2])
    rows = ImageRows(32, "")(written)
    assert np.array_equal(rows["image"], as_uint8(images)) and np.array_equal(rows["z0"], z0.half().numpy())
    teacher = Teacher("toyworld", "toyworld-clip", "cpu", "float32", encode=True)
    kept = teacher(rows)["z0"]
    assert torch.equal(kept, z0.half().float())
    files = {k: v for k, v in rows.items() if k != "z0"}  # as image files arrive
    reencoded = teacher(files)["z0"]
    assert torch.allclose(reencoded, vae_encode(teacher.vae, torch.as_tensor(rows["image"]).float() / 255))
    assert not torch.allclose(reencoded, kept, atol=1e-2)


def _bad_inputs(tmp_path) -> dict[str, tuple[list[str], str]]:
    """Each bad input of a stitch run: (its arguments, the refusal it gets)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    listed = tmp_path / "images.jsonl"
    listed.write_text(json.dumps({"path": "missing.png", "prompt": "a red circle"}) + "\n")
    text_only = tmp_path / "text-only-clip"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "clip_text_model", "hidden_size": 64}))
    files = ["head_conditioning=empty", "train.score_weight=0"]
    return {
        "folder, no readable image": (["data.source=folder", f"data.folder={broken}", *files], "cannot be read"),
        "folder, every image skipped": (["data.source=folder", f"data.folder={broken}", "data.skip_broken_images=true", *files], "holds no readable"),
        "JSONL, a missing path": (["data.source=jsonl", f"data.jsonl={listed}"], "missing.png' does not exist"),
        "reward model without an image tower": ([f"reward_model={text_only}"], "has no image tower"),
        "i beyond the backbone": (["search.max_dit_block=9"], "beyond the backbone's 4 transformer blocks"),
        "j beyond the reward model": (["search.rm_blocks=[1,7]"], r"within 1\.\.6"),
    }


BAD_INPUTS = ["folder, no readable image", "folder, every image skipped", "JSONL, a missing path", "reward model without an image tower", "i beyond the backbone", "j beyond the reward model"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_before_any_model_loads(tmp_path, monkeypatch, case):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(zoo, "load_sd3_pipeline", no_loading)
    monkeypatch.setattr(zoo, "load_clip", no_loading)
    args, message = _bad_inputs(tmp_path)[case]
    with pytest.raises(ConfigError, match=message):
        load_job("stitch").main([f"output_dir={tmp_path}", *args])


def test_the_accuracy_alone_on_an_exported_value_model(tmp_path):
    """`evaluate_only` measures an exported model (here the committed toy one) without stages 1 and 2:
    one Ray task per noise level, each level's seeds as in a full run."""
    from stitchvm_rl.value import TOYWORLD_VALUE_MODEL

    summary = load_job("stitch").main([f"output_dir={tmp_path}", f"evaluate_only={TOYWORLD_VALUE_MODEL}", "eval.sigmas=[0.25,0.75]", "eval.prompts=2",
                                       "eval.group_size=3", "eval.mc_k=2", "eval.reference_k=2", "eval.decode_batch_size=2"])
    assert "stitch" not in summary and summary["value_model"] == str(TOYWORLD_VALUE_MODEL)
    assert [(r["sigma"], r["estimator"]) for r in summary["value_accuracy"]["table"]] == [(s, e) for s in (0.25, 0.75) for e in ("stitchvm", "tweedie", "mc")]
    assert (tmp_path / "stitch" / "accuracy.png").is_file() and not (tmp_path / "stitch" / "value_model").exists()
