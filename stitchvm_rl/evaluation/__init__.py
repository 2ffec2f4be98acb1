"""Evaluation as the paper reports it (`jobs/evaluate.py`).

    suites    prompt suites shipped as data files (DrawBench, the toy captions) or a user's file,
              each with its sampling protocol (steps, CFG, resolution, default scorers)
    scorers   the clean reward models scoring saved uint8 images with each reference
              implementation's own PIL preprocessing (not the differentiable training path)
    workers   the Ray Data stages: `SampleImages` (one actor per GPU) and `ScoreImages`
    results   one JSONL record per (policy, prompt), appended as prompts finish, and the table
              built from them (mean +- s.e. over prompts, paired differences on the same seeds)
    grids     captioned image grids
"""
