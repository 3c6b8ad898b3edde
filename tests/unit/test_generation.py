"""Rollout generation on the real tiny model: end tokens, the ended flag, seeding, and the training state
(train mode, KV cache, gradient checkpointing, random state) left as it was."""

from __future__ import annotations

import pytest
import torch

from llmtune.generation.sample import end_tokens, generate, rollout, stop_ids, template_end_token
from llmtune.recipe.online import GenerationConfig
from tests.conftest import TINY_MODEL

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    return model, tok


def _prompt(tok) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What comes after Friday?"}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, add_special_tokens=False)["input_ids"]


def test_end_tokens_put_the_templates_end_of_turn_first(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert template_end_token(tok, tok.chat_template) == im_end
    stops = end_tokens(model, tok, tok.chat_template)
    assert stops[0] == im_end and tok.eos_token_id in stops and len(set(stops)) == len(stops)
    assert template_end_token(tok, None) is None  # no template: the eos ids only
    assert end_tokens(model, tok, None) == stop_ids(model, tok)
    # a template whose end of turn is not the eos token: it comes first, the eos ids stay
    other = tok.chat_template.replace("<|im_end|>", "<|im_start|>")
    assert end_tokens(model, tok, other)[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert set(stop_ids(model, tok)) < set(end_tokens(model, tok, other))


def test_rollout_is_seeded_and_flags_ended(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    ids = [_prompt(tok)] * 4
    greedy = GenerationConfig(max_new_tokens=6, temperature=0.0)
    base = rollout(model, tok, ids, greedy, seed=0, stops=[-1], device=CPU)
    assert all(len(c) == 6 and not ended for c, ended in base)  # no stop token can match: all truncated
    # make the third generated token a stop token: greedy completions now end there, without it
    stop = base[0][0][2]
    cut = rollout(model, tok, ids, greedy, seed=0, stops=[stop], device=CPU)
    first = base[0][0].index(stop)
    assert all(ended and c == base[0][0][:first] for c, ended in cut)

    sampled = GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=50)
    a = rollout(model, tok, ids * 2, sampled, seed=7, stops=[-1], device=CPU, batch_size=4)
    b = rollout(model, tok, ids * 2, sampled, seed=7, stops=[-1], device=CPU, batch_size=4)
    c = rollout(model, tok, ids * 2, sampled, seed=8, stops=[-1], device=CPU, batch_size=4)
    assert a == b and a != c
    assert len({tuple(x) for x, _ in a}) > 1  # sampling: the same prompt gives different completions


def test_rollout_restores_the_training_state(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    model.train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seen = {}

    def spy(module, args, kwargs):  # the state generate runs under
        seen.update(training=module.training, ckpt=module.is_activation_checkpointing)
        seen["use_cache"] = kwargs.get("use_cache", module.config.use_cache)

    hook = model.register_forward_pre_hook(spy, with_kwargs=True)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    try:
        rollout(model, tok, [_prompt(tok)], GenerationConfig(max_new_tokens=4), seed=0, stops=[-1], device=CPU)
    finally:
        hook.remove()
    assert seen == {"training": False, "ckpt": False, "use_cache": True}
    assert torch.equal(torch.rand(3), expected)  # the training loop's random stream did not move
    assert model.training and model.config.use_cache is False and model.is_activation_checkpointing
    model.gradient_checkpointing_disable()
    model.eval()


def test_eval_generate_stops_on_the_tokens_it_is_given(model_and_tokenizer) -> None:
    """eval's generate: the stop tokens passed (end_tokens), else the eos ids; the ended flag says which
    completions reached one."""
    model, tok = model_and_tokenizer
    ids = [_prompt(tok)] * 2
    base = generate(model, tok, ids, max_new_tokens=6, stops=[-1])
    assert all(len(c) == 6 and not ended for c, ended in base)
    stop = base[0][0][3]
    cut = generate(model, tok, ids, max_new_tokens=6, stops=[stop])
    assert all(ended and c == base[0][0][: base[0][0].index(stop)] for c, ended in cut)
    assert generate(model, tok, ids, max_new_tokens=6) == generate(
        model, tok, ids, max_new_tokens=6, stops=stop_ids(model, tok)
    )


def test_generation_progress_says_each_tenth_with_an_eta() -> None:
    """1000 completions in batches of 100, 4 s each (a clock that the test moves): a line at each tenth, the
    time left extrapolated from the rate so far (100 done in 4 s: 900 left = 36 s); with after_s, nothing
    before that many seconds (short rollouts stay quiet)."""
    from llmtune.generation.sample import GenerationProgress

    now = [0.0]
    lines: list[str] = []
    progress = GenerationProgress(lines.append, 1000, "round 1: sampled", clock=lambda: now[0])
    for _ in range(10):
        now[0] += 4.0
        progress(100)
    assert len(lines) == 10
    assert lines[0] == "round 1: sampled: 100/1000 completions (10%), 4 s, about 36 s left"
    assert lines[4] == "round 1: sampled: 500/1000 completions (50%), 20 s, about 20 s left"
    assert lines[-1] == "round 1: sampled: 1000/1000 completions (100%), 40 s"

    quiet: list[str] = []
    now[0] = 0.0
    progress = GenerationProgress(quiet.append, 1000, "rollout: sampled", after_s=30, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 4.0
        progress(100)
    assert [x.removeprefix("rollout: sampled: ") for x in quiet] == [
        "800/1000 completions (80%), 32 s, about 8 s left",
        "900/1000 completions (90%), 36 s, about 4 s left",
        "1000/1000 completions (100%), 40 s",
    ]


def test_the_generation_batch_is_sized_for_throughput_not_the_micro_batch() -> None:
    from llmtune.generation.sample import generation_batch

    assert generation_batch(None, 4) == 32  # not the training micro-batch of 4
    assert generation_batch(None, 64) == 64
    assert generation_batch(8, 64) == 8  # generation.batch_size, when set
