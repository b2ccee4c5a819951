"""MLE-guided parameter search (Welleck & Cho, AAAI 2021) as an update rule.

Per step, on one batch:
  C(θ)      the task loss (mleps.task_loss) of the batch decoded with θ, e.g. 1 - BLEU/100, pooled
            over the batch (metric.level=corpus) or the mean of sentence losses (level=sentence)
  g         guide: the token cross-entropy gradient, clipped to trainer.guide_max_norm
  Δ_k       K perturbations from mleps.search: a mixture of N(0, σ²) and N(μ, σ²)
  C(θ+Δ_k)  decode the batch with each perturbed model and score it
  Δθ*       Σ_k w_k Δ_k with w_k ∝ exp(-[C(θ+Δ_k) - C(θ)]/α) / q(Δ_k)

Where the guided component is centred (`trainer.guide`) matters more than anything else:
  scaled     μ = -η·g (η = trainer.guide_scale). The original code uses η = 1 with g clipped
             to norm 1, which on a trained model is a step so large that every guided sample
             decodes garbage and gets zero weight (MGS degenerates to random search).
  optimizer  μ = the optimizer's own next step on g (AdamW with its moments), so guided
             samples are exactly "what MLE would do now" and noise is relative to that step.
             The moments are advanced with g as MLE would; Δθ* is then added to θ directly
             (apply=sgd), since it already has the size of an optimizer step.

Perturbations are applied in place to the live parameters, regenerated from their seeds,
and θ is restored bit-exactly from one backup after each decode (trainer.perturb=inplace);
trainer.perturb=copy deep-copies the model per sample as the original code does.

trainer.decode_population says how the K+1 parameter sets decode the batch:
  sequential  one `generate` per parameter set, perturbing the live model in place
  batched     one `generate` of (K+1)·B rows: θ and θ+Δ_k are stacked ((K+1) copies of the
              searched tensors, trainer.perturb_params; the rest are shared)
              and group k of B rows uses its own parameters (mleps.population); the ids, and so
              the losses and the update, are those of sequential decoding (exact on CPU). Greedy only.

Several processes (accelerate launch) never drift apart: g is all-reduced by DDP, the K
perturbations come from seeds of (seed, step) alone, and the metric's additive statistics
(BLEU's n-gram counts and lengths, chrF's counts, a sentence metric's sum and count) are
all-reduced once per step, so every process computes the same K+1 losses, weights and update.
trainer.parallel says who decodes what:
  data        every process decodes its shard of the global batch under all K perturbations
  population  every process decodes the whole global batch under its share (k mod W) of them

Levers on the weights (docs/mgs.md, "Levers"): target_ess, weighting, antithetic and
line_search_scales live in mleps.search; scoring_batch_size gives the decodes more rows than
the guide (the guide uses the first batch_size rows of each micro-batch); perturb_params limits
the noise to a subset of tensors (σ_j = 0 elsewhere, so those tensors move by the weighted
guided centre, Σ_k w_k c_k s_k μ_j, or not at all with guide_params=perturbed).

Probes (`SearchProbe`, installed by code outside the library such as mleps_lab's held-out
diagnostics and oracle weights) see each step's samples and losses before the update is written;
one may replace the losses the weights come from. The plain rule has none.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import astuple, dataclass, fields
from typing import Optional

import numpy as np
import torch
from accelerate.utils import DistributedType

from mleps import distributed
from mleps import population as batched_decoding
from mleps.decoding import DecodedBatch, decoded_batch, eos_ids, generate
from mleps.errors import UserError
from mleps.choice import Choice
from mleps.search import (PerturbationStats, SearchConfig, SearchKnobs, apply_perturbation_, compute_noise_scales,
                          draw_samples, importance_weights, write_update_)
from mleps.trainers.base import Shard, TrainerConfig, UpdateRule, label_tokens, register_rule, token_cross_entropy
from mleps.trainers.sequences import pad_rows, token_log_probs, trim


class Guide(Choice):
    scaled = "scaled"  # mu = -guide_scale * g
    optimizer = "optimizer"  # mu = the optimizer's own next step


class Perturb(Choice):
    inplace = "inplace"  # perturb the live parameters, restore them bit-exactly
    copy = "copy"  # deep copy per sample, the original code's way


class Apply(Choice):
    optimizer = "optimizer"  # -update handed to the optimizer as .grad
    sgd = "sgd"  # theta += update


class Decode(Choice):
    greedy = "greedy"
    sample = "sample"


class Parallel(Choice):
    data = "data"  # each process decodes its shard under every perturbation
    population = "population"  # each process decodes the whole batch under its share of them


class DecodePopulation(Choice):
    sequential = "sequential"  # one generate per parameter set
    batched = "batched"  # one generate for all K+1 (mleps.population)


class PerturbParams(Choice):
    all = "all"
    norms_biases = "norms_biases"  # 1-d tensors
    output = "output"


class GuideParams(Choice):
    all = "all"  # the other tensors move along the weighted guide
    perturbed = "perturbed"  # only the searched tensors move


class GuideRows(Choice):
    all = "all"  # every row's best output, its greedy one included (sharpens what already scores best)
    improved = "improved"  # only the rows where a sample beats the greedy output


class GuideTarget(Choice):
    reference = "reference"  # cross-entropy on the references
    best_sample = "best_sample"  # on each row's best output (see _best_targets)


@dataclass
class MGSConfig(SearchKnobs, TrainerConfig):
    """trainer=mgs: the trainer section, the search's knobs (mleps.search.SearchKnobs: num_samples, proposal,
    mixture_weight, noise_scale, noise_mode, temperature, beta, density, target_ess, weighting, antithetic,
    line_search_scales, declared and defaulted there) and the rule's own below."""

    name: str = "mgs"
    lr: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    guide: Guide = Guide.optimizer  # scaled: mu = -guide_scale * g ; optimizer: mu = the optimizer's own next step
    guide_scale: float = 1.0
    guide_max_norm: float = 1.0  # the guide gradient g is clipped to this norm first (0 = off)
    decode: Decode = Decode.greedy  # greedy | sample
    max_new_tokens: int = 64
    perturb: Perturb = Perturb.inplace  # inplace | copy (deep copy per sample, the original code's way)
    parallel: Parallel = Parallel.data  # several processes: data (each decodes its shard) | population (each its samples)
    decode_population: DecodePopulation = DecodePopulation.sequential  # sequential: one generate per parameter set | batched: one for all
    apply: Apply = Apply.sgd  # optimizer: -update handed to the optimizer as .grad ; sgd: theta += update
    sgd_scale: float = 1.0
    update_max_norm: float = 0.0  # clip Δθ* to this norm before it is applied (the reference clips to 1); 0 = off
    scoring_batch_size: Optional[int] = None  # rows decoded and scored per micro-batch (>= batch_size, the guide's)
    perturb_params: PerturbParams = PerturbParams.all  # the tensors the noise perturbs: all | norms_biases (1-d tensors) | output
    guide_params: GuideParams = GuideParams.all  # all: other tensors move along the weighted guide | perturbed: only the searched move
    # What the guide g is the gradient of (docs/mgs.md, "A guide that knows the task loss").
    guide_target: GuideTarget = GuideTarget.reference  # reference: cross-entropy on the references | best_sample
    guide_samples: int = 4  # best_sample: outputs sampled per source beside its greedy output
    guide_rows: GuideRows = GuideRows.all  # best_sample: all rows, or only those a sample improved
    guide_sample_temperature: float = 1.0
    guide_mle_mix: float = 0.0  # best_sample: + this x the references' token cross-entropy in g


