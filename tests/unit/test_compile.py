"""fx.compile: torch.compile of a step with what its state's layout needs, for that compile
only (issue 76): regional steps of a sweep, built again in one process with other optimizers,
each train the bits they train alone; a batch of another size and a changed setting compile
again and train; Inductor's and Dynamo's settings are as they were after each call."""

import gc
import re
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtrain as fx
from helpers import TRACED
from helpers_step import module_values
from helpers_compile import Net, loss_fn, setup, trained

pytestmark = pytest.mark.compat  # run on every torch of the range too (.ci/run)


def regional_run(tx, compile_step):
    torch.manual_seed(0)
    state = fx.regional(fx.TrainState.create(Net(3), tx, seed=3))
    step = compile_step(fx.make_train_step(loss_fn), state)
    got, metrics = trained(step, state, setup()[1])
    return fx.tree_digest(got.params), float(metrics["loss"])


def optimizers():
    return {"adamw": fx.optim.adamw(1e-2),
            "masked": fx.optim.adamw(3e-2, weight_decay=0.5, mask=lambda name, p: "bias" not in
                                     name),
            "sgd": fx.optim.sgd(0.1, momentum=0.9)}


@pytest.mark.slow  # many traces: once, on the pinned torch (not in the compat legs)
def test_a_sweep_of_regional_steps_trains_each_as_alone():
    """Regional steps built again in one process with other optimizers and masks (a sweep, a
    notebook), without ``torch._dynamo.reset()``: each trains the bits it trains alone, in
    either order (a bare torch.compile failed at the second one's first call inside Dynamo:
    its automatic dynamic floats made the learning rate symbolic inside a region)."""
    compile_step = lambda step, state: fx.compile(step, state, backend=TRACED)  # noqa: E731
    names = list(optimizers())
    orders = (names, names[::-1])
    alone = {}  # each after a reset, before any sweep (as a fresh process would run it) ...
    for name in names:
        if name not in (order[0] for order in orders):
            torch._dynamo.reset()
            alone[name] = regional_run(optimizers()[name], compile_step)
    sweeps = []
    for order in orders:
        torch._dynamo.reset()
        sweeps.append([(name, regional_run(optimizers()[name], compile_step)) for name in order])
    # ... but an order's first: the sweep's first run is a reset and that run, its alone run
    alone.update(order[0] for order in sweeps)
    assert len({d for d, _ in alone.values()}) == len(names)  # they differ: the check can fail
    for order in sweeps:
        for name, got in order:
            assert got == alone[name], ([n for n, _ in order], name)


@pytest.mark.slow  # many traces: once, on the pinned torch (not in the compat legs)
def test_a_batch_of_another_size_compiles_again_and_trains_as_the_plain_step():
    """A regional step called with a batch of another size compiles again (static shapes) and
    trains the plain compiled step's bits (a bare torch.compile failed: its automatic dynamic
    shapes made the region's key symbolic)."""
    state, (x, y) = setup()
    runs = []
    for regional in (True, False):
        torch._dynamo.reset()
        s = fx.regional(state) if regional else state
        step = fx.compile(fx.make_train_step(loss_fn), s, backend=TRACED) if regional else \
            torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=TRACED)
        for n in (16, 8, 16):
            s, metrics = step(s, (x[:n], y[:n]))
        runs.append((fx.tree_digest(s.params), float(metrics["loss"])))
    assert runs[0] == runs[1]


SCALE = 1.0


