"""The report side of the multi-GPU and profiling benchmarks: tables computed from measured rows."""

import time
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from flash_dist.bench.profile_attention import summarize
from flash_dist.bench.scaling import Case, cp_table, strategies_table


def _case(impl, world, step_ms=None, seq=32768, size="small", cp=1, error=None):
    c = Case(impl, size, seq, world, cp=cp, error=error)
    if error is None:
        c.step_ms, c.tokens_per_s_per_gpu, c.mfu, c.peak_gib = step_ms, seq / cp / (step_ms / 1e3), 0.2, 10.0
        c.step_times_ms = [step_ms * 2, step_ms]
    return asdict(c)


def test_strategies_table_weak_scaling_is_per_gpu_throughput_over_one_gpu():
    rows = [_case("flash_fsdp", 1, 500.0), _case("flash_fsdp", 4, 625.0), _case("fsdp", 1, 400.0),
            _case("fsdp", 2, error="OOM")]
    lines = strategies_table(rows, "header").splitlines()
    four = next(line for line in lines if "| flash_fsdp | 4 |" in line)
    assert "| 625 |" in four and four.rstrip().endswith("| 80% |")  # 500 / 625
    one = next(line for line in lines if "| flash_fsdp | 1 |" in line)
    assert one.rstrip().endswith("| — |")
    assert any("| fsdp | 2 | OOM |" in line for line in lines)
    assert lines[0] == "header"


def test_strategies_table_shows_accumulation_and_compares_like_with_like():
    rows = [_case("flash_fsdp", 1, 500.0), _case("flash_fsdp", 2, 625.0)]
    acc = [_case("flash_fsdp", 1, 900.0), _case("flash_fsdp", 2, 1000.0)]
    for r in acc:
        r["accumulate"] = 2
        r["tokens_per_s_per_gpu"] *= 2
    plain = strategies_table(rows, "h")
    assert "accum." not in plain  # the column only when some row accumulates
    lines = strategies_table(rows + acc, "h").splitlines()
    assert "| GPUs | accum. | step ms |" in lines[2]
    two = next(line for line in lines if "| flash_fsdp | 2 | 2 |" in line)
    assert "| 1000 |" in two and two.rstrip().endswith("| 90% |")  # against the one-GPU row with accumulate 2
    del rows[0]["accumulate"]  # rows saved before the field existed count as 1
    assert "| flash_fsdp | 1 | 1 | 500 |" in strategies_table(rows + acc, "h")


@pytest.mark.parametrize("accumulate", [1, 3])
def test_step_timer_times_whole_optimizer_steps(accumulate):
    """One time per optimizer step, from its first micro-batch's start to its last one's end."""
    from flash_dist.bench.scaling import _step_timer

    timer = _step_timer(warmup=1, steps=2, cpu=True)
    trainer = SimpleNamespace(global_step=0)
    for step in range(3):
        for micro in range(accumulate):
            timer.on_train_batch_start(trainer, None, None, micro)
            time.sleep(0.01)
            if micro == accumulate - 1:
                trainer.global_step += 1  # the optimizer steps inside the last micro-batch
            timer.on_train_batch_end(trainer, None, None, None, micro)
    assert len(timer.times) == 3
    assert all(accumulate * 10 <= t < accumulate * 10 + 200 for t in timer.times), timer.times


def test_cp_table_compares_throughput_and_mfu_with_cp1_and_lists_probes():
    base = _case("flash_cp", 1, 100.0, seq=16384)
    two = _case("flash_cp", 2, 160.0, seq=32768, cp=2)
    two["mfu"] = 0.19
    probe = _case("flash_cp", 4, 70_000.0, seq=1 << 20, cp=4)
    probe["probe"] = True
    lost = _case("flash_cp", 2, None, seq=1 << 21, cp=2, error="timeout")
    lost["probe"] = True
    text = cp_table([base, two, probe, lost], "h")
    row2 = next(line for line in text.splitlines() if line.startswith("| 2 | 32768 |"))
    assert "| 62% |" in row2  # (16384 / 0.16) / (16384 / 0.1)
    assert "| 95% |" in row2  # MFU 0.19 / 0.20
    assert "| 4 | 1048576 | 262144 | trains | 140.0 |" in text  # the first step's time, in seconds
    assert "| 2 | 2097152 | 1048576 | timeout |" in text


