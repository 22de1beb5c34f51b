"""test_checkpoint_damage's tests that run processes (the rest: tests/unit/test_checkpoint_damage.py)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
import pytest
import torch
import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager, DamagedCheckpointError
from helpers import TESTS, mlp, xent
from helpers_checkpoint_damage import (FIRST_SAVE_THEN_COMPILE, UNREADABLE, data_files,
                                       empty_description, saved, truncate, unprivileged)


def test_inspect_lists_every_step_and_marks_the_damaged_ones(saved, tmp_path, capfd):
    from fxtrain import cli
    run, _ = saved
    directory = tmp_path / "run"
    shutil.copytree(run, directory)

    def rows(out):
        return {line.split()[1]: line for line in out.splitlines()
                if line.startswith("│") and line.split()[1].isdigit()}

    empty_description(directory / "10")
    assert cli.main(["inspect", str(directory)]) == 1
    out, err = capfd.readouterr()
    assert "ok" in rows(out)["5"] and "DAMAGED" in rows(out)["10"], out
    assert f"{directory / '10'} is damaged" in err and "Event loop is closed" not in err
    truncate(directory / "5")  # its description reads: listed as ok unless verified
    assert cli.main(["inspect", str(directory), "--step", "5"]) == 1  # (10 is damaged)
    assert "ok" in rows(capfd.readouterr().out)["5"]
    # as a user runs it (in a process of its own: tensorstore's late callbacks into orbax's
    # closed event loop printed 15 'Event loop is closed' tracebacks over the real error)
    done = subprocess.run([sys.executable, "-m", "fxtrain", "inspect", str(directory),
                           "--verify"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 1
    assert "DAMAGED" in rows(done.stdout)["5"] and "reading its arrays" in done.stderr
    assert "Event loop is closed" not in done.stderr, done.stderr


def test_the_first_asynchronous_save_never_races_the_first_compile(tmp_path):
    done = subprocess.run([sys.executable, "-c", FIRST_SAVE_THEN_COMPILE, str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("what", ["file", "folder"])
def test_an_unreadable_file_is_not_damage_the_run_stops_naming_it_and_nothing_moves(saved, what):
    """Permissions are not damage: the checkpoint is not set aside, fit does not go back to
    step 5, and the message names the file (or the folder it may not enter) and the cause."""
    import tempfile
    run, _ = saved
    home = Path(tempfile.mkdtemp(prefix="fxtrain-unreadable-"))
    try:
        home.chmod(0o777)
        directory = home / "run"
        shutil.copytree(run, directory)
        for p in [directory, *directory.rglob("*")]:
            p.chmod(0o777 if p.is_dir() else 0o666)
        if what == "file":
            locked = data_files(directory / "10")[0]
            locked.chmod(0)
        else:  # a folder it may not enter
            locked = directory / "10"
            locked.chmod(0)
        before = sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))
        done = subprocess.run(
            [*unprivileged(), sys.executable, "-c", UNREADABLE, str(directory),
             str(TESTS)], capture_output=True, text=True, timeout=300,
            env={**os.environ, "HOME": str(home), "TMPDIR": str(home), "COLUMNS": "300"},
            cwd=home)
        assert done.returncode == 0, done.stderr[-3000:]
        said = done.stdout
        assert f"cannot read the checkpoint at {directory / '10'}" in said, said
        assert str(locked) in said and "Permission denied" in said, said
        assert "nothing was set aside or skipped" in said, said
        row = next(line for line in said.splitlines() if line.startswith("│ ") and
                   line.split()[1] == "10")
        assert "UNREADABLE" in row and "inspect exits 1" in said, said
        assert re.search(rf"{re.escape(str(directory / '10'))} cannot be read: "
                         rf"{re.escape(str(locked))}\S* cannot be opened", done.stderr), done.stderr
        assert sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) == before
    finally:
        for p in home.rglob("*"):
            p.chmod(0o700)
        shutil.rmtree(home)
