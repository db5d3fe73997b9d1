"""Claims about progress without a terminal (nohup, a container, CI): `train`, `export` and `bench` log a
line every few seconds with the count, the loss, the throughput and the ETA, instead of nothing.

pytest's captured stderr is not a terminal, as a log file or a pipe is not.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import cli

from edgelora.cli import common
from edgelora.cli.common import Progress

LINE = re.compile(r"^train t: (\d+)/(\d+) steps \(\d+%\) loss [\d.]+, [\d.e+-]+ steps/s, ETA \d+:\d\d$")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_log_line_every_few_seconds_with_rate_and_eta(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    monkeypatch.setattr(common.time, "monotonic", clock)
    bar = Progress(100, "train t")
    for step in range(1, 101):
        clock.now += 0.5  # two steps a second
        bar.update_to(step, f"loss {1 / step:.3f}")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    # quiet for the first LOG_EVERY_S (5 s = 10 steps), then one line per 5 s, the last step included
    assert [int(LINE.match(line)[1]) for line in lines] == list(range(10, 101, 10))
    assert lines[0] == "train t: 10/100 steps (10%) loss 0.100, 2 steps/s, ETA 0:45"
    assert lines[-1] == "train t: 100/100 steps (100%) loss 0.010, 2 steps/s, ETA 0:00"


def test_a_quick_run_logs_nothing(monkeypatch, capsys) -> None:
    clock = Clock()
    monkeypatch.setattr(common.time, "monotonic", clock)
    bar = Progress(8, "train t")
    for step in range(1, 9):
        clock.now += 0.5
        bar.update_to(step, "loss 0.5")
    bar.describe("saving")
    bar.close()
    assert capsys.readouterr().err == ""


def test_a_resumed_run_measures_its_rate_from_where_it_resumed(monkeypatch, capsys) -> None:
    clock = Clock()
    monkeypatch.setattr(common.time, "monotonic", clock)
    bar = Progress(100, "train t")
    clock.now += 30  # loading: not steps
    bar.update_to(50, "loss 0.5")  # resumed at step 50
    clock.now += 10
    bar.update_to(60, "loss 0.4")
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["train t: 50/100 steps (50%) loss 0.5", "train t: 60/100 steps (60%) loss 0.4, 1 steps/s, ETA 0:40"]


def test_phases_are_logged_at_once_and_repeats_at_most_every_few_seconds(monkeypatch, capsys) -> None:
    clock = Clock()
    monkeypatch.setattr(common.time, "monotonic", clock)
    bar = Progress(None, "export")
    for seconds, message in ((2, "loading base"), (2, "exporting graph"), (2, "quantizing"), (2, "quantizing layer 2"),
                             (2, "validating against torch"), (6, "validating adapter b")):
        clock.now += seconds
        bar.describe(message)
    assert capsys.readouterr().err.splitlines() == [
        "export: quantizing (+6 s)", "export: validating against torch (+10 s)", "export: validating adapter b (+16 s)"]


def test_train_export_and_bench_log_without_a_terminal(workspace, tmp_path: Path, monkeypatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(common, "LOG_EVERY_S", 0.0)  # every update: the run is shorter than a real interval
    rc, _out, err = cli(["train", "--base", workspace.base, "--data", workspace.data, "--out", tmp_path / "t",
                         "--epochs", "1", "--batch-size", "16", "--max-length", "16", "--device", "cpu"], capsys)
    assert rc == 0
    lines = [line for line in err.splitlines() if line.startswith("train t:")]
    assert lines and LINE.match(lines[-1]), err
    assert LINE.match(lines[-1])[1] == LINE.match(lines[-1])[2]  # the last step is logged

    rc, _out, err = cli(["export", workspace.base, "--adapter", tmp_path / "t", "--mode", "merged",
                         "--precision", "fp32", "--out", tmp_path / "bundle"], capsys)
    assert rc == 0
    assert re.search(r"^export: loading base \(\+\d+ s\)$", err, re.M) and "export: writing bundle" in err, err

    rc, _out, err = cli(["bench", tmp_path / "bundle", "--rounds", "1", "--warmup", "0", "--batch", "1", "--seq", "16",
                         "--threads", "1"], capsys)
    assert rc == 0, err
    assert re.search(r"^bench: (\d+)/\1 runs \(100%\) .*runs/s, ETA 0:00$", err, re.M), err
