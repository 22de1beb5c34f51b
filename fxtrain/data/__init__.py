"""``fx.data``: the streams of batches a run trains on, their positions in the state, packed
sequences, and batches moved to the device.

``Batches`` (``_batches.py``: a seedable, checkpointable stream of a tensor or a map-style
dataset), ``Stream`` (``_streaming.py``: a stream of examples in one order on any number of
ranks), ``Shared`` (``_shared.py``: either read as one data replica's share, the share passed
to every call: the streams hold no rank), ``DataPosition`` (``_position.py``: where a stream stands, a value in ``state.data``),
``pack_documents`` / ``packed_rows`` / ``document_mask`` (``_packing.py``) and ``to_device``
(``_feed.py``: batches to the state's device, prefetched).
"""

from ._batches import (Batches, IterableStream, LoaderPosition, LoaderStream, as_stream,
                       length_of)
from ._feed import to_device
from ._packing import document_mask, pack_documents, packed_rows
from ._position import DataPosition
from ._shared import Shared
from ._streaming import Stream

__all__ = ["DataPosition", "LoaderPosition", "Batches", "Stream", "Shared", "IterableStream",
           "LoaderStream", "as_stream", "pack_documents", "packed_rows", "document_mask"]
