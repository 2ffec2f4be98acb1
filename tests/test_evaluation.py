"""Evaluation parts without Ray: suites, scorers (reference preprocessing and scores on tiny CLIPs), tables."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from stitchvm_rl import rewards, toyworld, zoo
from stitchvm_rl.config import ConfigError
from stitchvm_rl.evaluation import results, scorers, suites


def test_drawbench_ships_its_200_prompts_in_11_categories():
    suite = suites.load_suite("drawbench")
    categories = {p.category for p in suite.prompts}
    assert len(suite.prompts) == 200 and len(categories) == 11
    assert suite.prompts[0].prompt == "A red colored car." and sum(p.category == "Reddit" for p in suite.prompts) == 38
    assert (suite.protocol.num_steps, suite.protocol.cfg_scale, suite.protocol.resolution) == (40, 1.0, 512)


def test_geneval_ships_its_553_prompts_with_their_metadata():
    suite = suites.load_suite("geneval")
    tasks = {t: sum(p.category == t for p in suite.prompts) for t in ("single_object", "two_object", "counting", "colors", "position", "color_attr")}
    assert len(suite.prompts) == 553 and tasks == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}
    counting = next(p for p in suite.prompts if p.category == "counting")
    assert counting.metadata["exclude"][0]["count"] == counting.metadata["include"][0]["count"] + 1


def test_a_jsonl_suite_keeps_metadata_and_refuses_a_bad_line(tmp_path):
    good = tmp_path / "geneval.jsonl"
    good.write_text('{"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}\n\n{"prompt": "two dogs"}\n')
    suite = suites.load_suite(str(good))
    assert [p.prompt for p in suite.prompts] == ["a photo of a cat", "two dogs"] and [p.index for p in suite.prompts] == [0, 1]
    assert suite.prompts[0].metadata == {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ConfigError, match="line 2"):
        suites.load_suite(str(bad))
    with pytest.raises(ConfigError, match="did you mean 'drawbench'"):
        suites.load_suite("drawbenhc")


# ---------------------------------------------------------------- preprocessing
def _images(h: int, w: int, n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h, w", [(64, 64), (48, 80), (100, 60)])
def test_torchvision_pipeline_matches_transformers_processor_where_they_agree(h, w):
    """Both resize the short side with PIL bicubic and truncate the long one; with an even crop margin
    the crops agree too, so the two reference pipelines give the same pixels."""
    bundle = zoo.load_clip("tiny-clip")
    images = _images(h, w)
    hf = scorers.hf_processor(bundle)(images=[Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
    ours = scorers.torchvision_pixels(images, bundle.image_size, bundle.image_mean.tolist(), bundle.image_std.tolist())
    assert ours.shape == hf.shape == (3, 3, 32, 32)
    assert torch.allclose(ours, hf, atol=1e-5)


def test_torchvision_crop_rounds_an_odd_margin_as_torchvision_does():
    """A 32 x 35 image keeps its size (short side already 32): torchvision's CenterCrop starts at
    round(3 / 2) = 2, transformers' at 3 // 2 = 1 -- the open_clip scorers must take torchvision's."""
    image = _images(32, 35, n=1)
    ours = scorers.torchvision_pixels(image, 32, [0.0] * 3, [1.0] * 3)
    expected = torch.from_numpy(image[0, :, 2:34].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(ours[0], expected)


def test_dfn_clip_squashes_the_whole_image_as_open_clip_does_for_dfn5b():
    """open_clip's DFN5B pretrained config: resize_mode="squash" -- the whole image resized to the
    square, no crop (a crop would drop the sides of a wide image)."""
    image = _images(40, 64, n=1)
    ours = scorers.torchvision_pixels(image, 32, [0.0] * 3, [1.0] * 3, squash=True)
    expected = np.asarray(Image.fromarray(image[0]).resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    assert torch.equal(ours[0], torch.from_numpy(expected).permute(2, 0, 1))
    assert scorers.SCORERS["dfn_clip"].preprocess == "squash" and scorers.SCORERS["hpsv21"].preprocess == "torchvision"


# ---------------------------------------------------------------- scores on tiny CLIPs
@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    """Every CLIP-based scorer pointed at the tiny CLIP, and a random aesthetic MLP file."""
    head = tmp_path_factory.mktemp("aesthetic") / "head.safetensors"
    torch.manual_seed(0)
    save_file(rewards.AestheticMLP(zoo.load_clip("tiny-clip").model.config.projection_dim).state_dict(), str(head))
    tiny = zoo.resolve("tiny-clip")
    return {name: tiny for name in scorers.SCORERS if scorers.SCORERS[name].source} | {scorers.HEAD_SOURCE: str(head)}


@pytest.mark.parametrize("name", ["hpsv2", "hpsv21", "pickscore", "aesthetic", "dfn_clip", "clipscore", "toy_clip"])
def test_every_scorer_loads_and_scores_as_its_reference_defines(name, tiny_sources):
    """Loaded through the real path (a model directory), each score is recomputed here from CLIP's
    own full forward pass (logits_per_image / exp(logit_scale) is the cosine)."""
    scorers.check_scorers([name], tiny_sources)
    scorer = scorers.Scorer.load(name, tiny_sources)
    images, prompts = _images(40, 56, n=4, seed=1), ["a red circle on the left", "a blue square", "a green triangle", "a cyan circle on the right"]
    got = scorer(images, prompts)
    bundle = scorer.clip.bundle
    pixels = scorer.pixels(images)
    tokens = bundle.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = bundle.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
        cos = (out.logits_per_image.diagonal() / bundle.model.logit_scale.exp()).double().numpy()
        head = scorer.head(torch.nn.functional.normalize(out.image_embeds, dim=-1)) if name == "aesthetic" else None
    if name == "aesthetic":
        expected = head.double().numpy()
    elif name == "pickscore":
        expected = bundle.model.logit_scale.exp().item() * cos
    elif name == "clipscore":
        expected = 100 * np.maximum(cos, 0)
    else:
        expected = cos
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    reference_pipeline = {"pickscore": "hf", "clipscore": "hf", "toy_clip": "hf", "dfn_clip": "squash"}.get(name, "torchvision")
    assert scorers.SCORERS[name].preprocess == reference_pipeline


def test_caption_scorer_counts_images_that_match_their_caption():
    captions = ["a red circle on the left", "a blue square on the right", "a green triangle on the left"]
    images = toyworld.render(captions, torch.Generator().manual_seed(0))
    uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    scorer = scorers.Scorer.load("caption")
    assert scorer(uint8, captions).tolist() == [1.0, 1.0, 1.0]
    assert scorer(uint8, captions[1:] + captions[:1]).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "names, sources, message",
    [
        (["hpsv3"], {}, "did you mean 'hpsv2'"),
        (["hpsv21"], {}, "convert_weights.py kind=hpsv2"),
        (["geneval"], {}, "convert_weights.py kind=geneval_detector"),
        (["geneval"], {"geneval": "tiny-mask2former"}, "scorer 'geneval_clip': 'openai/clip-vit-large-patch14' is not in the hub cache"),
        (["geneval"], {"geneval": "facebook/mask2former-swin-small-coco-instance", "geneval_clip": "tiny-clip"}, "scorer 'geneval': 'facebook/mask2former-swin-small-coco-instance' is not in the hub cache"),
        (["image_reward"], {}, "convert_weights.py kind=image_reward"),
        (["aesthetic"], {"aesthetic": "tiny-clip"}, "scorer_sources.aesthetic_head"),
        (["clipscore"], {}, "not in the hub cache"),
        (["clipscore"], {"clipscore": "/no/such/dir"}, "neither an existing directory"),
        ([], {}, "none given"),
    ],
)
def test_scorers_without_weights_are_refused_before_loading(names, sources, message, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # weights/... resolve to nothing
    with pytest.raises(ConfigError, match=message):
        scorers.check_scorers(names, sources)


# ---------------------------------------------------------------- tables
def _record(policy, index, scores, category=""):
    return {"policy": policy, "index": index, "category": category, "scores": {"s": scores}}


def test_table_averages_images_per_prompt_then_pairs_prompts():
    records = [
        _record("a", 0, [1.0, 3.0], "x"), _record("a", 1, [4.0, 4.0], "y"), _record("a", 2, [0.0, 2.0], "y"),
        _record("b", 0, [3.0, 3.0], "x"), _record("b", 1, [5.0, 7.0], "y"), _record("b", 2, [1.0, 1.0], "y"),
    ]
    table = results.build_table(records, ["a", "b"], ["s"])
    a = table["scores"]["a"]["s"]  # prompt means 2, 4, 1
    assert a["mean"] == pytest.approx(7 / 3) and a["se"] == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3)) and a["prompts"] == 3
    d = table["paired"]["b - a"]["s"]  # differences 1, 2, 0
    assert d["mean"] == pytest.approx(1.0) and d["se"] == pytest.approx(1 / math.sqrt(3))
    assert table["by_category"]["b"]["y"]["s"]["mean"] == pytest.approx(3.5)
    with_baseline = results.build_table(records[3:], ["b"], ["s"], baseline=("base", records[:3]))
    assert with_baseline["paired"]["b - base"]["s"]["mean"] == pytest.approx(1.0)
    markdown = results.to_markdown(table, ["s"], "t")
    assert "| b - a | +1.000 ± 0.577 |" in markdown and "| a | 2.333 ± 0.882 |" in markdown


def test_a_torn_last_line_is_dropped():
    text = json.dumps(_record("a", 0, [1.0])) + "\n" + '{"policy": "a", "ind'
    assert results.done_keys(results.read_records(text)) == {("a", 0)}


# ---------------------------------------------------------------- values on noisy latents
def test_retrieval_and_preference_count_what_they_claim():
    from stitchvm_rl.evaluation import noisy

    # 3 images of captions [0, 1, 1], 2 captions: V picks caption 0 for images 0 and 2, caption 1 for image 1
    values = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.95, 0.6]])
    own = torch.tensor([0, 1, 1])
    got = noisy.retrieval(values, own)
    assert got["latent_to_caption"] == pytest.approx(2 / 3)  # image 2 goes wrong
    assert got["caption_to_latent"] == 0.5  # caption 0 -> image 2 (wrong), caption 1 -> image 1
    # the clean reward orders pairs (0,1), (0,2), (1,2) under each caption; one tie (caption 1: images
    # 1 and 2) is left out, and V gets caption 0's (0, 2) wrong: 4 of 5
    clean = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 1.0]])
    assert noisy.preference(values, clean) == pytest.approx(4 / 5)


def test_the_value_matrix_pairs_every_latent_with_every_caption():
    from stitchvm_rl.evaluation import noisy

    class Probe:  # V(z, caption) = 10 * latent id + caption length: readable from the matrix
        def score(self, name, z, sigma, prompts, mc_k, seed):
            return z.flatten(1)[:, 0] * 10 + torch.tensor([len(p) for p in prompts], dtype=torch.float)

    z = torch.arange(3.0).view(3, 1, 1, 1)
    matrix = noisy.value_matrix(Probe(), "stitchvm", z, 0.5, ["a", "bbb"], mc_k=1, seed=0)
    assert matrix.tolist() == [[1.0, 3.0], [11.0, 13.0], [21.0, 23.0]]
