"""Multi-GPU training benchmarks: strategies (FSDP2 / ZeRO-3, ours vs Lightning's) and context parallelism.

Two suites, each run from one command on one node; the driver starts every measurement as its
own ``torchrun`` job on a subset of the GPUs (jobs on disjoint GPUs run side by side)::

    python -m flash_dist.bench.scaling strategies --worlds 1,2,4 --out bench_out
    python -m flash_dist.bench.scaling cp --cp 1,2,4 --out bench_out

``strategies``: a Hugging Face ``GPT2LMHeadModel`` (``attn_implementation="sdpa"``) in one
LightningModule, trained by ``Trainer(strategy=...)`` with

* ``flash_fsdp``: ``FlashStrategy(sharding="fsdp")``: our attention, FSDP2 per block;
* ``flash_deepspeed_stage_3``: ``FlashStrategy(sharding="deepspeed", deepspeed_stage=3)``;
* ``fsdp``: Lightning's ``FSDPStrategy`` wrapping each ``GPT2Block`` (HF sdpa attention);
* ``deepspeed_stage_3``: Lightning's ``DeepSpeedStrategy(stage=3)`` (HF sdpa attention).

All with ``precision="bf16-mixed"``, per-block activation checkpointing (ours through the
strategy, the baselines through Lightning's policy or HF's ``gradient_checkpointing_enable``),
AdamW, one sequence per GPU per micro-batch, one micro-batch per optimizer step unless
``--accumulate N`` (weak scaling: tokens per GPU fixed as GPUs are added).

``cp``: flash-dist's GPT-2 (``flash-dist train``'s :class:`~flash_dist.train.GPT2Module`) with
``FlashStrategy(sharding="fsdp", context_parallel=N, activation_checkpointing=True)``: every
rank holds ``S / N`` tokens of one sequence. Tokens/s per GPU at fixed tokens per GPU for each
N, and the longest sequence that trains (one full step) at each N.

``--accumulate N`` (both suites) trains with ``Trainer(accumulate_grad_batches=N)``: a step is
then one optimizer step of N micro-batches (timed from the start of its first micro-batch to the
end of its last; warm-up, timed and profiled steps count optimizer steps), and a GPU processes
``N × S / CP`` tokens per step (the ``cp`` suite's longest-sequence probes stay at one
micro-batch). With ``flash_fsdp`` the first N - 1 micro-batches skip the
gradient reduce-scatter (``FlashStrategy(accumulation_no_sync=...)``, on by default; turn it off
with ``--strategy-options '{"accumulation_no_sync": false}'`` to compare).

Reported per run: step time (median of the timed steps, slowest rank), tokens/s per GPU, MFU
(model FLOPs of :meth:`flash_dist.models.GPT2.flops_per_token`: ``6N + 12 L d S / 2``, no
recomputation counted, against ``--peak-tflops``), peak memory (largest rank), or the error
(``OOM``, timeout). ``--cpu-smoke`` runs tiny shapes on the CPU (gloo, Triton interpreter) to
check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STRATEGY_IMPLS = ("flash_fsdp", "flash_fsdp_compile", "fsdp", "flash_deepspeed_stage_3", "deepspeed_stage_3")
DEFAULT_CASES = "small:8192,small:32768,medium:8192,medium:32768"


@dataclass
class Case:
    impl: str
    size: str
    seq: int
    world: int
    cp: int = 1
    accumulate: int = 1
    step_ms: float | None = None
    tokens_per_s_per_gpu: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    step_times_ms: list = field(default_factory=list)
    profile: dict | None = None
    error: str | None = None


# ----------------------------------------------------------------------------- worker (one torchrun job)

def _hf_module(size: str, seq: int, impl: str, cpu: bool):
    import lightning as L
    import torch

    class HFGPT2(L.LightningModule):
        """The user's unmodified module: HF GPT-2 with sdpa attention, built in configure_model."""

        def __init__(self):
            super().__init__()
            self.model = None

        def configure_model(self):
            if self.model is not None:
                return
            from transformers import GPT2Config, GPT2LMHeadModel

            from flash_dist.models.gpt2 import GPT2Config as Ours

            hf = Ours.from_name(size, block_size=seq).to_hf_config()
            self.model = GPT2LMHeadModel(GPT2Config(**hf, attn_implementation="eager" if cpu else "sdpa"))
            if impl == "deepspeed_stage_3":  # Lightning's DeepSpeed strategy has no checkpointing policy
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def training_step(self, batch, _):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    return HFGPT2()


