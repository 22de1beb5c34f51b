"""Scenarios run in each process of a 2-process CPU (gloo) job by tests/unit/test_distributed.py,
through torch.multiprocessing or torchrun. Each writes its results under ``out``."""

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from helpers import classification_batch, mlp  # noqa: E402

import fxtrain as fx  # noqa: E402
from fxtrain._torch import recompute  # noqa: E402

X, Y = classification_batch(n=256, seed=3)


def loss_fn(state, params, batch):
    x, y = batch
    return _scored(state.apply(params, x), y)


def _scored(logits, y):
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean()}


def overlapped(out, steps=12):
    """Data parallel on the autograd path, eager and compiled: each gradient summed over the
    ranks inside the backward. Records where an eager step's all-reduces fall among its ops.
    Compiled with the traced backend: the promise is the graph's (one graph holding the
    all-reduces, the ranks agreeing, the keyed masks drawn as eagerly); Inductor's kernels for a
    data-parallel step are ``train``'s, and for an autograd step's collectives in the backward,
    ``sharded_units``'."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from helpers import TRACED

    def run(compiled, dropout=0.2):
        state = fx.TrainState.create(mlp(sizes=(8, 16, 16, 4), dropout=dropout),
                                     fx.optim.adamw(1e-2))
        step = fx.make_train_step(loss_fn, autodiff="autograd")
        if compiled:
            step = torch.compile(step, fullgraph=True, backend=TRACED)
        return fx.fit(state, step, fx.data.Batches((X, Y), 16, seed=1), max_steps=steps)

    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    state = fx.TrainState.create(mlp(sizes=(8, 16, 16, 4)), fx.optim.adamw(1e-2))
    with Record():
        fx.make_train_step(loss_fn, autodiff="autograd")(state, (X[:16], Y[:16]))
    eager, compiled = run(False), run(True)
    torch.save({"ops": ops, "params": run(False, dropout=0.0).params, "eager": eager.params,
                "compiled": compiled.params,
                "digests": [fx.tree_digest(s.replace(data=None)) for s in (eager, compiled)],
                "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]},
               f"{out}/rank{fx.distributed.rank()}.pt")


def remat_loss(state, params, batch):
    """``loss_fn`` with the model's activations recomputed in the backward (``fx.remat``)."""
    x, y = batch
    return _scored(fx.remat(lambda h: state.apply(params, h), x), y)


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4))


def train(out, compiled=False, batch=16, steps=12, buffers="mean", model="mlp"):
    """Data parallel training; a single process (world 1) takes the doubled global batch."""
    net = bn_model() if model == "bn" else mlp(sizes=(8, 16, 16, 4) if model == "mlp3" else
                                                 (8, 16, 4))
    state = fx.TrainState.create(net, fx.optim.adamw(1e-2))
    step = fx.make_train_step(loss_fn, buffers=buffers)
    if compiled:
        step = torch.compile(step, fullgraph=True)
    state = fx.fit(state, step, fx.data.Batches((X, Y), batch, seed=1), max_steps=steps)
    torch.save({"params": state.params, "buffers": state.buffers,
                "digest": fx.tree_digest(state.replace(data=None)),
                "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]},
               f"{out}/rank{fx.distributed.rank()}.pt")


def lm_batches(n=4, rows=2, length=12, vocab=11, seed=5):
    """Padded next-token batches ``(ids, labels)``: each row keeps 2 to ``length`` real tokens
    (labels -100 after them), so batches hold different numbers of targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (rows, length), generator=g)
        labels = ids.clone()
        for row, real in enumerate(torch.randint(2, length + 1, (rows,), generator=g).tolist()):
            labels[row, real:] = -100
        out.append((ids, labels))
    return out


def lm_loss(state, params, batch):
    ids, labels = batch
    return fx.losses.causal_lm(state.apply(params, ids), labels)


def lm_model(vocab=11):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))


def lm_weighted(out, compiled=False, autodiff="func", every_k=1):
    """Data parallel with a token-weighted loss (fx.losses.causal_lm): rank r takes rows
    ``r`` of each global batch, whose target counts differ across ranks; ``every_k`` > 1
    accumulates micro-batches with multi_steps. Records the parameters and the step metrics.
    Compiled with the traced backend: the promise is what the graph computes (the global token
    count in the loss), not Inductor's kernels (the data-parallel run of ``train`` keeps those)."""
    from helpers import TRACED

    rank, world = fx.distributed.rank(), fx.distributed.world_size()
    tx = fx.optim.adamw(1e-1)
    state = fx.TrainState.create(lm_model(), fx.optim.multi_steps(tx, every_k) if every_k > 1
                                 else tx, seed=0)
    step = fx.make_train_step(lm_loss, autodiff=autodiff, donate=False)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend=TRACED)
    metrics = []
    for ids, labels in lm_batches(n=4 * every_k, rows=4):  # the global batches, world 1 or 2
        state, m = step(state, (ids[rank::world], labels[rank::world]))
        metrics.append({k: float(v) for k, v in m.items()})
    torch.save({"params": state.params, "metrics": metrics}, f"{out}/rank{rank}.pt")


def sharded(out, compiled=False, batch=16, steps=10, precision="32", shard=True):
    """Training with the state sharded over the ranks (fx.shard): an MLP whose 17-row layer
    splits unevenly, an optimizer with a global-norm clip, an in-step callback."""
    net = mlp(sizes=(8, 17, 4))
    tx = fx.optim.chain(fx.optim.clip_by_global_norm(0.5), fx.optim.adamw(1e-2))
    state = fx.TrainState.create(net, tx, callbacks=[fx.callbacks.nan_guard()])
    whole = fx.sharding.local_nbytes((state.params, state.opt_state))
    if shard and fx.distributed.world_size() > 1:
        state = fx.shard(state)
    step = fx.make_train_step(loss_fn, precision=precision, grad_stats="histograms",
                              callbacks=[fx.callbacks.nan_guard()])
    if compiled:
        step = torch.compile(step, fullgraph=True)
    losses = []
    record = fx.callbacks.lambda_callback(
        on_step_end=lambda s, e: losses.append(float(e.metrics["grad_norm"])))
    state = fx.fit(state, step, fx.data.Batches((X, Y), batch, seed=1), max_steps=steps,
                   callbacks=[record], eval_step=fx.make_eval_step(loss_fn), eval_every=5,
                   eval_data=fx.data.Batches((X, Y), 64, shuffle=False))
    module = fx.trained_module(state)  # whole weights, a plain module
    predicted = fx.predict(lambda s, b: s.apply(s.params, b[0]), state,
                           fx.data.Batches((X[:40], Y[:40]), 8, shuffle=False, drop_last=False))
    torch.save({"params": fx.sharding.gathered(state.params), "grad_norms": losses,
                "module": {k: v.detach() for k, v in module.state_dict().items()},
                "predicted": predicted,
                "digest": fx.tree_digest(state.replace(data=None)),
                "sharded": fx.sharding.is_sharded(state),
                "local": [fx.sharding.local_nbytes(x) for x in (state.params, state.opt_state)],
                "whole": whole, "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]},
               f"{out}/rank{fx.distributed.rank()}.pt")


class Block(torch.nn.Module):
    """A residual block with dropout whose hidden layer (17 rows) splits unevenly over 2."""

    def __init__(self, width=8, dropout=0.2):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, 17), torch.nn.Linear(17, width)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, h):
        return h + self.drop(self.down(F.gelu(self.up(h))))


