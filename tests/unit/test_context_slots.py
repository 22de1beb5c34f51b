"""Context parallelism's slices (issue 79): the positions each rank holds (torch's head-tail load
balance), a batch cut to them as one process's batch reads there, the meshes fx.shard takes with
a context dimension, and what is refused by name. The ranks' runs: tests/ranks/
test_context_parallel_ranks.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxtrain.distributed._context import documents, laid_out, sliced, slots


@given(size=st.integers(1, 8), chunk=st.integers(1, 6))
@settings(max_examples=40, deadline=None)
def test_the_ranks_slots_cover_the_sequence_once_each_with_a_head_and_a_tail(size, chunk):
    length = 2 * size * chunk
    held = [slots(length, size, r) for r in range(size)]
    assert torch.equal(torch.cat(held).sort().values, torch.arange(length))
    for r, positions in enumerate(held):  # rank r: chunks r and 2 * size - 1 - r
        assert positions.tolist() == [*range(r * chunk, (r + 1) * chunk),
                                      *range((2 * size - 1 - r) * chunk, (2 * size - r) * chunk)]


@pytest.mark.parametrize("length,size", [(16, 2), (32, 4), (24, 3), (64, 8)])
def test_the_slots_are_torchs_head_tail_load_balance(length, size):
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
        _HeadTailLoadBalancer)
    order = _HeadTailLoadBalancer(length, size, "cpu")._generate_indices()[0]
    assert torch.equal(torch.cat([slots(length, size, r) for r in range(size)]),
                       order.long())


def test_a_length_the_chunks_do_not_divide_is_refused_by_name():
    with pytest.raises(ValueError, match=r"cuts each sequence into 4 equal chunks; a length of "
                                         r"18 is not a multiple of 4: pad .*labels -100"):
        slots(18, 2, 0)


def _batch(rows=2, length=8):
    ids = torch.arange(rows * length).reshape(rows, length)
    return {"input_ids": ids, "labels": ids + 100}


def test_a_batch_is_cut_as_one_process_reads_it_at_the_ranks_positions():
    """Each rank's input ids, positions and targets are one process's at its positions: the
    labels shifted on the whole row first (a head chunk's last target is the next chunk's
    first label), the last position's target -100; the rows and other entries untouched."""
    batch = {**_batch(), "weights": torch.ones(2)}
    whole_targets = torch.cat([batch["labels"][:, 1:], torch.full((2, 1), -100)], dim=1)
    for rank in range(2):
        index = slots(8, 2, rank)
        cut = sliced(batch, 2, rank)
        assert sorted(cut) == ["input_ids", "position_ids", "shift_labels", "weights"]
        assert torch.equal(cut["input_ids"], batch["input_ids"][:, index])
        assert torch.equal(cut["position_ids"], index.expand(2, 4))
        assert torch.equal(cut["shift_labels"], whole_targets[:, index])
        assert cut["weights"] is batch["weights"]
    # rank 0 holds chunks 0 and 3: position 1's target is position 2's label, on rank 1
    assert sliced(batch, 2, 0)["shift_labels"][0].tolist() == [101, 102, 107, -100]
    from fxtrain.distributed import _context
    from fxtrain.losses._mean import IGNORE_INDEX
    assert _context.IGNORE_INDEX == IGNORE_INDEX  # the loss counts no target of the last


@pytest.mark.parametrize("batch,error,match", [
    ((torch.zeros(2, 8),), TypeError, "a dict of \\(batch, length\\) tensors .* got tuple"),
    ({**_batch(), "attention_mask": torch.ones(2, 8)}, ValueError,
     "holds 'attention_mask', a padding mask: pad every sequence .* labels -100"),
    ({**_batch(), "cu_seq_lens_q": torch.tensor([0, 4, 8])}, ValueError,
     "packed documents' boundaries"),
    ({**_batch(), "shift_labels": torch.zeros(2, 8)}, ValueError,
     "both labels and shift_labels"),
    ({"labels": torch.zeros(2, 8)}, ValueError, "no input_ids \\(its keys: \\['labels'\\]\\)"),
    ({**_batch(), "document_ids": torch.zeros(2, 8)}, ValueError,
     "holds 'document_ids', documents given by number; give packed documents as position_ids"),
    ({**_batch(), "document_mask": torch.ones(2, 4, 8, dtype=torch.bool)}, ValueError,
     "holds 'document_mask', the name context parallelism gives the mask it makes"),
    ({**_batch(), "position_ids": torch.arange(6).expand(2, 6)}, ValueError,
     "position_ids is \\(2, 6\\), input_ids \\(2, 8\\)"),
    ({**_batch(), "position_ids": torch.arange(8).expand(3, 8)}, ValueError,
     "position_ids is \\(3, 8\\), input_ids \\(2, 8\\)"),
    ({**_batch(), "shift_labels": torch.zeros(2, 6)}, ValueError,
     "both labels and shift_labels"),
    ({"input_ids": torch.zeros(2, 8), "shift_labels": torch.zeros(2, 6)}, ValueError,
     "shift_labels is \\(2, 6\\), input_ids \\(2, 8\\)"),
    (_batch(length=6), ValueError, "a length of 6 is not a multiple of 4"),
], ids=["not a dict", "padding mask", "packed", "two label keys", "no ids", "documents",
        "mask",
        "positions' shape", "positions' rows",
        "two label keys, bad shape", "bad shape", "length"])
