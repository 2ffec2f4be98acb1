"""Train the toy world from scratch: VAE, SD3 transformer + its three text encoders, toy CLIP.

The weights committed under stitchvm_rl/assets/toyworld/ were made by exactly this command with its
defaults (CPU, 2 threads, about 17 minutes on 2 cores):

    python jobs/train_toyworld.py

A quick check with a small budget (what the test runs):

    python jobs/train_toyworld.py out_dir=/tmp/toy vae_steps=5 dit_steps=5 clip_steps=5 num_images=256

It writes <out_dir>/sd3 (a StableDiffusion3Pipeline directory), <out_dir>/clip (a CLIPModel
directory), grid.png (top: ground truth, bottom: CFG samples of the same captions) and report.json.
"""

import json

from stitchvm_rl.config import load_config, run_main
from stitchvm_rl.toyworld import ToyWorldConfig, train_toyworld


def main(argv: list[str]) -> dict:
    cfg = load_config(ToyWorldConfig, argv)
    report = train_toyworld(cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return report


if __name__ == "__main__":
    run_main(main)