class Blocks(torch.nn.Module):
    """A root (an input layer, a head, a 0-d scale) around a ModuleList of blocks."""

    def __init__(self, depth=3, dropout=0.2):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
        self.blocks = torch.nn.ModuleList(Block(dropout=dropout) for _ in range(depth))
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h) * self.scale


def gathers(step, state, batch):
    """The step's new state, and the all-gathers and reduce-scatters an eager step ran."""
    from torch.utils._python_dispatch import TorchDispatchMode
    c10d = torch.ops._c10d_functional
    seen = {"all_gather": 0, "reduce_scatter": 0, "dtypes": set(), "bytes": {}}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (c10d.all_gather_into_tensor.default, torch.ops.fxtrain.all_gather_shard
                        .default, torch.ops.c10d._allgather_base_.default):
                seen["all_gather"] += 1
                seen["dtypes"].add(("all_gather", str(args[0].dtype)))
                dtype = str(args[0].dtype)  # the bytes gathered, the whole buffer's, by dtype
                seen["bytes"][dtype] = seen["bytes"].get(dtype, 0) + args[0].nbytes
            if func is c10d.reduce_scatter_tensor.default:
                seen["reduce_scatter"] += 1
                seen["dtypes"].add(("reduce_scatter", str(args[0].dtype)))
            return func(*args, **(kwargs or {}))

    with Count():
        state, _ = step(state, batch)
    seen["unwaited"] = torch._C._distributed_c10d._get_work_registry_size()
    return state, seen


class WideBlock(torch.nn.Module):
    """A residual block of float8-able layers (both dimensions multiples of 16)."""

    def __init__(self, width=32, hidden=48):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, hidden), torch.nn.Linear(hidden, width)

    def forward(self, h):
        return h + self.down(F.gelu(self.up(h)))


class Float8Blocks(torch.nn.Module):
    """A root (input layer and head, too small for float8) around 2 float8 blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = torch.nn.Linear(8, 32), torch.nn.Linear(32, 4)
        self.blocks = torch.nn.ModuleList(WideBlock() for _ in range(2))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def float8_gather(out, steps=6):
    """Float8 training sharded per block, eager, with and without torchao's
    enable_fsdp_float8_all_gather: the losses, the final parameters, and one step's gathers."""
    import importlib.util
    if importlib.util.find_spec("torchao") is None:
        torch.save({"skipped": True}, f"{out}/rank{fx.distributed.rank()}.pt")
        return
    result = {}
    for name, option in (("float32 gather", False), ("float8 gather", True)):
        fp8 = fx.precision.float8(emulate=True, enable_fsdp_float8_all_gather=option)
        state = fx.shard(fx.TrainState.create(fp8.convert(Float8Blocks()), fx.optim.adamw(1e-2)),
                         units="auto")
        step = fx.make_train_step(loss_fn, precision=fp8)
        batch = next(iter(fx.data.Batches((X, Y), 16, seed=1)))
        _, collectives = gathers(step, state, batch)
        losses = []
        record = fx.callbacks.lambda_callback(
            on_step_end=lambda s, e: losses.append(float(e.metrics["loss"])))
        state = fx.fit(state, step, fx.data.Batches((X, Y), 16, seed=1), max_steps=steps,
                       callbacks=[record], progress=False)
        result[name] = {"losses": losses, "collectives": collectives,
                        "params": fx.sharding.gathered(state.params)}
    result["compiled"] = float8_gather_compiled(out, steps)
    fp8 = fx.precision.float8(emulate=True, enable_fsdp_float8_all_gather=True)
    state = fx.shard(fx.TrainState.create(fp8.convert(Float8Blocks()), fx.optim.sgd(0.1)),
                     units="auto")

    def remat_loss(state, params, batch):
        return _scored(fx.remat(lambda h: state.apply(params, h), batch[0]), batch[1])

    try:  # an eager step whose units run inside an activation-checkpointed region
        fx.make_train_step(remat_loss, precision=fp8, autodiff="autograd")(state, batch)
    except ValueError as e:
        result["region"] = str(e)
    try:
        fx.shard(fx.TrainState.create(fp8.convert(Float8Blocks()), fx.optim.sgd(0.1)),
                 units="whole")
    except ValueError as e:
        result["whole"] = str(e)
    torch.save(result, f"{out}/rank{fx.distributed.rank()}.pt")


