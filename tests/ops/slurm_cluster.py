"""A real SLURM cluster on this machine, for tests: munged + slurmctld + two slurmd (nodes n1, n2).

Everything (munge key and socket, slurm.conf, state, spool, logs, pid files) lives under one
temporary folder; the daemons run in the foreground as children of this process and are stopped
by PID. Debian's packages (slurmctld, slurmd, slurm-client, munge) are apt-installed when missing.
Settings from STACK.md: root without cgroups (proctrack/linuxproc, task/none), each emulated node
on its own port with NodeAddr=127.0.0.1, and the requeue latency cut from ~2 min to ~10 s
(cred_expire=5, sched_interval=2, bf_interval=2).

    with LocalSlurm(tmp_path) as slurm:
        job = slurm.sbatch(["--nodes=2", "script.sbatch", ...], env=...)
        slurm.wait_state(job, {"COMPLETED"})
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import socket
import subprocess
import time
from typing import Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel"]


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def ensure_installed() -> Optional[str]:
    """apt-get install the packages when a binary is missing; None when ready, else why not."""
    if not missing_binaries():
        return None
    if shutil.which("apt-get") is None:
        return f"SLURM binaries {missing_binaries()} missing and apt-get is unavailable"
    if os.geteuid() != 0:
        return f"SLURM binaries {missing_binaries()} missing and apt-get needs root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            return f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}"
    return None if not missing_binaries() else f"still missing after apt-get: {missing_binaries()}"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, root: pathlib.Path, nodes=("n1", "n2"), cpus_per_node: int = 1):
        self.root = pathlib.Path(root)
        self.nodes = list(nodes)
        self.cpus = cpus_per_node
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- set-up ---------------------------------------------------------------------------------
    def _write_files(self) -> None:
        r = self.root
        for d in ("munge", "state", "log", "run", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
                          f"State=UNKNOWN" for n, p in zip(self.nodes, node_ports))
        self.conf.write_text(f"""\
ClusterName=rlptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start(self, timeout: float = 60) -> "LocalSlurm":
        self._write_files()
        r = self.root
        self._spawn("munged", [_sbin("munged"), "-F", "-f", f"--socket={r}/munge/munge.socket",
                               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/run/munged.pid",
                               f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"])
        self._wait_for(lambda: (r / "munge" / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._wait_for(lambda: self._run(["scontrol", "ping"]).returncode == 0, timeout, "slurmctld")
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [_sbin("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        self._wait_for(self._nodes_idle, timeout, f"nodes {self.nodes} idle")
        return self

    def _nodes_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return all(states.get(n, "").startswith("idle") for n in self.nodes)

    def _wait_for(self, pred, timeout: float, what: str) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            dead = [k for k, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"SLURM daemon(s) {dead} exited while waiting for {what}:\n{self.logs()}")
            if pred():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    def stop(self) -> None:
        """Stop the daemons we started, by PID (slurmd, slurmctld, munged), SIGKILL after 15 s."""
        for name in [k for k in self.procs if k.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- jobs -----------------------------------------------------------------------------------
    def _run(self, cmd: list[str], env: Optional[dict] = None, check: bool = False, **kw):
        return subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=60,
                              check=check, **kw)

    def sbatch(self, args: list[str], env: Optional[dict] = None, cwd=None) -> str:
        r = self._run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {r.stderr.strip()}\n{self.logs()}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self._run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: str, states: set[str], timeout: float = 300) -> dict[str, str]:
        t0 = time.time()
        info = {}
        while time.time() - t0 < timeout:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise RuntimeError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}\n{self.logs()}")

    def logs(self, n: int = 15) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)
