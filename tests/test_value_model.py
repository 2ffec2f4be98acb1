import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL

from stitchvm_rl import toyworld
from stitchvm_rl.value.model import StitchedValueModel
from stitchvm_rl.value.search import AffineLeastSquares, build_value_model


@pytest.fixture(scope="module")
def toy_value():
    gen = torch.Generator().manual_seed(0)
    captions = toyworld.random_captions(64, gen)
    model, result = build_value_model("toyworld", "toyworld-clip", toyworld.render(captions, gen))
    return model, result, captions


def test_least_squares_recovers_a_planted_affine_map():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 7, generator=gen), torch.randn(5, generator=gen)
    fit = AffineLeastSquares(7, 5)
    for _ in range(4):  # streamed in batches
        x = torch.randn(100, 7, generator=gen)
        fit.add(x, x @ w.T + b)
    w_hat, b_hat, rss = fit.solve()
    assert torch.allclose(w_hat, w.double(), atol=1e-6) and torch.allclose(b_hat, b.double(), atol=1e-6)
    assert rss.max() < 1e-8


def test_search_table_covers_every_pair_and_initialises_f(toy_value):
    model, result, _ = toy_value
    pairs = {(row["i"], row["j"]) for row in result.table}
    assert pairs == {(i, j) for i in range(1, 5) for j in range(1, 5)}
    best = min(result.table, key=lambda row: row["mse"])
    assert (model.config.dit_block, model.config.rm_block) == (best["i"], best["j"])
    assert torch.equal(model.stitch.proj.weight[:, :, 0, 0], result.weight)
    assert len(model.config.stitch_mse) == 16


def test_g_is_zero_at_init_so_the_model_is_up_of_f_then_the_tail(toy_value):
    model, _, captions = toy_value
    z, t = torch.randn(3, 16, 8, 8), torch.rand(3)
    with torch.no_grad():
        h = model.head(z, t)
        linear = model.stitch.up(model.stitch.proj(h))
        assert torch.equal(model.stitch(h), linear)
        emb, _ = model.tail(linear)
        expected = torch.nn.functional.normalize(emb, dim=-1)
        assert torch.allclose(model.embed(z, t)[0], expected, atol=1e-6)
        assert torch.allclose(model(z, t, captions[:3]), (expected * model.text_embeds(captions[:3])).sum(-1), atol=1e-6)


def test_gradients_reach_z_through_i_blocks_only_and_no_vae(toy_value):
    model, _, captions = toy_value
    assert len(model.head.blocks) == model.config.dit_block
    assert not any(isinstance(m, AutoencoderKL) for m in model.modules())  # nothing to decode with
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, b in enumerate(model.head.blocks)]
    z = torch.randn(2, 16, 8, 8, requires_grad=True)
    model(z, torch.tensor([0.5, 0.7]), captions[:2]).sum().backward()
    for h in hooks:
        h.remove()
    assert ran == list(range(model.config.dit_block))
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.head.parameters())  # the head is frozen