def float8_gather_compiled(out, steps):
    """``float8_gather``'s runs compiled (the traced backend: the promise is the graph's), with
    and without the option: the losses, the final parameters, the Dynamo graphs made (one per
    run: no recompile, the restore's included), the collectives of the AOT graphs (forward and
    backward); with the option, a second run restored from a save after half the steps."""
    from torch._dynamo.backends.debugging import boxed_nop
    result = {}
    for name, option in (("float32 gather", False), ("float8 gather", True)):
        graphs, aot = [], []

        def noted(gm, inputs):
            aot.append(gm)
            return boxed_nop(gm, inputs)

        def backend(gm, inputs):
            graphs.append(gm)
            return torch._dynamo.lookup_backend("aot_eager")(gm, inputs, fw_compiler=noted,
                                                             bw_compiler=noted)

        fp8 = fx.precision.float8(emulate=True, enable_fsdp_float8_all_gather=option)
        make = lambda: fx.shard(fx.TrainState.create(  # noqa: E731
            fp8.convert(Float8Blocks()), fx.optim.adamw(1e-2)), units="auto")
        step = torch.compile(fx.make_train_step(loss_fn, precision=fp8), fullgraph=True,
                             backend=backend)
        data, losses = fx.data.Batches((X, Y), 16, seed=1), []
        record = fx.callbacks.lambda_callback(
            on_step_end=lambda s, e: losses.append(float(e.metrics["loss"])))
        state = fx.fit(make(), step, data, max_steps=steps // 2, callbacks=[record],
                       progress=False)
        if option:
            fx.checkpoint.save(f"{out}/saved", state)
        state = fx.fit(state, step, data, max_steps=steps, callbacks=[record], progress=False)
        run = {"losses": losses, "params": fx.sharding.gathered(state.params),
               "digest": fx.tree_digest(state), "collectives": graph_collectives(aot)}
        if option:
            restored = fx.checkpoint.restore(f"{out}/saved", like=make().replace(
                data=data.init()))
            restored = fx.fit(restored, step, data, max_steps=steps, progress=False)
            run["resumed"] = fx.tree_digest(restored)
        run["graphs"] = len(graphs)
        result[name] = run
    return result


def graph_collectives(graphs):
    """The all-gathers (bytes gathered, by dtype), all-reduces and reduce-scatters (dtypes) of
    AOT graphs, read from their nodes."""
    c10d = torch.ops._c10d_functional
    seen = {"gathered": {}, "all_reduce": 0, "reduce_scatter": set()}
    for gm in graphs:
        for node in gm.graph.nodes:
            value = node.meta.get("val")
            if node.target is c10d.all_gather_into_tensor.default:
                dtype = str(value.dtype)
                seen["gathered"][dtype] = seen["gathered"].get(dtype, 0) + value.nbytes
            elif node.target is c10d.all_reduce.default:
                seen["all_reduce"] += 1
            elif node.target is c10d.reduce_scatter_tensor.default:
                seen["reduce_scatter"].add(str(value.dtype))
    return seen


def sharded_units_refused(out):
    """Torch before 2.13: a compiled autograd step on sharded parameters is refused with the
    feature and the first torch that has it, while Dynamo traces its first call."""
    state = fx.shard(fx.TrainState.create(Blocks(dropout=0.2), fx.optim.sgd(0.1)), units="auto")
    step = torch.compile(fx.make_train_step(loss_fn, autodiff="autograd"), fullgraph=True)
    try:
        fx.fit(state, step, fx.data.Batches((X, Y), 16, seed=1), max_steps=1)
        result = {"error": None}
    except Exception as e:  # noqa: BLE001 - the test reads which
        result = {"error": f"{type(e).__name__}: {e}"}
    torch.save(result, f"{out}/rank{fx.distributed.rank()}.pt")


def sharded_units(out, compiled=False, steps=6):
    """Per-block sharding (units) against the whole model sharded as one unit, both trained
    with dropout on the autograd path, and the collectives an eager step runs."""
    def run(units, tx=fx.optim.adamw(1e-2), dropout=0.2, compiled=compiled, **how):
        state = fx.shard(fx.TrainState.create(Blocks(dropout=dropout), tx), units=units, **how)
        step = fx.make_train_step(loss_fn, autodiff="autograd")
        if compiled:
            step = torch.compile(step, fullgraph=True, backend=noting_marks(compiled, marked))
        data = fx.data.Batches((X, Y), 16, seed=1)
        state = fx.fit(state, step, data, max_steps=steps)
        return state

    marked = []  # per compiled graph: its nodes marked as the forward, for fxtrain._torch.recompute
    # compiled: units and bfloat16 units (2 graphs); their references run eagerly (a compile
    # costs ~25 CPU-s a rank): the whole model sharded, which draws the same keyed masks
    units, whole = run("auto"), run("whole", compiled=False)
    bf16 = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32}
    mixed = run("auto", fx.optim.sgd(0.1), **bf16)
    plain = run("whole", fx.optim.sgd(0.1), compiled=False)
    undropped = None if compiled else run("auto", dropout=0.0)  # eager covers it
    result = {"names": fx.sharding.unit_names(units), "initial": dict(Blocks().named_parameters()),
              "module": type(fx.trained_module(units).blocks[0]).__name__,
              "units": fx.sharding.gathered(units.params), "whole": fx.sharding.gathered(
                  whole.params), "digests": [fx.tree_digest(s.replace(data=None))
                                             for s in (units, whole)],
              "local": fx.sharding.local_nbytes(units.params),
              "mixed": fx.sharding.gathered(mixed.params),
              "plain": fx.sharding.gathered(plain.params),
              "undropped": undropped and fx.sharding.gathered(undropped.params),
              "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
              "marked": marked}
    if not compiled:
        step = fx.make_train_step(loss_fn, autodiff="autograd")
        batch = next(iter(fx.data.Batches((X, Y), 16, seed=1)))
        _, result["collectives"] = gathers(step, units, batch)
        result["bf16"] = {name: gathers(step, fx.shard(fx.TrainState.create(
            Blocks(), fx.optim.adamw(1e-2)), units="auto", **how), batch)[1]["dtypes"]
            for name, how in (("reduce float32", bf16),
                              ("reduce bfloat16", {"param_dtype": torch.bfloat16}))}
        result["errors"] = unit_errors(batch)
        result["by_class"] = fx.sharding.unit_names(fx.shard(
            fx.TrainState.create(Blocks(), fx.optim.sgd(0.1)), units=[Block]))
        result["defaults"] = {  # fx.shard(state)'s layout, and the whole one named
            name: fx.sharding.unit_names(fx.shard(fx.TrainState.create(model, fx.optim.sgd(0.1)),
                                                  **how))
            for name, model, how in (("blocks", Blocks(), {}), ("mlp", mlp(), {}),
                                     ("whole", Blocks(), {"units": "whole"}))}
    torch.save(result, f"{out}/rank{fx.distributed.rank()}.pt")


def noting_marks(backend, marked):
    """``backend`` (a torch.compile backend's name), noting in ``marked`` how many nodes of each
    graph it gets are marked as the step's forward (``fxtrain._torch.recompute``)."""
    def noting(gm, inputs):
        marked.append(sum(recompute._forward(n) for n in gm.graph.nodes))
        return torch._dynamo.lookup_backend(backend)(gm, inputs)

    return noting


