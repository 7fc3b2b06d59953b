"""Installed into a fresh virtual environment beside Hugging Face's `kernels` package (PyPI), mlapipe
adds one top-level name, `mlapipe`, and both packages import: our `kernels` folder is
`mlapipe.kernels`, so it no longer shadows HF's (issue: it broke transformers' kernel hub)."""

import json
import os
import pathlib
import subprocess
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Run inside the venv: which top-level names our distribution installed, and where both packages are.
PROBE = """
import importlib.metadata as md, json, pathlib, sys
dist = md.distribution("mlapipe")
tops = sorted({pathlib.PurePosixPath(str(f)).parts[0] for f in dist.files
               if not str(f).startswith(("..", "mlapipe-")) and "dist-info" not in str(f)})
import kernels, mlapipe, mlapipe.kernels.amb
print(json.dumps({
    "tops": tops,
    "top_level_txt": (dist.read_text("top_level.txt") or "").split(),
    "hf_kernels": kernels.__file__,
    "hf_has_get_kernel": hasattr(kernels, "get_kernel"),
    "ours": mlapipe.__file__,
    "our_kernels": mlapipe.kernels.amb.__file__,
    "version": mlapipe.__version__,
    "prefix": sys.prefix,
}))
"""


# The venv sees only itself: no PYTHONPATH (a checkout on it would be imported instead of the install).
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE")}


def _pip(python: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=CLEAN_ENV,
    )


@pytest.mark.slow
def test_fresh_venv_has_only_mlapipe_beside_hf_kernels(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    hf = _pip(python, "kernels")
    if hf.returncode != 0 and ("No matching distribution" in hf.stderr or "connection" in hf.stderr.lower()):
        pytest.skip(f"PyPI is not reachable from here: {hf.stderr.strip().splitlines()[-1]}")
    assert hf.returncode == 0, hf.stderr[-2000:]
    ours = _pip(python, "--no-deps", str(ROOT))  # a regular (not editable) install, as a user gets
    assert ours.returncode == 0, ours.stderr[-2000:]
    probe = subprocess.run(
        [str(python), "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout)
    assert found["prefix"] == str(env_dir)  # the venv's own interpreter, not this one
    assert found["tops"] == ["mlapipe"] and found["top_level_txt"] == ["mlapipe"]
    site = pathlib.Path(found["hf_kernels"]).parents[1]
    assert (
        pathlib.Path(found["hf_kernels"]) == site / "kernels" / "__init__.py" and found["hf_has_get_kernel"]
    )
    assert pathlib.Path(found["ours"]) == site / "mlapipe" / "__init__.py"
    assert pathlib.Path(found["our_kernels"]) == site / "mlapipe" / "kernels" / "amb.py"
    assert found["version"] != "0+unknown"
