"""Render a representative plan's HTML report and check it in a headless browser.

Writes ``docs/plan-report.html`` for ``small`` on ``pipeline=2,data=2,tensor=2`` (strategy
``pp_dp_tp``, 4 microbatches, the step compiled on 8 simulated CPU devices, priced on
``gpu-h100x8``), opens it in headless Chromium (Debian package ``chromium``), fails when the
page's script did not finish or the console shows an error, and saves ``docs/plan-report.png``.

Run from the repository root: ``python docs/render_plan_report.py``. Options: ``--large`` renders
``70b`` on ``tpu-v5e-256`` (256 devices, shapes only) instead, to ``build/plan-report-256.*``;
``--out PATH`` names the HTML file (the screenshot goes beside it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

#: What Chromium's log (--enable-logging=stderr) shows of the page's console: uncaught errors and
#: every console.log/warn/error call (all at INFO level, so any of them counts: the page logs none).
CONSOLE_ERROR = re.compile(r":CONSOLE[:(]|Uncaught")


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found. Fix: apt-get install -y chromium")


def chromium(page: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            browser(),
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={profile}",
            *flags,
            page.resolve().as_uri(),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def check_page(page: Path, screenshot: Path, width: int = 1400) -> list[str]:
    """Open ``page`` twice: once to dump the DOM after its script ran, once for the screenshot.
    Returns the problems found (console errors, a script that did not finish)."""
    problems = []
    dom = chromium(page, f"--window-size={width},1000", "--virtual-time-budget=3000", "--dump-dom")
    if 'data-ready="true"' not in dom.stdout:
        problems.append("the page's script did not finish (no data-ready on <body>)")
    found = re.search(r'data-height="(\d+)"', dom.stdout)
    height = min(int(found.group(1)), 16000) if found else 3000
    shot = chromium(page, f"--screenshot={screenshot.resolve()}", f"--window-size={width},{height}")
    for run in (dom, shot):
        problems += [line for line in run.stderr.splitlines() if CONSOLE_ERROR.search(line)]
    if not screenshot.exists():
        problems.append(f"no screenshot written: {shot.stderr[-2000:]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description="Render a plan's HTML report and check it in headless Chromium.")
    parser.add_argument("--large", action="store_true", help="70b on tpu-v5e-256, shapes only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from mlsys_jax.analysis.html import render_html
    from mlsys_jax.analysis.report import build_report

    if args.large:
        report = build_report(model="70b", mesh="tpu-v5e-256", batch=256, seq=4096)
        out = args.out or ROOT / "build" / "plan-report-256.html"
    else:
        report = build_report(
            compile_step=True,
            hardware="gpu-h100x8",
            model="small",
            mesh="pipeline=2,data=2,tensor=2",
            strategy="pp_dp_tp",
            batch=16,
            seq=128,
            microbatches=4,
        )
        out = args.out or ROOT / "docs" / "plan-report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(report), encoding="utf-8")
    screenshot = out.with_suffix(".png")
    problems = check_page(out, screenshot)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} and {screenshot.name}; console clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
