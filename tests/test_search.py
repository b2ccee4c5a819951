"""Tests for mleps.search: importance-sampled update estimates (d <= 10, fixed seeds)."""

import math

import pytest
import torch

from mleps.search import (
    PerturbationStats,
    Sample,
    SearchConfig,
    apply_perturbation_,
    draw_samples,
    estimate_update,
    importance_weights,
    regenerate_noise,
    write_update_,
)


def generator(seed):
    return torch.Generator().manual_seed(seed)


# -- problem 1: quadratic, p = N(-H⁻¹g, αH⁻¹) whose mean is the Newton step for every α ------

def quadratic_problem(dim=4, seed=0):
    gen = generator(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    hessian = basis @ torch.diag(torch.linspace(1.0, 3.0, dim, dtype=torch.float64)) @ basis.T
    gradient = torch.randn(dim, generator=gen, dtype=torch.float64)
    newton_step = -torch.linalg.solve(hessian, gradient).float()

    def task_loss(params):
        step = params[0].double()
        return float(gradient @ step + 0.5 * step @ hessian @ step)

    return gradient.float(), newton_step, task_loss


def quadratic_rms_error(temperature, num_samples, seeds, density="exact"):
    gradient, newton_step, task_loss = quadratic_problem()
    config = SearchConfig(num_samples=num_samples, density=density, temperature=temperature, proposal="mixture",
                          noise_mode="constant", noise_scale=1.5 * math.sqrt(temperature), guide_scale=0.5)
    squared = []
    for seed in seeds:
        delta, _ = estimate_update([torch.zeros(4)], task_loss, [gradient], config, generator(seed))
        squared.append(float((delta[0] - newton_step).square().sum()))
    return math.sqrt(sum(squared) / len(squared))


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_quadratic_estimate_converges_to_newton_step(temperature):
    error_small = quadratic_rms_error(temperature, 256, range(8))
    error_large = quadratic_rms_error(temperature, 4096, range(100, 102))
    # 16x the samples: 1/√K predicts a 4x smaller error.
    assert error_large < 0.5 * error_small
    assert error_large < 0.1 * math.sqrt(temperature)


def test_exact_density_is_consistent_where_wrong_densities_are_not():
    exact = quadratic_rms_error(1.0, 4096, range(100, 102), "exact")
    reference = quadratic_rms_error(1.0, 4096, range(100, 102), "mgs_reference")
    sphere = quadratic_rms_error(1.0, 1024, range(100, 102), "fixed_norm")
    assert exact < 0.09
    assert reference > 0.1 and reference > 2 * exact
    assert sphere > 0.3  # a different target (p on shells), by design


# -- problem 2: linear loss on the ball: the mean points along -g -----------------------------

def test_linear_loss_on_ball_points_along_negative_gradient():
    gradient = torch.randn(5, generator=generator(3))
    radius = 1.0

    def task_loss(params):
        step = params[0]
        return math.inf if float(step.norm()) > radius else float(gradient @ step)

    config = SearchConfig(num_samples=16384, density="exact", proposal="zero", noise_mode="constant",
                          noise_scale=0.7 * radius, temperature=0.3 * float(gradient.norm()))
    delta, info = estimate_update([torch.zeros(5)], task_loss, None, config, generator(4))
    cosine = float(torch.nn.functional.cosine_similarity(delta[0], -gradient, dim=0))
    assert cosine > 0.99
    assert float(delta[0].norm()) < radius


# -- α limits -------------------------------------------------------------------------------

def regenerate_displacements(params, guide, config, samples):
    displacements = []
    for sample in samples:
        zeros = [torch.zeros_like(p) for p in params]
        apply_perturbation_(zeros, guide, config, sample)
        displacements.append(zeros)
    return displacements


def test_small_temperature_returns_lowest_loss_sample():
    gradient, _, task_loss = quadratic_problem()
    config = SearchConfig(num_samples=16, temperature=1e-9, noise_scale=1.0)
    delta, info = estimate_update([torch.zeros(4)], task_loss, [gradient], config, generator(5))
    samples = draw_samples(config, generator(5))
    displacements = regenerate_displacements([torch.zeros(4)], [gradient], config, samples)
    best = int(torch.argmin(info["losses"]))
    torch.testing.assert_close(delta[0], displacements[best][0])
    assert info["ess"] == pytest.approx(1.0)


def test_large_temperature_with_zero_proposal_returns_nearly_zero():
    _, _, task_loss = quadratic_problem()
    config = SearchConfig(num_samples=4096, temperature=1e9, proposal="zero", noise_mode="constant", noise_scale=1.0)
    delta, info = estimate_update([torch.zeros(4)], task_loss, None, config, generator(6))
    assert info["ess"] > 0.99 * 4096
    assert float(delta[0].norm()) < 0.1 * math.sqrt(4)  # one sample has norm σ√d = 2; the mean ~2/64


# -- problem 4: 0-1 loss of a 1-D linear classifier on the disk ‖Δ‖ <= 1.5 ------------------

RADIUS, CLASSIFIER_TEMPERATURE = 1.5, 0.02


@pytest.fixture(scope="module")
def classifier_problem():
    inputs = torch.linspace(-2.0, 2.0, 20, dtype=torch.float64)
    labels = torch.where(inputs > 0.7, 1.0, -1.0).double()
    theta = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def zero_one(w, b):
        return ((w.unsqueeze(-1) * inputs + b.unsqueeze(-1)) * labels <= 0).double().mean(-1)

    def task_loss(params):
        step = params[0].double()
        return math.inf if float(step.norm()) > RADIUS else float(zero_one(theta[0] + step[0], theta[1] + step[1]))

    margins = labels * (theta[0] * inputs + theta[1])
    features = torch.stack([inputs, torch.ones_like(inputs)], -1)
    surrogate_gradient = ((-labels * torch.sigmoid(-margins)).unsqueeze(-1) * features).mean(0).float()

    # Brute force: quadrature of exp(-Δl/α) Δ over the disk.
    axis = torch.linspace(-RADIUS, RADIUS, 1201, dtype=torch.float64)
    grid_w, grid_b = torch.meshgrid(axis, axis, indexing="ij")
    inside = grid_w.square() + grid_b.square() <= RADIUS**2
    log_density = -(zero_one(theta[0] + grid_w, theta[1] + grid_b) - float(zero_one(theta[0], theta[1])))
    density = torch.where(inside, (log_density / CLASSIFIER_TEMPERATURE).exp(), torch.zeros_like(log_density))
    target_mean = torch.stack([(density * grid_w).sum(), (density * grid_b).sum()]).float() / density.sum()
    return task_loss, surrogate_gradient, target_mean


def classifier_rms_error(problem, proposal_settings, num_samples, seeds):
    task_loss, surrogate_gradient, target_mean = problem
    config = SearchConfig(num_samples=num_samples, density="exact", temperature=CLASSIFIER_TEMPERATURE,
                          noise_mode="constant", **proposal_settings)
    squared = []
    for seed in seeds:
        delta, _ = estimate_update([torch.zeros(2)], task_loss, [surrogate_gradient], config, generator(seed))
        squared.append(float((delta[0] - target_mean).square().sum()))
    return math.sqrt(sum(squared) / len(squared))


def test_zero_one_loss_mixture_matches_brute_force_with_fewer_samples(classifier_problem):
    mixture = dict(proposal="mixture", noise_scale=0.5, guide_scale=6.0)
    zero = dict(proposal="zero", noise_scale=RADIUS)
    mixture_error = classifier_rms_error(classifier_problem, mixture, 1024, range(6))
    zero_error_same_budget = classifier_rms_error(classifier_problem, zero, 1024, range(6))
    mixture_error_long = classifier_rms_error(classifier_problem, mixture, 8192, range(1))
    assert mixture_error < 0.075 < zero_error_same_budget
    assert mixture_error_long < 0.05


# -- unit tests -----------------------------------------------------------------------------

def make_model(seed=7):
    gen = generator(seed)
    params = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen).to(torch.bfloat16), torch.randn(2, 2, 2, generator=gen)]
    guide = [torch.randn(p.shape, generator=gen) * 0.1 for p in params]
    return params, guide


