
import copy
import dataclasses
import json
import math

import pytest
import torch
from transformers import CLIPModel

from stitchvm_rl import convert, rewards, toyworld, zoo


@pytest.fixture(scope="module")
def tiny_clip():
    return rewards.CLIPScore.from_pretrained("tiny-clip")


def test_clip_score_is_the_cosine_clip_itself_computes(tiny_clip):
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a red circle on the left", "a blue square on the right", "a green triangle on the left"]
    model, bundle = tiny_clip.bundle.model, tiny_clip.bundle
    tok = bundle.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
    pixels = (images - bundle.image_mean.view(1, 3, 1, 1)) / bundle.image_std.view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels).logits_per_image
    expected = logits.diag() / model.logit_scale.exp()
    assert torch.allclose(tiny_clip(images, prompts), expected, atol=1e-5)
    assert torch.allclose(rewards.CLIPScore(bundle, scale=2.5)(images, prompts), 2.5 * expected, atol=1e-5)


def test_rewards_are_no_grad_by_default_and_differentiable_when_asked(tiny_clip):
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    prompts = ["a red circle on the left"] * 2
    assert not tiny_clip(images, prompts).requires_grad
    tiny_clip(images, prompts, grad=True).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    for fn in rewards.ANALYTIC.values():
        assert not fn(images, prompts).requires_grad
        assert fn(images, prompts, grad=True).requires_grad


def test_clip_pixels_resizes_and_centre_crops(tiny_clip):
    wide = torch.rand(1, 3, 64, 96)
    assert rewards.clip_pixels(wide, tiny_clip.bundle).shape == (1, 3, 32, 32)
    flat = torch.full((1, 3, 64, 64), 0.5)
    expected = (0.5 - tiny_clip.bundle.image_mean) / tiny_clip.bundle.image_std
    assert torch.allclose(rewards.clip_pixels(flat, tiny_clip.bundle)[0, :, 5, 5], expected, atol=1e-5)


def test_analytic_rewards():
    red = toyworld.render(["a red square on the left"], torch.Generator().manual_seed(0))
    blue = toyworld.render(["a blue square on the left"], torch.Generator().manual_seed(0))
    assert rewards.redness(red) > rewards.redness(blue)
    assert rewards.brightness(torch.ones(1, 3, 4, 4)).item() == pytest.approx(1.0)
    caption = ["a red square on the left"]
    assert rewards.colour_match(red, caption) > rewards.colour_match(blue, caption)
    # non-linear in the pixels: the score of a mean image is not the mean of the scores
    mixed = rewards.colour_match((red + blue) / 2, caption)
    assert not torch.allclose(mixed, (rewards.colour_match(red, caption) + rewards.colour_match(blue, caption)) / 2, atol=1e-3)


