"""``generation_eval``: sample text from a language model for fixed prompts, score it, report it.

The samples are a pure function of the state (its parameters, ``rng`` and ``step``) and the
prompts: the keys come from ``fx.random.step_key(state.rng, state.step)``, folded with the
callback's name, the prompt's text and its repeat count, so a resumed run draws what an
uninterrupted one draws, and a prompt samples the same text in whatever list or batch it comes.
Generation runs without gradients, the module in eval mode (its mode restored after); the state
is not changed.

Two ways to report the scores, from one sampler (``sample_tokens``):

- ``generation_eval(writer, ...)``: a host callback that writes ``eval/<name>/<metric>`` and the
  samples to a writer after each evaluation (or every N steps);
- ``generation_eval_step(...)``: an eval step over batches of prompts (``eval_data=[prompts]``)
  whose metrics ``<name>/<metric>`` are evaluation metrics like any other, so ``log_metrics``
  writes them as ``eval/<name>/<metric>``, ``early_stopping`` can monitor them and the
  checkpoint manager's ``best_metric`` can rank by them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .. import random
from ..logging.writer import check_writer
from .combinators import every as every_n
from .combinators import rank_zero
from .core import NOTHING, Callback
from .media import inference, prompt_list

Encode = Callable[[str], Any]  # a prompt -> its token ids (a list of ints or a 1-D tensor)
Decode = Callable[[list[int]], str]
Score = Callable[[list[str], list[str]], Mapping[str, Any]]


def _logits(out: Any, who: str) -> torch.Tensor:
    """The ``[1, T, V]`` logits of a module's output: a tensor, a transformers ``ModelOutput``
    (a mapping with ``logits``) or a tuple whose first item they are."""
    if isinstance(out, Mapping) and "logits" in out:
        out = out["logits"]
    elif isinstance(out, tuple) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != 1:
        what = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"{who}: the model returned {what}; it must return logits [batch, "
                        "tokens, vocabulary] (a tensor, or an output with .logits)")
    return out


def _next_token(logits: torch.Tensor, key: torch.Tensor | None, temperature: float,
                top_k: int | None) -> torch.Tensor:
    """The argmax at temperature 0; else a keyed draw from ``softmax(logits / temperature)``
    over the ``top_k`` largest logits."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return random.categorical(key, logits)


