import json
import os
from pathlib import Path

import pytest
import torch

from stitchvm_rl import zoo


def test_tiny_models_build_once_and_load_through_from_pretrained():
    path = Path(zoo.resolve("tiny-sd3"))
    assert (path / "model_index.json").is_file()
    assert (path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(path.rglob("*.bin"))  # safetensors only
    stamp = os.path.getmtime(path / "model_index.json")
    assert zoo.resolve("tiny-sd3") == str(path) and os.path.getmtime(path / "model_index.json") == stamp
    pipe = zoo.load_sd3_pipeline("tiny-sd3")
    assert pipe.transformer.config.in_channels == 16 and pipe.transformer.config.num_layers == 2
    clip = zoo.load_clip("tiny-clip")
    assert clip.image_size == 32 and (Path(zoo.resolve("tiny-clip")) / "model.safetensors").is_file()


def test_whole_word_tokenizers():
    from stitchvm_rl.toyworld import CAPTIONS

    clip_tok = zoo.word_clip_tokenizer(zoo.TOY_WORDS, 8)
    t5_tok = zoo.word_t5_tokenizer(zoo.TOY_WORDS, 8)
    for caption in CAPTIONS:
        ids = clip_tok(caption).input_ids
        assert len(ids) == 8 and ids[0] == 0 and ids[-1] == 1  # BOS, one token per word, EOS
        assert clip_tok.decode(ids, skip_special_tokens=True).strip() == caption
        assert len(t5_tok(caption).input_ids) == 7
    assert len(clip_tok("a purple blob").input_ids) > 5  # unknown words still encode, byte by byte


def test_published_configs_instantiate_on_meta_with_their_parameter_counts():
    counts = {
        "sd35_medium_transformer": 2_243_171_520,
        "sd35_medium_vae": 83_819_683,
        "clip_vit_l14_336": 427_944_193,
    }
    for name, count in counts.items():
        model = zoo.meta_model(name)
        assert all(p.device.type == "meta" for p in model.parameters())
        assert zoo.count_params(model) == count, name
    sd35 = zoo.meta_model("sd35_medium_transformer")
    assert len(sd35.transformer_blocks) == 24 and sd35.config.caption_projection_dim == 1536
    # a meta forward of a 1024^2 latent wires up (shapes only, no compute)
    with torch.device("meta"):
        out = sd35(
            hidden_states=torch.empty(1, 16, 128, 128),
            timestep=torch.empty(1),
            encoder_hidden_states=torch.empty(1, 333, 4096),
            pooled_projections=torch.empty(1, 2048),
        ).sample
    assert out.shape == (1, 16, 128, 128)


def test_published_clip_configs_have_the_activation_of_their_open_clip_models():
    # OpenAI's CLIP and DFN5B-CLIP (ViT-H-14-378-quickgelu) use QuickGELU; HPSv2's ViT-H-14 (LAION) plain GELU
    expected = {"clip_vit_l14_336": "quick_gelu", "clip_vit_h14": "gelu", "clip_vit_h14_378": "quick_gelu"}
    for name, act in expected.items():
        config = zoo.clip_config(name)
        assert (config.text_config.hidden_act, config.vision_config.hidden_act) == (act, act), name


@pytest.mark.parametrize(
    "source, message",
    [
        ("/no/such/dir", "neither an existing directory nor a hub id"),
        ("./relative/missing", "neither an existing directory nor a hub id"),
        ("tiny_clip", "did you mean 'tiny-clip'?"),
    ],
)
def test_bad_sources_fail_early_with_the_fix(source, message):
    with pytest.raises(zoo.ModelSourceError, match=message):
        zoo.resolve(source)


def test_a_file_or_a_non_pipeline_directory_is_refused(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(zoo.ModelSourceError, match="is a file"):
        zoo.resolve(str(tmp_path / "weights.safetensors"))
    with pytest.raises(zoo.ModelSourceError, match="no model_index.json"):
        zoo.load_sd3_pipeline(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(zoo.ModelSourceError, match="not a loadable SD3 pipeline"):
        zoo.load_sd3_pipeline(str(broken))
    with pytest.raises(zoo.ModelSourceError, match="not a loadable SD3 transformer"):
        zoo.load_sd3_transformer(str(broken))


def test_single_components_load_without_the_rest():
    pipe = zoo.load_sd3_pipeline("tiny-sd3")
    transformer = zoo.load_sd3_transformer("tiny-sd3")
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), transformer.state_dict().items()):
        assert torch.equal(a, b), name
    assert zoo.vae_config("tiny-sd3")["sample_size"] == pipe.vae.config.sample_size
    assert not any(p.requires_grad for p in zoo.load_vae("tiny-sd3").parameters())


def test_hub_ids_are_passed_to_the_hub_and_fail_clearly_offline():
    assert zoo.resolve(zoo.SD35_MEDIUM) == zoo.SD35_MEDIUM
    with pytest.raises(zoo.ModelSourceError, match="download it first"):
        zoo.load_clip("openai/clip-vit-large-patch14")  # HF_HUB_OFFLINE=1 in tests: never reaches out


def test_write_dir_atomically_never_leaves_a_half_written_directory(tmp_path):
    def broken(tmp):
        (tmp / "part").write_text("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        zoo.write_dir_atomically(tmp_path / "model", broken)
    assert not (tmp_path / "model").exists() and list(tmp_path.iterdir()) == []
    zoo.write_dir_atomically(tmp_path / "model", lambda tmp: (tmp / "v").write_text("1"))
    with pytest.raises(RuntimeError):
        zoo.write_dir_atomically(tmp_path / "model", broken, overwrite=True)
    assert (tmp_path / "model" / "v").read_text() == "1"  # the previous complete version survives