def test_a_batch_it_cannot_cut_is_refused_by_name(batch, error, match):
    with pytest.raises(error, match=match):
        sliced(batch, 2, 0)


@given(lengths=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=4), min_size=1,
                        max_size=3))
@settings(max_examples=40, deadline=None)
def test_packed_positions_number_their_documents_as_transformers_does(lengths):
    """Rows of documents of any lengths (each row's total the longest's, the rest one last
    document): each token's document is its document's index in its row, and transformers'
    own ``find_packed_sequence_indices`` reads the same (it returns None for rows of one)."""
    from transformers.masking_utils import find_packed_sequence_indices
    width = max(sum(row) for row in lengths)
    rows = [row + ([width - sum(row)] if sum(row) < width else []) for row in lengths]
    positions = torch.tensor([[p for n in row for p in range(n)] for row in rows])
    expected = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in rows])
    assert torch.equal(documents(positions), expected)
    theirs = find_packed_sequence_indices(positions)
    assert torch.equal(theirs if theirs is not None else torch.zeros_like(expected), expected)


def test_packed_documents_are_cut_with_their_positions_and_masked_over_whole_rows():
    """A batch's own positions (two documents of 3 and 5 tokens, then one of 8) are cut as the
    input ids are, and ``document_mask`` says, for each of the rank's positions, which of the
    whole row's it attends, the keys in the order the ranks' slices gather in: the rule
    written out per pair of positions."""
    batch = {**_batch(), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4],
                                                       list(range(8))])}
    document = [[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8]
    gathered = torch.cat([slots(8, 2, r) for r in range(2)]).tolist()
    for rank in range(2):
        cut = sliced(batch, 2, rank)
        index = slots(8, 2, rank)
        assert torch.equal(cut["position_ids"], batch["position_ids"][:, index])
        expected = [[[document[row][k] == document[row][q] and k <= q for k in gathered]
                     for q in index.tolist()] for row in range(2)]
        assert cut["document_mask"].dtype == torch.bool
        assert cut["document_mask"].tolist() == expected
        assert "document_ids" not in cut


class _Mesh:
    """What ``laid_out`` reads of a DeviceMesh: names, shape and this rank's place (rank 0)."""

    def __init__(self, shape, names):
        self.shape, self.mesh_dim_names = tuple(shape), tuple(names)
        self.mesh = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)

    def size(self, d):
        return self.shape[d]

    def get_local_rank(self, d):
        return 0

    def get_group(self, d):
        return f"group {d}"


def _made(shape=None, names=None):
    return ("1-D",) if shape is None else (shape, names)


@pytest.mark.parametrize("shape,names,plan,made", [
    ((8,), ("cp",), None, ("1-D",)),
    ((2, 4), ("dp", "cp"), None, ("1-D",)),
    ((2, 2, 2), ("dp", "cp", "tp"), "auto", ((4, 2), ("dp_cp", "tp"))),
    ((4, 2), ("cp", "tp"), "auto", ((4, 2), ("cp", "tp"))),
    ((2, 2, 2), ("replicate", "shard", "cp"), None, ((2, 4), ("replicate", "shard_cp"))),
])
def test_the_context_dimension_shards_the_parameters_with_the_one_before_it(shape, names, plan,
                                                                            made):
    mesh, context = laid_out(_Mesh(shape, names), "cp", plan, _made)
    assert mesh == made
    assert (context.dim, context.size, context.rank) == ("cp", shape[names.index("cp")], 0)
    assert context.group == f"group {names.index('cp')}"


@pytest.mark.parametrize("shape,names,plan,match", [
    ((2, 4), ("dp", "seq"), None, "dimensions are named \\('dp', 'seq'\\); name the one"),
    ((4, 2), ("cp", "dp"), None, "a mesh \\('cp', 'dp'\\) puts the context dimension where"),
    ((2, 2, 2), ("dp", "tp", "cp"), "auto", "\\('dp', 'tp', 'cp'\\) puts the context"),
    ((2, 4), ("dp", "cp"), "auto", "\\('dp', 'cp'\\) puts the context"),
    ((2, 2, 2), ("replicate", "cp", "shard"), None, "puts the context dimension"),
])
def test_a_context_dimension_that_would_not_shard_with_the_data_is_refused(shape, names, plan,
                                                                           match):
    with pytest.raises(ValueError, match=match):
        laid_out(_Mesh(shape, names), "cp", plan, _made)


def test_a_context_parallel_rank_drops_what_one_process_drops_at_its_positions():
    """The keyed stream under context (size, rank): each rank's mask over (batch, its
    positions, features) is one process's mask over the whole sequences at those positions."""
    import torch.nn.functional as F

    import fxtrain as fx
    key = fx.random.seed_key(3)
    with fx.random.keyed(key):
        whole = F.dropout(torch.ones(4, 32, 16), 0.1)
    for rank in range(2):
        with fx.random.keyed(key, context=(2, rank)):
            part = F.dropout(torch.ones(4, 16, 16), 0.1)
        assert torch.equal(part, whole[:, slots(32, 2, rank)])
