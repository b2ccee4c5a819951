"""Time and memory of one training step of every update rule, measured in one process.

    MLEPS_CACHE_DIR=/tmp/mleps_bench_cache python scripts/bench_step.py --quick
    python scripts/bench_step.py                 # tiny_marian and the 6-layer 512-wide Marian
    python scripts/bench_step.py --large         # only the large one
    python scripts/bench_step.py --quick --tiny-test   # seconds: a smoke run on a toy model
    python scripts/bench_step.py --task-losses   # each task loss's scoring share of an MGS step (tiny, batch 64)
    python scripts/bench_step.py --population --tiny   # batched vs sequential population decoding, K = 4, 16
    python scripts/bench_step.py --peft          # the MGS step: whole model vs a LoRA adapter (time, memory)

What is measured (per model, on Multi30k de->en batches of --batch-size, default 64):
  mle          the MLE step (token cross-entropy, backward, AdamW)
  irreducible  the work MGS cannot avoid: one forward+backward and K+1 greedy decodes of the
               batch with the unperturbed model (no detokenisation, no scoring, no perturbation)
  mgs_inplace  the MGS step of mleps/conf/trainer/mgs.yaml (perturb=inplace), K = num_samples = 4
  mgs_copy     the same with perturb=copy (a deep copy of the model per sample)
  pg           the policy-gradient step of mleps/conf/trainer/pg.yaml (K = 4 samples per source)
  mrt          the MRT step of mleps/conf/trainer/mrt.yaml (K = 4 samples per source)
Every variant gets the same optimizer (one AdamW shared by all, as one training process holds
one), starts each step from the same warm parameters (restored outside the timed region) and the
same batch in a given round; rounds visit the variants round-robin in a rotating order, after a
warm-up round, and the table shows medians. So machine load hits all variants alike and the
ratios are measured within one run.

The model is MLE-trained first for --warm-steps steps (cached under $MLEPS_CACHE_DIR/bench):
an untrained model decodes max_new_tokens of garbage for every row, which makes decode timings
meaningless. Decodes are also capped at the trainers' max_new_tokens (64).

Memory: on CUDA torch.cuda.max_memory_allocated over the step; on CPU the process's resident
high-water mark (VmHWM, reset through /proc/self/clear_refs after malloc_trim) over the step.
"peak" is the absolute value (model, optimizer state and, on CPU, the Python runtime included);
"step" is the peak minus what was resident just before the step.

The last line of output is one JSON object with the ratios (see RATIO_KEYS).

--peft measures only the MGS step (mleps/conf/trainer/mgs.yaml, K = --num-samples) on the whole model
against the same warm model with a LoRA adapter (model.peft=lora, rank --lora-r, the default
targets q_proj/v_proj; mleps.models.prepare_model), in rotating rounds. Memory per variant: the
measured peak of the step as above (on CPU the resident high-water mark, which also counts the
allocator's slack) and "state": the bytes the trainable set costs by construction, parameters +
.grad + AdamW's two moments + MGS's one copy of θ (4 x 4 bytes per fp32 trainable parameter),
which is exact on any device. The JSON line holds lora / full ratios (< 1: LoRA is cheaper).
    python scripts/bench_step.py --peft          # tiny_marian and the 6-layer 512-wide Marian

--population measures only trainer.decode_population (mleps.population), per model and K in
--population-k (default 4 16): the K+1 greedy decodes of the batch, sequential (K+1 `generate`
calls, the parameters set to each group in turn) against batched (one call of (K+1)·B rows), and
the MGS step with decode_population=sequential against batched. Rounds alternate the two in a
rotating order; the JSON line holds batched / sequential ratios (< 1: batched is faster).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLEPS_CACHE_DIR", "/tmp/mleps_bench_cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

VARIANTS = ("mle", "irreducible", "mgs_inplace", "mgs_copy", "pg", "mrt")
RATIO_KEYS = ("mgs_inplace_over_irreducible", "mgs_copy_over_inplace", "mgs_over_pg", "mgs_peak_over_mle_peak")
LARGE = dict(d_model=512, layers=6, heads=8, ffn_dim=2048)  # Marian-base sizes
WARM_BATCH = 64  # the MLE warm-up's batch, whatever --batch-size measures
TOY = dict(vocab_size=300, d_model=32, layers=1, heads=2, ffn_dim=64)  # --tiny-test


# ----------------------------------------------------------------------------- memory

_libc = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL("libc.so.6")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Bytes at the start of a region and the peak within it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            if _libc is not None:
                _libc.malloc_trim(0)  # hand freed heap pages back, or they hide the next peak
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
                self.resettable = True
            except OSError:
                self.resettable = False
            self.before = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _status_kb("VmHWM") * 1024 if self.resettable else float("nan")
        return False


# ----------------------------------------------------------------------------- decode counter

class DecodeCounter:
    """Counts the tokens every generate call of the models it is installed on produces, and its time."""

    def __init__(self, eos: list[int], device: torch.device):
        self.eos, self.device = eos, device
        self.reset()

    def reset(self):
        self.tokens = 0  # generated tokens through each row's first EOS
        self.rows = 0
        self.seconds = 0.0

    def __call__(self, ids: torch.Tensor, seconds: float) -> None:
        from mleps.families import label_mask

        if self.device.type == "cuda":  # the observer runs after the call: wait for its kernels
            t0 = time.perf_counter()
            torch.cuda.synchronize(self.device)
            seconds += time.perf_counter() - t0
        self.seconds += seconds
        self.tokens += int(label_mask(ids[:, 1:], self.eos).sum())
        self.rows += ids.shape[0]

    def generate(self, *args, **kwargs):
        from mleps.decoding import generate

        return generate(*args, **kwargs)

    def install(self, model) -> None:
        """`model` (and its deep copies: trainer.perturb=copy decodes with them) gets a subclass whose generate
        reports here: the instrumentation stays in this script, mleps decodes as it always does."""
        counter, base = self, type(model)
        if getattr(base, "_decode_counter", None) is counter:
            return

        def generate(self_, *args, **kwargs):
            t0 = time.perf_counter()
            out = base.generate(self_, *args, **kwargs)
            # the rows as mleps.decoding.generate returns them: a start column, then the generated tokens
            # (a decoder-only model's output begins with the prompt: its last column stands as the start)
            width = 1 if self_.config.is_encoder_decoder else kwargs["input_ids"].shape[1]
            counter(out[:, width - 1:], time.perf_counter() - t0)
            return out

        model.__class__ = type(base.__name__, (base,), {"generate": generate, "_decode_counter": counter})


# ----------------------------------------------------------------------------- setup

def load_yaml(path: Path, schema):
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(schema), raw)


def data_cfg(data_dir: Path):
    from mleps.config import DataConfig

    cfg = load_yaml(ROOT / "mleps" / "conf" / "data" / "multi30k_de_en.yaml", DataConfig)
    cfg.train_file = str(data_dir / "multi30k" / "train.jsonl")
    cfg.validation_file = cfg.test_file = None
    return cfg


def model_cfg(size: str):
    from mleps.config import ModelConfig

    cfg = load_yaml(ROOT / "mleps" / "conf" / "model" / "tiny_marian.yaml", ModelConfig)
    if size == "large":
        cfg = OmegaConf.merge(cfg, LARGE)
    elif size == "toy":
        cfg = OmegaConf.merge(cfg, TOY)
    return cfg


def trainer_cfg(name: str, **overrides):
    from mleps.trainers import RULES

    return OmegaConf.merge(load_yaml(ROOT / "mleps" / "conf" / "trainer" / f"{name}.yaml", RULES[name].schema), overrides)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def warm_model(size: str, args, tokenizer, train_ds, collate, device, log):
    """tiny_marian-style model of `size`, MLE-trained for args.warm_steps steps (cached)."""
    from mleps.data import BatchStream
    from mleps.models import cache_dir, tiny_marian

    mcfg = model_cfg(size)
    torch.manual_seed(0)
    model = tiny_marian(mcfg, tokenizer)
    key = hashlib.sha256(json.dumps([OmegaConf.to_container(mcfg), len(tokenizer), args.warm_steps,
                                     WARM_BATCH, tokenizer.backend_tokenizer.to_str()[-4096:]],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "bench" / f"{size}-warm{args.warm_steps}-{key}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        log(f"[{size}] warm model: {path}")
        return model.to(device)
    from accelerate import Accelerator

    from mleps.schedules import build_scheduler
    from mleps.trainers import build_rule
    from mleps.trainers.mle import MLEConfig

    model.to(device).train()
    # the library's MLE step and schedule: lr 1e-3, 50 warm-up steps then constant, label smoothing 0.1
    warm = OmegaConf.structured(MLEConfig(lr=1e-3, schedule="constant", warmup_steps=50, label_smoothing=0.1,
                                          max_steps=args.warm_steps))
    rule = build_rule("mle", cfg=warm, model=model, tokenizer=tokenizer, metric=None,
                      accelerator=Accelerator(cpu=device.type == "cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=warm.lr, betas=tuple(warm.betas))
    sched = build_scheduler(opt, warm)
    stream = BatchStream(train_ds, WARM_BATCH, seed=1234)

    t0 = time.perf_counter()
    for step in range(args.warm_steps):
        batch = to_device(collate(train_ds[stream.indices(step)]), device)
        opt.zero_grad(set_to_none=True)
        stats = rule.step(batch, step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), warm.max_grad_norm)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.warm_steps - 1:
            log(f"[{size}] warm-up MLE step {step}: loss {stats['loss']:.3f} ({time.perf_counter() - t0:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


class Bench:
    """One model, its shared optimizer and the six variants as callables of (batch, step)."""

    def __init__(self, model, tokenizer, metric, device, args):
        from accelerate import Accelerator
        from mleps.trainers import build_rule
        from mleps.trainers.sequences import eos_ids

        self.model, self.device, self.args = model, device, args
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.snapshot = [p.detach().clone() for p in self.params]
        self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.98))
        for p in self.params:  # create AdamW's state now, so that no variant's first step pays for it
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.counter = DecodeCounter(eos_ids(model), device)
        self.counter.install(model)
        accelerator = Accelerator(cpu=device.type == "cpu")
        k, mnt = args.num_samples, args.max_new_tokens
        cfgs = {
            "mle": trainer_cfg("mle"),
            "mgs_inplace": trainer_cfg("mgs", num_samples=k, max_new_tokens=mnt, perturb="inplace"),
            "mgs_copy": trainer_cfg("mgs", num_samples=k, max_new_tokens=mnt, perturb="copy"),
            "pg": trainer_cfg("pg", num_samples=k, max_new_tokens=mnt),
            "mrt": trainer_cfg("mrt", num_samples=k, max_new_tokens=mnt),
        }
        self.cfgs = cfgs
        self.rules = {}
        for name, cfg in cfgs.items():
            self.rules[name] = build_rule(cfg.name, cfg=cfg, model=model, tokenizer=tokenizer, metric=metric,
                                          accelerator=accelerator, seed=0, optimizer=self.optimizer)

    def restore(self):
        with torch.no_grad():
            for p, s in zip(self.params, self.snapshot):
                p.copy_(s)
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()

    def irreducible(self, batch, step):
        from mleps.trainers.base import token_cross_entropy

        loss_sum, tokens = token_cross_entropy(self.model, batch)
        (loss_sum / tokens).backward()
        for _ in range(self.args.num_samples + 1):
            self.counter.generate(self.model, batch, max_new_tokens=self.args.max_new_tokens)

    def run(self, name, batch, step) -> dict:
        """One step of `name` as the loop runs it (zero_grad, step, clip, apply)."""
        if name == "irreducible":
            self.irreducible(batch, step)
            return {}
        rule = self.rules[name]
        stats = rule.step(batch, step)
        if rule.clip_in_loop and rule.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, rule.cfg.max_grad_norm)
        rule.apply(self.optimizer)
        return stats

    def timed(self, name, batch, step) -> dict:
        self.restore()
        self.counter.reset()
        sync()
        t0 = time.perf_counter()
        stats = self.run(name, batch, step)
        sync()
        seconds = time.perf_counter() - t0
        return {"s": seconds, "tokens": self.counter.tokens, "rows": self.counter.rows,
                "decode_s": self.counter.seconds, "stats": stats}

    def memory(self, name, batch, step) -> tuple[int, int]:
        self.restore()
        with PeakMemory(self.device) as mem:
            self.run(name, batch, step)
        return mem.before, mem.peak


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- measurement

def measure(size: str, args, shared, device, log) -> dict:
    tokenizer, train_ds, collate, metric = shared
    model = warm_model(size, args, tokenizer, train_ds, collate, device, log)
    bench = Bench(model, tokenizer, metric, device, args)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{size}] {n_params / 1e6:.1f} M parameters, {bench.param_bytes / 2**20:.0f} MiB")

    # Fixed measurement batches, away from the warm-up stream.
    g = torch.Generator().manual_seed(99)
    order = torch.randperm(len(train_ds), generator=g).tolist()
    batches = [to_device(collate(train_ds[order[i * args.batch_size:(i + 1) * args.batch_size]]), device)
               for i in range(args.rounds + 1)]

    variants = list(VARIANTS)
    times = {v: [] for v in variants}
    log(f"[{size}] warm-up round (measures peak memory)")
    memory = {}
    for v in variants:
        before, peak = bench.memory(v, batches[0], 0)
        memory[v] = {"before": before, "peak": peak, "step": peak - before}
    for r in range(args.rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            times[v].append(bench.timed(v, batches[r + 1], r + 1))
        log(f"[{size}] round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {times[v][-1]['s']:.2f}s" for v in variants))


    rows = {}
    for v in variants:
        ts = times[v]
        med = statistics.median(t["s"] for t in ts)
        tokens = statistics.median(t["tokens"] for t in ts)
        rows[v] = {
            "median_s": med, "min_s": min(t["s"] for t in ts), "max_s": max(t["s"] for t in ts),
            "decoded_rows": ts[0]["rows"], "decoded_tokens": tokens,
            "tokens_per_s": (tokens / med) if tokens else None,
            "decode_median_s": statistics.median(t["decode_s"] for t in ts),
            **memory[v],
        }
        if v.startswith("mgs"):  # the rule's own breakdown
            for key in ("gradient_s", "perturb_s", "decode_s", "score_s", "update_s"):
                rows[v]["rule_" + key] = statistics.median(t["stats"][key] for t in ts)
    return {"size": size, "parameters": n_params, "param_bytes": bench.param_bytes, "rows": rows,
            "rounds": args.rounds}


def ratios(result: dict) -> dict:
    r = result["rows"]
    mem_ok = r["mgs_inplace"]["peak"] <= r["mle"]["peak"] + result["param_bytes"]
    out = {
        "mgs_inplace_over_irreducible": r["mgs_inplace"]["median_s"] / r["irreducible"]["median_s"],
        "mgs_copy_over_inplace": r["mgs_copy"]["median_s"] / r["mgs_inplace"]["median_s"],
        "mgs_over_pg": r["mgs_inplace"]["median_s"] / r["pg"]["median_s"],
        "mgs_over_mrt": r["mgs_inplace"]["median_s"] / r["mrt"]["median_s"],
        "mgs_over_mle": r["mgs_inplace"]["median_s"] / r["mle"]["median_s"],
        "mgs_peak_over_mle_peak": r["mgs_inplace"]["peak"] / r["mle"]["peak"],
        "mgs_step_mem_over_mle_step_mem": r["mgs_inplace"]["step"] / max(r["mle"]["step"], 1),
        "mgs_copy_peak_over_mle_peak": r["mgs_copy"]["peak"] / r["mle"]["peak"],
        # the decode-length check: MGS's perturbed models may decode longer than θ does
        "mgs_tokens_over_irreducible_tokens": r["mgs_inplace"]["decoded_tokens"] / max(r["irreducible"]["decoded_tokens"], 1),
    }
    out["targets"] = {
        "mgs_inplace_le_1.10x_irreducible": out["mgs_inplace_over_irreducible"] <= 1.10,
        "mgs_inplace_faster_than_copy": out["mgs_copy_over_inplace"] > 1.0,
        "mgs_peak_le_mle_peak_plus_params": bool(mem_ok),
        "mgs_le_1.3x_pg": out["mgs_over_pg"] <= 1.3,
    }
    return out


def print_table(result: dict, device) -> None:
    unit = "alloc" if device.type == "cuda" else "RSS"
    print(f"\n== {result['size']}: {result['parameters'] / 1e6:.1f} M parameters "
          f"({result['param_bytes'] / 2**20:.0f} MiB), medians of {result['rounds']} rounds ==")
    head = (f"{'variant':<12} {'median s':>9} {'min s':>7} {'max s':>7} {'x mle':>6} {'rows':>5} {'tokens':>7} "
            f"{'tok/s':>7} {'decode s':>9} {'peak ' + unit + ' MiB':>14} {'step MiB':>9}")
    print(head)
    print("-" * len(head))
    rows = result["rows"]
    mle = rows["mle"]["median_s"]
    for v, r in rows.items():
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        print(f"{v:<12} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['max_s']:>7.3f} {r['median_s'] / mle:>6.1f} "
              f"{r['decoded_rows']:>5} {r['decoded_tokens']:>7.0f} {tps:>7} {r['decode_median_s']:>9.3f} "
              f"{r['peak'] / 2**20:>14.0f} {r['step'] / 2**20:>9.0f}")
    for v in ("mgs_inplace", "mgs_copy"):
        r = rows[v]
        print(f"{v} breakdown (rule's own timers, medians): " + ", ".join(
            f"{k[5:]} {r[k]:.3f}" for k in r if k.startswith("rule_")))
    rat = ratios(result)
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in rat.items() if k != "targets"))
    print("targets: " + ", ".join(f"{k} {'MET' if v else 'MISSED'}" for k, v in rat["targets"].items()))


def profile_mgs(size, args, shared, device, out_dir: Path | None) -> None:
    """cProfile (Python-level) and torch.profiler (operator-level) of MGS-inplace steps."""
    import cProfile
    import io
    import pstats

    tokenizer, train_ds, collate, metric = shared
    model = warm_model(size, args, tokenizer, train_ds, collate, device, print)
    bench = Bench(model, tokenizer, metric, device, args)
    batch = to_device(collate(train_ds[list(range(args.batch_size))]), device)
    bench.timed("mgs_inplace", batch, 0)
    prof = cProfile.Profile()
    for step in range(1, 4):
        bench.restore()
        prof.enable()
        bench.run("mgs_inplace", batch, step)
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print("\n== cProfile, 3 MGS-inplace steps, by own time ==")
    print(s.getvalue())
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats("mleps|sacrebleu|tokenization|generation/utils", 30)
    print("\n== cProfile, by cumulative time (mleps, sacrebleu, tokenizer, generate) ==")
    print(s.getvalue())
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    bench.restore()
    with profile(activities=acts) as tp:
        bench.run("mgs_inplace", batch, 5)
    print("\n== torch.profiler, 1 MGS-inplace step ==")
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(out_dir / f"mgs_{size}.prof"))


# ----------------------------------------------------------------------------- population decoding

def measure_population(size: str, args, shared, device, log) -> dict:
    """Batched / sequential time of the K+1 decodes and of the MGS step, for each K."""
    from accelerate import Accelerator

    from mleps import population
    from mleps.decoding import generate
    from mleps.search import SearchConfig, apply_perturbation_, draw_samples
    from mleps.trainers import build_rule

    tokenizer, train_ds, collate, metric = shared
    model = warm_model(size, args, tokenizer, train_ds, collate, device, log)
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(98)
    order = torch.randperm(len(train_ds), generator=g).tolist()
    batches = [to_device(collate(train_ds[order[i * args.batch_size:(i + 1) * args.batch_size]]), device)
               for i in range(args.rounds + 1)]
    accelerator = Accelerator(cpu=device.type == "cpu")
    result = {"size": size, "batch_size": args.batch_size, "rounds": args.rounds, "k": {}}
    for k in args.population_k:
        # K perturbed parameter sets; a small σ, so that they decode about as long as θ does
        search = SearchConfig(num_samples=k, noise_mode="constant", noise_scale=1e-3, proposal="zero")
        stacks = population.stack_parameters(params, k + 1)
        for group, sample in enumerate(draw_samples(search, torch.Generator().manual_seed(k)), start=1):
            apply_perturbation_([s[group] for s in stacks], None, search, sample)
        rules = {mode: build_rule("mgs", cfg=trainer_cfg("mgs", num_samples=k, max_new_tokens=args.max_new_tokens,
                                                         decode_population=mode),
                                  model=model, tokenizer=tokenizer, metric=metric, accelerator=accelerator, seed=0,
                                  optimizer=optimizer)
                 for mode in ("sequential", "batched")}

        def restore():
            with torch.no_grad():
                torch._foreach_copy_(params, theta)
            optimizer.zero_grad(set_to_none=True)
            model.train()

        def decode_sequential(batch):
            for group in range(k + 1):
                with torch.no_grad():
                    torch._foreach_copy_(params, [s[group] for s in stacks])
                generate(model, batch, max_new_tokens=args.max_new_tokens)

        def decode_batched(batch):
            with population.population(model, dict(zip(params, stacks))):
                population.decode(model, batch, k + 1, max_new_tokens=args.max_new_tokens)

        def step(mode):
            return lambda batch: (rules[mode].step(batch, 1), rules[mode].apply(optimizer))

        variants = {"decode_sequential": decode_sequential, "decode_batched": decode_batched,
                    "step_sequential": step("sequential"), "step_batched": step("batched")}
        times = {v: [] for v in variants}
        for r in range(args.rounds + 1):  # round 0 warms up
            names = list(variants)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                restore()
                sync()
                t0 = time.perf_counter()
                variants[name](batches[r])
                sync()
                if r:
                    times[name].append(time.perf_counter() - t0)
            if r:
                log(f"[{size}] K={k} round {r}/{args.rounds}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in variants))
        restore()
        med = {v: statistics.median(t) for v, t in times.items()}
        result["k"][k] = {**{v + "_s": m for v, m in med.items()},
                          "decode_batched_over_sequential": med["decode_batched"] / med["decode_sequential"],
                          "step_batched_over_sequential": med["step_batched"] / med["step_sequential"]}
        del stacks
    return result


def measure_peft(size: str, args, shared, device, log) -> dict:
    """The MGS step on the whole model and on a LoRA adapter of the same warm model: time and memory."""
    import copy

    from accelerate import Accelerator

    from mleps.models import prepare_model
    from mleps.trainers import build_rule
    from mleps.trainers.sequences import eos_ids

    tokenizer, train_ds, collate, metric = shared
    full = warm_model(size, args, tokenizer, train_ds, collate, device, log)
    torch.manual_seed(0)
    lora = prepare_model(copy.deepcopy(full), OmegaConf.merge(model_cfg(size), {
        "peft": "lora", "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r})).to(device)
    g = torch.Generator().manual_seed(97)
    order = torch.randperm(len(train_ds), generator=g).tolist()
    batches = [to_device(collate(train_ds[order[i * args.batch_size:(i + 1) * args.batch_size]]), device)
               for i in range(args.rounds + 2)]
    accelerator = Accelerator(cpu=device.type == "cpu")
    variants = {}
    for name, model in (("full", full), ("lora", lora)):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98))
        for p in params:  # AdamW's state exists before the first measured step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        cfg = trainer_cfg("mgs", num_samples=args.num_samples, max_new_tokens=args.max_new_tokens)
        rule = build_rule("mgs", cfg=cfg, model=model, tokenizer=tokenizer, metric=metric, accelerator=accelerator,
                          seed=0, optimizer=optimizer)
        trainable = sum(p.numel() for p in params)
        variants[name] = dict(model=model, params=params, optimizer=optimizer, rule=rule, trainable=trainable,
                              snapshot=[p.detach().clone() for p in params],
                              state_bytes=4 * sum(p.numel() * p.element_size() for p in params))

    def restore(v):
        with torch.no_grad():
            torch._foreach_copy_(v["params"], v["snapshot"])
        v["optimizer"].zero_grad(set_to_none=True)
        v["model"].train()

    def step(v, batch):
        v["rule"].step(batch, 1)
        v["rule"].apply(v["optimizer"])

    # the two variants' perturbed models decode different lengths: the decoded tokens separate the time an
    # adapter saves per token from the time a longer (or shorter) decode costs
    counter = DecodeCounter(eos_ids(full), device)
    for v in variants.values():
        counter.install(v["model"])
    times, tokens = {name: [] for name in variants}, {name: [] for name in variants}
    for r in range(args.rounds + 1):  # round 0 warms up
        names = list(variants)[r % 2:] + list(variants)[:r % 2]
        for name in names:
            restore(variants[name])
            counter.reset()
            sync()
            t0 = time.perf_counter()
            step(variants[name], batches[r])
            sync()
            if r:
                times[name].append(time.perf_counter() - t0)
                tokens[name].append(counter.tokens)
        if r:
            log(f"[{size}] peft round {r}/{args.rounds}: " + ", ".join(
                f"{n} {times[n][-1]:.2f}s {tokens[n][-1]} tokens" for n in variants))
    result = {"size": size, "batch_size": args.batch_size, "rounds": args.rounds, "lora_r": args.lora_r,
              "num_samples": args.num_samples, "variants": {}}
    for name, v in variants.items():
        restore(v)
        with PeakMemory(device) as mem:
            step(v, batches[-1])
        result["variants"][name] = {"step_s": statistics.median(times[name]), "trainable": v["trainable"],
                                    "decoded_tokens": statistics.median(tokens[name]),
                                    "ms_per_token": 1e3 * sum(times[name]) / max(sum(tokens[name]), 1),
                                    "state_bytes": v["state_bytes"], "peak_bytes": mem.peak,
                                    "step_bytes": mem.peak - mem.before}
        restore(v)
    full_r, lora_r = result["variants"]["full"], result["variants"]["lora"]
    for key in ("step_s", "decoded_tokens", "ms_per_token", "state_bytes", "peak_bytes", "step_bytes"):
        result[f"lora_over_full_{key}"] = lora_r[key] / full_r[key] if full_r[key] else float("nan")
    return result


def print_peft(result: dict, device) -> None:
    print(f"\n== {result['size']}: MGS step, whole model vs LoRA r={result['lora_r']} on {device}, batch "
          f"{result['batch_size']}, K={result['num_samples']}, medians of {result['rounds']} rounds ==")
    print(f"{'variant':<8} {'trainable':>11} {'step s':>8} {'tokens':>8} {'ms/token':>9} {'state MB':>9} "
          f"{'peak MB':>9} {'step MB':>9}")
    for name, r in result["variants"].items():
        print(f"{name:<8} {r['trainable']:>11,} {r['step_s']:>8.3f} {r['decoded_tokens']:>8.0f} "
              f"{r['ms_per_token']:>9.3f} {r['state_bytes'] / 2**20:>9.1f} "
              f"{r['peak_bytes'] / 2**20:>9.1f} {r['step_bytes'] / 2**20:>9.1f}")
    print(f"lora/full: step time {result['lora_over_full_step_s']:.3f}, decoded tokens "
          f"{result['lora_over_full_decoded_tokens']:.3f}, step time per decoded token "
          f"{result['lora_over_full_ms_per_token']:.3f}, state {result['lora_over_full_state_bytes']:.4f}, "
          f"peak {result['lora_over_full_peak_bytes']:.3f}")


def print_population(result: dict, device) -> None:
    print(f"\n== {result['size']}: population decoding on {device}, batch {result['batch_size']}, "
          f"medians of {result['rounds']} rounds ==")
    print(f"{'K':>3} {'decode seq s':>13} {'decode bat s':>13} {'bat/seq':>8} {'step seq s':>11} {'step bat s':>11} "
          f"{'bat/seq':>8}")
    for k, r in result["k"].items():
        print(f"{k:>3} {r['decode_sequential_s']:>13.3f} {r['decode_batched_s']:>13.3f} "
              f"{r['decode_batched_over_sequential']:>8.3f} {r['step_sequential_s']:>11.3f} "
              f"{r['step_batched_s']:>11.3f} {r['step_batched_over_sequential']:>8.3f}")


# ----------------------------------------------------------------------------- main

TASK_LOSSES = {  # name: build_task_loss options (the mleps/conf/metric/*.yaml defaults)
    "bleu": {}, "chrf": {}, "rouge": {}, "repetition": {}, "nontermination": {}, "edit": {}, "length": {}, "lm": {},
    "composite": {"losses": ["repetition", "nontermination", "lm"], "weights": [1.0, 1.0, 0.1]},
}


def task_loss_shares(args, shared, device, log) -> dict:
    """Each task loss's scoring time (every `_score` call: K+1 decoded batches) as a share of the MGS
    step (mleps/conf/trainer/mgs.yaml, K = --num-samples) on the tiny model; medians over --rounds."""
    from accelerate import Accelerator

    from mleps.losses import build_task_loss
    from mleps.trainers import build_rule

    tokenizer, train_ds, collate, _ = shared
    model = warm_model("toy" if args.tiny_test else "tiny", args, tokenizer, train_ds, collate, device, log)
    snapshot = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(99)
    order = torch.randperm(len(train_ds), generator=g).tolist()
    batches = [to_device(collate(train_ds[order[i * args.batch_size:(i + 1) * args.batch_size]]), device)
               for i in range(args.rounds + 1)]
    cfg = trainer_cfg("mgs", num_samples=args.num_samples, max_new_tokens=args.max_new_tokens)
    rows = {}
    for name, options in TASK_LOSSES.items():
        loss = build_task_loss(name, "corpus", **options)
        loss.bind(model, tokenizer)
        rule = build_rule("mgs", cfg=cfg, model=model, tokenizer=tokenizer, metric=loss,
                          accelerator=Accelerator(cpu=device.type == "cpu"), seed=0, optimizer=optimizer)
        score_s = [0.0]
        inner = rule._score

        def timed_score(ids, batch, inner=inner, score_s=score_s):
            t0 = time.perf_counter()
            out = inner(ids, batch)
            score_s[0] += time.perf_counter() - t0
            return out

        rule._score = timed_score
        steps, scores = [], []
        for r, batch in enumerate(batches):  # the first is a warm-up (caches, lazy initialisation)
            with torch.no_grad():
                for p, s0 in zip(model.parameters(), snapshot):
                    p.copy_(s0)
            optimizer.zero_grad(set_to_none=True)
            score_s[0] = 0.0
            t0 = time.perf_counter()
            rule.step(batch, r)
            rule.apply(optimizer)
            if r:
                steps.append(time.perf_counter() - t0)
                scores.append(score_s[0])
        step, score = statistics.median(steps), statistics.median(scores)
        rows[name] = {"step_s": step, "score_s": score, "share": score / step}
        log(f"[task losses] {name}: step {step:.2f} s, scoring {score * 1e3:.0f} ms")
    print(f"\nTask-loss scoring in one MGS step (K={args.num_samples}, batch {args.batch_size}, {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.1f}):")
    print(f"{'loss':<16}{'step s':>8}{'score ms':>10}{'share':>8}")
    for name, row in rows.items():
        print(f"{name:<16}{row['step_s']:>8.2f}{row['score_s'] * 1e3:>10.0f}{row['share']:>8.1%}")
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model only, batches of 16 (unless --batch-size), 2 rounds: about a minute once the "
                        "warm model is cached")
    p.add_argument("--large", action="store_true", help="only the 6-layer 512-wide Marian")
    p.add_argument("--tiny", action="store_true", help="only the embedded tiny_marian")
    p.add_argument("--tiny-test", action="store_true", help="a toy 32-wide model and 8-row batches (smoke test)")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default 7, --quick 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=4, help="K for MGS, PG and MRT")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--warm-steps", type=int, default=None, help="MLE steps before measuring (default 200)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is there")
    p.add_argument("--profile", action="store_true", help="also profile the MGS step (cProfile + torch.profiler)")
    p.add_argument("--profile-dir", default=None, help="write the cProfile dump here")
    p.add_argument("--json-out", default=None, help="also write the full results here")
    p.add_argument("--task-losses", action="store_true",
                   help="only each task loss's scoring share of an MGS step (tiny model, --batch-size)")
    p.add_argument("--population", action="store_true",
                   help="only time trainer.decode_population=batched against sequential (decode and MGS step)")
    p.add_argument("--population-k", type=int, nargs="+", default=[4, 16], help="K values for --population")
    p.add_argument("--peft", action="store_true", help="only the MGS step on the whole model against a LoRA adapter")
    p.add_argument("--lora-r", type=int, default=8, help="the adapter's rank for --peft (lora_alpha = 2 r)")
    args = p.parse_args(argv)
    args.batch_size_default = "--batch-size" not in (argv if argv is not None else sys.argv)
    if args.tiny_test:
        args.batch_size = min(args.batch_size, 8)
        args.max_new_tokens = min(args.max_new_tokens, 16)
    if args.quick and args.batch_size_default:
        args.batch_size = 16  # a 64-row round of the six variants takes ~1 min on a loaded 2-core CPU
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3 if args.tiny_test else 7
    if args.warm_steps is None:
        args.warm_steps = 30 if args.tiny_test else 200
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    sizes = (["toy"] if args.tiny_test else ["large"] if args.large else ["tiny"] if (args.tiny or args.quick)
             else ["tiny", "large"])

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import logging

    import datasets
    from transformers.utils import logging as hf_logging

    from mleps.data import Collator, load_split, tokenize
    from mleps.metrics import build_metric
    from mleps.models import bpe_tokenizer, cache_dir

    logging.basicConfig(level=logging.WARNING)
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    t_start = time.perf_counter()
    data_dir = Path(os.environ.get("MLEPS_DATA_DIR", ROOT / "data"))
    dcfg = data_cfg(data_dir)
    raw = load_split(dcfg, "train")
    vocab = model_cfg(sizes[0]).vocab_size
    tokenizer = bpe_tokenizer(dcfg, raw, vocab, cache_dir())
    # The warm-up needs warm_steps batches; the measurement rounds + 1 more, drawn from the same rows.
    needed = min(len(raw), max(args.warm_steps * WARM_BATCH, (args.rounds + 2) * args.batch_size) + 4 * WARM_BATCH)
    train_ds = tokenize(raw.select(range(needed)), tokenizer, dcfg)
    metric = build_metric("bleu", "corpus")  # mleps/conf/metric/bleu.yaml; pg/mrt use its sentence scores
    log(f"setup {time.perf_counter() - t_start:.1f} s: {len(train_ds)} pairs, vocab {len(tokenizer)}, "
        f"device {device}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")

    if args.task_losses:
        from mleps.models import tiny_marian
        collate = Collator(tokenizer, tiny_marian(OmegaConf.merge(model_cfg(sizes[0]), TOY, {"vocab_size": vocab}),
                                                  tokenizer))
        rows = task_loss_shares(args, (tokenizer, train_ds, collate, metric), device, log)
        print(json.dumps({"task_loss_shares": rows, "batch_size": args.batch_size, "rounds": args.rounds,
                          "loadavg": os.getloadavg()}, default=float), flush=True)
        return rows

    results = []
    for size in sizes:
        # The collator only uses the model for decoder_input_ids (labels shifted right after the start
        # token): the same for every size, so a toy model built in milliseconds serves.
        from mleps.models import tiny_marian
        collate = Collator(tokenizer, tiny_marian(OmegaConf.merge(model_cfg(size), TOY, {"vocab_size": vocab}), tokenizer))
        shared = (tokenizer, train_ds, collate, metric)
        if args.population:
            results.append(measure_population(size, args, shared, device, log))
            print_population(results[-1], device)
            continue
        if args.peft:
            results.append(measure_peft(size, args, shared, device, log))
            print_peft(results[-1], device)
            continue
        result = measure(size, args, shared, device, log)
        results.append(result)
        print_table(result, device)
        if args.profile:
            profile_mgs(size, args, shared, device, Path(args.profile_dir) if args.profile_dir else None)

    machine = {"device": str(device), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
               "loadavg": os.getloadavg(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    summary = {}
    for result in results:
        if "rows" in result:
            rat = ratios(result)
        elif "variants" in result:  # --peft
            rat = {key: value for key, value in result.items() if "_over_" in key}
        else:  # --population
            rat = {f"k{k}_{key}": value for k, r in result["k"].items() for key, value in r.items() if "_over_" in key}
        prefix = "" if result is results[0] else result["size"] + "_"
        for key, value in rat.items():
            summary[prefix + key] = value
    summary.update(sizes=sizes, rounds=args.rounds, batch_size=args.batch_size, num_samples=args.num_samples,
                   warm_steps=args.warm_steps, machine=machine, wall_s=round(time.perf_counter() - t_start, 1))
    if len(results) > 1:
        summary["primary"] = results[0]["size"]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "results": results}, indent=1, default=float))
    print(json.dumps(summary, default=float), flush=True)
    return summary


if __name__ == "__main__":
    main()
