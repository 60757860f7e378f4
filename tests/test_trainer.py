"""The trainer: reward moves, checkpoints load, resume after a kill, 2 processes = 1 process,
NormGuard holds an induced inflation, bad configs fail with one line, timesteps and advantages.

Everything runs on the tiny random SD3 pipeline (32x32 images, 2-3 Euler steps) with the weightless
brightness reward, so a whole run takes a fraction of a second after loading.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ngdiag.core.configs import apply_overrides
from ngdiag.core.errors import ConfigError
from ngdiag.train.advantages import dpo_pairs, group_advantages
from ngdiag.train.config import TrainConfig, load_config
from ngdiag.train.timesteps import sample_timesteps, time_shift
from ngdiag.train.trainer import latest_checkpoint, read_metrics, rollout_plan, train
from tests.helpers import run_cli

PROMPTS = ["a red fox", "a blue lake", "a green tree"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from ngdiag.testing import save_planted_base

    return save_planted_base(tmp_path_factory.mktemp("train-base") / "sd3", "sd3")


def _cfg(base, out, **sections) -> dict:
    """A tiny NFT config as a dict; keyword arguments replace whole top-level entries."""
    d = {
        "model": {"base": str(base)},
        "lora": {"rank": 4, "alpha": 4},
        "method": "nft",
        "normguard": {"lam": 0.0},
        "sampling": {"steps": 3, "guidance": 1.0},
        "timesteps": {"num": 2},
        "optimizer": {"lr": 0.05, "micro_batch_size": 8},
        "rollouts": {"prompts": PROMPTS[:2], "group_size": 4, "prompts_per_iteration": 2, "batch_size": 8},
        "reward": "brightness",
        "iterations": 2,
        "checkpoint_every": 1,
        "output_dir": str(out),
    }
    d.update(sections)
    return d


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _run(data: dict):
    return train(TrainConfig.from_dict(data).validate())


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


# ============================================================================ a real run
def test_short_run_raises_the_reward_and_writes_loadable_checkpoints(base, tmp_path):
    from ngdiag.models.generation import SamplingConfig, generate
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.rewards.scorers import load_reward

    out = tmp_path / "nft"
    result = _run(_cfg(base, out, iterations=10, checkpoint_every=5))
    assert result.iterations_done == 10 and result.resumed_from is None
    assert result.last_checkpoint == out / "checkpoint-10"
    assert latest_checkpoint(out) == out / "checkpoint-10" and (out / "checkpoint-5").is_dir()

    # every run writes its resolved config, a metrics log (JSONL + CSV) and checkpoints
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == "nft" and saved["lora"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows] == list(range(10))
    for key in ("reward_mean", "reward_std", "loss", "policy_loss", "penalty", "hinge_active_fraction",
                "norm_ratio_mean", "inflation", "grad_norm"):
        assert all(r[key] is not None for r in rows), key
    assert rows[0]["norm_ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # LoRA B = 0 at the start: theta == ref
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("iteration,")

    # the reward moved up: re-sample iteration 0's prompts and seeds with the final checkpoint and the base
    cfg = TrainConfig.from_dict(saved)
    plan = rollout_plan(cfg, 0)
    prompts, seeds = [p for p, _ in plan], [s for _, s in plan]
    ckpt = load_checkpoint(result.last_checkpoint)  # the base comes from adapter_config.json
    assert ckpt.kind == "peft-lora" and Path(ckpt.base_path) == Path(base).resolve()
    sampling = SamplingConfig(num_steps=3, guidance_scale=1.0)
    reward = load_reward("brightness")
    scores = {}
    for which in ("theta", "ref"):
        res, batch = generate(ckpt, prompts, seeds, sampling, which=which)
        scores[which] = reward(ckpt.adapter.decode(res.x_final, batch.config.height, batch.config.width))
    # iteration 0's rollouts were the base model's (B = 0): the log agrees with a fresh sample of the base
    assert rows[0]["reward_mean"] == pytest.approx(float(scores["ref"].mean()), abs=1e-6)
    gain = scores["theta"] - scores["ref"]
    assert float(gain.mean()) > 1e-3, gain  # measured: +0.0030, every sample up
    assert float((gain > 0).float().mean()) >= 0.75

    # the checkpoint is a PEFT adapter folder that PeftModel.from_pretrained loads
    from diffusers import SD3Transformer2DModel
    from peft import PeftModel

    transformer = SD3Transformer2DModel.from_pretrained(base, subfolder="transformer", local_files_only=True)
    peft_model = PeftModel.from_pretrained(transformer, result.last_checkpoint)
    files = load_file(str(result.last_checkpoint / "adapter_model.safetensors"))
    loaded = dict(peft_model.named_parameters())
    assert files and all(
        torch.equal(loaded[k.replace(".weight", ".default.weight")], v) for k, v in files.items()
    )
    assert json.loads((result.last_checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == str(Path(base).resolve())


@pytest.mark.parametrize("method", ["awm", "dpo", "fm"])
def test_other_methods_run_with_normguard(base, tmp_path, method):
    result = _run(_cfg(base, tmp_path / method, method=method, normguard={"lam": 1.0}, iterations=2, checkpoint_every=2))
    rows = result.metrics
    assert len(rows) == 2 and all(r["loss"] is not None and r["penalty"] is not None for r in rows)
    expected = {"awm": "policy_loss", "dpo": "implicit_accuracy", "fm": "fm_loss"}[method]
    assert expected in rows[0]
    files = load_file(str(result.last_checkpoint / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in files.items() if "lora_B" in k)  # it trained


@pytest.mark.parametrize("family", ["flux", "flux2-klein"])
def test_packed_latent_families_train_and_load(tmp_path, family):
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.testing import save_planted_base

    fam_base = save_planted_base(tmp_path / family, family)
    result = _run(_cfg(fam_base, tmp_path / "run", normguard={"lam": 1.0}, iterations=1, sampling={"steps": 2, "guidance": 3.5},
                       timesteps={"num": 1, "kind": "stratified"},
                       rollouts={"prompts": PROMPTS[:2], "group_size": 2, "prompts_per_iteration": 2, "batch_size": 4}))
    assert result.metrics[0]["norm_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt.kind == "peft-lora" and ckpt.family == family


def test_reference_and_old_policy_forwards_only_when_needed(base, tmp_path):
    plain = _run(_cfg(base, tmp_path / "plain", monitor={"ratio": False}, iterations=1))
    assert plain.counters["ref"] == 0 and plain.counters["old"] == 0  # old == current: v_old = sg(v_theta)
    assert "norm_ratio_mean" not in plain.metrics[0] and plain.counters["theta"] == 8 * 2
    guarded = _run(_cfg(base, tmp_path / "guarded", monitor={"ratio": False}, normguard={"lam": 0.5},
                        optimizer={"lr": 0.05, "micro_batch_size": 8, "steps_per_iteration": 2}, iterations=1))
    assert guarded.counters["ref"] == guarded.counters["theta"] == 16
    assert guarded.counters["old"] == 8  # the second optimizer step needs the old weights swapped in


# ============================================================================ NormGuard
@pytest.fixture(scope="module")
def induced(base, tmp_path_factory):
    """The same flow-matching run without and with NormGuard, on a setting that inflates the norm.

    Plain flow matching on the model's own samples, with LoRA on the output projection too, pulls
    ||v_theta|| towards ||eps - x0|| (about 2.7 x ||v_ref|| for this random model).
    """
    root = tmp_path_factory.mktemp("induced")
    common = dict(method="fm", fm={"weighting": "uniform"}, sampling={"steps": 2, "guidance": 1.0},
                  lora={"rank": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]},
                  timesteps={"num": 1}, optimizer={"lr": 0.1, "micro_batch_size": 8},
                  rollouts={"prompts": PROMPTS[:2], "group_size": 2, "prompts_per_iteration": 2, "batch_size": 8},
                  iterations=6, checkpoint_every=3)
    free = _run(_cfg(base, root / "free", normguard={"lam": 0.0}, **common))
    held = _run(_cfg(base, root / "held", normguard={"lam": 10.0}, **common))
    return free, held


def test_normguard_holds_an_induced_inflation(induced):
    free, held = (r.metrics for r in induced)
    late_free = sum(r["norm_ratio_mean"] for r in free[2:]) / 4
    late_held = sum(r["norm_ratio_mean"] for r in held[2:]) / 4
    # measured: 2.46 without the penalty, 0.98 with it
    assert late_free > 1.3, [r["norm_ratio_mean"] for r in free]
    assert late_held < 1.1 and late_held < late_free - 0.3, [r["norm_ratio_mean"] for r in held]
    assert all(r["penalty"] == 0.0 for r in free) and any(r["penalty"] > 0 for r in held)
    assert all(r["hinge_active_fraction"] == 1.0 for r in free[1:])


def test_compare_report_of_two_runs(induced, tmp_path):
    free, held = induced
    out = tmp_path / "cmp" / "compare.html"
    code, stdout, err = run_cli("compare", free.output_dir, held.output_dir, "--steps", "3,1", "--num-samples", 3,
                                "--out", out, "--format", "json", "--quiet")
    assert code == 0, err
    summary = json.loads(stdout)
    assert [r["lam"] for r in summary["runs"]] == [0.0, 10.0] and summary["reward"] == "brightness"
    table = {(row["model"], row["steps"]): row for row in summary["table"]}
    assert set(table) == {(m, k) for m in ("base", "A", "B") for k in (3, 1)}
    for k in (3, 1):
        assert table[("base", k)]["inflation_pct"] == 0.0
        # the final checkpoints keep the training-time picture: A inflated, B held near 1
        assert table[("A", k)]["inflation_pct"] > 100 > 30 > table[("B", k)]["inflation_pct"]
        assert table[("A", k)]["verdict"] == "inflated"
    html = out.read_text()
    assert html.count("data:image/png;base64,") == 3  # training curves, ratio curves, image grid
    for text in ("Training curves", "Summary table", "free (fm, lam=0)", "held (fm, lam=10)", "CI low %"):
        assert text in html, text
    assert "http://" not in html and "https://" not in html
    from bs4 import BeautifulSoup

    conclusion = [p.get_text() for p in BeautifulSoup(html, "html.parser").select("#conclusion p.conclusion")]
    assert conclusion == [
        f"At {k} sampling steps, A: free (fm, lam=0) inflated more than B: held (fm, lam=10), by "
        f"{table[('A', k)]['inflation_pct'] - table[('B', k)]['inflation_pct']:.1f} percentage points: "
        f"{table[('A', k)]['inflation_pct']:+.1f} % [{table[('A', k)]['ci_low_pct']:.1f} %, {table[('A', k)]['ci_high_pct']:.1f} %] "
        f"against {table[('B', k)]['inflation_pct']:+.1f} % [{table[('B', k)]['ci_low_pct']:.1f} %, "
        f"{table[('B', k)]['ci_high_pct']:.1f} %] (95 % intervals); the intervals do not overlap."
        for k in (3, 1)
    ], conclusion
    code, _, err = run_cli("compare", free.output_dir, tmp_path, "--quiet")
    assert code == 2 and "is not an ngdiag training run" in err


# ============================================================================ resume
def test_resume_after_kill_continues_and_matches_an_uninterrupted_run(base, tmp_path):
    data = _cfg(base, tmp_path / "killed", iterations=8, checkpoint_every=2)
    cfg_file = _write(tmp_path / "run.yaml", data)
    proc = subprocess.Popen([sys.executable, "-m", "ngdiag.cli", "train", str(cfg_file), "--quiet"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = tmp_path / "killed"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not (out / "checkpoint-2" / "trainer_state.json").is_file():
            if proc.poll() is not None:
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "checkpoint-2").is_dir(), proc.stderr.read().decode()[-2000:]
    assert not (out / "checkpoint-8").exists(), "the run finished before it was killed"
    killed_at = latest_checkpoint(out)

    code, stdout, err = run_cli("train", cfg_file, "--quiet", "--format", "json")  # the same command again
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["resumed_from"] == int(killed_at.name.split("-")[1]) >= 2 and summary["iterations"] == 8
    assert [r["iteration"] for r in read_metrics(out)] == list(range(8))  # lines after the checkpoint were redone

    clean = _run(_cfg(base, tmp_path / "clean", iterations=8, checkpoint_every=8))
    for name in ("adapter_model.safetensors", "trainer_state.safetensors"):
        a = load_file(str(out / "checkpoint-8" / name))
        b = load_file(str(clean.last_checkpoint / name))
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith("rng."):
                continue
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}:{key}")
    assert [r["reward_mean"] for r in read_metrics(out)] == [r["reward_mean"] for r in clean.metrics]


OLD_RUN = Path(__file__).parent / "data" / "train_run_0.1.0"


def test_a_run_folder_written_by_ngdiag_0_1_0_resumes_and_matches_an_uninterrupted_run(base, tmp_path):
    """``tests/data/train_run_0.1.0`` is ``checkpoint-1`` of a 2-iteration NFT run (old policy EMA 0.5,
    NormGuard 0.5, 2 optimizer steps per iteration) that ngdiag 0.1.0 wrote (commit cbb6dbd, before the
    trainer was split into modules and ``sampling:`` became a SamplingConfig), on this module's planted
    base; its paths are replaced by @BASE@ and @OUTPUT_DIR@, the rest is byte for byte as written."""
    from safetensors.torch import load_file as load

    from ngdiag.train.trainer import Trainer

    old = tmp_path / "old"
    shutil.copytree(OLD_RUN, old)
    for path in (old / "config.yaml", old / "run.json", old / "checkpoint-1" / "adapter_config.json"):
        path.write_text(path.read_text().replace("@BASE@", str(base)).replace("@OUTPUT_DIR@", str(old)))
    data = _cfg(base, old, nft={"old_decay": 0.5}, normguard={"lam": 0.5}, checkpoint_every=1,
                optimizer={"lr": 0.05, "micro_batch_size": 4, "steps_per_iteration": 2})
    written = load(str(OLD_RUN / "checkpoint-1" / "trainer_state.safetensors"))

    # the old trainer state loads as it was written: LoRA weights, old policy, optimizer state, RNG
    trainer = Trainer(TrainConfig.from_dict(data).validate())
    trainer.load_state(old / "checkpoint-1")
    assert trainer.iteration == 1 and trainer.policy.old_is_current is False
    restored = trainer.state_tensors()
    assert restored.keys() == written.keys()
    for key in written:
        torch.testing.assert_close(restored[key], written[key], rtol=0, atol=0, msg=key)
    del trainer

    # the same config resumes it (the old config.yaml and run.json are accepted) and keeps its first metrics line
    first_line = (old / "metrics.jsonl").read_text().splitlines()[0]
    resumed = _run(data)
    assert resumed.resumed_from == 1 and resumed.iterations_done == 2
    assert [r["iteration"] for r in resumed.metrics] == [0, 1]
    assert (old / "metrics.jsonl").read_text().splitlines()[0] == first_line

    # and gives the parameters of an uninterrupted run. Measured: identical to the bit on the (Intel) machine
    # that wrote the fixture; on an AMD EPYC machine the uninterrupted run's own checkpoint-1 differs from the
    # fixture's by up to 1.8e-4 (parameters up to 0.28: Adam's normalised steps amplify the last-bit
    # differences of another CPU's float kernels), and checkpoint-2 inherits that. A resume that lost the
    # optimizer state or the RNG differs by the size of an update (lr 0.05 here), so 1e-3 still tells them apart.
    clean = _run({**data, "output_dir": str(tmp_path / "clean")})
    for n, ours in ((1, OLD_RUN / "checkpoint-1"), (2, old / "checkpoint-2")):
        for name in ("adapter_model.safetensors", "trainer_state.safetensors"):
            a, b = load(str(ours / name)), load(str(clean.output_dir / f"checkpoint-{n}" / name))
            assert a.keys() == b.keys()
            for key in a:
                if not key.startswith("rng."):
                    torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3, msg=f"checkpoint-{n}/{name}:{key}")


def test_resume_refuses_a_different_config_but_allows_more_iterations(base, tmp_path):
    out = tmp_path / "run"
    cfg_file = _write(tmp_path / "run.yaml", _cfg(base, out, iterations=1))
    assert run_cli("train", cfg_file, "--quiet")[0] == 0
    code, _, err = run_cli("train", cfg_file, "--quiet", "--set", "lora.rank=8")
    assert code == 2 and err.count("\n") == 1
    assert "different config (lora.rank: 4 -> 8)" in err
    code, stdout, err = run_cli("train", cfg_file, "--quiet", "--set", "iterations=2", "--format", "json")
    assert code == 0, err
    assert json.loads(stdout)["resumed_from"] == 1 and latest_checkpoint(out).name == "checkpoint-2"


# ============================================================================ processes
def test_two_processes_give_the_parameters_of_one_process(base, tmp_path):
    data = _cfg(base, tmp_path / "two", normguard={"lam": 1.0}, iterations=3, checkpoint_every=3,
                sampling={"steps": 2, "guidance": 1.0},
                optimizer={"lr": 0.05, "micro_batch_size": 2, "steps_per_iteration": 2},
                rollouts={"prompts": PROMPTS, "group_size": 2, "prompts_per_iteration": 4, "batch_size": 2})
    cfg_file = _write(tmp_path / "two.yaml", data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ngdiag.cli", "train", str(cfg_file), "--quiet"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _run({**data, "output_dir": str(tmp_path / "one")})
    two = read_metrics(tmp_path / "two")
    assert [r["world_size"] for r in two] == [2, 2, 2] and [r["world_size"] for r in one.metrics] == [1, 1, 1]
    a = load_file(str(tmp_path / "two" / "checkpoint-3" / "adapter_model.safetensors"))
    b = load_file(str(one.last_checkpoint / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # measured: max difference 2.4e-6 (parameters up to 0.34): summation order only
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    for r2, r1 in zip(two, one.metrics):  # measured: 1.5e-8, 1.2e-8 (penalty about 2e-3), 1.9e-8
        assert r2["reward_mean"] == pytest.approx(r1["reward_mean"], abs=1e-6)
        assert r2["penalty"] == pytest.approx(r1["penalty"], abs=1e-7)
        assert r2["norm_ratio_mean"] == pytest.approx(r1["norm_ratio_mean"], abs=1e-6)


# ============================================================================ bad configs
@pytest.mark.parametrize(
    "edit, overrides, message",
    [
        ({"lora": {"rnak": 4}}, [], "unknown config key 'lora.rnak' (did you mean 'lora.rank'?)"),
        ({}, ["normguard.lamda=1"], "unknown config key 'normguard.lamda' (did you mean 'normguard.lam'?)"),
        ({"normguard": {"lam": -0.5}}, [], "normguard.lam must be a finite number >= 0, got -0.5"),
        ({"method": "nfft"}, [], "unknown method 'nfft'; did you mean 'nft'?"),
        ({}, ["method=dop"], "unknown method 'dop'; did you mean 'dpo'?"),
        ({"reward": "pickscore:/nonexistent/pickscore"}, [], "reward weights not found: /nonexistent/pickscore"),
    ],
)
def test_bad_config_gets_one_line_and_exit_2(base, tmp_path, edit, overrides, message):
    data = _cfg(base, tmp_path / "never")
    data.update(edit)
    cfg_file = _write(tmp_path / "bad.yaml", data)
    sets = [a for o in overrides for a in ("--set", o)]
    code, out, err = run_cli("train", cfg_file, *sets)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "never").exists()


def test_config_loading_and_overrides(base, tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", _cfg(base, "relative-out"))
    cfg = load_config(cfg_file, ["optimizer.lr=1e-4", "lora.target_modules=[to_q,to_v]", "monitor.ratio=false"])
    assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.lora.target_modules == ["to_q", "to_v"] and cfg.monitor.ratio is False
    assert Path(cfg.output_dir).is_absolute() and Path(cfg.output_dir).name == "relative-out"
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match="'method' is not a section"):
        load_config(cfg_file, ["method.beta=1"])
    with pytest.raises(ConfigError, match="lora.rank must be an integer"):
        load_config(cfg_file, ["lora.rank=2.5"])
    with pytest.raises(ConfigError, match="do not split into optimizer.steps_per_iteration=3"):
        load_config(cfg_file, ["optimizer.steps_per_iteration=3"])
    with pytest.raises(ConfigError, match="DPO|group_size must be at least 2"):
        load_config(cfg_file, ["method=dpo", "rollouts.group_size=1"])


def test_rollout_plan_groups_prompts_and_is_stable():
    cfg = TrainConfig.from_dict({"rollouts": {"prompts": PROMPTS, "group_size": 2, "prompts_per_iteration": 2}, "seed": 3})
    plans = [rollout_plan(cfg, n) for n in range(3)]
    for plan in plans:
        assert len(plan) == 4 and plan[0][0] == plan[1][0] and plan[2][0] == plan[3][0]
        assert len({s for _, s in plan}) == 4
    # each pass over the 3 prompts is a permutation: groups 0, 1 (iteration 0) and 2 (iteration 1)
    order = [plans[0][0][0], plans[0][2][0], plans[1][0][0]]
    assert sorted(order) == sorted(PROMPTS)
    assert rollout_plan(cfg, 1) == plans[1]
    assert rollout_plan(TrainConfig.from_dict({**cfg.to_dict(), "seed": 4}), 1) != plans[1]


# ============================================================================ timesteps and advantages
def test_timesteps():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert float(time_shift(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    assert torch.equal(time_shift(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))
    u = sample_timesteps("uniform", 8, g())
    assert sorted((u * 8).floor().int().tolist()) == list(range(8))  # one draw per stratum
    assert torch.equal(u, sample_timesteps("uniform", 8, g()))
    ln = sample_timesteps("logit-normal", 1000, g(), t_min=0.2, t_max=0.6)
    assert 0.2 <= float(ln.min()) and float(ln.max()) <= 0.6 and abs(float(ln.mean()) - 0.4) < 0.01
    shifted = sample_timesteps("logit-normal", 1000, g(), shift=3.0)
    assert float(shifted.median()) == pytest.approx(0.75, abs=0.03)  # median of sigmoid(N(0,1)) is 0.5 -> 0.75
    sigmas = torch.tensor([1.0, 0.9, 0.7, 0.4, 0.2, 0.1, 0.0])
    st = sample_timesteps("stratified", 3, g(), schedule=sigmas)
    idx = [int((sigmas == v).nonzero()) for v in st]
    assert [i // 2 for i in idx] == [0, 1, 2]  # strata {0,1}, {2,3}, {4,5}: one schedule time each
    st = sample_timesteps("stratified", 2, g(), schedule=sigmas, t_min=0.15, t_max=0.8)
    assert set(st.tolist()) <= set(sigmas[2:5].tolist())  # only 0.7, 0.4, 0.2 lie in [0.15, 0.8]
    with pytest.raises(ConfigError):
        sample_timesteps("stratified", 2, g())
    with pytest.raises(ConfigError):
        sample_timesteps("cosine", 2, g())


def test_advantages_and_pairs():
    r = torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 4.0])
    # group 1: mean 2, std 1; group 2: equal rewards; group 3: mean 2, std 2
    assert group_advantages(r, 2, eps=0.0)[:2].tolist() == [-1.0, 1.0]
    assert group_advantages(r, 2, eps=1e-4)[2:4].tolist() == [0.0, 0.0]
    assert group_advantages(r, 2, normalize="none").tolist() == [-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]
    glob = group_advantages(r, 2, normalize="global", eps=0.0)
    assert glob[0].item() == pytest.approx(-1.0 / r.double().std(correction=0).item())
    r8 = torch.tensor([0.1, 0.9, 0.5, 0.3, 2.0, 1.0, 3.0, 0.0])
    assert dpo_pairs(r8, 4) == [(1, 0), (6, 7)]  # best against worst in each group
    assert dpo_pairs(r8, 4, per_group=2) == [(1, 0), (2, 3), (6, 7), (4, 5)]
    with pytest.raises(ConfigError):
        dpo_pairs(r8, 4, per_group=3)
    with pytest.raises(ConfigError):
        group_advantages(r, 4)
