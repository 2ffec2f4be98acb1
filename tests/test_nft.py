"""The NFT loss and the reward normalisation, against the formulas of DiffusionNFT (the paper's plain form, the official code's x0-space form) and the bridge of V-NFT."""

import pytest
import torch

from stitchvm_rl import flow, nft, toyworld


def _batch(n=6, seed=0, tau=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4, 3, 3)
    anchor, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    tau = torch.zeros(n) if tau is None else tau
    t = tau + (1 - tau) * (0.1 + 0.8 * torch.rand(n, generator=g))
    z_t, u = flow.bridge_sample(anchor, tau, t, eps)
    v_old = u + 0.3 * torch.randn(shape, generator=g)
    return anchor, z_t, u, t, tau, v_old, g


def nft_loss_plain(v_theta, v_old, u, r, beta):
    """The paper's form: mean over samples of r ||v+ - u||^2 + (1 - r) ||v- - u||^2 (per-dim mean)."""
    v_pos, v_neg = nft.implicit_policies(v_theta, v_old, beta)
    dims = tuple(range(1, v_theta.dim()))
    return (r * ((v_pos - u) ** 2).mean(dims) + (1 - r) * ((v_neg - u) ** 2).mean(dims)).mean()


def test_plain_form_with_r_one_and_beta_one_is_flow_matching():
    anchor, z_t, u, t, tau, v_old, g = _batch()
    v_theta = torch.randn(v_old.shape, generator=g)
    loss = nft_loss_plain(v_theta, v_old, u, torch.ones(len(u)), beta=1.0)
    assert torch.allclose(loss, ((v_theta - u) ** 2).mean(), rtol=1e-6)


def test_official_form_at_tau_zero_is_the_x0_space_loss_of_the_official_code():
    anchor, z_t, u, t, tau, v_old, g = _batch()
    v_theta = (v_old + 0.1 * torch.randn(v_old.shape, generator=g)).requires_grad_(True)
    v_ref = v_old + 0.05 * torch.randn(v_old.shape, generator=g)
    r = torch.rand(len(u), generator=g)
    beta = 0.1
    loss, parts = nft.nft_loss(v_theta, v_old, v_ref, z_t, anchor, t, tau, r, beta)
    # train_nft_sd3.py, written out independently
    tc = t.view(-1, 1, 1, 1)
    v_pos, v_neg = beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta
    x0_pos, x0_neg = z_t - tc * v_pos, z_t - tc * v_neg
    w_pos = (x0_pos - anchor).abs().mean((1, 2, 3)).clamp(min=1e-5).detach()
    w_neg = (x0_neg - anchor).abs().mean((1, 2, 3)).clamp(min=1e-5).detach()
    l_pos = ((x0_pos - anchor) ** 2).mean((1, 2, 3)) / w_pos
    l_neg = ((x0_neg - anchor) ** 2).mean((1, 2, 3)) / w_neg
    expected = 5 * (r * l_pos / beta + (1 - r) * l_neg / beta).mean() + 1e-4 * ((v_theta - v_ref) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert parts["loss"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("tau", [0.0, 0.4])
def test_official_form_descends_the_same_way_as_the_plain_form(tau):
    """Per sample, both gradients are positive multiples of each other where v_theta = v_old (as
    after every sync), and still agree in direction nearby."""
    anchor, z_t, u, t, tau_t, v_old, g = _batch(tau=torch.full((6,), tau))
    r = torch.rand(6, generator=g)
    for offset, min_cos in ((0.0, 1 - 1e-5), (0.05, 0.9)):
        v_theta = (v_old + offset * torch.randn(v_old.shape, generator=g)).requires_grad_(True)
        loss, _ = nft.nft_loss(v_theta, v_old, v_old, z_t, anchor, t, tau_t, r, beta=1.0, kl_weight=0.0)
        (grad_official,) = torch.autograd.grad(loss, v_theta)
        (grad_plain,) = torch.autograd.grad(nft_loss_plain(v_theta, v_old, u, r, beta=1.0), v_theta)
        cos = torch.nn.functional.cosine_similarity(grad_official.flatten(1), grad_plain.flatten(1))
        assert bool((cos > min_cos).all()), (offset, cos)


def test_the_true_bridge_velocity_predicts_its_anchor():
    anchor, z_t, u, t, tau, v_old, g = _batch(tau=torch.full((6,), 0.3))
    assert torch.allclose(nft._anchor_prediction(u, z_t, t, tau), anchor, atol=1e-4)
    anchor0, z0_t, u0, t0, tau0, _, _ = _batch()
    assert torch.allclose(nft._anchor_prediction(u0, z0_t, t0, tau0), z0_t - t0.view(-1, 1, 1, 1) * u0, atol=1e-5)


def test_normalisation_maps_an_unclipped_group_to_mean_one_half():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.5, 11.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 3])
    r = nft.optimality_probability(scores, groups)
    assert torch.allclose(r[:3].mean(), torch.tensor(0.5)) and torch.allclose(r[3:].mean(), torch.tensor(0.5))
    std = scores.std(unbiased=False)  # one std over the whole batch, not per group
    assert torch.allclose(r[0], 0.5 + (1.0 - 2.0) / (std + 1e-4) / 10)
    assert bool((r[:3].diff() > 0).all())