@dataclass
class SearchStep:
    """One step's search, as MGS hands it to its probes (read-only: params hold θ, `theta` a copy of it
    when the step keeps one, else None)."""

    step: int
    model: torch.nn.Module
    params: list
    guide: list  # g (or the optimizer's step) per trainable tensor; .grad of params
    samples: list
    noise_scales: list
    theta: list | None
    base_loss: float  # C(θ) on the training batch
    losses: list  # C(θ+Δ_k) on the training batch


class SearchProbe:
    """A per-step hook on MGS's search, for measurements. A probe may decode with perturbed parameters
    but leaves θ as it found it, bit for bit, and never touches .grad, the optimizer or the weights'
    inputs unless `weigh` says so. Both hooks are optional."""

    def weigh(self, rule: "MGS", search: SearchStep) -> tuple[float, list, dict] | None:
        """(C(θ), [C(θ+Δ_k)], statistics to log) to take the weights from instead of the training batch's."""
        return None

    def measure(self, rule: "MGS", search: SearchStep, log_weights: torch.Tensor) -> dict[str, float]:
        """Statistics to log, once the weights are known and before the update is written."""
        return {}


def per_row_stats(metric, decoded) -> np.ndarray:
    """(N, S) the task loss's additive statistics of each output of `decoded` on its own."""
    return np.stack([metric.stats(decoded_row(decoded, n)) for n in range(len(decoded.texts))])


