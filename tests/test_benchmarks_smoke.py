"""The GPU suite's code paths on CPU (benchmarks/gpu/run.py --smoke): tiny configs of the three families."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_runs_every_measure(tmp_path):
    # this checkout's ngdiag, whichever one the environment has installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "run.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_results.json").read_text())
    assert Path(result["ngdiag"]) == ROOT / "ngdiag"
    assert result["smoke"] and [m["model"] for m in result["models"]] == ["sd35-medium", "flux1-dev", "flux2-klein-4b"]
    for row in result["models"]:
        assert row["skipped"] == {}, row["skipped"]
        # theta and ref per step: the paired loop does about twice the work of sampling theta alone
        assert row["audit"]["ratio"]["paired sample + records / sample theta"] > 1.2
        # one mixed-adapter forward records the same ratios as two passes (float32 rounding only)
        assert row["lora_pair"]["max_abs_ratio_difference"] < 1e-5
        assert row["sensitivity"]["ratio_to_sampling"] > 1
        # the penalty adds one no-grad reference forward and a few elementwise terms to a training step
        assert 0.9 < row["normguard"]["ratio"]["step + normguard / step"] < 3.0
    table = (tmp_path / "gpu_results.md").read_text()
    assert table.count("\n| ") == 4 and "flux2-klein-4b" in table
