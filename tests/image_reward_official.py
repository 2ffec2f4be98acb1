"""TINY reference outputs of the official ImageReward package (PyPI image-reward 1.5).

Builds the official `ImageReward` model from the unmodified package code with only
*sizes* changed (ViT 'large' -> 32-wide/2-deep ViT, 32-wide/2-layer BERT, small
WordPiece vocab, MLP head input 32), randomly initialises it, saves its state_dict
and records official rewards. Nothing is downloaded.
Made tests/data/image_reward_tiny/ (tests/test_image_reward.py compares our conversion with it):

    python3.11 -m venv /tmp/ir && /tmp/ir/bin/pip install torch==2.13.0 && /tmp/ir/bin/pip install --no-deps \
        image-reward==1.5 torchvision==0.28.0 timm==0.6.13 fairscale==0.4.13 transformers==4.36.2 \
        tokenizers==0.15.2 huggingface_hub==0.36.2 "numpy<2" safetensors regex requests pyyaml tqdm filelock
    /tmp/ir/bin/python tests/image_reward_official.py [out dir, default /tmp/ir_tiny]

Outputs:
  tokenizer/             local BERT WordPiece tokenizer (small vocab, do_lower_case=True)
  med_config.json        tiny BLIP med_config
  config.json            tiny sizes (vision + text + mlp + special ids)
  ImageReward_tiny.pt    torch.save(model.state_dict())
  keys.txt               sorted state-dict keys with shapes/dtypes
  images/*.png           3 small synthetic RGB images
  reference.json         tokenizer ids, rewards, raw MLP outputs, txt_features
"""
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch
from PIL import Image

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/ir_tiny"
TOK_DIR = os.path.join(OUT, "tokenizer")
IMG_DIR = os.path.join(OUT, "images")
torch.set_num_threads(2)

# --- torchvision 0.28.0 CUDA-only _C workaround (same as /tmp/ir_ref/make_reference.py)
_TV_LIB = torch.library.Library("torchvision", "FRAGMENT")
for _op in ("nms", "qnms"):
    try:
        _TV_LIB.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
        pass
import torchvision  # noqa: E402,F401

# --- import the official modules without ImageReward/__init__.py and models/__init__.py
spec = importlib.util.find_spec("ImageReward")
PKG_DIR = os.path.dirname(spec.origin)
for name, path in [("ImageReward", PKG_DIR), ("ImageReward.models", os.path.join(PKG_DIR, "models"))]:
    m = types.ModuleType(name)
    m.__path__ = [path]
    sys.modules[name] = m

from ImageReward.models.BLIP import blip as ir_blip  # noqa: E402
from ImageReward.models.BLIP import blip_pretrain as ir_blip_pretrain  # noqa: E402
from ImageReward.models.BLIP.vit import VisionTransformer  # noqa: E402
from ImageReward import ImageReward as ir_mod  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

# ---------------------------------------------------------------------------
# Tiny sizes
# ---------------------------------------------------------------------------
VISION = dict(image_size=224, patch_size=16, hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0,
              layer_norm_eps=1e-6, qkv_bias=True, drop_path_rate=0.1)
MLP_HIDDEN = [1024, 128, 64, 16, 1]  # unchanged, hard-coded in ImageReward.MLP

# ---------------------------------------------------------------------------
# 1. small local WordPiece vocab
# ---------------------------------------------------------------------------
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4
PUNCT = list("-.,!?'")
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
LETTER_PIECES = ["##" + c for c in LETTERS]
WORDS = """
a an the of on in at to and or with for from by is
red green blue yellow white black orange pink brown gold
apple banana table wooden wood glass chair cup bowl plate
two one three dog dogs cat cats bird horse playing sitting running
snow snowy rain sky sun moon night day man woman child people
photo painting picture art style house city street car tree forest
mountain river sea beach water flower garden big small old cute
high quality detailed realistic
""".split()
SUBWORDS = ["##s", "##es", "##ed", "##ing", "##ly", "##er"]


def build_vocab():
    vocab, seen = [], set()
    for t in SPECIALS + PUNCT + LETTERS + LETTER_PIECES + WORDS + SUBWORDS:
        if t not in seen:
            vocab.append(t)
            seen.add(t)
    return vocab


VOCAB = build_vocab()
os.makedirs(TOK_DIR, exist_ok=True)
raw_vocab = os.path.join(OUT, "vocab_raw.txt")
with open(raw_vocab, "w") as f:
    f.write("\n".join(VOCAB) + "\n")
