"""Hand-made mutants of the core rules, each with the tests that must kill it (run by hand, not in CI).

    python tests/mutants/run.py                 # every mutant
    python tests/mutants/run.py 03 fk           # those whose file name contains "03" or "fk"

Each `*.patch` beside this file breaks one rule of the maths or the plumbing. Its first lines name
the rule and the tests that guard it:

    # rule: advantages are centred per prompt
    # kill: tests/test_nft.py::test_normalisation_maps_an_unclipped_group_to_mean_one_half

The runner applies one patch to the working tree, runs its tests, and reverts the patch; a mutant
survives when every one of its tests still passes. Mutation testing tools (mutmut) cannot see the
code Ray workers run, which is why these are patches: the tests run the mutated tree for real,
workers included. The tree must be clean of changes to the patched files before a run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def header(patch: Path, field: str) -> list[str]:
    """The values of `# field: ...` lines at the top of a patch."""
    prefix = f"# {field}:"
    return [line[len(prefix):].strip() for line in patch.read_text().splitlines() if line.startswith(prefix)]


def git_apply(patch: Path, *flags: str) -> None:
    subprocess.run(["git", "apply", *flags, str(patch)], cwd=ROOT, check=True)


def run_mutant(patch: Path) -> tuple[bool, str, float]:
    """(killed, output tail, seconds): apply, run the named tests, revert."""
    tests = header(patch, "kill")
    if not tests:
        raise SystemExit(f"{patch.name} names no test to kill it ('# kill: tests/...::test_...')")
    git_apply(patch, "--check")
    start = time.perf_counter()
    git_apply(patch)
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT, capture_output=True, text=True)
    finally:
        git_apply(patch, "-R")
    return result.returncode != 0, (result.stdout + result.stderr).strip().splitlines()[-1:], time.perf_counter() - start


def main(selectors: list[str]) -> int:
    patches = sorted(p for p in HERE.glob("*.patch") if not selectors or any(s in p.name for s in selectors))
    survivors = []
    print("| mutant | rule | killed by | result |\n|---|---|---|---|")
    for patch in patches:
        killed, tail, seconds = run_mutant(patch)
        rule, tests = header(patch, "rule")[0], ", ".join(t.split("::")[-1] for t in header(patch, "kill"))
        print(f"| {patch.stem} | {rule} | {tests} | {'killed' if killed else 'SURVIVED'} ({seconds:.0f} s; {' '.join(tail)}) |", flush=True)
        if not killed:
            survivors.append(patch.stem)
    print(f"\n{len(patches) - len(survivors)} of {len(patches)} mutants killed" + (f"; survived: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
