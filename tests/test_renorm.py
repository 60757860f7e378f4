"""Inference-time renormalization, paper eq. 2 and 3 (CONVENTIONS "Inference-time renormalization")."""

import pytest
import torch

from ngdiag.core.errors import ConfigError, NumericalError
from ngdiag.core.tensors import check_finite, check_finite_norms, velocity_norm
from ngdiag.probes.renorm import cfg_renorm, rl_renorm


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@pytest.mark.parametrize("fn", [rl_renorm, cfg_renorm])
def test_renorm_sets_target_norm_and_keeps_direction(fn):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 16, 8, 8, generator=g) * torch.tensor([0.5, 1.0, 2.0, 10.0, 1e-3]).view(-1, 1, 1, 1)
    target = torch.randn(5, 16, 8, 8, generator=g) * torch.tensor([1.0, 3.0, 0.1, 1.0, 1e3]).view(-1, 1, 1, 1)
    out = fn(v, target, step=2)
    assert out.shape == v.shape and out.dtype == v.dtype
    torch.testing.assert_close(velocity_norm(out), velocity_norm(target), rtol=1e-6, atol=0)
    torch.testing.assert_close(_cos(out, v), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-6)
    # The scale is positive: same direction, not the opposite one.
    assert ((out * v).reshape(5, -1).sum(1) > 0).all()
    # Idempotent, and the identity on a velocity that already has the target norm.
    torch.testing.assert_close(fn(out, target), out, rtol=1e-6, atol=1e-7)


def test_rl_renorm_hand_value_and_eq_3():
    out = rl_renorm(torch.tensor([[3.0, 4.0], [0.0, -2.0]]), torch.tensor([[0.0, 1.0], [6.0, 8.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, -10.0]]))
    g = torch.Generator().manual_seed(1)
    v_theta = torch.randn(3, 7, generator=g, dtype=torch.float64)
    v_ref = torch.randn(3, 7, generator=g, dtype=torch.float64)
    eq3 = v_theta * (v_ref.norm(dim=1) / v_theta.norm(dim=1))[:, None]
    torch.testing.assert_close(rl_renorm(v_theta, v_ref), eq3, rtol=1e-14, atol=0)


def test_cfg_renorm_eq_2_on_guided_velocity():
    g = torch.Generator().manual_seed(2)
    v_cond = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    v_uncond = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    v_cfg = v_uncond + 4.5 * (v_cond - v_uncond)
    eq2 = v_cfg * (velocity_norm(v_cond) / velocity_norm(v_cfg)).view(-1, 1, 1, 1)
    torch.testing.assert_close(cfg_renorm(v_cfg, v_cond), eq2, rtol=1e-14, atol=0)


def test_renorm_half_precision_keeps_dtype():
    v = torch.full((2, 1000), 300.0, dtype=torch.float16)  # norm overflows float16 if squared there
    target = torch.ones(2, 1000, dtype=torch.bfloat16)
    out = rl_renorm(v, target)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(velocity_norm(out), velocity_norm(target), rtol=1e-3, atol=0)


def test_renorm_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    v_theta = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v_ref = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rl_renorm(a, b), (v_theta, v_ref))


def test_zero_norm_raises_with_step_and_samples():
    v_theta = torch.ones(4, 3)
    v_theta[0] = 0.0
    v_theta[2] = 0.0
    msg = r"^v_theta has a zero or non-finite norm at step 3 for samples \[0, 2\]$"
    with pytest.raises(NumericalError, match=msg):
        rl_renorm(v_theta, torch.ones(4, 3), step=3)
    v_cond = torch.ones(4, 3)
    v_cond[3] = 0.0
    with pytest.raises(NumericalError, match=r"^v_cond has a zero or non-finite norm at step 0 for samples \[3\]$"):
        cfg_renorm(torch.ones(4, 3), v_cond, step=0)


def test_nan_and_inf_raise():
    v_ref = torch.ones(3, 2, 2)
    v_ref[1, 0, 1] = float("nan")
    with pytest.raises(NumericalError, match=r"^v_ref has a zero or non-finite norm at step 7 for samples \[1\]$"):
        rl_renorm(torch.ones(3, 2, 2), v_ref, step=7)
    v_cfg = torch.ones(3, 2)
    v_cfg[2, 1] = float("inf")
    with pytest.raises(NumericalError, match=r"^v_cfg has a zero or non-finite norm for samples \[2\]$"):
        cfg_renorm(v_cfg, torch.ones(3, 2))