BertTokenizer(raw_vocab, do_lower_case=True).save_pretrained(TOK_DIR)
os.remove(raw_vocab)

_orig_from_pretrained = BertTokenizer.from_pretrained.__func__


def _local_from_pretrained(cls, name, *args, **kwargs):
    if name == "bert-base-uncased":
        name = TOK_DIR
    return _orig_from_pretrained(cls, name, *args, **kwargs)


BertTokenizer.from_pretrained = classmethod(_local_from_pretrained)

# ---------------------------------------------------------------------------
# 2. tiny med_config.json (encoder_width is overridden by BLIP_Pretrain with vision width)
# ---------------------------------------------------------------------------
MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": len(VOCAB) + 2,  # + [DEC], [ENC] added by BLIP init_tokenizer
    "encoder_width": VISION["hidden_size"],
    "add_cross_attention": True,
}
med_path = os.path.join(OUT, "med_config.json")
with open(med_path, "w") as f:
    json.dump(MED_CONFIG, f, indent=2)

# ---------------------------------------------------------------------------
# 3. size-only monkeypatches
# ---------------------------------------------------------------------------
_orig_create_vit = ir_blip.create_vit


def tiny_create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
    """Same as blip.create_vit's 'large' branch, but with tiny sizes."""
    assert vit == "large", vit
    vision_width = VISION["hidden_size"]
    visual_encoder = VisionTransformer(img_size=image_size, patch_size=VISION["patch_size"],
                                       embed_dim=vision_width, depth=VISION["depth"],
                                       num_heads=VISION["num_heads"], mlp_ratio=VISION["mlp_ratio"],
                                       use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                                       drop_path_rate=0.1 or drop_path_rate)
    return visual_encoder, vision_width


# blip_pretrain.py did `from .blip import create_vit`, so patch both names.
ir_blip.create_vit = tiny_create_vit
ir_blip_pretrain.create_vit = tiny_create_vit

_OrigMLP = ir_mod.MLP


class TinyInputMLP(_OrigMLP):
    """ImageReward.__init__ hard-codes `MLP(768)` (= text hidden size); use 32 instead."""

    def __init__(self, input_size):
        assert input_size == 768, input_size
        super().__init__(MED_CONFIG["hidden_size"])


ir_mod.MLP = TinyInputMLP


def build_model(seed):
    torch.manual_seed(seed)
    m = ir_mod.ImageReward(med_config=med_path, device="cpu")
    assert isinstance(m.blip.visual_encoder, VisionTransformer)
    assert m.blip.visual_encoder.norm.eps == 1e-6
    assert m.blip.text_encoder.config.encoder_width == VISION["hidden_size"]
    return m


