"""Prompt lists: from the config, from a UTF-8 file (one prompt per line, or a .jsonl of
`{"prompt": ..., further keys}` such as GenEval's training metadata), or the toy world's captions."""

from __future__ import annotations

import json
from pathlib import Path

from stitchvm_rl import toyworld


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file; a missing, undecodable or empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file '{path}' does not exist; pass a UTF-8 text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of the first prompt
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file '{path}' is not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file '{path}' holds no prompts; put one prompt per line")
    return [prompt for prompt, _ in jsonl_rows(path, text)] if path.suffix == ".jsonl" else prompts


def jsonl_rows(path: str | Path, text: str | None = None) -> list[tuple[str, dict]]:
    """(prompt, its other keys) of every line of a .jsonl prompt file, repeats kept (they weigh the prompt)."""
    rows = []
    for n, line in enumerate((text if text is not None else Path(path).read_text(encoding="utf-8-sig")).splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((row.pop("prompt"), row))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise ValueError(f"prompt file '{path}' line {n + 1} is not a JSON object with a \"prompt\" key") from None
    return rows


def read_prompt_metadata(path: str | Path) -> dict[str, dict]:
    """{prompt: its other keys} of a .jsonl prompt file (GenEval's tag / include / exclude); a prompt
    repeated with other metadata is refused (a reward could not tell which applies)."""
    metadata: dict[str, dict] = {}
    for prompt, row in jsonl_rows(path):
        if metadata.setdefault(prompt, row) != row:
            raise ValueError(f"prompt file '{path}' gives the prompt '{prompt}' twice with different metadata; keep one")
    return metadata


def resolve_prompts(prompts: list[str], prompt_file: str) -> list[str]:
    """The config's prompts, else the prompt file's, else every toy-world caption."""
    if prompts and prompt_file:
        raise ValueError("give either 'prompts' or 'prompt_file', not both")
    if prompt_file:
        return read_prompt_file(prompt_file)
    return list(prompts) or list(toyworld.CAPTIONS)
