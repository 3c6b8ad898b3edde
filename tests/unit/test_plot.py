"""llmtune.plot: the curves a run's metrics.jsonl gives (pure), the PNG drawn from them, and `llmtune plot`."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from llmtune.errors import UserError
from llmtune.plot import CURVES_FILE, curve_data, draw, figure, read_run, write_run_curves
from tests.conftest import assert_refused, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_dir(root: Path, name: str, rows: list[dict[str, Any]], stage: str = "sft", **files: Any) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "run.json").write_text(json.dumps({"stage": stage, "status": "finished"}))
    for fname, content in files.items():
        (d / fname.replace("_jsonl", ".jsonl")).write_text(content)
    return d


SFT_ROWS = [
    {"step": 1, "epoch": 0.1, "loss": 4.0, "lr": 1e-3, "tokens": 10},
    {"step": 2, "epoch": 0.2, "loss": 3.0, "lr": 1e-3, "tokens": 20},
    {"step": 3, "epoch": 0.3, "loss": None, "lr": 1e-3, "skipped": "nan"},  # a NaN step logs loss null
    {"step": 4, "epoch": 0.4, "loss": 2.0, "lr": 1e-3, "tokens": 40},
    {"step": 4, "eval/loss": 2.5, "eval/units": 9.0, "eval/perplexity": 12.2},
]
DPO_ROWS = [
    {"step": 1, "loss": 0.69, "accuracy": 0.0, "margin": 0.0, "reward_chosen": 0.0, "reward_rejected": 0.0},
    {"step": 2, "loss": 0.6, "accuracy": 0.75, "margin": 0.2, "reward_chosen": 0.1, "reward_rejected": -0.1},
    {"step": 2, "eval/loss": 0.62, "eval/accuracy": 0.5, "eval/reward_chosen": 0.05, "eval/reward_rejected": -0.02},
]


def _lines(panel: Any) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    return {(ln.run, ln.metric): (ln.x, ln.y) for ln in panel.lines}


def test_sft_run_gives_a_loss_panel_with_train_and_eval_lines(tmp_path: Path) -> None:
    panels = curve_data([read_run(_run_dir(tmp_path, "sft-a", SFT_ROWS))])
    assert [p.title for p in panels] == ["loss"]
    lines = _lines(panels[0])
    assert lines[("sft-a", "loss")] == ([1.0, 2.0, 4.0], [4.0, 3.0, 2.0])  # the skipped step is a gap
    assert lines[("sft-a", "eval/loss")] == ([4.0], [2.5])


def test_dpo_run_gives_loss_reward_and_accuracy_panels(tmp_path: Path) -> None:
    panels = curve_data([read_run(_run_dir(tmp_path, "dpo", DPO_ROWS, stage="dpo"))])
    assert [p.title for p in panels] == ["loss", "reward", "accuracy"]
    reward, accuracy = _lines(panels[1]), _lines(panels[2])
    assert set(reward) == {
        ("dpo", m) for m in ("reward_chosen", "reward_rejected", "eval/reward_chosen", "eval/reward_rejected")
    }
    assert reward[("dpo", "reward_rejected")] == ([1.0, 2.0], [0.0, -0.1])
    assert accuracy[("dpo", "accuracy")] == ([1.0, 2.0], [0.0, 0.75])
    assert accuracy[("dpo", "eval/accuracy")] == ([2.0], [0.5])


def test_online_run_gives_reward_and_kl_panels(tmp_path: Path) -> None:
    rows = [
        {"step": s, "loss": 0.1 * s, "reward": 0.2 * s, "kl": 0.01 * s, "reward/rule/exact_match": 0.2 * s}
        for s in (1, 2)
    ]
    rows.append({"step": 2, "eval/reward": 0.5})
    panels = curve_data([read_run(_run_dir(tmp_path, "grpo", rows, stage="grpo"))])
    assert [p.title for p in panels] == ["loss", "reward", "kl"]
    assert _lines(panels[1])[("grpo", "eval/reward")] == ([2.0], [0.5])
    assert _lines(panels[2])[("grpo", "kl")] == ([1.0, 2.0], [0.01, 0.02])


def test_rejection_sampling_rounds_follow_each_other_and_rewards_per_round(tmp_path: Path) -> None:
    """Each round's sft counts from step 1; round 2's steps come after round 1's last step (3)."""
    rows = [{"round": 1, "step": s, "loss": 5.0 - s} for s in (1, 2, 3)] + [
        {"round": 2, "step": s, "loss": 2.0 - 0.5 * s} for s in (1, 2)
    ]
    rounds = "".join(
        json.dumps({"round": k, "mean_reward": 0.1 * k, "mean_best_reward": 0.3 * k}) + "\n" for k in (1, 2)
    )
    run = read_run(_run_dir(tmp_path, "rs", rows, stage="rejection_sampling", rounds_jsonl=rounds))
    loss, per_round = curve_data([run])
    assert _lines(loss)[("rs", "loss")] == ([1.0, 2.0, 3.0, 4.0, 5.0], [4.0, 3.0, 2.0, 1.5, 1.0])
    assert "rounds" in loss.xlabel
    assert per_round.xlabel == "round"
    assert _lines(per_round)[("rs", "mean_best_reward")] == ([1.0, 2.0], [0.3, 0.6])


