import importlib
import os
import pathlib
import random
import sys

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import_hub_kernels_first() -> None:
    """transformers (>= 5.25) imports Hugging Face's `kernels` package when it is installed. `python -m
    pytest` puts the working directory, this checkout's root, first on sys.path, where our own `kernels/`
    folder (installed as mlapipe.kernels) would be found under that name instead. Importing HF's package
    once with the root left out puts the right module in sys.modules; mlapipe never imports a top-level
    `kernels`."""

    def is_root(entry: str) -> bool:
        return pathlib.Path(entry or ".").resolve() == ROOT

    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if not is_root(entry)]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: transformers does without it
    finally:
        sys.path[:] = saved


_import_hub_kernels_first()


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def pytest_collection_modifyitems(config, items):
    count = _cuda_count()
    for item in items:
        if "gpu" in item.keywords and count < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and count < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds, so a failure reproduces."""
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the pipeline tests, sized like the CI machine."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
