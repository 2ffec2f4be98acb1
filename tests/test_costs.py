import pytest

from stitchvm_rl.costs import count_flops, sd35m_value_model_costs


def test_flop_counter_counts_a_matmul():
    import torch

    a, b = torch.empty(8, 16, device="meta"), torch.empty(16, 4, device="meta")
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


@pytest.mark.slow
def test_real_scale_value_model_is_a_fraction_of_tweedie_scoring():
    costs = sd35m_value_model_costs(i=4, j=1, resolution=1024)
    params, flops = costs["params"], costs["forward_flops"]
    assert params["sd35m_transformer"] == 2_243_171_520
    # the head is 4 of 24 blocks (+ embedders); the tail is all of CLIP's vision tower
    assert 0.15 < params["stitchvm_dit_head"] / params["sd35m_transformer"] < 0.2
    patch_conv = 3 * 14 * 14 * 1024  # the one part of CLIP's vision tower the stitch replaces (j = 1)
    assert params["stitchvm_clip_tail"] == params["clip_vision"] - patch_conv
    assert flops["stitchvm"] < flops["sd35m_transformer"] / 3
    assert costs["flops_ratio_tweedie_over_stitchvm"] > 5
    # more blocks in the head cost more
    assert sd35m_value_model_costs(i=8, j=1, resolution=1024)["forward_flops"]["stitchvm"] > flops["stitchvm"]


def test_a_stitchvm_dps_step_costs_less_than_a_tweedie_one_at_real_scale(real_scale_costs):
    costs = real_scale_costs["dps_step"]["512_cfg1"]  # costs.sd35m_guidance_step_costs(i=4, j=1, resolution=512)
    step = costs["step"]
    assert step["none"]["backward_activation_gib"] == 0  # no autograd, nothing saved
    # stitchvm = the unguided step + one value-model forward and backward; tweedie differentiates it all
    assert step["none"]["flops"] < step["stitchvm"]["flops"] < step["tweedie"]["flops"]
    assert costs["flops_ratio_tweedie_over_stitchvm"] > 2 and costs["activation_ratio_tweedie_over_stitchvm"] > 4
    # with the head taken from CFG's unconditional pass (section 5.2), a step saves exactly the head's forward
    head = sd35m_value_model_costs(i=4, j=1, resolution=512)["forward_flops"]["stitchvm_dit_head"]
    assert step["stitchvm"]["flops"] - step["stitchvm_shared"]["flops"] == head > 0
    assert step["stitchvm_shared"]["backward_activation_gib"] == pytest.approx(step["stitchvm"]["backward_activation_gib"], rel=0.01)
    assert costs["flops_ratio_tweedie_over_stitchvm_shared"] == step["tweedie"]["flops"] / step["stitchvm_shared"]["flops"]
    assert "stitchvm_shared" not in real_scale_costs["dps_step"]["512_cfg0"]["step"]  # without CFG: no unconditional pass to share


@pytest.mark.slow
def test_a_real_scale_nft_group_does_the_learner_and_rollout_work_of_its_estimator(monkeypatch):
    """`sd35m_nft_groups` (timed on a GPU by jobs/bench.py) on `meta`: count what each estimator runs."""
    from stitchvm_rl import costs, zoo

    built, published = {}, zoo.published_model

    def published_model(name, *args):
        built[name] = model = published(name, *args)
        return model

    monkeypatch.setattr(zoo, "published_model", published_model)
    groups = costs.sd35m_nft_groups(group=4, resolution=64, num_steps=3, stop=1, train_timesteps={"terminal": 2, "stitchvm": 1}, micro_batch=4)
    transformer, decoder = built["sd35_medium_transformer"], built["sd35_medium_vae"].decoder
    lora_layer = next(m for m in transformer.modules() if hasattr(m, "lora_A"))
    calls = {"velocity": [], "decode": 0}  # velocity: (batch, adapter on) per transformer call
    transformer.register_forward_pre_hook(lambda m, args, kwargs: calls["velocity"].append((len(kwargs["hidden_states"]), not lora_layer.disable_adapters)), with_kwargs=True)
    decoder.register_forward_pre_hook(lambda *a: calls.__setitem__("decode", calls["decode"] + 1))
    flops = {}
    for estimator, run in groups.items():
        calls["velocity"], calls["decode"] = [], 0
        flops[estimator] = count_flops(run)
        steps, timesteps = (3, 2) if estimator == "terminal" else (1, 1)
        # sampling: the whole group per step with the LoRA; training, per micro-batch (here the group):
        # the old velocity (LoRA), the reference's (adapter off) and the current one (LoRA, with autograd)
        assert calls["velocity"] == [(4, True)] * steps + [(4, True), (4, False), (4, True)] * timesteps
        assert calls["decode"] == (1 if estimator == "terminal" else 0)  # one micro-batch; stitchvm scores z_tau without decoding
    lora = [p for n, p in transformer.named_parameters() if "lora" in n]
    assert lora and all(p.grad is not None for p in lora) and all(p.grad is None for n, p in transformer.named_parameters() if "lora" not in n)
    assert flops["terminal"] > 1.5 * flops["stitchvm"]
