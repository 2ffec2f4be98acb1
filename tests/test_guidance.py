"""Guidance with a value: where the gradient flows, that it points uphill, and FK steering."""

import pytest
import torch

from stitchvm_rl import rewards, toyworld
from stitchvm_rl.guidance import GuidanceConfig, StitchValue, TweedieValue, build_value, dps_sample, fk_resample, fk_steer
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


def test_fk_resampling_keeps_each_prompts_particles_whose_value_rose_most():
    """Weights exp(lambda dV) within each prompt: a sharp potential keeps only the particle whose
    value rose most (not the highest value, not another prompt's); a flat one keeps a mixture."""
    z = torch.arange(8.0).view(8, 1, 1, 1)  # row n is particle n; prompts 0 and 1 own rows 0-3 and 4-7
    last = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0])
    now = torch.tensor([0.1, 0.9, 0.2, 5.5, 0.3, 0.0, 0.2, 0.1])  # rises: prompt 0 -> particle 1 (+0.9), prompt 1 -> 4
    gen = torch.Generator().manual_seed(0)
    kept, values = fk_resample(z, now, last, 4, 1e3, gen)
    assert kept.flatten().tolist() == [1.0] * 4 + [4.0] * 4 and values.tolist() == pytest.approx([0.9] * 4 + [0.3] * 4)
    flat, _ = fk_resample(z, now, last, 4, 0.0, gen)
    assert set(flat.flatten()[:4].tolist()) <= {0.0, 1.0, 2.0, 3.0} and set(flat.flatten()[4:].tolist()) <= {4.0, 5.0, 6.0, 7.0}
    counts = torch.bincount(torch.cat([fk_resample(z, now, last, 4, 0.0, gen)[0].flatten() for _ in range(200)]).long(), minlength=8)
    assert counts.min() > 150  # uniform: 200 draws x 4 picks / 4 particles = 200 each


class RecordingValue:
    """V(z) = mean(z); remembers every batch of particles it scores."""

    def __init__(self):
        self.seen = []

    def value(self, z, t, prompts):
        self.seen.append(z.clone())
        return z.flatten(1).mean(1)


def test_fk_steering_resamples_inside_its_window(tiny_policy):
    """With a sharp potential and a deterministic sampler (noise_level 0), a resampling collapses each
    prompt's particles onto one, so the value's next look sees identical particles -- only if the
    sampler resampled (outside the window it never does)."""
    noise = tiny_policy.initial_noise(2 * 4, torch.Generator().manual_seed(0))

    def steer(window):
        value = RecordingValue()
        cfg = GuidanceConfig(num_steps=6, particles=4, resample_every=1, resample_window=window, potential_scale=1e4, noise_level=0.0)
        fk_steer(tiny_policy, PROMPTS, value, cfg, noise, torch.Generator().manual_seed(1))
        return value.seen  # the initial values, one look per resampling step, the final choice

    def collapsed(batch):
        return all(torch.equal(row, group[0]) for group in batch.view(2, 4, -1) for row in group)

    seen = steer((0.0, 1.0))
    assert not collapsed(seen[0]) and collapsed(seen[2]) and collapsed(seen[-1])
    assert not collapsed(steer((0.0, 0.0))[-1])


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


class TargetValueGrad:
    """V = -||z - target||^2 with its exact gradient: DPS must end nearer the target than plain sampling."""

    def __init__(self, target):
        self.target = target

    def velocity_and_gradient(self, policy, z, t, cond, prompts, cfg_scale):
        with torch.no_grad():
            return policy.velocity(z, t, cond, cfg_scale), -2 * (z - self.target), -((z - self.target) ** 2).flatten(1).sum(1)


def test_dps_steps_up_the_value_gradient(tiny_policy):
    noise = tiny_policy.initial_noise(2, torch.Generator().manual_seed(0))
    target = torch.full_like(noise, 2.0)
    plain = dps_sample(tiny_policy, PROMPTS, build_value("none", tiny_policy), GuidanceConfig(num_steps=6), noise, torch.Generator().manual_seed(1))
    guided = dps_sample(tiny_policy, PROMPTS, TargetValueGrad(target), GuidanceConfig(num_steps=6, scale=0.3), noise, torch.Generator().manual_seed(1))

    def distance(z):
        return (z - target).flatten(1).norm(dim=1)

    assert (distance(guided) < 0.9 * distance(plain)).all()


def test_unknown_method_and_missing_value_model_are_clear_errors(tiny_policy):
    with pytest.raises(ValueError, match="unknown guidance method"):
        build_value("dsp", tiny_policy)
    with pytest.raises(ValueError, match="needs a value model"):
        build_value("fk_stitchvm", tiny_policy)


@pytest.mark.parametrize("method", ["stitchvm", "tweedie"])
@pytest.mark.slow
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