def _cp_module(size: str, seq: int):
    from flash_dist.config import RunConfig
    from flash_dist.train import GPT2Module

    cfg = RunConfig()
    cfg.model.name, cfg.model.block_size = size, seq
    cfg.data.seq_len, cfg.data.batch_size, cfg.data.path = seq, 1, "-"
    cfg.optim.warmup_steps = 1

    class Module(GPT2Module):
        def training_step(self, batch, batch_idx):
            return self._loss({"input_ids": batch, "labels": batch})

    return Module(cfg)


def _strategy(impl: str, cp: int, cpu: bool, options: dict | None = None):
    from flash_dist.strategy import FlashStrategy

    backend = {"process_group_backend": "gloo"} if cpu else {}
    options = options or {}
    if impl in ("flash_fsdp", "flash_fsdp_compile"):
        return FlashStrategy(sharding="fsdp", activation_checkpointing=True, context_parallel=cp,
                             compile=impl.endswith("_compile"), **options, **backend)
    if impl == "flash_deepspeed_stage_3":
        return FlashStrategy(sharding="deepspeed", deepspeed_stage=3, activation_checkpointing=True,
                             logging_level=40, **options, **backend)
    if impl == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        return FSDPStrategy(auto_wrap_policy={GPT2Block}, activation_checkpointing_policy={GPT2Block}, **backend)
    if impl == "deepspeed_stage_3":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=3, logging_level=40, **backend)
    raise ValueError(f"--impl must be one of {STRATEGY_IMPLS}, got {impl!r}")


def _profile_summary(prof, wall_ms: float) -> dict:
    """GPU time of one profiled step split into collectives (NCCL kernels) and the rest."""
    comm = compute = 0.0
    for e in prof.key_averages():
        t = e.self_device_time_total / 1e3
        if "nccl" in e.key.lower():
            comm += t
        else:
            compute += t
    return {"wall_ms": round(wall_ms, 2), "compute_ms": round(compute, 2), "nccl_ms": round(comm, 2),
            "not_compute_ms": round(wall_ms - compute, 2)}


def _step_timer(warmup: int, steps: int, cpu: bool, profile: bool = False):
    """A callback timing whole optimizer steps: from the start of a step's first micro-batch to the
    end of its last (the one after which ``global_step`` has advanced), so with
    ``accumulate_grad_batches=N`` one time covers N micro-batches. ``times`` holds the warm-up and
    timed steps; with ``profile`` the step after them is profiled instead (``profile`` summary)."""
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        def __init__(self):
            self.times, self.t0, self.prof, self.profile = [], 0.0, None, None
            self.step_started_at: int | None = None  # global_step when the running step's first micro-batch began

        def _sync(self):
            if not cpu:
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, *args):
            if self.step_started_at is not None:  # a later micro-batch of the same optimizer step
                return
            self._sync()
            self.step_started_at = trainer.global_step
            if profile and len(self.times) == warmup + steps:  # one extra, untimed, profiled step
                from torch.profiler import ProfilerActivity
                # the CPU smoke test has no GPU activity to record
                self.prof = torch.profiler.profile(activities=[ProfilerActivity.CPU if cpu else ProfilerActivity.CUDA])
                self.prof.start()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step_started_at:  # accumulating: the optimizer has not stepped yet
                return
            self.step_started_at = None
            self._sync()
            ms = (time.perf_counter() - self.t0) * 1e3
            if self.prof is not None:
                self.prof.stop()
                self.profile, self.prof = _profile_summary(self.prof, ms), None
                return
            self.times.append(ms)
            if len(self.times) == warmup and not cpu:
                torch.cuda.reset_peak_memory_stats()

    return StepTimer()


