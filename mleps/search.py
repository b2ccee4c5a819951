"""Importance-sampled parameter search: the update of MLE-guided parameter search.

Welleck & Cho, "MLE-guided parameter search for task loss minimization in
neural sequence modeling", AAAI 2021 (arXiv 2006.03158).  The next update is
the mean of

    p(Δθ | θ) ∝ exp(-[l(θ + Δθ) - l(θ)] / α),

estimated by self-normalised importance sampling from a proposal q that may be
centred on the gradient step of a differentiable surrogate l̃.

Symbols and the names that hold them
------------------------------------
    θ           params            list of tensors (the current parameters)
    Δθ          delta             displacement to ADD to θ (not a gradient)
    l           task_loss         callable: list of tensors -> float
    ∇l̃          guide             surrogate gradient, list of tensors like params
    K           num_samples
    α, β = 1/α  temperature, beta
    λ           mixture_weight    share of the zero-centred component
    σ           noise_scale       per tensor σ_j = σ, or σ·mean|guide_j| ("relative")
    η           guide_scale       guided centre μ = -η ∇l̃
    c_k         Sample.component  0 = zero-centred, 1 = guided
    z_k         standard noise;   Δ_k = c_k μ + σ z_k  (σ z_k means σ_j z_kj per tensor)
    w_k         log_weights       normalised: log w_k = -(l_k - l_0)/α - log q(Δ_k) + const

The update is Δθ* = Σ_k w_k Δ_k.

Levers on the weights and the samples (docs/mgs.md, "Levers")
-------------------------------------------------------------
    antithetic      samples come in mirrored pairs (z, -z) around the same centre: Δ = c μ ± σ z
    line search     L extra samples Δ = s μ, no noise, one per scale s in ``line_search_scales``
    weighting       "boltzmann": l_k as it is; "rank": l_k replaced by its rank among the samples,
                    scaled to [0, 1] (best 0, ties share a rank), so α is in units of "the whole
                    range of ranks" and the weights are a softmax over ranks; "zscore": l_k
                    standardised over the K samples ((l_k - mean)/std, fitness shaping as in ES at
                    scale), so α is in units of the samples' own spread whatever the loss's scale;
                    "uniform": w_k = 1/K whatever the losses (the blind ablation: same samples,
                    same update, no signal from the task loss)
    target ESS      ``temperature_for_ess`` picks α per step by bisection so ESS(w) = target
    diagnostics     ``spearman`` (rank agreement of two batches' losses), ``effective_sample_size``

High level
----------
    delta, info = estimate_update(params, task_loss, guide, config, generator)

Low level (for a trainer that perturbs a live model in place)
-------------------------------------------------------------
    samples = draw_samples(config, generator)          # K x (perturbation_seed, component)
    scales = compute_noise_scales(config, guide, len(params))   # σ_j, once
    backup = [p.detach().clone() for p in params]
    stats, losses = [], []
    for sample in samples:
        stats.append(apply_perturbation_(params, guide, config, sample, scales))
        losses.append(evaluate())                       # e.g. decode a batch, score it
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)                              # bit-exact restore
    log_weights, info = importance_weights(config, samples, losses, base_loss, stats)
    update_norm = write_update_(grads, guide, config, samples, log_weights, scales)

``write_update_`` may write into the very tensors that hold ``guide`` (the
``.grad`` buffers).  To hand the result to an optimizer that *descends*, negate
it (``grad = -delta``), as the MGS reference code does.

Noise for tensor j of sample k is a function of (perturbation_seed, j) and the
tensor's device alone, so Δ_k is never stored: it is regenerated tensor by tensor
(see ``regenerate_noise``).  Peak extra memory is one tensor's worth of noise
plus an accumulator, on top of whatever the caller keeps.  Noise is drawn in
float32 on the tensor's device and cast to the tensor's dtype when applied;
the same seed gives different numbers on CPU and CUDA, so apply and write on
the same device.

Proposal densities (``SearchConfig.density``)
---------------------------------------------
"fixed_norm" (default)  each z_j is rescaled to ‖z_j‖ = √n_j exactly, so Δ_k lies
    on a (product of) sphere(s) of radius σ_j√n_j around its centre, 0 or μ.
    Relative to surface measure both components have the same constant density,
    so log q(Δ_k) = log(share of component c_k).  The estimator is then exact
    self-normalised importance sampling of p restricted to those shells: the
    constrained (‖Δθ‖ = ε) view of the paper's first-order derivation.
"exact"  Gaussian z and the exact density of λ N(0, Σ) + (1-λ) N(μ, Σ),
    Σ = diag σ_j²:  log q = -‖z‖²/2 + logsumexp(log λ - a0/2, log(1-λ) - a1/2),
    a0, a1 the Mahalanobis distances minus ‖z‖² (for c = 0: a0 = 0,
    a1 = ‖m‖² - 2 z·m; for c = 1: a0 = ‖m‖² + 2 z·m, a1 = 0; m = μ/σ).
    Consistent for E_p[Δθ] whenever p is proper, but the -‖z‖²/2 term has standard
    deviation √(d/2) and collapses the weights onto one sample once d is large
    (docs/sampling-view.md has the measurement).
"mgs_reference"  what wellecks/mgs seq_level/gpt2/guided/utils.py (``perturb``)
    computes: Gaussian z, and the density of the two-component mixture with
    *unit* variance in raw parameter units, log(λ e^{-‖Δ‖²/2} + (1-λ) e^{-‖Δ-μ‖²/2}),
    whatever σ and the noise mode are and whatever the proposal is (the
    reference hard-codes λ = 0.5, η = 1 and alternates components; here λ, η
    come from the config and the log is taken stably with logsumexp).
"none"  log q = 0: the proposal acts as a prior and the weights are the
    Boltzmann factors alone.

Mixture components are stratified by default (exactly round(λK) zero-centred
samples, as the reference's alternation does); the density then uses the
realised share n_0/K, the balance heuristic of multiple importance sampling.
"""