def one_process_blocks(steps=6):
    """Blocks without dropout trained by this process on the doubled batch (world size 1)."""
    state = fx.TrainState.create(Blocks(dropout=0.0), fx.optim.adamw(1e-2))
    step = fx.make_train_step(loss_fn, autodiff="autograd")
    return fx.fit(state, step, fx.data.Batches((X, Y), 32, seed=1), max_steps=steps).params


def unit_errors(batch):
    """What fx.shard(units=...) and a step say of units they cannot use, by case."""
    class Tied(Blocks):
        def __init__(self):
            super().__init__()
            self.blocks[1].up = self.blocks[0].up

    def attempt(make):
        try:
            make()
        except ValueError as e:
            return str(e)
        return None

    state = fx.TrainState.create(Blocks(), fx.optim.sgd(0.1))
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    square = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    cube = init_device_mesh("cpu", (1, 1, 2), mesh_dim_names=("a", "b", "c"))
    unnamed = init_device_mesh("cpu", (1, 2))
    backwards = DeviceMesh("cpu", torch.tensor([[1, 0]]), mesh_dim_names=("dp", "tp"))
    return {
        "3-D mesh": attempt(lambda: fx.shard(state, cube)),
        "unnamed": attempt(lambda: fx.shard(state, unnamed)),
        "ranks out of order": attempt(lambda: fx.shard(state, backwards)),
        "2-D reduce dtype": attempt(lambda: fx.shard(state, square, units="auto",
                                                     param_dtype=torch.bfloat16,
                                                     reduce_dtype=torch.float32)),
        "uneven plan": attempt(lambda: fx.shard(state, square, tp_plan={
            "blocks.0.up": "colwise"})),
        "2-D func": attempt(lambda: fx.make_train_step(loss_fn, autodiff="func")(
            fx.shard(state, square), batch)),
        "part of the ranks": attempt(lambda: fx.shard(state, square["dp"])),
        "no blocks": attempt(lambda: fx.shard(fx.TrainState.create(mlp(), fx.optim.sgd(0.1)),
                                              units="auto")),
        "unknown": attempt(lambda: fx.shard(state, units=["blocks.9"])),
        "nested": attempt(lambda: fx.shard(state, units=["blocks", "blocks.0"])),
        "tied": attempt(lambda: fx.shard(fx.TrainState.create(Tied(), fx.optim.sgd(0.1)),
                                         units="auto")),
        "dtype alone": attempt(lambda: fx.shard(state, units="whole",
                                                param_dtype=torch.bfloat16)),
        "func": attempt(lambda: fx.make_train_step(loss_fn, autodiff="func")(
            fx.shard(state, units="auto"), batch)),
    }


def sharded_saves(out, ckpt, restore_only="no", eio_rank="none"):
    """A sharded run saving every 4 steps (keep 2) and a one-off save at the end, or (with
    ``restore_only="yes"``) the restore of what it saved onto a sharded template; ``eio_rank``:
    the rank whose reads of shard files fail with EIO (a disk failing under one node)."""
    make = lambda: fx.TrainState.create(mlp(sizes=(8, 17, 4)), fx.optim.adamw(1e-2))  # noqa
    data = fx.data.Batches((X, Y), 16, seed=1)
    rank = fx.distributed.rank()
    if restore_only == "yes":
        if eio_rank == str(rank):
            import errno

            import fxtrain.checkpoint.shards as shards

            def failing(path):
                raise OSError(errno.EIO, "Input/output error", str(path))
            shards.file_crc = failing
        like = fx.shard(make().replace(data=data.init()))
        try:
            latest = fx.checkpoint.CheckpointManager(ckpt).restore(like=like)
        except (fx.checkpoint.DamagedCheckpointError,  # every rank hears of it, at once
                fx.checkpoint.UnreadableCheckpointError) as e:
            torch.save({"damaged": f"{type(e).__name__}: {e}"}, f"{out}/restored{rank}.pt")
            return
        final = fx.checkpoint.restore(f"{out}/final", like=like)
        torch.save({"latest": fx.tree_digest(latest), "final": fx.tree_digest(final),
                    "local": tuple(latest.params["0.weight"].to_local().shape)},
                   f"{out}/restored{rank}.pt")
        return
    with fx.checkpoint.CheckpointManager(ckpt, keep_latest=2) as manager:
        state = fx.fit(fx.shard(make()), fx.make_train_step(loss_fn), data, max_steps=12,
                       checkpoint=manager, callbacks=[fx.callbacks.checkpoint_policy(every=4)])
        steps = manager.all_steps()
    fx.checkpoint.save(f"{out}/final", state)
    try:
        fx.checkpoint.save(f"{out}/final", state)
        again = "saved twice"
    except Exception as e:  # every rank hears of it, rank 0 with the original error
        again = f"{type(e).__name__}: {e}"
    torch.save({"digest": fx.tree_digest(state), "steps": steps, "again": again},
               f"{out}/rank{rank}.pt")


def sequential_blocks(out, width=256, depth=12, rows=8, backend="inductor"):
    """The issue's model, smaller: ``depth`` x Sequential(Linear(width, width), ReLU) in an
    nn.Sequential, AdamW, a compiled step, sharded as fx.shard does by default; writes
    the units it chose, what it logged and the step's peak in tensors (``step_peak``). In one
    process (no group): the same model and step, unsharded."""
    import logging
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width),
                                                      torch.nn.ReLU()) for _ in range(depth)])
    state = fx.TrainState.create(model, fx.optim.adamw(1e-3))
    del model
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("fxtrain").addHandler(handler)
    logging.getLogger("fxtrain").setLevel(logging.INFO)
    if fx.distributed.world_size() > 1:
        state = fx.shard(state)
    g = torch.Generator().manual_seed(fx.distributed.rank())
    batch = torch.randn(rows, width, generator=g)
    step = torch.compile(fx.make_train_step(lambda s, p, x: s.apply(p, x).square().mean()),
                         fullgraph=True, backend=backend)
    result = {"units": fx.sharding.unit_names(state), "said": said,
              "params": sum(p.numel() for p in state.params.values()),
              **step_peak(state, step, batch, f"{out}/trace{fx.distributed.rank()}.json")}
    torch.save(result, f"{out}/rank{fx.distributed.rank()}.pt")


