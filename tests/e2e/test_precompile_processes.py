"""test_precompile's tests that run processes (the rest: tests/unit/test_precompile.py)."""

import errno
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace
import pytest
import torch
import torch.nn.functional as F
from torch import nn
import fxtrain as fx
import fxtrain.step._precompile as precompile
from fxtrain._torch import aot, vec_isa
from fxtrain.step._precompile import compile_options
from helpers_step import DAMAGED, child, in_a_kernel, REPLACED


@pytest.mark.slow
def test_a_second_process_loads_the_step_and_trains_bitwise_as_the_compiled_step(tmp_path):
    path = tmp_path / "step.bin"
    # torch.compile's steps run in the first process, not in a third of their own
    first, second = (child(tmp_path, path, mode)[0] for mode in ("save+reference", "load"))
    assert (first["loaded"], second["loaded"]) == (False, True)
    # the same kernels on the same machine: the same bits as torch.compile of the step
    assert first["digest"] == second["digest"] == first["reference"]


@pytest.mark.slow  # every route: the file's checksum covers the caches of torch < 2.13 too
def test_a_bit_flipped_in_a_kernel_is_named_where_a_cold_inductor_cache_would_compile_it(
        tmp_path):
    """Before issue 46 a process whose Inductor cache was cold compiled the flipped source of
    the saved kernel and trained with it (another loss, no warning); now the file is named, the
    step compiled again, and it trains the clean run's bits."""
    path = tmp_path / "step.bin"
    clean = child(tmp_path, path, "save")[0]
    path.write_bytes(in_a_kernel(path.read_bytes()))
    cold = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cold-inductor-cache")}
    flipped, stderr = child(tmp_path, path, "load", cold)
    assert f"fx.precompiled: {path} {DAMAGED}; {REPLACED}" in stderr
    assert flipped["loaded"] is False and flipped["digest"] == clean["digest"]


PROBES = textwrap.dedent("""
    import json, subprocess, sys
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch._inductor import cpu_vec_isa
    import fxtrain as fx

    scripts = []  # what each of Inductor's probes of the CPU ran in its fresh Python
    check_call = subprocess.check_call

    def recorded(argv, *args, **kwargs):
        if list(argv[:2]) == [sys.executable, "-c"]:
            scripts.append(argv[2])
        return check_call(argv, *args, **kwargs)

    subprocess.check_call = recorded

    def loss_fn(state, params, batch):
        return state.apply(params, batch).square().mean()

    state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
    if sys.argv[1] == "precompiled":
        step = fx.precompiled(fx.make_train_step(loss_fn), sys.argv[2],
                              options={"cpp_wrapper": False})
        step(state, torch.ones(4, 2))
    elif sys.argv[1] == "compiled":
        torch.compile(fx.make_train_step(loss_fn), fullgraph=True)(state, torch.ones(4, 2))
    elif sys.argv[1] == "kernel":  # the chunked loss's compiled kernel, called eagerly
        rows, vocab = 128, 1 << 13  # a block of 2**20 logits: the kernel's smallest
        hidden = torch.randn(1, rows + 1, 4, requires_grad=True)
        labels = torch.randint(0, vocab, (1, rows + 1))
        fx.losses.chunked_causal_lm(hidden, torch.randn(vocab, 4), labels,
                                    chunk_size=rows).total.backward()
    picked = [[str(isa), isa.build_arch_flags()] for isa in cpu_vec_isa.valid_vec_isa_list()]
    print(json.dumps({"picked": picked, "scripts": scripts}))
""")


def probes_the_cpu_without_importing_torch_and_picks_as_torch(tmp_path):
    """Torch 2.11 and 2.12 (issue 62): Inductor loads each probe of the CPU's vector
    instructions in a fresh Python that imports torch, six on an AVX-512 machine and most of a
    warm start's time; a process whose first Inductor compile is fxtrain's (fx.precompiled's
    step, a compiled step, the chunked loss's kernel) probes with torch 2.13's way instead (this
    torch's libtorch_cpu, then the probe library, each probe still in a process of its own), and
    Inductor picks the same instructions, with the same flags, as its own probes pick."""
    script = tmp_path / "probes.py"
    script.write_text(PROBES)

    def run(how):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
        done = subprocess.run([sys.executable, str(script), how, str(tmp_path / "step.bin")],
                              text=True, capture_output=True, cwd=tmp_path, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    ours = {how: run(how) for how in ("precompiled", "compiled", "kernel")}
    torchs = run("torch")  # finds the probes built
    assert torchs["scripts"] and all("import torch" in s for s in torchs["scripts"])  # 2.11's
    for how, got in ours.items():
        assert len(got["scripts"]) == len(torchs["scripts"]), how  # the same probes, each alone
        assert not [s for s in got["scripts"] if "import torch" in s], (how, got["scripts"])
        assert got["picked"] and got["picked"] == torchs["picked"], how


# Only where the mechanism exists (torch 2.11 and 2.12: CI's torch 2.11 leg runs it): torch 2.13
# and later probe without importing torch, and fxtrain._torch.vec_isa does nothing there (a skip
# would fail the suite under FXTRAIN_REQUIRE_EXTRAS). Six imports of torch: 25 CPU-s on 2.11.
if vec_isa.NEEDED:
    test_fxtrains_compiles_probe_the_cpu_without_importing_torch_and_pick_as_torch = \
        probes_the_cpu_without_importing_torch_and_picks_as_torch