import math
from dataclasses import dataclass, field, fields
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from mleps.choice import Choice


class Proposal(Choice):
    zero = "zero"  # N(0, σ²) only
    guided = "guided"  # N(μ, σ²) only
    mixture = "mixture"  # λ N(0, σ²) + (1 - λ) N(μ, σ²)


class Weighting(Choice):
    boltzmann = "boltzmann"  # exp(-(C_k - C_0)/α)
    rank = "rank"  # softmax of -rank_k/α, ranks in [0, 1]
    zscore = "zscore"  # standardised losses
    uniform = "uniform"  # w_k = 1/K: the blind ablation


class Density(Choice):
    fixed_norm = "fixed_norm"
    exact = "exact"
    mgs_reference = "mgs_reference"
    none = "none"


class NoiseMode(Choice):
    relative = "relative"  # σ_j = noise_scale · mean|guide_j|
    constant = "constant"  # σ_j = noise_scale


PROPOSALS = tuple(m.value for m in Proposal)
WEIGHTINGS = tuple(m.value for m in Weighting)
DENSITIES = tuple(m.value for m in Density)
NOISE_MODES = tuple(m.value for m in NoiseMode)
DEFAULT_TEMPERATURE = 0.01  # the MGS reference default β = 100

_MASK64 = (1 << 64) - 1


@dataclass
class SearchKnobs:
    """The search's knobs, declared once: SearchConfig adds what a caller derives, and
    mleps.trainers.mgs.MGSConfig inherits them as trainer.* keys (their help text is here)."""

    num_samples: int = 4  # K perturbations per step
    proposal: Proposal = Proposal.mixture  # zero | guided | mixture
    mixture_weight: float = 0.5  # λ: share of zero-centred perturbations
    noise_scale: float = 1.0  # σ (noise_mode=relative: times each tensor's mean |guide|)
    noise_mode: NoiseMode = NoiseMode.relative  # relative | constant
    # α, in units of the task loss (1 - metric/100); None: 1/beta (or DEFAULT_TEMPERATURE without beta)
    temperature: Optional[float] = DEFAULT_TEMPERATURE
    beta: Optional[float] = None  # β = 1/α, the MGS paper's parametrisation; set temperature=None to use it
    density: Density = Density.fixed_norm  # proposal density in the importance weights (docs/sampling-view.md)
    # Levers on the weights' signal (docs/mgs.md, "Levers"); the defaults are the plain rule.
    target_ess: Optional[float] = None  # share of the samples in (0, 1]: α chosen per step so ESS = share·K
    weighting: Weighting = Weighting.boltzmann  # boltzmann | rank | zscore | uniform (blind: w_k = 1/K)
    antithetic: bool = False  # mirrored pairs (z, -z) around the same centre; K even
    line_search_scales: List[float] = field(default_factory=list)  # extra noiseless samples at s·μ, e.g. [0.5,1,2,4]