def test_check_finite_norms_messages():
    check_finite_norms(torch.tensor([1.0, 2.0]), what="v_theta", step=1)  # passes silently
    with pytest.raises(NumericalError, match=r"^v_x has a zero or non-finite norm at step 4 for samples \[1, 2\]$"):
        check_finite_norms(torch.tensor([1.0, float("inf"), 0.0]), what="v_x", step=4)
    many = torch.zeros(25)
    many[0] = 1.0
    with pytest.raises(NumericalError, match=r"samples \[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, \.\.\.\] \(24 in all\)$"):
        check_finite_norms(many, what="v_theta")


def test_check_finite_tensor_messages():
    v = torch.ones(4, 2, 3)
    check_finite(v, "v_ref has non-finite values at step 0")  # passes silently
    v[1, 1, 2] = float("nan")
    v[3, 0, 0] = -float("inf")
    with pytest.raises(NumericalError, match=r"^v_ref has non-finite values at step 3 for samples \[1, 3\]$"):
        check_finite(v, "v_ref has non-finite values at step 3")
    with pytest.raises(NumericalError, match=r"^v_ref has non-finite values for samples \[1, 3\]$"):
        check_finite(v, "v_ref has non-finite values")


def test_shape_mismatch_is_config_error():
    with pytest.raises(ConfigError, match="same shape"):
        rl_renorm(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ConfigError, match="same shape"):
        cfg_renorm(torch.ones(2, 3), torch.ones(3, 3))


# ============================================================================ through the sampler and the live probe
# Known answers on tiny pipelines (CFG 4, three steps): a planted 1.08 fine-tune and a random LoRA (whose
# theta/ref ratios differ between the conditional and the unconditional call, so that renormalizing the
# calls before guidance and renormalizing the guided velocity give different trajectories).
CFG_FAMILIES = ["sd3", "flux2-klein", "qwenimage"]
PROMPTS = ["a red cube", "a cat on a hill at dusk"]
#: A relative difference the tests tell from rounding (below 1e-6 here). Measured minima (FLUX.2-klein, whose
#: tiny text encoder moves the velocity least): 4.8e-3 between the two RL targets, 1.0e-3 between ||v_cfg||
#: and ||v_cond||, 1.0e-2 between theta's and the reference's ||v_cond||, 2.5e-3 for the effect of CFG
#: renorm on the live output (9.8e-3 for RL renorm).
APART = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tiny_bases, tmp_path_factory):
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.testing import save_lora_adapter, save_scaled_finetune

    root = tmp_path_factory.mktemp("renorm")

    def load(kind, family):
        path = root / f"{kind}-{family}"
        if not path.exists():
            if kind == "scaled":
                save_scaled_finetune(tiny_bases[family], path, 1.08)
            else:
                save_lora_adapter(tiny_bases[family], path, rank=4, alpha=8.0, init_scale=0.5)
        return load_checkpoint(path, tiny_bases[family])

    return load


def _batch(ckpt):
    from ngdiag.models.generation import SamplingConfig, prepare_batch

    batch = prepare_batch(ckpt, PROMPTS, [0, 1], SamplingConfig(num_steps=3, guidance_scale=4.0))
    return batch, batch.conditioning.guided(ckpt.theta), batch.conditioning.guided(ckpt.require_ref())


def _norm(v):
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1).double(), dim=1)


def _per_sample(v, factor):
    return v * factor.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))


def _pipeline_guidance(cond, uncond, w, family):
    """The pipelines' own guidance: CFG, and for Qwen-Image the per-token rescale to the conditional norm."""
    guided = uncond + w * (cond - uncond)
    if family == "qwenimage":
        guided = guided * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
    return guided