@pytest.mark.parametrize("density", ["fixed_norm", "exact"])
def test_apply_then_restore_is_bit_exact(density):
    params, guide = make_model()
    backup = [p.clone() for p in params]
    config = SearchConfig(density=density)
    sample = draw_samples(config, generator(1))[-1]
    stats = apply_perturbation_(params, guide, config, sample)
    assert all(not torch.equal(p, b) for p, b in zip(params, backup))
    assert stats.delta_norm > 0
    with torch.no_grad():
        for p, b in zip(params, backup):
            p.copy_(b)
    assert all(torch.equal(p, b) for p, b in zip(params, backup))


def test_noise_is_regenerated_from_seed_and_index_alone():
    params, guide = make_model()
    config = SearchConfig(density="exact", proposal="zero", noise_mode="constant", noise_scale=0.5)
    sample = Sample(perturbation_seed=123456789, component=0)
    again = regenerate_noise(sample, 2, params[2], config)
    torch.testing.assert_close(regenerate_noise(sample, 2, params[2], config), again, rtol=0, atol=0)
    assert not torch.equal(regenerate_noise(sample, 0, params[0], config).flatten()[:8], again.flatten())
    # The displacement that apply_perturbation_ adds to tensor 2 is σ z for that (seed, 2).
    zeros = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    apply_perturbation_(zeros, None, config, sample)
    torch.testing.assert_close(zeros[2], 0.5 * again, rtol=0, atol=0)
    fixed = regenerate_noise(sample, 2, params[2], SearchConfig(density="fixed_norm"))
    assert float(fixed.square().sum()) == pytest.approx(fixed.numel(), rel=1e-5)


