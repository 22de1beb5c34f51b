"""``fxtrain demo``: what it writes, its flags, its refusals, and exact resume after a kill."""

import os
import re
import signal
from pathlib import Path

import pytest
import torch
from helpers import reaped
from PIL import Image

from fxtrain import cli
from fxtrain.checkpoint import inspect
from fxtrain.apps.demo import figures, tasks
from fxtrain.logging import read_jsonl
from helpers_apps import digest_of

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--no-progress", "--no-compile", "--eval-every", "20", "--checkpoint-every", "20",
         "--log-every", "10", "--media-every", "30", "--grad-monitor-every", "20"]


def demo(capsys, workdir, *flags):
    """Runs ``fxtrain demo`` in this process; returns (exit status, stdout, stderr)."""
    status = cli.main(["demo", "--workdir", str(workdir), *flags])
    out, err = capsys.readouterr()
    return status, out, err


def listing(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def tensorboard_tags(logdir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags()


def test_mlp_demo_writes_logs_checkpoints_figures_and_reports(tmp_path, capsys):
    status, out, _ = demo(capsys, tmp_path, "--steps", "60", *QUICK)
    assert status == 0
    for name in ("metrics.jsonl", "loss_curve.png", "predictions.png", "confusion.png"):
        assert (tmp_path / name).is_file() and str(tmp_path / name) in out
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}" in out
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert kept[-1] == 60 and set(kept) <= {20, 40, 60}  # the latest two and the best two
    assert re.search(r"best accuracy at step (20|40|60)", out)
    assert Image.open(tmp_path / "loss_curve.png").size[0] > 100
    curves = figures.read_curves(tmp_path / "metrics.jsonl", ["train/loss", "eval/loss"])
    assert curves["train/loss"][0] == [10, 20, 30, 40, 50, 60]
    assert curves["eval/loss"][0] == [20, 40, 60]
    scalars = {k for e in read_jsonl(tmp_path / "metrics.jsonl") if e["kind"] == "scalars"
               for k in e["values"]}
    assert {"train/accuracy", "eval/accuracy", "learning_rate", "throughput/steps_per_sec",
            "grad_norm/1.weight"} <= scalars
    tags = tensorboard_tags(tmp_path / "tensorboard")
    assert {"predictions", "confusion", "eval/confusion"} <= set(tags["images"])
    final = re.search(r"final held-out metrics \(step 60[^)]*\): loss ([\d.]+)  accuracy ([\d.]+)",
                      out)
    assert final and 0.5 < float(final.group(2)) <= 1
    assert "steps/s" in out and len(digest_of(out)) == 64
    assert cli.main(["inspect", str(tmp_path), "--step", "60", "--digest"]) == 0  # the workdir
    shown = capsys.readouterr().out
    assert "accuracy=" in shown and ".params['1.weight']" in shown and "digest (step 60)" in shown


@pytest.mark.parametrize("model, words", [("cnn", ["accuracy"]),
                                          ("charlm", ["bits_per_char", "samples"])])
def test_cnn_and_charlm_demos(tmp_path, capsys, model, words):
    status, out, _ = demo(capsys, tmp_path, "--model", model, "--steps", "30", *QUICK)
    assert status == 0 and all(w in out for w in words)
    assert "state digest" in out
    if model == "charlm":
        samples = (tmp_path / "samples.txt").read_text()
        assert samples.startswith("Return the ") and len(samples) > 3 * 160
        texts = [e for e in read_jsonl(tmp_path / "metrics.jsonl")
                 if e["kind"] == "texts" and "samples/0" in e["values"]]
        assert [e["step"] for e in texts] == [30]
        assert texts[0]["values"]["samples/0"].startswith("Return the ")
    else:  # BatchNorm statistics travel in the state, and so in its checkpoints
        leaves = inspect.summary(inspect.checkpoint_paths(tmp_path / "checkpoints")[-1])
        paths = [leaf["path"] for leaf in leaves["meta"]["leaves"]]
        assert any(p.startswith(".buffers") and "running_mean" in p for p in paths)


def test_transformer_demo_generates_from_the_trained_module_and_exports_its_weights(
        tmp_path, capsys):
    """A GPT with keyed SDPA attention dropout: keyed text samples while training, then the
    trained module out of the state generates, and its weights go to safetensors."""
    import torch

    import fxtrain as fx
    from fxtrain.apps.demo import tasks

    status, out, _ = demo(capsys, tmp_path, "--model", "transformer", "--steps", "30",
                          "--batch-size", "8", *QUICK)
    assert status == 0 and "bits_per_char" in out and "SDPA attention" in out
    assert not torch.are_deterministic_algorithms_enabled()  # the demo's, restored after it
    samples = (tmp_path / "samples.txt").read_text().split("\n\n---\n\n")
    assert [s.split(" ")[0] for s in samples] == ["Return", "The", "If"]
    assert all(len(s) >= 160 for s in samples)
    texts = [e for e in read_jsonl(tmp_path / "metrics.jsonl")
             if e["kind"] == "texts" and "samples/0" in e["values"]]
    assert [e["step"] for e in texts] == [30]
    # the weights file holds the model that wrote samples.txt: loaded into a fresh state of the
    # same task, its trained module generates the same first sample
    task = tasks.make_task("transformer", 1)  # other initial weights, all replaced by the file
    fresh = fx.TrainState.create(task.model, fx.optim.sgd(0.1))
    loaded = fx.load_safetensors(tmp_path / "model.safetensors", like=fresh)
    module = fx.trained_module(loaded).eval()
    assert module.head.weight is module.tokens.weight  # tied weights stay tied
    from fxtrain.apps.demo import data
    codec = data.CharCodec(data.stdlib_text())
    assert_sampled_by(module, codec.encode(samples[0].rstrip("\n")), len("Return the "),
                      torch.Generator().manual_seed(0))


def assert_sampled_by(module, ids, start, generator, temperature=0.7):
    """``ids[start:]`` are the choices ``module.generate`` makes with ``generator``, replayed
    token by token with the sample as the context: torch.multinomial draws one sample as
    argmax(p / q), q ~ Exp(1) from the generator. The module that wrote the sample ran in
    another process state (other memory alignment, other kernels on some CPUs), so its
    probabilities may differ by rounding: logits of a 2-layer width-128 model agree to ~1e-5,
    p / q to 1e-4 relative after the temperature. A choice may differ only where the two best
    scores are that close; a model with other weights differs within a few characters."""
    import torch

    with torch.no_grad():
        for i in range(start, len(ids)):
            logits = module(ids[None, :i][:, -module.context:])[0, -1].float() / temperature
            p = logits.softmax(-1)
            score = p / torch.empty_like(p).exponential_(1, generator=generator)
            best, chosen = int(score.argmax()), int(ids[i])
            assert chosen == best or score[chosen] >= score[best] * (1 - 1e-4), (
                f"position {i}: the sample has {chosen}, the module picks {best} "
                f"(scores {float(score[chosen]):.6g} vs {float(score[best]):.6g})")


def test_transformer_demo_under_bf16_mixed_resumes_only_with_the_same_precision(tmp_path,
                                                                                capsys):
    flags = ["--model", "transformer", "--steps", "4", "--batch-size", "8", *QUICK,
             "--eval-every", "4", "--checkpoint-every", "4", "--media-every", "100"]
    status, out, _ = demo(capsys, tmp_path, *flags, "--precision", "bf16-mixed")
    assert status == 0 and "precision bf16-mixed" in out
    final = re.search(r"final held-out metrics \(step 4[^)]*\): loss ([\d.]+)", out)
    assert final and 0 < float(final.group(1)) < 10
    status, _, err = demo(capsys, tmp_path, *flags, "--precision", "32", "--resume")
    assert status == 2 and "--precision 'bf16-mixed' (now '32')" in err


def test_demo_refuses_a_workdir_with_a_run_and_changes_nothing(tmp_path, capsys):
    assert demo(capsys, tmp_path, "--steps", "20", *QUICK)[0] == 0
    before = listing(tmp_path)
    status, out, err = demo(capsys, tmp_path, "--steps", "20", *QUICK)
    assert status == 2 and "already holds a run" in err and "--resume" in err
    status, out, err = demo(capsys, tmp_path, "--steps", "40", "--resume", *QUICK)
    assert status == 2 and "--steps 20 (now 40)" in err
    status, out, err = demo(capsys, tmp_path, "--model", "cnn", "--steps", "20", "--resume",
                            *QUICK)
    assert status == 2 and "--model 'mlp' (now 'cnn')" in err
    assert listing(tmp_path) == before


def test_demo_refuses_a_workdir_with_logs_but_no_checkpoint(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")  # a run killed before its first checkpoint
    status, _, err = demo(capsys, tmp_path, "--steps", "20", *QUICK)
    assert status == 2 and "logs of an earlier run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    status, out, _ = demo(capsys, tmp_path, "--steps", "1", "--resume", *QUICK)
    assert status == 0 and "starting at step 0" in out and "(step 1" in out


def test_demo_rejects_bad_flags(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    status, _, err = demo(capsys, tmp_path / "w", "--steps", "0", *QUICK)
    assert status == 2 and "--steps must be >= 1" in err
    status, _, err = demo(capsys, tmp_path / "w", "--batch-size", "5000", *QUICK)
    assert status == 2 and "larger than the 1438 training examples" in err
    status, _, err = demo(capsys, tmp_path / "file" / "sub", "--steps", "5", *QUICK)
    assert status == 2 and "cannot create --workdir" in err
    status, _, err = demo(capsys, tmp_path / "file", "--steps", "5", *QUICK)
    assert status == 2 and "is a file" in err
    assert not (tmp_path / "w").exists()


def test_resume_of_a_finished_run_trains_no_further(tmp_path, capsys):
    status, first, _ = demo(capsys, tmp_path, "--steps", "40", *QUICK)
    status, again, _ = demo(capsys, tmp_path, "--steps", "40", "--resume", *QUICK)
    assert status == 0 and "no new steps" in again
    assert digest_of(again) == digest_of(first)


def test_early_stopped_run_resumed_stays_stopped(tmp_path, capsys):
    flags = ["--steps", "400", "--early-stopping-patience", "1",
             "--early-stopping-min-delta", "10", *QUICK]  # no evaluation improves by 10
    status, first, err = demo(capsys, tmp_path, *flags)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert status == 0 and steps[-1] == 40  # stopped at the second evaluation
    status, again, _ = demo(capsys, tmp_path, *flags, "--resume")
    assert "no new steps" in again and digest_of(again) == digest_of(first)


def test_a_second_ctrl_c_inside_a_step_stops_at_once_and_names_the_latest_checkpoint(
        tmp_path, capsys, monkeypatch):
    """Two Ctrl-C in the update of step 25: fit gives that step's state up, saves nothing of
    it, and the demo says which checkpoint a resume starts from (step 20's)."""
    from fxtrain import optim
    from fxtrain.apps.demo import job

    def twice(grads, count, params=None):  # last in the chain, after Adam wrote its moments
        if int(count) == 24:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return grads, count + 1
    interrupting = optim.GradientTransformation(lambda params: torch.zeros((), dtype=torch.int64),
                                                twice)
    made = job._optimizer
    monkeypatch.setattr(job, "_optimizer", lambda config: optim.chain(made(config), interrupting))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.warns(UserWarning, match="stopped inside the step after step 24"):
            status, out, _ = demo(capsys, tmp_path, "--steps", "40", *QUICK)
    finally:
        signal.signal(signal.SIGINT, previous)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert status == 130 and steps == [20]
    assert f"the latest checkpoint, of step 20, is in {tmp_path / 'checkpoints'}" in out
    assert "--resume" in out


def test_a_run_nan_guard_stops_exits_3_naming_the_step_the_metric_and_the_checkpoint(
        tmp_path, capsys, monkeypatch):
    """A loss planted NaN at step 15: nan_guard discards that step and stops the run at its
    next read (the evaluation at step 20); the demo exits with status 3 and one line naming the
    step, the loss, the latest checkpoint and fx.debug.find_nonfinite, and the checkpoint it
    had saved before is kept."""
    import dataclasses

    from fxtrain.apps.demo import job

    made = job.make_task

    def poisoned(model, seed):
        task = made(model, seed)

        def loss_fn(state, params, batch):
            loss, aux = task.loss_fn(state, params, batch)
            return loss + torch.where(state.step == 14, float("nan"), 0.0), aux
        return dataclasses.replace(task, loss_fn=loss_fn)
    monkeypatch.setattr(job, "make_task", poisoned)
    status, out, err = demo(capsys, tmp_path, "--steps", "30", *QUICK, "--eval-every", "10",
                            "--checkpoint-every", "10")
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert status == 3 and steps == [10, 20], (status, steps, err)  # 20: finite, saved at the stop
    assert "fxtrain: stopped at step 20 by nan_guard" in out
    line = err.strip().splitlines()[-1]
    assert line.startswith("fxtrain demo: stopped at step 20: the loss was nan at step 15 "
                           "(nan_guard discarded that step's update"), line
    assert f"the latest checkpoint, of step 20, is in {tmp_path / 'checkpoints'}" in line
    assert "fx.debug.find_nonfinite(train_step, state, batch)" in line and "--resume" in line
    assert cli.main(["inspect", str(tmp_path / "checkpoints"), "--verify"]) == 0  # both whole
    logged = {e["step"] for e in read_jsonl(tmp_path / "metrics.jsonl")
              if "train/loss" in e.get("values", {})}
    assert {10, 20} <= logged
