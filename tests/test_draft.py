"""DRaFT-K (stitchvm_rl/draft.py, jobs/draft.py): where the gradient flows, bad input, and the job
end to end on Ray -- a run whose learner rank dies mid-checkpoint and resumes equals a straight run."""

import json

import pytest
import torch

from conftest import load_job
from stitchvm_rl import draft, flow, rewards, toyworld
from stitchvm_rl.config import ConfigError
from stitchvm_rl.policy import SD3Policy

STEPS = 4


@pytest.fixture(scope="module")
def policy():
    """The toy world's policy with three different non-zero LoRA adapters (default, old, ema): the
    trained one, and two that the regulariser's base model (adapters off) must not be mistaken for."""
    policy = SD3Policy.from_pretrained("toyworld")
    torch.manual_seed(0)
    policy.add_lora(4, 8, float32=True)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    return policy


def lora_grads(policy: SD3Policy) -> dict[str, torch.Tensor]:
    """Gradients of the trained adapter; every other parameter must have none."""
    grads = {}
    for name, p in policy.transformer.named_parameters():
        if ".default." in name:
            grads[name] = p.grad.clone()
        else:
            assert p.grad is None, name
        p.grad = None
    return grads


def reference_loss(policy: SD3Policy, cfg: draft.DraftRolloutConfig, prompts: list[str], noise: torch.Tensor, stop: int, objective) -> torch.Tensor:
    """The DRaFT loss written out step by step: plain Euler, the latent detached after every step
    before stop - K, v_base of each later step under no_grad, no checkpointing."""
    sigmas = flow.sd3_sigmas(cfg.num_steps, scheduler_config=policy.pipe.scheduler.config)
    cond = policy.encode_prompts(prompts)
    z, deviations = noise, []
    for n in range(stop):
        t = sigmas[n].expand(len(z))
        v = policy.velocity(z, t, cond)
        if n >= stop - cfg.backprop_steps:
            with torch.no_grad(), policy.adapter(None):
                v_base = policy.velocity(z, t, cond)
            deviations.append((v - v_base).pow(2).flatten(1).mean(1))
        z = z + (sigmas[n + 1] - sigmas[n]) * v
        if n < stop - cfg.backprop_steps:
            z = z.detach()
    return -objective(z, float(sigmas[stop]), prompts).mean() + cfg.reg_weight * torch.stack(deviations).mean()


@pytest.mark.parametrize("estimator, k, stop", [("terminal", 1, STEPS), ("terminal", 2, STEPS), ("stitchvm", 2, 3)])
def test_the_gradient_reaches_the_lora_only_through_the_last_k_steps(policy, toy_value_dir, monkeypatch, estimator, k, stop):
    """The gradient of the DRaFT loss (checkpointed steps) equals the step-by-step reference cut
    after step stop - K, and differs from one cut a step earlier: only the last K steps carry it.
    StitchVM's objective never decodes, and no pixel reward is called; the frozen value model and
    the `old` / `ema` adapters get no gradient."""
    from stitchvm_rl.value.model import StitchedValueModel

    cfg = draft.DraftRolloutConfig(estimator=estimator, backprop_steps=k, num_steps=STEPS, stop_min=2, stop_max=3, reg_weight=0.5)
    prompts = toyworld.CAPTIONS[:2]
    noise = policy.initial_noise(2, torch.Generator().manual_seed(1))
    if estimator == "terminal":
        reward = rewards.build_rewards({"toy_clip": 1.0})
        objective = draft.terminal_objective(policy, reward)

        def written_out(z, sigma, prompts):
            return reward(policy.decode(z), prompts, grad=True)
    else:
        value_model = StitchedValueModel.from_pretrained(toy_value_dir).requires_grad_(False)
        objective = draft.value_objective(policy, [value_model])

        def written_out(z, sigma, prompts):
            return value_model(z, torch.full((len(z),), sigma), prompts, policy.encode_prompts(prompts))

        def no_decode(*args, **kwargs):
            raise AssertionError("DRaFT + StitchVM decoded a latent")

        monkeypatch.setattr(policy.vae, "decode", no_decode)
        monkeypatch.setattr(rewards.WeightedReward, "__call__", no_decode)

    loss, parts = draft.draft_loss(policy, cfg, prompts, noise, stop, objective)
    loss.backward()
    grads = lora_grads(policy)
    assert parts["deviation"] > 0 and parts["stop_sigma"] == pytest.approx(float(flow.sd3_sigmas(STEPS, scheduler_config=policy.pipe.scheduler.config)[stop]))
    reference = reference_loss(policy, cfg, prompts, noise, stop, written_out)
    reference.backward()
    expected = lora_grads(policy)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-7)
    longer = draft.DraftRolloutConfig(estimator=estimator, backprop_steps=k + 1, num_steps=STEPS, stop_min=2, stop_max=3, reg_weight=0.5)
    reference_loss(policy, longer, prompts, noise, stop, written_out).backward()
    one_more = lora_grads(policy)
    assert max((one_more[n] - grads[n]).abs().max().item() for n in grads) > 1e-4
    if estimator == "stitchvm":
        assert all(p.grad is None for p in value_model.parameters())