@dataclass
class SearchConfig(SearchKnobs):
    """Hyper-parameters of one importance-sampled update (symbols in the module docstring)."""

    guide_scale: float = 1.0
    stratify_components: bool = True

    @classmethod
    def from_knobs(cls, knobs, **extra) -> "SearchConfig":
        """The SearchKnobs of `knobs` (any object with them as attributes, e.g. MGS's trainer config)."""
        return cls(**{f.name: getattr(knobs, f.name) for f in fields(SearchKnobs)}, **extra)

    def __post_init__(self):
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {self.num_samples!r}")
        for name, choice in (("density", Density), ("proposal", Proposal), ("noise_mode", NoiseMode),
                             ("weighting", Weighting)):
            setattr(self, name, choice.parse(name, getattr(self, name)))
        if not (math.isfinite(self.noise_scale) and self.noise_scale > 0):
            raise ValueError(f"noise_scale must be finite and > 0, got {self.noise_scale!r}")
        if not (0.0 <= self.mixture_weight <= 1.0):
            raise ValueError(f"mixture_weight must be in [0, 1], got {self.mixture_weight!r}")
        if not math.isfinite(self.guide_scale):
            raise ValueError(f"guide_scale must be finite, got {self.guide_scale!r}")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be finite and > 0, got {self.beta!r}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature!r}")
        if self.temperature is None:
            self.temperature = DEFAULT_TEMPERATURE if self.beta is None else 1.0 / self.beta
        elif self.beta is not None and not math.isclose(self.temperature * self.beta, 1.0, rel_tol=1e-9):
            raise ValueError(
                f"temperature ({self.temperature}) and beta ({self.beta}) disagree: beta must be 1/temperature;"
                " set only one of them"
            )

        if self.target_ess is not None and not (0.0 < self.target_ess <= 1.0):
            raise ValueError(f"target_ess must be a share of the samples in (0, 1], got {self.target_ess!r}")
        self.line_search_scales = tuple(float(x) for x in self.line_search_scales)
        if not all(math.isfinite(x) for x in self.line_search_scales):
            raise ValueError(f"line_search_scales must be finite numbers, got {list(self.line_search_scales)}")
        if self.line_search_scales and self.density not in ("fixed_norm", "none"):
            raise ValueError(f"line_search_scales put point masses next to Gaussian samples: use them with "
                             f"density fixed_norm or none, not {self.density!r}")
        if self.antithetic:
            if self.num_samples % 2:
                raise ValueError(f"antithetic pairs need an even num_samples, got {self.num_samples}")
            if self.proposal == "mixture" and self.stratify_components and _stratified_zero_count(self) % 2:
                raise ValueError(f"antithetic pairs need an even number of zero-centred samples: "
                                 f"mixture_weight x num_samples = {self.mixture_weight} x {self.num_samples} "
                                 f"gives {_stratified_zero_count(self)}")

    @property
    def needs_guide(self) -> bool:
        return (self.proposal != "zero" or self.noise_mode == "relative" or self.density == "mgs_reference"
                or bool(self.line_search_scales))


@dataclass(frozen=True)
class Sample:
    """One perturbation: its noise is a function of ``perturbation_seed`` alone."""

    perturbation_seed: int
    component: int  # 0 = zero-centred, 1 = guided
    sign: int = 1  # -1: the mirror image of the +1 sample with the same seed (antithetic pairs)
    noise: bool = True  # False: a line-search sample, Δ = mean_scale · μ exactly
    mean_scale: float = 1.0  # s: the guided centre is s·μ (1 for noise samples)


