"""``generation_eval`` and ``generation_eval_step``: keyed samples of fixed prompts, scored and
reported as evaluation metrics; ``sample_tokens`` against transformers' and a hand-written greedy
loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import extra
from torch import nn

import fxtrain as fx

TEXT = "abcabdabcabe " * 8
VOCAB = sorted(set(TEXT))


def encode(text):
    return [VOCAB.index(c) for c in text]


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


def starts_right(prompts, texts):
    """The share of completions that continue the text as it goes on after the prompt."""
    right = [(TEXT + TEXT)[TEXT.index(p) + len(p):][:len(t)] == t for p, t in zip(prompts, texts)]
    return {"exact": sum(right) / len(right), "length": sum(map(len, texts)) / len(texts)}


class Bigram(nn.Module):
    """A plain module returning logits [B, T, V]; it records its mode at each call."""

    def __init__(self, vocab=len(VOCAB)):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        self.drop = nn.Dropout(0.5)
        self.modes = []

    def forward(self, ids):
        self.modes.append(self.training)
        return self.drop(self.table(ids))


class LastOnly(Bigram):
    """Logits of the last position only, [B, V]: not what a language model returns."""

    def forward(self, ids):
        return super().forward(ids)[:, -1]


def lm_loss(state, params, batch):
    logits = state.apply(params, batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def lm_run(seed=0):
    torch.manual_seed(seed)
    ids = torch.tensor(encode(TEXT)).unfold(0, 5, 1).contiguous()
    state = fx.TrainState.create(Bigram(), fx.optim.adam(0.1), seed=seed)
    return state, fx.make_train_step(lm_loss), fx.data.Batches(ids, 8, seed=seed)


class Texts:
    """A writer that keeps what it is given."""

    def __init__(self):
        self.scalars, self.texts = {}, {}

    def write_scalars(self, step, scalars):
        self.scalars[step] = dict(scalars)

    def write_texts(self, step, texts):
        self.texts[step] = dict(texts)


PROMPTS = ["ab", "abd", "ca"]


# ---- the sampler -------------------------------------------------------------------------------

def tiny_gpt2():
    transformers = extra("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32,
                                     n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    return model, fx.TrainState.create(model, fx.optim.sgd(0.1), seed=0)


def test_greedy_is_transformers_generate_on_a_tiny_gpt2():
    model, state = tiny_gpt2()
    prompt = torch.tensor([3, 7, 1, 30])
    ours = fx.callbacks.sample_tokens(state, prompt, max_new_tokens=10,
                                      model_kwargs={"use_cache": False})
    theirs = model.generate(prompt[None], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert ours == theirs[0, 4:].tolist()
    # top-1 sampling is greedy whatever the key
    assert fx.callbacks.sample_tokens(state, prompt, fx.random.seed_key(5), max_new_tokens=10,
                                      temperature=1.0, top_k=1) == ours


def test_greedy_is_a_hand_written_loop_and_the_state_is_unchanged():
    state, *_ = lm_run()
    module = state.module
    assert module.training
    digest = fx.tree_digest(state)
    tokens = encode("ab")
    for _ in range(6):  # the greedy loop, by hand, on the parameters as they are
        logits = state.params["table.weight"][torch.tensor(tokens)]
        tokens.append(int(logits[-1].argmax()))
    module.modes.clear()
    assert fx.callbacks.sample_tokens(state, torch.tensor(encode("ab")),
                                      max_new_tokens=6) == tokens[2:]
    assert module.modes == [False] * 6 and module.training  # eval mode, then restored
    assert fx.tree_digest(state) == digest


def test_sampling_is_keyed():
    _, state = tiny_gpt2()
    prompt = torch.tensor([3, 7])

    def draw(seed, **kw):
        return fx.callbacks.sample_tokens(state, prompt, fx.random.seed_key(seed),
                                          max_new_tokens=12, temperature=2.0, **kw)
    assert draw(0) == draw(0) and draw(0) != draw(1)
    assert draw(0, top_k=4) == draw(0, top_k=4) != draw(1, top_k=4)
    # each token among the top 4 of its step's logits
    tokens = prompt.tolist()
    for token in draw(2, top_k=4):
        logits = state.apply(state.params, torch.tensor([tokens]), use_cache=False).logits
        assert token in logits[0, -1].topk(4).indices.tolist()
        tokens.append(token)
    # one prompt's samples: a pure function of the state's key and step and of the prompt
    texts = lambda s, prompts: fx.callbacks.generation.generate_texts(  # noqa: E731
        s, prompts, lambda p: [ord(c) % 32 for c in p], lambda ids: str(ids),
        max_new_tokens=6, temperature=2.0)
    first = texts(state, ["ab", "cd", "ab"])
    assert texts(state, ["cd"]) == [first[1]] and first[0] != first[2]  # a repeat draws anew
    assert texts(state.replace(step=state.step + 1), ["cd"]) != [first[1]]


def test_eos_stops_and_context_crops():
    state, *_ = lm_run()
    state = state.replace(params={"table.weight": 10 * torch.eye(len(VOCAB)).roll(1, 1)})
    assert decode(fx.callbacks.sample_tokens(state, torch.tensor([0]), max_new_tokens=5)) == \
        "abcde"
    assert fx.callbacks.sample_tokens(state, torch.tensor([0]), max_new_tokens=5,
                                      eos_id=3) == [1, 2]
    state.module.modes.clear()
    fx.callbacks.sample_tokens(state, torch.tensor([0, 1, 2]), max_new_tokens=3, context=2)
    assert len(state.module.modes) == 3


# ---- in fit ----------------------------------------------------------------------------------

def test_scores_are_written_after_each_evaluation_and_every_n_steps(tmp_path):
    state, step, data = lm_run()
    writer = fx.logging.JsonlWriter(tmp_path / "m.jsonl")
    fx.fit(state, step, data, max_steps=6, eval_step=fx.make_eval_step(lm_loss),
           eval_data=[torch.tensor(encode(TEXT)).unfold(0, 5, 1)[:8]],
           eval_every=3, callbacks=[
               fx.callbacks.generation_eval(writer, encode, decode, starts_right, PROMPTS,
                                            max_new_tokens=4),
               fx.callbacks.generation_eval(writer, encode, decode, starts_right, PROMPTS[:1],
                                            every=2, temperature=1.0, name="sampled")])
    writer.close()
    lines = list(fx.logging.read_jsonl(tmp_path / "m.jsonl"))
    scalars = [(line["step"], sorted(line["values"])) for line in lines
               if line["kind"] == "scalars"]
    assert scalars == [(2, ["eval/sampled/exact", "eval/sampled/length"]),
                       (3, ["eval/generation/exact", "eval/generation/length"]),
                       (4, ["eval/sampled/exact", "eval/sampled/length"]),
                       (6, ["eval/sampled/exact", "eval/sampled/length"]),
                       (6, ["eval/generation/exact", "eval/generation/length"])]
    samples = {line["step"]: line["values"] for line in lines
               if line["kind"] == "texts" and "generation/samples/0" in line["values"]}
    assert sorted(samples) == [3, 6]
    assert all(len(samples[6][f"generation/samples/{i}"]) == len(p) + 4
               for i, p in enumerate(PROMPTS))
    final = [line["values"] for line in lines if line["kind"] == "scalars"][-1]
    assert final["eval/generation/length"] == 4.0 and 0 <= final["eval/generation/exact"] <= 1


def test_the_same_samples_after_a_resume(tmp_path):
    def run(max_steps, writer, checkpoint=None):
        state, step, data = lm_run(seed=3)
        return fx.fit(state, step, data, max_steps=max_steps, checkpoint=checkpoint,
                      callbacks=[fx.callbacks.generation_eval(
                          writer, encode, decode, starts_right, PROMPTS, every=2,
                          temperature=1.5, top_k=4, max_new_tokens=8)])
    straight = Texts()
    whole = run(6, straight)
    resumed = Texts()
    with fx.checkpoint.CheckpointManager(tmp_path, async_save=False) as manager:
        run(4, resumed, manager)  # saved at step 4, "killed" there
        again = run(6, resumed, manager)  # resumes from step 4
    assert fx.tree_digest(again) == fx.tree_digest(whole)
    assert resumed.texts == straight.texts and sorted(straight.texts) == [2, 4, 6]
    assert resumed.scalars == straight.scalars
    assert straight.texts[2] != straight.texts[4]  # keyed by step: the draws change


def test_generation_scores_are_evaluation_metrics(tmp_path):
    """The eval step's scores go where evaluation metrics go: to log_metrics as
    eval/generation/<metric>, to early_stopping's monitor, to the manager's best checkpoint."""
    state, step, data = lm_run()
    writer = fx.logging.JsonlWriter(tmp_path / "m.jsonl")
    flat = lambda prompts, texts: {"score": 0.5}  # noqa: E731 - never improves
    with fx.checkpoint.CheckpointManager(tmp_path / "ckpt", async_save=False, keep_latest=1,
                                         keep_best=1, best_metric="generation/score",
                                         best_mode="max") as manager:
        final = fx.fit(state, step, data, max_steps=50, checkpoint=manager,
                       eval_step=fx.callbacks.generation_eval_step(encode, decode, flat,
                                                                   max_new_tokens=2),
                       eval_data=[PROMPTS], eval_every=2, callbacks=[
                           fx.callbacks.early_stopping("generation/score", mode="max",
                                                       patience=2),
                           fx.callbacks.checkpoint_policy(monitor="generation/score",
                                                          mode="max"),
                           fx.callbacks.log_metrics(writer, every=2)])
        assert int(final.step) == 6
        assert sorted(manager.all_steps()) == [2, 6]  # the best (the first) and the latest
    writer.close()
    evals = [(line["step"], line["values"]) for line in fx.logging.read_jsonl(tmp_path / "m.jsonl")
             if "eval/generation/score" in line["values"]]
    assert evals == [(2, {"eval/generation/score": 0.5}), (4, {"eval/generation/score": 0.5}),
                     (6, {"eval/generation/score": 0.5})]


def test_generations_are_one_set_of_several(tmp_path):
    """Beside a held-out set, as docs/training-loop.md shows it: an eval_step dict gives the
    generations their own step (name=None: the set names them), the writers show
    eval/val/loss and eval/generation/score, and early stopping on the generations' score
    stops while the held-out loss still falls."""
    state, step, data = lm_run()
    held_out = [next(iter(data))]
    writer = fx.logging.JsonlWriter(tmp_path / "m.jsonl")
    flat = lambda prompts, texts: {"score": 0.5}  # noqa: E731 - never improves
    generated = fx.callbacks.generation_eval_step(encode, decode, flat, name=None,
                                                  max_new_tokens=2)
    final = fx.fit(state, step, data, max_steps=50, eval_every=2,
                   eval_step={"val": fx.make_eval_step(lm_loss), "generation": generated},
                   eval_data={"val": held_out, "generation": [PROMPTS]},
                   callbacks=[fx.callbacks.early_stopping("generation/score", mode="max",
                                                          patience=2),
                              fx.callbacks.log_metrics(writer, every=2)])
    writer.close()
    assert int(final.step) == 6
    evals = [line["values"] for line in fx.logging.read_jsonl(tmp_path / "m.jsonl")
             if "eval/generation/score" in line["values"]]
    assert [e["eval/generation/score"] for e in evals] == [0.5, 0.5, 0.5]
    losses = [e["eval/val/loss"] for e in evals]
    assert losses[2] < losses[0], losses


def test_the_eval_step_and_the_callback_draw_the_same_samples():
    state, *_ = lm_run()
    seen = []

    def keep(prompts, texts):
        seen.append(texts)
        return {"n": len(texts)}
    options = dict(max_new_tokens=5, temperature=1.0)
    fx.callbacks.generation_eval_step(encode, decode, keep, **options)(state, PROMPTS)
    cb = fx.callbacks.generation_eval(Texts(), encode, decode, keep, PROMPTS, **options)
    fx.callbacks.fold([cb], state, fx.Event("eval_end", 0))
    assert seen[0] == seen[1]


# ---- errors ------------------------------------------------------------------------------------

def test_bad_arguments_are_named():
    writer = Texts()
    make = lambda **kw: fx.callbacks.generation_eval(  # noqa: E731
        writer, **{"encode": encode, "decode": decode, "score": starts_right,
                   "prompts": PROMPTS, **kw})
    with pytest.raises(ValueError, match="non-empty list of str"):
        make(prompts=[])
    with pytest.raises(ValueError, match="non-empty list of str"):
        make(prompts=["a", 3])
    with pytest.raises(TypeError, match="score must be callable"):
        make(score="bleu")
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        make(temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        make(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        make(top_k=0)
    with pytest.raises(TypeError, match="is not a writer: it has no write_scalars, write_texts"):
        fx.callbacks.generation_eval(object(), encode, decode, starts_right, PROMPTS)


@pytest.mark.parametrize("score, error, match", [
    (lambda p, t: 0.5, TypeError, "non-empty dict"),
    (lambda p, t: {}, TypeError, "non-empty dict"),
    (lambda p, t: {"bleu": "high"}, TypeError, "'bleu': 'high'; each metric must be"),
    (lambda p, t: {"ok": True}, TypeError, "'ok': True"),
    (lambda p, t: {"v": torch.ones(2)}, TypeError, "each metric must be"),
    (lambda p, t: {"bleu": math.nan}, ValueError, "'bleu' = nan; metrics must be finite"),
    (lambda p, t: {"x": torch.tensor(float("inf"))}, ValueError, "'x' = inf"),
])
def test_bad_scores_are_named(score, error, match):
    state, *_ = lm_run()
    cb = fx.callbacks.generation_eval(Texts(), encode, decode, score, PROMPTS, max_new_tokens=1)
    with pytest.raises(error, match=match):
        fx.callbacks.fold([cb], state, fx.Event("eval_end", 1))


def test_bad_prompts_and_models_are_named():
    state, *_ = lm_run()
    step = lambda **kw: fx.callbacks.generation_eval_step(  # noqa: E731
        **{"encode": encode, "decode": decode, "score": starts_right, "max_new_tokens": 1, **kw})
    with pytest.raises(ValueError, match=r"prompt 'xyz' does not tokenize: ValueError"):
        step()(state, ["ab", "xyz"])
    with pytest.raises(ValueError, match=r"prompt '' encodes to no tokens"):
        step()(state, [""])
    with pytest.raises(ValueError, match="non-empty list of str"):
        step()(state, [])
    with pytest.raises(TypeError, match="decode returned list for prompt 'ab'"):
        step(decode=lambda ids: ids)(state, ["ab"])
    flat = fx.TrainState.create(LastOnly(), fx.optim.sgd(0.1))
    with pytest.raises(TypeError, match=r"the model returned \(1, 6\); it must return logits"):
        fx.callbacks.sample_tokens(flat, torch.tensor([0]), max_new_tokens=1)
    with pytest.raises(ValueError, match="needs a key"):
        fx.callbacks.sample_tokens(state, torch.tensor([0]), max_new_tokens=1, temperature=1.0)


@pytest.mark.usefixtures("one_rank")
def test_a_sharded_state_is_refused_by_name():
    """The callback generates on rank 0 alone; a sharded model's forward runs collectives every
    rank joins, so rank 0 would wait forever: refused, naming the eval step that generates on
    every rank."""
    state, _, _ = lm_run()
    sharded = fx.shard(state, fx.sharding.mesh())
    cb = fx.callbacks.generation_eval(Texts(), encode, decode, starts_right, PROMPTS,
                                      max_new_tokens=2)
    with pytest.raises(ValueError, match="the state is sharded .*generation_eval_step"):
        fx.callbacks.fold([cb], sharded, fx.Event("eval_end", 2))
