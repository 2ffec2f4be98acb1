"""Guidance with a value: where the gradient flows, that it points uphill, and FK steering."""

import pytest
import torch

from stitchvm_rl import rewards, toyworld
from stitchvm_rl.guidance import GuidanceConfig, StitchValue, TweedieValue, build_value, dps_sample, fk_steer
from stitchvm_rl.value.search import build_value_model

PROMPTS = ["a red circle on the left", "a blue square on the right"]


@pytest.fixture(scope="module")
def stitched():
    """A stage-1 value model stitched after DiT block i <= 2 of the toy transformer's 4."""
    gen = torch.Generator().manual_seed(0)
    model, _ = build_value_model("toyworld", "toyworld-clip", toyworld.render(toyworld.random_captions(64, gen), gen), "clip", 2)
    return model


def _watch(policy, model):
    """Hooks on the very modules the sampler runs: VAE decoder calls and blocks that get a gradient
    (on each block's attention: a hook on the block itself would not see a pass that hands its output
    on detached, as the shared head's does)."""
    seen = {"decode": 0, "grad": set()}
    handles = [policy.vae.decoder.register_forward_hook(lambda *a: seen.__setitem__("decode", seen["decode"] + 1))]
    for n, block in enumerate(policy.transformer.transformer_blocks):
        handles.append(block.attn.register_full_backward_hook(lambda *a, n=n: seen["grad"].add(("policy", n))))
    for n, block in enumerate(model.head.blocks):
        handles.append(block.attn.register_full_backward_hook(lambda *a, n=n: seen["grad"].add(("value head", n))))
    return seen, handles


@pytest.mark.parametrize("shared", [True, False])
def test_stitchvm_guidance_never_decodes_and_no_block_after_i_gets_a_gradient(toy_policy, stitched, shared):
    i = stitched.config.dit_block
    assert i <= 2 < len(toy_policy.transformer.transformer_blocks)
    cfg = GuidanceConfig(num_steps=4, cfg_scale=3.0, scale=0.2)
    noise = toy_policy.initial_noise(2, torch.Generator().manual_seed(0))
    value = StitchValue(toy_policy, stitched)
    assert value.shared == "uncond"  # a frozen empty-prompt head is the start of CFG's unconditional pass
    if not shared:
        value.shared = None
    seen, handles = _watch(toy_policy, stitched)
    try:
        dps_sample(toy_policy, PROMPTS, value, cfg, noise, torch.Generator().manual_seed(1))
        assert seen["decode"] == 0
        # blocks 1..i only: the policy's own when its pass feeds the value model, else the head's copies
        assert seen["grad"] == {("policy" if shared else "value head", n) for n in range(i)}
        # the same hooks do see Tweedie's gradient run through every block and the decoder
        seen["grad"].clear()
        reward = rewards.build_rewards({"toy_clip": 1.0})
        dps_sample(toy_policy, PROMPTS, TweedieValue(toy_policy, reward, 3.0), cfg, noise, torch.Generator().manual_seed(1))
        assert seen["decode"] >= 3 and seen["grad"] == {("policy", n) for n in range(len(toy_policy.transformer.transformer_blocks))}
    finally:
        for h in handles:
            h.remove()
    assert all(p.grad is None for p in toy_policy.transformer.parameters()) and all(p.grad is None for p in stitched.parameters())


@pytest.mark.parametrize("cfg_scale, conditioning", [(3.0, "empty"), (3.0, "prompt"), (1.0, "prompt")])
def test_sharing_the_head_with_cfgs_pass_changes_nothing_but_the_work(toy_policy, stitched, cfg_scale, conditioning):
    """The velocity, value and gradient of a step are those of the separate passes, while the head's
    blocks run once (in the policy's pass) instead of twice; a trained head or an adapter shares nothing."""
    import copy

    model = copy.deepcopy(stitched)
    model.config.head_conditioning = conditioning
    shared, separate = StitchValue(toy_policy, model), StitchValue(toy_policy, model)
    separate.shared = None
    assert shared.shared == ("uncond" if conditioning == "empty" else "cond")
    gen = torch.Generator().manual_seed(5)
    z, t = torch.randn(4, 16, 8, 8, generator=gen), torch.full((4,), 0.6)
    cond = toy_policy.encode_prompts(PROMPTS * 2)
    calls = {"policy": 0, "head": 0}
    handles = [
        toy_policy.transformer.transformer_blocks[0].register_forward_hook(lambda *a: calls.__setitem__("policy", calls["policy"] + 1)),
        model.head.blocks[0].register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1)),
    ]
    try:
        v_a, g_a, val_a = shared.velocity_and_gradient(toy_policy, z, t, cond, PROMPTS * 2, cfg_scale)
        assert calls == {"policy": 2 if cfg_scale != 1.0 else 1, "head": 0}  # each CFG branch once; no head of its own
        calls.update(policy=0, head=0)
        v_b, g_b, val_b = separate.velocity_and_gradient(toy_policy, z, t, cond, PROMPTS * 2, cfg_scale)
        assert calls == {"policy": 1, "head": 1}  # CFG's batched pass + the value model's head
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(v_a, v_b, atol=1e-5) and torch.allclose(val_a, val_b, atol=1e-5)
    assert torch.allclose(g_a, g_b, atol=1e-5 * g_b.abs().max().item())
    model.config.head_trained = True
    assert StitchValue(toy_policy, model).shared is None


