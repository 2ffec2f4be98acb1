"""The stitched value model: architecture (model), stage 1 (search), stage 2 (train), accuracy (evaluate)."""