@dataclass(frozen=True)
class PerturbationStats:
    """Scalars of one Δ_k that the proposal densities need (m = μ/σ per tensor)."""

    noise_sq_norm: float  # ‖z‖²
    noise_dot_scaled_mean: float  # z·m
    scaled_mean_sq_norm: float  # ‖m‖²
    delta_sq_norm: float  # ‖Δ‖², raw parameter units
    delta_dot_mean: float  # Δ·μ
    mean_sq_norm: float  # ‖μ‖²

    @property
    def delta_norm(self) -> float:
        return math.sqrt(self.delta_sq_norm)


def draw_samples(config: SearchConfig, generator: Optional[torch.Generator] = None) -> List[Sample]:
    """K seeds and components; deterministic given ``generator``'s state (global RNG if None)."""
    pairs = 2 if config.antithetic else 1
    count = config.num_samples // pairs  # distinct noise draws
    seeds = torch.randint(0, 2**63 - 1, (count,), generator=generator, dtype=torch.int64).tolist()
    if config.proposal == "zero":
        components = [0] * count
    elif config.proposal == "guided":
        components = [1] * count
    elif config.stratify_components:
        zero_count = _stratified_zero_count(config) // pairs
        components = [0] * zero_count + [1] * (count - zero_count)
    else:
        draws = torch.rand(count, generator=generator, dtype=torch.float64)
        components = (draws >= config.mixture_weight).long().tolist()
    signs = (1, -1) if config.antithetic else (1,)
    samples = [Sample(seed, component, sign) for seed, component in zip(seeds, components) for sign in signs]
    return samples + [Sample(0, 1, 1, noise=False, mean_scale=scale) for scale in config.line_search_scales]


