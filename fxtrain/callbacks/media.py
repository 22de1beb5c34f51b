"""``log_media`` and ``text_samples``: what the model makes, written every N steps.

Both call user code with the current state in inference mode (``torch.no_grad`` and the module
in eval mode, restored afterwards) on the host, at due steps only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..logging.media import (Audio, Captioned, caption_list, caption_markdown, figure_pixels,
                             is_figure)
from ..logging.values import Histogram, image_batch, video_batch
from ..state import set_training
from .combinators import every as every_n
from .combinators import rank_zero
from .core import NOTHING, Callback
from ..logging.writer import check_writer, takes_captions


@contextlib.contextmanager
def inference(state: Any):
    """``torch.no_grad`` with ``state.module`` in eval mode (its mode is restored after)."""
    was = set_training(state.module, False)
    try:
        with torch.no_grad():
            yield
    finally:
        set_training(state.module, was)


def _groups() -> dict:
    return {"scalars": {}, "images": {}, "videos": {}, "texts": {}, "histograms": {}}


def _is_caption(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, list | tuple) and bool(x) and
                                  all(isinstance(c, str) for c in x))


def _sort_captioned(name: str, value: Captioned, groups: dict) -> None:
    """Puts a captioned image or video in its group, still captioned."""
    inner = _groups()
    _sort(name, value.value, inner)
    kind = next(k for k, v in inner.items() if v)
    if kind not in ("images", "videos"):
        what = kind if isinstance(kind, str) else "audios"
        raise TypeError(f"log_media: {name!r} has a caption, but only images and videos take "
                        f"one; its value is one of the {what}")
    groups[kind][name] = Captioned(inner[kind][name], value.caption)


def _sort(name: str, value: Any, groups: dict) -> None:
    """Puts ``value`` in the writer call that takes its kind."""
    if isinstance(value, tuple) and len(value) == 2 and _is_caption(value[1]):
        value = Captioned(*value)  # (image, caption)
    if isinstance(value, Captioned):
        _sort_captioned(name, value, groups)
    elif isinstance(value, str):
        groups["texts"][name] = value
    elif is_figure(value):
        groups["images"][name] = figure_pixels(value)
    elif isinstance(value, Audio):
        groups.setdefault(("audios", value.sample_rate), {})[name] = value.data
    elif isinstance(value, Histogram):
        groups["histograms"][name] = value
    elif isinstance(value, int | float | torch.Tensor | np.ndarray | np.number):
        ndim = np.ndim(value) if not isinstance(value, torch.Tensor) else value.ndim
        if ndim == 0:
            groups["scalars"][name] = value
        elif ndim == 2:  # one grey-scale image
            groups["images"][name] = value[..., None]
        elif ndim in (3, 4):
            groups["images"][name] = value
        elif ndim == 5:
            groups["videos"][name] = value
        else:
            raise ValueError(
                f"log_media: {name!r} has shape {tuple(np.shape(value))}, which is ambiguous; "
                "images are [H, W], [H, W, C] or [N, H, W, C], videos [N, T, H, W, C]; wrap "
                "audio in fx.logging.Audio(x, sample_rate) and raw values in "
                "fx.logging.Histogram")
    else:
        raise TypeError(f"log_media: {name!r} is a {type(value).__name__}; expected an image or "
                        "video array, a matplotlib figure, a str, a number, fx.logging.Audio "
                        "or fx.logging.Histogram (images and videos with a caption as "
                        "(value, caption) or fx.logging.Captioned)")


def _captions_as_texts(groups: dict) -> None:
    """For a writer without the ``captions`` capability: each caption becomes a text
    ``<name>/caption`` beside its bare image or video."""
    for kind, batch in (("images", image_batch), ("videos", video_batch)):
        for name, value in groups[kind].items():
            if isinstance(value, Captioned):
                caption = value.caption if isinstance(value.caption, str) else caption_list(
                    name, value.caption, len(batch(name, value.value)))
                groups[kind][name] = value.value
                groups["texts"][f"{name}/caption"] = caption_markdown(caption)


def log_media(writer: Any, fn: Callable[[Any], Mapping[str, Any]], every: int = 500, *,
              name: str = "log_media") -> Callback:
    """Every ``every`` steps calls ``fn(state) -> {name: value}`` and writes each value with
    the writer method for its kind.

    Values: ``[H, W]``, ``[H, W, C]`` or ``[N, H, W, C]`` arrays or tensors are images (floats
    in [0, 1] or uint8), ``[N, T, H, W, C]`` videos, matplotlib figures images (drawn, then
    closed), ``str`` texts, numbers scalars, ``fx.logging.Audio`` audio and
    ``fx.logging.Histogram`` histograms. ``fn`` runs under ``torch.no_grad`` with the module in
    eval mode. Runs on rank 0 only.

    An image or video (or figure) may come with a caption, as a pair ``(value, caption)`` or
    ``fx.logging.Captioned(value, caption)``: one ``str``, or a list of one per image of a
    batch. Writers with the ``captions`` capability (fxtrain's) get it with the image; for
    others (clu's) it is written as a text ``<name>/caption`` at the same step.

    Examples:
        The model's output over a grid of inputs, as a grey-scale image, with a number and a
        text:

        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> class Show:
        ...     def write_scalars(self, step, scalars):
        ...         print(step, "scalars", sorted(scalars))
        ...     def write_images(self, step, images):
        ...         print(step, "images", {k: tuple(v.shape) for k, v in images.items()})
        ...     def write_texts(self, step, texts):
        ...         print(step, "texts", texts)
        >>> axis = torch.linspace(-1, 1, 8)
        >>> grid = torch.cartesian_prod(axis, axis)  # [64, 2]
        >>> def media(state):  # no_grad, module in eval mode
        ...     surface = torch.sigmoid(state.apply(state.params, grid)).reshape(8, 8)  # [H, W]
        ...     return {"surface": surface, "surface_mean": surface.mean(),
        ...             "note": f"step {int(state.step)}"}
        >>> x = torch.randn(32, 2)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> state = fx.fit(state, fx.make_train_step(loss_fn),
        ...                fx.data.Batches((x, x.sum(1, keepdim=True)), 4), max_steps=4,
        ...                callbacks=[fx.callbacks.log_media(Show(), media, every=2)])
        2 scalars ['surface_mean']
        2 images {'surface': (8, 8, 1)}
        2 texts {'note': 'step 2'}
        4 scalars ['surface_mean']
        4 images {'surface': (8, 8, 1)}
        4 texts {'note': 'step 4'}
    """
    if not callable(fn):
        raise TypeError(f"log_media: fn must be callable fn(state) -> dict, got {fn!r}")

    def call(state, event):
        with inference(state):
            out = fn(state)
        if not isinstance(out, Mapping):
            raise TypeError(f"log_media: fn returned {type(out).__name__}; it must return a "
                            "dict of {name: image | video | figure | text | audio | number}")
        groups = _groups()
        for key, value in out.items():
            _sort(str(key), value, groups)
        if not takes_captions(writer):
            _captions_as_texts(groups)
        for kind, values in groups.items():
            if not values:
                continue
            if isinstance(kind, tuple):
                writer.write_audios(event.step, values, sample_rate=kind[1])
            else:
                getattr(writer, f"write_{kind}")(event.step, values)
        return state, NOTHING

    check_writer(writer, "log_media", "write_images", "write_texts", "write_scalars")
    return rank_zero(every_n(every, Callback(name, None, call, kinds=("step_end",), host=True)))


def prompt_list(prompts: Any, who: str) -> list[str]:
    """``prompts`` (one str, or several) as a list, or a ValueError naming ``who``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{who}: prompts must be a non-empty list of str, got {prompts!r}")
    return prompts


def text_samples(writer: Any, generate_fn: Callable[[Any, str], str], prompts: Sequence[str],
                 every: int = 500, *, prefix: str = "samples/",
                 name: str = "text_samples") -> Callback:
    """Every ``every`` steps writes ``prompt + generate_fn(state, prompt)`` for each prompt, as
    texts ``<prefix><i>``.

    ``generate_fn`` runs under ``torch.no_grad`` with the module in eval mode. For samples that
    are the same in a resumed run, draw them from the state's key, e.g.
    ``fx.random.categorical(fx.random.fold_in(fx.random.step_key(state.rng, state.step), i),
    logits)``. Runs on rank 0 only.

    Examples:
        A "calculator" model that adds two numbers, completing prompts (a language model
        would encode the prompt, run ``state.apply``, sample and decode):

        >>> class Show:
        ...     def write_texts(self, step, texts):
        ...         print(step, texts)
        >>> def generate(state, prompt):  # no_grad, module in eval mode
        ...     a, b = (float(n) for n in prompt.rstrip(" =").split(" + "))
        ...     total = state.apply(state.params, torch.tensor([[a, b]]))
        ...     return f" {total.item():.1f}"
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> state = state.replace(params={"weight": torch.tensor([[1.0, 1.0]]),
        ...                               "bias": torch.tensor([0.0])})  # trained, say
        >>> cb = fx.callbacks.text_samples(Show(), generate, ["1 + 2 =", "0.5 + 4 ="], every=100)
        >>> _ = fx.callbacks.fold([cb], state, fx.Event("step_end", 100))  # fx.fit sends these
        100 {'samples/0': '1 + 2 = 3.0', 'samples/1': '0.5 + 4 = 4.5'}
    """
    prompts = prompt_list(prompts, "text_samples")
    if not callable(generate_fn):
        raise TypeError("text_samples: generate_fn must be callable generate_fn(state, prompt)")
    check_writer(writer, "text_samples", "write_texts")

    def call(state, event):
        texts = {}
        with inference(state):
            for i, prompt in enumerate(prompts):
                completion = generate_fn(state, prompt)
                if not isinstance(completion, str):
                    raise TypeError(f"text_samples: generate_fn returned "
                                    f"{type(completion).__name__} for prompt {prompt!r}; it "
                                    "must return the generated text (str)")
                texts[f"{prefix}{i}"] = prompt + completion
        writer.write_texts(event.step, texts)
        return state, NOTHING

    return rank_zero(every_n(every, Callback(name, None, call, kinds=("step_end",), host=True)))