def step_peak(state, step, batch, trace):
    """The peak of a step in tensors, after a first step that compiles: the bytes of the state
    this rank holds (parameters and optimizer state) and the most the step allocated above
    them (``allocated_peak``)."""
    import threading
    from torch.profiler import ProfilerActivity, profile
    state, _ = step(state, batch, donate=True)
    held = fx.sharding.local_nbytes((state.params, state.opt_state))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state, _ = step(state, batch, donate=True)
    prof.export_chrome_trace(trace)
    peak = allocated_peak(trace, threading.get_native_id())
    return {"state_bytes": held, "step_bytes": peak, "peak_bytes": held + peak}


def allocated_peak(trace, thread):
    """The most bytes live at once of those allocated on ``thread`` (the step's; torch.profiler's
    record of the CPU allocator, which the state's donated storage leaves alone), less what
    gloo allocates inside its own collectives (a ``c10d::`` op: its copy of a reduce-scatter's
    input) and on its threads. Those are the CPU backend's copies, which NCCL does not make,
    and when they go depends on when gloo's threads run: counted, they moved a rank's peak from
    0.56x one process's to 0.61x under load (0.75x once in CI). The step's own buffers,
    collectives' outputs among them, are all counted."""
    import json
    events = json.loads(Path(trace).read_text())["traceEvents"]
    gloo = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("ph") == "X"
            and e.get("tid") == thread and e["name"].startswith("c10d::")]
    memory = sorted((e for e in events if e.get("name") == "[memory]"  # in fxtrain._memory's
                     and e["args"].get("Device Type") in (None, 0)),  # order: CPU, by time and
                    key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))  # then event index
    if not any(e["tid"] == thread for e in memory):
        raise AssertionError(f"no allocation on thread {thread} in {trace}")
    live, now, peak = {}, 0, 0
    for e in memory:
        address, size = e["args"]["Addr"], e["args"]["Bytes"]
        if size > 0 and e["tid"] == thread and not any(a <= e["ts"] <= b for a, b in gloo):
            live[address] = size
            now += size
        elif size < 0 and address in live:
            now -= live.pop(address)
        peak = max(peak, now)
    return peak


def tiny_gpt2(seed=0):
    import transformers
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return transformers.GPT2LMHeadModel(config)


def gpt2_loss(state, params, batch):
    return state.apply(params, input_ids=batch, labels=batch).loss


def sharded_gpt2_saves(out, ckpt):
    """A tiny GPT-2 sharded over the ranks as fx.shard does by default (per block, from torch
    2.13) trains 3 compiled steps of the default step (autodiff "auto": autograd's path for the
    blocks, its Dynamo settings turned on while the step is traced) and saves a sharded
    checkpoint; writes the units and the graphs compiled."""
    from helpers import TRACED, graph_count
    before = graph_count()
    ids = torch.randint(0, 40, (8, 12), generator=torch.Generator().manual_seed(0))
    state = fx.shard(fx.TrainState.create(tiny_gpt2(), fx.optim.adamw(1e-2)))
    step = torch.compile(fx.make_train_step(gpt2_loss), fullgraph=True, backend=TRACED)
    with fx.checkpoint.CheckpointManager(ckpt, async_save=False) as manager:
        fx.fit(state, step, fx.data.Batches(ids, 2, seed=0), max_steps=3, checkpoint=manager)
    torch.save({"units": fx.sharding.unit_names(state), "graphs": graph_count() - before},
               f"{out}/rank{fx.distributed.rank()}.pt")


def tiny_llama(seed=0, layers=4):
    """A Llama small enough for the CPU whose layers hold most of its parameters (the part a
    tensor-parallel plan splits): ``layers`` layers of width 32, a vocabulary of 24."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      use_cache=False)
    return transformers.LlamaForCausalLM(config)


RANK_LAYERS = 2
"""The layers of the rank jobs' Llama (``rank_llama``): two blocks still make per-block units
and a plan's layers still hold 92% of the parameters; Dynamo's and AOTAutograd's trace of a
compiled step on DTensors, most of a compiled rank's CPU time, grows with each layer (a 4-rank
FSDP x TP run: 217 CPU-s with 4 layers, 135 with 2)."""


def rank_llama(seed=0):
    """``tiny_llama`` of ``RANK_LAYERS`` layers: the model the rank jobs and their one-process
    references train and restore."""
    return tiny_llama(seed, layers=RANK_LAYERS)


def llama_batches(state=None):
    """Global batches of 4 sequences, each data replica of ``state`` (``data_world_size``)
    taking its share: every layout trains on one process's batches."""
    ids = torch.randint(0, 24, (16, 12), generator=torch.Generator().manual_seed(3))
    return fx.data.Batches(ids, 4 // fx.distributed.data_world_size(state), seed=0)


MESHES = {"tp": None, "fsdp_tp": ("dp", "tp"), "hsdp": ("replicate", "shard")}


def tensor_parallel(out, ckpt="", compiled=False, steps=20, layout="tp", units=None):
    """A tiny Llama trained with its own tensor-parallel plan over the ranks (tp_plan="auto"),
    the default step, ``steps`` steps; writes the losses, the whole parameters, the bytes of
    parameters and optimizer state this rank holds, the graphs, and saves a checkpoint.
    ``layout``: "tp" (a 1-D mesh), "fsdp_tp" (a 2 x 2 mesh, sharded over its first dimension
    and the plan over its second) or "hsdp" (2 x 2, replicated over the first dimension and
    sharded over the second, no plan); ``units`` as fx.shard's. It evaluates as it trains
    (every 10 steps) and after (``fx.evaluate``, with the eval step compiled when ``compiled``),
    predicts, and takes the trained module's logits (``evaluated``)."""
    from helpers import TRACED, graph_count
    state = fx.TrainState.create(rank_llama(), fx.optim.adamw(1e-2))
    if fx.distributed.world_size() > 1:
        names = MESHES[layout]
        mesh = None if names is None else fx.sharding.mesh((2, 2), names)
        state = fx.shard(state, mesh, tp_plan=None if layout == "hsdp" else "auto",
                         units=units)
    step = fx.make_train_step(gpt2_loss)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend=TRACED)
    losses, evals, before = [], [], graph_count()
    seen = fx.callbacks.lambda_callback(
        on_step_end=lambda s, e: losses.append(float(e.metrics["loss"])),
        on_eval_end=lambda s, e: evals.append({k: float(v) for k, v in e.metrics.items()}))
    eval_step = fx.make_eval_step(gpt2_loss)
    final = fx.fit(state, step, llama_batches(state), max_steps=steps, callbacks=[seen],
                   sync_every=1, eval_step=eval_step, eval_data=held_out_batches(),
                   eval_every=10, progress=False)
    graphs = graph_count() - before  # the train step's (the eval step runs eagerly in fit)
    if ckpt:
        fx.checkpoint.save(ckpt, final)
    held = fx.sharding.local_nbytes((final.params, final.opt_state))
    torch.save({"losses": losses, "params": fx.sharding.gathered(final.params), "held": held,
                "graphs": graphs, "split": final.layout.planned,
                "opt_state": torch.utils._pytree.tree_leaves(
                    fx.sharding.gathered(final.opt_state)),
                "units": fx.sharding.unit_names(final), "evals": evals,
                **evaluated(final, eval_step, compiled)},
               f"{out}/{layout}_rank{fx.distributed.rank()}.pt")


