"""Prompt suites and their sampling protocols.

A suite is a JSONL file with one `{"prompt": ..., "category": ...}` object per line (further keys,
such as GenEval's `tag` and `include`, are kept as the prompt's metadata), or a UTF-8 text file
with one prompt per line. The shipped suites name their source:

    drawbench   200 prompts in 11 categories (Saharia et al. 2022, "Imagen", DrawBench sheet;
                read from github.com/kennymckormick/DrawBench-Glance, one prompt.txt per prompt)
    geneval     553 prompts in 6 tasks with their object metadata (Ghosh et al. 2023, GenEval;
                prompts/evaluation_metadata.jsonl of github.com/djghosh13/geneval, MIT licence)
    toyworld    every toy-world caption (colour x shape x side)

A .jsonl file in GenEval's format (every line with `tag` and `include`) is scored as GenEval.
The protocol is the paper's for its training results (App. D.3: 40 steps, CFG 1.0, 512^2, the
original clean reward models on fully denoised samples); the toy world samples at its native size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stitchvm_rl import toyworld
from stitchvm_rl.config import ConfigError, did_you_mean

SUITE_DIR = Path(__file__).resolve().parent.parent / "assets" / "suites"


@dataclass(frozen=True)
class Protocol:
    """How a suite's images are sampled and scored unless the job's config says otherwise."""

    num_steps: int
    """ODE steps."""
    cfg_scale: float
    """Classifier-free guidance scale (1 = off)."""
    resolution: int
    """Image side in pixels (0: the model's native size)."""
    scorers: tuple[str, ...]
    """Scorers reported for this suite."""


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt of a suite; `index` is its line in the suite (its images' seeds derive from it)."""

    index: int
    prompt: str
    category: str = ""
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    source: str
    """Where the prompts come from."""
    prompts: list[SuitePrompt]
    protocol: Protocol


PAPER_SCORERS = ("hpsv21", "pickscore", "aesthetic", "dfn_clip", "clipscore")
SHIPPED = {
    "drawbench": (
        "Imagen's DrawBench (Saharia et al. 2022), 200 prompts, 11 categories",
        Protocol(num_steps=40, cfg_scale=1.0, resolution=512, scorers=PAPER_SCORERS),
    ),
    "geneval": (
        "GenEval (Ghosh et al. 2023), 553 prompts in 6 tasks with object metadata",
        Protocol(num_steps=40, cfg_scale=1.0, resolution=512, scorers=("geneval",)),
    ),
    "toyworld": (
        "every toy-world caption (stitchvm_rl.toyworld.CAPTIONS)",
        Protocol(num_steps=20, cfg_scale=1.0, resolution=0, scorers=("toy_clip", "caption")),
    ),
}
# a suite read from the user's own file: the paper's protocol
FILE_PROTOCOL = SHIPPED["drawbench"][1]


def read_suite_file(path: Path) -> list[SuitePrompt]:
    """Prompts of a .jsonl suite (prompt, category, further keys kept) or a .txt prompt list."""
    if not path.is_file():
        raise ConfigError(f"suite file '{path}' does not exist; pass a .jsonl ({{\"prompt\", \"category\"}} per line) or .txt (one prompt per line) file, or one of: {', '.join(SHIPPED)}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(f"suite file '{path}' holds no prompts")
    if path.suffix != ".jsonl":
        return [SuitePrompt(i, line) for i, line in enumerate(lines)]
    prompts = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            prompt = row.pop("prompt")
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise ConfigError(f"suite file '{path}' line {i + 1} is not a JSON object with a \"prompt\" key: {line[:80]}") from None
        prompts.append(SuitePrompt(i, prompt, str(row.pop("category", row.get("tag", ""))), row))  # GenEval's files: its tag
    return prompts


def load_suite(name: str) -> Suite:
    """A shipped suite by name, or a suite file (.jsonl / .txt) by path."""
    if name == "toyworld":
        source, protocol = SHIPPED[name]
        return Suite(name, source, [SuitePrompt(i, c, "toyworld") for i, c in enumerate(toyworld.CAPTIONS)], protocol)
    if name in SHIPPED:
        source, protocol = SHIPPED[name]
        return Suite(name, source, read_suite_file(SUITE_DIR / f"{name}.jsonl"), protocol)
    if name.endswith((".jsonl", ".txt")):
        prompts = read_suite_file(Path(name).expanduser())
        in_geneval_format = all("include" in p.metadata and "tag" in p.metadata for p in prompts)
        return Suite(Path(name).stem, name, prompts, SHIPPED["geneval"][1] if in_geneval_format else FILE_PROTOCOL)
    raise ConfigError(f"suite '{name}' is unknown; choose {', '.join(SHIPPED)} or pass a .jsonl / .txt file{did_you_mean(name, SHIPPED)}")