def test_save_load_reproduces_outputs_and_refuses_damage(toy_value, tmp_path):
    model, _, captions = toy_value
    with torch.no_grad():
        model.stitch.refine[-1].weight.normal_()  # a trained-looking stitch
    path = model.save(tmp_path / "vm")
    loaded = StitchedValueModel.from_pretrained(path)
    z, t = torch.randn(4, 16, 8, 8), torch.rand(4)
    with torch.no_grad():
        assert torch.allclose(loaded(z, t, captions[:4]), model(z, t, captions[:4]), atol=1e-6)
    config = json.loads((path / "value_model.json").read_text())
    assert config["backbone"] == "toyworld" and config["reward_model"] == "toyworld-clip"
    data = bytearray((path / "value_model.safetensors").read_bytes())
    data[-8] ^= 0xFF
    (path / "value_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        StitchedValueModel.from_pretrained(path)
    config["backbone_fingerprint"] = "0" * 64
    model.save(tmp_path / "vm2")
    (tmp_path / "vm2" / "value_model.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="stitched from another version of backbone"):
        StitchedValueModel.from_pretrained(tmp_path / "vm2")
    with pytest.raises(FileNotFoundError, match="not a value model directory"):
        StitchedValueModel.from_pretrained(tmp_path)


def test_head_blocks_are_trained_and_saved_only_when_asked(toy_value, tmp_path):
    """train.train_head: the head's blocks join the trainable set and are saved with the model;
    otherwise a load re-reads them from the backbone, so a change to them is never kept."""
    import copy

    base, _, captions = toy_value
    model = copy.deepcopy(base)
    n_trainable = len(model.trainable_parameters())
    with torch.no_grad():
        for p in model.head.blocks.parameters():
            p.add_(0.01 * torch.randn_like(p))
    z, t = torch.randn(4, 16, 8, 8), torch.rand(4)
    with torch.no_grad():
        changed, original = model(z, t, captions[:4]), base(z, t, captions[:4])
        assert not torch.allclose(changed, original)
        assert torch.allclose(StitchedValueModel.from_pretrained(model.save(tmp_path / "frozen"))(z, t, captions[:4]), original, atol=1e-6)
        model.config.head_trained = True
        assert len(model.trainable_parameters()) == n_trainable + len(list(model.head.blocks.parameters()))
        assert torch.allclose(StitchedValueModel.from_pretrained(model.save(tmp_path / "trained"))(z, t, captions[:4]), changed, atol=1e-6)


def test_a_prompt_conditioned_head_is_the_base_models_conditional_pass(tmp_path):
    """head_conditioning=prompt: the head's tokens after block i equal those of the base transformer's
    own forward with that prompt; the model refuses to run without the prompt embeddings, and a
    saved model loads with its conditioning."""
    from stitchvm_rl.policy import SD3Policy

    policy = SD3Policy.from_pretrained("toyworld")
    gen = torch.Generator().manual_seed(3)
    captions = toyworld.random_captions(16, gen)
    model, _ = build_value_model("toyworld", "toyworld-clip", toyworld.render(captions, gen), max_dit_block=2, rm_blocks=(1,), head_conditioning="prompt", prompts=captions)
    z, t = torch.randn(4, *policy.latent_shape, generator=gen), torch.full((4,), 0.6)
    cond = policy.encode_prompts(captions[:4])

    i = model.config.dit_block
    seen = {}
    hook = policy.transformer.transformer_blocks[i - 1].register_forward_hook(lambda module, args, out: seen.update(tokens=out[1]))  # returns None: output kept
    with torch.no_grad():
        policy.transformer(hidden_states=z, timestep=1000 * t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled)
        head = model.head(z, t, cond)
    hook.remove()
    assert torch.allclose(head.flatten(2).transpose(1, 2), seen["tokens"], atol=1e-5)

    with torch.no_grad():
        values = model(z, t, captions[:4], cond)
        with pytest.raises(ValueError, match="reads the prompt.*cond=policy.encode_prompts"):
            model(z, t, captions[:4])
        other = policy.encode_prompts(captions[4:8])
        assert not torch.allclose(model(z, t, captions[:4], other), values)  # the head reads the prompt it is given
        model.save(tmp_path / "vm")
        loaded = StitchedValueModel.from_pretrained(tmp_path / "vm")
        assert loaded.config.head_conditioning == "prompt"
        assert torch.allclose(loaded(z, t, captions[:4], cond), values, atol=1e-6)


def test_stage_two_learning_rate_warms_up_then_holds_or_decays_to_zero():
    from stitchvm_rl.value.train import StitchTrainConfig, lr_factor

    cosine = StitchTrainConfig(warmup_steps=10, lr_schedule="cosine")
    constant = StitchTrainConfig(warmup_steps=10, lr_schedule="constant")
    assert [lr_factor(s, constant, 100) for s in (0, 4, 9, 50, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor(0, cosine, 100) == pytest.approx(0.1)  # warm-up applies to both
    assert lr_factor(50, cosine, 100) == pytest.approx(0.5)  # half-way down the half-cosine
    assert lr_factor(100, cosine, 100) == pytest.approx(0.0, abs=1e-12) and lr_factor(150, cosine, 100) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor(s, cosine, 100) >= lr_factor(s + 1, cosine, 100) for s in range(10, 100))


def test_compiling_the_repeated_blocks_keeps_values_gradients_and_state_dict_keys(toy_value):
    from stitchvm_rl import zoo

    model, _, captions = toy_value
    compiled = copy.deepcopy(model)
    blocks = len(model.head.blocks) + len(model.tail.layers)  # the text tower (cached prompts) stays eager
    # aot_eager: dynamo's capture and AOT autograd's forward / backward split without C++ codegen (fast
    # on CPU); on a GPU the default inductor backend runs the same graphs as fused kernels
    assert zoo.compile_repeated_blocks(compiled, backend="aot_eager") == blocks
    assert compiled.state_dict().keys() == model.state_dict().keys()  # saves and loads as before
    assert all(layer._compiled_call_impl is None for layer in compiled.text_model.encoder.layers)
    z, t = torch.randn(2, 16, 8, 8), torch.tensor([0.5, 0.8])
    values, grads = [], []
    for m in (model, compiled):
        zz = z.clone().requires_grad_(True)
        value = m(zz, t, captions[:2])
        (grad,) = torch.autograd.grad(value.sum(), zz)
        values.append(value.detach())
        grads.append(grad)
    assert torch.allclose(values[0], values[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_mean_embedding_target_keeps_the_norm_that_unit_drops_and_survives_save_load(tmp_path):
    # Same search, same weights: `unit` (the paper's) is the normalised `mean` embedding, and `mean`
    # starts near the clean embeddings' unit norm (embed_scale = their raw norm).
    gen = torch.Generator().manual_seed(0)
    captions = toyworld.random_captions(64, gen)
    images = toyworld.render(captions, gen)
    mean, _ = build_value_model("toyworld", "toyworld-clip", images, embed_target="mean")
    unit, _ = build_value_model("toyworld", "toyworld-clip", images)
    assert mean.config.embed_target == "mean" and mean.config.embed_scale > 0
    z, t = torch.randn(6, 16, 8, 8), torch.rand(6)
    with torch.no_grad():
        e_mean, e_unit = mean.embed(z, t)[0], unit.embed(z, t)[0]
        assert torch.allclose(torch.nn.functional.normalize(e_mean, dim=-1), e_unit, atol=1e-5)
        assert not torch.allclose(e_mean.norm(dim=-1), torch.ones(6), atol=1e-2)
        assert torch.allclose(mean(z, t, captions[:6]), (e_mean * mean.text_embeds(captions[:6])).sum(-1), atol=1e-6)
        loaded = StitchedValueModel.from_pretrained(mean.save(tmp_path / "vm"))
        assert loaded.config.embed_scale == mean.config.embed_scale
        assert torch.allclose(loaded(z, t, captions[:6]), mean(z, t, captions[:6]), atol=1e-6)


def test_distill_loss_is_eq_78_plus_the_score_term_of_eq_79():
    from stitchvm_rl.value.train import distill_loss

    student, teacher = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    batch = {"embeds": teacher, "tokens": torch.zeros(2, 3)}
    tokens = torch.full((2, 3), 0.5)
    # embedding: (1 + 1 + 0 + 1) / 2 = 1.5; tokens: 0.25; score = first coordinate: ((1 - 0)^2 + 0) / 2 = 0.5
    loss, parts = distill_loss(student, tokens, batch, token_weight=2.0)
    assert loss.item() == pytest.approx(1.5 + 2 * 0.25) and "loss_score" not in parts
    loss, parts = distill_loss(student, tokens, batch, token_weight=2.0, score=lambda e: e[:, 0], score_weight=4.0)
    assert loss.item() == pytest.approx(1.5 + 2 * 0.25 + 4 * 0.5) and parts["loss_score"] == pytest.approx(0.5)
