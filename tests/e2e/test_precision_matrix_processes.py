"""Every precision policy trained long enough to go wrong (benchmarks/precision.py), under each
vector instruction set this machine runs: its default (AVX-512 where it has it) and AVX2
(``ATEN_CPU_CAPABILITY=avx2``: ATen's kernels and Inductor's C++ on their AVX2 code), so that
an AVX-512 machine trains both code paths. Each leg runs in a process of its own, with its own
Inductor cache, and with torch's deterministic algorithms on, as the demo runs (a
``torch.empty`` outside Inductor's kernels is NaN there; Inductor's own buffers are not filled).

The bfloat16 branch a machine with native bfloat16 takes (``FXTRAIN_NATIVE_BF16=1``) is
forced on every machine. The bands are the arithmetic's (benchmarks/precision.py's module)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "precision.py"
LINE = re.compile(r"^(mlp|transformer)\s+(\S+)(?: \+ (\S+))?\s+(\S+)\s+final (\S+)\s+worst\s+(\S+)"
                  r"\s+band (\S+)\s+(within|OUTSIDE|refused)")


def _capabilities() -> list[str]:
    """This machine's default capability and AVX2, once each (an AVX2 machine runs one leg)."""
    default = torch.backends.cpu.get_cpu_capability().lower()
    return [default] if default in ("avx2", "default") else [default, "avx2"]


def _run(tmp_path: Path, capability: str, *args: str) -> tuple[int, list[tuple], str]:
    env = {**os.environ, "FXTRAIN_NATIVE_BF16": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{capability}")}
    if capability == "avx2":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    rows = [m.groups() for m in map(LINE.match, proc.stdout.splitlines()) if m]
    return proc.returncode, rows, proc.stdout + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("capability", _capabilities())
def test_every_policy_trains_its_curve_within_its_band(tmp_path, capability):
    """The MLP under every policy, eager (torch.func) and compiled (autograd), 60 steps each,
    every held-out point finite and within its band of float32's; under the machine's default
    capability also the demo's transformer under bf16-mixed compiled (the step that went NaN by
    step 20 on an AVX-512 machine with native bfloat16; on an AVX2 machine the default is the
    AVX2 leg, so both kinds of machine train it on the code they run by default)."""
    code, rows, out = _run(tmp_path, capability, "--models", "mlp", "--paths", "eager/func",
                           "compiled/autograd", "--reference", "eager/func")
    assert code == 0, out
    assert f"CPU capability {capability.upper()}" in out
    policies = {(policy, path) for _, policy, _, path, *_ in rows}
    assert policies == {(p, path) for p in ("32", "bf16-mixed", "16-mixed", "bf16-true", "fp8")
                        for path in ("eager/func", "compiled/autograd")}, out
    assert all(verdict == "within" for *_, verdict in rows), out
    if capability != _capabilities()[0]:
        return
    code, rows, out = _run(tmp_path, capability, "--models", "transformer", "--policies",
                           "bf16-mixed", "--paths", "compiled/autograd", "--reference",
                           "eager/autograd", "--eval-examples", "64")
    assert code == 0 and [r[-1] for r in rows] == ["within"], out


@pytest.mark.slow
def test_a_planted_bug_leaves_the_band(tmp_path):
    """The master weights rounded to bfloat16 after every update (a bf16-mixed step that lost
    its float32 copy): the curve leaves bf16-mixed's band, and the script fails."""
    code, rows, out = _run(tmp_path, "default", "--models", "mlp", "--policies", "bf16-mixed",
                           "--paths", "eager/autograd", "--plant", "masters-in-bf16")
    assert code == 1 and [r[-1] for r in rows] == ["OUTSIDE"], out
    assert rows[0][2] == "masters-in-bf16"
