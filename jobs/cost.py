"""Real-scale cost model, no GPU and no weights needed: SD3.5-Medium + CLIP ViT-L/14-336 on `meta`.

    python jobs/cost.py                      # StitchVM (i=4, j=1) vs Tweedie at 1024^2
    python jobs/cost.py resolution=512 dit_block=8

Prints parameters and forward FLOPs of the stitched value model next to a full SD3.5-M forward +
VAE decode + CLIP forward, and the cost of one DPS step (CFG, forward + backward FLOPs, activations
kept for the backward) guided by StitchVM vs by Tweedie; writes outputs/<run_name>/summary.json.
"""

from dataclasses import dataclass
from typing import Annotated

from stitchvm_rl.config import ConfigError, Range, load_config, run_main
from stitchvm_rl.costs import sd35m_guidance_step_costs, sd35m_value_model_costs
from stitchvm_rl.tracking import RunDir


@dataclass
class CostConfig:
    run_name: str = "cost"
    """Name of the run folder under output_dir."""
    output_dir: str = "outputs"
    """Where run folders go."""
    dit_block: Annotated[int, Range(1, 24)] = 4
    """SD3.5-M blocks in the value model's head (paper: 4)."""
    rm_block: Annotated[int, Range(1, 24)] = 1
    """First CLIP ViT-L/14-336 layer of the tail (paper: 1)."""
    resolution: Annotated[int, Range(64)] = 1024
    """Image side in pixels (multiple of 16)."""


def main(argv: list[str]) -> dict:
    cfg = load_config(CostConfig, argv)
    if cfg.resolution % 16:
        raise ConfigError(f"resolution {cfg.resolution} must be a multiple of 16 (VAE factor 8 x patch 2)")
    costs = sd35m_value_model_costs(cfg.dit_block, cfg.rm_block, cfg.resolution)
    costs["dps_step"] = sd35m_guidance_step_costs(cfg.dit_block, cfg.rm_block, cfg.resolution)
    RunDir(cfg.output_dir, cfg.run_name, cfg).write_json("summary.json", costs)
    print(f"SD3.5-Medium + CLIP ViT-L/14-336 at {cfg.resolution}^2, StitchVM(i={cfg.dit_block}, j={cfg.rm_block})")
    print(f"{'':28s}{'parameters':>16s}{'forward GFLOPs':>16s}")
    flops, params = costs["forward_flops"], costs["params"]
    rows = [
        ("StitchVM (head+stitch+tail)", params["stitchvm_total"], flops["stitchvm"]),
        ("SD3.5-M transformer", params["sd35m_transformer"], flops["sd35m_transformer"]),
        ("VAE decode", params["vae"], flops["vae_decode"]),
        ("CLIP image tower", params["clip_vision"], flops["clip_image"]),
        ("Tweedie total", params["sd35m_transformer"] + params["vae"] + params["clip_vision"], flops["tweedie_total"]),
    ]
    for name, p, f in rows:
        print(f"{name:28s}{p:>16,d}{f / 1e9:>16,.0f}")
    print(f"Tweedie / StitchVM forward FLOPs: {costs['flops_ratio_tweedie_over_stitchvm']:.2f}x")
    step = costs["dps_step"]
    print(f"\none DPS step with CFG 2x{'':6s}{'TFLOPs (fwd+bwd)':>18s}{'backward activations (GiB, bf16)':>34s}")
    for name in ("none", "tweedie", "stitchvm", "stitchvm_shared"):
        print(f"{name:28s}{step['step'][name]['flops'] / 1e12:>18,.1f}{step['step'][name]['backward_activation_gib']:>34,.1f}")
    print(f"Tweedie / StitchVM per DPS step: {step['flops_ratio_tweedie_over_stitchvm']:.2f}x FLOPs ({step['flops_ratio_tweedie_over_stitchvm_shared']:.2f}x with the head "
          f"shared with CFG's unconditional pass), {step['activation_ratio_tweedie_over_stitchvm']:.2f}x activation memory")
    return costs


if __name__ == "__main__":
    run_main(main)
