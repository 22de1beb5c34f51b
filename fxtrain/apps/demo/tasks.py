"""The demo's three tasks: a model, its data, its loss and metrics, and what it shows.

``--model mlp`` and ``--model cnn`` classify scikit-learn's 8x8 digits; ``--model charlm`` is a
character-level language model of text from Python's standard library, and ``--model
transformer`` a small GPT of the same text (SDPA attention with dropout, bf16-mixed where the
machine computes bfloat16 natively), whose trained module comes back out to generate.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ... import metrics
from ... import random
from ...protocol import Callback
from ...callbacks.media import inference, log_media, text_samples
from ...export import save_safetensors, trained_module
from . import data, figures
from .gpt import GPT

__all__ = ["Task", "make_task", "MODELS", "DEFAULTS"]

# each model's run flags when not given: a default run of each finishes in under a minute
DEFAULTS = {"mlp": {"steps": 1500, "batch_size": 64, "lr": 3e-3},
            "cnn": {"steps": 1000, "batch_size": 64, "lr": 3e-3},
            "charlm": {"steps": 2000, "batch_size": 128, "lr": 2e-3},
            "transformer": {"steps": 1000, "batch_size": 32, "lr": 3e-3}}
MODELS = tuple(DEFAULTS)


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything the demo needs to know about one model and its data."""

    description: str
    model: nn.Module
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Callable  # (state, params, batch) -> (loss, aux)
    eval_fn: Callable  # (state, batch) -> metrics
    media: Callable[[Any, int], Callback]  # (writer, every) -> a logging callback
    final: Callable[[Any, dict, Path], list[str]]  # (state, metrics, workdir) -> lines
    steps: int
    batch_size: int
    lr: float
    best_metric: str  # ranks checkpoints for keep_best
    best_mode: str
    headline: str  # the metric the demo ends with
    target: float | None = None  # the headline value a default run reaches
    precision: str = "32"  # the step's precision policy unless --precision says otherwise


# -- digits ----------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.2),
                         nn.Linear(256, 256), nn.GELU(), nn.Dropout(0.2), nn.Linear(256, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.GELU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.GELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 2 * 2, 10))


Confusion = metrics.ConfusionMatrix.for_classes(10)


def _classify(state, params, batch):
    x, y = batch
    logits = state.apply(params, x)
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean()}


def _classify_eval(state, batch):
    x, y = batch
    logits = state.apply(state.params, x)
    return {"loss": F.cross_entropy(logits, y),
            "accuracy": (logits.argmax(-1) == y).float().mean(),
            "confusion": Confusion.from_model_output(logits, y)}


def _digit_figures(state, test, counts: torch.Tensor | None = None,
                   shown: int = 32) -> dict[str, Any]:
    """A grid of the first ``shown`` held-out predictions, and the confusion matrix figure
    (from ``counts`` when the evaluation already made them, else from one pass here)."""
    x, y = test
    with inference(state):
        logits = state.apply(state.params, x if counts is None else x[:shown])
    if counts is None:
        counts = Confusion.from_model_output(logits, y).compute()
    predicted = logits[:shown].argmax(-1)
    return {"predictions": figures.prediction_grid(x[:shown, 0].numpy(), predicted.tolist(),
                                                   y[:shown].tolist()),
            "confusion": figures.confusion_figure(counts.numpy(),
                                                  f"held-out digits, step {int(state.step)}")}


def _digits_task(name: str, seed: int) -> Task:
    train, test = data.digits(seed)

    def final(state, metrics: dict, workdir: Path) -> list[str]:
        lines = []
        for key, fig in _digit_figures(state, test, metrics["confusion"]).items():
            path = workdir / f"{key}.png"
            fig.savefig(path)
            lines.append(f"{key:<13} {path}")
        return lines

    model = _mlp() if name == "mlp" else _cnn()
    return Task(
        model=model, train=train, test=test,
        description=(f"{'an MLP' if name == 'mlp' else 'a CNN'} on scikit-learn's 8x8 handwritten "
                     f"digits ({len(train[1])} train, {len(test[1])} held out)"),
        loss_fn=_classify, eval_fn=_classify_eval,
        media=lambda writer, every: log_media(writer, lambda s: _digit_figures(s, test), every),
        final=final, **DEFAULTS[name], best_metric="accuracy", best_mode="max",
        headline="accuracy", target=0.95)


def _text_eval(loss_fn: Callable) -> Callable:
    """A language model's eval step function: ``loss_fn``'s loss and metrics, and bits per
    character."""

    def eval_fn(state, batch):
        loss, aux = loss_fn(state, state.params, batch)
        return {"loss": loss, "bits_per_char": loss / math.log(2), **aux}

    return eval_fn


# -- character-level language model ----------------------------------------------------------


class CharLM(nn.Module):
    """The next character from the previous ``context``: embeddings, then an MLP."""

    def __init__(self, vocab: int, context: int = 32, embed: int = 24, width: int = 512):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, embed)
        self.mlp = nn.Sequential(nn.Linear(context * embed, width), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(width, width), nn.GELU(), nn.Linear(width, vocab))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, context] -> [B, vocab]
        return self.mlp(self.embed(tokens).flatten(1))


PROMPTS = ("Return the ", "The ", "If the ")


