"""Hostile output folders (issue 8, B): --overwrite, inputs as outputs, symbolic links, two writers,
arguments refused after the run state was written, NaN in the VAE, merged audits, merge errors.

Every case goes through the real CLI (in-process, or a subprocess where a second process or a
signal is needed) and checks the exit code, the output folder, and that every input folder is
untouched (file lists and hashes before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.helpers import run_cli

PROMPTS = ["a red cube", "a cat on a hill"]
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def snapshot(path) -> dict:
    """Everything under ``path`` (not following links): relative path -> sha256, link target or 'dir'."""
    path = Path(path)
    out = {}
    if path.is_symlink() or path.is_file():
        return {".": _entry(path)}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(path))] = _entry(p)
    return out


def _entry(p: Path):
    if p.is_symlink():
        return "link->" + os.readlink(p)
    if p.is_dir():
        return "dir"
    return hashlib.sha256(p.read_bytes()).hexdigest()


def one_line_error(code, err, needle, exit_code=2):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == exit_code, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


def audit_args(ckpt, base, out, *extra, samples=2, batch_size=4):
    args = ["audit", ckpt, "--base", base, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-samples", samples,
            "--steps", 2, "--batch-size", batch_size, "--out", out, "--quiet", "--format", "json", *extra]
    return [str(a) for a in args]


def audit(ckpt, base, out, *extra, **kw):
    return run_cli(*audit_args(ckpt, base, out, *extra, **kw))


def sensitivity_args(ckpt, base, out, *extra):
    args = ["sensitivity", ckpt, "--base", base, "--reward", "brightness", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--num-samples", 3, "--steps", 2, "--batch-size", 1, "--out", out, "--quiet", "--format", "json", *extra]
    return [str(a) for a in args]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return e


HOLD_LOCK = ("import sys, time\nfrom ngdiag.runs import lock_output\nfolder = lock_output(sys.argv[1])\n"
             "print('locked', flush=True)\ntime.sleep(600)\n")


def hold_lock(path) -> subprocess.Popen:
    """Another ngdiag process holding the output lock on ``path`` (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    assert line.strip() == b"locked", proc.stderr.read().decode()[-2000:]
    return proc


def start_paused(args, out: Path) -> subprocess.Popen:
    """Start ``ngdiag ARGS`` writing into ``out`` and stop it (SIGSTOP) once it holds the folder."""
    proc = subprocess.Popen([sys.executable, "-m", "ngdiag.cli", *map(str, args)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        lock = out / ".ngdiag.lock"
        if (lock.is_file() and f'"pid": {proc.pid}' in lock.read_text()) or (out / "run_state.json").is_file():
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGSTOP)
    return proc


@pytest.fixture
def read_only(tmp_path):
    """Make folders non-writable (immutable as root, where permission bits do not bind; mode 0555 otherwise)."""
    made = []

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
                pytest.skip("running as root without chattr +i: cannot make a folder non-writable")
        else:
            path.chmod(0o555)
        made.append(path)
        assert not os.access(path, os.W_OK)
        return path

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)])
        else:
            path.chmod(0o755)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny SD3 base, a fine-tune with a planted 8 % inflation, the base with a NaN VAE decoder, and a
    checkpoint whose weights are garbage (loading it fails: a run that reaches the loader says so)."""
    from diffusers import DiffusionPipeline

    from ngdiag.testing import save_planted_base, save_scaled_finetune

    root = tmp_path_factory.mktemp("hostile-models")
    base = save_planted_base(root / "base", "sd3")
    ft = save_scaled_finetune(base, root / "ft", 1.08)
    pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.fill_(float("nan"))
    nan_base = root / "nan-vae-base"
    pipe.save_pretrained(nan_base, safe_serialization=True)
    shutil.copy(base / "ngdiag_defaults.json", nan_base / "ngdiag_defaults.json")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    shutil.copy(ft / "config.json", corrupt / "config.json")
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file" * 10)
    inputs = {p: snapshot(p) for p in (base, ft, nan_base, corrupt)}
    return SimpleNamespace(root=root, base=base, ft=ft, nan_base=nan_base, corrupt=corrupt, inputs=inputs)


def assert_inputs_untouched(models):
    """The models every test reads (checkpoint, bases) hold exactly the files they held when built."""
    assert {p: snapshot(p) for p in models.inputs} == models.inputs


@pytest.fixture(scope="module")
def shards(models, tmp_path_factory):
    """An audit (4 samples, batch size 1, --renorm --reward) run once and as 3 shards; a sensitivity
    analysis (3 samples, batch size 1) run once and as 2 shards."""
    root = tmp_path_factory.mktemp("hostile-shards")
    extra = ["--renorm", "--reward", "brightness"]
    a = dict(samples=4, batch_size=1)
    code, _, err = audit(models.ft, models.base, root / "single", *extra, **a)
    assert code == 0, err
    for i in range(3):
        code, _, err = audit(models.ft, models.base, root / f"audit-{i}", *extra, "--shard", f"{i}/3", **a)
        assert code == 0, err
    code, _, err = run_cli(*sensitivity_args(models.ft, models.base, root / "sens-single"))
    assert code == 0, err
    for i in range(2):
        code, _, err = run_cli(*sensitivity_args(models.ft, models.base, root / f"sens-{i}", "--shard", f"{i}/2"))
        assert code == 0, err
    return SimpleNamespace(root=root, single=root / "single", audit=[root / f"audit-{i}" for i in range(3)],
                           sens_single=root / "sens-single", sens=[root / f"sens-{i}" for i in range(2)])


def train_config(base, out, **changes) -> dict:
    d = {
        "model": {"base": str(base)}, "lora": {"rank": 2, "alpha": 2}, "method": "nft", "normguard": {"lam": 0.0},
        "sampling": {"steps": 2, "guidance": 1.0}, "timesteps": {"num": 1},
        "optimizer": {"lr": 0.05, "micro_batch_size": 4},
        "rollouts": {"prompts": PROMPTS, "group_size": 2, "prompts_per_iteration": 2, "batch_size": 4},
        "reward": "brightness", "iterations": 1, "checkpoint_every": 1, "output_dir": str(out),
    }
    d.update(changes)
    return d


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def train_run(models, tmp_path_factory):
    """A one-iteration training run folder (what ngdiag compare reads)."""
    root = tmp_path_factory.mktemp("hostile-train")
    cfg = write_config(root / "run.yaml", train_config(models.base, root / "run"))
    code, _, err = run_cli("train", cfg, "--quiet")
    assert code == 0, err
    return root / "run"


# ============================================================================ B1: --overwrite, inputs, links
def test_overwrite_refuses_a_folder_ngdiag_did_not_write(models, tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "figures").mkdir(parents=True)
    (thesis / "chapter1.tex").write_text("\\chapter{Introduction}")
    (thesis / "figures" / "plot.pdf").write_bytes(b"%PDF-1.4 precious")
    before = snapshot(thesis)
    code, _, err = audit(models.ft, models.base, thesis, "--overwrite")
    one_line_error(code, err, "holds files ngdiag did not write")
    assert snapshot(thesis) == before
    assert_inputs_untouched(models)


def test_output_that_is_contains_or_lies_inside_an_input_is_refused(models, tmp_path):
    work = tmp_path / "work"
    ckpt = work / "ft"
    shutil.copytree(models.ft, ckpt)
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    (prompts_dir / "prompts.txt").write_text("a red cube\na cat on a hill\n")
    (tmp_path / "base-link").symlink_to(models.base)
    cases = [
        (ckpt, [], "is the checkpoint"),                                  # ngdiag audit ft --out ft --overwrite
        (work, [], "contains the checkpoint"),
        (models.base / "audit", [], "lies inside the base"),
        (tmp_path / "base-link" / "audit", [], "lies inside the base"),   # through a link to the base
        (prompts_dir, ["--prompts", prompts_dir / "prompts.txt"], "contains the prompts file"),
    ]
    watched = [work, models.base, prompts_dir]
    before = {p: snapshot(p) for p in watched}
    for out, extra, needle in cases:
        code, _, err = audit(ckpt, models.base, out, *extra, "--overwrite")
        one_line_error(code, err, needle)
        assert {p: snapshot(p) for p in watched} == before, out
    assert not (models.base / "audit").exists()
    assert_inputs_untouched(models)


def test_overwrite_replaces_only_ngdiag_files(models, tmp_path):
    out = tmp_path / "out"
    code, _, err = audit(models.ft, models.base, out)
    assert code == 0, err
    (out / "notes.txt").write_text("my notes")
    (out / "parts" / "mine.txt").write_text("mine")
    (out / "keep").mkdir()
    (out / "keep" / "data.csv").write_text("1,2,3")
    foreign = {k: v for k, v in snapshot(out).items() if k in ("notes.txt", "parts/mine.txt", "keep", "keep/data.csv")}
    code, _, err = audit(models.ft, models.base, out, "--seed", 100)
    one_line_error(code, err, "pass --overwrite")
    code, stdout, err = audit(models.ft, models.base, out, "--seed", 100, "--overwrite")
    assert code == 0, err
    after = snapshot(out)
    assert {k: after.get(k) for k in foreign} == foreign
    assert json.loads(stdout) == json.loads((out / "summary.json").read_text())
    assert json.loads(stdout)["config"]["seed"] == 100
    assert sorted(p.name for p in (out / "parts").iterdir()) == [
        "extras-b00000.json", "images-b00000.npz", "mine.txt", "records-b00000.parquet", "spatial-b00000.npz"]
    assert sorted(p.name for p in out.iterdir()) == sorted([".ngdiag-files", "keep", "notes.txt", "parts", "records.parquet",
                                                           "report.html", "run_state.json", "spatial.npz", "steps.csv",
                                                           "summary.json"])
    assert_inputs_untouched(models)


def test_symbolic_links_are_never_followed_out_of_the_output(models, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(target)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path)
    for out in (link, dangling):
        code, _, err = audit(models.ft, models.base, out, "--overwrite")
        one_line_error(code, err, "is a symbolic link")
    assert snapshot(tmp_path) == before and not (tmp_path / "nowhere").exists()

    # links inside a run folder: its parts/ folder and its summary.json point elsewhere
    out = tmp_path / "run"
    code, _, err = audit(models.ft, models.base, out)
    assert code == 0, err
    shutil.rmtree(out / "parts")
    (out / "parts").symlink_to(target)
    (out / "summary.json").unlink()
    (out / "summary.json").symlink_to(target / "precious.txt")
    outside = snapshot(target)
    code, _, err = audit(models.ft, models.base, out, "--seed", 7, "--overwrite")
    one_line_error(code, err, "is a symbolic link")
    assert snapshot(target) == outside and (out / "parts").is_symlink()
    # with parts/ a real folder again, the run replaces the summary.json link itself, not its target
    (out / "parts").unlink()
    code, _, err = audit(models.ft, models.base, out, "--seed", 7, "--overwrite")
    assert code == 0, err
    assert snapshot(target) == outside
    assert not (out / "summary.json").is_symlink() and json.loads((out / "summary.json").read_text())["config"]["seed"] == 7
    assert_inputs_untouched(models)


def test_compare_report_path_is_checked_before_any_compute(models, train_run, tmp_path, read_only):
    # run B's adapter weights are garbage: a compare that loads a model before checking --out fails on them
    broken = tmp_path / "broken"
    shutil.copytree(train_run, broken)
    for f in broken.glob("checkpoint-*/adapter_model.safetensors"):
        f.write_bytes(b"garbage")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("precious")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    foreign = tmp_path / "thesis.html"
    foreign.write_text("<html>my thesis</html>")
    folder = tmp_path / "folder"
    folder.mkdir()
    ro = read_only(tmp_path / "ro")
    cases = [
        (link, [], "is a symbolic link"),
        (folder, [], "is a folder"),
        (foreign, ["--overwrite"], "was not written by ngdiag"),
        (foreign, [], "was not written by ngdiag"),
        (broken / "compare.html", [], "lies inside the run B"),
        (models.base / "compare.html", [], "lies inside the base"),
        (ro / "compare.html", [], "not writable"),
    ]
    before = {p: snapshot(p) for p in (tmp_path, train_run, models.base)}
    for out, extra, needle in cases:
        code, _, err = run_cli("compare", train_run, broken, "--steps", "1", "--num-samples", 2, "--out", out, "--quiet", *extra)
        one_line_error(code, err, needle)
    assert {p: snapshot(p) for p in before} == before

    report = tmp_path / "report.html"
    args = ["compare", train_run, train_run, "--steps", "1", "--num-samples", 2, "--out", report, "--quiet"]
    code, _, err = run_cli(*args)
    assert code == 0, err
    first = report.read_bytes()
    code, _, err = run_cli(*args)
    one_line_error(code, err, "pass --overwrite")
    report.write_bytes(first.replace(b"</body>", b"<!-- stale --></body>"))
    code, _, err = run_cli(*args, "--overwrite")
    assert code == 0, err
    assert report.read_bytes() == first
    assert_inputs_untouched(models)


# ============================================================================ B2: one writer per folder
def test_a_second_writer_is_refused_and_the_first_completes(models, shards, train_run, tmp_path):
    out = tmp_path / "busy"
    first = start_paused(audit_args(models.ft, models.base, out, samples=4, batch_size=1), out)  # held mid-run
    try:
        cfg = write_config(tmp_path / "train.yaml", train_config(models.base, out))
        writers = {
            "audit": audit_args(models.ft, models.base, out, "--seed", 100, "--overwrite"),
            "sensitivity": sensitivity_args(models.ft, models.base, out, "--overwrite"),
            "merge": ["merge", *shards.audit, "--out", out, "--overwrite"],
            "merge-sensitivity": ["merge-sensitivity", *shards.sens, "--out", out, "--overwrite"],
            "train": ["train", cfg, "--quiet"],
        }
        for name, cmd in writers.items():
            code, _, err = run_cli(*cmd)
            line = one_line_error(code, err, f"pid {first.pid}")
            assert "in use by another ngdiag process" in line and "audit" in line, (name, line)
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr.decode()[-2000:]
    code, _, err = run_cli(*audit_args(models.ft, models.base, tmp_path / "clean", samples=4, batch_size=1))
    assert code == 0, err
    assert (out / "summary.json").read_bytes() == (tmp_path / "clean" / "summary.json").read_bytes()
    assert json.loads(stdout)["inflation"] == json.loads((out / "summary.json").read_text())["inflation"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert_inputs_untouched(models)


def test_a_dead_writers_lock_is_taken_over(models, tmp_path):
    out = tmp_path / "stale"
    holder = hold_lock(out)
    code, _, err = audit(models.ft, models.base, out)
    one_line_error(code, err, f"pid {holder.pid}")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f'"pid": {holder.pid}' in (out / ".ngdiag.lock").read_text()  # the dead process's lock file stays
    code, stdout, err = audit(models.ft, models.base, out)
    assert code == 0, err
    assert json.loads(stdout)["verdict"] == "inflated" and (out / "summary.json").is_file()
    assert not (out / ".ngdiag.lock").exists()  # released at the end of the run
    assert_inputs_untouched(models)


@pytest.mark.slow
def test_torchrun_shard_folders_are_locked(models, tmp_path):
    out = tmp_path / "multi"
    shard = Path(f"{out}.shards") / "1-of-2"
    args = audit_args(models.ft, models.base, out)
    holder = hold_lock(shard)  # another process holds the folder torchrun's rank 1 writes its shard into
    try:
        before = snapshot(shard)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "ngdiag.cli", *args], env=env(), capture_output=True, text=True, timeout=300)
        assert snapshot(shard) == before
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert f"is in use by another ngdiag process (pid {holder.pid}" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "summary.json").exists()
    assert_inputs_untouched(models)


# ============================================================================ B3: validate first, write after
def test_a_refused_run_writes_nothing_and_the_corrected_rerun_runs(models, tmp_path):
    out = tmp_path / "out"
    code, _, err = audit(models.ft, models.base, out, "--height", 33)
    one_line_error(code, err, "multiples of")
    assert not out.exists()
    code, stdout, err = audit(models.ft, models.base, out)
    assert code == 0, err
    assert json.loads(stdout)["verdict"] == "inflated"
    assert_inputs_untouched(models)


def test_unusable_output_is_refused_before_any_model_is_loaded(models, shards, train_run, tmp_path, read_only):
    """The checkpoint's weights are garbage: a run that loaded it before checking --out would say so instead."""
    ro = read_only(tmp_path / "ro")
    parent_file = tmp_path / "a-file"
    parent_file.write_text("x")
    for out, needle in ((ro, "is not writable"), (ro / "sub", "not writable"), (parent_file / "sub", "is not a folder"),
                        (parent_file, "is not a folder")):
        code, _, err = audit(models.corrupt, models.base, out)
        one_line_error(code, err, needle)
        code, _, err = run_cli(*sensitivity_args(models.corrupt, models.base, out))
        one_line_error(code, err, needle)
        code, _, err = run_cli("merge", *shards.audit, "--out", out)
        one_line_error(code, err, needle)
        code, _, err = run_cli("merge-sensitivity", *shards.sens, "--out", out)
        one_line_error(code, err, needle)
    # train: output_dir not writable, or inside the base it trains from
    before = snapshot(models.base)
    for out, needle in ((ro / "run", "not writable"), (models.base / "run", "lies inside the model.base")):
        cfg = write_config(tmp_path / "train.yaml", train_config(models.base, out))
        code, _, err = run_cli("train", cfg, "--quiet")
        one_line_error(code, err, needle)
    assert snapshot(models.base) == before
    assert sorted(os.listdir(ro)) == []
    assert_inputs_untouched(models)