def test_normalisation_clips_outliers_and_refuses_nan():
    scores = torch.cat([torch.zeros(50), torch.tensor([100.0])])
    r = nft.optimality_probability(scores, torch.zeros(51, dtype=torch.long))
    assert r[-1] == 1.0 and bool((r >= 0).all())  # A clipped at +5 -> r = 1
    with pytest.raises(ValueError, match="NaN or infinite"):
        nft.optimality_probability(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))


def test_evaluation_noise_seeds_are_never_rollout_seeds():
    from stitchvm_rl.evaluator import EVAL_NOISE_SEED
    from stitchvm_rl.prompt_schedule import epoch_seed

    # request n of epoch e draws its noise from epoch_seed + n; the evaluation from EVAL_NOISE_SEED + seed
    highest_rollout_seed = epoch_seed(10**7 - 1, 10**6) + 10**6
    assert highest_rollout_seed < EVAL_NOISE_SEED
    assert epoch_seed(0, 0) != EVAL_NOISE_SEED + 0  # the collision the held-out stream removed


def test_old_policy_decay_schedule():
    assert [nft.old_policy_decay(s) for s in (0, 100, 500, 5000)] == [0.0, pytest.approx(0.1), 0.5, 0.5]


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    """train.gradient_checkpointing only trades memory for recomputation: the NFT gradient is unchanged."""
    from stitchvm_rl.learner import NFTTrainConfig, nft_micro_step
    from stitchvm_rl.policy import PromptEmbeds, SD3Policy
    from stitchvm_rl.rollout import RolloutBatch

    grads, block_calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = SD3Policy.from_pretrained("toyworld")
        policy.add_lora(4, 8)
        policy.soft_update("old", 0.0)
        with torch.no_grad():  # a non-zero LoRA, so "default" differs from the base
            for name, p in policy.transformer.named_parameters():
                if "lora_B.default" in name:
                    p.normal_(std=0.01)
        if checkpointing:
            policy.transformer.enable_gradient_checkpointing()
        policy.transformer.train()
        calls = []
        policy.transformer.transformer_blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
        embeds = policy.encode_prompts(["a red circle on the left"])
        batch = RolloutBatch(
            anchors=torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1)), tau=torch.zeros(4), groups=torch.zeros(4, dtype=torch.long),
            group_prompts=["a red circle on the left"], group_embeds=PromptEmbeds(embeds.embeds, embeds.pooled), scores=torch.arange(4.0), version=0, estimator="terminal",
        )
        loss, _ = nft_micro_step(policy, batch, 0, torch.tensor([0.2, 0.4, 0.6, 0.8]), 0.5, NFTTrainConfig(), torch.Generator().manual_seed(2))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in policy.transformer.named_parameters() if p.grad is not None})
        block_calls.append(len(calls))
    assert block_calls == [3, 4]  # old, ref and current velocity; checkpointing recomputes the current one in the backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_compiled_learner_gives_the_same_loss_and_lora_gradients(monkeypatch):
    """train.compile: the compiled blocks must follow every adapter switch of the NFT step (old,
    none = reference, default), or the loss would silently use the wrong velocities."""
    from stitchvm_rl import zoo
    from stitchvm_rl.learner import NFTTrainConfig, nft_micro_step
    from stitchvm_rl.policy import SD3Policy
    from stitchvm_rl.rollout import RolloutBatch

    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        policy = SD3Policy.from_pretrained("toyworld")
        policy.add_lora(4, 8)
        with torch.no_grad():  # default, old and the base all differ
            for name, p in policy.transformer.named_parameters():
                if "lora_B.default" in name:
                    p.normal_(std=0.01)
        policy.soft_update("old", 0.5)
        if compiled:  # aot_eager: dynamo's capture and AOT autograd without C++ codegen (fast on CPU)
            assert zoo.compile_repeated_blocks(policy.transformer, backend="aot_eager") == len(policy.transformer.transformer_blocks)
        policy.transformer.train()
        embeds = policy.encode_prompts(["a red circle on the left"])
        batch = RolloutBatch(
            anchors=torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1)), tau=torch.full((4,), 0.3), groups=torch.zeros(4, dtype=torch.long),
            group_prompts=["a red circle on the left"], group_embeds=embeds, scores=torch.arange(4.0), version=0, estimator="stitchvm",
        )
        losses = []
        for t in (0.5, 0.8):  # two micro-steps: the second reuses the graphs across the switches
            loss, parts = nft_micro_step(policy, batch, 0, torch.tensor([0.2, 0.4, 0.6, 0.8]), t, NFTTrainConfig(), torch.Generator().manual_seed(2))
            loss.backward()
            losses.append((loss.item(), parts))
        results.append((losses, {n: p.grad.clone() for n, p in policy.transformer.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    for (a, parts_a), (b, parts_b) in zip(eager, compiled):
        assert b == pytest.approx(a, rel=1e-5)
        assert parts_b == pytest.approx(parts_a, rel=1e-4, abs=1e-8)
    assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) > 0
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-7)


def test_training_timesteps_lie_strictly_above_the_anchors_noise_level():
    """The bridge-anchored loss trains at the schedule's noise levels t > tau, never at t = tau (its
    target grows like 1/sigma there); for a clean anchor (tau = 0) every level but the final 0."""
    from stitchvm_rl.learner import train_timesteps

    schedule = flow.sd3_sigmas(10)
    for k in (3, 6):
        tau = float(schedule[k])
        picked = train_timesteps(schedule, tau, 100, torch.Generator().manual_seed(0))
        assert sorted(picked.tolist(), reverse=True) == schedule[:k].tolist()  # all of them, and only them
    clean = train_timesteps(schedule, 0.0, 100, torch.Generator().manual_seed(0))
    assert sorted(clean.tolist(), reverse=True) == schedule[:-1].tolist()
    some = [train_timesteps(schedule, 0.0, 3, torch.Generator().manual_seed(s)).tolist() for s in range(4)]
    assert all(len(s) == 3 and len(set(s)) == 3 for s in some) and len({tuple(s) for s in some}) > 1  # a random draw without repeats


def test_ranks_see_the_whole_epochs_scores_with_group_ids_unique_over_the_epoch(tmp_path):
    """gather_scores (here one gloo rank): requests in order, each request's group ids shifted past
    those before it, so per-group normalisation never mixes two prompts; metrics average per step."""
    import torch.distributed as dist

    from stitchvm_rl import across_ranks
    from stitchvm_rl.rollout import RolloutBatch

    def batch(scores, groups, version):
        return RolloutBatch(anchors=torch.zeros(len(scores)), tau=torch.zeros(len(scores)), groups=torch.tensor(groups), group_prompts=[], group_embeds=None,
                            scores=torch.tensor(scores), version=version, estimator="terminal", seconds_sample=1.0, seconds_score=0.5)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mine = {1: batch([5.0, 6.0], [0, 0], 3), 0: batch([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], 3), 2: batch([7.0, 8.0], [0, 1], 3)}
        epoch = across_ranks.gather_scores(mine, 3)
        assert epoch.scores.tolist() == [1, 2, 3, 4, 5, 6, 7, 8] and epoch.groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
        assert epoch.sizes == [4, 2, 2] and epoch.versions == [3, 3, 3] and epoch.seconds_sample == 3.0 and epoch.seconds_score == 1.5
        assert {n: v.tolist() for n, v in epoch.per_request(epoch.groups.float()).items()} == {0: [0, 0, 1, 1], 1: [2, 2], 2: [3, 4]}
        assert across_ranks.mean_over_ranks({"loss": 6.0, "kl": 3.0}, 3) == {"kl": 1.0, "loss": 2.0}
        assert across_ranks.sum_over_ranks(4) == 4
    finally:
        dist.destroy_process_group()


def test_the_prompt_schedule_is_a_function_of_seed_and_epoch():
    from stitchvm_rl import prompt_schedule

    prompts = [f"prompt {n}" for n in range(5)]
    first = prompt_schedule.epoch_requests(prompts, 4, seed=1, epoch=2)
    assert first == prompt_schedule.epoch_requests(prompts, 4, seed=1, epoch=2) and all(len(r) == 1 for r in first)
    assert len({r[0] for r in first}) == 4  # a permutation: no prompt twice while there are enough
    assert first != prompt_schedule.epoch_requests(prompts, 4, seed=1, epoch=3)
    assert sorted(prompt_schedule.epoch_prompts(prompts, 10, seed=0, epoch=0)) == sorted(prompts * 2)  # more groups than prompts: each twice
    assert prompt_schedule.epoch_seed(1, 2) != prompt_schedule.epoch_seed(1, 3)


def test_evaluation_in_batches_scores_the_same_images_as_one_batch():
    """Learner rank 0 evaluates eval_batch_size prompts at a time: the noise is drawn for all first."""
    from stitchvm_rl import rewards
    from stitchvm_rl.evaluator import evaluate_on_fixed_prompts
    from stitchvm_rl.policy import SD3Policy

    policy = SD3Policy.from_pretrained("toyworld")
    policy.add_lora(4, 8)
    reward = rewards.build_rewards({"toy_clip": 1.0})
    prompts = toyworld.CAPTIONS[:5]
    whole, images, per_image = evaluate_on_fixed_prompts(policy, reward, prompts, 4, seed=3, batch_size=5)
    batched, images_b, per_image_b = evaluate_on_fixed_prompts(policy, reward, prompts, 4, seed=3, batch_size=2)
    assert torch.allclose(images_b, images, atol=1e-5) and per_image_b == pytest.approx(per_image, abs=1e-5)
    assert batched["eval_reward_mean"] == pytest.approx(whole["eval_reward_mean"], abs=1e-6)
