"""jobs/stitch.py end to end on the toy world: stage 1, Ray Data, Ray Train + DeepSpeed, a killed
learner worker, evaluation. Small sizes: the figures of the default run are in the README."""

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
from stitchvm_rl.value.train import PolicyImages, TeacherTargets, distill_loss

SMALL = [
    "probe_images=32",
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
def test_stitch_job_survives_a_killed_learner_and_exports_the_value_model(tmp_path):
    job = load_job("stitch")
    summary = job.main([f"output_dir={tmp_path}", "testing.crash_after_epoch=0", *SMALL, "train.epochs=3"])
    run = tmp_path / "stitch"
    for name in ("config.yaml", "stitch_search.json", "summary.json", "accuracy.png", "value_model/value_model.json"):
        assert (run / name).is_file(), name
    # rank 1 died hard after epoch 0's checkpoint; Ray Train restarted the group from that checkpoint
    assert (tmp_path / "ray" / "stitch" / "files" / ".crash-injected").is_file()  # in storage: seen from every node
    # (from epoch 0's checkpoint, or epoch 1's if rank 0 reported it before the death was noticed)
    assert summary["train_metrics"]["epoch"] == 2 and summary["train_metrics"]["resumed_from_epoch"] >= 1
    assert summary["train_metrics"]["world_size"] == 2
    search = json.loads((run / "stitch_search.json").read_text())
    assert len(search["table"]) == 16 and summary["stitch"]["dit_block"] == search["best"][0]
    rows = summary["value_accuracy"]["table"]
    assert {r["estimator"] for r in rows} == {"stitchvm", "tweedie", "mc"}
    cost = summary["value_accuracy"]["cost"]
    assert cost["stitchvm"]["flops_per_estimate_at_mid_sigma"] < cost["tweedie"]["flops_per_estimate_at_mid_sigma"] < cost["mc"]["flops_per_estimate_at_mid_sigma"]
    model = StitchedValueModel.from_pretrained(run / "value_model")
    assert model.config.head_conditioning == "prompt"  # the default: the head reads the policy's prompt embedding
    base = zoo.load_sd3_transformer("toyworld").transformer_blocks[0]
    assert model.config.head_trained and not torch.equal(model.head.blocks[0].attn.to_q.weight, base.attn.to_q.weight)  # train.train_head
    # stage 2 learned: on held-out images the finetuned model distils the reward model better than
    # the stage-1 model it started from, at every noise level
    held_out = _held_out_batch()
    for t in (0.25, 0.5, 0.75):
        init, trained = (_held_out_loss(run / name, held_out, t) for name in ("init", "value_model"))
        assert trained < 0.9 * init, (t, trained, init)


def _held_out_batch() -> dict:
    """16 fresh policy images (latents z0 and the teacher's targets), for the stage-2 loss."""
    prompts = toyworld.CAPTIONS[:16]
    rows = PolicyImages("toyworld", 20, 1.0, 0)({"prompt": np.array(prompts, dtype=object), "seed": np.arange(16) + 7_000_000})
    batch = {k: torch.as_tensor(v) for k, v in TeacherTargets("toyworld", "toyworld-clip", "", encode=False)(rows).items() if k != "prompt"}
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


def test_policy_rows_keep_the_policys_own_latents():
    """The value model reads policy latents; a VAE re-encoding of the decoded image differs (~11 % on
    the toy world), so policy rows carry their latents through the teacher untouched."""
    from stitchvm_rl.policy import vae_encode

    rows = PolicyImages("toyworld", 4, 1.0, 0)({"prompt": np.array(["a red circle on the left"] * 2, dtype=object), "seed": np.array([1, 2])})
    kept = TeacherTargets("toyworld", "toyworld-clip", "", encode=False)(dict(rows))
    assert np.array_equal(kept["z0"], rows["z0"])
    encoder = TeacherTargets("toyworld", "toyworld-clip", "", encode=True)  # folder images
    reencoded = encoder({k: v for k, v in rows.items() if k != "z0"})["z0"]
    assert np.allclose(reencoded, vae_encode(encoder.vae, torch.as_tensor(rows["image"])).numpy())
    assert not np.allclose(reencoded, rows["z0"], atol=1e-2)
