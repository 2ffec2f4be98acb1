from stitchvm_rl.costs import count_flops, sd35m_value_model_costs


def test_flop_counter_counts_a_matmul():
    import torch

    a, b = torch.empty(8, 16, device="meta"), torch.empty(16, 4, device="meta")
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


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


def test_a_stitchvm_dps_step_costs_less_than_a_tweedie_one_at_real_scale():
    from stitchvm_rl.costs import sd35m_guidance_step_costs

    costs = sd35m_guidance_step_costs(i=4, j=1, resolution=512)
    step = costs["step"]
    assert step["none"]["backward_activation_gib"] == 0  # no autograd, nothing saved
    # stitchvm = the unguided step + one value-model forward and backward; tweedie differentiates it all
    assert step["none"]["flops"] < step["stitchvm"]["flops"] < step["tweedie"]["flops"]
    assert costs["flops_ratio_tweedie_over_stitchvm"] > 2 and costs["activation_ratio_tweedie_over_stitchvm"] > 4