# ---------------------------------------------------------------------------
# 4. model: default init (seed 0) + N(0, 0.02) noise on every parameter,
#    MLP head re-drawn (std 1/sqrt(fan_in) weights, std 0.1 biases)
# ---------------------------------------------------------------------------
if __name__ == "__main__":
    model = build_model(0)
    tok = model.blip.tokenizer
    assert len(tok) == MED_CONFIG["vocab_size"], (len(tok), MED_CONFIG["vocab_size"])
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        for name, p in model.mlp.layers.named_parameters():
            if name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[1] ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model = model.float().eval()

    sd = model.state_dict()
    pt_path = os.path.join(OUT, "ImageReward_tiny.pt")
    torch.save(sd, pt_path)
    size = os.path.getsize(pt_path)
    print("state dict keys:", len(sd), "numel:", sum(v.numel() for v in sd.values()), "file bytes:", size)
    assert size < 2 * 1024 * 1024
    with open(os.path.join(OUT, "keys.txt"), "w") as f:
        for k in sorted(sd):
            f.write(f"{k}\t{list(sd[k].shape)}\t{str(sd[k].dtype).replace('torch.', '')}\n")

    special = {"pad_token_id": tok.pad_token_id, "unk_token_id": tok.unk_token_id,
               "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
               "mask_token_id": tok.mask_token_id, "bos_token": tok.bos_token,
               "bos_token_id": tok.bos_token_id, "enc_token": "[ENC]", "enc_token_id": tok.enc_token_id,
               "base_vocab_size": len(VOCAB), "tokenizer_len": len(tok)}
    print("special ids", special)

    config = {
        "package": "image-reward 1.5 (official code, tiny sizes)",
        "vision": {k: VISION[k] for k in ("image_size", "patch_size", "hidden_size", "depth", "num_heads",
                                          "mlp_ratio", "layer_norm_eps", "qkv_bias")},
        "text": MED_CONFIG,
        "mlp": {"input_size": MED_CONFIG["hidden_size"], "layers": MLP_HIDDEN},
        "blip_embed_dim": 256,
        "mean": model.mean, "std": model.std,
        "tokenizer": special,
    }
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    # -----------------------------------------------------------------------
    # 5. synthetic images (smooth-ish, different sizes)
    # -----------------------------------------------------------------------
    os.makedirs(IMG_DIR, exist_ok=True)
    rs = np.random.RandomState(0)
    SIZES = [(64, 48), (40, 80), (96, 96)]  # (width, height)
    image_paths = []
    for i, (w, h) in enumerate(SIZES):
        coarse = rs.randint(0, 256, size=(4, 4, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR)).astype(np.float32)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        wave = 30.0 * np.sin(xx / (5.0 + 2 * i)) * np.cos(yy / (7.0 + i))
        noise = rs.normal(0, 6.0, size=(h, w, 3))
        arr = np.clip(base + wave[..., None] + noise, 0, 255).astype(np.uint8)
        p = os.path.join(IMG_DIR, f"img{i}_{w}x{h}.png")
        Image.fromarray(arr, "RGB").save(p)
        image_paths.append(p)

    # -----------------------------------------------------------------------
    # 6. official scoring + intermediates
    # -----------------------------------------------------------------------
    import transformers, timm  # noqa: E402
    PROMPTS = ["a red apple on a wooden table", "two dogs playing in the snow", "a zebra-striped teapot"]
    ref = {
        "package": "image-reward 1.5 (official code, tiny sizes; see config.json)",
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "transformers": transformers.__version__, "timm": timm.__version__,
                     "numpy": np.__version__},
        "sizes": {"vision": config["vision"], "text": {k: MED_CONFIG[k] for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "vocab_size", "layer_norm_eps", "encoder_width")},
            "mlp": config["mlp"]},
        "mean": model.mean, "std": model.std,
        "tokenizer": special,
        "images": {}, "prompts": {}, "rewards": [], "inference_rank": [],
    }
    with torch.no_grad():
        for p in image_paths:
            x = model.preprocess(Image.open(p))
            key = os.path.basename(p)
            ref["images"][key] = {"file": f"images/{key}", "size_wh": list(Image.open(p).size),
                                  "pixels_shape": list(x.shape), "pixels_sum": float(x.double().sum()),
                                  "pixels_first5": x.flatten()[:5].tolist()}
        for prompt in PROMPTS:
            ti = tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            ref["prompts"][prompt] = {"input_ids": ti.input_ids[0].tolist(),
                                      "attention_mask": ti.attention_mask[0].tolist(),
                                      "tokens": tok.convert_ids_to_tokens(ti.input_ids[0][: int(ti.attention_mask.sum())])}
            rewards = model.score(prompt, image_paths)  # official list path (inference_rank)
            ranks, rewards2 = model.inference_rank(prompt, image_paths)
            ref["inference_rank"].append({"prompt": prompt, "ranks": ranks, "rewards": rewards2})
            for p, r in zip(image_paths, rewards):
                key = os.path.basename(p)
                img = model.preprocess(Image.open(p)).unsqueeze(0)
                image_embeds = model.blip.visual_encoder(img)
                image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
                out = model.blip.text_encoder(ti.input_ids, attention_mask=ti.attention_mask,
                                              encoder_hidden_states=image_embeds,
                                              encoder_attention_mask=image_atts, return_dict=True)
                feat = out.last_hidden_state[:, 0, :].float()
                raw = model.mlp(feat)
                single = model.score(prompt, p)  # official single-image path
                ref["rewards"].append({
                    "prompt": prompt, "image": key,
                    "reward_list_call": float(r), "reward_single_call": float(single),
                    "raw_mlp_output": float(raw.item()),
                    "reward_from_raw": float((raw.item() - model.mean) / model.std),
                    "txt_features_first5": feat[0, :5].tolist(),
                    "txt_features": feat[0].tolist(),
                    "image_embeds_shape": list(image_embeds.shape),
                    "image_embeds_sum": float(image_embeds.double().sum()),
                    "image_embeds_cls_first5": image_embeds[0, 0, :5].tolist(),
                })
                print(f"{prompt!r:34s} {key:16s} list={r:+.8f} single={single:+.8f} raw={raw.item():+.8f}")
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print("done")
