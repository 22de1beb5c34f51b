"""Float8 training as a precision policy, on torchao's ``torchao.float8`` emulated on the CPU
(``emulate=True``: float8 rounding, high-precision products): the layers it converts, a compiled
step in one graph whose losses follow bfloat16's over 50 steps, a resume that is bit-exact, and
the gradients taken by ``torch.func`` (fxtrain's own float8 layer) with the same bits as by
autograd, and the refusals (a device without float8 products, a model not converted, torchao's
own layers on ``torch.func``'s path)."""

import pytest
import torch
from torch import nn

import fxtrain as fx
from helpers import TRACED, extra, graph_count

extra("torchao")


class Net(nn.Module):
    """A tiny language-model-like net: two float8-able layers, a head, an odd-sized layer."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.odd = nn.Linear(32, 24)  # 24: not a multiple of 16
        self.lm_head = nn.Linear(24, 16)

    def forward(self, x):
        return self.lm_head(self.odd(self.down(nn.functional.gelu(self.up(x)))))


def _model():
    torch.manual_seed(0)
    return Net()


def loss_fn(state, params, batch):
    x, y = batch
    return nn.functional.cross_entropy(state.apply(params, x), y)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    return fx.data.Batches((x, x[:, :16].argmax(1)), 64, seed=0)


def test_the_filter_is_torchtitans():
    from fxtrain._torch.float8 import Float8Linear  # torchao's, differentiable by torch.func

    model = fx.precision.float8(emulate=True).convert(_model())
    kinds = {name: type(m) for name, m in model.named_children()}
    assert kinds == {"up": Float8Linear, "down": Float8Linear, "odd": nn.Linear,
                     "lm_head": nn.Linear}
    assert fx.precision.policy("fp8").name == "fp8"
    assert fx.precision.policy("fp8-rowwise").float8.recipe == "rowwise"
    own = fx.precision.float8(emulate=True, filter=lambda module, fqn: fqn == "up")
    assert type(own.convert(_model()).down) is nn.Linear
    # the parameters are the float32 model's: names, dtypes and values
    plain, converted = _model(), fx.precision.float8(emulate=True).convert(_model())
    assert fx.tree_digest(dict(plain.named_parameters())) == \
        fx.tree_digest(dict(converted.named_parameters()))


def test_compiled_in_one_graph_near_bf16_and_resumes_exactly(tmp_path):
    fp8 = fx.precision.float8(emulate=True)
    state = fx.TrainState.create(fp8.convert(_model()), fx.optim.adamw(1e-2), seed=0)
    start = fx.tree_digest(state)
    # the trace's promise (one graph, the same run resumed); Inductor's float8 kernels on the CPU
    # were checked by hand (docs/precision.md): 30 s of compiling here
    step = torch.compile(fx.make_train_step(loss_fn, precision=fp8), fullgraph=True,
                         backend=TRACED)
    losses, reference = {}, {}

    def recorder(into):
        def record(state, event):
            if event.kind == "step_end":
                into.setdefault(event.step, float(event.metrics["loss"]))
        return record

    torch._dynamo.utils.counters.clear()
    manager = fx.checkpoint.CheckpointManager(tmp_path / "ckpt", keep_latest=5, async_save=False)
    straight = fx.fit(state, step, _data(), max_steps=50, progress=False, callbacks=[
        recorder(losses), fx.callbacks.checkpoint_policy(every=25)], checkpoint=manager)
    assert graph_count() == 1  # one graph, no recompile over 50 steps
    # bfloat16 without float8, eager: the same losses within float8's rounding
    bf16 = fx.TrainState.create(_model(), fx.optim.adamw(1e-2), seed=0)
    fx.fit(bf16, fx.make_train_step(loss_fn, precision="bf16-mixed"), _data(), max_steps=50,
           progress=False, callbacks=[recorder(reference)])
    for k in (1, 10, 25, 50):
        assert abs(losses[k] - reference[k]) < 0.05 * reference[k] + 0.02, (k, losses[k],
                                                                            reference[k])
    assert losses[50] < 0.5 * losses[1]
    # resume from step 25 with the same compiled step: bit-exact at step 50, no recompile
    again = fx.TrainState.create(fp8.convert(_model()), fx.optim.adamw(1e-2), seed=0)
    assert fx.tree_digest(again) == start
    resumed_from = fx.checkpoint.CheckpointManager(tmp_path / "ckpt", keep_latest=5,
                                                   async_save=False)
    (tmp_path / "ckpt" / "50").rename(tmp_path / "moved-50")  # the latest is now step 25
    resumed = fx.fit(again, step, _data(), max_steps=50, progress=False,
                     checkpoint=resumed_from)
    assert int(resumed.step) == 50
    assert fx.tree_digest(resumed) == fx.tree_digest(straight)
    assert graph_count() == 1


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_products_run_on_the_cpu_where_torch_runs_them(recipe):
    """Issue 75, hole 7: float8 was refused on the CPU as needing a CUDA GPU, but torch runs
    ``torch._scaled_mm`` on the CPU (per tensor on 2.11 to 2.15, per row from 2.13): there the
    policy trains for real, as its emulation does eagerly (the products' float8 operands
    alike, summed in another order); where this torch lacks the recipe's product it is
    refused, naming the recipe that runs."""
    from fxtrain._torch.scaled_mm import cpu_runs_float8
    if not cpu_runs_float8(recipe == "rowwise"):
        assert recipe == "rowwise" and torch.__version__ < "2.13"
        with pytest.raises(RuntimeError, match=r"one scale per tensor only, not the 'rowwise' "
                                               r"recipe's.*use the 'tensorwise' recipe"):
            fx.precision.float8(recipe).convert(_model())
        return
    runs = []
    for emulate in (True, False):
        fp8 = fx.precision.float8(recipe, emulate=emulate)
        state = fx.TrainState.create(fp8.convert(_model()), fx.optim.adamw(1e-2), seed=0)
        step = fx.make_train_step(loss_fn, precision=fp8)
        for _, batch in zip(range(3), _data()):
            state, metrics = step(state, batch)
        runs.append((state.params, metrics["loss"]))
    (emulated, emulated_loss), (real, real_loss) = runs
    # the same float8 operands, summed in another order (oneDNN's float8 product against the
    # emulation's float32 one): a gradient's ulps, which AdamW's steps of about lr (1e-2) scale
    # by their relative size (seen: 2.2e-6 on one weight after 3 steps, the rest equal)
    torch.testing.assert_close(real_loss, emulated_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(real, emulated, rtol=0, atol=1e-4)


def test_refusals(monkeypatch):
    from fxtrain._torch import scaled_mm
    monkeypatch.setattr(scaled_mm, "_cpu_product_runs", lambda rowwise: False)
    with pytest.raises(RuntimeError, match=r"float8 matrix products \(torch._scaled_mm\): this "
                       r"torch .* does not run them on the CPU.*emulate=True"):
        fx.precision.float8().convert(_model())
    monkeypatch.undo()
    with pytest.raises(ValueError, match="recipe must be one of 'tensorwise', 'rowwise'"):
        fx.precision.float8("blockwise")
    with pytest.raises(ValueError, match="enable_fsdp_float8_all_gather takes the 'tensorwise'"):
        fx.precision.float8("rowwise", enable_fsdp_float8_all_gather=True)
    with pytest.raises(TypeError, match="emulate must be True or False, got 'no'"):
        fx.precision.float8(emulate="no")  # issue 75: bool('no') emulated
    with pytest.raises(TypeError, match=r"filter must be a function \(module, fqn\) -> bool.*"
                       r"not fqn.endswith\('lm_head'\)"):
        fx.precision.float8(filter="lm_head")  # issue 75: torchao's 'str' is not callable
    with pytest.raises(ValueError, match="nothing would train in float8"):
        fx.precision.float8(emulate=True).convert(nn.Linear(10, 3))
    # a model not converted, trained as fp8: refused by fit, and by an eager step, with the fix
    state = fx.TrainState.create(_model(), fx.optim.sgd(0.1))
    step = fx.make_train_step(loss_fn, precision="fp8")
    with pytest.raises(ValueError, match=r"has none: convert the model before making its state"):
        fx.fit(state, step, _data(), max_steps=1, progress=False)
    with pytest.raises(ValueError, match="convert the model"):
        step(state, next(iter(_data())))


@pytest.mark.parametrize("autodiff", ["func", "autograd"])
def test_a_compiled_fp8_step_on_a_model_not_converted_is_refused_before_its_first_graph(
        autodiff):
    """Issue 75's hole 2: compiled and called outside fit, the step trained the unconverted
    model in bfloat16, silently (the check was skipped while compiling). Refused now while
    Dynamo traces, with the eager step's message, before any graph is made."""
    state = fx.TrainState.create(_model(), fx.optim.sgd(0.1))
    step = torch.compile(fx.make_train_step(loss_fn, precision=fx.precision.float8(emulate=True),
                                            autodiff=autodiff), fullgraph=True, backend=TRACED)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"precision='fp8' trains torchao's Float8Linear "
                       r"layers, and this state's model has none: convert the model"):
        step(state, next(iter(_data())))
    assert graph_count() == 0