class Scaled(nn.Module):
    """A block whose forward reads a module-level setting."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h):
        return h + SCALE * torch.tanh(self.lin(h))


@pytest.mark.slow  # many traces: once, on the pinned torch (not in the compat legs)
def test_a_setting_the_blocks_read_changed_between_steps_compiles_again():
    """A module-level setting the blocks read, changed between steps: the step compiles again
    and trains as the plain compiled step does (a bare torch.compile failed at the recompile:
    ``lift_tracked_freevar_to_input``)."""
    global SCALE
    torch.manual_seed(0)
    net = Net(3)
    net.blocks = nn.ModuleList(Scaled() for _ in range(3))
    state = fx.TrainState.create(net, fx.optim.adamw(1e-2), seed=3)
    batch = setup()[1]
    runs = []
    for regional in (True, False):
        torch._dynamo.reset()
        s = fx.regional(state) if regional else state
        step = fx.compile(fx.make_train_step(loss_fn), s, backend=TRACED)
        for scale in (1.0, 0.5, 0.5):
            SCALE = scale
            s, metrics = step(s, batch)
        runs.append((fx.tree_digest(s.params), float(metrics["loss"])))
    SCALE = 1.0
    assert runs[0] == runs[1]


def test_compiling_leaves_inductor_and_dynamo_settings_as_they_were():
    """A regional step compiled by fx.compile (Inductor's settings it needs are turned off
    while Dynamo traces it, whatever the backend) leaves Inductor's and Dynamo's settings as they were, so a later plain
    torch.compile of another model gets Inductor's defaults; the step trains the bits of the
    plain compiled step."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    def settings():
        return (inductor.allow_buffer_reuse, inductor.reorder_for_locality,
                dynamo.trace_autograd_ops, dynamo.skip_fwd_side_effects_in_bwd_under_checkpoint,
                frozenset(dynamo.ignore_logger_methods))

    before = settings()
    state, batch = setup(2)
    torch._dynamo.reset()
    got = trained(fx.compile(fx.make_train_step(loss_fn), fx.regional(state), backend=TRACED),
                  fx.regional(state), batch, n=2)[0]
    assert settings() == before
    other = torch.compile(nn.Linear(3, 3), backend=TRACED)
    other(torch.ones(2, 3))
    assert settings() == before
    want = trained(torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=TRACED),
                   state, batch, n=2)[0]
    assert fx.tree_digest(got.params) == fx.tree_digest(want.params)


def test_refusals_and_spec():
    with pytest.raises(TypeError, match="fx.compile: train_step must be a step"):
        fx.compile(3)
    with pytest.raises(TypeError, match="state must be a TrainState"):
        fx.compile(fx.make_train_step(loss_fn), {"params": 1})
    step = fx.compile(fx.make_train_step(loss_fn, steps_per_call=2), backend=TRACED)
    assert fx.step_spec(step).compiled and fx.step_spec(step).steps_per_call == 2


def test_blocks_that_write_their_buffers_are_refused_before_any_trace():
    """Blocks holding a BatchNorm (running statistics written in training) are refused by
    fx.regional by name (they were accepted and failed at the first step inside Dynamo:
    invoke_subgraph takes no in-place write into its inputs)."""
    torch.manual_seed(0)
    net = Net(3)
    net.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
                               for _ in range(3))
    state = fx.TrainState.create(net, fx.optim.adamw(1e-2), seed=3)
    with pytest.raises(ValueError, match=r"fx.regional: 'blocks.0.1' is a BatchNorm1d, whose "
                                         r"forward writes its running statistics"):
        fx.regional(state)
    net.blocks[1][1] = nn.BatchNorm1d(8, track_running_stats=False)
    assert fx.regional(fx.TrainState.create(net, fx.optim.sgd(0.1)), ["blocks.1"]).layout.regions \
        == ("blocks.1",)


def test_a_trace_that_fails_leaves_the_settings_as_they_were():
    """A step refused while Dynamo traces it (a loss that is not a scalar) under fx.compile:
    fxtrain's error, and Dynamo's settings as they were before the call."""
    import torch._dynamo.config as dynamo

    before = (dynamo.trace_autograd_ops, dynamo.skip_fwd_side_effects_in_bwd_under_checkpoint)
    state, batch = setup(2)
    step = fx.compile(fx.make_train_step(lambda s, p, b: s.apply(p, b[0]), autodiff="autograd"),
                      state, backend=TRACED)
    with pytest.raises(Exception, match="loss"):
        step(state, batch)
    assert (dynamo.trace_autograd_ops, dynamo.skip_fwd_side_effects_in_bwd_under_checkpoint) == \
        before


def _fxtrains_own(values):
    """``module_values()`` without the globals Dynamo installs in the module of a function it
    compiles (its compiled code, the constants of the functions it ran while tracing)."""
    dynamo = re.compile(r"^(__compiled_fn|___|__builtins_dict|__resume_at|__import_)|_\d+$")
    return {k: v for k, v in values.items() if not dynamo.search(k[1])}


@pytest.mark.slow  # many traces: once, on the pinned torch (not in the compat legs)
def test_tracing_and_running_regional_steps_writes_no_module_level_value():
    """Compiled regional steps of two states with other optimizers and masks, traced and run
    in one process: no module-level value of fxtrain changes (issue 76: every optimizer traced
    was kept in a process list, every block layout in another, region keys and draws in
    tables)."""
    compile_step = lambda step, state: fx.compile(step, state, backend=TRACED)  # noqa: E731
    regional_run(fx.optim.adamw(1e-2), compile_step)  # every module loaded, its caches made
    regional_run(fx.optim.sgd(0.1), lambda step, state: step)  # and eagerly
    before = _fxtrains_own(module_values())
    for name, tx in optimizers().items():
        regional_run(tx, compile_step)
        regional_run(tx, lambda step, state: step)
        assert _fxtrains_own(module_values()) == before, name


