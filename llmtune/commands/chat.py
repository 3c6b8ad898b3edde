"""`llmtune chat MODEL [--adapter DIR]`: talk to a model in the terminal, in its chat template, the reply
streamed token by token, the conversation kept turn after turn.

    /reset   forget the conversation (the system prompt stays)
    /exit    quit (also /quit, Ctrl-D, and Ctrl-C at the prompt; Ctrl-C during a reply stops the reply)

The model loads the way `llmtune eval` loads it (a directory, a hub id, an adapter directory, a .gguf
file); generation stops at every end token of the template (``end_tokens``), not only eos. A conversation
longer than the model's context drops its oldest turns.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from llmtune.data.prompts import render_prompt
from llmtune.errors import UserError

HELP = "commands: /reset (forget the conversation), /exit (quit); Ctrl-C stops a reply, Ctrl-D quits"


@dataclass
class Conversation:
    """The turns so far and the system prompt; ``prompt`` renders them with the next user message."""

    tokenizer: Any
    template: str | None
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": user}]

    def prompt(self, user: str) -> str:
        """The text the model continues: system, every earlier turn, the new message, the generation prompt."""
        return render_prompt(self.tokenizer, self.template, self.messages(user))

    def add(self, user: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    def drop_oldest(self) -> bool:
        """Forget the oldest exchange (to fit the context); False when there is none left to drop."""
        if len(self.turns) < 2:
            return False
        del self.turns[:2]
        return True

    def reset(self) -> None:
        self.turns.clear()


class _TextStream:
    """A generate() streamer that hands out the reply's new text token by token: the whole reply decoded
    again at each token (so multi-byte characters and merged pieces come out right), minus what was shown;
    held back while it ends inside an incomplete character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.queue = tokenizer, queue.Queue()
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(x) for x in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        self.queue.put(None)

    def _emit(self, text: str) -> None:
        if len(text) > self.shown:
            self.queue.put(text[self.shown :])
            self.shown = len(text)


