"""PF-ODE log-likelihood (lightning_methods.ood.likelihood) and the SDEs: analytic Gaussian cases, Hutchinson
probes, and golden values of the official RDM code (limchaos/Likelihood-OOD ``get_likelihood_fn``)."""

from __future__ import annotations

import math

import pytest
import torch
from ood_helpers import OFFICIAL_PROBE, official_net

from lightning_methods.ood.likelihood import hutchinson_probes, pf_ode_likelihood
from lightning_methods.ood.sde import VESDE, VPSDE, SubVPSDE, make_sde


def gaussian_score(sde, cov):
    """True score of the VP marginals of data ~ N(0, cov): -(a^2 cov + (1 - a^2) I)^-1 z."""
    eye = torch.eye(len(cov), dtype=torch.float64)

    def score(z, t):
        a2 = sde.mean_coeff(t) ** 2
        v = a2[:, None, None] * cov + (1 - a2)[:, None, None] * eye
        return -torch.linalg.solve(v, z.unsqueeze(-1)).squeeze(-1)

    return score


def gaussian_logpdf(x, cov):
    return torch.distributions.MultivariateNormal(torch.zeros(len(cov), dtype=torch.float64), cov).log_prob(x)


@pytest.mark.parametrize("s", [1.0, 0.5, 1.5])
def test_isotropic_gaussian_exact_and_hutchinson(s):
    """Data ~ N(0, s^2 I): the VP marginal variance is a^2 s^2 + 1 - a^2 and the true score -z / v_t; the solver
    must return log N(x; 0, s^2 I) within 1e-3 per dimension (exact trace and Hutchinson)."""
    sde, d = VPSDE(), 6
    cov = s**2 * torch.eye(d, dtype=torch.float64)
    x = torch.randn(32, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s
    true = gaussian_logpdf(x, cov)
    for trace in ("exact", "hutchinson"):
        res = pf_ode_likelihood(gaussian_score(sde, cov), sde, x, trace=trace)
        assert ((res.logp - true).abs() / d).max() < 1e-3, trace
    if s == 1.0:  # the drift vanishes: the flow is the identity
        res = pf_ode_likelihood(gaussian_score(sde, cov), sde, x)
        torch.testing.assert_close(res.logp, true, atol=1e-12, rtol=0)


def test_full_covariance_hutchinson_converges_with_probes():
    """A non-diagonal covariance makes Rademacher probes noisy; their average converges to the exact trace."""
    sde, d = VPSDE(), 4
    g = torch.Generator().manual_seed(1)
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    cov = a @ a.T / d + 0.3 * torch.eye(d, dtype=torch.float64)
    x = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), cov).sample((16,))
    true = gaussian_logpdf(x, cov)
    exact = pf_ode_likelihood(gaussian_score(sde, cov), sde, x, trace="exact")
    assert ((exact.logp - true).abs() / d).max() < 1e-3
    one = pf_ode_likelihood(gaussian_score(sde, cov), sde, x, trace="hutchinson", n_probes=1)
    many = pf_ode_likelihood(gaussian_score(sde, cov), sde, x, trace="hutchinson", n_probes=256)
    err_one, err_many = (one.logp - true).abs().mean(), (many.logp - true).abs().mean()
    assert err_one > 5 * ((exact.logp - true).abs().mean())  # one probe is visibly noisy
    assert err_many < err_one / 4 and ((many.logp - true).abs() / d).max() < 0.05


