"""A model built with its parameters on the meta device and its buffers real: the skeleton
``fx.from_pretrained`` fills from a folder's files, so no process ever holds the model whole.

Checked on torch 2.11.0, 2.13.0 and 2.15.0.

- ``parameters_on_meta()`` rebinds ``nn.Module.register_parameter`` for the duration of the
  block (the public method every ``nn.Module`` registers its parameters through, as
  accelerate's ``init_empty_weights(include_buffers=False)`` does): each parameter registered
  moves to the meta device as it is registered, so the initialisers that follow run on meta
  and cost nothing, while buffers (rotary ``inv_freq``, masks) get the values ``__init__``
  computes. ``torch.device("meta")`` alone would make the buffers meta too, and a
  non-persistent buffer is in no file to read it back from.

  The rebinding (and the default dtype, given one) is process-wide while the block runs: a
  model built on another thread at the same time would get meta parameters too. fxtrain builds only skeletons inside it, on the
  calling thread, and restores the method on the way out, whatever happens.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

_lock = threading.Lock()


@contextlib.contextmanager
def parameters_on_meta(dtype: torch.dtype | None = None) -> Iterator[None]:
    """Inside the block, every parameter a module registers is moved to the meta device (its
    class and ``requires_grad`` kept); buffers are made as usual. ``dtype``: torch's default
    dtype inside the block (what transformers' ``from_pretrained`` sets while it builds a model
    in a dtype, so a buffer made in the default dtype is made in that one), restored after."""
    original, default = nn.Module.register_parameter, torch.get_default_dtype()

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(param)
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    with _lock:
        nn.Module.register_parameter = register
        try:
            if dtype is not None:
                torch.set_default_dtype(dtype)
            yield
        finally:
            nn.Module.register_parameter = original
            torch.set_default_dtype(default)
