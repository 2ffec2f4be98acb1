"""stitchvm-rl: post-training text-to-image flow models with stitched value models, on Ray."""
