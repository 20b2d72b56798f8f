from __future__ import annotations

import os

# Threaded BLAS on tiny matrices is slower than one thread, and much slower on a loaded 2-core CI
# machine; set before numpy/torch are imported by any test module.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Intra-op threads only oversubscribe the tiny matmuls of these tests (measured up to 30x slower
# on a loaded 2-core machine); one thread also keeps timings and float reductions repeatable.
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
