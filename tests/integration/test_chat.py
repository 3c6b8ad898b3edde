"""`llmtune chat` over a pseudo terminal on the tiny model (its replies are noise: the mechanics are under
test): a reply is streamed and ends, the next turn's prompt holds the conversation, /reset clears it, /exit
and Ctrl-D quit with exit 0."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_MODEL, cli_command

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "


def spawn(*args: str) -> pexpect.spawn:
    cmd, env = cli_command("chat", *args)
    return pexpect.spawn(cmd[0], cmd[1:], cwd=str(ROOT), env=env, encoding="utf-8", timeout=120, dimensions=(50, 200))


def turn(child: pexpect.spawn, text: str) -> tuple[str, str]:
    """Send one message; returns (the prompt the model got, the reply as the terminal showed it)."""
    child.sendline(text)
    child.expect_exact("--- reply ---")
    shown = child.before
    child.expect_exact(PROMPT)
    prompt = shown.split("---\r\n", 1)[1]  # after "--- prompt (N tokens) ---"
    return prompt.replace("\r\n", "\n"), child.before.strip()


def test_chat_streams_keeps_history_resets_and_exits(tmp_path: Path) -> None:
    child = spawn(str(TINY_MODEL), "--system", "Be brief.", "--max-new-tokens", "12", "--seed", "0", "--show-prompt")
    child.expect_exact(PROMPT)
    assert "/reset" in child.before  # the help line

    first_prompt, first_reply = turn(child, "hello there")
    # the tokenizer's chat template (chatml): system, the user's message, the generation prompt
    assert first_prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello there")
    assert first_prompt.rstrip().endswith("<|im_start|>assistant")
    assert first_reply  # something was streamed, and it ended (the prompt came back)

    second_prompt, _ = turn(child, "and again")
    # the history: the first exchange, the reply closed by the end-of-turn token, then the new message
    reply_in_history = second_prompt.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    assert "hello there" in second_prompt and second_prompt.index("hello there") < second_prompt.index("and again")
    assert reply_in_history.strip() and reply_in_history.strip()[:5] in first_reply.replace("\r\n", "\n")
    assert second_prompt.count("<|im_start|>user") == 2

    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.expect_exact(PROMPT)
    third_prompt, _ = turn(child, "a new start")
    assert "hello there" not in third_prompt and "and again" not in third_prompt
    assert "Be brief." in third_prompt and third_prompt.count("<|im_start|>user") == 1

    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def endless_model(tmp_path: Path) -> Path:
    """The tiny model made unable to end a reply: its generation config suppresses every special or added token
    (so no end token is ever chosen) and its context is a million positions, so that a reply runs until stopped."""
    import json
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "endless"
    shutil.copytree(TINY_MODEL, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1_000_000}))
    generation = json.loads((model / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model)
    specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder) | {config["eos_token_id"]}
    specials |= set(generation.get("eos_token_id") or [])
    (model / "generation_config.json").write_text(json.dumps({**generation, "suppress_tokens": sorted(specials)}))
    return model


def test_ctrl_d_quits_and_ctrl_c_stops_a_reply(tmp_path: Path) -> None:
    # a reply that cannot end by itself: only the Ctrl-C below ends it, however slow or fast the machine
    child = spawn(str(endless_model(tmp_path)), "--max-new-tokens", "1000000", "--temperature", "0")
    child.expect_exact(PROMPT)
    child.sendline("tell me a long story")
    child.expect_exact("tell me a long story\r\n")  # the terminal's echo
    child.expect(r"\S")  # the reply has started
    child.sendintr()  # Ctrl-C during the reply: the reply stops, the chat goes on
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    child.sendeof()  # Ctrl-D at the prompt: quit
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in (child.before or "")


def test_unknown_model_is_a_clean_error() -> None:
    cmd, env = cli_command("chat", str(ROOT / "no-such-model"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
