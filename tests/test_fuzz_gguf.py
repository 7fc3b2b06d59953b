"""Fuzz: 2,500 damaged copies of the demo model (tests/gguf_fuzz.py says how they are made), each
opened in-process by the engine as a user's file would be, under a time and a memory budget.

Every outcome must be one of:
- the project's file error (ModelFileError), one line, naming the file;
- a model that loads and whose logits for a fixed prompt equal the original's, bit for bit (a flip
  inside a token string, say, changes the tokenizer but not the model).
Anything else fails the test: another exception, a hang past the time budget, memory past the budget
(the address-space limit turns a blow-up into a MemoryError), or a model that loads and computes
something else. Two worker processes share the files (two cores); the table printed last counts the
outcomes per kind of damage.
"""

from __future__ import annotations

import collections
import os
import resource
import signal
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest

SEED = 15
WORKERS = 2
TIME_BUDGET_S = 10.0  # per file; a clean load and forward of the demo model takes ~0.15 s
MEMORY_BUDGET = 1 << 30  # address space a worker may grow by beyond what it holds at the start
PROMPT = [5, 17, 42, 99, 7, 250]


class _OverTime(Exception):
    pass


def _on_alarm(signum, frame):
    raise _OverTime


def _worker_setup() -> None:
    import torch

    torch.set_num_threads(1)  # two workers on two cores
    import mlapipe.runtime.engine  # noqa: F401  (imports before the limit: they map a lot of address space)
    import mlapipe.workers.local_executor  # noqa: F401

    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + MEMORY_BUDGET, resource.RLIM_INFINITY))
    signal.signal(signal.SIGALRM, _on_alarm)


def _logits(path: str) -> np.ndarray:
    """What a user's run does with the file: an Engine (model, config, tokenizer, weights), then the
    logits of a fixed prompt."""
    from mlapipe.runtime.engine import Engine
    from mlapipe.runtime.microbatch import MicroBatch, SequenceChunk

    with Engine(path, n_ctx=16, block_size=16, kv_blocks=1, decode_steps=1, progress=False) as engine:
        runner = engine.executor.runner
        batch = MicroBatch(0, [SequenceChunk("fuzz", PROMPT, 0, [0], sample=False, return_logits=True)])
        return runner.finish(batch, runner.forward(batch)).logits["fuzz"]


def _outcome(path: str, reference: np.ndarray) -> tuple[str, str]:
    """(status, detail): status 'file error' or 'same logits' pass; anything else is a failure."""
    from mlapipe.runtime.gguf_model import ModelFileError

    signal.setitimer(signal.ITIMER_REAL, TIME_BUDGET_S)
    try:
        logits = _logits(path)
    except ModelFileError as e:
        message = str(e)
        if path not in message or "\n" in message:
            return "bad message", message[:300]
        return "file error", message[len(path) + 2 :][:120]
    except _OverTime:
        return "over time", f"more than {TIME_BUDGET_S} s"
    except MemoryError:
        return "over memory", f"more than {MEMORY_BUDGET >> 20} MiB"
    except Exception as e:
        return "other exception", f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if logits.shape == reference.shape and np.array_equal(logits, reference):
        return "same logits", ""
    return (
        "different logits",
        f"max difference {np.nanmax(np.abs(logits - reference)) if logits.shape == reference.shape else logits.shape}",
    )


def _run_share(worker: int, source: str, folder: str) -> tuple[np.ndarray, list[tuple[str, str, str, str]]]:
    from tests.gguf_fuzz import mutations

    reference = _logits(source)
    path = os.path.join(folder, f"mutant-{worker}.gguf")
    results = []
    for i, (kind, description, data) in enumerate(mutations(source, SEED)):
        if i % WORKERS != worker:
            continue
        with open(path, "wb") as f:
            f.write(data)
        status, detail = _outcome(path, reference)
        results.append((kind, description, status, detail))
    os.remove(path)
    return reference, results


@pytest.mark.slow
def test_damaged_files_fail_cleanly_or_load_the_same_model(tmp_path):
    from mlapipe.runtime.tiny_models import demo_model_path
    from tests.gguf_fuzz import PLAN

    source = demo_model_path()
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else str(tmp_path)
    folder = tempfile.mkdtemp(prefix="mlapipe-fuzz-", dir=folder)
    try:
        with ProcessPoolExecutor(WORKERS, mp_context=get_context("spawn"), initializer=_worker_setup) as pool:
            shares = list(pool.map(_run_share, range(WORKERS), [source] * WORKERS, [folder] * WORKERS))
    finally:
        os.rmdir(folder)
    assert np.array_equal(shares[0][0], shares[1][0]) and np.isfinite(shares[0][0]).all()
    results = [r for _, share in shares for r in share]
    assert len(results) == sum(PLAN.values()) >= 2000

    table = collections.Counter((kind, status) for kind, _, status, _ in results)
    statuses = sorted({status for _, status in table})
    print(f"\n{'damage':18s}" + "".join(f"{s:>18s}" for s in statuses))
    for kind in PLAN:
        print(f"{kind:18s}" + "".join(f"{table[kind, s]:18d}" for s in statuses))
    failures = [r for r in results if r[2] not in ("file error", "same logits")]
    shown = "\n".join(
        f"  {kind}: {description}: {status}: {detail}" for kind, description, status, detail in failures[:30]
    )
    assert not failures, f"{len(failures)} of {len(results)} damaged files ended otherwise:\n{shown}"
    # the damage was real: most kinds are refused every time, and every kind at least once
    for kind in PLAN:
        assert table[kind, "file error"] > 0, kind
