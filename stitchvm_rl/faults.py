"""Fault injection for tests: switches that kill a worker hard at a chosen moment, as a preempted
node dies, so that tests can show a run survives it. The jobs expose them as `testing.*` overrides;
every switch is off (-1) by default."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass
class NFTFaults:
    """Fault injection for tests of jobs/nft.py (-1: never)."""

    crash_on_call: int = -1
    """Each rollout actor dies hard once, in its n-th rollout call (-1: never)."""
    crash_in_checkpoint: int = -1
    """Learner rank 1 dies once while writing this epoch's checkpoint (-1: never)."""


@dataclass
class DraftFaults:
    """Fault injection for tests of jobs/draft.py (-1: never)."""

    crash_in_checkpoint: int = -1
    """Learner rank 1 dies once while writing this epoch's checkpoint (-1: never)."""


@dataclass
class StitchFaults:
    """Fault injection for tests of jobs/stitch.py (-1: never)."""

    crash_after_epoch: int = -1
    """Learner rank 1 dies once, mid-way through the epoch after this one (-1: never)."""


def crash_once(files, marker: str = ".crash-injected") -> None:
    """A hard worker death, once per run: `marker` in the run's files (`storage.RunFiles`, seen from
    every node, so a rank restarted elsewhere does not die again) remembers it. The pause lets the
    controller commit the previous epoch's checkpoint first, as in a real run where preemptions do
    not come right after a report."""
    if not files.exists(marker):
        files.touch(marker)
        time.sleep(3)
        os._exit(1)