def regenerate_noise(sample: Sample, tensor_index: int, like: torch.Tensor, config: SearchConfig) -> torch.Tensor:
    """Standard noise z for tensor ``tensor_index`` of ``sample``: float32, on ``like``'s device."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(_mix_seed(sample.perturbation_seed, tensor_index))
    noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    if config.density == "fixed_norm" and noise.numel() > 0:
        noise.mul_(math.sqrt(noise.numel()) / noise.norm())
    if sample.sign == -1:
        noise.neg_()
    return noise


def apply_perturbation_(
    params: Sequence[torch.Tensor],
    guide: Optional[Sequence[torch.Tensor]],
    config: SearchConfig,
    sample: Sample,
    noise_scales: Optional[Sequence[float]] = None,
) -> PerturbationStats:
    """θ ← θ + Δ_k in place, tensor by tensor.  Restore θ from a backup copy afterwards.

    ``noise_scales``: the σ_j of ``compute_noise_scales``, computed once per step by a
    caller that perturbs K times (otherwise recomputed here)."""
    _check_guide(params, guide, config)
    if noise_scales is None:
        noise_scales = compute_noise_scales(config, guide, len(params))
    device = params[0].device if len(params) else torch.device("cpu")
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # one host sync at the end, not one per tensor
    with torch.no_grad():
        for index, param in enumerate(params):
            noise_scale = noise_scales[index]
            if noise_scale == 0.0:  # relative mode, all-zero guide tensor (μ_j = 0), or a tensor outside the search
                continue
            if sample.noise:
                noise = regenerate_noise(sample, index, param, config).flatten()
            else:  # a line-search sample: no noise
                noise = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            delta = noise * noise_scale
            mean = _guided_mean(config, guide, index)
            if mean is None:
                noise_dot_mean = mean_sq_norm = delta_dot_mean = torch.zeros((), device=device)
            else:
                mean = mean.flatten()
                if sample.component == 1:
                    delta.add_(mean, alpha=sample.mean_scale)
                noise_dot_mean, mean_sq_norm = torch.dot(noise, mean), torch.dot(mean, mean)
                delta_dot_mean = torch.dot(delta, mean)
            param.add_(delta.view_as(param).to(param.dtype))
            sums += torch.stack([
                torch.dot(noise, noise),
                noise_dot_mean / noise_scale,
                mean_sq_norm / noise_scale**2,
                torch.dot(delta, delta),
                delta_dot_mean,
                mean_sq_norm,
            ]).double()
    return PerturbationStats(*sums.tolist())


def compute_noise_scales(config: SearchConfig, guide, count: int) -> List[float]:
    """σ_j for each of ``count`` tensors (σ, or σ·mean|guide_j| in relative mode), with one host sync."""
    if config.noise_mode == "constant":
        return [config.noise_scale] * count
    means = torch.stack([g.detach().abs().float().mean() for g in guide]).tolist() if count else []
    return [config.noise_scale * m for m in means]


def importance_weights(
    config: SearchConfig,
    samples: Sequence[Sample],
    losses: Sequence[float],
    base_loss: float,
    stats: Sequence[PerturbationStats],
) -> Tuple[torch.Tensor, dict]:
    """Normalised float64 log-weights (K,) from losses l(θ+Δ_k) and l(θ), plus diagnostics.

    With ``config.target_ess`` set, α is chosen for this step by ``temperature_for_ess``
    (config.temperature is ignored); info["temperature"] is the α used."""
    if not (len(samples) == len(losses) == len(stats)) or not samples:
        raise ValueError(f"need equally many samples, losses and stats (>0), got {len(samples)}, {len(losses)}, {len(stats)}")
    losses = torch.tensor([float(loss) for loss in losses], dtype=torch.float64)
    base_loss = float(base_loss)
    if not math.isfinite(base_loss):
        raise ValueError(f"base_loss must be finite, got {base_loss}")
    if torch.isnan(losses).any():
        raise ValueError(f"losses contain NaN: {losses.tolist()}")
    zero_share = _density_zero_share(config)
    log_density = torch.tensor(
        [_log_proposal_density(config, s, st, zero_share) for s, st in zip(samples, stats)], dtype=torch.float64
    )
    # Subtract first, then divide: the difference is what α scales, and it keeps
    # losses 1e4/α apart finite before the logsumexp.
    excess = shaped_losses(losses, base_loss, config.weighting)
    temperature = config.temperature
    if config.weighting == "uniform":  # blind: the losses are read for the log only
        log_unnormalised = torch.zeros_like(losses)
    else:
        if config.target_ess is not None:
            temperature = temperature_for_ess(excess, log_density, config.target_ess * len(samples))
        log_unnormalised = -excess / temperature - log_density
    if torch.isneginf(log_unnormalised).all():
        raise ValueError("every perturbed loss is +inf: no sample carries weight")
    log_weights = log_unnormalised - torch.logsumexp(log_unnormalised, 0)
    weights = log_weights.exp()
    components = torch.tensor([s.component for s in samples], dtype=torch.long)
    info = {
        "losses": losses,
        "base_loss": base_loss,
        "log_weights": log_weights,
        "log_proposal_density": log_density,
        "components": components,
        "temperature": temperature,
        "ess": effective_sample_size(log_weights),
        "weight_entropy": float(-(weights * log_weights).nan_to_num(0.0).sum()),
        "guided_weight": float(weights[components == 1].sum()),
        "line_search_weight": float(sum(w for w, s in zip(weights.tolist(), samples) if not s.noise)),
        "noise_norm": sum(st.delta_norm for st in stats) / len(stats),
    }
    return log_weights, info


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """1 / Σ w_k² of normalised log-weights: K for uniform weights, 1 when one sample has them all."""
    return float(torch.exp(-torch.logsumexp(2 * log_weights, 0)))


def temperature_for_ess(excess: torch.Tensor, log_density: torch.Tensor, target: float,
                        iterations: int = 100) -> float:
    """α such that the weights w_k ∝ exp(-excess_k/α - log_density_k) have ESS = ``target``.

    Bisection on log α in [1e-12, 1e12]·scale (scale = the largest |excess|): ESS runs from the
    number of tied best samples (α → 0) to the ESS of exp(-log_density) alone (α → ∞), and is
    increasing in α in between whenever log_density is constant, as with fixed_norm and a
    stratified proposal.  A target outside that range gives the nearest end.  All losses equal:
    α is irrelevant and 1.0 is returned."""
    excess = excess.to(torch.float64)
    log_density = log_density.to(torch.float64)
    finite = excess[torch.isfinite(excess)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    if scale == 0.0 or float(finite.max() - finite.min()) == 0.0:
        return 1.0

    def ess(log_alpha: float) -> float:
        log_w = -excess / math.exp(log_alpha) - log_density
        return effective_sample_size(log_w - torch.logsumexp(log_w, 0))

    low, high = math.log(scale * 1e-12), math.log(scale * 1e12)
    if ess(high) <= target:
        return math.exp(high)
    if ess(low) >= target:
        return math.exp(low)
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if ess(middle) < target:
            low = middle
        else:
            high = middle
    return math.exp(0.5 * (low + high))


def shaped_losses(losses: torch.Tensor, base_loss: float, weighting: str) -> torch.Tensor:
    """What α divides: l_k - l_0 (boltzmann), ranks in [0, 1] (rank), or z-scores over the finite
    samples (zscore; all equal -> zeros, an infinite loss stays +inf and gets no weight)."""
    if weighting == "rank":
        return rank_losses(losses)
    if weighting == "zscore":
        finite = torch.isfinite(losses)
        if finite.sum() < 2:
            return torch.where(finite, torch.zeros_like(losses), losses)
        mean, std = losses[finite].mean(), losses[finite].std(unbiased=False)
        return torch.where(finite, (losses - mean) / std if std > 0 else torch.zeros_like(losses), losses)
    return losses - base_loss


def rank_losses(losses: torch.Tensor) -> torch.Tensor:
    """Ranks of the losses scaled to [0, 1]: the best 0, the worst 1, ties share their mean rank;
    +inf stays +inf.  One sample, or all equal: zeros."""
    losses = losses.to(torch.float64)
    ranks = average_ranks(losses)
    finite = torch.isfinite(losses)
    top = float(ranks[finite].max()) if finite.any() else 0.0
    scaled = ranks / top if top > 0 else torch.zeros_like(ranks)
    return torch.where(finite, scaled, torch.full_like(scaled, math.inf))


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based ranks in ascending order; tied values share the mean of their ranks (float64)."""
    values = values.to(torch.float64)
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN when either side is constant."""
    ra, rb = average_ranks(torch.tensor(list(a))), average_ranks(torch.tensor(list(b)))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float(ra @ rb) / denominator if denominator > 0 else math.nan


def write_update_(
    out: Sequence[torch.Tensor],
    guide: Optional[Sequence[torch.Tensor]],
    config: SearchConfig,
    samples: Sequence[Sample],
    log_weights: torch.Tensor,
    noise_scales: Optional[Sequence[float]] = None,
) -> float:
    """out[j] ← Σ_k w_k Δ_kj by regeneration; ``out`` may alias ``guide``.  Returns ‖Δθ*‖.

    A tensor with σ_j = 0 gets Σ_k w_k c_k s_k μ_j: its share of the weighted guided centre."""
    _check_guide(out, guide, config)
    if noise_scales is None:  # read every σ_j before out[j] is overwritten: out may be guide
        noise_scales = compute_noise_scales(config, guide, len(out))
    weights = log_weights.exp().tolist()
    mean_coefficient = sum(w * s.mean_scale for w, s in zip(weights, samples) if s.component == 1)
    device = out[0].device if len(out) else torch.device("cpu")
    sq_norm = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for index, target in enumerate(out):
            noise_scale = noise_scales[index]
            mean = _guided_mean(config, guide, index)  # read μ_j before target[j] is overwritten
            total = torch.zeros(target.shape, dtype=torch.float32, device=target.device)
            if mean is not None and mean_coefficient != 0.0:
                total.add_(mean, alpha=mean_coefficient)
            if noise_scale != 0.0:
                for weight, sample in zip(weights, samples):
                    if weight != 0.0 and sample.noise:
                        total.add_(regenerate_noise(sample, index, target, config), alpha=weight * noise_scale)
            target.copy_(total)
            sq_norm += torch.dot(total.flatten(), total.flatten()).double()
    return math.sqrt(float(sq_norm))


def estimate_update(
    params: Sequence[torch.Tensor],
    task_loss: Callable[[List[torch.Tensor]], float],
    guide: Optional[Sequence[torch.Tensor]] = None,
    config: Optional[SearchConfig] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[List[torch.Tensor], dict]:
    """Δθ* ≈ E_p[Δθ] from K evaluations of ``task_loss``; returns (delta, info).

    ``delta`` is a displacement to ADD to θ.  ``params`` are not modified;
    ``task_loss`` receives a working copy that is perturbed in place and reused,
    so it must not keep a reference to it.
    """
    config = SearchConfig() if config is None else config
    params = list(params)
    guide = None if guide is None else list(guide)
    _check_guide(params, guide, config)
    with torch.no_grad():
        perturbed = [p.detach().clone() for p in params]
    base_loss = float(task_loss(perturbed))
    samples = draw_samples(config, generator)
    losses, stats = [], []
    for sample in samples:
        stats.append(apply_perturbation_(perturbed, guide, config, sample))
        losses.append(float(task_loss(perturbed)))
        with torch.no_grad():
            for work, original in zip(perturbed, params):
                work.copy_(original)
    log_weights, info = importance_weights(config, samples, losses, base_loss, stats)
    delta = perturbed  # reuse the working copy as the output buffer: O(d) extra memory, not O(2d)
    info["update_norm"] = write_update_(delta, guide, config, samples, log_weights)
    return delta, info


def _check_guide(params, guide, config: SearchConfig) -> None:
    if guide is None:
        if config.needs_guide:
            raise ValueError(
                f"proposal={config.proposal!r}, noise_mode={config.noise_mode!r}, density={config.density!r} need a"
                " guide (surrogate gradient); pass guide=... or use proposal='zero', noise_mode='constant'"
            )
        return
    if len(guide) != len(params) or any(g.shape != p.shape for g, p in zip(guide, params)):
        raise ValueError("guide must be a list of tensors shaped like params")


def _guided_mean(config: SearchConfig, guide, index: int) -> Optional[torch.Tensor]:
    if guide is None:
        return None
    return guide[index].detach().float() * (-config.guide_scale)


def _stratified_zero_count(config: SearchConfig) -> int:
    return int(math.floor(config.mixture_weight * config.num_samples + 0.5))


def _density_zero_share(config: SearchConfig) -> float:
    """λ as the density sees it: the realised share when components are stratified."""
    if config.proposal == "zero":
        return 1.0
    if config.proposal == "guided":
        return 0.0
    if config.stratify_components:
        return _stratified_zero_count(config) / config.num_samples
    return config.mixture_weight


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _logaddexp(a: float, b: float) -> float:
    high = max(a, b)
    if high == -math.inf:
        return -math.inf
    return high + math.log(math.exp(a - high) + math.exp(b - high))


def _log_proposal_density(config: SearchConfig, sample: Sample, stats: PerturbationStats, zero_share: float) -> float:
    """log q(Δ_k) up to a constant shared by all samples."""
    if config.density == "none":
        return 0.0
    if config.density == "fixed_norm":
        # shares of the three groups: zero-centred, guided noise and line-search samples
        lines = len(config.line_search_scales)
        noise_share = config.num_samples / (config.num_samples + lines)
        if not sample.noise:
            return _log(1.0 - noise_share)
        return _log(noise_share * (zero_share if sample.component == 0 else 1.0 - zero_share))
    if config.density == "mgs_reference":
        dist_zero = stats.delta_sq_norm
        dist_guided = stats.delta_sq_norm - 2.0 * stats.delta_dot_mean + stats.mean_sq_norm
        share = config.mixture_weight
        return _logaddexp(_log(share) - dist_zero / 2.0, _log(1.0 - share) - dist_guided / 2.0)
    radial = -stats.noise_sq_norm / 2.0
    if zero_share in (0.0, 1.0):
        return radial
    cross, scaled_mean_sq = stats.noise_dot_scaled_mean, stats.scaled_mean_sq_norm
    if sample.component == 0:
        excess_zero, excess_guided = 0.0, scaled_mean_sq - 2.0 * cross
    else:
        excess_zero, excess_guided = scaled_mean_sq + 2.0 * cross, 0.0
    return radial + _logaddexp(_log(zero_share) - excess_zero / 2.0, _log(1.0 - zero_share) - excess_guided / 2.0)


def _mix_seed(perturbation_seed: int, tensor_index: int) -> int:
    """splitmix64 of (seed, index): decorrelated 63-bit seeds, one per tensor."""
    mixed = (perturbation_seed + (tensor_index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (mixed ^ (mixed >> 31)) >> 1