def test_matches_official_rdm_likelihood_float32():
    """Same network weights and probes as the official get_likelihood_fn (fehlberg2, rtol = atol = 1e-5, eps 1e-5,
    float32 state): NLL per dimension to float32 precision."""
    net = official_net()
    x = torch.linspace(-1.5, 1.5, 3 * 6).reshape(3, 6)
    golden = {"vp": [5.993587970733643, 6.097275257110596, 6.000433444976807],
              "subvp": [5.994418621063232, 6.095662593841553, 6.001436233520508]}
    for name, expected in golden.items():
        sde = make_sde(name)
        def fn(z, t, sde=sde):
            return sde.score(net(z, sde.time_input(t)), t)

        res = pf_ode_likelihood(fn, sde, x, probes=OFFICIAL_PROBE[None], state_dtype=torch.float32)
        torch.testing.assert_close(res.nll_per_dim, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
        res64 = pf_ode_likelihood(fn, sde, x, probes=OFFICIAL_PROBE[None])  # float64 state: same to solver tolerance
        torch.testing.assert_close(res64.nll_per_dim, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


def test_probes_depend_on_sample_index_only():
    p = hutchinson_probes(torch.tensor([5, 9, 2]), 7, n_probes=2, seed=3)
    q = hutchinson_probes(torch.tensor([2, 5]), 7, n_probes=2, seed=3)
    torch.testing.assert_close(p[:, 0], q[:, 1])
    torch.testing.assert_close(p[:, 2], q[:, 0])
    assert set(p.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(p[:, 0], hutchinson_probes(torch.tensor([5]), 7, n_probes=2, seed=4)[:, 0])
    g = hutchinson_probes(torch.arange(2000), 3, kind="gaussian")
    assert abs(g.std().item() - 1) < 0.05
    with pytest.raises(ValueError, match="probe kind"):
        hutchinson_probes(torch.arange(2), 3, kind="sphere")


def test_sde_marginals_and_priors():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    vp, sub, ve = VPSDE(0.2, 20.0), SubVPSDE(0.2, 20.0), VESDE(0.01, 50.0)
    log_a = -0.25 * t**2 * 19.8 - 0.5 * t * 0.2
    torch.testing.assert_close(vp.mean_coeff(t), torch.exp(log_a))
    torch.testing.assert_close(vp.marginal_std(t) ** 2, 1 - torch.exp(2 * log_a))
    torch.testing.assert_close(sub.marginal_std(t), 1 - torch.exp(2 * log_a))
    # d/dt Var = -beta Var + g^2 for the VP marginal of unit-variance data stays at Var = 1 (VP preserves N(0, I))
    torch.testing.assert_close(vp.diffusion(t) ** 2, vp.beta(t))
    torch.testing.assert_close(ve.marginal_std(t), 0.01 * 5000**t)
    z = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    assert ve.prior_logp(z).item() == pytest.approx(-math.log(2 * math.pi * 2500) - 5 / 5000)
    assert vp.prior_logp(z).item() == pytest.approx(-math.log(2 * math.pi) - 2.5)
    with pytest.raises(ValueError, match="unknown SDE"):
        make_sde("cld")


def test_bad_input():
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        pf_ode_likelihood(lambda z, t: -z, sde, torch.zeros(3))
    with pytest.raises(ValueError, match="probes must have shape"):
        pf_ode_likelihood(lambda z, t: -z, sde, torch.zeros(2, 3), probes=torch.ones(1, 2, 4))


def test_subvp_analytic_gaussian_and_its_marginals_are_not_standard():
    """Sub-VP: data ~ N(0, s^2 I) has marginal variance v_t = a^2 s^2 + (1 - a^2)^2 (< 1 for s = 1: the marginals do
    not stay N(0, I)); with the true score -z / v_t the solver returns log N(x; 0, s^2 I) within 1e-3 per dimension,
    which checks g(t)^2 = beta (1 - a^4) against the marginal std 1 - a^2."""
    sde, d = SubVPSDE(), 4
    t = torch.tensor([0.3], dtype=torch.float64)
    a2 = sde.mean_coeff(t) ** 2
    assert float(a2 + (1 - a2) ** 2) < 1 - 1e-2
    for s in (1.0, 0.5):
        def score(z, t, s=s):
            a2 = sde.mean_coeff(t) ** 2
            return -z / (a2 * s**2 + (1 - a2) ** 2)[:, None]

        x = torch.randn(16, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * s
        true = gaussian_logpdf(x, s**2 * torch.eye(d, dtype=torch.float64))
        res = pf_ode_likelihood(score, sde, x, trace="exact")
        assert ((res.logp - true).abs() / d).max() < 1e-3, s
