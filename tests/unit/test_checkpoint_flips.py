"""One-bit flips over every file of a checkpoint, ordinary (orbax) and sharded
(torch.distributed.checkpoint): none restores other values silently; each is named as damage
(``DamagedCheckpointError`` naming the checkpoint), and ``fit`` falls back to the newest
readable step. A truncated shard is damage too, never torch's ``CheckpointException``."""

import json
import os
import shutil

import pytest

import fxtrain as fx
from fxtrain import cli
from fxtrain.checkpoint import (CheckpointManager, DamagedCheckpointError, bridge, layout,
                                shards, store)
from helpers_checkpoint_damage import template, train  # the same run, checkpoints of 5 and 10

FLIPS_PER_FILE = 32


def as_sharded(run, into):
    """The manager directory ``run`` again, each step written as a sharded checkpoint (the
    format ``fx.shard``'s states are saved in; written by one process here)."""
    into.mkdir()
    for step in CheckpointManager(run).all_steps():
        s = fx.checkpoint.restore(run / str(step), like=template())
        values, meta = bridge.table(s)
        shards.write(into / str(step), values, store.meta_for(s, meta, {}, {}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints of steps 5 and 10 (ordinary and sharded), and the digest of the same run
    trained on to 15 without a stop."""
    root = tmp_path_factory.mktemp("flips")
    train(root / "ordinary", 10)
    as_sharded(root / "ordinary", root / "sharded")
    return root, fx.tree_digest(train(root / "whole", 15))


def files(step_dir):
    return sorted(p for p in step_dir.rglob("*") if p.is_file())


def flip(file, position):
    data = bytearray(file.read_bytes())
    data[position] ^= 1 << (position % 8)
    file.write_bytes(bytes(data))


def sweep(step_dir, like, expected):
    """Flips one bit at ``FLIPS_PER_FILE`` places of every file of ``step_dir`` in turn (each
    put back after), restoring each time; returns {(file, outcome): count}."""
    outcomes = {}
    for f in files(step_dir):
        original = f.read_bytes()
        stride = max(1, len(original) // FLIPS_PER_FILE)
        for position in range(0, len(original), stride):
            flip(f, position)
            try:
                restored = fx.checkpoint.restore(step_dir, like=like)
                outcome = "same" if fx.tree_digest(restored) == expected else "OTHER VALUES"
            except DamagedCheckpointError as e:
                assert f"the checkpoint at {step_dir} is damaged" in str(e), str(e)
                outcome = "named"
            except BaseException as e:  # noqa: BLE001 (what the sweep is looking for)
                outcome = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                f.write_bytes(original)
            key = (str(f.relative_to(step_dir)), outcome)
            outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes


@pytest.mark.parametrize("kind", ["ordinary", "sharded"])
def test_one_bit_flips_over_every_file_restore_the_same_values_or_are_named(runs, tmp_path,
                                                                            kind):
    root, _ = runs
    step_dir = tmp_path / "10"
    shutil.copytree(root / kind / "10", step_dir)
    expected = fx.tree_digest(fx.checkpoint.restore(step_dir, like=template()))
    outcomes = sweep(step_dir, template(), expected)
    wrong = {k: n for k, n in outcomes.items() if k[1] not in ("same", "named")}
    assert not wrong, wrong
    # the files that hold values or their description are always named when flipped
    named = {name for name, outcome in outcomes if outcome == "named"}
    must = {"fxtrain/metadata", "state/manifest.ocdbt"} if kind == "ordinary" else {
        "fxtrain.json", "shards/.metadata", "shards/__0_0.distcp"}
    assert must <= named, outcomes


@pytest.mark.parametrize("kind", ["ordinary", "sharded"])
def test_every_one_bit_flip_of_the_description_is_named_or_changes_nothing(runs, kind):
    """Each byte of the JSON description, one bit each: ``read_meta`` names the damage or reads
    the very same description (a checksum covers it: a flip that keeps it valid JSON, in a
    shape, a checksum or a key, is no longer read as the user's model being different)."""
    root, _ = runs
    step_dir = root / kind / "5"
    file = step_dir / (layout.TABLE if kind == "sharded" else "fxtrain/metadata")
    original = file.read_bytes()
    meta = layout.read_meta(step_dir)
    named = 0
    try:
        for position in range(len(original)):
            flip(file, position)
            try:
                assert layout.read_meta(step_dir) == meta, position
            except DamagedCheckpointError:
                named += 1
            file.write_bytes(original)
    finally:
        file.write_bytes(original)
    assert named == len(original)  # no byte of it is slack


def test_a_description_that_keeps_valid_json_is_named_and_fit_falls_back(runs, tmp_path):
    root, whole = runs
    directory = tmp_path / "run"
    shutil.copytree(root / "ordinary", directory)
    file = directory / "10" / "fxtrain" / "metadata"
    text = file.read_text()
    assert '"shape": [128, 64]' in text
    file.write_text(text.replace('"shape": [128, 64]', '"shape": [128, 65]', 1))  # valid JSON
    with pytest.raises(DamagedCheckpointError, match=r"description \(the fxtrain item\) differs "
                                                     r"from what was saved"):
        CheckpointManager(directory).restore(like=template())
    with pytest.warns(RuntimeWarning, match=r"resuming from step 5"):
        end = train(directory, 15)
    assert fx.tree_digest(end) == whole
    assert sorted(p.name for p in directory.iterdir()) == ["10", "10.damaged", "15", "5"]


def test_a_sealed_description_that_lost_its_checksum_is_named(runs, tmp_path):
    root, _ = runs
    step_dir = tmp_path / "5"
    shutil.copytree(root / "ordinary" / "5", step_dir)
    file = step_dir / "fxtrain" / "metadata"
    file.write_text(file.read_text().replace(f'"{layout.SEAL}"', '"description_crc33"'))
    with pytest.raises(DamagedCheckpointError, match="its description has no checksum"):
        fx.checkpoint.restore(step_dir, like=template())


def test_a_checkpoint_of_the_unsealed_format_still_restores(runs, tmp_path):
    """A description as fxtrain wrote it before checksums covered it (format /1, no seal)."""
    root, _ = runs
    for kind in ("ordinary", "sharded"):
        step_dir = tmp_path / kind
        shutil.copytree(root / kind / "5", step_dir)
        file = step_dir / (layout.TABLE if kind == "sharded" else "fxtrain/metadata")
        meta = json.loads(file.read_text())
        meta = {k: v for k, v in meta.items() if k not in (layout.SEAL, "files")}
        file.write_text(json.dumps({**meta, "format": layout.UNSEALED}))
        restored = fx.checkpoint.restore(step_dir, like=template())
        assert fx.tree_digest(restored) == fx.tree_digest(
            fx.checkpoint.restore(root / kind / "5", like=template()))


@pytest.mark.parametrize("unsealed", [False, True], ids=["checksummed", "unsealed"])
def test_a_truncated_shard_is_named_and_fit_falls_back(runs, tmp_path, capsys, unsealed):
    """Truncated: the size in the table names it; in a checkpoint without file checksums,
    torch's CheckpointException (a BaseException) is named as damage all the same."""
    root, whole = runs
    directory = tmp_path / "run"
    shutil.copytree(root / "sharded", directory)
    if unsealed:
        table = directory / "10" / layout.TABLE
        meta = json.loads(table.read_text())
        meta = {k: v for k, v in meta.items() if k not in (layout.SEAL, "files")}
        table.write_text(json.dumps({**meta, "format": layout.UNSEALED}))
    shard = directory / "10" / "shards" / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(DamagedCheckpointError) as error:
        CheckpointManager(directory).restore(like=template())
    if not unsealed:
        assert "its shard file shards/__0_0.distcp holds" in str(error.value)
    assert cli.main(["inspect", str(directory), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "verified" in out  # 10 damaged, 5 read completely
    with pytest.warns(RuntimeWarning, match=r"resuming from step 5"):
        end = train(directory, 15)
    assert fx.tree_digest(end) == whole


def test_a_flipped_shard_is_named_by_file(runs, tmp_path):
    root, _ = runs
    step_dir = tmp_path / "10"
    shutil.copytree(root / "sharded" / "10", step_dir)
    shard = step_dir / "shards" / "__0_0.distcp"
    flip(shard, shard.stat().st_size // 2)
    with pytest.raises(DamagedCheckpointError, match=r"the bytes of its shard file "
                                                     r"shards/__0_0\.distcp differ from what "
                                                     r"was written \(CRC-32 mismatch\)"):
        store.verify(step_dir)
