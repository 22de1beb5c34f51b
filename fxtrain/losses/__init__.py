"""``fx.losses``: losses that say what they average over (``Mean``), so an update weighs every
token (or item) alike: ``causal_lm`` (``_causal.py``), ``chunked_causal_lm`` (the LM head and
cross-entropy a chunk of tokens at a time: ``_chunked.py``, with Liger's kernel as an option:
``_fused.py``), ``Mean`` and ``IGNORE_INDEX`` (``_mean.py``). How a ``Mean`` weighs an update is
told in ``_causal.py``. ``causal_lm`` of logits split along the vocabulary over a
tensor-parallel group (a DTensor ``Shard(-1)``) is loss parallel: ``_vocab_parallel.py``. Both
that and the chunked loss refuse a label outside the vocabulary (``_labels.py``).
"""

from ._causal import causal_lm
from ._fused import chunked_causal_lm
from ._mean import IGNORE_INDEX, Mean

__all__ = ["Mean", "causal_lm", "chunked_causal_lm", "IGNORE_INDEX"]
