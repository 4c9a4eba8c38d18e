"""Where a stage runs: the repository root (also from DVC's temporary experiment workspaces),
the DVC experiment's name, the git revision, and the compile cache every stage shares."""

import os
import subprocess
from pathlib import Path

COMPILE_CACHE = ".cache/torchinductor"  # relative to the repository root


def repo_root() -> Path:
    """The project root: DVC_ROOT for stages (mapped back out of DVC's temporary
    experiment workspaces under .dvc/tmp/exps), else the working directory."""
    root = Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def experiment_name() -> str:
    """The DVC experiment a stage runs in (``DVC_EXP_NAME``, set by ``dvc exp run``), else ``workspace``."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def git_revision(cwd=None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def share_compile_cache() -> None:
    """Point inductor's on-disk cache (compiled graphs and kernels, ``TORCHINDUCTOR_CACHE_DIR``) at
    ``COMPILE_CACHE`` under the repository root, unless the user set it: every stage process, and
    every queued experiment (whose workspace is a temporary copy), then reuses what an earlier one
    compiled, so only the first process of a configuration pays the cold compile."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(repo_root() / COMPILE_CACHE))
