import json
import os
import resource
import sys
import time
import types

import pytest
import torch
import torch._dynamo
from helpers import extra

# Under pytest-xdist each worker gets its share of the cores (two workers on a 2-core machine
# would otherwise run four threads on two cores).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
# and the processes tests start (demo runs, notebooks, ranks): OpenMP threads spin while they
# wait, so two processes with two threads each on two cores run several times slower
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

# tensorboard's reader imports TensorFlow when it is installed (the clu extra installs it);
# this module is tensorboard's own switch for its TensorFlow-free build. TensorFlow runs only
# in the clu test, in a subprocess.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.warn_once_cache.clear()  # so a test can see what Dynamo warns of
    yield


# FXTRAIN_REQUIRE_EXTRAS=1 (set by .ci/run): a skipped test is a failed one, so no test vanishes
# because an extra failed to install or a probe failed. Tests that need hardware CI does not
# have (a GPU) are marked `hardware` and may still skip.
def _strict(report, item=None) -> None:
    if not report.skipped or os.environ.get("FXTRAIN_REQUIRE_EXTRAS") != "1":
        return
    if item is not None and item.get_closest_marker("hardware"):
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped under FXTRAIN_REQUIRE_EXTRAS=1, which allows no skips: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _strict(outcome.get_result(), item)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _strict(outcome.get_result())


@pytest.fixture(scope="module")
def x64():
    """JAX in float64 for the module's tests (its setting restored after)."""
    jax = extra("jax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


# FXTRAIN_TEST_CPU=FILE: each test's CPU seconds (this process's and the processes it waited
# for: demo runs, ranks, notebook kernels) appended to FILE as JSON lines. Wall times under
# pytest-xdist depend on what the other worker runs at the same time; CPU seconds do not, so
# they say where a CPU-bound suite's time goes (scripts/test_cpu.py sums them; docs/testing.md).
def _cpu_seconds() -> float:
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = os.environ.get("FXTRAIN_TEST_CPU")
    before, start = (_cpu_seconds(), time.time()) if path else (0.0, 0.0)
    yield
    if path:
        row = {"test": item.nodeid, "cpu_s": _cpu_seconds() - before, "start": start,
               "end": time.time(), "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def pytest_collection_modifyitems(config, items):
    """The slow tests first, so that the longest start early and none is left running alone at
    the end (scripts/test.sh hands the workers one test at a time, ``--maxschedchunk 1``: in
    xdist's default chunks of ~150 consecutive tests a slow one began 13 minutes in and ran
    2 minutes past the other worker's end). The tests on the benchmark smoke run share one
    fixture behind a lock: the first of them goes first, the rest last, where they only read
    its results (together, a second worker would wait on the lock)."""
    def rank(item):
        if "run_all" in getattr(item, "fixturenames", ()):
            return 0 if item is first_smoke else 3
        return 1 if item.get_closest_marker("slow") else 2

    first_smoke = next((i for i in items if "run_all" in getattr(i, "fixturenames", ())), None)
    items.sort(key=rank)  # stable: collection order within each rank
    for item in items:
        _needs_torch(item)


def _needs_torch(item) -> None:
    """``@pytest.mark.needs_torch(2, 13, "what")``: on an older torch the test must fail (a
    strict xfail, not a skip: it still runs), beside a test that asserts the refusal's own
    message there (docs/torch-versions.md lists them)."""
    from fxtrain._torch.version import at_least

    marker = item.get_closest_marker("needs_torch")
    if marker is not None and not at_least(*marker.args[:2]):
        major, minor, what = marker.args
        item.add_marker(pytest.mark.xfail(
            strict=True, reason=f"{what} needs torch {major}.{minor} or later; this process has "
                                f"torch {torch.__version__} (the refusal is tested)"))
