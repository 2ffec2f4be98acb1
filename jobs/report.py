"""StitchVM against the Monte Carlo baseline: one report from jobs/nft.py run directories.

    python jobs/report.py outputs/nft-terminal outputs/nft-stitchvm            # any number of runs and seeds
    python jobs/report.py outputs/nft-* stitch_run=outputs/stitch dps_run=outputs/dps out=outputs/report
    python jobs/report.py outputs/nft-* "evaluations=[outputs/evaluate]"      # + jobs/evaluate.py tables and grids
    python jobs/report.py outputs/cmp-* wandb_project=stitchvm-rl wandb_save=true      # + a wandb Report (online)

Runs are grouped by estimator (several seeds of one estimator are averaged; the spread is shown).
Writes <out>/: report.html (self-contained: plots embedded; open it in any browser), the plots as
PNG files, and report.json with every number the page shows. Open report.html in a browser (it
needs no server: `xdg-open outputs/report/report.html`, or copy the file anywhere).
"""

import base64
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from stitchvm_rl import storage
from stitchvm_rl.config import ConfigError, load_config, run_main
from stitchvm_rl.report import PHASES, build_wandb_report, by_estimator, load_run, speedups
from stitchvm_rl.tracking import RunDir


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list)
    """jobs/nft.py or jobs/draft.py run directories, or their storage URIs <storage>/<run>/files (also given as bare arguments)."""
    out: str = "outputs/report"
    """Report directory."""
    baseline: str = "terminal"
    """Estimator of the baseline the others are compared with."""
    stitch_run: str = ""
    """A jobs/stitch.py run directory or storage URI: its value accuracy against noise level is shown."""
    dps_run: str = ""
    """A jobs/dps.py run directory or storage URI: its guidance results are shown."""
    evaluations: list[str] = field(default_factory=list)
    """jobs/evaluate.py run directories or storage URIs: their tables (mean ± s.e., paired differences) and grids are shown."""
    wandb_project: str = ""
    """Also build a wandb Report of the runs' wandb group in this project (empty: none)."""
    wandb_entity: str = ""
    """Entity of that report (empty: the runs' wandb.entity)."""
    wandb_save: bool = False
    """Publish the wandb Report (needs a wandb login); otherwise it is built and checked only."""