def sample_tokens(state: Any, ids: torch.Tensor, key: torch.Tensor | None = None, *,
                  max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                  eos_id: int | None = None, context: int | None = None,
                  model_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """The tokens ``state``'s model continues ``ids`` (1-D, one prompt) with, one at a time.

    At ``temperature`` 0 each token is the argmax (greedy); above, it is drawn from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits, with the key
    ``fx.random.fold_in(key, i)`` for the i-th new token: a pure function of ``key``. Stops
    after ``max_new_tokens`` or at ``eos_id`` (not returned). Each call sees the last
    ``context`` tokens (all when None); ``model_kwargs`` go to every call (``use_cache=False``
    for a transformers model). Runs without gradients, the module in eval mode.

    Examples:
        A bigram "language model" (an embedding of next-token logits), greedy and sampled:

        >>> model = nn.Embedding(5, 5)
        >>> state = fx.TrainState.create(model, fx.optim.sgd(0.1), seed=0)
        >>> state = state.replace(params={"weight": 10 * torch.eye(5).roll(1, 1)})  # i -> i+1
        >>> fx.callbacks.sample_tokens(state, torch.tensor([0]), max_new_tokens=4)
        [1, 2, 3, 4]
        >>> key = fx.random.seed_key(0)
        >>> a = fx.callbacks.sample_tokens(state, torch.tensor([0]), key, max_new_tokens=4,
        ...                                temperature=100.0)
        >>> a == fx.callbacks.sample_tokens(state, torch.tensor([0]), key, max_new_tokens=4,
        ...                                 temperature=100.0)
        True
    """
    _check_decoding(max_new_tokens, temperature, top_k)
    if temperature > 0 and key is None:
        raise ValueError("sample_tokens: sampling (temperature > 0) needs a key, e.g. "
                         "fx.random.step_key(state.rng, state.step)")
    device = state.step.device
    tokens = torch.as_tensor(ids, dtype=torch.int64, device=device)
    start, kwargs = tokens.numel(), dict(model_kwargs or {})
    with inference(state):
        for i in range(max_new_tokens):
            window = tokens[-context:] if context else tokens
            logits = _logits(state.apply(state.params, window[None], **kwargs), "sample_tokens")
            step_key = None if key is None else random.fold_in(key, i)
            token = _next_token(logits[0, -1].float(), step_key, temperature, top_k)
            tokens = torch.cat([tokens, token.reshape(1)])
            if eos_id is not None and int(token) == eos_id:
                return tokens[start:-1].tolist()
    return tokens[start:].tolist()


def _check_decoding(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got "
                         f"{temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")


def _encoded(encode: Encode, prompt: str, who: str) -> torch.Tensor:
    """``encode(prompt)`` as a non-empty 1-D int64 tensor, or an error naming the prompt."""
    try:
        ids = torch.as_tensor(encode(prompt))
    except Exception as e:
        raise ValueError(f"{who}: prompt {prompt!r} does not tokenize: {e!r}") from e
    if ids.numel() == 0:
        raise ValueError(f"{who}: prompt {prompt!r} encodes to no tokens; a prompt needs at "
                         "least one (a start-of-text token, if the tokenizer has one)")
    if ids.ndim != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{who}: encode({prompt!r}) gave {ids.dtype} of shape "
                         f"{tuple(ids.shape)}; it must give a list of int token ids (or a 1-D "
                         "tensor)")
    return ids.to(torch.int64)


def _checked_scores(out: Any, who: str) -> dict[str, float]:
    """``score``'s answer as ``{metric: float}``; an error for anything else or a non-finite
    value."""
    if not isinstance(out, Mapping) or not out:
        raise TypeError(f"{who}: score returned {out!r}; it must return a non-empty dict "
                        "{metric name: number}")
    scores = {}
    for name, value in out.items():
        number = isinstance(value, int | float | np.number) or (
            isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0)
        if not isinstance(name, str) or not number or isinstance(value, bool | np.bool_) or (
                isinstance(value, torch.Tensor | np.ndarray) and value.dtype in (torch.bool,
                                                                                  np.bool_)):
            raise TypeError(f"{who}: score returned {name!r}: {value!r}; each metric must be "
                            "a str naming a number (int, float or a 0-d tensor)")
        scores[name] = float(value)
        if not math.isfinite(scores[name]):
            raise ValueError(f"{who}: score returned {name!r} = {scores[name]}; metrics must "
                             "be finite (a score that can fail should say so with a number)")
    return scores


def generation_key(state: Any, name: str) -> torch.Tensor:
    """The key ``name``'s samples of ``state`` are drawn from: the state's step key folded with
    the name (so two generation evaluations draw apart, and apart from the step's dropout)."""
    return random.fold_in(random.step_key(state.rng, state.step), zlib.crc32(name.encode()))


def generate_texts(state: Any, prompts: Sequence[str], encode: Encode, decode: Decode, *,
                   name: str = "generation", who: str = "generation_eval",
                   **decoding: Any) -> list[str]:
    """Each prompt's completion, decoded (``sample_tokens`` with ``decoding``'s options). The
    key of a prompt folds its text and its repeat count in ``generation_key(state, name)``."""
    key, seen = generation_key(state, name), {}
    texts = []
    for prompt in prompts:
        ids = _encoded(encode, prompt, who)
        seen[prompt] = seen.get(prompt, -1) + 1
        prompt_key = random.fold_in(random.fold_in(key, zlib.crc32(prompt.encode())),
                                    seen[prompt])
        text = decode(sample_tokens(state, ids, prompt_key, **decoding))
        if not isinstance(text, str):
            raise TypeError(f"{who}: decode returned {type(text).__name__} for prompt "
                            f"{prompt!r}; it must return the text (str)")
        texts.append(text)
    return texts