def _run_case(case: Case, warmup: int, steps: int, cpu: bool, peak_tflops: float,
              options: dict | None = None, profile: bool = False) -> Case:
    import lightning as L
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Dataset

    from flash_dist.models.gpt2 import GPT2, GPT2Config

    class Tokens(Dataset):
        """Seeded random tokens; index i is the same sequence on every rank (a CP group shares it)."""

        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            return torch.randint(0, 50257, (case.seq,), generator=torch.Generator().manual_seed(i))

    cp_run = case.impl == "flash_cp"
    module = _cp_module(case.size, case.seq) if cp_run else _hf_module(case.size, case.seq, case.impl, cpu)
    strategy = _strategy("flash_fsdp" if cp_run else case.impl, case.cp, cpu,
                         options if case.impl.startswith("flash") else None)
    timer = _step_timer(warmup, steps, cpu, profile)
    trainer = L.Trainer(accelerator="cpu" if cpu else "cuda", devices=case.world, strategy=strategy,
                        precision="32-true" if cpu else "bf16-mixed", max_steps=warmup + steps + int(profile),
                        max_epochs=-1, accumulate_grad_batches=case.accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=not cp_run, callbacks=[timer])
    if not cpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    loader = DataLoader(Tokens(), batch_size=1)
    try:
        trainer.fit(module, train_dataloaders=loader)
    except torch.OutOfMemoryError:
        case.error = "OOM"
    timed = timer.times[warmup:] if len(timer.times) > warmup else timer.times
    ok = torch.tensor([0.0 if case.error else 1.0, statistics.median(timed) if timed else 0.0,
                       torch.cuda.max_memory_allocated() / 2**30 if not cpu else 0.0], dtype=torch.float64,
                      device="cpu" if cpu else "cuda")
    if dist.is_initialized():
        worst = ok.clone()
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        dist.all_reduce(ok[:1], op=dist.ReduceOp.MIN)
        ok[1:] = worst[1:]
    if ok[0].item() == 1.0 and timed:
        case.step_ms, case.peak_gib = ok[1].item(), (ok[2].item() if not cpu else None)
        case.step_times_ms = [round(t, 2) for t in timer.times]
        tokens_per_gpu = case.accumulate * case.seq / case.cp  # per optimizer step
        case.tokens_per_s_per_gpu = tokens_per_gpu / (case.step_ms * 1e-3)
        with torch.device("meta"):
            flops = GPT2(GPT2Config.from_name(case.size, block_size=case.seq)).flops_per_token(case.seq)
        case.mfu = flops * case.tokens_per_s_per_gpu / (peak_tflops * 1e12)
        if timer.profile:
            case.profile = timer.profile
    elif not case.error:
        case.error = "failed on another rank"
    del trainer, module, strategy
    if not cpu:
        torch.cuda.empty_cache()
    return case