def test_write_update_into_buffers_aliasing_the_guide():
    params, guide = make_model()
    config = SearchConfig(num_samples=5)
    samples = draw_samples(config, generator(2))
    log_weights = torch.log_softmax(torch.randn(5, generator=generator(3), dtype=torch.float64), 0)
    separate = [torch.zeros_like(g) for g in guide]
    norm_separate = write_update_(separate, [g.clone() for g in guide], config, samples, log_weights)
    norm_aliased = write_update_(guide, guide, config, samples, log_weights)
    for a, b in zip(guide, separate):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert norm_aliased == pytest.approx(norm_separate)
    # And it is Σ_k w_k Δ_k with the Δ_k that apply_perturbation_ adds.
    _, fresh_guide = make_model()
    displacements = regenerate_displacements([torch.zeros_like(g) for g in fresh_guide], fresh_guide, config, samples)
    expected = sum(w * d[0] for w, d in zip(log_weights.exp().tolist(), displacements))
    torch.testing.assert_close(separate[0], expected, rtol=1e-5, atol=1e-7)


def test_estimate_update_is_deterministic_given_generator():
    gradient, _, task_loss = quadratic_problem()
    run = lambda seed: estimate_update([torch.zeros(4)], task_loss, [gradient], SearchConfig(num_samples=8), generator(seed))
    (first, info_first), (second, _), (other, _) = run(11), run(11), run(12)
    assert torch.equal(first[0], second[0])
    assert not torch.equal(first[0], other[0])
    for key in ("losses", "base_loss", "log_weights", "ess", "components", "weight_entropy",
                "guided_weight", "noise_norm", "update_norm"):
        assert key in info_first
    assert info_first["update_norm"] == pytest.approx(float(first[0].norm()), rel=1e-5)


def stub_stats(noise_sq_norm, noise_dot_scaled_mean, scaled_mean_sq_norm=2.0):
    return PerturbationStats(noise_sq_norm, noise_dot_scaled_mean, scaled_mean_sq_norm, 1.0, 0.5, 4.0)


def test_weights_do_not_overflow_for_losses_far_apart():
    config = SearchConfig(num_samples=3, density="exact", proposal="zero", noise_mode="constant", temperature=1.0)
    samples = [Sample(1, 0), Sample(2, 0), Sample(3, 0)]
    stats = [stub_stats(3.0, 0.0)] * 3
    log_weights, info = importance_weights(config, samples, [-1e4, 0.0, 1e4], 0.0, stats)
    assert torch.isfinite(log_weights[:2]).all()
    assert float(log_weights[0]) == 0.0 and info["ess"] == 1.0
    log_weights, _ = importance_weights(config, samples, [1e4, 1e4 + 1.0, 2e4], 1e4, stats)
    assert math.isfinite(float(log_weights.exp().sum())) and float(log_weights.exp().sum()) == pytest.approx(1.0)


