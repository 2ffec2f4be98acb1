"""jobs/bench.py's results as markdown (bench.md): one block per section, medians with [min, max]."""

from __future__ import annotations


def _cell(s: dict, unit: float = 1.0, fmt: str = "{:.3g}") -> str:
    return f"{fmt.format(s['median'] * unit)} [{fmt.format(s['min'] * unit)}, {fmt.format(s['max'] * unit)}]"


def table(results: dict) -> str:
    """The results as markdown: one block per section, medians with [min, max]."""
    lines = [f"machine: {results['machine']}", ""]
    r = results.get("nft_epoch")
    if r:
        lines += ["| NFT epoch (in process) | s / epoch | sample s | score s | train s | samples/s | transformer evals / sample (rollout + train fwd) |", "|---|---|---|---|---|---|---|"]
        for e in ("terminal", "stitchvm"):
            p = r[e]
            lines.append(f"| {e} | {_cell(r['seconds_per_epoch'][e])} | {p['sample']:.3g} | {p['score']:.3g} | {p['train']:.3g} | {p['samples_per_second']:.3g} | {p['rollout_evals_per_sample']:.3g} + {p['train_forwards_per_sample']:.3g} |")
        lines += [f"\nterminal / stitchvm seconds per epoch: **{r['speedup_stitchvm_over_terminal']:.2f}x** (transformer evaluations: {r['transformer_evals_ratio']:.2f}x; sampling steps alone: {r['step_count_prediction']:.2f}x)", ""]
    r = results.get("draft_step")
    if r:
        lines += [f"| DRaFT-K step ({r['samples_per_step']} samples, {r['num_steps']} steps; stitchvm stops at k ~ U{{{r['stop_window'][0]}..{r['stop_window'][1]}}}) | s / step | transformer rows / decodes / value evals per sample |", "|---|---|---|"]
        for k, c in r["by_k"].items():
            for e in ("terminal", "stitchvm"):
                n = c["evals_per_sample"][e]
                lines.append(f"| {k}, {e} | {_cell(c['seconds_per_step'][e])} | {n['transformer']:.3g} / {n['decode']:.3g} / {n['value']:.3g} |")
            lines.append(f"| {k}: terminal / stitchvm seconds | **{c['speedup_stitchvm_over_terminal']:.2f}x** | |")
        lines += [""]
    r = results.get("nft_reach")
    if r:
        s = r["speedups"]["estimators"].get("stitchvm", {})
        reached = f"**{s['speedup_seconds']:.2f}x** faster ({s['seconds_to_target']:.1f} s of epoch work)" if s.get("speedup_seconds") else "not reached"
        lines += [f"NFT on Ray, terminal {r['epochs']['terminal']} epochs, stitchvm {r['epochs']['stitchvm']}: s / epoch terminal {r['terminal']['seconds_per_epoch']:.3g}, stitchvm {r['stitchvm']['seconds_per_epoch']:.3g} (**{r['seconds_per_epoch_ratio']:.2f}x**); "
                  f"final eval reward terminal {list(r['terminal']['eval_reward'].values())[-1]:.4f}, stitchvm {list(r['stitchvm']['eval_reward'].values())[-1]:.4f}; to terminal's final reward: stitchvm {reached}", ""]
    r = results.get("dps")
    if r:
        lines += [f"| DPS ({r['samples']} samples, {r['steps']} steps) | ms / sample | peak memory MiB (models + extra) |", "|---|---|---|"]
        for m in ("none", "tweedie", "stitchvm"):
            lines.append(f"| {m} | {_cell(r['seconds_per_sample'][m], 1e3)} | {r['peak_memory_mib'][m]:.0f} ({r['model_memory_mib'][m]:.0f} + {r['extra_peak_memory_mib'][m]['median']:.0f}) |")
        lines += [f"\nstitchvm vs tweedie: **{r['speedup_stitchvm_over_tweedie']:.2f}x** faster, **{r['memory_ratio_stitchvm_over_tweedie']:.2f}x** peak memory", ""]
    r = results.get("value")
    if r:
        lines += [f"| value estimate (sigma {r['sigma']}) | ms / estimate |", "|---|---|"]
        lines += [f"| {m} | {_cell(s, 1e3)} |" for m, s in r["seconds_per_estimate"].items()]
        lines += [""]
    r = results.get("rollout_scaling")
    if r:
        lines += [f"| rollout ({r['samples']} samples, {r['cores']} cores) | samples / s | vs one actor |", "|---|---|---|"]
        for name, rate in r["samples_per_second"].items():
            vs = r["scaling_over_one_actor"].get(name)
            lines.append(f"| {name} | {rate:.3g} | {f'{vs:.2f}x' if vs else '--'} |")
        lines += [f"\none actor / in process: {r['one_actor_over_in_process']:.2f}", ""]
    r = results.get("weight_sync")
    if r:
        lines += [f"| weight sync (LoRA r={r['lora_rank']}, {r['adapter_mib']:.0f} MiB {r['dtype']}) | seconds |", "|---|---|"]
        lines += [f"| {name} | {_cell(s)} |" for name, s in r["seconds"].items()] + [""]
    r = results.get("real_scale")
    if r:
        lines += ["| SD3.5-M DPS step (cost model) | TFLOPs none / tweedie / stitchvm (head shared with CFG) | tweedie / stitchvm FLOPs (head shared) | activations tweedie / stitchvm |", "|---|---|---|---|"]
        for key, c in r["dps_step"].items():
            st = c["step"]
            shared = f" ({st['stitchvm_shared']['flops'] / 1e12:.1f})" if "stitchvm_shared" in st else ""
            shared_ratio = f" ({c['flops_ratio_tweedie_over_stitchvm_shared']:.2f}x)" if "stitchvm_shared" in st else ""
            lines.append(f"| {key} | {st['none']['flops'] / 1e12:.1f} / {st['tweedie']['flops'] / 1e12:.1f} / {st['stitchvm']['flops'] / 1e12:.1f}{shared} | {c['flops_ratio_tweedie_over_stitchvm']:.2f}x{shared_ratio} | {c['activation_ratio_tweedie_over_stitchvm']:.2f}x |")
        n = r["nft_epoch"]
        lines += [f"\nSD3.5-M NFT per sample ({n['resolution']}^2): terminal / stitchvm FLOPs {n['flops_ratio_terminal_over_stitchvm']:.2f}x (sampling steps alone: {n['step_count_prediction']:.2f}x)", ""]
    r = results.get("real_scale_timed")
    if r:
        lines += ["| SD3.5-M DPS step (random weights, timed) | ms none / tweedie / stitchvm | tweedie / stitchvm time | peak GiB tweedie / stitchvm |", "|---|---|---|---|"]
        for key, c in r.items():
            s, peak = c["seconds_per_step"], c["peak_memory_mib"]
            ms = " / ".join(f"{s[m]['median'] * 1e3:.0f}" if m in s else "OOM" for m in ("none", "tweedie", "stitchvm"))
            if c["out_of_memory"]:
                lines.append(f"| {key} | {ms} | -- | {', '.join(c['out_of_memory'])} out of memory; stitchvm {peak.get('stitchvm', 0) / 1024:.1f} |")
            else:
                lines.append(f"| {key} | {ms} | {c['speedup_stitchvm_over_tweedie']:.2f}x | {peak['tweedie'] / 1024:.1f} / {peak['stitchvm'] / 1024:.1f} ({c['memory_ratio_stitchvm_over_tweedie']:.2f}x) |")
                if "speedup_stitchvm_shared_over_tweedie" in c:
                    lines.append(f"| {key}, stitchvm head shared with CFG | {s['stitchvm_shared']['median'] * 1e3:.0f} | {c['speedup_stitchvm_shared_over_tweedie']:.2f}x | {peak['stitchvm_shared'] / 1024:.1f} |")
                if "compile_speedup" in c:
                    ms = " / ".join(f"{s[m + '_compiled']['median'] * 1e3:.0f}" for m in ("none", "tweedie", "stitchvm"))
                    gain = " / ".join(f"{c['compile_speedup'][m]:.2f}x" for m in ("none", "tweedie", "stitchvm"))
                    pt, ps = peak["tweedie_compiled"], peak["stitchvm_compiled"]
                    lines.append(f"| {key}, compiled (eager / compiled: {gain}) | {ms} | {c['speedup_stitchvm_over_tweedie_compiled']:.2f}x | {pt / 1024:.1f} / {ps / 1024:.1f} ({ps / pt:.2f}x) |")
        lines += [""]
    r = results.get("real_scale_nft")
    if r:
        lines += [f"| SD3.5-M NFT, one group of {r['group']} at {r['resolution']}^2 (random weights, timed) | s / group | sample / score / train s |", "|---|---|---|"]
        for m, p in r["phases"].items():
            lines.append(f"| {m} ({r['train_timesteps'][m.removesuffix('_compiled')]} training timesteps) | {_cell(r['seconds_per_group'][m])} | {p['sample']:.3g} / {p['score']:.3g} / {p['train']:.3g} |")
        lines += [f"\nterminal / stitchvm seconds per group: **{r['speedup_stitchvm_over_terminal']:.2f}x**"]
        if "speedup_stitchvm_over_terminal_compiled" in r:
            lines += [f"compiled: {r['speedup_stitchvm_over_terminal_compiled']:.2f}x"]
        lines += [""]
    return "\n".join(lines)