def test_exact_colour_scores_only_the_exact_colour():
    caption = ["a red square on the left"]
    exact = torch.tensor(toyworld.COLOURS["red"]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    off = exact + 0.1  # 0.17 away in RGB: colour_match keeps exp(-0.03 / 0.125), exact_colour exp(-0.03 / 0.005)
    assert rewards.exact_colour(exact, caption).item() == pytest.approx(10.0)
    assert rewards.exact_colour(off, caption).item() == pytest.approx(10 * math.exp(-6), rel=1e-4)
    assert rewards.colour_match(off, caption).item() == pytest.approx(10 * math.exp(-0.24), rel=1e-4)


def test_the_networks_behind_a_weighted_reward(tiny_clip):
    total = rewards.WeightedReward({"clip": (tiny_clip, 1.0), "red": (rewards.redness, 1.0)})
    assert total.models() == [tiny_clip.bundle.model]  # analytic parts hold none


def test_weighted_sum(tiny_clip):
    images, prompts = torch.rand(2, 3, 32, 32), ["a red circle on the left"] * 2
    total = rewards.WeightedReward({"clip": (tiny_clip, 2.0), "red": (rewards.redness, -1.0)})
    assert torch.allclose(total(images, prompts), 2 * tiny_clip(images, prompts) - rewards.redness(images), atol=1e-6)
    built = rewards.build_rewards({"tiny_clip": 1.0, "brightness": 0.5})
    assert set(built.components(images, prompts)) == {"tiny_clip", "brightness"}


def test_unknown_and_unconverted_rewards_name_the_fix():
    with pytest.raises(ValueError, match="unknown reward 'clipscor'"):
        rewards.build_reward("clipscor")
    with pytest.raises(FileNotFoundError, match="convert_weights.py kind=hpsv2"):
        rewards.build_reward("hpsv2")
    with pytest.raises(FileNotFoundError, match="kind=aesthetic"):
        rewards.build_reward("aesthetic")
    with pytest.raises(ValueError, match="no reward given"):
        rewards.build_rewards({})


def _to_open_clip(state: dict) -> dict:
    """The inverse of convert.open_clip_to_transformers: how an OpenCLIP ViT checkpoint stores CLIP."""
    out = {
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": state["visual_projection.weight"].T,
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "text_projection": state["text_projection.weight"].T,
        "logit_scale": state["logit_scale"],
    }
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"), ("ln_final", "text_model.final_layer_norm")):
        out[a + ".weight"], out[a + ".bias"] = state[b + ".weight"], state[b + ".bias"]
    for src, dst in (("vision_model.encoder.layers", "visual.transformer.resblocks"), ("text_model.encoder.layers", "transformer.resblocks")):
        i = 0
        while f"{src}.{i}.layer_norm1.weight" in state:
            s, d = f"{src}.{i}.", f"{dst}.{i}."
            out[d + "attn.in_proj_weight"] = torch.cat([state[s + f"self_attn.{p}_proj.weight"] for p in "qkv"])
            out[d + "attn.in_proj_bias"] = torch.cat([state[s + f"self_attn.{p}_proj.bias"] for p in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[d + a + ".weight"], out[d + a + ".bias"] = state[s + b + ".weight"], state[s + b + ".bias"]
            i += 1
    return {"state_dict": {"module." + k: v.clone() for k, v in out.items()}}


def _open_clip_config(path, quick_gelu: bool, vision_heads: int = 2, text_heads: int = 2) -> None:
    """The open_clip_config.json an OpenCLIP hub repo ships beside its weights, for the tiny CLIP."""
    model_cfg = {"embed_dim": 32, "quick_gelu": quick_gelu, "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "head_width": 32 // vision_heads, "patch_size": 8}, "text_cfg": {"width": 32, "heads": text_heads, "layers": 4}}
    path.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {"mean": zoo.CLIP_MEAN, "std": zoo.CLIP_STD}}))


def test_open_clip_checkpoint_converts_to_an_equal_transformers_model_with_its_shipped_activation(tmp_path, tiny_clip):
    model = tiny_clip.bundle.model
    assert model.config.vision_config.hidden_act == "quick_gelu"  # as DFN5B-CLIP's
    torch.save(_to_open_clip(model.state_dict()), tmp_path / "dfn.bin")
    _open_clip_config(tmp_path / "open_clip_config.json", quick_gelu=True)
    # a config that says GELU (as zoo_configs/clip_vit_h14_378.json once did): the shipped file decides
    gelu = copy.deepcopy(model.config)
    gelu.text_config.hidden_act = gelu.vision_config.hidden_act = "gelu"
    out = convert.convert_open_clip(str(tmp_path / "dfn.bin"), gelu, str(tmp_path / "dfn"), tokenizer="tiny-clip")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    converted = rewards.CLIPScore.from_pretrained(str(out))
    assert converted.bundle.model.config.vision_config.hidden_act == "quick_gelu"
    images, prompts = torch.rand(2, 3, 32, 32), ["a red circle on the left", "a cyan square on the right"]
    assert torch.allclose(converted(images, prompts), tiny_clip(images, prompts), atol=1e-6)
    # what the shipped file says and the weights cannot show must match: the activation, the head counts
    with pytest.raises(ValueError, match="architecture 'ViT-H-14' uses gelu but the open_clip_config.json beside .* says quick_gelu"):
        convert.convert_open_clip(str(tmp_path / "dfn.bin"), gelu, str(tmp_path / "x"), tokenizer="tiny-clip", architecture="ViT-H-14")
    _open_clip_config(tmp_path / "open_clip_config.json", quick_gelu=True, text_heads=4)
    with pytest.raises(ValueError, match="gives text_cfg 4 attention heads, the architecture 2"):
        convert.convert_open_clip(str(tmp_path / "dfn.bin"), gelu, str(tmp_path / "x"), tokenizer="tiny-clip")
    (tmp_path / "bad").mkdir()
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, tmp_path / "bad" / "bad.pt")
    with pytest.raises(KeyError):
        convert.convert_open_clip(str(tmp_path / "bad" / "bad.pt"), model.config, str(tmp_path / "bad" / "out"), tokenizer="tiny-clip", architecture="ViT-H-14-quickgelu")


