"""What a process does with its surroundings: standard streams whose reader may go away, output files that
others may need to read, and the known-harmless library noise it silences (quiet_libraries)."""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

_GONE = (errno.EPIPE, errno.ECONNRESET)


class GuardedStream:
    """A text stream (stdout / stderr) whose writes never raise because its reader went away.

    `llmtune train ... | tee log`: Ctrl-C ends `tee` too, and the next write to stdout fails with EPIPE (a
    reader that simply exits, `| head`, does the same). Raised inside the training loop, that error would
    end the run without a checkpoint. Here the first such failure points the file descriptor at /dev/null
    (so that later writes, C libraries' and the interpreter's final flush included, go nowhere quietly) and
    every later write is dropped: the run goes on, or stops as it was asked to, and its messages still
    reach the other stream and the files in output_dir."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except OSError as e:
                self._gone(e)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except OSError as e:
                self._gone(e)

    def _gone(self, e: OSError) -> None:
        if e.errno not in _GONE:
            raise e
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, AttributeError, ValueError):  # a stream without a file descriptor: writes are dropped
            pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer, ... of the real stream
        return getattr(self._stream, name)


def guard_std_streams() -> None:
    """Make sys.stdout and sys.stderr GuardedStreams (once), and keep SIGPIPE ignored so that a write to a
    pipe without a reader fails with EPIPE (handled above) rather than killing the process."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream))


def file_mode() -> int:
    """The mode a plain new file gets in this process: 0o666 less the umask (0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def readable_like_normal_files(root: Path) -> None:
    """Give every file under root (root itself may be a file) at least the mode a plain new file gets.

    safetensors writes its files through a private temporary file (mode 0600) that it renames: a model
    exported that way could not be read by a serving container running as another user, while the
    config and tokenizer beside it could. The umask still decides: under umask 077 nothing widens."""
    mode = file_mode()
    paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for p in paths:
        current = p.stat().st_mode & 0o777
        if current | mode != current:
            p.chmod(current | mode)


def quiet_libraries(loading_bars: bool | None = None) -> None:
    """Silence known-harmless library noise so that the run's own messages stay readable. loading_bars:
    transformers' "Loading weights" bars; None: only on a terminal (stderr), False: never (training, which
    says itself what it loads and draws its own progress)."""
    import logging
    import warnings

    import torch

    if not torch.cuda.is_available():  # said before DeepSpeed is imported: no "Setting accelerator to CPU" warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    # peft probes this deprecated transformers property; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # AdaLoRA adapters store their rank pattern by lora_E parameter; peft's LoRA check of rank_pattern keys
    # against module names calls them ignored, but AdaLoRA itself resizes the layers by them when it loads.
    warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
    # bitsandbytes reports that optional hub kernels are absent and falls back to its own CPU code.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # ... through the `kernels` package (transformers >= 5.25 installs it), which says offline that it
    # skips a publisher check for a kernel it then does not find; the CPU fallback is used either way.
    logging.getLogger("kernels").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # "Token indices sequence length is longer than ... indexing errors": rows are tokenized whole, then cut
    # to data.max_length (capped at the model's positions); a row left with nothing to learn is dropped and named
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    if not (sys.stderr.isatty() if loading_bars is None else loading_bars):  # in a log file, only noise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
