"""Maths checks of common.steps against diffusers' schedulers and closed-form Gaussians."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from common import steps as S
from common.models.base import Schedule

SHAPE = (4, 4, 8, 8)


def flow_pair(n=10):
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(n)
    return sch, Schedule("flow", timesteps=sch.timesteps.clone(), sigmas=sch.sigmas.clone())


def ddim_pair(n=20, set_alpha_to_one=False):
    # Stable Diffusion 1.x's scheduler config
    sch = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                        set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    sch.set_timesteps(n)
    sched = Schedule("epsilon", timesteps=sch.timesteps.clone(), alphas_cumprod=sch.alphas_cumprod.clone(),
                     prev_timesteps=sch.timesteps - 1000 // n, final_alpha_cumprod=float(sch.final_alpha_cumprod))
    return sch, sched


FLOW_AT_ZERO = {
    "flow_sde": lambda v, x, s, i: S.flow_sde_step(v, x, s, i, noise_level=0.0),
    "dance_sde": lambda v, x, s, i: S.dance_sde_step(v, x, s, i, eta=0.0),
    "cps": lambda v, x, s, i: S.cps_step(v, x, s, i, noise_level=0.0),
    "euler": S.euler_step,
    "dpmpp_1": S.dpmpp_step,
    "ode": S.ode_step,
}

# every stochastic kernel, with the schedule it runs on
STOCHASTIC = {
    "ddim": (lambda: ddim_pair()[1], lambda *a, **k: S.ddim_step(*a, eta=1.0, **k)),
    "ddim_dpok": (lambda: ddim_pair()[1], lambda *a, **k: S.ddim_step(*a, eta=1.0, convention="dpok", **k)),
    "flow_sde": (lambda: flow_pair()[1], S.flow_sde_step),
    "dance_sde": (lambda: flow_pair()[1], S.dance_sde_step),
    "cps": (lambda: flow_pair()[1], S.cps_step),
    "cps_gauss": (lambda: flow_pair()[1], lambda *a, **k: S.cps_step(*a, true_gaussian=True, **k)),
    "dpmpp_sde": (lambda: flow_pair()[1], lambda *a, **k: S.dpmpp_step(*a, sde=True, **k)),
}


@pytest.mark.parametrize("name", FLOW_AT_ZERO)
def test_flow_kernels_at_noise_zero_equal_diffusers_euler(name):
    torch.manual_seed(0)
    sch, sched = flow_pair()
    x = torch.randn(SHAPE)
    for i, t in enumerate(sch.timesteps):
        v = torch.randn(SHAPE)
        ref = sch.step(v, t, x).prev_sample
        out = FLOW_AT_ZERO[name](v, x, sched, i)
        torch.testing.assert_close(out.prev_sample, ref, atol=1e-6, rtol=1e-6)
        assert torch.equal(out.log_prob, torch.zeros(SHAPE[0])) and not out.std.any()
        x = ref


@pytest.mark.parametrize("convention", ["ddpo", "dpok"])
def test_ddim_eta0_equals_diffusers_ddim(convention):
    torch.manual_seed(0)
    sch, sched = ddim_pair()
    x = torch.randn(SHAPE)
    for i, t in enumerate(sch.timesteps):
        eps = torch.randn(SHAPE)
        ref = sch.step(eps, t, x, eta=0.0).prev_sample
        out = S.ddim_step(eps, x, sched, i, eta=0.0, convention=convention)
        torch.testing.assert_close(out.prev_sample, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(S.ode_step(eps, x, sched, i).prev_sample, ref, atol=1e-6, rtol=1e-6)
        x = ref


def test_ddim_conventions_differ_only_at_last_step_with_alpha_to_one():
    sch, sched = ddim_pair(set_alpha_to_one=True)
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    last = sched.num_steps - 1
    ref = sch.step(eps, sch.timesteps[last], x, eta=0.0).prev_sample
    dpok = S.ddim_step(eps, x, sched, last, eta=0.0, convention="dpok").prev_sample
    ddpo = S.ddim_step(eps, x, sched, last, eta=0.0, convention="ddpo").prev_sample
    torch.testing.assert_close(dpok, ref, atol=1e-6, rtol=1e-6)
    assert (ddpo - ref).abs().max() > 1e-3  # DDPO lands on alphas_cumprod[0], not on 1
    for i in range(last):
        assert torch.equal(S.ddim_step(eps, x, sched, i, eta=0.0, convention="ddpo").prev_sample,
                           S.ddim_step(eps, x, sched, i, eta=0.0, convention="dpok").prev_sample)


def test_ddim_eta1_equals_diffusers_ddim_with_the_same_noise():
    torch.manual_seed(0)
    sch, sched = ddim_pair()
    x = torch.randn(SHAPE)
    for i, t in enumerate(sch.timesteps):
        eps, noise = torch.randn(SHAPE), torch.randn(SHAPE)
        ref = sch.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        out = S.ddim_step(eps, x, sched, i, eta=1.0, noise=noise)
        torch.testing.assert_close(out.prev_sample, ref, atol=1e-5, rtol=1e-5)
        x = ref


def test_dance_sde_is_flow_sde_with_a_rescaled_noise_level():
    # DanceGRPO's constant eta equals Flow-GRPO's a * sqrt(sigma / (1 - sigma)) with a = eta / sqrt(...)
    _, sched = flow_pair()
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    for i in range(1, sched.num_steps):
        s, sn = sched.sigmas[i], sched.sigmas[i + 1]
        a = 0.3 / torch.sqrt(s / (1 - s))
        for got, want in zip(S.dance_sde(v, x, s, sn, 0.3), S.flow_sde(v, x, s, sn, a)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cps_preserves_marginals_and_flow_sde_does_not():
    # point-mass data c with the exact velocity (x - c) / sigma: x_sigma = (1 - sigma) c + sigma * noise
    _, sched = flow_pair()
    c, n = 0.5, 20000
    gen = torch.Generator().manual_seed(0)
    for step, exact in ((S.cps_step, True), (S.flow_sde_step, False)):
        x = torch.randn(n, 1, generator=gen)
        ratios = []
        for i in range(sched.num_steps):
            x = step((x - c) / sched.sigmas[i], x, sched, i, generator=gen).prev_sample
            sn = sched.sigmas[i + 1]
            ratios.append((x - (1 - sn) * c).std().item() / sn.item() if sn > 0 else (x - c).abs().max().item())
        if exact:
            assert all(abs(r - 1) < 0.03 for r in ratios[:-1]) and ratios[-1] < 1e-5, ratios
        else:
            assert max(ratios[:-1]) > 1.2 and ratios[-1] > 0.01, ratios


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_equals_diffusers_dpmsolver_multistep(order, sde):
    # diffusers' flow grid for DPM-Solver differs from FlowMatchEuler's; build our Schedule from its sigmas
    sch = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                      algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
                                      solver_order=order, final_sigmas_type="zero")
    sch.set_timesteps(10)
    sched = Schedule("flow", timesteps=sch.timesteps.clone(), sigmas=sch.sigmas.clone())
    torch.manual_seed(0)
    x, x0_prev = torch.randn(SHAPE), None
    for i, t in enumerate(sch.timesteps):
        v, noise = torch.randn(SHAPE), torch.randn(SHAPE)
        ref = sch.step(v, t, x, variance_noise=noise).prev_sample
        out = S.dpmpp_step(v, x, sched, i, order=order, sde=sde, x0_prev=x0_prev, noise=noise)
        torch.testing.assert_close(out.prev_sample, ref, atol=1e-6, rtol=1e-6)
        x0_prev, x = x - sched.sigmas[i] * v, ref


def test_dpmpp_first_order_identities():
    # ODE DPM-Solver++(1) is Euler for rectified flow; the SDE form is CPS with sin(a pi/2) = sqrt(1 - e^{-2h})
    _, sched = flow_pair()
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    for i in range(1, sched.num_steps - 1):
        s, sn = sched.sigmas[i].item(), sched.sigmas[i + 1].item()
        torch.testing.assert_close(S.dpmpp_step(v, x, sched, i).mean, S.euler_step(v, x, sched, i).mean)
        e = sn * (1 - s) / (s * (1 - sn))
        a = 2 / math.pi * math.asin(math.sqrt(1 - e * e))
        m_sde, std_sde = S.dpmpp_1(v, x, s, sn, sde=True)
        m_cps, std_cps = S.cps(v, x, s, sn, a)
        torch.testing.assert_close(m_sde, m_cps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(std_sde, torch.as_tensor(std_cps), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_log_prob_is_the_gaussian_density(name):
    make, fn = STOCHASTIC[name]
    sched = make()
    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    for i in range(sched.num_steps - 1):  # the last step is deterministic for CPS
        out = fn(torch.randn(SHAPE), x, sched, i, generator=torch.Generator().manual_seed(i))
        assert out.log_prob.shape == (SHAPE[0],) and out.log_prob.dtype == torch.float32
        if name == "cps":  # official simplified definition
            expected = -((out.prev_sample - out.mean) ** 2).mean(dim=(1, 2, 3))
        else:
            expected = Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.log_prob, expected, atol=1e-5, rtol=1e-6)
        x = out.prev_sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", STOCHASTIC)
def test_recompute_with_prev_sample_is_exactly_the_rollout_log_prob(name, dtype):
    make, fn = STOCHASTIC[name]
    sched = make()
    torch.manual_seed(0)
    x = torch.randn(SHAPE).to(dtype)
    for i in range(sched.num_steps):
        out_model = torch.randn(SHAPE).to(dtype)
        roll = fn(out_model, x, sched, i, generator=torch.Generator().manual_seed(i))
        assert roll.prev_sample.dtype == dtype and roll.mean.dtype == torch.float32
        re = fn(out_model, x, sched, i, prev_sample=roll.prev_sample)
        assert torch.equal(re.log_prob, roll.log_prob)
        assert torch.equal(torch.exp(re.log_prob - roll.log_prob), torch.ones(SHAPE[0]))
        x = roll.prev_sample


def _velocity_net(dim: int, depth: int = 4) -> torch.nn.Module:
    """A small MLP whose outputs have the scale of a real velocity (noise - x0)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(dim + 1, 256)]
    for k in range(depth - 1):
        layers += [torch.nn.GELU(), torch.nn.Linear(256, dim if k == depth - 2 else 256)]
    net = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for layer in net[::2]:
            layer.weight.mul_(2.5)
    return net


