"""A real Slurm cluster of two nodes on this one machine, for the Slurm tests.

munged, slurmctld and two slurmd daemons (``slurmd -N n1`` / ``-N n2``, Debian's slurmd is built
with MULTIPLE_SLURMD) run as root with every file (config, sockets, pid files, logs, state) under
one folder, ``$FLASH_DIST_SLURM_DIR`` or ``/tmp/flash-dist-slurm``. Nothing is written under /etc
or /var: clients find the cluster through ``SLURM_CONF``.

Starting is idempotent: a cluster whose daemons answer is reused. Stopping ends only the processes
named in this folder's pid files. Also usable by hand::

    python -m tests.slurm.cluster start    # prints the SLURM_CONF=... line to export
    python -m tests.slurm.cluster status
    python -m tests.slurm.cluster stop
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("FLASH_DIST_SLURM_DIR", "/tmp/flash-dist-slurm"))
NODES = {"n1": 17001, "n2": 17002}  # node name -> slurmd port
CTLD_PORT = int(os.environ.get("FLASH_DIST_SLURMCTLD_PORT", "16817"))
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")

# Requeued jobs wait cred_expire seconds before they may start again (default 120 s); KillWait is the
# time between SIGTERM and SIGKILL when a job is cancelled or requeued (default 30 s).
SLURM_CONF = """\
ClusterName=flashdist
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
MailProg=/bin/true
PlugStackConfig={root}/plugstack.conf
{nodes}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
NODE_LINE = ("NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
             "RealMemory=1000 State=UNKNOWN")


def missing_programs() -> list[str]:
    """The Slurm/munge programs these tests need that are not on PATH."""
    return [p for p in PROGRAMS if shutil.which(p) is None]


class Cluster:
    """The two-node cluster under ``root``; ``env`` is what clients (sbatch, squeue, ...) need."""

    def __init__(self, root: Path | str = DEFAULT_DIR):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.started_here = False

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- queries ---------------------------------------------------------------------------------
    def _pid(self, name: str) -> int | None:
        path = self.root / "run" / f"{name}.pid"
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def pid_names(self) -> list[str]:
        return ["munged", "slurmctld", *(f"slurmd-{n}" for n in NODES)]

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def idle_nodes(self) -> set[str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        return {line.split()[0] for line in out.stdout.splitlines()
                if len(line.split()) == 2 and line.split()[1] in ("idle", "mix", "alloc")}

    def is_up(self) -> bool:
        if not self.conf.exists() or any(self._pid(n) is None for n in self.pid_names()):
            return False
        return self.run("scontrol", "ping", check=False).returncode == 0 and self.idle_nodes() == set(NODES)

    # -- start / stop ----------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "Cluster":
        """Start the daemons unless this folder's cluster is already up; wait until both nodes are idle."""
        missing = missing_programs()
        if missing:
            raise RuntimeError(f"Slurm programs not found on PATH: {', '.join(missing)} "
                               "(apt-get install slurm-wlm munge)")
        if self.is_up():
            return self
        self.stop()  # leftovers of a half-started cluster
        for sub in ("munge", "state", "run", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o600)
        (self.root / "plugstack.conf").write_text("")
        cpus = os.cpu_count() or 1
        nodes = "\n".join(NODE_LINE.format(name=n, host=socket.gethostname(), port=p, cpus=cpus)
                          for n, p in NODES.items())
        self.conf.write_text(SLURM_CONF.format(root=self.root, ctld_port=CTLD_PORT, nodes=nodes,
                                               node_names=",".join(NODES)))
        munged = ["munged", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                  f"--pid-file={self.root}/run/munged.pid", f"--log-file={self.root}/log/munged.log",
                  f"--seed-file={self.root}/munge/munged.seed"]
        self._daemon(munged, "munged")
        self._daemon(["slurmctld", "-f", str(self.conf)], "slurmctld")
        for name in NODES:
            self._daemon(["slurmd", "-f", str(self.conf), "-N", name], f"slurmd-{name}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_up():
                self.started_here = True
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm cluster in {self.root} did not come up in {timeout:.0f} s; "
                           f"nodes idle: {sorted(self.idle_nodes())}; logs: {self.root / 'log'}\n"
                           + self.logs_tail())

    def _daemon(self, cmd: list[str], name: str) -> None:
        """Run a daemon that forks into the background and wait for its pid file."""
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}\n"
                               + self.logs_tail())
        deadline = time.monotonic() + 20
        while self._pid(name) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no pid file in {self.root / 'run'}\n" + self.logs_tail())
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job of this cluster, then end the daemons named in its pid files."""
        if self._pid("slurmctld") is not None and self.conf.exists():
            self.run("scancel", "--full", "--user", str(os.getuid()), check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                out = self.run("squeue", "-h", "-o", "%i %T", check=False)
                if out.returncode != 0 or not any(
                        s in out.stdout for s in ("RUNNING", "COMPLETING", "PENDING", "REQUEUE", "CONFIGURING")):
                    break
                time.sleep(0.5)
        for name in reversed(self.pid_names()):  # slurmds, slurmctld, then munged
            pid = self._pid(name)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._pid(name) == pid and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._pid(name) == pid:
                os.kill(pid, signal.SIGKILL)
        self.started_here = False

    # -- jobs ------------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the job record is gone); no accounting needed."""
        res = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if res.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", res.stdout))

    def wait(self, job_id: str, until, timeout: float, what: str = "the end") -> dict[str, str]:
        """Poll the job until ``until(info)`` holds; TimeoutError (after cancelling the job) otherwise."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id}: {what} not reached in {timeout:.0f} s (state {info.get('JobState')})")

    def wait_until_done(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until the job has ended for good (a requeued job passes through PENDING again)."""
        return self.wait(job_id, lambda i: not i or i.get("JobState") in FINAL_STATES, timeout)

    def logs_tail(self, lines: int = 15) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log} ---\n" + "\n".join(text))
        return "\n".join(parts)


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "status"
    cluster = Cluster()
    if what == "start":
        cluster.start()
        print(f"SLURM_CONF={cluster.conf}")
    elif what == "stop":
        cluster.stop()
    elif what == "status":
        up = cluster.is_up()
        print(f"{'up' if up else 'down'}: {cluster.root}")
        return 0 if up else 1
    else:
        print(f"usage: python -m tests.slurm.cluster start|stop|status (got {what!r})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
