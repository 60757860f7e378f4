"""The durable run engine (``ngdiag.runs``) on its own, and what it keeps for the workflows built on it.

A toy workflow (the one of the engine's docstring: one number per sample) runs without any model,
so that plan, state, parts, resume, shards, merge and the progress protocol are checked exactly
and fast. The real workflows follow: a sensitivity run records its number of batches and a folder
written before that resumes; the one atomic writer and the one JSON cleaner.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np
import pytest

from ngdiag.core.io import atomic_write, atomic_write_text, json_safe
from ngdiag.core.seeds import sample_seeds
from ngdiag.core.errors import ConfigError
from ngdiag.models.generation import SampleSet
from ngdiag.runs import STATE_FILE, Workflow, merge_workflow, run_workflow
from tests.helpers import run_cli


# ----------------------------------------------------------------------------- a toy workflow
@dataclass
class MeanConfig(SampleSet):
    power: int = 2


@dataclass
class MeanResult:
    mean: float
    config: MeanConfig

    def save(self, folder, *, report=True):
        folder.write_text("mean.json", json.dumps({"mean": self.mean, "report": report}))


class MeanWorkflow(Workflow):
    kind, title, merge_command = "mean", "a mean run", "ngdiag merge-mean"
    config_type = MeanConfig
    part_files = ("values.json",)

    def write_part(self, folder, b, part):
        folder.write_text(self.part_paths(b)["values"], json.dumps(part))

    def read_part(self, path, b):
        return json.loads((path / self.part_paths(b)["values"]).read_text())

    def finalize(self, parts):
        values = [v for part in parts for v in part]
        return MeanResult(sum(values) / len(values), self.config)


CHECKPOINT = {"path": None, "base": None, "family": "toy"}


def config(**kw) -> MeanConfig:
    return MeanConfig(prompts=["a", "b"], **{"num_samples": 7, "batch_size": 2, **kw})


class Computer:
    """The batch computation: sample ``i`` gives ``i ** power``; counts the batches it computed."""

    def __init__(self, cfg: MeanConfig, stop_after=None):
        self.cfg, self.done, self.stop_after = cfg, [], stop_after

    def __call__(self, b):
        if self.stop_after is not None and len(self.done) == self.stop_after:
            raise KeyboardInterrupt  # the run is killed before batch b
        self.done.append(b)
        return [float(i ** self.cfg.power) for i in self.cfg.batch_ids(b)]


class Recorder:
    def __init__(self):
        self.calls = []

    def start(self, total, reused):
        self.calls.append(("start", total, reused))

    def advance(self, n=1):
        self.calls.append(("advance", n))

    def finish(self):
        self.calls.append(("finish",))


EXPECTED = sum(i ** 2 for i in range(7)) / 7


def run(cfg, out=None, stop_after=None, **kw):
    computer = Computer(cfg, stop_after)
    return run_workflow(MeanWorkflow(cfg, CHECKPOINT), computer, out_dir=out, **kw), computer


# ----------------------------------------------------------------------------- the engine
def test_in_memory_and_durable_runs_give_the_plan_s_result(tmp_path):
    cfg = config()
    assert cfg.num_batches == 4
    progress = Recorder()
    result, computer = run(cfg, progress=progress)
    assert result.mean == EXPECTED and computer.done == [0, 1, 2, 3]
    assert progress.calls == [("start", 4, 0), *[("advance", 1)] * 4, ("finish",)]

    result, _ = run(cfg, tmp_path / "out")
    assert result.mean == EXPECTED
    state = json.loads((tmp_path / "out" / STATE_FILE).read_text())
    assert list(state) == ["kind", "fingerprint", "shard", "complete", "config", "checkpoint", "num_batches"]
    assert state["kind"] == "mean" and state["complete"] is True and state["num_batches"] == 4
    assert state["fingerprint"] == cfg.fingerprint(CHECKPOINT) and state["shard"] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "out" / "parts").iterdir()) == [f"values-b0000{b}.json" for b in range(4)]
    assert json.loads((tmp_path / "out" / "mean.json").read_text()) == {"mean": EXPECTED, "report": True}
    manifest = (tmp_path / "out" / ".ngdiag-files").read_text().split()
    assert set(manifest) == {"run_state.json", "parts/", "mean.json", *[f"parts/values-b0000{b}.json" for b in range(4)]}


def test_a_killed_run_resumes_and_reports_what_it_reuses(tmp_path):
    cfg, out = config(), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out, stop_after=2)
    assert json.loads((out / STATE_FILE).read_text())["complete"] is False
    progress = Recorder()
    result, computer = run(cfg, out, progress=progress)
    assert computer.done == [2, 3]  # batches 0 and 1 are reused, not recomputed
    assert progress.calls == [("start", 4, 2), ("advance", 1), ("advance", 1), ("finish",)]
    assert result.mean == EXPECTED

    # a plain function f(done, total) is accepted: told once about the reused batches, then after each batch
    out2 = tmp_path / "out2"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out2, stop_after=3)
    calls = []
    run(cfg, out2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 4), (4, 4)]


def test_other_arguments_do_not_resume_and_overwrite_starts_over(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(config(), out, stop_after=2)
    with pytest.raises(ConfigError, match="holds an unfinished mean run with other arguments"):
        run(config(power=3), out)
    progress = Recorder()
    result, computer = run(config(power=3), out, overwrite=True, progress=progress)
    assert computer.done == [0, 1, 2, 3] and progress.calls[0] == ("start", 4, 0)
    assert result.mean == sum(i ** 3 for i in range(7)) / 7


def test_shards_merge_into_the_single_run_s_files(tmp_path):
    cfg = config()
    run(cfg, tmp_path / "single")
    shards = [tmp_path / f"s{i}" for i in range(3)]
    for i, d in enumerate(shards):
        result, computer = run(cfg, d, shard=(i, 3))
        assert result is None and computer.done == [b for b in range(4) if b % 3 == i]
        assert not (d / "mean.json").exists()
    merged = merge_workflow(MeanWorkflow, list(reversed(shards)), tmp_path / "merged")
    assert merged.mean == EXPECTED
    assert (tmp_path / "merged" / "mean.json").read_bytes() == (tmp_path / "single" / "mean.json").read_bytes()
    state = json.loads((tmp_path / "merged" / STATE_FILE).read_text())
    assert state["merged_from"] == [str(d) for d in shards] and state["num_batches"] == 4 and state["complete"] is True
    assert state["fingerprint"] == cfg.fingerprint(CHECKPOINT)
    with pytest.raises(ConfigError, match="a sharded mean run needs an output folder"):
        run(cfg, shard=(0, 2))


def test_every_shard_is_checked_before_a_merge_writes(tmp_path):
    cfg = config()
    shards = [tmp_path / f"s{i}" for i in range(2)]
    for i, d in enumerate(shards):
        run(cfg, d, shard=(i, 2))

    def refused(dirs, needle):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            merge_workflow(MeanWorkflow, dirs, tmp_path / "m")
        assert not (tmp_path / "m").exists()

    refused([shards[0]], "incomplete or repeated shards [0] of 2")
    refused([shards[0], shards[0]], "exactly once")
    # a shard's state that records another number of batches than its config makes
    bad = tmp_path / "bad"
    shutil.copytree(shards[1], bad)
    state = json.loads((bad / STATE_FILE).read_text())
    (bad / STATE_FILE).write_text(json.dumps({**state, "num_batches": 5}))
    refused([shards[0], bad], "records 5 batches, its config makes 4")
    # a missing part, and a damaged one: named, with the rerun that redoes them
    (bad / STATE_FILE).write_text(json.dumps(state))
    (bad / "parts" / "values-b00003.json").unlink()
    refused([shards[0], bad], "values-b00003.json is missing")
    (bad / "parts" / "values-b00003.json").write_text("[1.0, ")
    refused([shards[0], bad], f"cannot read the part of batch 3 in {bad} (JSONDecodeError); rerun the run in {bad} "
                              "with --overwrite to redo it")
    # an unfinished shard
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "half", shard=(1, 2), stop_after=1)
    refused([shards[0], tmp_path / "half"], "is not finished")


def test_a_shard_of_another_kind_is_named_with_its_merge(tmp_path):
    class OtherWorkflow(MeanWorkflow):
        kind, title, merge_command = "other", "an other run", "ngdiag merge-other"

    d = tmp_path / "other"
    run_workflow(OtherWorkflow(config(), CHECKPOINT), Computer(config()), out_dir=d)
    with pytest.raises(ConfigError, match="holds an ngdiag other run, not a mean run; join it with ngdiag merge-other"):
        merge_workflow(MeanWorkflow, [d], tmp_path / "m")


# ----------------------------------------------------------------------------- the workflows on it
@pytest.fixture(scope="module")
def sens_args(tiny_bases):
    return ["sensitivity", tiny_bases["sd3"], "--reward", "brightness", "--prompt", "a red cube", "--prompt", "a cat",
            "--num-samples", 3, "--steps", 2, "--batch-size", 1, "--format", "json"]


def test_sensitivity_records_its_batches_and_a_folder_written_before_resumes(tiny_bases, sens_args, tmp_path):
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.workflows.sensitivity import SensitivityConfig, run_sensitivity

    out = tmp_path / "killed"
    code, _, err = run_cli(*sens_args, "--out", tmp_path / "fresh", "--quiet")
    assert code == 0, err
    state = json.loads((tmp_path / "fresh" / STATE_FILE).read_text())
    assert state["num_batches"] == 3  # the audit's state recorded it, the sensitivity state did not

    # the same run, killed after its first batch, with the run state ngdiag 0.1.0 wrote (no num_batches)
    ckpt = load_checkpoint(str(tiny_bases["sd3"]), None)
    cfg = SensitivityConfig(**{**state["config"], "sampling": state["config"]["sampling"]})

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sensitivity(ckpt, cfg, out_dir=out, progress=stop)
    old = json.loads((out / STATE_FILE).read_text())
    old.pop("num_batches")
    (out / STATE_FILE).write_text(json.dumps(old, indent=2))
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["sensitivity-b00000.npz"]

    code, _, err = run_cli(*sens_args, "--out", out)
    assert code == 0, err
    assert f"sensitivity: resuming the unfinished run in {out}: 1 of 3 batches already done are reused" in err.splitlines()
    for name in ("sensitivity.json", "records.parquet", "report.html"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_merge_sensitivity_of_shards_written_before_num_batches_and_of_a_cut_part(sens_args, tmp_path):
    for i in range(2):
        d = tmp_path / f"s{i}"
        code, _, err = run_cli(*sens_args, "--out", d, "--shard", f"{i}/2", "--quiet")
        assert code == 0, err
        state = json.loads((d / STATE_FILE).read_text())
        state.pop("num_batches")
        (d / STATE_FILE).write_text(json.dumps(state, indent=2))
    code, out, err = run_cli("merge-sensitivity", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "m", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["num_samples"] == 3
    assert json.loads((tmp_path / "m" / STATE_FILE).read_text())["num_batches"] == 3

    # a cut part (a shard's disk filled up, a copy broke off): one line naming the shard and its rerun, nothing written
    part = tmp_path / "s1" / "parts" / "sensitivity-b00001.npz"
    part.write_bytes(part.read_bytes()[:100])
    code, _, err = run_cli("merge-sensitivity", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "m2")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == (f"error: cannot read the part of batch 1 in {tmp_path / 's1'} (BadZipFile); rerun the run in "
                        f"{tmp_path / 's1'} with --overwrite to redo it"), err
    assert not (tmp_path / "m2").exists()


# ----------------------------------------------------------------------------- core: I/O and seeds
def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "first\n")
    assert path.read_text() == "first\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def failing(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "first\n" and sorted(os.listdir(tmp_path)) == ["a.txt"]
    target = tmp_path / "target.txt"
    target.write_text("precious")
    (tmp_path / "link").symlink_to(target)
    atomic_write_text(tmp_path / "link", "replaced")
    assert target.read_text() == "precious" and not (tmp_path / "link").is_symlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_json_safe_gives_plain_json():
    value = {"i": np.int64(3), "f": np.float32(0.5), "nan": float("nan"), "inf": np.float64(-math.inf), "b": np.bool_(True),
             "arr": np.array([1.0, np.nan]), "t": (1, np.int32(2)), "s": "x", "none": None, "nested": [{"x": np.float64(2.5)}]}
    clean = json_safe(value)
    assert clean == {"i": 3, "f": 0.5, "nan": None, "inf": None, "b": True, "arr": [1.0, None], "t": [1, 2], "s": "x",
                     "none": None, "nested": [{"x": 2.5}]}
    assert type(clean["i"]) is int and type(clean["f"]) is float and type(clean["b"]) is bool
    assert json.loads(json.dumps(clean, allow_nan=False)) == clean


def test_sample_seeds():
    assert sample_seeds(10, [0, 3, np.int64(5)]) == [10, 13, 15]
    assert all(type(s) is int for s in sample_seeds(np.int64(1), [2]))


def test_fingerprints_of_runs_started_before_the_new_options_still_match():
    """Fingerprints computed by the code before issues 12-15 (commit bb3347c, run in a checkout of it):
    options added since then, at their defaults, and the sensitivity's gradient checkpointing (turned off
    since) leave them unchanged, so unfinished runs started with that code resume."""
    from ngdiag.models.generation import SamplingConfig
    from ngdiag.workflows.audit import AuditConfig
    from ngdiag.workflows.sensitivity import SensitivityConfig

    ck = {"path": "/models/ft", "base": "/models/base", "family": "sd3", "kind": "peft-lora"}
    s = SamplingConfig(num_steps=10, guidance_scale=4.5, height=32, width=32)
    common = dict(prompts=["a red circle", "a cat"], num_samples=4, sampling=s, seed=3, batch_size=2, reward="brightness")
    audit = AuditConfig(renorm=True, **common)
    assert audit.fingerprint(ck) == "b114dfd81bdadb8d"
    assert SensitivityConfig(**common).fingerprint(ck) == "e71b4cfa8c4ac960"
    assert SensitivityConfig(**common, gradient_checkpointing=True).fingerprint(ck) == "e71b4cfa8c4ac960"
    # a new option away from its default is a different run
    for changed in ({"spatial_maps": True}, {"fd_encoder": "world:/j"}):
        assert AuditConfig(renorm=True, **common, **changed).fingerprint(ck) != "b114dfd81bdadb8d"
    assert AuditConfig(**common, sample_base=False).fingerprint(ck) != AuditConfig(**common).fingerprint(ck)