@pytest.mark.parametrize("recompute", ["bf16_rounded_output", "bf16_autocast_model"])
def test_bf16_recompute_of_an_fp32_rollout_moves_the_log_ratio_past_the_clip_range(recompute):
    _, sched = flow_pair()
    net = _velocity_net(256)

    def velocity(x, i):
        flat = torch.cat([x.flatten(1), sched.sigmas[i].expand(x.shape[0], 1)], 1)
        return net(flat).view_as(x)

    x, worst = torch.randn(SHAPE), []
    with torch.no_grad():
        for i in range(sched.num_steps - 1):  # the steps Flow-GRPO trains
            v = velocity(x, i)
            roll = S.flow_sde_step(v, x, sched, i, generator=torch.Generator().manual_seed(i))
            same = S.flow_sde_step(v, x, sched, i, prev_sample=roll.prev_sample)
            assert torch.equal(same.log_prob, roll.log_prob)
            if recompute == "bf16_rounded_output":
                v_train = v.bfloat16()
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    v_train = velocity(x, i)
            re = S.flow_sde_step(v_train, x, sched, i, prev_sample=roll.prev_sample)
            worst.append((re.log_prob - roll.log_prob).abs().max().item())
            x = roll.prev_sample
    clip_range = 1e-4  # Flow-GRPO's and DDPO's
    assert 1 < v.std() < 3
    # rounding the output alone already leaves the clip band; a bf16 forward pass leaves it by far
    assert max(worst) > (2 if recompute == "bf16_rounded_output" else 10) * clip_range, worst


