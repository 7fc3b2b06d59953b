"""Run a script that compiles kernels for sm_90 with Triton's bundled ptxas (no GPU needed), outside the
interpreter the CPU tests run in; the tests that call it check a GPU run would not meet a compile error."""

import os
import subprocess
import sys

import pytest


def compile_script_output(script: str) -> list[str]:
    """The words the script printed; skips the test where this Triton has no ptxas, fails it on an error."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the GPU default today
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("no ptxas")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()
