"""Flow math on a Gaussian toy where everything is known in closed form.

Data z0 ~ N(mu, s^2) per dimension; z_t = (1-t) z0 + t eps has mean m_t = (1-t) mu, variance
V_t = (1-t)^2 s^2 + t^2, and the exact marginal velocity v(z, t) = -mu + V_t'/(2 V_t) (z - m_t).
"""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from stitchvm_rl import flow

MU, S = 1.5, 0.5


def mean_var(t):
    return (1 - t) * MU, (1 - t) ** 2 * S**2 + t**2


def exact_velocity(z, t):
    t = t.view(-1, *([1] * (z.dim() - 1))).double()
    m, var = mean_var(t)
    dvar = -2 * (1 - t) * S**2 + 2 * t
    return (-MU + dvar / (2 * var) * (z.double() - m)).to(z.dtype)


def noise(n=20000, d=4, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_marginal(z, t, n_sigma=5.0, slack=0.0):
    """Sample mean and variance match the flow marginal at t within sampling error (+ slack)."""
    m, var = mean_var(t)
    n = z.numel()
    assert abs(z.mean().item() - m) < n_sigma * math.sqrt(var / n) + slack
    assert abs(z.var().item() - var) < n_sigma * var * math.sqrt(2 / n) + slack


def test_sd3_schedule_is_the_shifted_flow_schedule():
    sigmas = flow.sd3_sigmas(25, shift=3.0)
    assert len(sigmas) == 26 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    # exactly the timesteps StableDiffusion3Pipeline feeds the transformer (/1000)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(25)
    assert torch.allclose(sigmas[:-1], scheduler.timesteps / 1000, atol=1e-6)
    # the shift moves steps towards noise
    assert bool((sigmas[1:-1] > flow.sd3_sigmas(25, shift=1.0)[1:-1]).all())


def test_euler_with_exact_velocity_reaches_the_exact_marginal():
    traj = flow.euler_ode(exact_velocity, noise(), torch.linspace(1, 0, 401, dtype=torch.float64))
    assert traj.latents.shape == (401, 20000, 4)
    assert_marginal(traj.final, 0.0, slack=0.01)
    assert_marginal(traj.latents[200], float(traj.sigmas[200]), slack=0.01)  # midway too


def test_sde_with_exact_score_reaches_the_exact_marginal():
    gen = torch.Generator().manual_seed(1)
    traj = flow.flow_sde(exact_velocity, noise(), torch.linspace(1, 0, 801, dtype=torch.float64), noise_level=0.7, generator=gen)
    assert_marginal(traj.final, 0.0, slack=0.02)
    # it is really stochastic: the same start gives another endpoint with another generator
    other = flow.flow_sde(exact_velocity, noise()[:100], torch.linspace(1, 0, 51, dtype=torch.float64), generator=torch.Generator().manual_seed(2))
    again = flow.flow_sde(exact_velocity, noise()[:100], torch.linspace(1, 0, 51, dtype=torch.float64), generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(other.final, again.final)


def test_dpm2_converges_to_the_fine_euler_endpoint_and_beats_coarse_euler():
    z1 = noise(2000)
    reference = flow.euler_ode(exact_velocity, z1, torch.linspace(1, 0, 4001, dtype=torch.float64)).final

    def err(sampler, steps):
        return (sampler(exact_velocity, z1, torch.linspace(1, 0, steps + 1, dtype=torch.float64)).final - reference).abs().max().item()

    assert err(flow.dpm2, 100) < 5e-3
    assert err(flow.dpm2, 200) < err(flow.dpm2, 50) / 3  # converges, faster than first order
    assert err(flow.dpm2, 25) < err(flow.euler_ode, 25) / 3  # second order really is better at equal steps


@pytest.mark.parametrize("sampler", [flow.euler_ode, flow.dpm2])
def test_stopping_after_k_returns_the_latent_at_sigma_k(sampler):
    sigmas = flow.sd3_sigmas(25).double()
    z1 = noise(50)
    full = sampler(exact_velocity, z1, sigmas)
    part = sampler(exact_velocity, z1, sigmas, stop_after=12)
    assert len(part.latents) == 13 and part.sigmas[-1] == sigmas[12]
    assert torch.equal(part.final, full.latents[12])
    assert torch.equal(part.latents, full.latents[:13])
    with pytest.raises(ValueError, match="outside the schedule"):
        sampler(exact_velocity, z1, sigmas, stop_after=26)


def test_sde_stops_at_sigma_k_on_the_marginal():
    sigmas = torch.linspace(1, 0, 401, dtype=torch.float64)
    traj = flow.flow_sde(exact_velocity, noise(), sigmas, stop_after=200, generator=torch.Generator().manual_seed(4))
    assert len(traj.latents) == 201
    assert_marginal(traj.final, float(sigmas[200]), slack=0.02)


def test_conversions_match_the_gaussian_posterior():
    t = torch.full((20000,), 0.6, dtype=torch.float64)
    z = noise()
    v = exact_velocity(z, t)
    m, var = mean_var(0.6)
    score = -(z - m) / var
    x0 = MU + (1 - 0.6) * S**2 / var * (z - m)
    tc = t.view(-1, 1)
    assert torch.allclose(-((1 - tc) * v + z) / tc, score, atol=1e-10)  # grad log p_t(z_t) from v (paper eq. 25)
    assert torch.allclose(-(tc * score + z) / (1 - tc), v, atol=1e-10)  # and back
    assert torch.allclose(flow.tweedie_x0(z, t, v), x0, atol=1e-10)
    eps = flow.noise_from_velocity(z, t, v)
    assert torch.allclose((1 - 0.6) * flow.tweedie_x0(z, t, v) + 0.6 * eps, z, atol=1e-10)


def test_bridge_at_tau_zero_is_plain_flow_matching():
    t = torch.tensor([0.1, 0.5, 0.9])
    c = flow.bridge_coefficients(t, torch.zeros(3))
    assert torch.allclose(c.alpha, 1 - t) and torch.allclose(c.sigma, t)
    assert torch.allclose(c.dalpha, -torch.ones(3)) and torch.allclose(c.dsigma, torch.ones(3))
    z0, eps = noise(3, seed=1).float(), noise(3, seed=2).float()
    z_t, u = flow.bridge_sample(z0, torch.zeros(3), t, eps)
    assert torch.allclose(u, eps - z0, atol=1e-6)
    assert torch.allclose(z_t, (1 - t[:, None]) * z0 + t[:, None] * eps, atol=1e-6)


def test_bridge_from_tau_keeps_the_marginal_and_its_target_averages_to_the_velocity():
    n, tau, t = 400000, 0.4, 0.7
    g = torch.Generator().manual_seed(5)
    z0 = MU + S * torch.randn(n, generator=g, dtype=torch.float64)
    z_tau = (1 - tau) * z0 + tau * torch.randn(n, generator=g, dtype=torch.float64)
    z_t, u = flow.bridge_sample(z_tau, torch.full((n,), tau), torch.full((n,), t), torch.randn(n, generator=g, dtype=torch.float64))
    assert_marginal(z_t, t)
    # E[u | z_t] is linear in z_t (all Gaussian): regress and compare with the exact velocity field
    design = torch.stack([torch.ones(n, dtype=torch.float64), z_t], 1)
    coef = torch.linalg.lstsq(design, u.double().unsqueeze(1)).solution.squeeze(1)
    probe = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(coef[0] + coef[1] * probe, exact_velocity(probe, torch.full((4,), t)), atol=0.01)


def test_bridge_refuses_t_at_or_below_tau():
    with pytest.raises(ValueError, match="t > tau"):
        flow.bridge_coefficients(torch.tensor([0.5]), torch.tensor([0.5]))