def _plot(curves, key: str, x_axis: str, ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ys = getattr(c, key)
        if any(y is None for y in ys):
            continue
        xs = getattr(c, x_axis)
        ax.plot(xs, ys, marker="o", label=f"{name} ({len(c.seeds)} run{'s' if len(c.seeds) > 1 else ''})")
        if key == "reward" and len(c.seeds) > 1:
            ax.fill_between(xs, [y - s for y, s in zip(ys, c.reward_std)], [y + s for y, s in zip(ys, c.reward_std)], alpha=0.2)
    ax.set(xlabel={"seconds": "seconds of epoch work", "device_hours": "device-hours", "steps": "optimizer step"}[x_axis], ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_phases(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(curves)
    for phase in PHASES:
        values = [c.phases[phase] for c in curves.values()]
        ax.bar(list(curves), values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(ylabel="seconds per epoch", title="where an epoch goes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _img(path: Path, wide: bool = False) -> str:
    style = ' style="max-width:100%"' if wide else ""
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" alt="{path.stem}"{style}>'


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return "&ndash;" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _evaluation_section(path: Path, out: Path) -> tuple[str, dict, str]:
    """(HTML, table.json, table.md) of one jobs/evaluate.py run: its scores and paired differences
    as tables (mean ± s.e. over prompts), and its captioned grid."""
    from stitchvm_rl.evaluation.results import format_cell

    table = json.loads((path / "table.json").read_text())
    scorers = list(next(iter(table["scores"].values())))
    html = f"<h2>Evaluation '{path.name}' (jobs/evaluate.py)</h2><p>Mean ± standard error over prompts; differences are paired on the same prompts and seeds.</p>"
    html += _table(["policy", *scorers], [[p, *(format_cell(row[s]) for s in scorers)] for p, row in table["scores"].items()])
    if table["paired"]:
        html += _table(["difference", *scorers], [[d, *(format_cell(row[s], signed=True) for s in scorers)] for d, row in table["paired"].items()])
    if (path / "grid.png").is_file():
        shutil.copy(path / "grid.png", out / f"evaluation_{path.name}.png")
        html += _img(out / f"evaluation_{path.name}.png", wide=True)
    return html, table, (path / "table.md").read_text()


def main(argv: list[str]) -> dict:
    bare = [a for a in argv if "=" not in a and not a.startswith("-")]
    cfg = load_config(ReportConfig, [a for a in argv if a not in bare])
    cfg.runs = [*cfg.runs, *bare]
    if not cfg.runs:
        raise ConfigError("no run directories given: python jobs/report.py RUN_DIR [RUN_DIR ...]")
    cfg.runs = [storage.local_copy(r, fresh=True) for r in cfg.runs]  # a storage URI: <storage>/<run>/files
    cfg.stitch_run, cfg.dps_run = (storage.local_copy(r, fresh=True) if r else r for r in (cfg.stitch_run, cfg.dps_run))
    cfg.evaluations = [storage.local_copy(r, fresh=True) for r in cfg.evaluations]
    runs = [load_run(path) for path in cfg.runs]
    curves = by_estimator(runs)
    speed = speedups(curves, cfg.baseline)
    run_dir = RunDir(str(Path(cfg.out).parent), Path(cfg.out).name, cfg)
    out = run_dir.path

    plots = {
        "reward_vs_seconds.png": ("reward", "seconds", "evaluation reward"),
        "reward_vs_device_hours.png": ("reward", "device_hours", "evaluation reward"),
        "accuracy_vs_seconds.png": ("caption_accuracy", "seconds", "held-out caption accuracy"),
        "accuracy_vs_device_hours.png": ("caption_accuracy", "device_hours", "held-out caption accuracy"),
    }
    for name, (key, x_axis, ylabel) in plots.items():
        _plot(curves, key, x_axis, ylabel, out / name)
    _plot_phases(curves, out / "phases.png")

    report = {
        "runs": [{"dir": str(r.path), "estimator": r.estimator, "seed": r.seed, "gain": r.gain, "gain_se": r.gain_se} for r in runs],
        "baseline": cfg.baseline,
        "curves": {name: vars(c) for name, c in curves.items()},
        "speedup": speed,
    }
    sections = [
        "<h2>Evaluation reward and held-out accuracy</h2>" + "".join(_img(out / f) for f in plots),
        "<h2>Time to reach the baseline's final reward</h2>"
        + f"<p>Target: {speed['target_reward']:.4f} (final evaluation reward of '{cfg.baseline}').</p>"
        + _table(
            ["estimator", "seconds to target", "speed-up (seconds)", "device-hours to target", "speed-up (device-hours)"],
            [[n, r["seconds_to_target"], r["speedup_seconds"], r["device_hours_to_target"], r["speedup_device_hours"]] for n, r in speed["estimators"].items()],
        ),
        "<h2>Gain over the base policy</h2><p>Last evaluation minus the base policy's, per image on the same prompts and noise (paired), with its standard error.</p>"
        + _table(
            ["run", "estimator", "seed", "final step", "gain", "s.e.", "gain / s.e."],
            [[r.name, r.estimator, r.seed, r.steps[-1], r.gain, r.gain_se, r.gain / r.gain_se if r.gain is not None and r.gain_se else None] for r in runs],
        ),
        "<h2>Seconds per phase</h2>" + _img(out / "phases.png") + _table(["estimator", *PHASES], [[n, *(c.phases[p] for p in PHASES)] for n, c in curves.items()]),
    ]
    if cfg.stitch_run:
        summary = json.loads((Path(cfg.stitch_run) / "summary.json").read_text())
        report["value_accuracy"] = summary["value_accuracy"]["table"]
        shutil.copy(Path(cfg.stitch_run) / "accuracy.png", out / "value_accuracy.png")
        sections.append("<h2>Value accuracy against noise level (jobs/stitch.py)</h2>" + _img(out / "value_accuracy.png", wide=True))
    if cfg.dps_run:
        dps = json.loads((Path(cfg.dps_run) / "summary.json").read_text())
        report["dps"] = dps
        rows = [[m, r["reward_total"], r.get("caption_accuracy"), r["seconds_per_sample"], r["peak_memory_mib"]] for m, r in dps["methods"].items()]
        sections.append("<h2>Guidance (jobs/dps.py)</h2>" + _table(["method", "reward", "caption accuracy", "s / sample", "peak MiB"], rows))
    markdown_tables = []
    for path in cfg.evaluations:
        html, table, markdown = _evaluation_section(Path(path), out)
        sections.append(html)
        report.setdefault("evaluations", {})[Path(path).name] = table
        markdown_tables.append(markdown)
    # sample grids of each estimator's first run at the evaluation steps every curve shares
    shared = sorted(set.intersection(*(set(c.steps) for c in curves.values())))
    grids = []
    for name in curves:
        first = next(r for r in runs if r.estimator == name)
        for step in (shared[0], shared[len(shared) // 2], shared[-1]) if shared else ():
            grid = first.path / "samples" / f"step_{step:05d}.png"
            if grid.is_file():
                grids.append(f"<figure>{_img(grid)}<figcaption>{name}, step {step}</figcaption></figure>")
    if grids:
        sections.append("<h2>Samples at matched steps (fixed prompts, held-out noise)</h2><div class='grids'>" + "".join(grids) + "</div>")

    style = "body{font-family:sans-serif;max-width:1300px;margin:2em auto} img{max-width:32%;margin:4px} table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px 8px} .grids img{max-width:100%} figure{display:inline-block;width:30%}"
    html = f"<!doctype html><html><head><meta charset='utf-8'><title>StitchVM vs the Monte Carlo baseline</title><style>{style}</style></head><body><h1>StitchVM vs the Monte Carlo baseline</h1>{''.join(sections)}</body></html>"
    (out / "report.html").write_text(html)
    if cfg.wandb_project:
        import yaml

        tracking = yaml.safe_load((runs[0].path / "config.yaml").read_text())["wandb"]
        group = tracking["group"] or runs[0].name
        wandb_report = build_wandb_report(list(curves), cfg.wandb_project, cfg.wandb_entity or tracking["entity"] or "offline", group, cfg.baseline, markdown_tables)
        grid = next(b for b in wandb_report.blocks if hasattr(b, "runsets"))
        report["wandb_report"] = {"group": group, "runsets": [rs.name for rs in grid.runsets], "panels": [p.title for p in grid.panels], "tables": len(markdown_tables), "url": None}
        if cfg.wandb_save:
            report["wandb_report"]["url"] = wandb_report.save().url
    run_dir.write_json("report.json", report)
    print(json.dumps(speed, indent=1))
    print(f"wrote {out / 'report.html'}")
    return report


if __name__ == "__main__":
    run_main(main)
