"""jobs/bench.py: the quick mode runs every CPU section (numbers are not asserted as speeds: a
benchmark is not a test), and the counts and shapes it reports are exactly what the code does."""

import json

import pytest
import torch

from conftest import load_job
from stitchvm_rl import benchmark
from stitchvm_rl.policy import LORA_TARGETS, SD3Policy


@pytest.mark.slow
def test_quick_bench_runs_every_cpu_section(tmp_path):
    """Every CPU section in quick mode, in this process. Two are tested apart on what the session has
    already run: real_scale (the session's shared run of it) and nft_reach (its two NFT jobs are the
    session's baselines, below)."""
    sections = ["nft_epoch", "draft_step", "dps", "value", "rollout_scaling", "weight_sync"]
    returned = load_job("bench").main(["quick=true", f"output_dir={tmp_path}", f"sections=[{','.join(sections)}]"])
    out = json.loads((tmp_path / "bench" / "bench.json").read_text())  # what a reader of the run gets
    assert out.keys() == returned.keys() and set(sections) <= set(out) and set(out["section_seconds"]) == set(sections)

    # toy rollouts: 10 DPM-2 steps; stitchvm stops at k ~ U{4..7}; training takes 3 forwards (old, ref,
    # current) at int(0.99 * 10) = 9 timesteps (terminal) or int(0.99 * 4) = 3 (stitchvm)
    nft = out["nft_epoch"]
    assert nft["terminal"]["rollout_evals_per_sample"] == 10
    assert 4 <= nft["stitchvm"]["rollout_evals_per_sample"] <= 7
    assert nft["terminal"]["train_forwards_per_sample"] == 27 and nft["stitchvm"]["train_forwards_per_sample"] == 9
    assert nft["samples_per_epoch"] == 8 and nft["step_count_prediction"] == pytest.approx(10 / 5.5)

    # DRaFT-1, 10 Euler steps: terminal runs all 10, the regulariser's base velocity at the grad step and
    # its recomputation in the backward (checkpointed), one decode; stitchvm stops at k ~ U{3..7}, one value
    draft = out["draft_step"]["by_k"]["K=1"]["evals_per_sample"]
    assert draft["terminal"] == {"transformer": 12, "decode": 1, "value": 0}
    assert 3 + 2 <= draft["stitchvm"]["transformer"] <= 7 + 2 and draft["stitchvm"]["decode"] == 0 and draft["stitchvm"]["value"] == 1

    assert out["dps"]["samples"] == 8 and set(out["dps"]["seconds_per_sample"]) == {"none", "tweedie", "stitchvm"}
    assert set(out["value"]["seconds_per_estimate"]) == {"stitchvm", "tweedie", "mc4"}
    assert set(out["rollout_scaling"]["samples_per_second"]) == {"in_process", "1_actors", "2_actors"}
    assert out["rollout_scaling"]["samples"] == 16
    assert set(out["weight_sync"]["seconds"]) == {"1_actors", "2_actors"}
    assert "machine:" in (tmp_path / "bench" / "bench.md").read_text()


def test_nft_reach_trains_both_estimators_and_times_them_to_the_baselines_final_reward(nft_out, straight, straight_bridge, toy_value_dir):
    """bench_nft_reach asks jobs/nft.py for a terminal and a stitchvm run (here answered by the
    session's two baselines, 4 epochs each, evaluated every 2nd) and reads the speedup off their curves."""
    from stitchvm_rl import bench_sections

    calls, dirs, summaries = [], {"terminal": "straight", "stitchvm": "straight_bridge"}, {"terminal": straight, "stitchvm": straight_bridge}

    def nft_main(args: list[str]) -> dict:
        calls.append(args)
        estimator = next(a for a in args if a.startswith("compare="))[len("compare=["):-1]
        return {"runs": {dirs[estimator]: summaries[estimator]}, "run_dirs": [str(nft_out / dirs[estimator])]}

    cfg = load_job("bench").BenchConfig(quick=True)
    reach = bench_sections.bench_nft_reach(cfg, toy_value_dir, nft_out, nft_main)
    assert [next(a for a in c if a.startswith("epochs=")) for c in calls] == ["epochs=2", "epochs=4"]  # stitchvm runs on, so its curve can cross the target
    assert all(f"value_models=[{toy_value_dir}]" in c and "drift_every=0" in c for c in calls)
    assert reach["epochs"] == {"terminal": 2, "stitchvm": 4}
    assert set(reach["terminal"]["eval_reward"]) == set(reach["stitchvm"]["eval_reward"]) == {0, 2, 4}
    assert reach["speedups"]["target_reward"] == reach["terminal"]["eval_reward"][4]  # the baseline's final evaluation
    assert reach["seconds_per_epoch_ratio"] == pytest.approx(straight["seconds_per_epoch"] / straight_bridge["seconds_per_epoch"])


def test_real_scale_section_bounds_the_guided_steps_and_counts_nft_work(real_scale_costs):
    # real scale (meta): the unguided step is a lower bound of both guided ones
    for step in real_scale_costs["dps_step"].values():
        flops = {m: s["flops"] for m, s in step["step"].items()}
        assert flops["none"] < flops["stitchvm"] < flops["tweedie"]
        if step["cfg"]:  # the head taken from CFG's unconditional pass saves its forward
            assert flops["none"] < flops["stitchvm_shared"] < flops["stitchvm"]
    nft_real = real_scale_costs["nft_epoch"]["per_sample"]
    assert nft_real["terminal"]["train_forward_equivalents"] == 24 * 5 and nft_real["stitchvm"]["train_forward_equivalents"] == 11 * 5


def test_lora_shapes_match_what_peft_creates():
    """weight_sync sizes its SD3.5-M adapter with lora_shapes: it must be peft's own layout."""
    policy = SD3Policy.from_pretrained("toyworld")
    expected = benchmark.lora_shapes(policy.transformer, 4, LORA_TARGETS)
    policy.add_lora(rank=4, alpha=8)
    got = {k: tuple(v.shape) for k, v in policy.export_adapter("default").tensors.items()}
    assert got == expected


def test_interleaved_runs_methods_round_robin_and_drops_the_warmup():
    calls = []
    seconds = benchmark.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3
    assert {k: len(v) for k, v in seconds.items()} == {"a": 2, "b": 2}


def test_model_mib_counts_each_module_once():
    linear = torch.nn.Linear(256, 256)  # 65,792 float32 values
    holder = type("Holder", (), {})()
    holder.parts = {"x": linear, "y": [linear]}
    assert benchmark.model_mib(holder, linear) == pytest.approx(65_792 * 4 / 2**20)
