"""One-time conversion of reward weights published only as pickles into safetensors.

Run on a file you trust (`torch.load(weights_only=True)` refuses arbitrary code anyway):
    OpenCLIP ViT-H/14 checkpoints (HPSv2.1, DFN5B-CLIP)  -> a transformers CLIPModel directory
    the LAION aesthetic predictor v2 `.pth`              -> one .safetensors file
`jobs/convert_weights.py` is the command; nothing at run time ever unpickles a user file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from stitchvm_rl import zoo

# The OpenCLIP architecture of each published reward model (checked-in configs under zoo_configs/).
OPEN_CLIP_ARCHITECTURES = {"hpsv2": "clip_vit_h14", "dfn_clip": "clip_vit_h14_378"}


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


def convert_open_clip(checkpoint: str, config: CLIPConfig, out_dir: str, tokenizer: str) -> Path:
    """OpenCLIP checkpoint -> `save_pretrained` CLIPModel dir (+ tokenizer, preprocessing stats)."""
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