def _options(encode, decode, score, max_new_tokens, temperature, top_k, who) -> None:
    for fn, what in ((encode, "encode(prompt) -> token ids"), (decode, "decode(ids) -> str"),
                     (score, "score(prompts, texts) -> {metric: number}")):
        if not callable(fn):
            raise TypeError(f"{who}: {what.split('(')[0]} must be callable {what}, got {fn!r}")
    _check_decoding(max_new_tokens, temperature, top_k)


def generation_eval(writer: Any, encode: Encode, decode: Decode, score: Score,
                    prompts: Sequence[str], *, every: int | None = None,
                    max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                    eos_id: int | None = None, context: int | None = None,
                    model_kwargs: Mapping[str, Any] | None = None, write_samples: bool = True,
                    name: str = "generation") -> Callback:
    """After each evaluation (or every ``every`` steps) samples a completion of each prompt,
    scores them with ``score(prompts, completions) -> {metric: number}`` and writes the scores
    as ``eval/<name>/<metric>`` (and each ``prompt + completion`` as a text
    ``<name>/samples/<i>``).

    ``score`` sees the completions without their prompts and returns corpus-level numbers (for a
    per-sample score, return its mean); a non-number or non-finite value is an error. The
    samples are those of ``sample_tokens`` (greedy at ``temperature`` 0; else keyed from the
    state, so a resumed run writes the same). Runs on rank 0 only. For scores that
    ``early_stopping`` or the checkpoint manager's ``best_metric`` can use, evaluate with
    ``generation_eval_step`` instead: its scores are the evaluation's metrics.

    Args:
      writer: any writer with ``write_scalars`` (and ``write_texts`` with ``write_samples``).
      encode: ``encode(prompt) -> token ids`` (a list of ints or a 1-D tensor), e.g. a
        transformers tokenizer's ``encode``.
      decode: ``decode(ids: list[int]) -> str``, e.g. the tokenizer's ``decode``.
      score: ``score(prompts, completions) -> {metric: number}``.
      prompts: the prompts, the same at every evaluation.
      every: steps between generations; None (the default): after each evaluation.
      max_new_tokens: the tokens sampled after each prompt, at most (``sample_tokens``').
      temperature: 0 for greedy decoding, else the logits' divisor (``sample_tokens``').
      top_k: sample among the k likeliest tokens only; None: all (``sample_tokens``').
      eos_id: the token that ends a completion early; None: none (``sample_tokens``').
      context: the most tokens the model is given; None: all (``sample_tokens``').
      model_kwargs: more keyword arguments to the model (``sample_tokens``').
      write_samples: also write each prompt with its completion.
      name: the metrics' group and the callback's name.

    Examples:
        The bigram model of ``sample_tokens``, on letters; the score: how often the completion
        is the alphabet's next letters:

        >>> class Show:
        ...     def write_scalars(self, step, scalars):
        ...         print(step, scalars)
        ...     def write_texts(self, step, texts):
        ...         print(step, texts)
        >>> encode = lambda text: [ord(c) - ord("a") for c in text]
        >>> decode = lambda ids: "".join(chr(i + ord("a")) for i in ids)
        >>> def score(prompts, texts):
        ...     right = [decode([(encode(p)[-1] + 1 + i) % 5 for i in range(2)]) == t
        ...              for p, t in zip(prompts, texts)]
        ...     return {"exact": sum(right) / len(right)}
        >>> state = fx.TrainState.create(nn.Embedding(5, 5), fx.optim.sgd(0.1))
        >>> state = state.replace(params={"weight": 10 * torch.eye(5).roll(1, 1)})  # trained
        >>> cb = fx.callbacks.generation_eval(Show(), encode, decode, score, ["ab", "c"],
        ...                                   max_new_tokens=2)
        >>> _ = fx.callbacks.fold([cb], state, fx.Event("eval_end", 100))  # fx.fit sends these
        100 {'eval/generation/exact': 1.0}
        100 {'generation/samples/0': 'abcd', 'generation/samples/1': 'cde'}
    """
    who = "generation_eval"
    prompts = prompt_list(prompts, who)
    _options(encode, decode, score, max_new_tokens, temperature, top_k, who)
    check_writer(writer, who, "write_scalars", *(("write_texts",) if write_samples else ()))
    decoding = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    eos_id=eos_id, context=context, model_kwargs=model_kwargs)

    def call(state, event):
        if state.layout.sharded:  # rank 0 alone would wait in the model's first collective
            raise ValueError(f"{who}: the state is sharded (fx.shard), so its model runs "
                             "collectives every rank joins, and this callback generates on rank "
                             "0 only; generate on every rank as an evaluation instead: fit(..., "
                             "eval_step=fx.callbacks.generation_eval_step(...), eval_data=...)")
        texts = generate_texts(state, prompts, encode, decode, name=name, who=who, **decoding)
        scores = _checked_scores(score(list(prompts), texts), who)
        writer.write_scalars(event.step, {f"eval/{name}/{k}": v for k, v in scores.items()})
        if write_samples:
            writer.write_texts(event.step, {f"{name}/samples/{i}": p + t
                                            for i, (p, t) in enumerate(zip(prompts, texts))})
        return state, NOTHING

    if every is None:
        return rank_zero(Callback(name, None, call, kinds=("eval_end",), host=True))
    return rank_zero(every_n(every, Callback(name, None, call, kinds=("step_end",), host=True)))


