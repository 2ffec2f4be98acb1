"""GenEval's own detector weights: mmdet 2.x's Mask2Former checkpoint -> transformers' Mask2Former.

    python jobs/convert_weights.py kind=geneval_detector \\
        checkpoint=mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth out=weights/geneval-mask2former

The two implementations are the same network (Swin backbone, multi-scale deformable pixel decoder,
masked-attention decoder); the state dicts differ in names, in fused vs split attention projections
and in one layout: mmdet's Swin patch merging gathers each 2 x 2 patch with nn.Unfold (channel-major:
c * 4 + (row * 2 + col)), transformers' concatenates the four sub-grids (position-major: the
(0,0), (1,0), (0,1), (1,1) pixels of every channel in turn), so the merging's reduction and norm
weights are permuted. Every size is read from the checkpoint's shapes (attention heads too: Swin's
from its relative-position tables, the pixel decoder's from its attention weights at 3 levels and 4
points, the decoder sharing them as in both published configs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stitchvm_rl.evaluation.geneval import CLASSNAMES

UNFOLD_TO_CONCAT = [0, 2, 1, 3]  # for each transformers position (0,0), (1,0), (0,1), (1,1): its nn.Unfold index
LEVELS, POINTS = 3, 4  # the pixel decoder's feature levels and sampling points (transformers fixes both)


def merging_weight(weight: torch.Tensor) -> torch.Tensor:
    """A patch-merging reduction (out, 4C) or norm (4C,) from nn.Unfold's channel order to transformers'."""
    flat = weight.dim() == 1
    w = weight.reshape(1, -1) if flat else weight
    w = w.reshape(w.shape[0], -1, 4)[:, :, UNFOLD_TO_CONCAT].transpose(1, 2).reshape(w.shape[0], -1)
    return w.reshape(-1) if flat else w.contiguous()


def count(state: dict, prefix: str) -> int:
    """How many numbered children `prefix.<n>.` the state dict holds."""
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def config_of(state: dict[str, torch.Tensor]):
    """The transformers Mask2FormerConfig of an mmdet Mask2Former state dict, from its shapes."""
    from transformers import Mask2FormerConfig, SwinConfig

    stages = count(state, "backbone.stages.")
    depths = [count(state, f"backbone.stages.{i}.blocks.") for i in range(stages)]
    heads = [state[f"backbone.stages.{i}.blocks.0.attn.w_msa.relative_position_bias_table"].shape[1] for i in range(stages)]
    window = (int(state["backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table"].shape[0] ** 0.5) + 1) // 2
    swin = SwinConfig(embed_dim=state["backbone.patch_embed.projection.weight"].shape[0], depths=depths, num_heads=heads, window_size=window,
                      patch_size=state["backbone.patch_embed.projection.weight"].shape[-1], out_features=[f"stage{i + 1}" for i in range(stages)])
    hidden = state["panoptic_head.query_feat.weight"].shape[1]
    pixel = "panoptic_head.pixel_decoder.encoder.layers.0."
    return Mask2FormerConfig(
        backbone_config=swin, num_labels=state["panoptic_head.cls_embed.weight"].shape[0] - 1,
        num_queries=state["panoptic_head.query_feat.weight"].shape[0], hidden_dim=hidden, feature_size=hidden, mask_feature_size=hidden,
        encoder_layers=count(state, "panoptic_head.pixel_decoder.encoder.layers."),
        decoder_layers=count(state, "panoptic_head.transformer_decoder.layers.") + 1,  # transformers counts the query's first prediction
        num_attention_heads=state[pixel + "attentions.0.attention_weights.weight"].shape[0] // (LEVELS * POINTS),
        encoder_feedforward_dim=state[pixel + "ffns.0.layers.0.0.weight"].shape[0],
        dim_feedforward=state["panoptic_head.transformer_decoder.layers.0.ffns.0.layers.0.0.weight"].shape[0],
        id2label=dict(enumerate(CLASSNAMES)), label2id={n: i for i, n in enumerate(CLASSNAMES)},
    )


def _rename(state: dict, src: str, dst: str, out: dict, pairs) -> None:
    for a, b in pairs:
        for suffix in ("weight", "bias"):
            if f"{src}{a}.{suffix}" in state:
                out[f"{dst}{b}.{suffix}"] = state[f"{src}{a}.{suffix}"]


def _split_qkv(weight: torch.Tensor, bias: torch.Tensor, dst: str, names: tuple[str, str, str], out: dict) -> None:
    for name, w, b in zip(names, weight.chunk(3), bias.chunk(3)):
        out[f"{dst}{name}.weight"], out[f"{dst}{name}.bias"] = w, b


def backbone_keys(state: dict, out: dict) -> None:
    """backbone.* (mmdet's Swin) -> model.pixel_level_module.encoder.*"""
    enc = "model.pixel_level_module.encoder."
    _rename(state, "backbone.patch_embed.", enc + "swin.embeddings.", out, [("projection", "patch_embeddings.projection"), ("norm", "norm")])
    for i in range(count(state, "backbone.stages.")):
        stage, layer = f"backbone.stages.{i}.", f"{enc}swin.encoder.layers.{i}."
        for j in range(count(state, stage + "blocks.")):
            src, dst = f"{stage}blocks.{j}.", f"{layer}blocks.{j}."
            _split_qkv(state[src + "attn.w_msa.qkv.weight"], state[src + "attn.w_msa.qkv.bias"], dst + "attention.", ("q_proj", "k_proj", "v_proj"), out)
            out[dst + "attention.relative_position_bias.relative_position_bias_table"] = state[src + "attn.w_msa.relative_position_bias_table"]
            _rename(state, src, dst, out, [("attn.w_msa.proj", "attention.o_proj"), ("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                                           ("ffn.layers.0.0", "mlp.fc1"), ("ffn.layers.1", "mlp.fc2")])
        if stage + "downsample.reduction.weight" in state:
            out[layer + "downsample.reduction.weight"] = merging_weight(state[stage + "downsample.reduction.weight"])
            for suffix in ("weight", "bias"):
                out[f"{layer}downsample.norm.{suffix}"] = merging_weight(state[f"{stage}downsample.norm.{suffix}"])
        _rename(state, "backbone.", f"{enc}hidden_states_norms.", out, [(f"norm{i}", f"stage{i + 1}")])


def pixel_decoder_keys(state: dict, out: dict) -> None:
    """panoptic_head.pixel_decoder.* -> model.pixel_level_module.decoder.*"""
    src, dst = "panoptic_head.pixel_decoder.", "model.pixel_level_module.decoder."
    out[dst + "level_embed"] = state[src + "level_encoding.weight"]
    for k in range(count(state, src + "input_convs.")):
        _rename(state, f"{src}input_convs.{k}.", f"{dst}input_projections.{k}.", out, [("conv", "0"), ("gn", "1")])
    for n in range(count(state, src + "encoder.layers.")):
        _rename(state, f"{src}encoder.layers.{n}.", f"{dst}encoder.layers.{n}.", out, [
            *((f"attentions.0.{p}", f"self_attn.{p}") for p in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")),
            ("ffns.0.layers.0.0", "fc1"), ("ffns.0.layers.1", "fc2"), ("norms.0", "self_attn_layer_norm"), ("norms.1", "final_layer_norm"),
        ])
    for k in range(count(state, src + "lateral_convs.")):
        _rename(state, src, dst, out, [(f"lateral_convs.{k}.conv", f"adapter_{k + 1}.0"), (f"lateral_convs.{k}.gn", f"adapter_{k + 1}.1"),
                                       (f"output_convs.{k}.conv", f"layer_{k + 1}.0"), (f"output_convs.{k}.gn", f"layer_{k + 1}.1")])
    _rename(state, src, dst, out, [("mask_feature", "mask_projection")])


def decoder_keys(state: dict, out: dict) -> None:
    """panoptic_head.{transformer_decoder, queries, level_embed, cls_embed, mask_embed} -> transformers'."""
    src, dst = "panoptic_head.", "model.transformer_module."
    for n in range(count(state, src + "transformer_decoder.layers.")):
        a, b = f"{src}transformer_decoder.layers.{n}.", f"{dst}decoder.layers.{n}."
        out[b + "cross_attn.in_proj_weight"], out[b + "cross_attn.in_proj_bias"] = state[a + "attentions.0.attn.in_proj_weight"], state[a + "attentions.0.attn.in_proj_bias"]
        _split_qkv(state[a + "attentions.1.attn.in_proj_weight"], state[a + "attentions.1.attn.in_proj_bias"], b + "self_attn.", ("q_proj", "k_proj", "v_proj"), out)
        _rename(state, a, b, out, [("attentions.0.attn.out_proj", "cross_attn.out_proj"), ("attentions.1.attn.out_proj", "self_attn.out_proj"),
                                   ("norms.0", "cross_attn_layer_norm"), ("norms.1", "self_attn_layer_norm"), ("norms.2", "final_layer_norm"),
                                   ("ffns.0.layers.0.0", "fc1"), ("ffns.0.layers.1", "fc2")])
    _rename(state, src, dst, out, [("transformer_decoder.post_norm", "decoder.layernorm"), ("query_embed", "queries_embedder"),
                                   ("query_feat", "queries_features"), ("level_embed", "level_embed"),
                                   *((f"mask_embed.{2 * i}", f"decoder.mask_predictor.mask_embedder.{i}.0") for i in range(3))])
    _rename(state, src, "", out, [("cls_embed", "class_predictor")])


def mmdet_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmdet Mask2Former state dict renamed (and re-laid out) to transformers' keys."""
    out: dict[str, torch.Tensor] = {}
    backbone_keys(state, out)
    pixel_decoder_keys(state, out)
    decoder_keys(state, out)
    return out


def convert_mmdet_mask2former(checkpoint: str, out_dir: str) -> Path:
    """mmdet checkpoint ({"state_dict", "meta"}) -> a `save_pretrained` directory Mask2FormerDetector loads."""
    from transformers import Mask2FormerForUniversalSegmentation

    from stitchvm_rl import zoo
    from stitchvm_rl.convert import load_trusted_checkpoint

    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):  # mmcv may store the torch version in "meta"
        state = load_trusted_checkpoint(checkpoint)
    if "panoptic_head.cls_embed.weight" not in state:
        raise ValueError(f"'{checkpoint}' is not an mmdet Mask2Former checkpoint (no panoptic_head.cls_embed); pass GenEval's mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco .pth")
    model = Mask2FormerForUniversalSegmentation(config_of(state))
    missing, unexpected = model.load_state_dict(mmdet_to_transformers(state), strict=False)
    # not in mmdet's checkpoint: the final Swin norm Mask2Former never reads, buffers rebuilt from the config, the training loss's class weights
    missing = [k for k in missing if not k.endswith(("swin.layernorm.weight", "swin.layernorm.bias", "relative_position_index", "criterion.empty_weight"))]
    if missing or unexpected:
        raise ValueError(f"'{checkpoint}' does not map onto transformers' Mask2Former (missing {missing[:3]}, unexpected {unexpected[:3]})")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps({"source": Path(checkpoint).name, "from": "mmdet 2.x Mask2Former"}))

    return zoo.write_dir_atomically(Path(out_dir), write, overwrite=True)
