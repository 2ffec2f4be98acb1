"""Convert reward weights published only as pickles into safetensors, once, on a file you trust.

    # HPSv2.1 (OpenCLIP ViT-H/14): HPS_v2.1_compressed.pt from the HPSv2 release
    python jobs/convert_weights.py kind=hpsv2 checkpoint=HPS_v2.1_compressed.pt out=weights/hpsv2.1
    # DFN5B-CLIP ViT-H/14-378: open_clip_pytorch_model.bin of apple/DFN5B-CLIP-ViT-H-14-378
    python jobs/convert_weights.py kind=dfn_clip checkpoint=open_clip_pytorch_model.bin out=weights/dfn5b-clip-vit-h-14-378
    # LAION aesthetic predictor v2: sac+logos+ava1-l14-linearMSE.pth
    python jobs/convert_weights.py kind=aesthetic checkpoint=sac+logos+ava1-l14-linearMSE.pth out=weights/aesthetic-v2.safetensors

The OpenCLIP kinds need the CLIP BPE tokenizer (`tokenizer=`, a hub id or local dir; the default is
fetched from the hub once). The outputs are what `rewards.PUBLISHED` loads by default.
"""

from dataclasses import dataclass
from typing import Literal

from stitchvm_rl import convert, zoo
from stitchvm_rl.config import ConfigError, load_config, run_main


@dataclass
class ConvertConfig:
    kind: Literal["hpsv2", "dfn_clip", "aesthetic"] = "hpsv2"
    """Which published weights the checkpoint holds."""
    checkpoint: str = ""
    """The downloaded pickle (.pt / .pth / .bin)."""
    out: str = ""
    """Output directory (OpenCLIP kinds) or .safetensors file (aesthetic)."""
    tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """CLIP tokenizer to save beside an OpenCLIP model (hub id or local dir)."""


def main(argv: list[str]) -> str:
    cfg = load_config(ConvertConfig, argv)
    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("both 'checkpoint' and 'out' are required, e.g. checkpoint=HPS_v2.1_compressed.pt out=weights/hpsv2.1")
    if cfg.kind == "aesthetic":
        path = convert.convert_aesthetic(cfg.checkpoint, cfg.out)
    else:
        config = zoo.clip_config(convert.OPEN_CLIP_ARCHITECTURES[cfg.kind])
        path = convert.convert_open_clip(cfg.checkpoint, config, cfg.out, cfg.tokenizer)
    print(f"wrote {path}")
    return str(path)


if __name__ == "__main__":
    run_main(main)