def test_cps_coefficients_preserve_the_marginal_level():
    _, sched = flow_pair()
    one = torch.ones(1, 1)
    for i in range(sched.num_steps):
        s, sn = sched.sigmas[i], sched.sigmas[i + 1]
        # the state whose x0_hat = x - s v is 1 and noise estimate x + (1 - s) v is 0, and the reverse
        x_a, v_a = (1 - s) * one, -one
        x_b, v_b = s * one, one
        for a in (0.0, 0.5, 0.8, 1.0, 1.8):
            coef_x0, std = S.cps(v_a, x_a, s, sn, a)
            coef_noise, _ = S.cps(v_b, x_b, s, sn, a)
            torch.testing.assert_close(coef_x0, (1 - sn).view(1, 1), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(coef_noise**2 + std**2, (sn**2).view(1, 1), atol=1e-6, rtol=1e-6)


def test_flow_sde_at_sigma_one_is_finite_and_uses_second_sigma():
    _, sched = flow_pair()
    assert sched.sigmas[0] == 1
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    out = S.flow_sde_step(v, x, sched, 0, noise_level=0.7)
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.log_prob).all()
    s1 = sched.sigmas[1]
    expected_std = 0.7 * torch.sqrt(1 / (1 - s1)) * torch.sqrt(1 - s1)
    torch.testing.assert_close(out.std.flatten(), expected_std.expand(SHAPE[0]))
    mean, _ = S.flow_sde(v, x, 1.0, s1, 0.7)  # without the substitution the step is infinite
    assert not torch.isfinite(mean).all()


