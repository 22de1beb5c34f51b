"""The mistakes a new user makes in the first hour, each a clear error that names the fix or a
path that works: a ``loss_fn`` that runs the original module, a ``torch.optim`` optimizer, a
``loss_fn`` of the wrong shape, weight-decay masks as HF writes them, ``every`` on a plain
function."""

import pytest
import torch
import torch.nn.functional as F
from helpers import TRACED, classification_batch, mlp, xent

import fxtrain as fx

BATCH = classification_batch(n=16)


def _state(model=None, tx=None):
    return fx.TrainState.create(model or mlp(), tx or fx.optim.adamw(1e-2))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("autodiff", ["func", "autograd"])
def test_a_loss_fn_that_runs_the_original_module_is_refused_naming_state_apply(autodiff,
                                                                               compiled):
    model = mlp()
    state = fx.TrainState.create(model, fx.optim.adamw(1e-2))

    def loss_fn(state, params, batch):  # the first thing a Lightning or HF user writes
        x, y = batch
        return F.cross_entropy(model(x), y)

    step = fx.make_train_step(loss_fn, autodiff=autodiff)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend=TRACED)
    with pytest.raises(Exception) as raised:
        step(state, BATCH)
    first = str(raised.value).splitlines()[0]
    assert "does not depend on params" in first and "state.apply(params" in first, first
    with pytest.raises(ValueError, match=r"state\.apply\(params"):  # fit: fxtrain's error itself
        fx.fit(state, step, [BATCH] * 2, max_steps=2)


@pytest.mark.parametrize("autodiff", ["func", "autograd"])
def test_a_loss_fn_that_uses_params_and_leaves_some_unused_trains(autodiff):
    def loss_fn(state, params, batch):  # the last layer's bias unused: zeros, no error
        x, y = batch
        logits = state.apply(params, x)
        return F.cross_entropy(logits - params["2.bias"].detach(), y)

    state = _state()
    new, metrics = fx.make_train_step(loss_fn, autodiff=autodiff)(state, BATCH)
    assert float(metrics["grad_norm"]) > 0
    assert not torch.equal(new.params["0.weight"], state.params["0.weight"])


@pytest.mark.parametrize("optimizer, fix", [
    (lambda ps: torch.optim.AdamW(ps, lr=3e-4, weight_decay=0.1),
     r"fx\.optim\.adamw\(0\.0003, b1=0\.9, b2=0\.999, weight_decay=0\.1\)"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
     r"fx\.optim\.sgd\(0\.1, momentum=0\.9\)"),
    (lambda ps: torch.optim.Adam, r"fx\.optim\.adam\(learning_rate"),
    (lambda ps: fx.optim.adamw, r"call it: fx\.optim\.adamw\(learning_rate"),
])
def test_a_torch_optim_optimizer_is_refused_naming_the_fxtrain_call(optimizer, fix):
    model = mlp()
    with pytest.raises(TypeError, match=fix):
        fx.TrainState.create(model, optimizer(model.parameters()))


@pytest.mark.parametrize("loss_fn", [lambda params, batch: 0.0, lambda batch: 0.0,
                                     lambda state, params, batch, extra: 0.0])
def test_a_loss_fn_of_the_wrong_signature_is_refused_when_the_step_is_built(loss_fn):
    with pytest.raises(TypeError, match=r"loss_fn\(state, params, batch\).*state\.apply"):
        fx.make_train_step(loss_fn)


def test_a_loss_fn_with_defaults_or_varargs_is_accepted():
    fx.make_train_step(lambda state, params, batch, weight=1.0: xent(state, params, batch)[0])
    fx.make_train_step(lambda *args: xent(*args)[0])


def _decayed(state, new):
    return sorted(k for k in state.params if not torch.equal(new.params[k], state.params[k]))


@pytest.mark.parametrize("mask", [["0.weight", "2.weight"], {"0.weight", "2.weight"},
                                  ("0.weight", "2.weight"),
                                  lambda params: {k: k.endswith("weight") for k in params},
                                  lambda name, p: p.ndim == 2,
                                  {"0.weight": True, "0.bias": False, "2.weight": True,
                                   "2.bias": False}])
