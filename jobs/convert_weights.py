"""Convert reward weights published only as pickles into safetensors, once, on a file you trust.

    # HPSv2.1 (OpenCLIP ViT-H/14): HPS_v2.1_compressed.pt from the HPSv2 release
    python jobs/convert_weights.py kind=hpsv2 checkpoint=HPS_v2.1_compressed.pt out=weights/hpsv2.1
    # DFN5B-CLIP ViT-H/14-378 (QuickGELU): open_clip_pytorch_model.bin of apple/DFN5B-CLIP-ViT-H-14-378,
    # with the repo's open_clip_config.json beside it (or architecture=ViT-H-14-378-quickgelu)
    python jobs/convert_weights.py kind=dfn_clip checkpoint=open_clip_pytorch_model.bin out=weights/dfn5b-clip-vit-h-14-378
    # LAION aesthetic predictor v2: sac+logos+ava1-l14-linearMSE.pth
    python jobs/convert_weights.py kind=aesthetic checkpoint=sac+logos+ava1-l14-linearMSE.pth out=weights/aesthetic-v2.safetensors
    # ImageReward (BLIP): ImageReward.pt of THUDM/ImageReward, with bert-base-uncased's tokenizer
    python jobs/convert_weights.py kind=image_reward checkpoint=ImageReward.pt out=weights/image-reward
    # GenEval's own detector (mmdet 2.x Mask2Former Swin-S COCO) for transformers' Mask2Former
    python jobs/convert_weights.py kind=geneval_detector out=weights/geneval-mask2former \
        checkpoint=mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth

The OpenCLIP kinds need the CLIP BPE tokenizer (`tokenizer=`, a hub id or local dir; the default is
fetched from the hub once) and the checkpoint's activation (GELU or QuickGELU, invisible in the
weights): read from the open_clip_config.json beside the checkpoint, else from `architecture=`
(HPSv2's lone .pt: ViT-H-14 unless told otherwise). The outputs are what `rewards.PUBLISHED` loads by default.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stitchvm_rl import convert
from stitchvm_rl.config import ConfigError, load_config, run_main
from stitchvm_rl.evaluation.mmdet_convert import convert_mmdet_mask2former
from stitchvm_rl.image_reward import convert_image_reward


@dataclass
class ConvertConfig:
    kind: Literal["hpsv2", "dfn_clip", "aesthetic", "image_reward", "geneval_detector"] = "hpsv2"
    """Which published weights the checkpoint holds."""
    checkpoint: str = ""
    """The downloaded pickle (.pt / .pth / .bin)."""
    out: str = ""
    """Output directory (OpenCLIP kinds, image_reward, geneval_detector) or .safetensors file (aesthetic)."""
    tokenizer: str = ""
    """Tokenizer to save beside the model, hub id or local dir (empty: laion/CLIP-ViT-H-14-laion2B-s32B-b79K's CLIP BPE; image_reward: bert-base-uncased)."""
    architecture: str = ""
    """OpenCLIP model name of the checkpoint, e.g. ViT-H-14-378-quickgelu (empty: its open_clip_config.json, else the kind's)."""


def check(cfg: ConvertConfig) -> None:
    """Refuse a conversion that cannot be right before the (multi-GB) checkpoint is read."""
    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("both 'checkpoint' and 'out' are required, e.g. checkpoint=HPS_v2.1_compressed.pt out=weights/hpsv2.1")
    if not Path(cfg.checkpoint).is_file():
        raise ConfigError(f"checkpoint '{cfg.checkpoint}' does not exist; pass the downloaded published file")
    if cfg.kind in ("aesthetic", "image_reward", "geneval_detector"):
        if cfg.architecture:
            raise ConfigError(f"architecture= names an OpenCLIP model; kind={cfg.kind} takes none")
        return
    try:
        convert.open_clip_activation(cfg.checkpoint, convert.kind_architecture(cfg.kind, cfg.checkpoint, cfg.architecture)[1])
    except ValueError as err:
        raise ConfigError(str(err)) from None


def main(argv: list[str]) -> str:
    cfg = load_config(ConvertConfig, argv)
    check(cfg)
    if cfg.kind == "aesthetic":
        path = convert.convert_aesthetic(cfg.checkpoint, cfg.out)
    elif cfg.kind == "image_reward":
        path = convert_image_reward(cfg.checkpoint, cfg.out, cfg.tokenizer or "bert-base-uncased")
    elif cfg.kind == "geneval_detector":
        path = convert_mmdet_mask2former(cfg.checkpoint, cfg.out)
    else:
        config, architecture = convert.kind_architecture(cfg.kind, cfg.checkpoint, cfg.architecture)
        path = convert.convert_open_clip(cfg.checkpoint, config, cfg.out, cfg.tokenizer or "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", architecture)
    print(f"wrote {path}")
    return str(path)


if __name__ == "__main__":
    run_main(main)
