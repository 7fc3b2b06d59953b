"""How many torch threads a CPU stage computes with.

Each Ray stage is a process of its own, and the in-process engine (pipeline 1) shares the machine with
whatever else runs there. torch's default (one thread per core) makes its OpenMP threads wait on each
other whenever another process holds a core, and then a step takes many times longer: on the 2-core
machine, one thread against torch's two, the demo decodes at 352 against 48 t/s with the machine
nearly idle and 52 against 2.6 t/s under load (workers/NOTES.md has the figures). One thread is also what every Ray stage has always used, so a
CPU run gives the same bits at any pipeline size. MLAPIPE_CPU_THREADS (or OMP_NUM_THREADS, if set)
chooses another count for machines with cores to spare.
"""

from __future__ import annotations

import os

ENV = "MLAPIPE_CPU_THREADS"


def cpu_threads(environ=os.environ) -> int:
    for name in (ENV, "OMP_NUM_THREADS"):
        value = environ.get(name, "").strip()
        if not value:
            continue
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{name}={value!r}: expected a number of threads (1 or more)")
        return int(value)
    return 1