PER_SAMPLE = {
    **STOCHASTIC,
    "euler": (lambda: flow_pair()[1], S.euler_step),
    "dpmpp_2": (lambda: flow_pair()[1], lambda *a, **k: S.dpmpp_step(*a, order=2, **k)),
}


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_per_sample_index_matches_a_loop_over_ints(name):
    make, fn = PER_SAMPLE[name]
    sched = make()
    torch.manual_seed(0)
    x, out_model, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    extra = {"x0_prev": torch.randn(SHAPE)} if name == "dpmpp_2" else {}
    idx = torch.tensor([0, 3, 5, sched.num_steps - 1])
    batched = fn(out_model, x, sched, idx, noise=noise, **extra)
    for b, i in enumerate(idx.tolist()):
        one = slice(b, b + 1)
        single = fn(out_model[one], x[one], sched, i, noise=noise[one], **{k: t[one] for k, t in extra.items()})
        for got, want in zip(batched, single):
            torch.testing.assert_close(got[one], want, atol=1e-6, rtol=1e-6)


def test_deterministic_steps_draw_no_noise_and_gradients_stay_finite():
    _, sched = flow_pair()
    x = torch.randn(SHAPE)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    S.euler_step(torch.randn(SHAPE), x, sched, 2, generator=gen)
    assert torch.equal(gen.get_state(), state)
    # a batch mixing CPS's deterministic last step with stochastic ones: log_prob 0 there, finite grads
    v = torch.randn(SHAPE, requires_grad=True)
    idx = torch.tensor([0, 4, 8, 9])
    roll = S.cps_step(v.detach(), x, sched, idx, true_gaussian=True, generator=gen)
    re = S.cps_step(v, x, sched, idx, true_gaussian=True, prev_sample=roll.prev_sample)
    assert re.log_prob[3] == 0 and re.std[3].item() == 0 and (re.std[:3] > 0).all()
    re.log_prob.sum().backward()
    assert torch.isfinite(v.grad).all() and not v.grad[3].any() and v.grad[:3].abs().sum() > 0


def test_bad_inputs_raise_value_errors():
    _, flow = flow_pair()
    _, eps = ddim_pair()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="schedule"):
        S.ddim_step(x, x, flow, 0)
    with pytest.raises(ValueError, match="schedule.prediction"):
        S.flow_sde_step(x, x, eps, 0)
    with pytest.raises(ValueError, match="i: step index out of range"):
        S.euler_step(x, x, flow, 10)
    with pytest.raises(ValueError, match="i: 3 step indices"):
        S.euler_step(x, x, flow, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="prev_sample"):
        S.flow_sde_step(x, x, flow, 0, prev_sample=x[:2])
    with pytest.raises(ValueError, match="eta"):
        S.ddim_step(x, x, eps, 0, eta=1.5)
