"""The callback protocol, where the catalogue reads it (it lives in ``fxtrain.protocol``, below
the state, so the state and the step can use it without importing the catalogue)."""

from ..protocol import (DEFAULT_KINDS, EVENT_KINDS, FLAGS, NOTHING, Callback, Control, Event,
                        asks_to_log, callback_state, flags, fold, fold_reporting, init,
                        init_states, name_of, save_veto, set_callback_state, stop_reasons,
                        StepState)

