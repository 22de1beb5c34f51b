"""test_chunked_ce's tests that run processes (the rest: tests/unit/test_chunked_ce.py)."""

import os
import subprocess
import sys
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
import fxtrain as fx
import fxtrain.losses._chunked as cce
from fxtrain.losses._chunked import chunked_causal_lm
from helpers import TRACED, graph_count
from helpers_losses import peak_bytes


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("autodiff,chunk_size,tokens", [
    ("func", 1024, 1024), ("autograd", 256, 1024), ("compiled", 1024, 4096)])
def test_it_takes_at_most_0_6_of_the_plain_losss_memory(autodiff, chunk_size, tokens):
    """GPT-2's head (vocab 50257, width 768) on 1024 tokens, float32. The plain loss holds
    three or four (tokens, vocab) blocks of 206 MB at its peak (627 MB by autograd, 833 MB by
    torch.func, measured on torch 2.13); the chunked one holds a chunk's block and the
    weight's gradient (154 MB) in the forward, that gradient and its scaled copy in the
    backward (373 MB with one chunk of 1024 tokens, 326 MB with chunks of 256). Compiled by
    Inductor, on 4096 tokens: the chunks run inside one operator, one block at a time (traced
    into the graph, Inductor held several chunks' blocks at once: 993 MB against the plain
    loss's 1571; as one operator, 367)."""
    chunked = peak_bytes(str(chunk_size), autodiff, tokens=tokens)
    whole = peak_bytes("plain", autodiff, tokens=tokens)
    assert chunked <= 0.6 * whole, f"{chunked / 1e6:.0f} MB against {whole / 1e6:.0f} MB"