def test_profile_summary_attributes_kernels_to_methods(tmp_path):
    header = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
              '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')

    def row(i, kernel, metric, unit, value):
        return f'"{i}","1","python","h","{kernel}","1","7","(128, 1, 1)","(1, 1, 1)","0","9.0","S","{metric}","{unit}","{value}"'

    lines = ["==PROF== Connected to process", header,
             row(0, "_fwd_kernel", "Duration", "ns", "2,000,000"),
             row(0, "_fwd_kernel", "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active", "%", "42.5"),
             row(1, "_bwd_kv_kernel", "Duration", "ms", "6.00"),
             row(2, "void pytorch_flash::flash_fwd_kernel<x>", "Duration", "us", "1,500"),
             row(3, "void at::native::elementwise_kernel", "Duration", "us", "500"),
             row(4, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "Duration", "ms", "1.0")]
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(lines) + "\n")
    text = summarize(str(path))
    assert "| 0 | flash-dist | `_fwd_kernel` | 2.000 | 25% | 42.5 |" in text
    assert "| 3 | FLASH | `void at::native::elementwise_kernel` | 0.500 | 25% |" in text  # helper joins its method
    assert "flash-dist 8.00 ms, FLASH 2.00 ms, cuDNN 1.00 ms" in text


def test_scaling_profile_splits_nccl_from_compute():
    from types import SimpleNamespace

    from flash_dist.bench.scaling import _profile_summary

    events = [SimpleNamespace(key="ncclDevKernel_AllGather_RING_LL", self_device_time_total=30_000.0),
              SimpleNamespace(key="ncclDevKernel_ReduceScatter_Sum_f32", self_device_time_total=12_500.0),
              SimpleNamespace(key="_fwd_kernel", self_device_time_total=40_000.0),
              SimpleNamespace(key="nvjet_sm90_tst_256x128", self_device_time_total=20_000.0)]
    prof = SimpleNamespace(key_averages=lambda: events)
    assert _profile_summary(prof, wall_ms=100.0) == {"wall_ms": 100.0, "compute_ms": 60.0, "nccl_ms": 42.5,
                                                     "not_compute_ms": 40.0}


def test_scaling_cpu_smoke_with_profile(tmp_path):
    """The strategies suite end to end on the CPU (one torchrun job), with the profiled extra step,
    two micro-batches per optimizer step."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "flash_dist.bench.scaling", "strategies", "--cpu-smoke",
                           "--impls", "flash_fsdp", "--worlds", "1", "--profile", "--warmup", "1", "--steps", "2",
                           "--accumulate", "2", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "strategies.json").read_text())
    assert len(rows) == 2 and all(r["error"] is None for r in rows), rows
    assert all(r["step_ms"] > 0 and r["profile"]["wall_ms"] > 0 for r in rows)
    for r in rows:
        assert r["accumulate"] == 2 and len(r["step_times_ms"]) == 3  # warm-up + timed optimizer steps
        assert r["tokens_per_s_per_gpu"] == pytest.approx(2 * r["seq"] / (r["step_ms"] / 1e3))
    assert "| tiny, 64 | flash_fsdp | 1 | 2 |" in (tmp_path / "strategies.md").read_text()


def test_timeline_gaps_counts_idle_time_once_across_overlapping_kernels():
    from flash_dist.bench.training import timeline_gaps

    # kernels 0-10 and 5-12 overlap (two streams); 12-15 idle; 15-20; 20-21 idle; 21-30
    span, idle, gaps = timeline_gaps([(15.0, 20.0), (0.0, 10.0), (5.0, 12.0), (21.0, 30.0)])
    assert (span, idle, gaps) == (30.0, 4.0, 2)
    assert timeline_gaps([]) == (0.0, 0.0, 0)


def test_idle_before_charges_each_gap_to_the_kernel_that_ends_it():
    from flash_dist.bench.training import idle_before

    # a 0-10, b 5-12 (overlapping: no gap), c 15-20 (3 idle), a 21-30 (1 idle), c 34-35 (4 idle)
    waits = idle_before([(15.0, 20.0, "c"), (0.0, 10.0, "a"), (5.0, 12.0, "b"), (21.0, 30.0, "a"),
                         (34.0, 35.0, "c")])
    assert waits == {"c": (7.0, 2), "a": (1.0, 1)}
    assert idle_before([]) == {}


def test_training_bench_rejects_a_bad_loss_chunk_size(capsys):
    from flash_dist.bench.training import main

    with pytest.raises(SystemExit):
        main(["--loss-chunk-size", "0"])
    assert "--loss-chunk-size: must be >= 1, got 0" in capsys.readouterr().err