def _charlm_task() -> Task:
    text = data.stdlib_text()
    codec = data.CharCodec(text)
    ids = codec.encode(text)
    cut = int(len(ids) * 0.9)
    model = CharLM(len(codec))
    train = data.char_windows(ids[:cut], model.context)
    test = data.char_windows(ids[cut:], model.context)
    pad = codec.index[" "]

    def generate(state, prompt: str, length: int = 160, temperature: float = 0.7) -> str:
        """Samples ``length`` characters; the keys come from the state, so a resumed run
        writes the same samples."""
        tokens = codec.encode(prompt).tolist()
        key = random.fold_in(random.step_key(state.rng, state.step), len(prompt))
        for i in range(length):
            context = torch.tensor([([pad] * model.context + tokens)[-model.context:]])
            logits = state.apply(state.params, context)[0] / temperature
            tokens.append(int(random.categorical(random.fold_in(key, i), logits)))
        return codec.decode(tokens[len(prompt):])

    def final(state, metrics: dict, workdir: Path) -> list[str]:
        del metrics  # printed by the job
        with inference(state):
            samples = [p + generate(state, p) for p in PROMPTS]
        path = workdir / "samples.txt"
        path.write_text("\n\n---\n\n".join(samples) + "\n", encoding="utf-8")
        return [f"{'samples':<13} {path}", f"{'a sample':<13} {' '.join(samples[0].split())}"]

    return Task(
        model=model, train=train, test=test,
        description=(f"a character-level language model of the standard library's docstrings "
                     f"({len(train[1]):,} train, {len(test[1]):,} held-out characters, "
                     f"{len(codec)} symbols)"),
        loss_fn=_classify, eval_fn=_text_eval(_classify),  # the next character is a class
        media=lambda writer, every: text_samples(writer, generate, PROMPTS, every),
        final=final, **DEFAULTS["charlm"], best_metric="loss", best_mode="min",
        headline="bits_per_char")


# -- a small GPT -----------------------------------------------------------------------------


NATIVE_BF16 = "FXTRAIN_NATIVE_BF16"
"""The environment variable that forces ``native_bf16()``'s answer (``1`` or ``0``), so that
either branch of the demo's choice runs on any machine (the tests force the bfloat16 one)."""


def native_bf16() -> bool:
    """Whether this machine computes bfloat16 natively (a CUDA GPU that supports it, or a CPU
    with AVX512-BF16 or AMX); elsewhere bf16-mixed is emulated, and slower than float32.
    ``FXTRAIN_NATIVE_BF16=1`` (or ``0``) forces the answer."""
    forced = os.environ.get(NATIVE_BF16)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"{NATIVE_BF16} must be 1 or 0 (force the demo's bfloat16 choice "
                             f"on or off), got {forced!r}")
        return forced == "1"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return True
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def _sequence_loss(state, params, batch):
    x, y = batch
    logits = state.apply(params, x).float()
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return loss, {"accuracy": (logits.argmax(-1) == y).float().mean()}


def _transformer_task(seed: int) -> Task:
    text = data.stdlib_text()
    codec = data.CharCodec(text)
    ids = codec.encode(text)
    cut = int(len(ids) * 0.9)
    model = GPT(len(codec), context=64, width=128, layers=2, heads=4, dropout=0.1)
    train = data.char_sequences(ids[:cut], model.context, stride=model.context // 2)
    test = data.char_sequences(ids[cut:], model.context)

    def sample(state, prompt: str, length: int = 160, temperature: float = 0.7) -> str:
        """During training: keyed samples from the state (a resumed run writes the same)."""
        tokens = codec.encode(prompt).tolist()
        key = random.fold_in(random.step_key(state.rng, state.step), len(prompt))
        for i in range(length):
            logits = state.apply(state.params, torch.tensor([tokens[-model.context:]]))
            tokens.append(int(random.categorical(random.fold_in(key, i),
                                                 logits[0, -1].float() / temperature)))
        return codec.decode(tokens[len(prompt):])

    def final(state, metrics: dict, workdir: Path) -> list[str]:
        """The trained module out of the state: it generates, and its weights go to
        safetensors."""
        del metrics  # printed by the job
        trained = trained_module(state).eval()
        generator = torch.Generator().manual_seed(seed)
        samples = [codec.decode(trained.generate(codec.encode(p)[None], 160, 0.7,
                                                 generator=generator)[0]) for p in PROMPTS]
        path = workdir / "samples.txt"
        path.write_text("\n\n---\n\n".join(samples) + "\n", encoding="utf-8")
        weights = save_safetensors(state, workdir / "model.safetensors",
                                   metadata={"vocabulary": "".join(codec.chars)})
        return [f"{'samples':<13} {path} (fx.trained_module(state).generate)",
                f"{'weights':<13} {weights} (fx.save_safetensors)",
                f"{'a sample':<13} {' '.join(samples[0].split())}"]

    return Task(
        model=model, train=train, test=test,
        description=(f"a GPT ({sum(p.numel() for p in model.parameters()):,} parameters: 2 "
                     f"layers, width 128, SDPA attention with dropout, context 64) of the "
                     f"standard library's docstrings ({cut:,} train, {len(ids) - cut:,} "
                     f"held-out characters, {len(codec)} symbols)"),
        loss_fn=_sequence_loss, eval_fn=_text_eval(_sequence_loss),
        media=lambda writer, every: text_samples(writer, sample, PROMPTS, every),
        final=final, **DEFAULTS["transformer"], best_metric="loss", best_mode="min",
        headline="bits_per_char", precision="bf16-mixed" if native_bf16() else "32")


def make_task(name: str, seed: int) -> Task:
    """The task of ``--model name``; its model is initialised from ``seed``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):  # the model's initialisation, without side effects
        torch.manual_seed(seed)
        if name == "transformer":
            return _transformer_task(seed)
        return _charlm_task() if name == "charlm" else _digits_task(name, seed)