def test_comparison_has_one_line_per_run_and_labels_runs_by_path_when_names_clash(tmp_path: Path) -> None:
    a = _run_dir(tmp_path, "lr-a", SFT_ROWS)
    b = _run_dir(tmp_path, "lr-b", [{**r, "loss": r["loss"] / 2} for r in SFT_ROWS if r.get("loss")])
    (loss,) = curve_data([read_run(a), read_run(b)])
    assert {run for run, _ in _lines(loss)} == {"lr-a", "lr-b"}
    assert _lines(loss)[("lr-b", "loss")][1] == [2.0, 1.5, 1.0]
    same = [read_run(_run_dir(tmp_path / "x", "run", SFT_ROWS)), read_run(_run_dir(tmp_path / "y", "run", SFT_ROWS))]
    (loss,) = curve_data(same)
    assert {ln.run for ln in loss.lines} == {str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")}


def test_named_metrics_get_one_panel_each_and_unknown_ones_list_those_present(tmp_path: Path) -> None:
    run = read_run(_run_dir(tmp_path, "dpo", DPO_ROWS, stage="dpo"))
    panels = curve_data([run], ["margin", "eval/accuracy"])
    assert [p.title for p in panels] == ["margin", "eval/accuracy"]
    assert _lines(panels[0])[("dpo", "margin")] == ([1.0, 2.0], [0.0, 0.2])
    with pytest.raises(UserError) as e:
        curve_data([run], ["acuracy"])
    assert "acuracy" in str(e.value) and "eval/accuracy" in str(e.value) and "margin" in str(e.value)
    assert "step" not in e.value.hint.split(": ", 1)[1].split(", ")


def test_a_directory_without_metrics_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no metrics\.jsonl"):
        read_run(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        read_run(tmp_path / "missing")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(UserError, match="no curve to draw") as e:
        curve_data([read_run(tmp_path)])
    assert e.value.hint.endswith("--metric: lr")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss"')  # a line cut short by a kill
    with pytest.raises(UserError, match="no logged step"):
        read_run(tmp_path)


def test_the_figure_plots_the_metrics_and_the_png_shows_them(tmp_path: Path) -> None:
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    rows = [{"step": s, "loss": 1 / s, "accuracy": 1 - 1 / s} for s in range(1, 31)] + [{"step": 30, "eval/loss": 0.2}]
    d = _run_dir(tmp_path, "dpo", rows, stage="dpo")
    runs = [read_run(d)]
    panels = curve_data(runs)
    fig = figure(runs, panels)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss", "accuracy"]
    plotted = {ln.get_label(): ln.get_xydata().tolist() for ln in axes[0].get_lines()}
    assert plotted == {"loss": [[r["step"], r["loss"]] for r in rows[:-1]], "eval/loss": [[30.0, 0.2]]}

    out = draw([d], tmp_path / "plots" / "dpo.png")
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    pixels = imread(out)  # (H, W, 4) in [0, 1]
    width, height = fig.get_size_inches() * fig.dpi
    assert pixels.shape[:2] == (round(height), round(width))
    # the loss line's colour is on the canvas (a blank canvas is white and the axes are black / grey)
    colour = axes[0].get_lines()[0].get_color()
    close = (abs(pixels[..., :3] - to_rgb(colour)) < 0.08).all(axis=-1).sum()
    assert close > 100, close


def test_end_of_run_curves_never_fail_a_run(tmp_path: Path) -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=200)
    d = _run_dir(tmp_path, "sft", SFT_ROWS)
    assert write_run_curves(d, console) == d / CURVES_FILE
    assert (d / CURVES_FILE).read_bytes().startswith(PNG_SIGNATURE)
    (d / CURVES_FILE).unlink()
    (d / CURVES_FILE).mkdir()  # something in the way: a warning line, no exception
    assert write_run_curves(d, console) is None
    warning = buf.getvalue().splitlines()[-1]
    assert warning.startswith("warning: curves.png not drawn") and "the run is complete" in warning


def test_plot_command_compares_runs_and_refuses_bad_input(tmp_path: Path) -> None:
    a = _run_dir(tmp_path, "a", SFT_ROWS)
    b = _run_dir(tmp_path, "b", DPO_ROWS, stage="dpo")
    out = tmp_path / "cmp.png"
    proc = run_cli("plot", str(a), str(b), "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().startswith(PNG_SIGNATURE) and f"curves written to {out}" in proc.stdout
    proc = run_cli("plot", str(a), timeout=120)  # one run: its own curves.png
    assert proc.returncode == 0, proc.stderr
    assert (a / CURVES_FILE).is_file()

    assert_refused(run_cli("plot", str(tmp_path), timeout=120), "has no metrics.jsonl")
    stderr = assert_refused(run_cli("plot", str(b), "--metric", "rewards", timeout=120), "--metric rewards")
    assert "reward_chosen" in stderr and "accuracy" in stderr
