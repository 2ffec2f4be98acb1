"""Prompt lists: from the config, from a UTF-8 file (one prompt per line), or the toy world's captions."""

from __future__ import annotations

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
    return prompts


def resolve_prompts(prompts: list[str], prompt_file: str) -> list[str]:
    """The config's prompts, else the prompt file's, else every toy-world caption."""
    if prompts and prompt_file:
        raise ValueError("give either 'prompts' or 'prompt_file', not both")
    if prompt_file:
        return read_prompt_file(prompt_file)
    return list(prompts) or list(toyworld.CAPTIONS)