@pytest.mark.parametrize(
    "args, message",
    [
        (["draft.backprop_steps=0"], "draft.backprop_steps"),
        (["draft.backprop_steps=11"], "backprop_steps=11 is more than the num_steps=10"),
        (["draft.estimator=stitchvm", "draft.backprop_steps=4"], "stop_min=3 leaves fewer than backprop_steps=4 steps"),
        (["rewards={geneval: 1.0}"], "non-differentiable"),
        (["compare=[terminal,stichvm]"], "unknown estimator"),
    ],
)
def test_bad_input_is_refused_before_ray_starts(tmp_path, monkeypatch, args, message):
    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr("stitchvm_rl.runtime.init_ray", no_ray)
    with pytest.raises(ConfigError, match=message):
        load_job("draft").main([f"output_dir={tmp_path}", *args])


# jobs/draft.py at tiny sizes: 2 ranks x 1 micro-step x 2 prompts, 4 Euler steps, DRaFT-2 + StitchVM, LoRA rank 4
TINY = [
    "draft.estimator=stitchvm",
    "draft.num_steps=4",
    "draft.backprop_steps=2",
    "draft.stop_min=2",
    "draft.stop_max=3",
    "draft.batch_size=2",
    "draft.grad_accum=1",
    "draft.lora_rank=4",
    "draft.lora_alpha=8",
    "eval_prompts=4",
    "eval_every=3",
    "train.lr=1e-2",
]


@pytest.mark.slow
def test_a_run_whose_learner_dies_mid_checkpoint_resumes_to_equal_the_uninterrupted_run(tmp_path):
    """Rank 1 dies while writing the last epoch's checkpoint, after that epoch's uninterrupted update,
    evaluation and metrics line were written: Ray Train restarts the group from the epoch before's
    checkpoint, and the replayed epoch must equal the uninterrupted one -- its loss parts (the
    restored LoRA, and the prompts, noise and stops of (seed, epoch, rank)) and the evaluation of its
    EMA image by image (the restored AdamW state and EMA). One Ray Train run holds both: the record
    written before the death is the straight run's."""
    summary = load_job("draft").main([f"output_dir={tmp_path}", "run_name=crash", "epochs=3", "testing.crash_in_checkpoint=2", *TINY])
    run = tmp_path / "crash"
    assert (run / ".crash-injected").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in lines if m["epoch"] >= 0]
    assert [m["epoch"] for m in epochs] == [0, 1, 2, 2] and epochs[-1]["resumed_from_epoch"] == 2
    uninterrupted, replayed = epochs[2], epochs[3]
    for key in ("loss", "objective", "deviation", "stop_sigma", "eval_reward_mean"):
        assert replayed[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-8), key
    assert len({m["stop_sigma"] for m in epochs}) > 1  # the stops are drawn, and replayed alike
    evaluations = [json.loads(line) for line in (run / "eval_rewards.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in evaluations] == [0, 3, 3]
    assert evaluations[2]["rewards"] == pytest.approx(evaluations[1]["rewards"], rel=1e-5, abs=1e-7)
    assert evaluations[1]["rewards"] != pytest.approx(evaluations[0]["rewards"], abs=1e-4)  # training moved the EMA
    assert summary["estimator"] == "stitchvm" and summary["eval_reward_gain_se"] > 0
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file() and (run / "samples" / "step_00003.png").is_file()