def _relative(a, b):
    return float((a - b).double().norm() / b.double().norm())


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_rl_renorm_on_cond_of_a_planted_scale_is_the_reference_trajectory(checkpoints, family):
    # v_theta = 1.08 v_ref in each call: renormalizing cond and uncond to the reference gives back the
    # reference's own calls, hence (after the pipeline's guidance) the reference's guided trajectory.
    from ngdiag.probes.paired import PairedVelocity
    from ngdiag.probes.renorm import rl_renorm_intervention
    from ngdiag.core.sampling import sample

    batch, theta, ref = _batch(checkpoints("scaled", family))
    base = sample(ref, batch.x_init, batch.sigmas).x_final
    rl = sample(theta, batch.x_init, batch.sigmas).x_final
    renormed = sample(PairedVelocity(theta, ref), batch.x_init, batch.sigmas,
                      intervention=rl_renorm_intervention("cond", guidance=theta)).x_final
    assert _relative(renormed, base) <= 1e-6  # measured 2.8e-7 to 4.0e-7 (float32 rounding)
    assert _relative(rl, base) > 1e-3


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_rl_renorm_on_cond_renormalizes_each_call_before_guidance(checkpoints, family):
    from ngdiag.probes.paired import PairedVelocity
    from ngdiag.probes.renorm import rl_renorm_intervention
    from ngdiag.core.sampling import euler_step, sample

    batch, theta, ref = _batch(checkpoints("lora", family))
    steps = []
    sample(PairedVelocity(theta, ref), batch.x_init, batch.sigmas, callback=steps.append,
           intervention=rl_renorm_intervention("cond", guidance=theta))
    assert len(steps) == 3
    for rec in steps:
        ev, ev_ref = rec.velocity, rec.velocity.extras["ref"]
        cond = _per_sample(ev.cond, _norm(ev_ref.cond) / _norm(ev.cond))  # eq. 3 on each call
        uncond = _per_sample(ev.uncond, _norm(ev_ref.uncond) / _norm(ev.uncond))
        expected = _pipeline_guidance(cond, uncond, 4.0, family)
        assert _relative(ev.applied, expected) <= 2e-6  # measured up to 4.8e-7 (float32 rounding)
        on_guided = _per_sample(ev.guided, _norm(ev_ref.guided) / _norm(ev.guided))
        assert _relative(expected, on_guided) > APART  # the two targets differ here: the test can tell them apart
        torch.testing.assert_close(rec.x_next, euler_step(rec.x, ev.applied, batch.sigmas[rec.step],
                                                          batch.sigmas[rec.step + 1]), rtol=0, atol=0)


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_cfg_renorm_sets_the_conditional_norm_each_step(checkpoints, family):
    # Paper eq. 2: v' = v_cfg ||v_cond|| / ||v_cfg||, with theta's own conditional output (not the reference's).
    from ngdiag.probes.paired import PairedVelocity
    from ngdiag.probes.renorm import cfg_renorm_intervention
    from ngdiag.core.sampling import sample

    batch, theta, ref = _batch(checkpoints("lora", family))
    paired, alone = [], []
    sample(PairedVelocity(theta, ref), batch.x_init, batch.sigmas, callback=paired.append,
           intervention=cfg_renorm_intervention())
    sample(theta, batch.x_init, batch.sigmas, callback=alone.append, intervention=cfg_renorm_intervention())
    assert len(paired) == len(alone) == 3
    for rec, rec_alone in zip(paired, alone):
        ev, ev_ref = rec.velocity, rec.velocity.extras["ref"]
        assert torch.equal(rec_alone.velocity.applied, ev.applied)  # with or without the reference: one answer
        torch.testing.assert_close(_norm(ev.applied), _norm(ev.cond), rtol=1e-6, atol=0)
        torch.testing.assert_close(_cos(ev.applied, ev.guided), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
        if family == "qwenimage":  # the pipeline's per-token rescale already gives v_cfg the norm of v_cond
            torch.testing.assert_close(_norm(ev.guided), _norm(ev.cond), rtol=1e-6, atol=0)
        else:  # guidance changed the norm, so eq. 2 acts
            assert (_norm(ev.guided) / _norm(ev.cond) - 1).abs().min() > APART
        assert (_norm(ev_ref.cond) / _norm(ev.cond) - 1).abs().min() > APART  # the reference's norm is another target


@pytest.mark.parametrize("renorm", ["rl", "cfg"])
@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_live_probe_renorm_equals_the_sampler(checkpoints, family, renorm):
    import ngdiag
    from ngdiag.probes.paired import PairedVelocity
    from ngdiag.probes.renorm import cfg_renorm_intervention, rl_renorm_intervention
    from ngdiag.core.sampling import sample
    from ngdiag.testing import TINY_CALL_KWARGS

    ckpt = checkpoints("lora", family)
    batch, theta, ref = _batch(ckpt)
    intervention = rl_renorm_intervention() if renorm == "rl" else cfg_renorm_intervention()
    ours = sample(PairedVelocity(theta, ref), batch.x_init, batch.sigmas, intervention=intervention).x_final
    ours = ckpt.adapter.output_latents(ours, 32, 32)
    pipe = ckpt.pipeline
    pipe.set_progress_bar_config(disable=True)
    guidance = dict(true_cfg_scale=4.0, negative_prompt=" ") if family == "qwenimage" else dict(guidance_scale=4.0)
    call = dict(prompt=PROMPTS, num_inference_steps=3, output_type="latent", **guidance, **TINY_CALL_KWARGS[family])

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(2)]

    plain = pipe(generator=gens(), **call).images
    with ngdiag.probe(pipe, renorm=renorm):
        live = pipe(generator=gens(), **call).images
    assert torch.equal(live, ours)  # the same float operations in the same order: bit-identical
    if family == "qwenimage" and renorm == "cfg":  # a no-op after the pipeline's per-token rescale
        assert _relative(live, plain) < 1e-6
    else:
        assert _relative(live, plain) > APART  # the renormalization acted
