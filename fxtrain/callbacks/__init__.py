"""Callbacks: pure functions ``(state, event) -> (state, control)``."""

from .core import Callback as Callback
from .core import Control as Control
from .core import Event as Event
from .core import callback_state as callback_state
from .core import fold as fold
from .core import init_states as init_states
