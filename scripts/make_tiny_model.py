#!/usr/bin/env python3
"""Build the quickstart's tiny Llama-architecture chat model, offline and deterministically.

Writes ``recipes/quickstart/model/`` (or --out):

* a byte-level BPE tokenizer (vocab 1024 with the special tokens ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``) trained on ``recipes/quickstart/sft.jsonl`` and ``cpt.txt`` (run
  ``scripts/make_quickstart_data.py`` first). Every byte is in the alphabet, so any text (Chinese, emoji)
  encodes. Its eos token is ``<|im_end|>``; it deliberately has no pad, bos or unk token, as Llama
  tokenizers have none. Its chat template is ChatML in the style of Qwen2.5, without a default system
  prompt.
* a randomly initialised (``torch.manual_seed(0)``) 2-layer ``LlamaForCausalLM`` in float32 safetensors,
  with a ``generation_config.json`` that stops on ``<|im_end|>`` or ``<|endoftext|>``.

Running it twice writes byte-identical files. It checks at the end that the folder reloads with the Auto
classes and that a forward pass works.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

# Single-threaded and quiet, for reproducible training and output.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

VOCAB_SIZE = 1024
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
MAX_POSITIONS = 2048

# ChatML, as Qwen2.5 renders it, but with no default system prompt: every message is
# "<|im_start|>{role}\n{content}<|im_end|>\n" (roles system, user, assistant, tool); a `tools` list goes into
# the system message as one JSON object a line inside <tools></tools>; assistant `tool_calls` are rendered
# as <tool_call> blocks; add_generation_prompt appends "<|im_start|>assistant\n".
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages and messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (tools and loop.first and message.role == 'system') %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if message.content or not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def training_texts(data_dir: Path) -> list[str]:
    """The text the BPE learns from: each chat message as "{role}\\n{content}" and each pretraining line."""
    sft, cpt = data_dir / "sft.jsonl", data_dir / "cpt.txt"
    for p in (sft, cpt):
        if not p.is_file():
            raise SystemExit(f"{p} is missing: run scripts/make_quickstart_data.py first")
    texts = []
    for line in sft.read_text("utf-8").splitlines():
        for m in json.loads(line)["messages"]:
            texts.append(f"{m['role']}\n{m['content']}")
    texts.extend(cpt.read_text("utf-8").splitlines())
    return texts


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Keep the offsets of leading spaces, so character spans map exactly onto tokens.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        bos_token=None,
        unk_token=None,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(vocab_size: int, im_end: int, endoftext: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=[im_end, endoftext], pad_token_id=None)
    return model


def check(out: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """Reload with the Auto classes; check the template, the byte fallback and a forward pass."""
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.pad_token is None and tok.bos_token is None and tok.eos_token == IM_END, tok
    assert len(tok) == len(tokenizer) == VOCAB_SIZE

    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 17 + 5?"},
        {"role": "assistant", "content": "17 + 5 = 22."},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    expected = (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is 17 + 5?<|im_end|>\n"
        "<|im_start|>assistant\n17 + 5 = 22.<|im_end|>\n"
    )
    assert text == expected, repr(text)
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == expected[: expected.rindex("17 + 5 = 22.")], repr(prompt)
    nosys = tok.apply_chat_template(msgs[1:2], tokenize=False)
    assert nosys == "<|im_start|>user\nWhat is 17 + 5?<|im_end|>\n", repr(nosys)  # no default system prompt
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    with_tools = tok.apply_chat_template(msgs[1:2], tools=tools, tokenize=False)
    assert with_tools.startswith("<|im_start|>system\n# Tools") and '\n{"type": "function"' in with_tools

    print("chat template example:\n" + text, end="")
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(IM_START) and ids[-2] == tok.eos_token_id
    print(f"  -> {len(ids)} tokens: {ids[:12]} ...")

    sample = "Hello wörld! 你好，世界 🦙🚀 tab\tnew\nline"
    enc = tok(sample, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc) == sample, tok.decode(enc)

    batch = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    assert logits.shape == (1, len(ids), VOCAB_SIZE) and torch.isfinite(logits).all()
    n_params = sum(p.numel() for p in model.parameters())
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"reload + forward OK: {n_params:,} parameters, folder {size:,} bytes ({size / 2**20:.2f} MiB)")
    assert size < 2 * 2**20, "the tiny model folder must stay under 2 MB"


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=root / "recipes" / "quickstart", help="sft.jsonl + cpt.txt")
    ap.add_argument("--out", type=Path, default=root / "recipes" / "quickstart" / "model")
    args = ap.parse_args()
    out: Path = args.out

    tokenizer = build_tokenizer(training_texts(args.data))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    print(f"special token ids: {ids}")
    model = build_model(len(tokenizer), ids[IM_END], ids[ENDOFTEXT])

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():  # safetensors writes 0600; keep the folder readable for other users (Docker)
        f.chmod(0o644)
    check(out, tokenizer)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
