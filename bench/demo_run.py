"""The README's main job, measured as a new user meets it: a fresh clone, its venv set up (not timed), then
`bash scripts/demo.sh` timed end to end, and validation AP50 against minutes since the job started.

    python bench/demo_run.py --out docs/bench_results/demo_run.jsonl --plot docs/demo_curve.png

Clones the repository at HEAD (committed work only) into a temporary directory, runs `scripts/ensure_venv.sh`
there, then the demo. The curve's points are the demo's evaluation records (metrics.jsonl: validation after
every epoch, test at the end), placed at their wall-clock time since the demo began. Prints a summary and
appends it as one JSON line to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from results import append_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = Path("runs/demo_cpu")  # scripts/demo.sh's


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def run_demo(clone: Path, demo_args: list[str]) -> tuple[float, float, str]:
    """(start unix time, duration in seconds, the demo's output) of `bash scripts/demo.sh` in `clone`."""
    subprocess.run(["bash", "-c", "source scripts/ensure_venv.sh"], cwd=clone, check=True)
    start = time.time()
    finished = subprocess.run(["bash", "scripts/demo.sh", *demo_args], cwd=clone, capture_output=True, text=True,
                              env={**os.environ, "WANDB_MODE": "offline"})
    duration = time.time() - start
    if finished.returncode != 0:
        raise RuntimeError(f"scripts/demo.sh failed ({finished.returncode}):\n{finished.stderr[-4000:]}")
    return start, duration, finished.stdout


def curve(metrics_path: Path, start: float) -> list[dict]:
    """Every evaluation of the run: split, minutes since the demo started, images seen, AP, AP50."""
    points = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval":
            points.append({"split": record["split"], "minutes": (record["time"] - start) / 60,
                           "images_seen": record["images_seen"], "AP": record["AP"], "AP50": record["AP50"]})
    return points


def plot(points: list[dict], total_minutes: float, path: Path, title: str) -> None:
    figure, axes = plt.subplots(figsize=(6, 3.6))
    val = [p for p in points if p["split"] == "val"]
    axes.plot([0] + [p["minutes"] for p in val], [0] + [p["AP50"] for p in val], "o-", label="validation AP50")
    for p in points:
        if p["split"] == "test":
            axes.plot(p["minutes"], p["AP50"], "s", color="tab:red", label=f"test AP50 {p['AP50']:.3f}")
    axes.axvline(total_minutes, color="grey", linestyle=":", label=f"job done, {total_minutes:.1f} min")
    axes.axhline(0.5, color="tab:green", linestyle="--", linewidth=0.8, label="target AP50 0.5")
    axes.set_xlabel("minutes since scripts/demo.sh started (2 CPU cores)")
    axes.set_ylabel("COCO AP50")
    axes.set_ylim(0, 1)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/bench_results/demo_run.jsonl"))
    parser.add_argument("--plot", type=Path, default=Path("docs/demo_curve.png"))
    parser.add_argument("--keep", type=Path, help="clone here and keep it (default: a temporary directory)")
    parser.add_argument("demo_args", nargs="*", help="passed to scripts/demo.sh (training config overrides)")
    args = parser.parse_args(argv)
    commit = git("rev-parse", "--short", "HEAD")
    clone = args.keep or Path(tempfile.mkdtemp(prefix="bench-demo-")) / "clone"
    try:
        git("clone", "--quiet", str(ROOT), str(clone))
        start, duration, output = run_demo(clone, args.demo_args)
        points = curve(clone / RUN_DIR / "metrics.jsonl", start)
    finally:
        if args.keep is None:
            shutil.rmtree(clone.parent, ignore_errors=True)
    test = [p for p in points if p["split"] == "test"]
    result = {"commit": commit, "date": time.strftime("%Y-%m-%d"), "minutes": duration / 60,
              "test_AP": test[-1]["AP"] if test else None, "test_AP50": test[-1]["AP50"] if test else None,
              "curve": points, "demo_args": args.demo_args, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count()}
    plot(points, duration / 60, ROOT / args.plot, f"scripts/demo.sh from a fresh clone, commit {commit}")
    print(output[-3000:])
    print(f"main job: {duration / 60:.1f} min; test AP {result['test_AP']:.3f}, AP50 {result['test_AP50']:.3f}")
    for p in points:
        print(f"  {p['minutes']:5.1f} min  {p['split']:<5} images seen {p['images_seen']:>5}  AP {p['AP']:.3f}  "
              f"AP50 {p['AP50']:.3f}")
    append_result(ROOT / args.out, result)
    print(f"plot: {ROOT / args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
