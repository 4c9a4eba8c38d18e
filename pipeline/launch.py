"""How many processes, and which GPUs, a stage that can run data-parallel (`train`, `sample`) uses.

**Every GPU of the node.** A stage started as one process (by DVC, or by hand) with several
GPUs visible relaunches itself under torch's elastic launcher, one process per GPU:
``python -m torch.distributed.run --standalone --nproc_per_node N <the same command>``; each
process then joins the process group (``ddpm.distributed``). One GPU, or a CPU, stays one process.
``DDPM_PROCESSES`` caps the number (``1``: never launch; on a CPU it asks for that many gloo
processes, which the tests use). The number of processes is no DVC param: the same global batch
gives the same model up to float summation order, so moving from 1 to 8 GPUs makes no stage stale.

**A share of the GPUs per experiment.** When several experiments run at once (``python -m pipeline
study run -j N`` sets ``DDPM_GPU_SHARES=N`` for DVC's queue workers; set it yourself for ``dvc queue
start -j N``), each stage process claims one of N disjoint shares of the visible GPUs: an exclusive
lock on ``<repo root>/.cache/gpu-shares/<k>.lock``, held until the process (and its launched
processes) exit, and ``CUDA_VISIBLE_DEVICES`` narrowed to that share. A process that finds every
share taken waits for one.

**srun.** Under ``srun`` with several tasks (``SLURM_STEP_NUM_TASKS`` > 1), the tasks are the processes:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` (the first node of the job) and
``MASTER_PORT`` (from the job id) are read from SLURM's environment, for torch's env://
rendezvous; nothing is launched.
"""

import fcntl
import os
import sys
import time
from pathlib import Path

PROCESSES = "DDPM_PROCESSES"  # at most this many processes per stage (on a CPU: this many gloo processes)
SHARES = "DDPM_GPU_SHARES"  # the visible GPUs split into this many shares, one per running experiment
CLAIMED = "DDPM_GPU_SHARE"  # set once a process holds a share: the processes it starts keep it
_HELD: list[int] = []  # the lock files of the claimed share, open for the life of the process


def _int_env(name: str, default: int) -> int:
    from ddpm.errors import InputError

    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        raise InputError(f"environment variable {name} must be a whole number, got {value!r}") from None
    if n < 1:
        raise InputError(f"environment variable {name} must be at least 1, got {value!r}")
    return n


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every NVIDIA GPU NVML finds
    (without initialising CUDA, so that the list can still be narrowed)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVIDIA driver (a CPU machine): no GPU
        return []


def shares(devices: list[str], n: int) -> list[list[str]]:
    """``devices`` split into ``n`` contiguous shares as equal as can be (the first ones larger); fewer
    shares than ``n`` when there are fewer devices (each share at least one device)."""
    n = max(1, min(n, len(devices))) if devices else 1
    size, extra = divmod(len(devices), n)
    out, start = [], 0
    for k in range(n):
        end = start + size + (k < extra)
        out.append(devices[start:end])
        start = end
    return out


def claim_share(root: Path, devices: list[str], n: int, poll: float = 1.0) -> tuple[int, list[str]]:
    """Wait for a free share of ``devices`` (split in ``n``) and hold it: (its index, its devices). The lock
    is an ``flock`` on ``root/.cache/gpu-shares/<k>.lock``, released when the process exits."""
    options = shares(devices, n)
    folder = root / ".cache" / "gpu-shares"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for k, share in enumerate(options):
            fd = os.open(folder / f"{k}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.set_inheritable(fd, True)  # held across exec (the launcher) as long as the stage runs
            _HELD.append(fd)
            return k, share
        time.sleep(poll)


def from_slurm() -> bool:
    """Under ``srun`` with several tasks and no torchrun: set torch's rendezvous variables from SLURM's;
    whether it did."""
    env = os.environ
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)  # set inside a job step (srun), not in a batch script
    if "WORLD_SIZE" in env or tasks <= 1 or "SLURM_PROCID" not in env:
        return False
    import subprocess

    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        first = nodes.split(",")[0]
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    env.setdefault("MASTER_ADDR", first)
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000))
    return True


def processes(device: str, gpus: list[str]) -> int:
    """How many processes a stage on ``device`` runs in: one per GPU of ``gpus`` (``auto``/``cuda``), at
    most ``DDPM_PROCESSES``; on a CPU (or one named GPU, ``cuda:N``) one, or ``DDPM_PROCESSES``."""
    cap = _int_env(PROCESSES, 0)
    if device == "cpu" or (device == "auto" and not gpus):
        return cap or 1
    if device.startswith("cuda:"):
        return 1
    return max(1, min(len(gpus), cap)) if cap else max(1, len(gpus))


def data_parallel(device: str, root: Path) -> None:
    """At the start of a stage that can run data-parallel: take this experiment's share of the GPUs, and
    relaunch the stage as one process per GPU of it (or as ``DDPM_PROCESSES`` CPU processes) unless it
    runs inside such a launch already (torchrun's WORLD_SIZE, or srun's tasks)."""
    if "WORLD_SIZE" in os.environ or from_slurm():
        return
    gpus = visible_gpus() if device != "cpu" else []
    n_shares = _int_env(SHARES, 1)
    if gpus and n_shares > 1 and CLAIMED not in os.environ:
        k, gpus = claim_share(root, gpus, n_shares)
        os.environ.update({"CUDA_VISIBLE_DEVICES": ",".join(gpus), CLAIMED: str(k)})
        print(f"gpus: share {k + 1} of {n_shares}: CUDA_VISIBLE_DEVICES={','.join(gpus)}", flush=True)
    n = processes(device, gpus)
    if n > 1:
        relaunch(n)


def relaunch(n: int) -> None:
    """Replace this process by torch's elastic launcher running the same command in ``n`` processes."""
    command = list(sys.orig_argv[1:])
    if command[:1] != ["-m"]:  # not `python -m <module> ...` (e.g. in-process under a test runner)
        from ddpm.errors import InputError

        raise InputError(f"cannot launch {n} processes from {' '.join(sys.orig_argv)}: run the stage as "
                         "`python -m pipeline.stages.<stage>` (or set DDPM_PROCESSES=1)")
    print(f"launch: {n} processes (python -m torch.distributed.run --standalone --nproc_per_node {n})", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", str(n), *command])