def held_out():
    """6 held-out sequences for the evaluations."""
    return torch.randint(0, 24, (6, 12), generator=torch.Generator().manual_seed(4))


def held_out_batches():
    """``held_out()`` in batches of 2 split over the ranks (whole parameters: every rank a
    replica)."""
    return fx.data.Batches(held_out(), 2, shuffle=False, drop_last=False)


def evaluated(state, eval_step, compiled):
    """What a trained (maybe sharded) state computes: ``fx.evaluate`` (its eval step compiled
    when ``compiled``), ``fx.predict``'s logits, and the trained module's."""
    from helpers import TRACED
    ids = held_out_batches()
    if compiled:
        eval_step = torch.compile(eval_step, fullgraph=True, backend=TRACED)
    loss = float(fx.evaluate(eval_step, state, ids)["loss"])
    predicted = fx.predict(lambda s, x: {"logits": s.apply(s.params, input_ids=x).logits},
                           state, ids)["logits"]
    module = fx.trained_module(state).eval()
    with torch.no_grad():
        logits = module(input_ids=held_out()).logits
    return {"evaluated": loss, "predicted": predicted, "logits": logits}


def layout_first_or_last(out, first=True, layout="tp", steps=6):
    """A tiny Llama, its plan "auto" (``layout`` "tp": 1-D over the ranks; "fsdp_tp": on a 2 x
    2 mesh), trained with evaluation every 3 steps, its data and step made after ``fx.shard``
    (``first``) or before it (the layout is resolved from the state when ``fit`` starts, not
    when they are made); then ``fx.evaluate``, ``fx.predict`` and the trained module on the
    trained state. Alone (world 1) the same, unsharded. Writes the losses, the evaluations
    and what the trained state computes."""
    ids = torch.randint(0, 24, (16, 12), generator=torch.Generator().manual_seed(3))
    held_out = torch.randint(0, 24, (6, 12), generator=torch.Generator().manual_seed(4))
    state = fx.TrainState.create(rank_llama(), fx.optim.adamw(1e-2))

    def sharded(state):
        if fx.distributed.world_size() == 1:
            return state
        mesh = None if layout == "tp" else fx.sharding.mesh((2, 2), MESHES[layout])
        return fx.shard(state, mesh, tp_plan="auto")

    if first:
        state = sharded(state)
    replicas = {"tp": 1, "fsdp_tp": 2}[layout] if fx.distributed.world_size() > 1 else 1
    data = fx.data.Batches(ids, 4 // replicas, seed=0)  # global batches of 4: its share
    step = fx.make_train_step(gpt2_loss)
    if not first:
        state = sharded(state)
    evals, losses = [], []
    seen = fx.callbacks.lambda_callback(
        on_step_end=lambda s, e: losses.append(float(e.metrics["loss"])),
        on_eval_end=lambda s, e: evals.append({k: float(v) for k, v in e.metrics.items()}))
    eval_step = fx.make_eval_step(gpt2_loss)
    final = fx.fit(state, step, data, max_steps=steps, callbacks=[seen], eval_step=eval_step,
                   eval_data=fx.data.Batches(held_out, 2, shuffle=False, drop_last=False),
                   eval_every=3, progress=False)
    evaluated = fx.evaluate(eval_step, final, [held_out[:4], held_out[4:]])
    predicted = fx.predict(lambda s, x: {"logits": s.apply(s.params, input_ids=x).logits},
                           final, fx.data.Batches(held_out, 4, shuffle=False,
                                                  drop_last=False))
    module = fx.trained_module(final).eval()
    with torch.no_grad():
        logits = module(input_ids=held_out).logits
    torch.save({"losses": losses, "evals": evals, "evaluated": {k: float(v) for k, v in
                                                                evaluated.items()},
                "predicted": predicted["logits"], "logits": logits,
                "params": fx.sharding.gathered(final.params)},
               f"{out}/rank{fx.distributed.rank()}.pt")


def restored_llama(out, ckpt):
    """The checkpoint ``ckpt`` of a tiny Llama restored onto this job's ranks, sharded by
    fx.shard's default on a 1-D mesh: its whole parameters and optimizer state."""
    like = fx.shard(fx.TrainState.create(rank_llama(seed=1), fx.optim.adamw(1e-2)))
    restored = fx.checkpoint.restore(ckpt, like=like.replace(data=llama_batches().init()))
    torch.save({"params": fx.sharding.gathered(restored.params),
                "opt_state": torch.utils._pytree.tree_leaves(fx.sharding.gathered(
                    restored.opt_state)),
                "units": fx.sharding.unit_names(restored)},
               f"{out}/restored_rank{fx.distributed.rank()}.pt")


def sharded_callbacks(out):
    """Callbacks that keep copies of the parameters (swa, restore-best early stopping) on a
    sharded state: their states made after sharding (by fit), or before and passed to fx.shard,
    train alike; made before and not passed, fx.shard warns."""
    import warnings

    def run(order):
        swa = fx.callbacks.swa(start=4, every=2)
        best = fx.callbacks.early_stopping("loss", patience=100, restore_best=True)
        before = [swa, best] if order != "after" else []
        state = fx.TrainState.create(mlp(sizes=(8, 17, 4)), fx.optim.adamw(1e-2),
                                     callbacks=before)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = fx.shard(state, callbacks=before if order == "passed" else ())
        if order == "not passed":
            return [str(w.message) for w in caught]
        state = fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches((X, Y), 16, seed=1),
                       max_steps=12, callbacks=[swa, best], eval_step=fx.make_eval_step(loss_fn),
                       eval_every=4, eval_data=fx.data.Batches((X, Y), 64, shuffle=False))
        average = fx.callbacks.with_swa_params(state).params["0.weight"]
        return fx.tree_digest(state), fx.sharding.is_dtensor(average)

    torch.save({order: run(order) for order in ("after", "passed", "not passed")},
               f"{out}/rank{fx.distributed.rank()}.pt")


