"""The sampler: known solutions, the velocity contract, and parity with diffusers pipelines."""

import pytest
import torch

from ngdiag.models.families import FAMILIES, FamilyVelocity, adapter_for, family_of_pipeline, family_of_transformer
from ngdiag.core.sampling import GuidedVelocity, euler_step, sample
from ngdiag.testing import FAMILIES as TINY_FAMILIES, TINY_CALL_KWARGS, tiny_pipeline


def test_euler_on_linear_field_matches_closed_form():
    # dx/dt = a x, Euler from t=1 to 0 on grid t_k: x_K = prod_k (1 + (t_{k+1}-t_k) a) x_0.
    a = 0.7
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.1, 0.0], dtype=torch.float64)
    x0 = torch.randn(3, 4, dtype=torch.float64)
    out = sample(lambda x, t: a * x, x0, sigmas)
    factor = torch.prod(1 + (sigmas[1:] - sigmas[:-1]) * a)
    torch.testing.assert_close(out.x_final, factor * x0, rtol=0, atol=1e-14)


def test_plain_module_and_function_are_models():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t, scale=1.0):
            return scale * self.net(torch.cat([x, t[:, None]], dim=1))

    sigmas = torch.linspace(1, 0, 6)
    x = torch.randn(2, 4)
    a = sample(GuidedVelocity(Field(), {"scale": 2.0}), x, sigmas).x_final
    b = sample(lambda x, t: 2.0 * net(torch.cat([x, t[:, None]], dim=1)), x, sigmas).x_final
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, x)


def test_velocity_of_another_shape_or_an_integer_schedule_is_an_error():
    # A (B, 1) velocity would broadcast over the state: a wrong trajectory without a word.
    from ngdiag.core.errors import ConfigError

    sigmas = torch.tensor([1.0, 0.5, 0.0])
    with pytest.raises(ConfigError, match=r"^the velocity returned shape \(2, 1\) at step 0 \(t=1\), expected \(2, 3\)"):
        sample(lambda x, t: x[:, :1], torch.ones(2, 3), sigmas)
    with pytest.raises(ConfigError, match="must return a tensor, got tuple at step 0"):
        sample(lambda x, t: (x,), torch.ones(2, 3), sigmas)
    with pytest.raises(ConfigError, match="floating-point times"):
        sample(lambda x, t: x, torch.ones(2, 3), torch.tensor([1, 0]))


def test_enable_grad_flag_controls_graph():
    w = torch.tensor(0.5, requires_grad=True)
    sigmas = torch.linspace(1, 0, 4)
    x = torch.ones(2, 3)
    assert not sample(lambda x, t: w * x, x, sigmas).x_final.requires_grad
    out = sample(lambda x, t: w * x, x, sigmas, enable_grad=True).x_final
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad)


def test_cfg_callback_reports_cond_and_guided():
    records = []
    cond_model = lambda x, t, c: x * c  # noqa: E731
    g = GuidedVelocity(cond_model, {"c": 2.0}, {"c": 0.5}, guidance_scale=3.0)
    sample(g, torch.ones(2, 2), torch.tensor([1.0, 0.5, 0.0]), callback=records.append)
    r = records[0]
    torch.testing.assert_close(r.v_guided, r.velocity.uncond + 3.0 * (r.v_cond - r.velocity.uncond))
    torch.testing.assert_close(r.v_cond, 2.0 * r.x)
    assert [rec.step for rec in records] == [0, 1] and records[1].t == 0.5 and records[1].t_next == 0.0


def test_euler_step_is_the_scheduler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    x = torch.randn(2, 4, 8, 8)
    v = torch.randn(2, 4, 8, 8)
    expected = sched.step(v, sched.timesteps[0], x, return_dict=False)[0]
    torch.testing.assert_close(euler_step(x, v, sched.sigmas[0], sched.sigmas[1]), expected, rtol=0, atol=0)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


