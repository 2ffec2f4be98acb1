"""An evaluation's records and the table made from them.

`scores.jsonl` under the run's files holds one record per (policy, prompt), appended as each prompt's
images are scored, so a re-run skips what is there:

    {"policy": "nft", "index": 17, "prompt": "...", "category": "Colors", "noise_seed": ...,
     "scores": {"hpsv21": [N floats], ...}, "images": ["images/nft/0017_0.png", ...]}

The table averages a prompt's N images first, then reports the mean over prompts with its standard
error (prompts are the independent units; the images of one prompt are not). A paired difference
compares two policies prompt by prompt on the same seeds, so the noise shared by both cancels.
"""

from __future__ import annotations

import json
import math
import statistics

SCORES = "scores.jsonl"
SETTINGS = "evaluation.json"


def read_records(text: str | None) -> list[dict]:
    """Records of a scores.jsonl (a torn last line, from a crash mid-write on a shared disk, is dropped)."""
    records = []
    for line in (text or "").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def done_keys(records: list[dict]) -> set[tuple[str, int]]:
    return {(r["policy"], r["index"]) for r in records}


def prompt_means(records: list[dict], policy: str, scorer: str) -> dict[int, float]:
    """{prompt index: mean over its images} of one policy and scorer (a repeated record: the last)."""
    return {r["index"]: statistics.fmean(r["scores"][scorer]) for r in records if r["policy"] == policy}


def mean_se(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values) if n else math.nan
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "se": se, "prompts": n}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Mean and s.e. of a - b over the prompts both have."""
    shared = sorted(a.keys() & b.keys())
    return mean_se([a[i] - b[i] for i in shared])


def build_table(records: list[dict], policies: list[str], scorers: list[str], baseline: tuple[str, list[dict]] | None = None) -> dict:
    """{"scores": {policy: {scorer: mean/se}}, "by_category": ..., "paired": {"<a> - <b>": {scorer: mean/se}}}:
    every policy against the first, and (with `baseline`, a (name, records) of another evaluation)
    every policy against that evaluation's policy."""
    table = {"scores": {}, "by_category": {}, "paired": {}}
    if "geneval" in scorers:  # GenEval's own summary: each task's share of correct images, and their mean
        table["geneval"] = {policy: geneval_summary(records, policy) for policy in policies}
    categories = sorted({r.get("category", "") for r in records} - {""})
    for policy in policies:
        table["scores"][policy] = {s: mean_se(list(prompt_means(records, policy, s).values())) for s in scorers}
        if len(categories) > 1:
            table["by_category"][policy] = {
                c: {s: mean_se([statistics.fmean(r["scores"][s]) for r in records if r["policy"] == policy and r.get("category") == c]) for s in scorers}
                for c in categories
            }
    first = policies[0]
    for policy in policies[1:]:
        table["paired"][f"{policy} - {first}"] = {s: paired(prompt_means(records, policy, s), prompt_means(records, first, s)) for s in scorers}
    if baseline is not None:
        name, base_records = baseline
        base_policy = base_records[0]["policy"] if base_records else ""
        for policy in policies:
            table["paired"][f"{policy} - {name}"] = {
                s: paired(prompt_means(records, policy, s), prompt_means(base_records, base_policy, s)) for s in scorers
            }
    return table


def geneval_summary(records: list[dict], policy: str) -> dict[str, float]:
    """{task: share of its images judged correct, ..., "overall": the tasks' unweighted mean} (summary_scores.py)."""
    from stitchvm_rl.evaluation.geneval import TASKS, task_scores

    by_task = {t: [v for r in records if r["policy"] == policy and r.get("category") == t for v in r["scores"]["geneval"]] for t in TASKS}
    return task_scores(by_task)


def format_cell(stat: dict, signed: bool = False) -> str:
    """A mean / s.e. cell of a table, ~4 significant figures ("--" when empty)."""
    if stat["prompts"] == 0 or math.isnan(stat["mean"]):
        return "--"
    digits = min(6, max(2, 3 - int(math.floor(math.log10(abs(stat["mean"]) + 1e-12)))))  # ~4 significant figures
    mean = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
    return mean if math.isnan(stat["se"]) else f"{mean} ± {stat['se']:.{digits}f}"


def to_markdown(table: dict, scorers: list[str], title: str) -> str:
    """The table as markdown: scores (mean ± s.e. over prompts), then the paired differences."""
    lines = [f"## {title}", "", "| policy | " + " | ".join(scorers) + " |", "|---" * (len(scorers) + 1) + "|"]
    lines += [f"| {p} | " + " | ".join(format_cell(row[s]) for s in scorers) + " |" for p, row in table["scores"].items()]
    if table["paired"]:
        lines += ["", "Paired differences (same prompts and seeds; ± one standard error over prompts):", ""]
        lines += ["| difference | " + " | ".join(scorers) + " |", "|---" * (len(scorers) + 1) + "|"]
        lines += [f"| {d} | " + " | ".join(format_cell(row[s], signed=True) for s in scorers) + " |" for d, row in table["paired"].items()]
    if table.get("geneval"):
        tasks = [t for t in next(iter(table["geneval"].values())) if t != "overall"] + ["overall"]
        lines += ["", "GenEval (share of images correct per task; overall = the tasks' mean):", ""]
        lines += ["| policy | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        lines += [f"| {p} | " + " | ".join(f"{row.get(t, float('nan')):.3f}" for t in tasks) + " |" for p, row in table["geneval"].items()]
    return "\n".join(lines) + "\n"