class Chat:
    """A loaded model, its template and end tokens, and the sampling settings."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: str | None,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.9,
        context: int | None = None,
    ) -> None:
        from llmtune.generation.sample import end_tokens

        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.end_ids = end_tokens(model, tokenizer, template)
        self.context = context
        self.stop = threading.Event()
        self.ended = False  # the last reply ended with an end token (not at the token budget, not stopped)

    def encode(self, text: str) -> list[int]:
        # the template writes the special tokens itself (bos included where it has one)
        return self.tokenizer(text, add_special_tokens=self.template is None)["input_ids"]

    def fit(self, conv: Conversation, user: str) -> tuple[list[int], int, int]:
        """The prompt's ids, after dropping the oldest exchanges while prompt + reply would not fit the context;
        returns (ids, the reply's token budget, exchanges dropped). A message that leaves no room is refused."""
        dropped = 0
        ids = self.encode(conv.prompt(user))
        while self.context is not None and len(ids) + self.max_new_tokens > self.context and conv.drop_oldest():
            dropped += 1
            ids = self.encode(conv.prompt(user))
        budget = self.max_new_tokens if self.context is None else min(self.max_new_tokens, self.context - len(ids))
        if budget < 1:
            raise UserError(
                f"the message takes {len(ids)} tokens with the template, and the model's context is {self.context}",
                hint="send a shorter message",
            )
        return ids, budget, dropped

    def stream(self, ids: list[int], budget: int | None = None) -> Iterator[str]:
        """Generate a reply to the prompt ids (at most budget tokens, default max_new_tokens) and yield its text
        as it comes; ``self.stop.set()`` ends it early."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        from llmtune.generation.sample import generation_mode

        stop = self.stop

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        stop.clear()
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        streamer = _TextStream(self.tokenizer)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
            if self.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_ids[0]
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad(), generation_mode(self.model):
                    self.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=budget or self.max_new_tokens,
                        eos_token_id=self.end_ids,
                        pad_token_id=pad,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Stop()]),
                        **sampling,
                    )
            except BaseException as e:
                failure.append(e)
                streamer.queue.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (piece := streamer.queue.get()) is not None:
                yield piece
        finally:
            stop.set()  # the caller stopped reading (Ctrl-C): end generation, then wait for it
            thread.join()
            self.ended = bool(streamer.ids) and streamer.ids[-1] in self.end_ids
        if failure:
            raise failure[0]


def run_chat(chat: Chat, conv: Conversation, *, show_prompt: bool = False) -> None:
    """The read-reply loop on the terminal (stdin / stdout) until /exit, Ctrl-D or Ctrl-C at the prompt."""
    out = sys.stdout
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C stops a reply even when whatever started llmtune ignored SIGINT (a shell's background job)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    print(HELP, flush=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        user = line.strip()
        if not user:
            continue
        if user in ("/exit", "/quit"):
            return
        if user == "/reset":
            conv.reset()
            print("(conversation cleared)", flush=True)
            continue
        if user in ("/help", "/?"):
            print(HELP, flush=True)
            continue
        if user.startswith("/") and " " not in user:
            print(f"unknown command {user}; {HELP}", flush=True)
            continue
        try:
            ids, budget, dropped = chat.fit(conv, user)
        except UserError as e:
            print(f"error: {e}", flush=True)
            continue
        if dropped:
            print(f"(the {dropped} oldest exchange(s) no longer fit the model's context: dropped)", flush=True)
        if show_prompt:
            print(f"--- prompt ({len(ids)} tokens) ---\n{conv.prompt(user)}\n--- reply ---", flush=True)
        pieces: list[str] = []
        try:
            for piece in chat.stream(ids, budget):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        conv.add(user, "".join(pieces).strip())


def load_chat(
    model: str,
    adapter: str | None,
    *,
    chat_template: str | None,
    device: str,
    dtype: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    console: Any,
) -> Chat:
    """Load as eval does (a .gguf file converted once; an adapter directory with its recorded base)."""
    from llmtune.data.chat import resolve_chat_template
    from llmtune.model.gguf import resolve_gguf
    from llmtune.model.resolve import load_causal_lm, pick_device, pick_dtype

    model = resolve_gguf(model, console)
    dev = pick_device(device)
    loaded = load_causal_lm(model, adapter, pick_dtype(dtype, dev), dev, "MODEL")
    tok = loaded.tokenizer
    try:
        template = resolve_chat_template(tok, chat_template, required=False)
    except UserError as e:
        raise UserError(e.message.replace("model.chat_template", "--chat-template"), hint=e.hint) from None
    if template is None:
        console.print(
            "note: the tokenizer has no chat template: turns are sent as plain text (pass --chat-template "
            "chatml, llama3, alpaca or a .jinja file to use one)",
            markup=False,
        )
    config = loaded.model.get_base_model().config if hasattr(loaded.model, "get_base_model") else loaded.model.config
    context = getattr(config, "max_position_embeddings", None)
    return Chat(
        loaded.model,
        tok,
        template,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        context=context if isinstance(context, int) else None,
    )


def chat_command(
    model: str,
    adapter: str | None,
    system: str | None,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    chat_template: str | None,
    device: str,
    dtype: str,
    seed: int | None,
    show_prompt: bool,
    err: Any,
) -> None:
    """``llmtune chat``: the options checked, the model loaded with a status line, then the conversation."""
    from llmtune.commands.merge import check_dtype
    from llmtune.model.hub import check_model_options
    from llmtune.runtime import quiet_libraries

    check_dtype(dtype)
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r} is not one of auto, cpu, cuda")
    check_model_options([("llmtune chat", model)])
    check_model_options([("--adapter", adapter)], hub_ok=False)
    quiet_libraries(loading_bars=False)
    with err.status(f"loading {model}"):
        c = load_chat(
            model, adapter, chat_template=chat_template, device=device, dtype=dtype,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, console=err,
        )  # fmt: skip
    if seed is not None:
        torch.manual_seed(seed)
    run_chat(c, Conversation(c.tokenizer, c.template, system), show_prompt=show_prompt)
