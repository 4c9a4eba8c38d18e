"""`dvc plots show` draws its charts offline: the page DVC writes uses the repository's template
(``plots.html_template`` in .dvc/config, vendor/vega/plots.html), with Vega, Vega-Lite and
vega-embed inlined, and loads no script from anywhere (DVC's own page takes all three from
cdn.jsdelivr.net). Checked on a small DVC project with this repository's .dvc/config, plot
templates and page template, and a CSV plot drawn with each of them."""

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def vendor_script():
    spec = importlib.util.spec_from_file_location("vendor_vega", REPO / "scripts" / "vendor_vega.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project(root: Path) -> Path:
    """A DVC project (no git) with this repository's .dvc/config and templates and three plots."""
    root.mkdir()
    env = dvc_env()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    found = re.search(r"^\s*html_template\s*=\s*(\S+)", (REPO / ".dvc" / "config").read_text(), flags=re.M)
    assert found, ".dvc/config sets no plots.html_template: DVC's own page loads Vega from a CDN"
    template = found.group(1)
    page = (root / ".dvc" / template).resolve()
    page.parent.mkdir(parents=True)
    shutil.copy((REPO / ".dvc" / template).resolve(), page)
    (root / "fid.csv").write_text("sampler,steps,fid\nddim,10,30.1\nddim,20,25.3\nddpm,10,29.0\nddpm,20,23.0\n")
    (root / "loss.csv").write_text("step,loss\n1,1.0\n2,0.7\n3,0.5\n")
    (root / "sigma.csv").write_text("sampler,steps,sigma_rel,fid\nddim,20,0.05,26.0\nddim,20,0.1,25.3\n")
    plots = [{"loss.csv": {"x": "step", "y": "loss"}},
             {"fid.csv": {"template": "fid_by_sampler", "x": "steps", "y": "fid"}},
             {"sigma.csv": {"template": "fid_vs_sigma_rel", "x": "sigma_rel", "y": "fid"}}]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    return root


def dvc_env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def test_the_plots_page_inlines_vega_and_loads_no_remote_script(tmp_path):
    root = project(tmp_path / "repo")
    r = subprocess.run(["dvc", "plots", "show", "-o", str(tmp_path / "out")], cwd=root, env=dvc_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    page = (tmp_path / "out" / "index.html").read_text()
    tags = re.findall(r"<script\b[^>]*>", page)
    assert tags and not [t for t in tags if "src" in t], f"scripts loaded from elsewhere: {tags}"
    assert "cdn.jsdelivr.net" not in page and not re.search(r"""src\s*=\s*["']?(https?:)?//""", page)
    # the three libraries inlined, exactly the vendored builds, before the charts that use them
    bodies = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    pinned = vendor_script().BUILD_SHA256
    digests = [hashlib.sha256(b.encode()).hexdigest() for b in bodies[:3]]
    assert digests == [pinned["vega"], pinned["vega-lite"], pinned["vega-embed"]]
    # one chart per plot, embedded by vega-embed
    assert page.count("vegaEmbed('#") == 3
    assert page.index("vegaEmbed('#") > page.index(bodies[2])
