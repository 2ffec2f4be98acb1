"""One-time conversion of reward weights published only as pickles into safetensors.

Run on a file you trust (`torch.load(weights_only=True)` refuses arbitrary code anyway):
    OpenCLIP ViT-H/14 checkpoints (HPSv2.1, DFN5B-CLIP)  -> a transformers CLIPModel directory, with the
                                                          activation of the open_clip_config.json beside
                                                          the checkpoint or of an OpenCLIP model name
    the LAION aesthetic predictor v2 `.pth`              -> one .safetensors file
`jobs/convert_weights.py` is the command; nothing at run time ever unpickles a user file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from stitchvm_rl import zoo
from stitchvm_rl.config import check_names

# OpenCLIP model names (open_clip's model_configs/<name>.json) -> the checked-in zoo config of their
# shapes and their MLP activation. The activation leaves no trace in the weights, so it is never guessed.
OPEN_CLIP_ARCHITECTURES = {
    "ViT-H-14": ("clip_vit_h14", "gelu"),  # HPSv2 (a fine-tuned laion2B-s32B-b79K)
    "ViT-H-14-quickgelu": ("clip_vit_h14", "quick_gelu"),  # DFN5B-CLIP-ViT-H-14 (224 px)
    "ViT-H-14-378-quickgelu": ("clip_vit_h14_378", "quick_gelu"),  # DFN5B-CLIP-ViT-H-14-378
}
# What each jobs/convert_weights.py kind converts: its zoo config, and the OpenCLIP name to assume when
# no open_clip_config.json lies beside the checkpoint ("": none, refuse). HPSv2 ships a lone .pt that its
# code loads as ViT-H-14; DFN's hub repo ships open_clip_config.json beside open_clip_pytorch_model.bin.
KINDS = {"hpsv2": ("clip_vit_h14", "ViT-H-14"), "dfn_clip": ("clip_vit_h14_378", "")}
OPEN_CLIP_CONFIG = "open_clip_config.json"


def open_clip_activation(checkpoint: str | Path, architecture: str = "") -> str:
    """The MLP activation ("gelu" / "quick_gelu") of an OpenCLIP checkpoint: from the open_clip_config.json
    that OpenCLIP hub repos ship beside it, or from an OpenCLIP model name; both, if given, must agree."""
    check_names("architecture", [architecture] if architecture else [], OPEN_CLIP_ARCHITECTURES, "OpenCLIP architecture")
    named = OPEN_CLIP_ARCHITECTURES[architecture][1] if architecture else None
    model_cfg = open_clip_model_cfg(checkpoint)
    if model_cfg is None:
        if named is None:
            raise ValueError(
                f"cannot tell whether '{checkpoint}' uses GELU or QuickGELU: no {OPEN_CLIP_CONFIG} beside it and no "
                f"architecture given; put the {OPEN_CLIP_CONFIG} of its hub repo beside it or pass architecture=<OpenCLIP name> "
                f"({', '.join(OPEN_CLIP_ARCHITECTURES)})"
            )
        return named
    shipped = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"  # OpenCLIP's default is GELU
    if named is not None and named != shipped:
        raise ValueError(
            f"architecture '{architecture}' uses {named} but the {OPEN_CLIP_CONFIG} beside '{checkpoint}' says {shipped}; "
            "drop architecture= (the file ships with the weights) or put the right file beside them"
        )
    return shipped


def kind_architecture(kind: str, checkpoint: str | Path, architecture: str = "") -> tuple[CLIPConfig, str]:
    """The CLIPConfig (shapes) and OpenCLIP name to convert a jobs/convert_weights.py `kind` with: the
    given `architecture`, else -- only when no open_clip_config.json lies beside the checkpoint -- the kind's."""
    zoo_name, default = KINDS[kind]
    if not architecture and open_clip_model_cfg(checkpoint) is None:
        architecture = default
    if architecture in OPEN_CLIP_ARCHITECTURES:
        zoo_name = OPEN_CLIP_ARCHITECTURES[architecture][0]
    return zoo.clip_config(zoo_name), architecture


def open_clip_model_cfg(checkpoint: str | Path) -> dict | None:
    """The "model_cfg" of the open_clip_config.json beside `checkpoint`, or None when there is none."""
    path = Path(checkpoint).with_name(OPEN_CLIP_CONFIG)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))["model_cfg"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"'{path}' is not an OpenCLIP config with a \"model_cfg\" ({type(err).__name__}: {err})") from None


