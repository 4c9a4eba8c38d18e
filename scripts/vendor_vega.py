"""Vendor Vega, Vega-Lite and vega-embed for DVC's plots page, so that `dvc plots show` and
`dvc plots diff` draw their charts offline.

DVC's default page loads the three libraries from a CDN (cdn.jsdelivr.net): without a
network every Vega chart is blank. `.dvc/config` points `plots.html_template` at
``vendor/vega/plots.html``, a page template with the three minified builds inlined (DVC
writes the page into any folder, ``-o``, so the scripts cannot be files beside it). The
template has no ``{scripts}`` placeholder, so DVC adds no ``<script src>`` of its own.

    python scripts/vendor_vega.py               # npm install the pinned versions, check, write
    python scripts/vendor_vega.py --from DIR    # the same from a folder where that install was done

npm checks every package against the registry's integrity; this script also checks the three
against the sha512 pinned below, then writes ``vendor/vega/plots.html`` and
``vendor/vega/LICENSES.txt``: the licence of every package whose code the three browser
builds bundle (Vega's packages: BSD-3-Clause; d3 and others: ISC, MIT, 0BSD, Unlicense),
identical texts once. To update: change VERSIONS and INTEGRITY (``npm view vega@X
dist.integrity``) and BUILD_SHA256 (printed), run it, commit the three files.
"""

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "vendor" / "vega"
# (package, version, build in the package), in loading order: vega-lite and vega-embed need vega
VERSIONS = [("vega", "6.4.0", "build/vega.min.js"),
            ("vega-lite", "6.5.0", "build/vega-lite.min.js"),
            ("vega-embed", "7.3.0", "build/vega-embed.min.js")]
INTEGRITY = {  # the registry's dist.integrity of each tarball
    "vega": "sha512-rHXCq2LpEWCLMjXBEj7hocY9G0/i5TGYRayGGSj06VTF4+l2IG2Z7oeZKCjWbUh/7hTE/mVhbaOPB72wCElh6g==",
    "vega-lite": "sha512-fMXF6s0MrIg0UTWnLIfeFtgSLzVhyzSKobzGrh5rhS+mL6FOYFG3m7ouJ4U23gj65EK+gl9FIIT5w7wLNaAzkA==",
    "vega-embed": "sha512-wQ8s5GaSzqoKgmRfbRolgBrjE2CP7ZKHXqH7NijxMqPjpdWxSs4Dn8tvp9g0giQvh2cK+3p56sxjWWM0wNngGw==",
}
BUILD_SHA256 = {  # of each build as inlined (tests/test_plots_page.py checks the template against these)
    "vega": "8f6a3587cf8d4f42c7e08120e3eb05d067e746d554e39d2dcf52acc0bd5ba28f",
    "vega-lite": "83e215e84e308ee8688fa6503ba0f1cf8a3c05c0d61df2841a0b92bf86809e00",
    "vega-embed": "b1455caba2fb1a72fb46025ba0ba1316e2dbc7f0dd40a3f6040172bf9c08ba91",
}
# installed with the three but not in their browser builds: command-line tools (vega-lite's
# vl2vg and d3-dsv's csv2json) and type definitions
NOT_BUNDLED = {"yargs", "yargs-parser", "cliui", "escalade", "get-caller-file", "y18n", "string-width",
               "strip-ansi", "ansi-regex", "ansi-styles", "wrap-ansi", "emoji-regex", "get-east-asian-width",
               "commander", "iconv-lite", "safer-buffer", "rw", "@types/estree", "@types/geojson", "vega-typings"}
PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")  # DVC replaces these anywhere in the page

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<!-- The page template of `dvc plots show` and `dvc plots diff` (plots.html_template in .dvc/config):
     Vega, Vega-Lite and vega-embed inlined, so that the charts draw offline. Written by
     scripts/vendor_vega.py; licences in vendor/vega/LICENSES.txt. -->
@SCRIPTS@
<style>
body { font-family: sans-serif; }
table { border-spacing: 15px; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def install(folder: Path) -> None:
    specs = [f"{name}@{version}" for name, version, _ in VERSIONS]
    (folder / "package.json").write_text("{}\n")
    subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund", "--silent", *specs],
                   cwd=folder, check=True)


def build(folder: Path, name: str, version: str, path: str) -> str:
    """One package's minified build, checked: the pinned version and integrity, nothing that breaks the page."""
    lock = json.loads((folder / "package-lock.json").read_text())["packages"].get(f"node_modules/{name}", {})
    if (lock.get("version"), lock.get("integrity")) != (version, INTEGRITY[name]):
        sys.exit(f"{name}: installed {lock.get('version')} ({lock.get('integrity')}), pinned {version} "
                 f"({INTEGRITY[name]})")
    js = (folder / "node_modules" / name / path).read_text(encoding="utf-8")
    for bad in ("</script", *PLACEHOLDERS):
        if bad in js:
            sys.exit(f"{name} {version}: its build contains {bad!r}, which would break the inlined page")
    return js


def licences(folder: Path) -> str:
    """The licence texts of every installed package the builds bundle, identical texts once."""
    lock = json.loads((folder / "package-lock.json").read_text())["packages"]
    texts: dict[str, list[str]] = {}
    for key, meta in sorted(lock.items()):
        name = key.removeprefix("node_modules/")
        if not key or name.split("node_modules/")[-1] in NOT_BUNDLED:
            continue
        files = sorted(p for p in (folder / key).iterdir() if p.name.lower().startswith("licen"))
        if not files:
            sys.exit(f"{name}: no licence file in its package")
        texts.setdefault(files[0].read_text(encoding="utf-8").strip(), []).append(
            f"{name}@{meta['version']} ({meta.get('license')})")
    return "\n\n".join(f"{', '.join(names)}\n{'-' * 78}\n{text}\n" for text, names in texts.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", type=Path, help="a folder where the pinned versions are npm-installed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.source or Path(tmp)
        if args.source is None:
            install(folder)
        scripts = []
        for name, version, path in VERSIONS:
            js = build(folder, name, version, path)
            digest = hashlib.sha256(js.encode()).hexdigest()
            print(f"{name} {version}: {len(js.encode()):,} bytes, sha256 {digest}")
            if digest != BUILD_SHA256[name]:
                print(f"  (not the pinned {BUILD_SHA256[name]}: update BUILD_SHA256)")
            scripts.append(f"<!-- {name} {version} (npm {path}), BSD-3-Clause, sha256 {digest} -->\n"
                           f"<script>{js}</script>")
        notice = licences(folder)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "plots.html").write_text(PAGE.replace("@SCRIPTS@", "\n".join(scripts)), encoding="utf-8")
    (OUT / "LICENSES.txt").write_text("Licences of the code inlined in plots.html (scripts/vendor_vega.py)\n\n"
                                      + notice, encoding="utf-8")
    print(f"wrote {OUT / 'plots.html'} and {OUT / 'LICENSES.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