@pytest.mark.slow  # many traces: once, on the pinned torch (not in the compat legs)
def test_steps_built_and_dropped_keep_no_transformation_or_layout_alive():
    """A notebook's life: 50 regional states and their steps built, run and dropped in a loop
    (eagerly, and compiled for the first 3): no transformation, layout or planned update of
    theirs stays alive (weak references)."""
    refs = []
    for i in range(50):
        torch.manual_seed(0)
        tx = fx.optim.adamw(1e-2 * (1 + i % 3))
        state = fx.regional(fx.TrainState.create(Net(2), tx, seed=3))
        step = fx.make_train_step(loss_fn)
        if i < 3:
            step = fx.compile(step, state, backend=TRACED)
        state = trained(step, state, setup(2)[1], n=1)[0]
        refs += [weakref.ref(tx.update), weakref.ref(state.layout),  # (tx: a tuple of two
                 weakref.ref(state.layout.block_update)]  # functions, its update one of them)
        del tx, state, step
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of {len(refs)} alive: {[type(a).__name__ for a in alive]}"


def test_fxtrains_refusal_while_tracing_arrives_as_itself():
    """impl='liger' on the CPU inside a step compiled by fx.compile: fxtrain's ValueError, one
    message naming the fix (issue 75, hole 7: a bare torch.compile gave a 45-line Dynamo error
    with the message on its first line)."""
    state, batch = setup(2)

    def liger_loss(state, params, batch):
        h = state.apply(params, batch[0])
        return fx.losses.chunked_causal_lm(h[None], params["head.weight"], batch[1][None],
                                           impl="liger")

    step = fx.compile(fx.make_train_step(liger_loss), state, backend=TRACED)
    with pytest.raises(ValueError, match=r"^fx.losses.chunked_causal_lm: impl='liger' runs "
                                         r"Liger-Kernel's Triton kernels.*pass impl='chunked'") \
            as caught:
        step(state, batch)
    assert "from user code" not in str(caught.value)


def test_the_bfloat16_tile_width_is_chosen_for_each_kernel_width():
    """Issue of the AVX-512 machines: a kernel with two 32 x 32 bfloat16 tiles came out wrong,
    so a bfloat16 step's kernels are given 256 bits where Inductor would take 512; at 256 or
    without vectors nothing changes. This machine's width is one of Inductor's."""
    from fxtrain._torch import vec_isa
    assert vec_isa.bfloat16_options(512) == {"cpp.simdlen": 256}
    assert vec_isa.bfloat16_options(256) == vec_isa.bfloat16_options(0) == {}
    assert vec_isa.vector_bits() in (0, 128, 256, 512)


@pytest.mark.parametrize("bits", [512, 256], ids=["avx512", "avx2"])
def test_fx_compile_gives_a_bfloat16_step_its_tile_width_on_either_cpu(monkeypatch, bits):
    """Both branches forced on any machine: on a 512-bit CPU fx.compile adds cpp.simdlen=256
    to a bfloat16 step's compile (a mode given as its options), never to a float32 step's,
    nor over the caller's own simdlen; on a 256-bit CPU it adds nothing."""
    from fxtrain._torch import vec_isa
    monkeypatch.setattr(vec_isa, "vector_bits", lambda: bits)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
    batch = torch.ones(4, 2)

    def loss(s, p, b):
        return s.apply(p, b).square().mean()

    for precision, kwargs in [("bf16-mixed", {}), ("bf16-mixed", {"mode": "max-autotune"}),
                              ("32", {}), ("bf16-mixed", {"options": {"cpp.simdlen": 512}})]:
        fx.compile(fx.make_train_step(loss, precision=precision), **kwargs)(state, batch)
    plain, autotuned, float32, own = seen
    assert float32["options"] is None and own["options"] == {"cpp.simdlen": 512}
    if bits == 512:
        assert plain["options"] == {"cpp.simdlen": 256} and plain["mode"] is None
        assert autotuned["mode"] is None and autotuned["options"]["cpp.simdlen"] == 256
        assert autotuned["options"]["max_autotune"] is True
    else:
        assert plain["options"] is None and autotuned["mode"] == "max-autotune"