def _check_heads(checkpoint: str | Path, config: CLIPConfig) -> None:
    """Refuse a config whose attention head counts differ from the shipped open_clip_config.json's:
    like the activation, they leave no trace in the weights' shapes (OpenCLIP's defaults: vision width 768,
    head_width 64; text heads 8)."""
    model_cfg = open_clip_model_cfg(checkpoint) or {}
    for tower, ours in (("vision_cfg", config.vision_config), ("text_cfg", config.text_config)):
        cfg = model_cfg.get(tower)
        if not cfg:
            continue
        heads = cfg.get("width", 768) // cfg.get("head_width", 64) if tower == "vision_cfg" else cfg.get("heads", 8)
        if heads != ours.num_attention_heads:
            raise ValueError(
                f"the {OPEN_CLIP_CONFIG} beside '{checkpoint}' gives {tower} {heads} attention heads, the architecture "
                f"{ours.num_attention_heads}; pick the architecture the checkpoint was trained with"
            )


def load_trusted_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, tensors only (`weights_only=True`); unwraps {"state_dict": ...} and "module."."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; pass the downloaded published file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _tower(src: str, dst: str, state: dict, out: dict) -> None:
    """OpenCLIP resblocks (fused in_proj, ln_1/ln_2, c_fc/c_proj) -> transformers CLIP encoder layers."""
    n = len({k.split(".")[len(src.split("."))] for k in state if k.startswith(src + ".")})
    for i in range(n):
        s, d = f"{src}.{i}.", f"{dst}.{i}."
        for part, (w, b) in zip("qkv", zip(state[s + "attn.in_proj_weight"].chunk(3), state[s + "attn.in_proj_bias"].chunk(3))):
            out[d + f"self_attn.{part}_proj.weight"], out[d + f"self_attn.{part}_proj.bias"] = w, b
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[d + b + ".weight"], out[d + b + ".bias"] = state[s + a + ".weight"], state[s + a + ".bias"]


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenCLIP (ViT) state dict to transformers' CLIPModel keys."""
    out = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "visual_projection.weight": state["visual.proj"].T.contiguous(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_projection.weight": state["text_projection"].T.contiguous(),
        "logit_scale": state["logit_scale"],
    }
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"), ("ln_final", "text_model.final_layer_norm")):
        out[b + ".weight"], out[b + ".bias"] = state[a + ".weight"], state[a + ".bias"]
    _tower("visual.transformer.resblocks", "vision_model.encoder.layers", state, out)
    _tower("transformer.resblocks", "text_model.encoder.layers", state, out)
    return out


def convert_open_clip(checkpoint: str, config: CLIPConfig, out_dir: str, tokenizer: str, architecture: str = "") -> Path:
    """OpenCLIP checkpoint -> `save_pretrained` CLIPModel dir (+ tokenizer, preprocessing stats).

    `config` gives the shapes; the activation is the checkpoint's own (`open_clip_activation`), checked
    before the (multi-GB) checkpoint is read."""
    config = copy.deepcopy(config)
    config.text_config.hidden_act = config.vision_config.hidden_act = open_clip_activation(checkpoint, architecture)
    _check_heads(checkpoint, config)
    state = open_clip_to_transformers(load_trusted_checkpoint(checkpoint))
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"'{checkpoint}' does not match the CLIP architecture (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); pick the architecture the checkpoint was trained with"
        )
    tok = CLIPTokenizer.from_pretrained(zoo.resolve(tokenizer))
    return zoo.write_dir_atomically(Path(out_dir), lambda tmp: zoo.save_clip(model, tok, tmp), overwrite=True)


def convert_aesthetic(checkpoint: str, out_file: str) -> Path:
    """LAION aesthetic predictor v2 `.pth` -> `.safetensors` (keys `layers.N.weight/bias` kept)."""
    from stitchvm_rl.rewards import AestheticMLP

    state = load_trusted_checkpoint(checkpoint)
    head = AestheticMLP(state["layers.0.weight"].shape[1])
    head.load_state_dict(state)  # refuses a file of another shape with a key-by-key message
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp), metadata={"source": Path(checkpoint).name})
    tmp.replace(out)
    return out