class Dropped(Net):
    """``Net`` with dropout after the first layer: a step's keyed randomness."""

    def forward(self, x):
        h = nn.functional.dropout(nn.functional.gelu(self.up(x)), 0.2, self.training)
        return self.lm_head(self.odd(self.down(h)))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_func_and_autograd_take_the_same_gradients(recipe):
    """fxtrain's float8 layer (``fxtrain._torch.float8``) under ``torch.func.grad_and_value``:
    compiled in one graph, the same dropout masks, the same bits as autograd's path."""
    fp8 = fx.precision.float8(recipe, emulate=True)
    runs = {}
    for autodiff in ("func", "autograd"):
        torch.manual_seed(0)
        state = fx.TrainState.create(fp8.convert(Dropped()), fx.optim.adamw(1e-2), seed=0)
        step = torch.compile(fx.make_train_step(loss_fn, precision=fp8, autodiff=autodiff),
                             fullgraph=True, backend=TRACED)
        torch._dynamo.utils.counters.clear()
        losses = []
        for batch in list(_data())[:4]:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        assert graph_count() == 1, autodiff
        runs[autodiff] = losses, fx.tree_digest(state)
    assert runs["func"] == runs["autograd"]
    assert runs["func"][0][3] < runs["func"][0][0]


def test_torchaos_own_layers_take_autograd():
    """A model converted by torchao itself (its Float8Linear, which torch.func refuses): trains
    on autograd's path, and ``autodiff="func"`` is refused with the fix, eager or compiled."""
    from torchao.float8 import convert_to_float8_training

    config = fx.precision.float8(emulate=True).float8.config()
    model = convert_to_float8_training(_model(), config=config,
                                       module_filter_fn=fx.precision._float8.default_filter)
    state = fx.TrainState.create(model, fx.optim.sgd(0.1))
    batch = next(iter(_data()))
    state, _ = fx.make_train_step(loss_fn, precision="fp8", autodiff="autograd")(state, batch)
    for compiled in (False, True):
        step = fx.make_train_step(loss_fn, precision="fp8", autodiff="func")
        if compiled:
            step = torch.compile(step, fullgraph=True, backend=TRACED)
        # compiled: Dynamo's wrapper around it, with its message (fx.fit raises it as itself)
        with pytest.raises((ValueError, RuntimeError), match="torchao's own Float8Linear.*"
                           r"fx.precision.float8\(...\).convert\(model\)"):
            step(state, batch)
