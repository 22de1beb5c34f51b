"""test_export_pretrained's tests that run processes (the rest: tests/unit/test_export_pretrained.py)."""

import json
import pytest
import torch
import torch.multiprocessing as mp
import dist_worker
import fxtrain as fx
from fxtrain import cli
from helpers import extra
from helpers_export_pretrained import loaded, logits, trained


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(tmp_path):
    """Issue 60, hole 5: an export killed while writing left its hidden staging folder (up to
    a model's size) beside the target for ever. The next export into that target removes it,
    saying so; a live export's is left alone."""
    import subprocess
    import sys
    import textwrap
    _, ckpt = trained(tmp_path, steps=1)
    killed = textwrap.dedent(f"""
        import os, signal
        import fxtrain as fx
        import fxtrain.apps._pretrained as p
        write = p._write_file
        def dying(*args):
            write(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        p._write_file = dying
        fx.export_pretrained({str(ckpt)!r}, {str(tmp_path / 'hf')!r})
        """)
    done = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.partial-")]
    assert len(left) == 1 and (left[0] / "model.safetensors").exists()
    with pytest.warns(RuntimeWarning, match=f"removed {left[0]}, the staging folder of an "
                                            "export that was killed"):
        out = fx.export_pretrained(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]
    assert torch.equal(logits(loaded(out)), logits(loaded(out)))
    live = tmp_path / ".again.partial-live"  # a staging folder just made (no lock yet): kept
    live.mkdir()
    fx.export_pretrained(ckpt, tmp_path / "again")
    assert live.exists()
