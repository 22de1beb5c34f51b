import json
import os
import resource
import sys
import time
import types

import pytest
import torch
import torch._dynamo

# The suite by kind (docs/testing.md): unit/ (one process, no launch), e2e/ (real processes of one
# rank), ranks/ (2- and 4-rank jobs), tools/ (benchmarks, the GPU kit, docs, notebooks). Shared
# modules sit here: helpers.py, the helpers several test files share by topic (helpers_*.py),
# dist_worker.py, sp_worker.py and syncs.py. A test file imports from them, never from another
# test module (tests/unit/test_suite_layout.py checks it); every folder is on sys.path all the same.
_HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("unit", "e2e", "ranks", "tools")
for _kind in KINDS:
    if os.path.join(_HERE, _kind) not in sys.path:
        sys.path.insert(0, os.path.join(_HERE, _kind))

# the shared helpers' asserts report their values as a test module's do
pytest.register_assert_rewrite(*sorted(
    name[:-3] for name in os.listdir(_HERE) if name.startswith("helpers") and name.endswith(".py")))

from helpers import extra  # noqa: E402

# Under pytest-xdist each worker gets its share of the cores (two workers on a 2-core machine
# would otherwise run four threads on two cores).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
# and the processes tests start (demo runs, notebooks, ranks): OpenMP threads spin while they
# wait, so two processes with two threads each on two cores run several times slower
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

# comet_ml, when imported (CometWriter's tests and doctest), would otherwise install its import
# hook that patches modules imported after it (mlflow's and tensorboard's among them, in the
# same worker) and, in one process of two, Sentry error reporting over the network
for _name, _value in (("COMET_DISABLE_AUTO_LOGGING", "1"), ("COMET_ERROR_TRACKING_ENABLE", "false"),
                      ("COMET_DISABLE_ANNOUNCEMENT", "1")):
    os.environ.setdefault(_name, _value)

# tensorboard's reader imports TensorFlow when it is installed (the clu extra installs it);
# this module is tensorboard's own switch for its TensorFlow-free build. TensorFlow runs only
# in the clu test, in a subprocess.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

# a fixture several test files read (the 4-rank runs on a 2 x 2 mesh, once per run)
from helpers_meshes import mesh_jobs  # noqa: E402, F401
# and another (the rank jobs on the saved pretrained models, once per run)
from helpers_pretrained import pretrained_jobs  # noqa: E402, F401


_TORCH = os.path.dirname(torch.__file__) + os.sep


def _from_torch_itself() -> bool:
    """Whether the process being started is torch's own (Inductor's C++ compiler and its checks,
    its compile workers, a DataLoader's workers): the caller nearest the launch, past the
    standard library's subprocess and multiprocessing, is torch's, but for torch.multiprocessing
    and torch.distributed.run, which a test calls to start ranks."""
    import traceback
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename
        if os.sep + "subprocess.py" in name or os.sep + "multiprocessing" + os.sep in name:
            continue
        return name.startswith(_TORCH) and not any(
            part in name for part in ("multiprocessing", os.sep + "run.py"))
    return False


def _launches(args) -> bool:
    """Whether a ``subprocess.Popen`` of ``args`` starts a Python program (a script, torchrun,
    fxtrain's CLI, a notebook kernel) for the test, not for torch itself."""
    argv = [str(a) for a in ([args] if isinstance(args, (str, bytes, os.PathLike)) else args)]
    if not argv or _from_torch_itself():
        return False
    first = os.path.basename(argv[0].split()[0]) if argv[0] else ""
    return first.startswith("python") or first in ("torchrun", "fxtrain", "jupyter") or \
        argv[0] == sys.executable


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _torch_launches() -> bool:
    """Whether torch itself starts the process (the caller of ``subprocess`` is in torch's
    package): Inductor's probes of the CPU's vector instructions on torch 2.15 run a Python
    process (``cpu_vec_isa._probe_load``), as its compile workers do."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.endswith("subprocess.py"):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR)


@pytest.fixture(autouse=True)
def _unit_tests_launch_nothing(request, monkeypatch):
    """A test in unit/ that starts a Python process or a rank fails: it belongs in e2e/ or
    ranks/ (the kinds have budgets of their own, and the second torch runs unit/)."""
    if os.path.basename(os.path.dirname(str(request.node.fspath))) != "unit":
        yield
        return
    import multiprocessing.process
    import subprocess

    def refuse(what):
        raise AssertionError(f"{request.node.nodeid} launches {what}: a unit test runs in one "
                             "process; move it to tests/e2e/ (processes) or tests/ranks/ (ranks)")

    popen, start = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start

    def checked(self, args, *rest, **kwargs):
        if _launches(args) and not _torch_launches():
            refuse(f"a Python process ({args!r:.100})")
        popen(self, args, *rest, **kwargs)

    def started(self):
        if not _from_torch_itself():
            refuse("a multiprocessing process (a rank)")
        start(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", started)
    yield


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


@pytest.fixture(scope="module")
def one_rank():
    """A process group of this process alone (gloo, rank 0 of 1) for the module's tests: what
    fx.shard needs, without spawning ranks."""
    from helpers_distributed import free_port
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


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


SHARED = ("run_all", "distributed_jobs", "sharding_jobs", "simulated_rows", "sp_jobs",
          "mesh_jobs", "tp_jobs", "loss_jobs",
          "resume_refs", "pretrained_jobs")
"""Fixtures made once per test run behind a lock (``helpers.once_per_run``)."""


def pytest_collection_modifyitems(config, items):
    """The slow tests first, so that the longest start early and none is left running alone at
    the end (scripts/test.sh hands the workers one test at a time, ``--maxschedchunk 1``: in
    xdist's default chunks of ~150 consecutive tests a slow one began 13 minutes in and ran
    2 minutes past the other worker's end). The tests that read a fixture made once per run
    behind a lock (``SHARED``: the benchmark smoke run, the rank jobs several tests share,
    ``helpers.once_per_run``): the first of each goes first, the rest last, where they only
    read its results (together, a second worker would wait on the lock)."""
    def shared(item):
        return next((f for f in SHARED if f in getattr(item, "fixturenames", ())), None)

    def rank(item):
        if shared(item):
            return 0 if item is first[shared(item)] else 3
        return 1 if item.get_closest_marker("slow") or item.get_closest_marker("extended") else 2

    first = {}
    for item in items:
        first.setdefault(shared(item), item)
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
