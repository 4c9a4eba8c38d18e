"""A real single-node SLURM cluster for the tests (Debian's slurm-wlm and munge, which `make test`
installs): munged (shared, started once if it is not running), slurmctld and slurmd with a
`slurm.conf` of their own in a temporary folder, on free ports of 127.0.0.1, stopped by their PID
files. Jobs' final states come from SLURM's job-completion log (``sacct -c``): no accounting
database is needed."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("sbatch", "squeue", "sacct", "scancel", "srun", "slurmctld", "slurmd", "munged")


def unavailable() -> str | None:
    """Why no cluster can start here (None when one can)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing: apt-get install slurm-wlm munge; make test does)"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge() -> subprocess.Popen | None:
    """Start munged unless one runs (it serves every cluster of the machine)."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return None
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)
    for _ in range(50):
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return None
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


CONF = """ClusterName=tests
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
SlurmdPort={slurmd}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/jobcomp.txt
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=tests Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def start(folder: Path) -> dict:
    """Start a cluster whose files live in ``folder``; the environment its clients need (``SLURM_CONF``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    _munge()
    conf = folder / "slurm.conf"
    conf.write_text(CONF.format(host=socket.gethostname().split(".")[0], ctld=_free_port(), slurmd=_free_port(),
                                d=folder, cpus=os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    for _ in range(100):
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() in ("idle", "mixed", "allocated"):
            return env
        time.sleep(0.2)
    stop(folder)
    raise RuntimeError(f"the SLURM node did not come up: {(folder / 'slurmctld.log').read_text()[-2000:]}")


def stop(folder: Path) -> None:
    """Stop slurmd and slurmctld (by their PID files) and whatever jobs they ran."""
    for daemon in ("slurmd", "slurmctld"):
        pid_file = folder / f"{daemon}.pid"
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ProcessLookupError, ValueError):
                pass
    time.sleep(0.5)
