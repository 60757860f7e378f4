"""The sampler: known solutions, the velocity contract, and parity with diffusers pipelines."""

import pytest
import torch

from ngdiag.models.families import adapter_for
from ngdiag.sampling import GuidedVelocity, euler_step, sample
from ngdiag.testing import TINY_CALL_KWARGS, tiny_pipeline


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


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2-klein", "qwenimage"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampler_reproduces_diffusers_pipeline(family, guidance):
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(TINY_CALL_KWARGS[family])
    h, w = kwargs.pop("height"), kwargs.pop("width")
    prompts = ["a red cube", "a cat on a hill at dusk"]

    def gens():
        return [torch.Generator().manual_seed(s) for s in (11, 12)]

    if family == "qwenimage":  # CFG is "true CFG" against a negative prompt (" " by default in ngdiag)
        kwargs_call = dict(negative_prompt=" ", true_cfg_scale=guidance) if guidance > 1 else dict(true_cfg_scale=1.0)
    else:
        kwargs_call = dict(guidance_scale=guidance)
    expected = pipe(prompt=prompts, num_inference_steps=4, generator=gens(), output_type="latent", height=h, width=w,
                    **kwargs, **kwargs_call).images
    adapter = adapter_for(pipe)
    cond = adapter.encode(prompts, guidance, **kwargs)
    x, inputs = adapter.prepare_latents(2, h, w, gens())
    cond = cond.with_inputs(inputs)
    out = sample(cond.guided(adapter.velocity_model(pipe.transformer)), x, adapter.schedule(4, x))
    ours = adapter.output_latents(out.x_final, h, w)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-5
    if guidance > 1 and family != "flux":
        assert cond.uncond is not None
