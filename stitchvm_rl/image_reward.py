"""ImageReward (Xu et al. 2023, THUDM/ImageReward): a BLIP preference model, in transformers' BLIP classes.

    image  -> BLIP ViT-L/16 (224 px)                       -> patch states (B, 197, 1024)
    prompt -> BERT-base with cross-attention to them         -> the [CLS] state (B, 768)
           -> MLP 768-1024-128-64-16-1 (no activations)      -> (x - 0.16717) / 1.03334

The published ImageReward.pt (a pickled state dict of `blip.visual_encoder.*`, `blip.text_encoder.*`
and `mlp.layers.*`) is converted once (`python jobs/convert_weights.py kind=image_reward`) into a
directory: config.json (a transformers BlipConfig), model.safetensors and its BERT tokenizer (with
BLIP's [DEC] and [ENC] tokens, as the reference adds them). Preprocessing follows the reference:
PIL bicubic resize of the short side to 224, centre crop, CLIP mean and std; the prompt padded to 35
tokens, [CLS] first.

`ImageRewardScore(images [0, 1] NCHW, prompts, grad)` is the differentiable pixel reward (the
resize in torch, as `rewards.clip_pixels`); the evaluation scores saved images with the PIL pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BertTokenizer, BlipConfig, BlipTextConfig, BlipVisionConfig, BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from stitchvm_rl import rewards, zoo

REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's normalisation
MAX_LENGTH = 35
WEIGHTS = "model.safetensors"
CLIP_MEAN, CLIP_STD = zoo.CLIP_MEAN, zoo.CLIP_STD


def published_config() -> BlipConfig:
    """ImageReward's BLIP: ViT-L/16 at 224 (LayerNorm eps 1e-6) and BLIP's med_config BERT-base."""
    vision = BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=16, layer_norm_eps=1e-6)
    text = BlipTextConfig(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          max_position_embeddings=512, layer_norm_eps=1e-12, is_decoder=True)
    return BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())


class ImageRewardModel(torch.nn.Module):
    """The network: `model(pixel_values, input_ids, attention_mask) -> (B,) normalised rewards`."""

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.vision = BlipVisionModel(config.vision_config)
        self.text = BlipTextModel(config.text_config, add_pooling_layer=False)  # is_decoder: every layer cross-attends
        self.mlp = rewards.AestheticMLP(config.text_config.hidden_size)  # the same 5-layer head, keys mlp.layers.{0,2,4,6,7}

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        image = self.vision(pixel_values=pixel_values).last_hidden_state
        # every image state is attended to (the reference's all-ones mask; None skips building it)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image, encoder_attention_mask=None)
        return (self.mlp(text.last_hidden_state[:, 0].float()) - REWARD_MEAN) / REWARD_STD


def blip_tokenizer(source: str) -> BertTokenizer:
    """A BERT tokenizer with BLIP's [DEC] (bos) and [ENC] tokens added, as ImageReward's init_tokenizer."""
    tokenizer = BertTokenizer.from_pretrained(zoo.resolve(source))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def save_image_reward(model: ImageRewardModel, tokenizer: BertTokenizer, path: str | Path, source: str = "") -> None:
    """The converted directory: config.json, model.safetensors, the tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS), metadata={"source": source})
    tokenizer.save_pretrained(path)


