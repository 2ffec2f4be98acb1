"""jobs/evaluate.py on the toy world: a resumed evaluation (base, a LoRA and a guided policy) equals an
uninterrupted one without re-scoring what was recorded, the paired table, bad input refused before
Ray starts; jobs/evaluate_values.py's measures."""

import json

import pytest

from conftest import load_job
from stitchvm_rl.config import ConfigError

SMALL = ["max_prompts=6", "images_per_prompt=2", "num_steps=6", "prompts_per_batch=4", "grid_prompts=2", "policies={base: base, nft: toyworld-nft, dps: 'dps:stitchvm'}"]


@pytest.mark.slow
def test_resumed_evaluation_equals_an_uninterrupted_one(tmp_path):
    job = load_job("evaluate")
    whole = job.main([f"output_dir={tmp_path}", "run_name=whole", *SMALL])
    assert whole["prompts_scored_this_run"] == 18
    # the committed LoRA (the README's main command) beats the base policy on the toy CLIP, and so
    # does DPS with the committed value model
    for policy in ("nft", "dps"):
        gain = whole["paired"][f"{policy} - base"]["toy_clip"]
        assert gain["prompts"] == 6 and gain["mean"] > 0, (policy, gain)

    with pytest.raises(RuntimeError, match="stopped after 5 prompts"):
        job.main([f"output_dir={tmp_path}", "run_name=resumed", "crash_after_prompts=5", *SMALL])
    resumed = job.main([f"output_dir={tmp_path}", "run_name=resumed", f"baseline={tmp_path / 'whole'}", *SMALL])
    assert resumed["prompts_scored_this_run"] == 13  # the 5 recorded prompts are not sampled or scored again

    def records(run):
        lines = (tmp_path / run / "scores.jsonl").read_text().splitlines()
        return {(r["policy"], r["index"]): r for r in map(json.loads, lines)}, len(lines)

    (a, _), (b, lines) = records("whole"), records("resumed")
    assert lines == 18 and a.keys() == b.keys()  # a guided policy's SDE noise, too, depends on its prompt's seed alone
    for key in a:  # every model call has a fixed batch size: the same images and scores, bit for bit
        assert a[key]["noise_seed"] == b[key]["noise_seed"] and a[key]["scores"] == b[key]["scores"], key
    # paired against the uninterrupted evaluation: the same images, so no difference
    assert resumed["paired"]["base - baseline"]["toy_clip"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / "resumed" / "grid.png").is_file() and "nft - base" in (tmp_path / "resumed" / "table.md").read_text()


@pytest.mark.slow
def test_geneval_writes_its_six_task_scores_and_why_images_failed(tmp_path):
    """suite=geneval on the toy world: one prompt per task through the tiny detector (toy defaults),
    with ImageReward beside it; the run names the detector it used."""
    summary = load_job("evaluate").main([f"output_dir={tmp_path}", "suite=geneval", "per_category=1", "images_per_prompt=1", "num_steps=4",
                                         "grid_prompts=0", "policies={base: base}", "scorers=[geneval, image_reward]"])
    assert list(summary["geneval"]["base"]) == ["single_object", "two_object", "counting", "colors", "position", "color_attr", "overall"]
    assert summary["settings"]["scorer_sources"] == {"geneval": "tiny-mask2former", "image_reward": "tiny-image-reward", "geneval_clip": "toyworld-clip"}
    records = [json.loads(line) for line in (tmp_path / "evaluate" / "scores.jsonl").read_text().splitlines()]
    assert sorted(r["category"] for r in records) == sorted(t for t in summary["geneval"]["base"] if t != "overall")
    for r in records:  # the tiny random detector finds nothing confidently: every image fails, and says why
        assert r["scores"]["geneval"] == [0.0] and r["notes"]["geneval"][0].startswith("expected ") and len(r["scores"]["image_reward"]) == 1
    assert "| base | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 |" in (tmp_path / "evaluate" / "table.md").read_text()


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("evaluate", ["policies={base: base, mine: /no/such/lora}"], "policies.mine: '/no/such/lora' is not a LoRA directory"),
        ("evaluate", ["suite=drawbenhc"], "suite 'drawbenhc' is unknown"),
        ("evaluate", ["scorers=[toy_clip, pickscor]"], "did you mean 'pickscore'"),
        ("evaluate", ["scorers=[hpsv21]"], "convert_weights.py kind=hpsv2"),
        ("evaluate", ["images_per_prompt=0"], "images_per_prompt"),
        ("evaluate", ["suite=drawbench", "scorers=[caption]"], "toy-world captions only"),
        ("evaluate", ["baseline=/no/such/evaluation"], "holds no evaluation.json"),
        ("evaluate", ["scorers=[geneval]"], "needs GenEval metadata"),
        ("evaluate", ["scorers=[image_reward]", "scorer_sources={image_reward: /no/such/dir}"], "scorer .image_reward.: model source ./no/such/dir. is neither"),
        ("evaluate", ["policies={base: base, g: 'dps:stitchvn'}"], "did you mean 'stitchvm'"),
        ("evaluate", ["policies={base: base, g: 'dps:tweedie'}", "guidance_scales={stitchvm: 0.1}"], "guidance_scales.tweedie"),
        ("evaluate_values", ["bench.sigmas=[0.5, 1.0]"], "strictly between 0 and 1"),
        ("evaluate_values", ["bench.estimators=[stitchvm, tweedy]"], "did you mean 'tweedie'"),
        ("evaluate_values", ["value_model=/no/such/model"], "not an exported value model"),
    ],
)
def test_bad_input_is_refused_before_ray_starts(tmp_path, monkeypatch, name, args, message):
    job = load_job(name)
    monkeypatch.setattr(job.runtime, "init_ray", lambda *a: pytest.fail("Ray started"))
    with pytest.raises(ConfigError, match=message):
        job.main([f"output_dir={tmp_path}", *args])


@pytest.mark.slow
def test_values_on_noisy_latents_are_measured_for_every_estimator(tmp_path):
    summary = load_job("evaluate_values").main([f"output_dir={tmp_path}", "bench.sigmas=[0.5]", "source.max_images=6", "bench.mc_k=1", "bench.steps=4"])
    rows = {r["estimator"]: r for r in summary["table"]}
    assert list(rows) == ["clean reward (sigma 0)", "stitchvm", "tweedie", "mc"] and summary["images"] == summary["captions"] == 6
    assert rows["clean reward (sigma 0)"]["preference"] == 1.0
    assert all(0 <= r[k] <= 1 for r in rows.values() for k in ("latent_to_caption", "caption_to_latent", "preference"))
    flops = {name: c["flops_per_estimate"] for name, c in summary["cost_at_mid_sigma"].items()}
    assert 0 < flops["stitchvm"] < flops["tweedie"] < flops["mc"]  # no decode for StitchVM; MC-K runs the rest of the schedule
    assert (tmp_path / "evaluate_values" / "values.png").is_file()
