"""Measure the tables in docs/sampling-view.md.

    .venv/bin/python scripts/sampling_view_tables.py [quadratic|densities|ess|classifier|all]

CPU, fixed seeds; about two minutes for "all" on two cores.
"""

import math
import sys
import time

import torch

from mleps.search import SearchConfig, apply_perturbation_, draw_samples, estimate_update, importance_weights

torch.set_num_threads(1)


# -- problem 1: quadratic l(Δ) = gᵀΔ + ½ΔᵀHΔ, p = N(-H⁻¹g, αH⁻¹) -----------------------------

def quadratic_problem(dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    hessian = basis @ torch.diag(torch.linspace(1.0, 3.0, dim, dtype=torch.float64)) @ basis.T
    gradient = torch.randn(dim, generator=gen, dtype=torch.float64)
    newton_step = -torch.linalg.solve(hessian, gradient)

    def task_loss(params):
        step = params[0].double()
        return float(gradient @ step + 0.5 * step @ hessian @ step)

    return gradient.float(), hessian, newton_step.float(), task_loss


def quadratic_config(temperature, num_samples, density="exact"):
    # σ = 1.5√α covers p (whose widest std is √α since eig(H) >= 1); guided centre -g/2.
    return SearchConfig(
        num_samples=num_samples, density=density, temperature=temperature, proposal="mixture",
        noise_mode="constant", noise_scale=1.5 * math.sqrt(temperature), guide_scale=0.5,
    )


def quadratic_rms_error(temperature, num_samples, seeds, density="exact"):
    gradient, _, newton_step, task_loss = quadratic_problem()
    config = quadratic_config(temperature, num_samples, density)
    squared = []
    for seed in seeds:
        delta, _ = estimate_update([torch.zeros(4)], task_loss, [gradient], config, torch.Generator().manual_seed(seed))
        squared.append(float((delta[0] - newton_step).square().sum()))
    return math.sqrt(sum(squared) / len(squared))


def table_quadratic():
    print("| K | α = 0.1 | α = 1 | α = 10 |")
    print("|---|---|---|---|")
    for num_samples in (64, 256, 1024, 4096, 16384):
        errors = [quadratic_rms_error(a, num_samples, range(8)) for a in (0.1, 1.0, 10.0)]
        print(f"| {num_samples} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")


def table_densities():
    print("| density | K = 1024 | K = 16384 |")
    print("|---|---|---|")
    for density in ("exact", "none", "mgs_reference", "fixed_norm"):
        errors = [quadratic_rms_error(1.0, k, range(8), density) for k in (1024, 16384)]
        print(f"| {density} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")


# -- ESS with a constant loss: what the proposal density alone does to the weights -----------

def mean_ess(dim, density, noise_mode, noise_scale, trials, num_samples=4):
    gen = torch.Generator().manual_seed(dim)
    total = 0.0
    for _ in range(trials):
        guide = [torch.randn(dim, generator=gen) * 1e-3]  # gradient-sized entries
        config = SearchConfig(num_samples=num_samples, density=density, noise_mode=noise_mode,
                              noise_scale=noise_scale, temperature=1.0)
        samples = draw_samples(config, gen)
        stats = [apply_perturbation_([torch.zeros(dim)], guide, config, s) for s in samples]
        _, info = importance_weights(config, samples, [0.0] * num_samples, 0.0, stats)
        total += info["ess"]
    return total / trials


def table_ess():
    settings = [("exact", "relative", 1.0), ("fixed_norm", "relative", 1.0),
                ("mgs_reference", "relative", 1.0), ("mgs_reference", "constant", 1.0)]
    print("| d | " + " | ".join(f"{d} ({m}, σ={s:g})" for d, m, s in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for dim in (10, 100, 1000, 10_000, 100_000, 1_000_000):
        trials = 200 if dim <= 10_000 else 20
        cells = [mean_ess(dim, d, m, s, trials) for d, m, s in settings]
        print(f"| {dim} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


# -- problem 4: 0-1 loss of a 1-D linear classifier, θ = (w, b), on the disk ‖Δ‖ <= ε --------

RADIUS = 1.5
TEMPERATURE = 0.02


def classifier_problem():
    inputs = torch.linspace(-2.0, 2.0, 20, dtype=torch.float64)
    labels = torch.where(inputs > 0.7, 1.0, -1.0).double()
    theta = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def zero_one(w, b):  # broadcasts over grids of (w, b)
        scores = w.unsqueeze(-1) * inputs + b.unsqueeze(-1)
        return (scores * labels <= 0).double().mean(-1)

    def task_loss(params):
        step = params[0].double()
        if step.norm() > RADIUS:
            return math.inf
        return float(zero_one(theta[0] + step[0], theta[1] + step[1]))

    margins = labels * (theta[0] * inputs + theta[1])
    logistic_grad = (-labels * torch.sigmoid(-margins)).unsqueeze(-1) * torch.stack([inputs, torch.ones_like(inputs)], -1)
    surrogate_gradient = logistic_grad.mean(0).float()

    # Brute force E_p[Δ] on a 2001 x 2001 grid over the disk.
    axis = torch.linspace(-RADIUS, RADIUS, 2001, dtype=torch.float64)
    grid_w, grid_b = torch.meshgrid(axis, axis, indexing="ij")
    inside = grid_w.square() + grid_b.square() <= RADIUS**2
    base = float(zero_one(theta[0], theta[1]))
    log_density = -(zero_one(theta[0] + grid_w, theta[1] + grid_b) - base) / TEMPERATURE
    weights = torch.where(inside, (log_density - log_density[inside].max()).exp(), torch.zeros_like(log_density))
    weights = weights / weights.sum()
    target_mean = torch.stack([(weights * grid_w).sum(), (weights * grid_b).sum()]).float()
    return task_loss, surrogate_gradient, target_mean


CLASSIFIER_PROPOSALS = {
    "zero": dict(proposal="zero", noise_scale=RADIUS),
    "guided": dict(proposal="guided", noise_scale=0.5, guide_scale=6.0),
    "mixture": dict(proposal="mixture", noise_scale=0.5, guide_scale=6.0, mixture_weight=0.5),
}


def classifier_rms_error(problem, proposal, num_samples, seeds):
    task_loss, surrogate_gradient, target_mean = problem
    config = SearchConfig(num_samples=num_samples, density="exact", temperature=TEMPERATURE,
                          noise_mode="constant", **CLASSIFIER_PROPOSALS[proposal])
    squared = []
    for seed in seeds:
        delta, _ = estimate_update([torch.zeros(2)], task_loss, [surrogate_gradient], config,
                                   torch.Generator().manual_seed(seed))
        squared.append(float((delta[0] - target_mean).square().sum()))
    return math.sqrt(sum(squared) / len(squared))


def table_classifier():
    problem = classifier_problem()
    print(f"target E_p[Δ] = {problem[2].tolist()}, guide = {problem[1].tolist()}")
    print("| K | zero | guided | mixture |")
    print("|---|---|---|---|")
    for num_samples in (16, 64, 256, 1024, 4096):
        errors = [classifier_rms_error(problem, p, num_samples, range(16)) for p in ("zero", "guided", "mixture")]
        print(f"| {num_samples} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")


if __name__ == "__main__":
    tables = {"quadratic": table_quadratic, "densities": table_densities, "ess": table_ess,
              "classifier": table_classifier}
    chosen = sys.argv[1:] or ["all"]
    for name, table in tables.items():
        if "all" in chosen or name in chosen:
            started = time.time()
            print(f"\n## {name}")
            table()
            print(f"({time.time() - started:.1f} s)")