def generation_eval_step(encode: Encode, decode: Decode, score: Score, *,
                         max_new_tokens: int = 32, temperature: float = 0.0,
                         top_k: int | None = None, eos_id: int | None = None,
                         context: int | None = None,
                         model_kwargs: Mapping[str, Any] | None = None,
                         name: str | None = "generation") -> Callable[[Any, Any], dict]:
    """An eval step ``(state, prompts) -> {"<name>/<metric>": 0-d tensor}``: the scores of the
    prompts' completions (``generation_eval``'s, the same samples), as evaluation metrics.

    Evaluate on ``eval_data=[prompts]`` (one batch: a list of str; several batches average
    their scores). ``fit`` then sends them in eval_end: ``log_metrics`` writes
    ``eval/<name>/<metric>``, ``early_stopping("<name>/<metric>", mode=...)`` monitors them,
    and a ``CheckpointManager(best_metric="<name>/<metric>")`` keeps the best checkpoints by
    them. ``name=None`` gives the bare metric names (for an evaluation set already named).

    Examples:
        >>> encode = lambda text: [ord(c) - ord("a") for c in text]
        >>> decode = lambda ids: "".join(chr(i + ord("a")) for i in ids)
        >>> score = lambda prompts, texts: {"length": sum(map(len, texts)) / len(texts)}
        >>> state = fx.TrainState.create(nn.Embedding(5, 5), fx.optim.sgd(0.1))
        >>> step = fx.callbacks.generation_eval_step(encode, decode, score, max_new_tokens=3)
        >>> fx.evaluate(step, state, [["ab", "c"]])
        {'generation/length': tensor(3., dtype=torch.float64)}
    """
    who = "generation_eval_step"
    _options(encode, decode, score, max_new_tokens, temperature, top_k, who)
    decoding = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    eos_id=eos_id, context=context, model_kwargs=model_kwargs)
    group = name or "generation"

    def eval_step(state, prompts):
        prompts = prompt_list(prompts, who)
        texts = generate_texts(state, prompts, encode, decode, name=group, who=who, **decoding)
        scores = _checked_scores(score(prompts, texts), who)
        return {f"{name}/{k}" if name else k: torch.tensor(v, dtype=torch.float64,
                                                           device=state.step.device)
                for k, v in scores.items()}

    return eval_step
