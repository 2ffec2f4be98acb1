import pytest
import torch

from stitchvm_rl.policy import SD3Policy, tensor_checksum


@pytest.fixture()
def lora_policy():
    """A fresh tiny policy with both adapters and a non-zero "default" (B starts at zero)."""
    policy = SD3Policy.from_pretrained("tiny-sd3")
    policy.add_lora(rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if ".lora_B.default." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy


def inputs(policy, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = policy.initial_noise(n, g)
    t = torch.rand(n, generator=g)
    return z, t, policy.encode_prompts(["a red circle on the left", "a blue square on the right", ""][:n])


@torch.no_grad()
def velocity(policy, adapter, z, t, cond):
    with policy.adapter(adapter):
        return policy.velocity(z, t, cond)


def test_prompt_embeddings_are_cached_and_equal_the_pipeline_encoding(tiny_policy):
    prompts = ["a red circle on the left", "a cyan triangle on the right"]
    first = tiny_policy.encode_prompts(prompts)
    assert set(prompts) <= set(tiny_policy._prompt_cache)
    again = tiny_policy.encode_prompts(prompts[::-1])
    assert torch.equal(again.embeds, first.embeds.flip(0))
    embeds, _, pooled, _ = tiny_policy.pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=8)
    assert torch.allclose(first.embeds, embeds, atol=1e-5) and torch.allclose(first.pooled, pooled, atol=1e-5)
    assert first.embeds.shape == (2, 16, 64)  # 8 CLIP + 8 T5 tokens (whole-word vocabularies)


def test_cfg_scale_one_is_the_conditional_velocity_and_cfg_extrapolates(tiny_policy):
    z, t, cond = inputs(tiny_policy, 2)
    with torch.no_grad():
        v1 = tiny_policy.velocity(z, t, cond, cfg_scale=1.0)
        v_uncond = tiny_policy.velocity(z, t, tiny_policy.encode_prompts(["", ""]), cfg_scale=1.0)
        v3 = tiny_policy.velocity(z, t, cond, cfg_scale=3.0)
    assert torch.allclose(v3, v_uncond + 3 * (v1 - v_uncond), atol=1e-5)


def test_adapters_default_old_and_reference(lora_policy):
    z, t, cond = inputs(lora_policy)
    v_ref = velocity(lora_policy, None, z, t, cond)
    v_default = velocity(lora_policy, "default", z, t, cond)
    v_old = velocity(lora_policy, "old", z, t, cond)
    assert not torch.allclose(v_default, v_ref, atol=1e-4)  # the LoRA changes the output
    assert torch.allclose(v_old, v_ref, atol=1e-6)  # old was copied while B was still zero
    # after the context, "default" is active and trainable again; "old" never is
    trainable = {n for n, p in lora_policy.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


def test_soft_update_eta_zero_copies_default_and_eta_one_keeps_old(lora_policy):
    z, t, cond = inputs(lora_policy)
    before = velocity(lora_policy, "old", z, t, cond)
    lora_policy.soft_update("old", eta=1.0)
    assert torch.equal(velocity(lora_policy, "old", z, t, cond), before)
    old = {k: v.clone() for k, v in lora_policy._lora_params("old").items()}
    lora_policy.soft_update("old", eta=0.25)
    for key, p in lora_policy._lora_params("old").items():
        new = lora_policy._lora_params("default")[key.replace(".old.", ".default.")]
        assert torch.allclose(p, 0.25 * old[key] + 0.75 * new, atol=1e-7)
    lora_policy.soft_update("old", eta=0.0)
    assert torch.equal(velocity(lora_policy, "old", z, t, cond), velocity(lora_policy, "default", z, t, cond))


def test_adapter_export_import_round_trip_is_bit_exact(lora_policy):
    z, t, cond = inputs(lora_policy)
    state = lora_policy.export_adapter("default", version=7)
    assert state.version == 7 and state.checksum == tensor_checksum(state.tensors)
    assert all(t.device.type == "cpu" for t in state.tensors.values())
    lora_policy.load_adapter(state, "old")
    assert torch.equal(velocity(lora_policy, "old", z, t, cond), velocity(lora_policy, "default", z, t, cond))
    # and into another process's copy of the model
    other = SD3Policy.from_pretrained("tiny-sd3")
    other.add_lora(rank=4, alpha=8)
    other.load_adapter(state, "old")
    assert torch.equal(velocity(other, "old", z, t, cond), velocity(lora_policy, "default", z, t, cond))


def test_saved_lora_loads_into_a_plain_diffusers_pipeline(lora_policy, tmp_path):
    """alpha / r = 2 here: a LoRA read back without its alpha would give another velocity."""
    z, t, cond = inputs(lora_policy)
    lora_policy.save_lora(str(tmp_path), "default")
    other = SD3Policy.from_pretrained("tiny-sd3")
    other.pipe.load_lora_weights(str(tmp_path))
    assert torch.allclose(other.velocity(z, t, cond), velocity(lora_policy, "default", z, t, cond), atol=1e-5)
    assert not torch.allclose(other.velocity(z, t, cond), velocity(lora_policy, None, z, t, cond), atol=1e-3)


def test_checksum_catches_a_changed_tensor_and_a_foreign_adapter(lora_policy):
    state = lora_policy.export_adapter("default", version=1)
    key = sorted(state.tensors)[0]
    state.tensors[key] = state.tensors[key].clone()
    state.tensors[key].view(-1)[0] += 1e-3
    with pytest.raises(ValueError, match="failed its checksum"):
        lora_policy.load_adapter(state, "old")
    small = SD3Policy.from_pretrained("tiny-sd3")
    small.add_lora(rank=4, alpha=8, targets=["attn.to_q"])
    foreign = small.export_adapter("default")
    with pytest.raises(ValueError, match="another model or LoRA config"):
        lora_policy.load_adapter(foreign, "old")


def test_export_without_lora_is_a_clear_error(tiny_policy):
    with pytest.raises(ValueError, match="call add_lora"):
        tiny_policy.export_adapter("default")


def test_vae_round_trip_and_image_range(tiny_policy):
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        z = tiny_policy.encode_images(images)
        out = tiny_policy.decode(z)
    assert z.shape == (2, 16, 4, 4) and out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1


def test_sample_returns_the_whole_trajectory_and_stops_early(tiny_policy):
    g = torch.Generator().manual_seed(0)
    noise = tiny_policy.initial_noise(2, g)
    full = tiny_policy.sample(["a red circle on the left"] * 2, num_steps=10, noise=noise)
    part = tiny_policy.sample(["a red circle on the left"] * 2, num_steps=10, noise=noise, stop_after=4)
    assert full.latents.shape == (11, 2, 16, 4, 4) and part.latents.shape == (5, 2, 16, 4, 4)
    assert torch.equal(part.final, full.latents[4])
    assert float(part.sigmas[-1]) == pytest.approx(float(full.sigmas[4]))
    with pytest.raises(ValueError, match="multiple of"):
        tiny_policy.sample(["x"], num_steps=2, resolution=10)


def test_prompt_embeddings_live_on_the_cpu_and_the_cache_keeps_the_most_recently_used():
    policy = SD3Policy.from_pretrained("tiny-sd3", prompt_cache=2)
    a, b, c = "a red circle on the left", "a blue square on the right", "a cyan triangle on the left"
    first = policy.encode_prompts([a, b])
    assert all(e.embeds.device.type == "cpu" for e in policy._prompt_cache.values())
    policy.encode_prompts([a])  # a is now the most recently used
    policy.encode_prompts([c])
    assert list(policy._prompt_cache) == [a, c]  # b, the least recently used, went
    assert torch.equal(policy.encode_prompts([a]).embeds, first.embeds[:1])


def test_a_policy_whose_text_encoders_are_dropped_reads_its_cache_and_refuses_new_prompts():
    """Learner ranks: rank 0 encodes its evaluation prompts and frees the encoders; the others never load them."""
    policy = SD3Policy.from_pretrained("tiny-sd3")
    cached = policy.encode_prompts(["a red circle on the left"])
    policy.drop_text_encoders()
    assert not policy.has_text_encoders and policy.pipe.text_encoder_3 is None
    assert torch.equal(policy.encode_prompts(["a red circle on the left"]).embeds, cached.embeds)
    with pytest.raises(ValueError, match="1 prompts are not cached .* this policy has no text encoders"):
        policy.encode_prompts(["a blue square on the right"])
    bare = SD3Policy.from_pretrained("tiny-sd3", text_encoders=False)
    assert not bare.has_text_encoders and bare.transformer is not None