def sharded_exit(out):
    """A short sharded run that ends as programs do (``spawned`` destroys the group): the last
    exit handler (registered first) records the threads still alive then, gloo's included."""
    import atexit
    rank = fx.distributed.rank()  # the group is gone by then

    def record():
        tasks = Path("/proc/self/task")
        names = [(tasks / t / "comm").read_text().strip() for t in os.listdir(tasks)]
        with open(f"{out}/threads{rank}.txt", "w") as f:
            f.write("\n".join(names))

    atexit.register(record)
    state = fx.shard(fx.TrainState.create(mlp(sizes=(8, 17, 4)), fx.optim.adamw(1e-2)))
    fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches((X, Y), 16, seed=1), max_steps=2)


def early_stop(out):
    """Each rank evaluates its own, unequal share of the eval data (70 and 30 of 100 examples);
    early stopping sees the merged loss, which weighs each rank by its examples."""
    rank = fx.distributed.rank()
    share = slice(0, 70) if rank == 0 else slice(70, 100)
    x, y = X[share], Y[share]
    state = fx.TrainState.create(mlp(sizes=(8, 16, 4)), fx.optim.sgd(0.5))
    evals = []
    cb = fx.callbacks.early_stopping("loss", patience=1, min_delta=10.0)  # stops at 2nd eval
    record = fx.callbacks.lambda_callback(on_eval_end=lambda s, e: evals.append(
        (e.step, float(e.metrics["loss"]), float(loss_fn(s, s.params, (x, y))[0]))))
    final = fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches((X, Y), 16, seed=1),
                   max_steps=100, eval_step=fx.make_eval_step(loss_fn), eval_every=5,
                   eval_data=fx.data.Batches((x, y), 16, shuffle=False, drop_last=False,
                                             shard=False),
                   callbacks=[cb, record])
    torch.save({"evals": evals, "step": int(final.step)}, f"{out}/rank{rank}.pt")


def host_stop(out):
    """Only rank 1 asks to stop (a clock, say): every rank stops at the same step."""
    ask = lambda s, e: (s, fx.Control(stop=e.kind == "step_end" and e.step == 7  # noqa: E731
                                      and fx.distributed.rank() == 1))
    state = fx.TrainState.create(mlp(sizes=(8, 16, 4)), fx.optim.sgd(0.1))
    final = fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches((X, Y), 16), max_steps=50,
                   sync_every=4, callbacks=[ask])
    torch.save({"step": int(final.step)}, f"{out}/rank{fx.distributed.rank()}.pt")


def timed_saves(out, ckpt):
    """A save every 60 s, each rank on its own fake clock (25 s a step on rank 0, 40 s on
    rank 1): each rank's own clock runs out at different steps; the saves happen at the same."""
    rank = fx.distributed.rank()
    clock, pace = [0.0], 25.0 if rank == 0 else 40.0
    tick = fx.callbacks.lambda_callback(
        on_step_end=lambda s, e: clock.__setitem__(0, clock[0] + pace))
    saved = []
    seen = fx.callbacks.lambda_callback(on_checkpoint=lambda s, e: saved.append(e.step))
    policy = fx.callbacks.checkpoint_policy(every_secs=60, time_fn=lambda: clock[0])
    state = fx.TrainState.create(mlp(sizes=(8, 16, 4)), fx.optim.sgd(0.1))
    with fx.checkpoint.CheckpointManager(ckpt, keep_latest=10, async_save=False) as manager:
        fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches((X, Y), 16), max_steps=10,
               sync_every=4, checkpoint=manager, callbacks=[tick, policy, seen])
    torch.save({"saved": saved}, f"{out}/rank{rank}.pt")


def resumable(out, ckpt, steps=40, sleep=0.0, shard="no"):
    """Shuffled, dropout, checkpoints every 5 steps and logs; resumes from ``ckpt``. With
    ``shard="units"`` the state is sharded per layer (fx.shard(units=[nn.Linear]), on the
    autograd path), so are its checkpoints; ``"fsdp_tp"`` (4 ranks): a 2 x 2 mesh, sharded
    over its first dimension, the hidden layer split by a plan over its second; ``"hsdp"``
    (4 ranks): replicated over the first, sharded per layer over the second."""
    hidden = 18 if shard == "fsdp_tp" else 17  # torch's plans split evenly only
    state = fx.TrainState.create(mlp(sizes=(8, hidden, 4), dropout=0.2), fx.optim.adamw(1e-2))
    autodiff, loss = "func", loss_fn
    if shard == "units":  # and the model recomputed in the backward (fx.remat)
        state, autodiff, loss = fx.shard(state, units=[torch.nn.Linear]), "autograd", remat_loss
    elif shard in ("fsdp_tp", "hsdp"):
        mesh = fx.sharding.mesh((2, 2), MESHES[shard])
        state, autodiff = fx.shard(state, mesh, units=[torch.nn.Linear] if shard == "hsdp"
                                   else None, tp_plan={"0": "colwise", "3": "rowwise"}
                                   if shard == "fsdp_tp" else None), "autograd"
    writer = fx.logging.JsonlWriter(f"{out}/log.jsonl")
    slow = fx.callbacks.lambda_callback(on_step_end=lambda s, e: time.sleep(sleep))
    with fx.checkpoint.CheckpointManager(ckpt, keep_latest=3, async_save=True) as manager:
        final = fx.fit(state, fx.make_train_step(loss, autodiff=autodiff),
                       fx.data.Batches((X, Y), 32 // fx.distributed.data_world_size(state), seed=2),
                       max_steps=steps, checkpoint=manager, callbacks=[
                           fx.callbacks.checkpoint_policy(every=5), slow,
                           fx.callbacks.log_metrics(writer, every=5)])
    writer.close()
    with open(f"{out}/digest{fx.distributed.rank()}.txt", "w") as f:
        f.write(fx.tree_digest(final.replace(data=None)))


def stream_examples(n=44):
    """44 examples with their ids: an epoch of 5 global batches of 8 (the last 4 dropped)."""
    return [{"id": torch.tensor(i), "x": X[i], "y": Y[i]} for i in range(n)]


def streamed(out, runs):
    """Each ``(ckpt, steps, tag)`` of ``runs`` in turn: fx.fit on an fx.data.Stream (a shuffle
    buffer of 8, a global batch of 8 whatever the world size), resumed from ``ckpt`` where it
    holds a checkpoint (one is saved every 7 steps), to ``steps`` steps. Writes, per run and
    rank, the example ids of each batch the rank trained on, and the final parameters."""
    for ckpt, steps, tag in runs:
        seen, trained = [], []

        def collate(examples, seen=seen):
            seen.append([int(e["id"]) for e in examples])
            return torch.stack([e["x"] for e in examples]), torch.stack([e["y"] for e in examples])

        data = fx.data.Stream(lambda epoch: stream_examples(),
                              batch_size=8 // fx.distributed.world_size(), collate=collate,
                              shuffle_buffer=8, seed=4)
        state = fx.TrainState.create(mlp(sizes=(8, 16, 4)), fx.optim.adamw(1e-2))
        count = fx.callbacks.lambda_callback(on_step_end=lambda s, e, t=trained: t.append(e.step))
        with fx.checkpoint.CheckpointManager(ckpt, async_save=False) as manager:
            final = fx.fit(state, fx.make_train_step(loss_fn), data, max_steps=steps,
                           checkpoint=manager,
                           callbacks=[fx.callbacks.checkpoint_policy(every=7), count])
        torch.save({"seen": seen[:len(trained)], "steps": trained, "params": final.params},
                   f"{out}/{tag}_rank{fx.distributed.rank()}.pt")


def failing(out):
    """Rank 1 raises at step 3; rank 0 would wait at the next collective."""
    def boom(s, e):
        if e.kind == "step_end" and e.step == 3 and fx.distributed.rank() == 1:
            raise RuntimeError("rank 1 exploded at step 3")
    state = fx.TrainState.create(mlp(sizes=(8, 16, 4)), fx.optim.sgd(0.1))
    fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches((X, Y), 16), max_steps=50,
           sync_every=2, callbacks=[boom])


