"""Functional optimizers in the optax style: ``GradientTransformation(init, update)`` pairs."""

import warnings as _warnings

from ..tree import global_norm
from .aliases import (adagrad, adam, adamax, adamw, amsgrad, lamb, lars, lion, nadamw, radam,
                      rmsprop, sgd)
from .base import (ElementwiseTransformation, GradientTransformation, Schedule,
                   WeightedTransformation, apply_updates, chain, identity, update_weighted)
from .blocks import clip_by_block_rms, scale_by_param_block_rms
from .factored import FactoredState, adafactor, scale_by_factored_rms
from .adaptive import (ScaleByAdaDeltaState, ScaleByAdanState, ScaleByBeliefState,
                       ScaleByNovogradState, ScaleByOptimisticGradientState, ScaleByRpropState,
                       adabelief, adadelta, adamaxw, adan, fromage, nadam, novograd,
                       optimistic_gradient_descent, rprop, scale_by_adadelta, scale_by_adan,
                       scale_by_belief, scale_by_novograd, scale_by_optimistic_gradient,
                       scale_by_rprop, scale_by_sign, scale_by_yogi, sign_sgd, yogi)
from .groups import (MaskedState, MultiTransformState, PartitionState, masked,
                     multi_transform, partition, set_to_zero)
from .lookahead import LookaheadParams, LookaheadState, lookahead, lookahead_params
from .muon import (MuonDimensionNumbers, MuonState, muon, orthogonalize_via_newton_schulz,
                   scale_by_muon)
from .schedule_free import (ScheduleFreeState, schedule_free, schedule_free_adamw,
                            schedule_free_eval_params, schedule_free_sgd)
from .schedules import (constant_schedule, cosine_decay_schedule, cosine_onecycle_schedule,
                        exponential_decay, join_schedules, linear_onecycle_schedule,
                        linear_schedule, piecewise_constant_schedule,
                        piecewise_interpolate_schedule, polynomial_schedule, sgdr_schedule,
                        warmup_constant_schedule, warmup_cosine_decay_schedule,
                        warmup_exponential_decay_schedule)
from .transforms import (EmaState, ScaleByAdamaxState, ScaleByAdamState, ScaleByAmsgradState,
                         ScaleByLearningRateState, ScaleByLionState, ScaleByRadamState,
                         ScaleByRmsState, ScaleByRssState, TraceState, ZeroNansState,
                         add_decayed_weights, clip, clip_by_global_norm, ema, scale, scale_by_adam,
                         scale_by_adamax, scale_by_amsgrad, scale_by_learning_rate, scale_by_lion,
                         scale_by_radam, scale_by_rms, scale_by_rss, scale_by_schedule,
                         scale_by_trust_ratio, trace, zero_nans)
from .wrappers import (ApplyIfFiniteState, InjectHyperparamsState, MultiStepsState, all_finite,
                       apply_if_finite, inject_hyperparams, injected_hyperparams, learning_rate,
                       map_hyperparams, multi_steps, skip_large_updates, skip_not_finite)

__all__ = [
    "GradientTransformation", "Schedule", "apply_updates", "chain", "global_norm", "identity",
    "WeightedTransformation", "ElementwiseTransformation", "update_weighted",
    "sgd", "adam", "adamw", "lion", "rmsprop", "constant_schedule",
    "cosine_decay_schedule", "exponential_decay", "join_schedules", "linear_schedule",
    "warmup_cosine_decay_schedule", "cosine_onecycle_schedule", "linear_onecycle_schedule",
    "piecewise_constant_schedule", "piecewise_interpolate_schedule", "polynomial_schedule",
    "sgdr_schedule", "warmup_constant_schedule", "warmup_exponential_decay_schedule",
    "ScaleByAdamState", "ScaleByLearningRateState",
    "ScaleByLionState", "ScaleByRmsState", "TraceState", "add_decayed_weights",
    "clip_by_global_norm", "scale", "scale_by_adam", "scale_by_learning_rate", "scale_by_lion",
    "scale_by_rms", "scale_by_schedule", "trace", "ApplyIfFiniteState", "InjectHyperparamsState",
    "MultiStepsState", "all_finite", "apply_if_finite", "inject_hyperparams", "learning_rate",
    "multi_steps", "injected_hyperparams", "map_hyperparams",
    "adagrad", "adamax", "amsgrad", "nadamw", "radam", "ScaleByRssState", "ScaleByAdamaxState",
    "ScaleByAmsgradState", "ScaleByRadamState", "scale_by_rss", "scale_by_adamax",
    "scale_by_amsgrad", "scale_by_radam", "lamb", "lars", "ZeroNansState", "clip", "zero_nans",
    "scale_by_trust_ratio", "MultiTransformState", "PartitionState", "MaskedState",
    "multi_transform", "partition", "masked", "set_to_zero",
    "adafactor", "scale_by_factored_rms", "FactoredState", "clip_by_block_rms",
    "scale_by_param_block_rms", "ema", "EmaState",
    "schedule_free", "schedule_free_adamw", "schedule_free_sgd", "schedule_free_eval_params",
    "ScheduleFreeState", "muon", "scale_by_muon", "orthogonalize_via_newton_schulz", "MuonState",
    "MuonDimensionNumbers", "lookahead", "lookahead_params", "LookaheadParams", "LookaheadState",
    "skip_large_updates", "skip_not_finite",
    "adabelief", "adadelta", "adamaxw", "fromage", "nadam", "optimistic_gradient_descent",
    "sign_sgd", "yogi", "scale_by_belief", "scale_by_yogi", "scale_by_adadelta", "scale_by_sign",
    "scale_by_optimistic_gradient", "ScaleByBeliefState",
    "ScaleByAdaDeltaState", "ScaleByOptimisticGradientState", "rprop", "novograd", "adan",
    "scale_by_rprop", "scale_by_novograd", "scale_by_adan", "ScaleByRpropState",
    "ScaleByNovogradState", "ScaleByAdanState",
]


def __getattr__(name: str):
    if name == "tree_map":  # tree maths moved to fx.tree; kept for one release
        _warnings.warn("fx.optim.tree_map moved to fx.tree.tree_map", DeprecationWarning,
                       stacklevel=2)
        from ..tree import tree_map
        return tree_map
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