def test_weight_decay_masks_as_names_dicts_and_functions_decay_those_parameters(mask):
    state = _state(tx=fx.optim.adamw(0.1, weight_decay=0.5, mask=mask))
    zeros = {k: torch.zeros_like(v) for k, v in state.params.items()}
    assert _decayed(state, state.apply_gradients(zeros)) == ["0.weight", "2.weight"]


def test_hf_decay_parameter_names_work_as_the_mask():
    transformers = pytest.importorskip("transformers")
    from transformers.trainer_pt_utils import get_parameter_names

    model = mlp()
    names = [n for n in get_parameter_names(model, [torch.nn.LayerNorm]) if "bias" not in n]
    state = _state(model, fx.optim.adamw(0.1, weight_decay=0.5, mask=names))
    zeros = {k: torch.zeros_like(v) for k, v in state.params.items()}
    assert _decayed(state, state.apply_gradients(zeros)) == ["0.weight", "2.weight"]
    del transformers


@pytest.mark.parametrize("mask, error, message", [
    ({"0.weight": True}, ValueError, r"parameters with no entry: \['0.bias', '2.weight', "),
    (["0.wieght"], ValueError, r"names are no parameter's: \['0.wieght'\]"),
    ("0.weight", TypeError, r"must be a dict, a predicate .* or a collection of names"),
    (lambda params: ["0.weight"], TypeError, r"fn\(params\) returned list"),
])
def test_a_mask_that_does_not_fit_fails_in_create_not_at_the_first_step(mask, error, message):
    with pytest.raises(error, match=message):
        _state(tx=fx.optim.adamw(0.1, mask=mask))


def test_every_gives_a_plain_function_only_its_due_steps():
    seen = []

    def report(state, event):  # reads the loss: train_begin has no metrics and would crash
        seen.append((event.kind, event.step, float(event.metrics["loss"])))

    state = _state()
    fx.fit(state, fx.make_train_step(xent), [BATCH] * 7, max_steps=6,
           callbacks=[fx.callbacks.every(2, report), fx.callbacks.on_steps([3], report)])
    assert [(k, s) for k, s, _ in seen] == [("step_end", 2), ("step_end", 3), ("step_end", 4),
                                            ("step_end", 6)]


def _fit_quietly(capsys, **kwargs):
    state = _state()
    fx.fit(state, fx.make_train_step(xent), [BATCH] * 4, max_steps=4, **kwargs)
    return capsys.readouterr().err


def test_fit_shows_progress_when_asked_and_not_twice(capsys):
    assert "train: 100%" in _fit_quietly(capsys, progress=True)
    one = _fit_quietly(capsys, progress=True, callbacks=[fx.callbacks.progress_bar(name="mine")])
    assert one.count("train:   0%") == 1, one  # one bar opened: the user's
    assert _fit_quietly(capsys, progress=False) == ""
    assert _fit_quietly(capsys) == ""  # captured standard error: nobody watches


SCRIPT = """
import torch, torch.nn.functional as F, fxtrain as fx
x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
def loss_fn(state, params, batch):
    return F.cross_entropy(state.apply(params, batch[0]), batch[1])
state = fx.TrainState.create(torch.nn.Linear(8, 4), fx.optim.adam(1e-2))
fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches((x, y), 16), max_steps=8,
       callbacks=[fx.callbacks.lr_monitor(4)])
"""


def test_in_a_terminal_fit_shows_progress_and_monitors_print_without_a_writer(tmp_path):
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()  # standard error a terminal, as a user's shell gives
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stderr=follower,
                            stdout=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    shown = b"".join(chunks).decode(errors="replace")
    assert "train: 100%" in shown and "8/8" in shown, shown
    assert "step 4 optimizer: learning_rate=0.01" in shown, shown
    assert "step 8 optimizer: learning_rate=0.01" in shown, shown