def predicting(out):
    """Each rank predicts its share of 45 examples (batches of 4 per rank: the last global
    batch leaves rank 0 a short one and rank 1 an empty one)."""
    state = fx.TrainState.create(mlp(sizes=(8, 16, 4)), fx.optim.sgd(0.1))
    predict_fn = lambda s, x: {"logits": s.apply(s.params, x), "row": x[:, 0]}  # noqa: E731
    out_ = fx.predict(predict_fn, state, fx.data.Batches(X[:45], 4, shuffle=False,
                                                         drop_last=False))
    torch.save({"out": out_, "params": state.params}, f"{out}/rank{fx.distributed.rank()}.pt")


def exits(out):
    """Returns without leaving the group (the __main__ block checks fxtrain leaves it)."""
    del out


SCENARIOS = {"exits": exits, "train": train, "overlapped": overlapped, "sharded": sharded, "sharded_units": sharded_units,
             "sharded_units_refused": sharded_units_refused,
             "sharded_saves": sharded_saves, "sharded_callbacks": sharded_callbacks,
             "sharded_exit": sharded_exit, "early_stop": early_stop, "host_stop": host_stop,
             "timed_saves": timed_saves, "resumable": resumable, "failing": failing,
             "predicting": predicting, "lm_weighted": lm_weighted,
             "streamed": streamed, "sharded_gpt2_saves": sharded_gpt2_saves,
             "tensor_parallel": tensor_parallel, "restored_llama": restored_llama,
             "layout_first_or_last": layout_first_or_last,
             "sequential_blocks": sequential_blocks, "float8_gather": float8_gather}


def several(jobs):
    """Each ``(name, args, kwargs)`` of ``jobs`` in turn (``name`` in ``SCENARIOS``, or a
    function of another worker module), in this one group: one launch for
    several short scenarios (a launch, torch's import in each rank and the group's start, cost
    about 7 CPU-s of the 8 a short eager scenario takes on 2 ranks). Dynamo starts afresh for
    each, as in a process of its own (a scenario records its graph count)."""
    for name, args, kwargs in jobs:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        (SCENARIOS[name] if isinstance(name, str) else name)(*args, **kwargs)
        torch.distributed.barrier()


SCENARIOS["several"] = several


def spawned(rank, world, port, name, args, kwargs):
    """torch.multiprocessing entry point: join the group, run the scenario (``name`` in
    ``SCENARIOS``, or a function of another worker module)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fx.distributed.init()
    try:
        (SCENARIOS[name] if isinstance(name, str) else name)(*args, **kwargs)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":  # under torchrun: python -m torch.distributed.run ... dist_worker.py
    import atexit
    atexit.register(lambda: print(f"after fxtrain's exit handler: group left = "
                                  f"{not torch.distributed.is_initialized()}", flush=True))
    torch.set_num_threads(1)
    fx.distributed.init()
    name, *rest = sys.argv[1:]
    kwargs = dict(arg.split("=", 1) for arg in rest if "=" in arg)
    args = [arg for arg in rest if "=" not in arg]
    if "sleep" in kwargs:
        kwargs["sleep"] = float(kwargs["sleep"])
    if "steps" in kwargs:
        kwargs["steps"] = int(kwargs["steps"])
    SCENARIOS[name](*args, **kwargs)


def check_evaluated(ranks, one):
    """A sharded run's evaluations (in fit, ``fx.evaluate``) against one process's: the same on
    every rank, and within the training's own tolerance (its losses within 1e-4 relative of one
    process's after 20 steps); ``fx.predict``'s logits those of the trained module (the same
    parameters, another path: float32 rounding)."""
    assert len(ranks[0]["evals"]) == len(one["evals"]) == 2
    for r in ranks:  # reduced across the ranks: the same numbers; each rank's own module: the
        # same weights and input, computed apart (float32 rounding of other kernel paths)
        assert r["evals"] == ranks[0]["evals"] and r["evaluated"] == ranks[0]["evaluated"]
        torch.testing.assert_close(r["logits"], ranks[0]["logits"], rtol=0, atol=1e-5)
    for got, want in zip(ranks[0]["evals"], one["evals"]):
        assert got.keys() == want.keys()
        for k in want:
            assert abs(got[k] - want[k]) <= 1e-4 * abs(want[k]), (k, got, want)
    assert abs(ranks[0]["evaluated"] - one["evaluated"]) <= 1e-4 * abs(one["evaluated"])
    torch.testing.assert_close(ranks[0]["logits"], ranks[0]["predicted"], rtol=0, atol=1e-5)
