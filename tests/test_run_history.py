"""A run's history over its attempts: every ``logs/version_N/metrics.csv`` merged by step for
``curves.png``, and the training time of every attempt (``run_time.json``) in the summary."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flash_dist import train as train_mod
from flash_dist.train import (
    RunSummary,
    plot_curves,
    read_attempt_times,
    read_run_metrics,
    record_attempt_time,
)

HEADER = "epoch,step,train/device/items_per_sec,train/loss,val/loss,validate/batches\n"


def write_csv(root: Path, version: int | str, text: str | bytes) -> None:
    folder = root / f"version_{version}"
    folder.mkdir(parents=True)
    path = folder / "metrics.csv"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)


@pytest.fixture
def logs(tmp_path) -> Path:
    """Four attempts as Lightning's CSVLogger writes them (one row per logging call, empty cells
    for what that call did not log), plus an empty and a missing file."""
    root = tmp_path / "logs"
    # attempt 1: steps 0-3, validation after step 3, checkpoint at step 2; ThroughputMonitor's
    # validate/* row counts validation runs in the step column (step 1 = first validation)
    write_csv(root, 0, HEADER
              + "0,0,,10.8,,\n"
              + "0,1,100.0,10.5,,\n"
              + "0,2,110.0,10.1,,\n"
              + "0,3,120.0,9.9,,\n"
              + ",1,,,,4\n"
              + "0,3,,,9.7,\n")
    # attempt 2 resumed from the step-2 checkpoint: redoes steps 2 and 3 (no validation this time:
    # killed first) and logs another "first" validation row at step 1
    write_csv(root, 1, HEADER
              + "0,2,90.0,10.2,,\n"
              + "0,3,95.0,9.8,,\n"
              + ",1,,,,4\n")
    write_csv(root, 2, "")  # an attempt that died before its logger wrote anything
    (root / "version_3").mkdir()  # ... or even created the file
    # attempt 5 (a header with a new column, as when a later attempt logs something new),
    # killed mid-write: its last line has no newline
    write_csv(root, 4, "epoch,lr,step,train/device/items_per_sec,train/loss,val/loss\n"
              + "0,0.001,4,130.0,9.5,\n"
              + "0,0.001,5,131.0,9.3,9.1\n"
              + "0,0.001,6,13")
    # version_10 sorts after version_4 by number (before it as text): it redoes step 5
    write_csv(root, 10, HEADER + "0,5,140.0,9.2,,\n0,6,141.0,9.0,,\n")
    (root / "version_x").mkdir()  # not an attempt folder: ignored
    (root / "version_x" / "metrics.csv").write_text(HEADER + "0,0,1.0,1.0,,\n")
    return root


def test_read_run_metrics_merges_every_attempt_by_step(logs):
    rows = read_run_metrics(logs)
    assert [(r["step"], r.get("train/loss"), r.get("val/loss"), r.get("train/device/items_per_sec")) for r in rows] == [
        ("0", "10.8", None, None),
        ("1", "10.5", None, "100.0"),  # a later attempt's validate row at step 1 keeps the train values
        ("2", "10.2", None, "90.0"),  # redone by attempt 2
        ("3", "9.8", "9.7", "95.0"),  # redone; attempt 1's validation at step 3 stays (attempt 2 logged none)
        ("4", "9.5", None, "130.0"),
        ("5", "9.2", "9.1", "140.0"),  # version_10 after version_4
        ("6", "9.0", None, "141.0"),  # version_4's cut-off line is left out
    ]
    assert rows[1]["validate/batches"] == "4"
    assert rows[4]["lr"] == "0.001"
    assert all("" not in r.values() for r in rows)


def test_read_run_metrics_without_readable_files(tmp_path):
    assert read_run_metrics(tmp_path / "nowhere") == []
    root = tmp_path / "logs"
    write_csv(root, 0, "")
    write_csv(root, 1, HEADER)  # header only
    write_csv(root, 2, "epoch,st")  # truncated header
    write_csv(root, 3, HEADER + "0,x,1.0,1.0,,\n")  # step not a number
    write_csv(root, 4, HEADER + "0,0,1.0,10.0,,\n" + "0,1,1.0\n")  # short row (fields missing)
    write_csv(root, 5, HEADER.encode() + b"0,2,1.0,9.0,,\n" + b"\0" * 64 + b"\n")  # NUL bytes after a crash
    rows = read_run_metrics(root)
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "10.0"), ("2", "9.0")]


def test_plot_curves_plots_the_merged_history(logs, tmp_path, monkeypatch):
    import matplotlib.axes

    plotted = []
    original = matplotlib.axes.Axes.plot

    def record(self, xs, ys, *args, **kwargs):
        plotted.append((kwargs.get("label"), list(xs), list(ys)))
        return original(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    out = tmp_path / "curves.png"
    plot_curves(read_run_metrics(logs), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert plotted == [
        ("train", [0, 1, 2, 3, 4, 5, 6], [10.8, 10.5, 10.2, 9.8, 9.5, 9.2, 9.0]),
        ("validation", [3, 5], [9.7, 9.1]),
        (None, [1, 2, 3, 4, 5, 6], [100.0, 90.0, 95.0, 130.0, 140.0, 141.0]),  # tokens/s
    ]


def test_record_attempt_time_adds_and_updates_atomically(tmp_path):
    path = tmp_path / "run" / "run_time.json"
    assert read_attempt_times(path) == []
    record_attempt_time(path, "a", 10.0, step=3)
    record_attempt_time(path, "b", 5.5)
    attempts = record_attempt_time(path, "a", 12.25, step=4)  # a's later checkpoint
    assert attempts == read_attempt_times(path)
    assert sorted((a["attempt"], a["seconds"], a.get("step")) for a in attempts) == [
        ("a", 12.25, 4), ("b", 5.5, None)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["run_time.json"]  # no temporary file left
    path.write_text('{"attempts": [{"attempt": "a", "seco')  # damaged: start over rather than fail
    assert read_attempt_times(path) == []
    assert [a["attempt"] for a in record_attempt_time(path, "c", 1.0)] == ["c"]


def test_run_summary_reports_the_time_and_curves_of_all_attempts(logs, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    root = logs.parent
    (root / "run_time.json").write_text(json.dumps({"attempts": [
        {"attempt": "earlier", "seconds": 100.0}, {"attempt": "killed", "seconds": 20.0}, {"seconds": "junk"}]}))
    said = []
    monkeypatch.setattr(train_mod, "rank_zero_info", lambda msg: said.append(msg))
    clock = iter([1000.0, 1007.0, 1030.0, 1030.0])
    monkeypatch.setattr(train_mod, "time", SimpleNamespace(perf_counter=lambda: next(clock), strftime=time.strftime))
    logger = CSVLogger(root, name="logs")  # this attempt: version_11, its rows not flushed yet
    logger.log_metrics({"train/loss": 8.5, "train/device/items_per_sec": 150.0}, step=7)
    trainer = SimpleNamespace(is_global_zero=True, global_step=8, loggers=[logger],
                              callback_metrics={"train/loss": 8.5})
    summary = RunSummary(root)
    summary.on_train_start(trainer, None)  # t = 1000
    summary.on_save_checkpoint(trainer, None, {})  # t = 1007
    mine = [a for a in read_attempt_times(root / "run_time.json") if a.get("attempt") == summary.attempt]
    assert [(a["seconds"], a["step"]) for a in mine] == [(7.0, 8)]
    # rank 1 leaves the file alone
    RunSummary(root).on_save_checkpoint(SimpleNamespace(is_global_zero=False, global_step=8), None, {})
    summary.on_train_end(trainer, None)  # t = 1030
    assert sorted(a["seconds"] for a in read_attempt_times(root / "run_time.json")) == [20.0, 30.0, 100.0]
    assert said[-1] == "flash-dist: 8 steps in 150 s over 3 attempts (this one 30 s); train/loss 8.5"
    assert (root / "curves.png").stat().st_size > 10_000
    assert read_run_metrics(root / "logs")[-1] == {
        "step": "7", "train/loss": "8.5", "train/device/items_per_sec": "150.0"}