def test_corrupt_training_run_json_is_a_one_line_error(models, train_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(train_run, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["output_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    (run / "run.json").write_bytes(b"{not json")
    before = snapshot(run)
    code, _, err = run_cli("train", write_config(tmp_path / "train.yaml", train_config(models.base, run)), "--quiet")
    one_line_error(code, err, "run.json is corrupt")
    assert snapshot(run) == before
    assert_inputs_untouched(models)


# ============================================================================ B4: NaN in the VAE
def test_nan_vae_names_the_images_and_writes_no_result(models, tmp_path):
    out = tmp_path / "out"
    before = snapshot(models.nan_base)
    for extra in ([], ["--reward", "brightness", "--renorm"]):  # the image grid only; every image, scored
        code, _, err = audit(models.ft, models.nan_base, out, *extra)
        line = one_line_error(code, err, "the decoded rl images are not finite (NaN or inf) for samples [0, 1]")
        assert "VAE" in line
        assert not out.exists()  # no summary, report, steps or records of a failed run, and no state to trip a rerun
    assert snapshot(models.nan_base) == before
    code, stdout, err = audit(models.ft, models.base, out, "--reward", "brightness", "--renorm")  # the corrected rerun
    assert code == 0, err
    assert {r["model"] for r in json.loads(stdout)["reward"]["rows"]} == {"base", "rl", "rl+renorm"}
    assert_inputs_untouched(models)


# ============================================================================ B6, B7: merges
def test_merged_shards_give_the_single_runs_files(shards, tmp_path):
    """3 audit shards of batch size 1 (image grid and renorm distances in shard order before the fix) and
    2 sensitivity shards give the single run's files byte for byte."""
    before = {p: snapshot(p) for p in [*shards.audit, *shards.sens]}
    code, _, err = run_cli("merge", *shards.audit, "--out", tmp_path / "merged")
    assert code == 0, err
    for name in ("summary.json", "report.html", "steps.csv"):  # the image grid in sample order 0, 1, 2, 3
        assert (tmp_path / "merged" / name).read_bytes() == (shards.single / name).read_bytes(), name
    code, _, err = run_cli("merge-sensitivity", *reversed(shards.sens), "--out", tmp_path / "sens-merged")  # any order
    assert code == 0, err
    for name in ("sensitivity.json", "report.html", "records.parquet"):
        assert (tmp_path / "sens-merged" / name).read_bytes() == (shards.sens_single / name).read_bytes(), name
    assert {p: snapshot(p) for p in before} == before


def test_merges_refuse_wrong_kinds_splits_corrupt_states_and_outputs_inside_shards(models, shards, tmp_path):
    watched = [*shards.audit, *shards.sens]
    before = {p: snapshot(p) for p in watched}
    code, _, err = run_cli("merge", *shards.sens, "--out", tmp_path / "m1")
    one_line_error(code, err, "holds an ngdiag sensitivity run, not an audit; join it with ngdiag merge-sensitivity")
    code, _, err = run_cli("merge-sensitivity", *shards.audit, "--out", tmp_path / "m2")
    one_line_error(code, err, "holds an ngdiag audit run, not a sensitivity run; join it with ngdiag merge")
    code, _, err = run_cli("merge", shards.audit[0], shards.audit[0], shards.audit[1], "--out", tmp_path / "m3")
    one_line_error(code, err, "exactly once")
    # shard 1 of a 3-way split next to shard 0 of a 2-way split of the same run
    third = tmp_path / "sens-1-of-3"
    code, _, err = run_cli(*sensitivity_args(models.ft, models.base, third, "--shard", "1/3"))
    assert code == 0, err
    code, _, err = run_cli("merge-sensitivity", shards.sens[0], third, "--out", tmp_path / "m4")
    one_line_error(code, err, "different splits")
    for out, needle in ((shards.audit[0] / "merged", "lies inside the shard folder"),
                        (shards.audit[1], "is the shard folder")):
        code, _, err = run_cli("merge", *shards.audit, "--out", out, "--overwrite")
        one_line_error(code, err, needle)
    assert {p: snapshot(p) for p in watched} == before
    for name, text in (("list", b"[]"), ("fields", b'{"kind": "audit", "complete": true}'), ("bytes", b"\xff\xfe{"),
                       ("shard", b'{"kind": "audit", "fingerprint": "x", "shard": [3, 2], "complete": true, '
                                 b'"config": {}, "checkpoint": {}}')):
        bad = tmp_path / f"corrupt-{name}"
        shutil.copytree(shards.audit[2], bad)
        (bad / "run_state.json").write_bytes(text)
        code, _, err = run_cli("merge", shards.audit[0], shards.audit[1], bad, "--out", tmp_path / f"m-{name}")
        one_line_error(code, err, "run_state.json is corrupt")
        assert not (tmp_path / f"m-{name}").exists()
    assert_inputs_untouched(models)