def worker(a: argparse.Namespace) -> int:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    out: list[dict] = []
    for spec in a.cases.split(","):
        size, seq = spec.split(":")
        case = Case(a.impl, size, int(seq), world, cp=a.cp, accumulate=a.accumulate)
        t0 = time.perf_counter()
        try:
            _run_case(case, a.warmup, a.steps, a.cpu_smoke, a.peak_tflops, json.loads(a.strategy_options),
                      a.profile)
        except Exception as e:  # noqa: BLE001  (one failed case must not lose the others' numbers)
            case.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if rank == 0:
            print(f"[{a.impl} world={world} cp={a.cp} accumulate={a.accumulate}] {size} S={seq}: "
                  + (case.error or f"{case.step_ms:.1f} ms/step, {case.tokens_per_s_per_gpu:,.0f} tok/s/GPU, "
                     f"MFU {case.mfu:.1%}, peak {case.peak_gib or 0:.1f} GiB"
                     + (f", profiled step {case.profile}" if case.profile else ""))
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            out.append(asdict(case))
            Path(a.json).write_text(json.dumps(out, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- driver

@dataclass
class Job:
    world: int
    args: list[str]
    json: Path
    label: str


def _launch(job: Job, gpus: list[int], cpu: bool, port: int, log_dir: Path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cpu:
        env["TRITON_INTERPRET"] = "1"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={job.world}",
           f"--master-port={port}", "-m", "flash_dist.bench.scaling", "worker", "--json", str(job.json), *job.args]
    log = open(log_dir / f"{job.label}.log", "w")  # noqa: SIM115  (closed when the job ends)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log


def run_jobs(jobs: list[Job], n_gpus: int, cpu: bool, timeout_s: float, log_dir: Path) -> list[dict]:
    """Run the jobs, each on its own GPUs, as many at once as the GPUs allow (in list order)."""
    import signal

    free, running, rows, port = list(range(n_gpus)), [], [], 29600
    pending = list(jobs)
    while pending or running:
        while pending and len(free) >= pending[0].world:
            job = pending.pop(0)
            gpus, free = free[:job.world], free[job.world:]
            port += 1
            proc, log = _launch(job, gpus, cpu, port, log_dir)
            running.append((job, gpus, proc, log, time.monotonic()))
            print(f"started {job.label} on GPUs {gpus}", flush=True)
        time.sleep(1.0)
        for item in list(running):
            job, gpus, proc, log, t0 = item
            if proc.poll() is None and time.monotonic() - t0 < timeout_s:
                continue
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
            running.remove(item)
            free = sorted(free + gpus)
            got = json.loads(job.json.read_text()) if job.json.exists() else []
            text = (log_dir / f"{job.label}.log").read_text()
            print("\n".join(line for line in text.splitlines() if line.startswith("[")), flush=True)
            if proc.returncode != 0:
                print(f"{job.label}: exit {proc.returncode}; last lines:\n" + "\n".join(text.splitlines()[-8:]),
                      flush=True)
            rows.extend(got)
            done = {(r["size"], r["seq"]) for r in got}
            for spec in _arg(job.args, "--cases").split(","):
                size, seq = spec.split(":")
                if (size, int(seq)) not in done:  # the job died (or timed out) before this case
                    reason = "timeout" if time.monotonic() - t0 >= timeout_s else f"exit {proc.returncode}"
                    rows.append(asdict(Case(_arg(job.args, "--impl"), size, int(seq), job.world,
                                            cp=int(_arg(job.args, "--cp") or 1),
                                            accumulate=int(_arg(job.args, "--accumulate") or 1), error=reason)))
    return rows


def _arg(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "—" if x is None else format(x, spec) + suffix


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def strategies_table(rows: list[dict], header: str) -> str:
    """The strategies suite's Markdown table; an ``accum.`` column (micro-batches per optimizer
    step) when any row accumulates. Weak-scaling efficiency compares with the one-GPU row of the
    same strategy, case and accumulation."""
    def acc(r: dict) -> int:
        return r.get("accumulate", 1)  # rows written before the field existed

    show_acc = any(acc(r) > 1 for r in rows)
    base = {(r["impl"], r["size"], r["seq"], acc(r)): r for r in rows if r["world"] == 1 and r["step_ms"]}
    lines = [header, "",
             "| model, context | strategy | GPUs |" + (" accum. |" if show_acc else "")
             + " step ms | tok/s per GPU | MFU | peak GiB | weak-scaling eff. |",
             "|---|---|---|" + ("---|" if show_acc else "") + "---|---|---|---|---|"]
    order = {k: i for i, k in enumerate(STRATEGY_IMPLS)}
    for r in sorted(rows, key=lambda r: (r["size"], r["seq"], order.get(r["impl"], 9), acc(r), r["world"])):
        one = base.get((r["impl"], r["size"], r["seq"], acc(r)))
        eff = (r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
               if one and r["tokens_per_s_per_gpu"] and r["world"] > 1 else None)
        cells = (f"{_fmt(r['step_ms'], '.0f')} | {_fmt(r['tokens_per_s_per_gpu'], ',.0f')} | "
                 f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f', '%')} | {_fmt(r['peak_gib'], '.1f')} | "
                 f"{_fmt(eff and 100 * eff, '.0f', '%')}") if not r["error"] else f"{r['error']} | | | | |"
        accum = f" {acc(r)} |" if show_acc else ""
        lines.append(f"| {r['size']}, {_tokens(r['seq'])} | {r['impl']} | {r['world']} |{accum} {cells} |")
    return "\n".join(lines)


def cp_table(rows: list[dict], header: str) -> str:
    fixed = [r for r in rows if not r.get("probe")]
    base = next((r for r in fixed if r["cp"] == 1 and r["step_ms"]), None)
    lines = [header, "", "Fixed tokens per GPU:", "",
             "| CP | sequence | tokens per GPU | step ms | tok/s per GPU | vs CP=1 | MFU | vs CP=1 (MFU) | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(fixed, key=lambda r: r["cp"]):
        if r["error"]:
            lines.append(f"| {r['cp']} | {r['seq']} | {r['seq'] // r['cp']} | {r['error']} | | | | | |")
            continue
        rel = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else None
        rel_mfu = r["mfu"] / base["mfu"] if base else None
        lines.append(f"| {r['cp']} | {r['seq']} | {r['seq'] // r['cp']} | {r['step_ms']:.0f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {_fmt(rel and 100 * rel, '.0f', '%')} | "
                     f"{100 * r['mfu']:.1f}% | "
                     f"{_fmt(rel_mfu and 100 * rel_mfu, '.0f', '%')} | {_fmt(r['peak_gib'], '.1f')} |")
    probes = [r for r in rows if r.get("probe")]
    if probes:
        lines += ["", "Longest sequence (one full training step, first step's time):", "",
                  "| CP | sequence | tokens per GPU | result | step s | peak GiB |", "|---|---|---|---|---|---|"]
        for r in sorted(probes, key=lambda r: (r["cp"], r["seq"])):
            res = r["error"] or "trains"
            step = _fmt(r["step_times_ms"][0] / 1e3 if r["step_times_ms"] else None, ".1f")
            lines.append(f"| {r['cp']} | {r['seq']} | {r['seq'] // r['cp']} | {res} | {step} "
                         f"| {_fmt(r['peak_gib'], '.1f')} |")
    return "\n".join(lines)


def _header(a: argparse.Namespace, what: str) -> str:
    import torch

    card = "cpu" if a.cpu_smoke else torch.cuda.get_device_name()
    accumulate = f" of {a.accumulate} micro-batches" if a.accumulate > 1 else ""
    return (f"{what}: {card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
            f"warmup {a.warmup} + {a.steps} timed steps{accumulate}, bf16-mixed, AdamW, activation checkpointing, "
            f"peak {a.peak_tflops:g} TFLOP/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flash_dist.bench.scaling", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run on one node; see the module docstring for what each suite runs.")
    sub = p.add_subparsers(dest="suite", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--warmup", type=int, default=2, help="untimed steps first (autotuning, allocator)")
    common.add_argument("--steps", type=int, default=4, help="timed steps")
    common.add_argument("--accumulate", type=int, default=1,
                        help="micro-batches per optimizer step (Trainer accumulate_grad_batches); a timed step is "
                             "one optimizer step")
    common.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    common.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (gloo, interpreter)")
    common.add_argument("--strategy-options", default="{}",
                        help="JSON of extra FlashStrategy arguments for the flash_* impls, "
                             "e.g. '{\"reshard_after_forward\": false}'")
    common.add_argument("--profile", action="store_true",
                        help="one extra profiled step per case: GPU time in NCCL kernels, in the rest, "
                             "and the step's wall time")
    s = sub.add_parser("strategies", parents=[common], help="FSDP2 / ZeRO-3, ours vs Lightning's, weak scaling")
    s.add_argument("--worlds", default="1,2,4", help="GPU counts (1 is the weak-scaling baseline)")
    s.add_argument("--impls", default=None,
                   help=f"comma-separated, from {', '.join(STRATEGY_IMPLS)} (default: all; with --cpu-smoke "
                        "only ours: Lightning's FSDP and DeepSpeed need GPUs)")
    s.add_argument("--cases", default=DEFAULT_CASES, help="model:context pairs")
    s.add_argument("--timeout-s", type=float, default=420, help="per job (one impl at one GPU count)")
    s.add_argument("--out", default="bench_out")
    c = sub.add_parser("cp", parents=[common], help="context parallelism: throughput and longest sequence")
    c.add_argument("--cp", default="1,2,4", help="context-parallel sizes")
    c.add_argument("--size", default="small")
    c.add_argument("--tokens-per-gpu", type=int, default=16384)
    c.add_argument("--longest", default="262144@1,524288@2,1048576@4",
                   help="SEQ@CP probes: one training step each (comma-separated; empty: none)")
    c.add_argument("--timeout-s", type=float, default=420)
    c.add_argument("--out", default="bench_out")
    w = sub.add_parser("worker", parents=[common], help="(internal) one torchrun job")
    w.add_argument("--impl", required=True)
    w.add_argument("--cases", required=True)
    w.add_argument("--cp", type=int, default=1)
    w.add_argument("--json", required=True)
    a = p.parse_args(argv)
    if a.accumulate < 1:
        p.error(f"--accumulate must be >= 1, got {a.accumulate}")
    if a.suite == "worker":
        return worker(a)

    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    timing = ["--warmup", str(a.warmup), "--steps", str(a.steps), "--peak-tflops", str(a.peak_tflops),
              "--accumulate", str(a.accumulate)]
    timing += ["--cpu-smoke"] if a.cpu_smoke else []
    timing += ["--strategy-options", a.strategy_options] + (["--profile"] if a.profile else [])
    n_gpus = 4 if a.cpu_smoke else __import__("torch").cuda.device_count()
    jobs: list[Job] = []
    if a.cpu_smoke and a.suite == "cp":
        a.size = "tiny"
    if a.suite == "strategies":
        cases = "tiny:64,tiny:128" if a.cpu_smoke else a.cases
        impls = a.impls or ("flash_fsdp,flash_deepspeed_stage_3" if a.cpu_smoke else ",".join(STRATEGY_IMPLS))
        for world in (int(x) for x in a.worlds.split(",")):
            for impl in impls.split(","):
                label = f"{impl}-w{world}"
                job_args = ["--impl", impl, "--cases", cases, *timing]
                jobs.append(Job(world, job_args, out / "logs" / f"{label}.json", label))
    else:
        tokens = 64 if a.cpu_smoke else a.tokens_per_gpu
        for cp in (int(x) for x in a.cp.split(",") if x):
            label = f"cp{cp}"
            jobs.append(Job(cp, ["--impl", "flash_cp", "--cp", str(cp), "--cases", f"{a.size}:{tokens * cp}", *timing],
                            out / "logs" / f"{label}.json", label))
        for spec in filter(None, ("256@1,512@2" if a.cpu_smoke else a.longest).split(",")):
            seq, cp = (int(x) for x in spec.split("@"))
            label = f"longest-cp{cp}-{seq}"
            jobs.append(Job(cp, ["--impl", "flash_cp", "--cp", str(cp), "--cases", f"{a.size}:{seq}",
                                 "--warmup", "0", "--steps", "1", "--peak-tflops", str(a.peak_tflops),
                                 *(["--cpu-smoke"] if a.cpu_smoke else [])],
                            out / "logs" / f"{label}.json", label))
    jobs = [j for j in jobs if j.world <= n_gpus]
    rows = run_jobs(jobs, n_gpus, a.cpu_smoke, a.timeout_s, out / "logs")
    if a.suite == "strategies":
        table = strategies_table(rows, _header(a, "GPT-2 (HF) training, strategies"))
    else:
        probe_keys = {(int(_arg(j.args, "--cp")), int(_arg(j.args, "--cases").split(":")[1]))
                      for j in jobs if j.label.startswith("longest")}
        for r in rows:
            r["probe"] = (r["cp"], r["seq"]) in probe_keys
        table = cp_table(rows, _header(a, f"GPT-2 {a.size} context parallelism (ring, zigzag, FSDP2)"))
    (out / f"{a.suite}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{a.suite}.md").write_text(table + "\n")
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
