"""Regenerate the example reports in this folder with the README's commands: ``ngdiag demo`` on the
shipped miniature world (``demo/``), and the tiny random models.

    OMP_NUM_THREADS=1 python reports/make_reports.py

The commands run in a temporary folder, with the relative paths the README uses. ngdiag records
the absolute paths of the models and runs it reads; in the copies kept here the temporary folder is
cut from them, so they read as the README's relative paths (``demo-out/models/tiny-sd3-x1.08``,
``runs/tiny-nft-plain/checkpoint-20``) and name no folder of the machine that made them
(``tests/test_docs.py`` checks that).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLI = [sys.executable, "-m", "ngdiag.cli"]

# (command, working-directory-relative output -> file in reports/)
DEMO_PAGES = ["index.html", "1-inflation.html", "2-renorm.html", "3-sensitivity.html", "4-normguard.html",
              "5-few-steps.html", "6-checkpoints.html", "7-where.html", "demo.json", "runs/compare.html",
              "runs/attribution/report.html", "runs/nft-plain-28steps/report.html",
              "runs/nft-plain-sweep/report.html", "runs/nft-normguard-sweep/report.html"]
COMMANDS = [
    (CLI + ["demo", "--out", "world-demo"], {f"world-demo/{page}": f"demo/{page}" for page in DEMO_PAGES}),
    ([sys.executable, "-m", "ngdiag.demo", "--out", "demo-out"],
     {"demo-out/audit/report.html": "demo-audit.html", "demo-out/audit/summary.json": "demo-audit-summary.json"}),
    ([sys.executable, "-c", "from ngdiag.testing import save_tiny_pipeline; save_tiny_pipeline('tiny-sd3', 'sd3')"], {}),
    (CLI + ["train", str(ROOT / "examples/train_nft_tiny.yaml"), "--set", "normguard.lam=0",
            "--set", "output_dir=runs/tiny-nft-plain", "--quiet"], {}),
    (CLI + ["train", str(ROOT / "examples/train_nft_tiny.yaml"), "--set", "normguard.lam=1",
            "--set", "output_dir=runs/tiny-nft-normguard", "--quiet"], {}),
    (CLI + ["compare", "runs/tiny-nft-plain", "runs/tiny-nft-normguard", "--steps", "10,4", "--out", "compare.html",
            "--quiet"], {"compare.html": "tiny-nft-compare.html"}),
    (CLI + ["sensitivity", "runs/tiny-nft-plain/checkpoint-20", "--base", "tiny-sd3", "--reward", "brightness",
            "--num-samples", "8", "--steps", "10", "--guidance-scale", "1", "--out", "sens-nft-plain", "--quiet"],
     {"sens-nft-plain/report.html": "tiny-nft-sensitivity.html"}),
    (CLI + ["sweep", "runs/tiny-nft-plain", "--reward", "brightness", "--num-samples", "8", "--threshold", "5",
            "--out", "sweep-nft-plain", "--quiet"], {"sweep-nft-plain/report.html": "tiny-nft-sweep.html"}),
    (CLI + ["compare", "--num-samples", "8", "--steps", "10", "--prompt", "a fox in the snow", "--prompt", "a red bicycle",
            "runs/tiny-nft-plain/checkpoint-10", "runs/tiny-nft-plain", "runs/tiny-nft-normguard", "--out", "compare-3.html",
            "--quiet"], {"compare-3.html": "tiny-nft-compare-3.html"}),
]


def neutral(text: str, workdir: Path) -> str:
    """``text`` with every spelling of ``workdir/`` removed: paths relative to the working folder."""
    for prefix in sorted({str(workdir), os.path.realpath(workdir)}, key=len, reverse=True):
        text = text.replace(prefix + "/", "").replace(prefix, ".")
    return text


def main() -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="ngdiag-reports-") as tmp:
        work = Path(tmp)
        for command, outputs in COMMANDS:
            shown = ["ngdiag", *command[3:]] if command[:3] == CLI else ["python", *command[1:]]
            print("$", " ".join(shown), file=sys.stderr, flush=True)
            subprocess.run(command, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
            for produced, kept in outputs.items():
                text = neutral((work / produced).read_text(encoding="utf-8"), work)
                if tmp in text or os.path.realpath(tmp) in text:
                    raise SystemExit(f"error: {kept} still names the temporary folder {tmp}")
                (HERE / kept).parent.mkdir(parents=True, exist_ok=True)
                (HERE / kept).write_text(text, encoding="utf-8")
                print(f"wrote reports/{kept}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