def test_open_clip_activation_comes_from_a_known_name_or_is_refused(tmp_path, tiny_clip):
    # HPSv2 ships a lone .pt of OpenCLIP's ViT-H-14: plain GELU
    gelu = copy.deepcopy(tiny_clip.bundle.model.config)
    gelu.text_config.hidden_act = gelu.vision_config.hidden_act = "gelu"
    original = CLIPModel(gelu).eval()
    original.load_state_dict(tiny_clip.bundle.model.state_dict())
    torch.save(_to_open_clip(original.state_dict()), tmp_path / "hps.pt")
    out = convert.convert_open_clip(str(tmp_path / "hps.pt"), tiny_clip.bundle.model.config, str(tmp_path / "hps"), tokenizer="tiny-clip", architecture="ViT-H-14")
    images, prompts = torch.rand(2, 3, 32, 32), ["a red circle on the left", "a cyan square on the right"]
    assert torch.allclose(rewards.CLIPScore.from_pretrained(str(out))(images, prompts), rewards.CLIPScore(dataclasses.replace(tiny_clip.bundle, model=original))(images, prompts), atol=1e-6)
    # the published kinds: HPSv2 is ViT-H-14 when nothing ships beside it; DFN reads its shipped file
    config, name = convert.kind_architecture("hpsv2", tmp_path / "hps.pt")
    assert name == "ViT-H-14" and convert.open_clip_activation(tmp_path / "hps.pt", name) == "gelu" and config.vision_config.image_size == 224
    (tmp_path / "dfn").mkdir(exist_ok=True)
    _open_clip_config(tmp_path / "dfn" / "open_clip_config.json", quick_gelu=True)
    config, name = convert.kind_architecture("dfn_clip", tmp_path / "dfn" / "open_clip_pytorch_model.bin")
    assert name == "" and config.vision_config.image_size == 378
    assert convert.open_clip_activation(tmp_path / "dfn" / "open_clip_pytorch_model.bin", name) == "quick_gelu"
    # neither a shipped file nor a known name: refused, never guessed
    with pytest.raises(ValueError, match="cannot tell whether .* uses GELU or QuickGELU"):
        convert.convert_open_clip(str(tmp_path / "hps.pt"), gelu, str(tmp_path / "x"), tokenizer="tiny-clip")
    with pytest.raises(ValueError, match="unknown OpenCLIP architecture 'ViT-H-14-378'; .* did you mean 'ViT-H-14-378-quickgelu'"):
        convert.convert_open_clip(str(tmp_path / "hps.pt"), gelu, str(tmp_path / "x"), tokenizer="tiny-clip", architecture="ViT-H-14-378")
    assert not (tmp_path / "x").exists()


def test_pickscore_is_its_checkpoints_logit_scale_times_the_cosine_over_26(tmp_path, monkeypatch):
    model, tokenizer = zoo.random_clip(zoo.CLIPSizes())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))  # not CLIP's clamp of 100, so a hard-coded 100 shows
    zoo.save_clip(model, tokenizer, tmp_path / "pickscore")
    # the published spec, with this model as its source and its own tokenizer (offline)
    spec = dataclasses.replace(rewards.PUBLISHED["pickscore"], source=str(tmp_path / "pickscore"), tokenizer=None)
    monkeypatch.setitem(rewards.PUBLISHED, "pickscore", spec)
    images, prompts = torch.rand(2, 3, 32, 32), ["a red circle on the left", "a cyan square on the right"]
    cosine = rewards.CLIPScore.from_pretrained(str(tmp_path / "pickscore"))(images, prompts)
    assert torch.allclose(rewards.build_reward("pickscore")(images, prompts), 50.0 / 26 * cosine, atol=1e-5)


def test_aesthetic_head_converts_and_scores(tmp_path, tiny_clip):
    head = rewards.AestheticMLP(dim=32)
    torch.save(head.state_dict(), tmp_path / "aes.pth")
    out = convert.convert_aesthetic(str(tmp_path / "aes.pth"), str(tmp_path / "aes.safetensors"))
    scorer = rewards.AestheticScore.from_pretrained("tiny-clip", str(out))
    images = torch.rand(2, 3, 32, 32)
    expected = head.eval()(tiny_clip.image_embeds(images))
    assert torch.allclose(scorer(images, ["", ""]), expected, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="must be an existing .safetensors"):
        rewards.AestheticScore.from_pretrained("tiny-clip", str(tmp_path / "aes.pth"))
