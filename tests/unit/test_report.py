"""What a run's log lines look like (piped or in a log file): step N/TOTAL with elapsed time and ETA,
one number format per kind of metric, and short lines for the online stages."""

from __future__ import annotations

import io

from rich.console import Console

from llmtune.engine.report import LINE_LIMIT, Progress, format_duration, format_record, format_value


def test_learning_rates_have_one_format() -> None:
    # before: lr=0.0030 beside lr=3.333e-04 in the same log
    assert [format_value("lr", v) for v in (3e-3, 3.333e-4, 1e-3, 9.432e-06)] == [
        "3.00e-03",
        "3.33e-04",
        "1.00e-03",
        "9.43e-06",
    ]
    assert format_value("critic_lr", 5e-6) == "5.00e-06"


def test_counts_are_integers() -> None:
    # before: eval/units=213.0000
    assert format_value("eval/units", 213.0) == "213"
    assert format_value("tokens", 1532) == "1532"
    assert format_value("samples", 64.0) == "64"
    assert format_value("nan_skips", 2) == "2"


def test_other_numbers() -> None:
    assert format_value("loss", 4.45764) == "4.4576"
    assert format_value("loss", 0.0) == "0.0000"
    assert format_value("kl", 2.5e-5) == "2.500e-05"
    assert format_value("grad_norm", 123456.0) == "1.235e+05"
    assert format_value("tokens_per_s", 2986.747) == "2987"
    assert format_value("tokens_per_s", 12.345) == "12.35"
    assert format_value("rollout_s", 3.14159) == "3.14"
    assert format_value("epoch", 0.27777) == "0.28"
    assert format_value("loss", float("nan")) == "nan"
    assert format_value("skipped", "nan") == "nan"


def test_durations_read_like_a_clock() -> None:
    assert [format_duration(s) for s in (0, 7.4, 75, 754, 3723, -1)] == [
        "0:00",
        "0:07",
        "1:15",
        "12:34",
        "1:02:03",
        "0:00",
    ]


def test_a_line_has_the_total_the_timing_and_the_key_metrics_first() -> None:
    record = {"step": 20, "epoch": 0.2778, "loss": 4.4576, "lr": 1e-3, "grad_norm": 2.0153, "tokens": 1012}
    line = format_record(record, 144, "0:12 elapsed, ETA 1:15")
    assert line == (
        "step 20/144 (0:12 elapsed, ETA 1:15): loss=4.4576 lr=1.00e-03 grad_norm=2.0153 epoch=0.28 tokens=1012"
    )


def test_a_long_online_line_keeps_the_key_metrics_and_says_what_it_left_out() -> None:
    # a ppo record as the trainer logs it: over 250 characters before
    record = {
        "step": 7,
        "epoch": 0.4375,
        "loss": 0.01234,
        "lr": 1e-6,
        "grad_norm": 0.5,
        "tokens": 4096,
        "tokens_per_s": 812.3,
        "policy_loss": -0.02,
        "value_loss": 0.3,
        "clip_fraction": 0.1,
        "value_clip_fraction": 0.05,
        "entropy": 2.1,
        "approx_kl": 0.0012,
        "reward": 0.75,
        "kl": 0.03,
        "kl_coef": 0.05,
        "non_score_reward": -0.0015,
        "completion_length": 31.5,
        "ended": 0.9,
        "explained_variance": 0.2,
        "reward/length": 0.5,
        "reward/format": 1.0,
        "rollout_s": 12.5,
        "train_s": 1.5,
    }
    line = format_record(record, 100, "1:00 elapsed, ETA 13:17")
    assert len(line) <= LINE_LIMIT, line
    for key in ("loss", "lr", "reward", "kl", "completion_length"):
        assert f" {key}=" in line
    assert line.index(" loss=") < line.index(" reward=") < line.index(" kl=")
    assert line.endswith("more in metrics.jsonl)")
    left_out = int(line.rsplit("(+", 1)[1].split()[0])
    assert line.count("=") + left_out == len(record) - 1


def test_progress_lines_carry_the_step_out_of_the_total_and_an_eta() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=200, highlight=False, soft_wrap=True)
    progress = Progress(console, total=10, start=4)  # resumed at step 4
    progress.t0 -= 60  # as if the 2 steps below took a minute
    progress.log({"step": 6, "loss": 1.5, "lr": 3e-3})
    progress.log({"step": 6, "eval/loss": 1.25, "eval/units": 213.0})
    progress.stop()
    first, second = buf.getvalue().splitlines()
    # 2 steps in 60 s, 4 left: 2 minutes
    assert first == "step 6/10 (1:00 elapsed, ETA 2:00): loss=1.5000 lr=3.00e-03"
    assert second == "step 6/10 (eval): eval/loss=1.2500 eval/units=213"


def test_training_turns_transformers_loading_bars_off_also_on_a_terminal(monkeypatch) -> None:
    from transformers.utils import logging as hf_logging

    from llmtune.runtime import quiet_libraries

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    hf_logging.enable_progress_bar()
    try:
        quiet_libraries()  # other commands: the bars stay on a terminal
        assert hf_logging.is_progress_bar_enabled()
        quiet_libraries(loading_bars=False)  # what run_stage (llmtune train) asks for
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