class ImageRewardScore:
    """ImageReward as a reward: `score(images [0, 1] NCHW, prompts, grad=False) -> (B,)`; `score.pixel_rewards`
    takes preprocessed pixel values (the evaluation's PIL pipeline)."""

    def __init__(self, model: ImageRewardModel, tokenizer: BertTokenizer):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.image_size = model.config.vision_config.image_size
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(cls, source: str, device: str = "cpu", dtype: str = "float32") -> ImageRewardScore:
        path = Path(zoo.resolve(source))
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"'{source}' holds no {WEIGHTS}; convert the published ImageReward.pt once with `python jobs/convert_weights.py kind=image_reward checkpoint=ImageReward.pt out=<dir>`")
        model = ImageRewardModel(BlipConfig.from_pretrained(path))
        model.load_state_dict(load_file(str(path / WEIGHTS)))
        model = model.to(device, zoo.DTYPES[dtype])
        model.mlp.float()  # the head reads the float32 [CLS] state, as the reference's .float()
        return cls(model, BertTokenizer.from_pretrained(path))

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) padded to 35 tokens, each prompt tokenised once."""
        for p in dict.fromkeys(prompts):
            if p not in self._text_cache:
                tok = self.tokenizer(p, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
                self._text_cache[p] = (tok.input_ids[0], tok.attention_mask[0])
        device = self.model.mlp.layers[0].weight.device
        ids, mask = zip(*(self._text_cache[p] for p in prompts))
        return torch.stack(ids).to(device), torch.stack(mask).to(device)

    def pixel_rewards(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokens(prompts)
        param = self.model.mlp.layers[0].weight
        return self.model(pixel_values.to(param.device, next(self.model.vision.parameters()).dtype), ids, mask)

    def __call__(self, images: torch.Tensor, prompts: list[str], grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return self.pixel_rewards(rewards.resize_crop_normalise(images, self.image_size, CLIP_MEAN, CLIP_STD), prompts)


# ---------------------------------------------------------------- conversion of the published checkpoint
def _vision_key(key: str) -> str:
    """blip.visual_encoder.* (BLIP's timm-style ViT) -> transformers BlipVisionModel keys."""
    key = key.removeprefix("blip.visual_encoder.")
    for a, b in (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"), ("patch_embed.proj", "embeddings.patch_embedding"),
                 ("blocks.", "encoder.layers."), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection")):
        key = key.replace(a, b)
    return "post_layernorm" + key.removeprefix("norm") if key.startswith("norm.") else key


def published_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt's keys -> ImageRewardModel's; the unused ITC projections and position ids dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            out["vision." + _vision_key(key)] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            out["text." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            out[key] = value
    return out


def convert_image_reward(checkpoint: str, out_dir: str, tokenizer: str, config: BlipConfig | None = None) -> Path:
    """ImageReward.pt -> a converted directory (`ImageRewardScore.from_pretrained` loads it)."""
    from stitchvm_rl.convert import load_trusted_checkpoint

    model = ImageRewardModel(config or published_config())
    state = published_to_ours(load_trusted_checkpoint(checkpoint))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"'{checkpoint}' is not an ImageReward checkpoint of this architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tok = blip_tokenizer(tokenizer)
    if len(tok) != model.config.text_config.vocab_size:
        raise ValueError(f"tokenizer '{tokenizer}' has {len(tok)} tokens with [DEC] and [ENC], the checkpoint {model.config.text_config.vocab_size}; pass bert-base-uncased (or a local copy)")
    return zoo.write_dir_atomically(Path(out_dir), lambda tmp: save_image_reward(model, tok, tmp, Path(checkpoint).name), overwrite=True)


def save_tiny_image_reward(path: str | Path) -> None:
    """A tiny random ImageReward with a small BERT vocabulary, built offline: for tests and the toy world."""
    from stitchvm_rl.zoo import TOY_WORDS

    torch.manual_seed(0)
    vocab = Path(path) / "vocab.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TOY_WORDS, "photo", "of", "and", *"bcdefghijklmnopqrstuvwxyz", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    vocab.write_text("\n".join(dict.fromkeys(words)) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, layer_norm_eps=1e-6)
    text = BlipTextConfig(vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=64, is_decoder=True, bos_token_id=len(tokenizer) - 2)
    model = ImageRewardModel(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    with torch.no_grad():  # BLIP's small init leaves the reward nearly blind to the image: draw every matrix at 1/sqrt(fan in)
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5)
    save_image_reward(model, tokenizer, path, "tiny random")