def decoded_row(decoded: DecodedBatch, n: int) -> DecodedBatch:
    """Row n of a DecodedBatch as a batch of one."""
    def cut(value):
        if value is None:
            return None
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value[n:n + 1]
    return DecodedBatch(texts=decoded.texts[n:n + 1], token_ids=decoded.token_ids[n:n + 1],
                        ended_with_eos=decoded.ended_with_eos[n:n + 1], references=decoded.references[n:n + 1],
                        sources=cut(decoded.sources), ids=cut(decoded.ids), encoder_inputs=cut(decoded.encoder_inputs),
                        columns=cut(decoded.columns))


def search_config(cfg) -> SearchConfig:
    """The search of trainer config `cfg` (its SearchKnobs as they are; μ's scale only for guide=scaled)."""
    try:
        return SearchConfig.from_knobs(cfg, guide_scale=cfg.guide_scale if cfg.guide == "scaled" else 1.0)
    except ValueError as e:
        raise UserError(f"trainer: {e}") from None


@register_rule
class MGS(UpdateRule):
    name, schema = "mgs", MGSConfig
    needs_optimizer = True  # guide=optimizer: μ is the optimizer's own next step
    clip_in_loop = False  # the guide is clipped before the search; Δθ* is used as it comes
    needs_whole_parameters = True  # perturbs θ in place, stacks it for population decoding

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        cfg = self.cfg
        self.search = search_config(cfg)
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise UserError("trainer=mgs perturbs whole parameters in place: run it with DDP "
                            "(mleps/conf/accelerate/multi_gpu.yaml), not FSDP or DeepSpeed")
        self.eos = eos_ids(self.unwrapped)
        self._backup: list[torch.Tensor] | None = None  # one copy of θ, allocated once, reused every step
        self._guide_log, self._theta_greedy = {}, {}
        if cfg.decode_population == "batched":  # a model with a module it cannot stack fails here, at start
            batched_decoding.check_supported(self.unwrapped, self._params(self.unwrapped))
        self.searched = self._searched_tensors(self.unwrapped)  # per trainable tensor: does the noise move it

    @classmethod
    def check_config(cls, cfg) -> None:
        search_config(cfg)  # the choices (guide, perturb, ...) are Choice enums, checked by the schema
        if cfg.guide == "optimizer" and cfg.apply != "sgd":
            raise UserError("trainer.guide=optimizer already advances the optimizer: use it with trainer.apply=sgd")
        if cfg.max_new_tokens < 1:
            raise UserError(f"trainer.max_new_tokens={cfg.max_new_tokens}: use 1 or more")
        if not (cfg.update_max_norm >= 0 and math.isfinite(cfg.update_max_norm)):
            raise UserError(f"trainer.update_max_norm={cfg.update_max_norm}: use a finite number >= 0 (0 = off)")
        if cfg.get("batch_tokens") and cfg.scoring_batch_size is not None:
            raise UserError("trainer.scoring_batch_size needs fixed-size batches: drop it, or set "
                            "trainer.batch_tokens=null")
        if cfg.decode_population == "batched" and (cfg.decode != "greedy" or cfg.perturb != "inplace"):
            raise UserError("trainer.decode_population=batched decodes greedily from stacked parameters: use it "
                            "with trainer.decode=greedy trainer.perturb=inplace, or decode_population=sequential")
        if cfg.guide_target == "best_sample":
            if cfg.guide_samples < 1:
                raise UserError(f"trainer.guide_samples={cfg.guide_samples}: use 1 or more")
            if not (math.isfinite(cfg.guide_sample_temperature) and cfg.guide_sample_temperature > 0):
                raise UserError(f"trainer.guide_sample_temperature={cfg.guide_sample_temperature}: use a finite "
                                f"number > 0")
            if not (math.isfinite(cfg.guide_mle_mix) and cfg.guide_mle_mix >= 0):
                raise UserError(f"trainer.guide_mle_mix={cfg.guide_mle_mix}: use a finite number >= 0")
        if cfg.scoring_batch_size is not None and cfg.scoring_batch_size < cfg.batch_size:
            raise UserError(f"trainer.scoring_batch_size={cfg.scoring_batch_size} is below trainer.batch_size="
                            f"{cfg.batch_size}: the scored rows include the guide's; use null or >= batch_size")

    @property
    def rows_per_micro_batch(self) -> int:  # the loop draws this many rows; the guide uses batch_size of them
        return self.cfg.scoring_batch_size or self.cfg.batch_size

    @property
    def needs_every_micro_batch(self) -> bool:  # population search decodes the whole global batch
        return self.cfg.parallel == "population" and self.accelerator.num_processes > 1

    # -- helpers -----------------------------------------------------------------
    def _params(self, model) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def _searched_tensors(self, model) -> list[bool]:
        """trainer.perturb_params as one flag per trainable tensor (in _params order).
        norms_biases: the 1-d tensors (layer-norm gains and biases, linear biases);
        output: the output projection's weight (tied to the input embeddings in Marian, so those move too)."""
        params = self._params(model)
        which = self.cfg.perturb_params
        if which == "all":
            return [True] * len(params)
        if which == "norms_biases":
            flags = [p.dim() == 1 for p in params]
        else:
            output = model.get_output_embeddings()
            ids = {id(p) for p in output.parameters()} if output is not None else set()
            flags = [id(p) in ids for p in params]
        if not any(flags):
            raise UserError(f"trainer.perturb_params={which} selects no trainable tensor of this model")
        return flags

    def _guide_rows(self, micro_batches):
        """Each micro-batch cut to its first batch_size rows, with the global batch's token and source
        counts recounted for them (trainer.scoring_batch_size: the decodes get the whole micro-batch)."""
        rows = self.cfg.batch_size
        if self.rows_per_micro_batch == rows:
            return micro_batches
        cut = [(shard, {k: v[:rows] for k, v in batch.items()}) for shard, batch in micro_batches]
        own = [batch for shard, batch in cut if shard.local]
        tokens, examples = distributed.sum_ints(self.accelerator, [sum(label_tokens(b) for b in own),
                                                                   sum(len(b["references"]) for b in own)])
        return [(Shard(index=s.index, processes=s.processes, tokens=tokens, examples=examples, local=s.local), b)
                for s, b in cut]

    def _decode(self, model, batch: dict, seed: int) -> torch.Tensor:
        """The batch's output ids under `model` (greedy, or sampled with the same noise for every model)."""
        sample = self.cfg.decode == "sample"
        if sample:  # every perturbed model sees the same sampling noise
            torch.manual_seed(seed)
        return generate(model, batch, max_new_tokens=self.max_new_tokens(batch), do_sample=sample)

    def _score(self, ids: torch.Tensor, batch: dict) -> np.ndarray:
        """The task loss's additive statistics of decoded `ids` against the batch's references."""
        return self.metric.stats(decoded_batch(ids, self.tokenizer, self.eos, batch["references"], batch=batch))

    def task_loss_on(self, model, batch: dict, seed: int) -> float:
        """C(model) on `batch`: decoded and scored as the step's own decodes are (for probes)."""
        return self.metric.loss_from_stats(self._task_stats(model, batch, seed)[0])

    def _task_stats(self, model, batch: dict, seed: int) -> tuple[np.ndarray, float]:
        """(the task loss's additive statistics, decode seconds) for the batch decoded by `model`."""
        t0 = time.perf_counter()
        ids = self._decode(model, batch, seed)
        decode_s = time.perf_counter() - t0
        return self._score(ids, batch), decode_s

    def snapshot(self, params) -> list[torch.Tensor]:
        if self._backup is None or any(b.shape != p.shape for b, p in zip(self._backup, params)):
            self._backup = [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(self._backup, params)
        return self._backup

    def _optimizer_step_as_guide(self, params, backup) -> None:
        """Replace each .grad (= g) by -(the optimizer's step on g), and leave θ unchanged."""
        self.optimizer.step()  # advances the moments with g, as an MLE step would
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.grad.copy_(b - p)  # μ = -η·guide = the step itself (η = 1)
                p.copy_(b)

    def _guide(self, micro_batches, step: int, params) -> tuple[float, float]:
        """g into .grad: the cross-entropy gradient of the global batch (DDP all-reduces it), on the
        references (guide_target=reference) or on each row's best output (best_sample).
        Returns (this process's cross-entropy on the references, ‖g‖ before clipping)."""
        cfg = self.cfg
        loss_sum, tokens = 0.0, 0
        for shard, batch in self.backward_passes(micro_batches, step):
            if cfg.guide_target == "best_sample":
                objective = self._best_sample_objective(batch, shard, step)
                with torch.set_grad_enabled(cfg.guide_mle_mix > 0):
                    micro_sum, micro_tokens = token_cross_entropy(self.model, batch, cfg.label_smoothing)
                if cfg.guide_mle_mix > 0:
                    objective = objective + cfg.guide_mle_mix * shard.per_token(micro_sum, micro_tokens)
            else:
                micro_sum, micro_tokens = token_cross_entropy(self.model, batch, cfg.label_smoothing)
                objective = shard.per_token(micro_sum, micro_tokens)
            self.accelerator.backward(objective)
            loss_sum, tokens = loss_sum + micro_sum.item(), tokens + micro_tokens
        for p in params:
            if p.grad is None:  # e.g. parameters the loss does not reach
                p.grad = torch.zeros_like(p)
        guide_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.guide_max_norm or float("inf")))
        return loss_sum / tokens, guide_norm

    def _best_sample_objective(self, batch: dict, shard: Shard, step: int) -> torch.Tensor:
        """The NLL of _best_targets' outputs, as this micro-batch's share of the global per-source mean (a
        sequence's NLL summed over its tokens, as PG's log p(y|x); guide_max_norm then sets g's size)."""
        targets, lengths, self._guide_log, swapped = self._best_targets(batch, step, shard.index)
        sources = len(batch["references"])
        token_lp, _ = token_log_probs(self.model, batch, targets, torch.arange(sources, device=targets.device),
                                      self.eos, lengths)
        nll = -token_lp.sum(1)
        if self.cfg.guide_rows == "improved":  # a row whose greedy output is already its best adds nothing
            nll = nll * torch.tensor(swapped, dtype=nll.dtype, device=nll.device)
        return shard.per_example(nll.sum(), sources)

    def _best_targets(self, batch: dict, step: int, index: int):
        """Per source, the output the guide raises the likelihood of: among its greedy output and
        trainer.guide_samples samples, the one that gives the batch the lowest task loss with the other rows
        as chosen so far (rows in order, starting from every row's greedy output). The statistics are
        additive, so each swap is scored exactly, at corpus level too: a corpus loss chooses rows by their
        effect on the pooled loss, which no per-output reward can see. Returns (ids, lengths, log stats)."""
        cfg, model = self.cfg, self.unwrapped
        n, per_source = len(batch["references"]), cfg.guide_samples
        limit = self.max_new_tokens(batch)
        greedy = generate(model, batch, max_new_tokens=limit)
        self._theta_greedy[id(batch)] = greedy  # C(θ)'s own decode of this batch: the step reuses it
        torch.manual_seed(self.step_seed(step, index) ^ 0x5EED)  # not the step's other noise
        sampled = generate(model, batch, max_new_tokens=limit, do_sample=True, num_return_sequences=per_source,
                           temperature=cfg.guide_sample_temperature)
        rows = trim(greedy, self.eos) + trim(sampled, self.eos)  # n greedy rows, then n x per_source samples
        owner = list(range(n)) + [i // per_source for i in range(n * per_source)]
        ids, lengths = pad_rows(rows, self._pad_id(), greedy.device)
        decoded = decoded_batch(ids, self.tokenizer, self.eos, [batch["references"][i] for i in owner],
                                batch=batch, source_index=torch.tensor(owner, device=ids.device), lengths=lengths)
        stats = per_row_stats(self.metric, decoded)
        total = stats[:n].sum(0)
        before = self.metric.loss_from_stats(total)
        chosen = list(range(n))  # row index into `rows`
        for i in range(n):
            options = [i] + [n + i * per_source + j for j in range(per_source)]
            trial = [self.metric.loss_from_stats(total - stats[chosen[i]] + stats[o]) for o in options]
            best = options[int(np.argmin(trial))]  # ties keep the greedy output (first)
            total = total - stats[chosen[i]] + stats[best]
            chosen[i] = best
        swapped = sum(c >= n for c in chosen)
        targets, target_lengths = pad_rows([rows[c] for c in chosen], self._pad_id(), greedy.device)
        log = {"guide_rows_swapped": swapped / n, "guide_batch_loss_before": before,
               "guide_batch_loss_after": self.metric.loss_from_stats(total)}
        return targets, target_lengths, log, [c >= n for c in chosen]

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos[0]

    # -- the step -------------------------------------------------------------------
    def step(self, batch: dict, step: int, shard: Shard = Shard()) -> dict[str, float]:
        """One process, one batch: the whole global batch."""
        return self.update([(shard, batch)], step)

    def update(self, micro_batches: list[tuple[Shard, dict]], step: int) -> dict[str, float]:
        cfg, model = self.cfg, self.unwrapped
        params = self._params(model)
        times = dict.fromkeys(("gradient_s", "perturb_s", "decode_s", "score_s", "update_s"), 0.0)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        own = [(shard, batch) for shard, batch in micro_batches if shard.local]
        population = self.needs_every_micro_batch

        # -- guide: the cross-entropy gradient on the same batch, identical on every process
        t0 = time.perf_counter()
        self._guide_log = {}  # best_sample's statistics of the last micro-batch
        self._theta_greedy = {}  # id(batch) -> θ's greedy ids, decoded by best_sample's guide
        model.train()
        cross_entropy, guide_norm = self._guide(self._guide_rows(micro_batches), step, params)
        if not math.isfinite(guide_norm):  # g is all-reduced, so every process returns here together
            return {"loss": float("nan"), "cross_entropy": cross_entropy, "guide_norm": guide_norm}
        guide = [p.grad for p in params]
        backup = self.snapshot(params) if cfg.perturb == "inplace" or cfg.guide == "optimizer" else None
        if cfg.guide == "optimizer":
            self._optimizer_step_as_guide(params, backup)
        noise_scales = compute_noise_scales(self.search, guide, len(guide))  # σ_j: once per step, one sync
        noise_scales = [scale if searched else 0.0 for scale, searched in zip(noise_scales, self.searched)]
        times["gradient_s"] = time.perf_counter() - t0

        # -- perturb, decode, score: C(θ) on this process's own micro-batches, and every sample on every
        #    own micro-batch (data), or this process's share of the samples on every micro-batch (population)
        samples = draw_samples(self.search, torch.Generator().manual_seed(self.step_seed(step)))
        mine = [k for k in range(len(samples)) if not population or k % world == rank]
        decoded = micro_batches if population else own
        decode_all = self._decode_batched if cfg.decode_population == "batched" else self._decode_sequential
        base_stats, sample_stats, perturbation_stats = decode_all(
            model, params, guide, samples, mine, decoded, step, noise_scales, backup, times)

        # -- weight: one all-reduce makes every process hold the same K+1 losses
        t0 = time.perf_counter()
        if world > 1:
            if population:  # every process computed C(θ) on its shard, each sample's stats on one process
                reduced = distributed.sum_array(self.accelerator, np.concatenate([
                    base_stats, sample_stats.ravel(), perturbation_stats.ravel()]))
            else:  # sample statistics add up over shards; the perturbations are the same everywhere
                reduced = distributed.sum_array(self.accelerator, np.concatenate([base_stats, sample_stats.ravel()]))
            base_stats, rest = reduced[:len(base_stats)], reduced[len(base_stats):]
            sample_stats = rest[:sample_stats.size].reshape(sample_stats.shape)
            if population:
                perturbation_stats = rest[sample_stats.size:].reshape(perturbation_stats.shape)
        base_loss = self.metric.loss_from_stats(base_stats)
        losses = [self.metric.loss_from_stats(row) for row in sample_stats]
        stats = [PerturbationStats(*row.tolist()) for row in perturbation_stats]
        search = SearchStep(step, model, params, guide, samples, noise_scales, backup, base_loss, losses)
        probed, weighed_by = {}, (base_loss, losses)
        for probe in self.probes:  # e.g. the lab's oracle: the weights from held-out rows (a measurement)
            replaced = probe.weigh(self, search)
            if replaced is not None:
                weighed_by, probed = replaced[:2], {**probed, **replaced[2]}
        log_weights, info = importance_weights(self.search, samples, weighed_by[1], weighed_by[0], stats)
        times["score_s"] = time.perf_counter() - t0
        for probe in self.probes:
            probed.update(probe.measure(self, search, log_weights))

        # -- update: Δθ* into .grad, negated so that a descending optimizer moves along Δθ*
        t0 = time.perf_counter()
        update_norm = self.write_update(guide, guide, samples, log_weights, noise_scales)
        if cfg.update_max_norm > 0:  # the reference clips Δθ* before its optimizer step
            torch.nn.utils.clip_grad_norm_(params, cfg.update_max_norm)
        with torch.no_grad():
            for g in guide:
                g.neg_()
        times["update_s"] = time.perf_counter() - t0

        excess = np.asarray(losses) - base_loss
        optional = {"temperature": info["temperature"]} if cfg.target_ess is not None else {}
        if cfg.line_search_scales:
            optional["line_search_weight"] = info["line_search_weight"]
        return {
            "loss": base_loss, "task_loss": base_loss, "cross_entropy": cross_entropy,
            "perturbed_loss_min": min(losses), "perturbed_loss_mean": sum(losses) / len(losses),
            "best_improvement": base_loss - min(losses),
            "loss_spread_std": float(excess.std()), "loss_spread_range": float(excess.max() - excess.min()),
            "ess": info["ess"], "ess_share": info["ess"] / len(samples), "weight_entropy": info["weight_entropy"],
            "guided_weight": info["guided_weight"], **optional,
            "noise_norm": info["noise_norm"], "update_norm": update_norm, "guide_norm": guide_norm, **times,
            **self._guide_log, **probed,
        }

    def write_update(self, out, guide, samples, log_weights, noise_scales) -> float:
        """Δθ* into `out` (which may be `guide`); tensors outside the search get the weighted guided centre
        (guide_params=all) or nothing (guide_params=perturbed). Returns ‖Δθ*‖."""
        norm = write_update_(out, guide, self.search, samples, log_weights, noise_scales)
        if self.cfg.guide_params == "perturbed" and not all(self.searched):
            with torch.no_grad():
                for tensor, searched in zip(out, self.searched):
                    if not searched:
                        tensor.zero_()
            norm = math.sqrt(sum(float(t.double().square().sum()) for t in out))
        return norm

    # -- decoding the K+1 parameter sets ---------------------------------------------
    def _decode_sequential(self, model, params, guide, samples, mine, decoded, step, noise_scales, backup, times):
        """(C(θ)'s, each sample's and each perturbation's statistics), one `generate` per parameter set."""
        cfg = self.cfg
        base_stats = None
        for shard, batch in decoded:
            if shard.local:
                cached = self._theta_greedy.pop(id(batch), None) if cfg.decode == "greedy" else None
                if cached is not None:  # best_sample's guide decoded θ greedily already: the same ids
                    stats, decode_s = self._score(cached, batch), 0.0
                else:
                    stats, decode_s = self._task_stats(model, batch, self.step_seed(step, shard.index))
                base_stats = stats if base_stats is None else base_stats + stats
                times["decode_s"] += decode_s
        sample_stats = np.zeros((len(samples), len(base_stats)))
        perturbation_stats = np.zeros((len(samples), len(fields(PerturbationStats))))
        for k in mine:
            t0 = time.perf_counter()
            if cfg.perturb == "copy":
                perturbed = copy.deepcopy(model)
                target = self._params(perturbed)
            else:
                perturbed, target = model, params
            perturbation_stats[k] = astuple(apply_perturbation_(target, guide, self.search, samples[k], noise_scales))
            times["perturb_s"] += time.perf_counter() - t0
            for shard, batch in decoded:
                stats, decode_s = self._task_stats(perturbed, batch, self.step_seed(step, shard.index))
                sample_stats[k] += stats
                times["decode_s"] += decode_s
            t0 = time.perf_counter()
            if cfg.perturb == "copy":
                del perturbed, target
            else:
                with torch.no_grad():
                    torch._foreach_copy_(params, backup)
            times["perturb_s"] += time.perf_counter() - t0
        return base_stats, sample_stats, perturbation_stats

    def _decode_batched(self, model, params, guide, samples, mine, decoded, step, noise_scales, backup, times):
        """The same statistics from one `generate` per micro-batch: group 0 of the rows decodes with θ,
        group i with θ+Δ_{mine[i-1]}, each from its slice of the stacked parameters. In population mode
        the micro-batches of other processes decode group 0 too (its result unused): one group in 1+|mine|."""
        t0 = time.perf_counter()
        # apply_perturbation_ leaves a tensor with σ_j = 0 alone (outside trainer.perturb_params, or a zero
        # guide), so only the others are stacked; the rest stay shared by every group (no copies).
        moved = [p for p, scale in zip(params, noise_scales) if scale != 0.0]
        stacks = dict(zip(moved, batched_decoding.stack_parameters(moved, 1 + len(mine))))  # every group starts as θ
        perturbation_stats = np.zeros((len(samples), len(fields(PerturbationStats))))
        for group, k in enumerate(mine, start=1):
            targets = [stacks[p][group] if p in stacks else p for p in params]  # θ itself is never written
            perturbation_stats[k] = astuple(apply_perturbation_(targets, guide, self.search, samples[k], noise_scales))
        times["perturb_s"] += time.perf_counter() - t0
        base_stats, sample_stats = None, None
        with batched_decoding.population(model, stacks):
            for shard, batch in decoded:
                t0 = time.perf_counter()
                groups = batched_decoding.decode(model, batch, 1 + len(mine), max_new_tokens=self.max_new_tokens(batch))
                times["decode_s"] += time.perf_counter() - t0
                if shard.local:
                    stats = self._score(groups[0], batch)
                    base_stats = stats if base_stats is None else base_stats + stats
                for ids, k in zip(groups[1:], mine):
                    stats = self._score(ids, batch)
                    if sample_stats is None:
                        sample_stats = np.zeros((len(samples), len(stats)))
                    sample_stats[k] += stats
        if sample_stats is None:  # this process decodes no sample (K < processes)
            sample_stats = np.zeros((len(samples), len(base_stats)))
        return base_stats, sample_stats, perturbation_stats

    def apply(self, optimizer) -> None:
        if self.cfg.apply == "optimizer":
            optimizer.step()
            return
        with torch.no_grad():  # θ += sgd_scale · Δθ*  (.grad holds -Δθ*)
            for p in self._params(self.unwrapped):
                p.add_(p.grad, alpha=-self.cfg.sgd_scale)