@pytest.mark.parametrize("kind", ["stitchvm", "tweedie"])
def test_the_guidance_gradient_points_uphill(toy_policy, stitched, kind):
    value = build_value(kind, toy_policy, rewards.build_rewards({"toy_clip": 1.0}), stitched)
    gen = torch.Generator().manual_seed(3)
    z0 = toy_policy.sample(PROMPTS * 2, 10, 1.0, noise=toy_policy.initial_noise(4, gen)).final
    t = torch.full((4,), 0.4)
    z = (1 - 0.4) * z0 + 0.4 * torch.randn(z0.shape, generator=gen)
    _, grad, v_here = value.velocity_and_gradient(toy_policy, z, t, toy_policy.encode_prompts(PROMPTS * 2), PROMPTS * 2, 1.0)
    step = 1e-2 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert (value.value(z + step, t, PROMPTS * 2) > v_here).all()
    assert (value.value(z - step, t, PROMPTS * 2) < v_here).all()


class DistanceValue:
    """V(z) = -||z - target||^2 per sample: FK steering must move particles towards the target."""

    def __init__(self, target):
        self.target = target

    def value(self, z, t, prompts):
        return -((z - self.target) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("proposals", [1, 4])
def test_fk_steering_selects_towards_higher_value(tiny_policy, proposals):
    gen = torch.Generator().manual_seed(0)
    target = torch.full(tiny_policy.latent_shape, 1.5)
    value = DistanceValue(target)
    cfg = GuidanceConfig(num_steps=8, particles=8, resample_every=2, resample_window=(0.0, 1.0), potential_scale=50.0, proposals=proposals)
    noise = tiny_policy.initial_noise(2 * 8, gen)
    steered = fk_steer(tiny_policy, PROMPTS, value, cfg, noise, torch.Generator().manual_seed(1))
    plain = fk_steer(tiny_policy, PROMPTS, value, GuidanceConfig(num_steps=8, particles=1), noise[::8], torch.Generator().manual_seed(1))
    assert steered.shape == plain.shape == (2, *tiny_policy.latent_shape)
    assert (value.value(steered, None, PROMPTS) > value.value(plain, None, PROMPTS)).all()


def test_guidance_outside_its_window_is_plain_sampling(tiny_policy):
    noise = tiny_policy.initial_noise(2, torch.Generator().manual_seed(0))
    plain = dps_sample(tiny_policy, PROMPTS, build_value("none", tiny_policy), GuidanceConfig(num_steps=4), noise, torch.Generator().manual_seed(1))
    closed = GuidanceConfig(num_steps=4, scale=1.0, guide_from=0.05)  # no step starts at t <= 0.05
    assert torch.equal(dps_sample(tiny_policy, PROMPTS, DistanceValueGrad(), closed, noise, torch.Generator().manual_seed(1)), plain)
    opened = GuidanceConfig(num_steps=4, scale=1.0)
    assert not torch.allclose(dps_sample(tiny_policy, PROMPTS, DistanceValueGrad(), opened, noise, torch.Generator().manual_seed(1)), plain)


class DistanceValueGrad:
    """V = -||z||^2: its gradient, without a model."""

    def velocity_and_gradient(self, policy, z, t, cond, prompts, cfg_scale):
        with torch.no_grad():
            return policy.velocity(z, t, cond, cfg_scale), -2 * z, -(z**2).flatten(1).sum(1)


def test_unknown_method_and_missing_value_model_are_clear_errors(tiny_policy):
    with pytest.raises(ValueError, match="unknown guidance method"):
        build_value("dsp", tiny_policy)
    with pytest.raises(ValueError, match="needs a value model"):
        build_value("fk_stitchvm", tiny_policy)


@pytest.mark.parametrize("method", ["stitchvm", "tweedie"])
def test_compiled_guidance_samples_the_same_images_as_eager(tmp_path, monkeypatch, stitched, method):
    import functools

    from stitchvm_rl import zoo
    from stitchvm_rl.guidance import run_guided

    compiled_blocks, aot_eager = [], functools.partial(zoo.compile_repeated_blocks, backend="aot_eager")

    def compile_aot_eager(*models):  # aot_eager: dynamo's capture without C++ codegen (fast on CPU)
        compiled_blocks.append(aot_eager(*models))
        return compiled_blocks[-1]

    monkeypatch.setattr(zoo, "compile_repeated_blocks", compile_aot_eager)
    value_dir = str(stitched.save(tmp_path / "value_model"))
    cfg = GuidanceConfig(num_steps=4, cfg_scale=3.0)
    runs = [run_guided(method, "toyworld", {"toy_clip": 1.0}, value_dir, PROMPTS * 2, cfg, 0.2, 2, 0, 0, "cpu", "float32", compile=c) for c in (False, True)]
    # the policy's 4 joint blocks, and the value model's 2 head blocks + 6 CLIP layers or the reward CLIP's 6
    assert compiled_blocks == [4 + (2 + 6 if method == "stitchvm" else 6)]
    torch.testing.assert_close(runs[1]["images"], runs[0]["images"], atol=1e-4, rtol=0)  # the warm-up batch draws no noise of the timed run
    assert not torch.equal(runs[0]["images"][:2], runs[0]["images"][2:])  # other noise per batch