def test_weights_with_three_stubbed_losses_match_hand_computation():
    config = SearchConfig(num_samples=3, density="exact", proposal="mixture", mixture_weight=0.25,
                          stratify_components=False, noise_mode="constant", temperature=0.5)
    samples = [Sample(1, 0), Sample(2, 1), Sample(3, 1)]
    stats = [stub_stats(3.0, 0.5), stub_stats(2.0, -1.0), stub_stats(5.0, 0.0)]
    losses, base_loss = [1.0, 0.5, 2.0], 1.2
    log_weights, info = importance_weights(config, samples, losses, base_loss, stats)

    def log_q(noise_sq, cross, component, mean_sq=2.0, lam=0.25):
        # exp(-d0/2), exp(-d1/2) with d0 = ‖Δ/σ‖², d1 = ‖Δ/σ - m‖²
        d0 = noise_sq if component == 0 else noise_sq + 2 * cross + mean_sq
        d1 = noise_sq - 2 * cross + mean_sq if component == 0 else noise_sq
        return math.log(lam * math.exp(-d0 / 2) + (1 - lam) * math.exp(-d1 / 2))

    raw = [math.exp(-(l - base_loss) / 0.5 - log_q(s.noise_sq_norm, s.noise_dot_scaled_mean, c.component))
           for l, s, c in zip(losses, stats, samples)]
    expected = [r / sum(raw) for r in raw]
    assert log_weights.exp().tolist() == pytest.approx(expected, rel=1e-12)
    assert info["guided_weight"] == pytest.approx(expected[1] + expected[2])
    assert info["ess"] == pytest.approx(1 / sum(w * w for w in expected))


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_samples=0), "num_samples"), (dict(noise_scale=0.0), "noise_scale"), (dict(temperature=-1.0), "temperature"),
    (dict(mixture_weight=1.5), "mixture_weight"), (dict(proposal="best"), "proposal"), (dict(density="approx"), "density"),
    (dict(temperature=0.1, beta=5.0), "beta"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SearchConfig(**kwargs)


def test_beta_is_inverse_temperature_and_guide_is_required():
    assert SearchConfig(beta=100.0).temperature == pytest.approx(0.01)
    assert SearchConfig(temperature=0.5, beta=2.0).temperature == 0.5
    with pytest.raises(ValueError, match="guide"):
        estimate_update([torch.zeros(3)], lambda p: 0.0, None, SearchConfig())


# -- levers: target ESS, rank weighting, antithetic pairs, line search ---------------------------

def test_temperature_for_ess_matches_the_two_sample_closed_form():
    """Two samples, losses 0 and d, constant density: w = (p, 1-p) with p = 1/(1+e^{-d/α}) and
    ESS = 1/(p² + (1-p)²).  For ESS = 1.5: p² + (1-p)² = 2/3, p = (1 + 1/√3)/2, α = d / log(p/(1-p))."""
    from mleps.search import temperature_for_ess

    d = 0.02
    p = (1 + 1 / math.sqrt(3)) / 2
    expected = d / math.log(p / (1 - p))
    alpha = temperature_for_ess(torch.tensor([0.0, d], dtype=torch.float64), torch.zeros(2), 1.5)
    assert alpha == pytest.approx(expected, rel=1e-6)
    # out-of-range targets give the nearest end: uniform (α huge) or all on the best (α tiny)
    assert temperature_for_ess(torch.tensor([0.0, d]), torch.zeros(2), 2.0) > 1e6 * d
    assert temperature_for_ess(torch.tensor([0.0, d]), torch.zeros(2), 0.5) < 1e-6 * d


def test_target_ess_weights_hit_the_target():
    config = SearchConfig(num_samples=8, proposal="zero", noise_mode="constant", target_ess=0.5)
    samples = draw_samples(config, generator(0))
    losses = [0.5 + 0.01 * k * (-1) ** k for k in range(8)]
    stats = [PerturbationStats(1.0, 0.0, 0.0, 1.0, 0.0, 0.0)] * 8
    _, info = importance_weights(config, samples, losses, 0.5, stats)
    assert info["ess"] == pytest.approx(4.0, rel=1e-6)
    assert info["temperature"] != config.temperature


def test_rank_weighting_is_a_softmax_over_ranks_and_ignores_loss_scale():
    from mleps.search import rank_losses

    # ranks 0..3 with a tie at 0.3 (ranks 1 and 2 -> 1.5), scaled by the top rank 3
    assert rank_losses(torch.tensor([0.3, 0.1, 0.3, 0.9])).tolist() == pytest.approx([0.5, 0.0, 0.5, 1.0])
    config = SearchConfig(num_samples=4, proposal="zero", noise_mode="constant", weighting="rank", temperature=0.5)
    samples = draw_samples(config, generator(0))
    stats = [PerturbationStats(1.0, 0.0, 0.0, 1.0, 0.0, 0.0)] * 4
    small, _ = importance_weights(config, samples, [0.50, 0.49, 0.51, 0.52], 0.5, stats)
    large, _ = importance_weights(config, samples, [0.5, 0.1, 0.9, 30.0], 0.5, stats)
    assert torch.allclose(small, large)  # same order, same weights
    expected = torch.softmax(-torch.tensor([1 / 3, 0.0, 2 / 3, 1.0], dtype=torch.float64) / 0.5, 0)
    assert torch.allclose(small.exp(), expected)


def test_antithetic_pairs_mirror_the_noise_around_the_same_centre():
    config = SearchConfig(num_samples=4, proposal="mixture", noise_mode="constant", noise_scale=0.1,
                          antithetic=True, guide_scale=1.0)
    samples = draw_samples(config, generator(0))
    assert [(s.component, s.sign) for s in samples] == [(0, 1), (0, -1), (1, 1), (1, -1)]
    assert samples[0].perturbation_seed == samples[1].perturbation_seed
    guide = [torch.randn(3, 2, generator=generator(1))]
    deltas = []
    for sample in samples:
        params = [torch.zeros(3, 2)]
        apply_perturbation_(params, guide, config, sample)
        deltas.append(params[0])
    assert torch.allclose(deltas[0], -deltas[1])
    centre = -guide[0]
    assert torch.allclose(deltas[2] - centre, -(deltas[3] - centre), atol=1e-6)
    # equal weights on a pair cancel its noise: the update is the weighted centre
    out = [torch.zeros(3, 2)]
    write_update_(out, guide, config, samples, torch.full((4,), math.log(0.25), dtype=torch.float64))
    assert torch.allclose(out[0], 0.5 * centre, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        SearchConfig(num_samples=3, antithetic=True)


def test_line_search_samples_sit_on_the_guide_and_carry_the_update():
    """A loss minimised at 2μ along the guide: the line-search sample s = 2 wins and the update is
    (almost) 2μ; with fixed_norm the line samples' density is their share of all samples."""
    guide = [torch.tensor([1.0, -2.0, 0.5])]
    target = -2.0 * guide[0]

    def task_loss(params):
        return float((params[0] - target).square().sum())

    config = SearchConfig(num_samples=4, proposal="mixture", noise_mode="constant", noise_scale=0.3,
                          line_search_scales=(0.5, 1.0, 2.0, 4.0), temperature=0.01)
    samples = draw_samples(config, generator(0))
    assert len(samples) == 8 and [s.mean_scale for s in samples if not s.noise] == [0.5, 1.0, 2.0, 4.0]
    delta, info = estimate_update([torch.zeros(3)], task_loss, guide, config, generator(0))
    assert torch.allclose(delta[0], target, atol=1e-3)
    assert info["line_search_weight"] > 0.99
    with pytest.raises(ValueError, match="line_search_scales"):
        SearchConfig(density="exact", line_search_scales=(1.0,))


def test_spearman_known_values():
    from mleps.search import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
