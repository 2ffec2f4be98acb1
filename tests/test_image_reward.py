"""ImageReward: the published checkpoint's layout converted into transformers' BLIP classes, checked
against the official package's own rewards on a tiny model (tests/data/image_reward_tiny, made by
tests/image_reward_official.py from image-reward 1.5 with only the sizes changed)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

from stitchvm_rl import rewards
from stitchvm_rl.evaluation import scorers
from stitchvm_rl.image_reward import ImageRewardScore, convert_image_reward

TINY = Path(__file__).parent / "data" / "image_reward_tiny"
REFERENCE = json.loads((TINY / "reference.json").read_text())


def tiny_config() -> BlipConfig:
    """The official tiny model's sizes (tests/data/image_reward_tiny/config.json)."""
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=16, layer_norm_eps=1e-6)
    text = BlipTextConfig(vocab_size=154, hidden_size=32, encoder_hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=64, layer_norm_eps=1e-12, is_decoder=True, bos_token_id=152)
    return BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("image_reward") / "converted"
    convert_image_reward(str(TINY / "ImageReward_tiny.pt"), str(out), str(TINY / "tokenizer"), tiny_config())
    return out


def test_the_converted_checkpoint_scores_as_the_official_package(converted):
    """Tokens, the PIL preprocessing, both towers and the head: every (prompt, image) reward of the
    official code to 1e-5 (its rewards differ from each other by 1e-2)."""
    scorer = scorers.Scorer("image_reward", image_reward=ImageRewardScore.from_pretrained(str(converted)))
    for prompt, tokens in REFERENCE["prompts"].items():
        ids, mask = scorer.image_reward.tokens([prompt])
        assert ids[0].tolist() == tokens["input_ids"] and mask[0].tolist() == tokens["attention_mask"]
    for row in REFERENCE["rewards"]:
        image = np.asarray(Image.open(TINY / "images" / row["image"]).convert("RGB"))
        ours = scorer(image[None], [row["prompt"]])[0]
        assert ours == pytest.approx(row["reward_single_call"], abs=1e-5), row


def test_the_pixel_reward_is_differentiable_and_refuses_an_unconverted_dir(converted, tmp_path):
    reward = rewards.build_reward("image_reward", {"image_reward": str(converted)})
    images = torch.rand(2, 3, 224, 224, requires_grad=True)
    reward(images, ["a red apple", "two dogs"], grad=True).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="kind=image_reward"):
        ImageRewardScore.from_pretrained(str(tmp_path))