#: What "changes the output" means below: a relative difference of at least 1e-3 (parity is exact). Measured (relative L2): w=4 versus w=1 outputs 0.109 (sd3), 0.036 (flux),
#: 0.0053 (flux2-klein), 0.028 (qwenimage); cond versus uncond 0.074, -, 0.0046, 0.022; two prompts at
#: the same state 0.068, 0.076, 0.0021, 0.018; Qwen-Image's per-token rescale 0.015.
CLEAR = 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2-klein", "qwenimage"])
def test_sampler_reproduces_diffusers_pipeline(family):
    """Parity with the pipeline at w=1 and w=4, and proof that the parity is not vacuous.

    The guided path is only tested when guidance and the prompt reach the transformer: the
    pipeline's own output must change with the guidance scale, the conditional and unconditional
    velocities must differ, two prompts must give two velocities at the same state, and for
    Qwen-Image the per-token rescale must change the guided velocity.
    """
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(TINY_CALL_KWARGS[family])
    h, w = kwargs.pop("height"), kwargs.pop("width")
    prompts = ["a red cube", "a cat on a hill at dusk"]

    def gens():
        return [torch.Generator().manual_seed(s) for s in (11, 12)]

    adapter = adapter_for(pipe)
    model = adapter.velocity_model(pipe.transformer)
    expected = {}
    for guidance in (1.0, 4.0):
        if family == "qwenimage":  # CFG is "true CFG" against a negative prompt (" " by default in ngdiag)
            kwargs_call = dict(negative_prompt=" ", true_cfg_scale=guidance) if guidance > 1 else dict(true_cfg_scale=1.0)
        else:
            kwargs_call = dict(guidance_scale=guidance)
        expected[guidance] = pipe(prompt=prompts, num_inference_steps=4, generator=gens(), output_type="latent",
                                  height=h, width=w, **kwargs, **kwargs_call).images
        with torch.no_grad():  # as the pipeline (and prepare_batch) encode: autograd picks other attention kernels
            cond = adapter.encode(prompts, guidance, **kwargs)
            x, inputs = adapter.prepare_latents(2, h, w, gens())
        cond = cond.with_inputs(inputs)
        out = sample(cond.guided(model), x, adapter.schedule(4, x))
        ours = adapter.output_latents(out.x_final, h, w)
        assert ours.shape == expected[guidance].shape
        assert torch.equal(ours, expected[guidance])  # the same float operations: bit-identical

        # The prompt reaches the velocity: two prompts at the same state give two velocities.
        same_x = x[:1].expand_as(x).contiguous()
        t = torch.full((2,), 0.7)
        with torch.no_grad():
            ev = cond.guided(model)(same_x, t)
        assert _relative(ev.cond[0], ev.cond[1]) > CLEAR
        if guidance > 1 and family != "flux":  # FLUX.1-dev's guidance is embedded, not CFG
            assert cond.uncond is not None
            assert _relative(ev.cond, ev.uncond) > CLEAR
            plain_cfg = ev.uncond + guidance * (ev.cond - ev.uncond)
            if family == "qwenimage":
                assert cond.rescale == "token_norm" and _relative(ev.guided, plain_cfg) > CLEAR
            else:
                torch.testing.assert_close(ev.guided, plain_cfg, rtol=0, atol=0)
    # Guidance changes the pipeline's own output (diffusers alone, no ngdiag code involved).
    assert _relative(expected[4.0], expected[1.0]) > CLEAR


def test_tiny_qwen_image_template_cut_keeps_the_prompt(tmp_path):
    # QwenImagePipeline drops the first prompt_template_encode_start_idx tokens (the system prompt);
    # with the tiny tokenizer that cut must end exactly where the prompt begins, also after a reload.
    from diffusers import DiffusionPipeline

    from ngdiag.testing import save_tiny_pipeline

    pipe = tiny_pipeline("qwenimage")
    reloaded = DiffusionPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "q", "qwenimage"), local_files_only=True)
    for tok in (pipe.tokenizer, reloaded.tokenizer):
        ids = tok(pipe.prompt_template_encode.format("a red cube")).input_ids
        kept = tok.decode(ids[pipe.prompt_template_encode_start_idx:])
        assert kept.startswith("a red cube<|im_end|>"), kept


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_registry_names_the_diffusers_classes_it_serves(family):
    # One registry: each family's adapter names the pipeline and transformer classes it serves, and
    # ngdiag.testing has a tiny pipeline of exactly those classes (a new family cannot miss either).
    adapter_cls = FAMILIES[family]
    assert family in TINY_FAMILIES and family in TINY_CALL_KWARGS
    pipe = tiny_pipeline(family)
    assert type(pipe).__name__ == adapter_cls.pipeline_class
    assert type(pipe.transformer).__name__ == adapter_cls.transformer_class
    assert family_of_pipeline(adapter_cls.pipeline_class) == family
    assert family_of_transformer(adapter_cls.transformer_class) == family
    assert type(adapter_for(pipe)) is adapter_cls and adapter_cls.title


def test_unknown_family_is_refused():
    from ngdiag.core.errors import CheckpointError, ConfigError

    with pytest.raises(ConfigError, match=r"^unknown family 'sdxl'; choose one of sd3, flux, flux2-klein, qwenimage$"):
        FamilyVelocity(torch.nn.Identity(), "sdxl")
    assert family_of_pipeline("StableDiffusionXLPipeline") is None
    with pytest.raises(CheckpointError, match="ngdiag supports StableDiffusion3Pipeline, FluxPipeline, Flux2KleinPipeline, QwenImagePipeline"):
        adapter_for(torch.nn.Identity())
