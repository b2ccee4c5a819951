"""Typed schemas for every config group, registered with Hydra's ConfigStore.

The YAML files under conf/ hold the values; these dataclasses hold the types, so a
wrong type (`trainer.lr=abc`) fails at start with Hydra's message naming the key.
Each trainer extends `TrainerConfig` with the knobs its update rule reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    source_column: str = MISSING
    target_column: str = MISSING
    reference_columns: List[str] = field(default_factory=list)  # extra references (eval only)
    max_train_examples: Optional[int] = None  # null = all
    max_eval_examples: Optional[int] = None
    max_source_length: int = 128  # tokens; longer examples are truncated and counted
    max_target_length: int = 128
    task: str = "pairs"  # pairs: source -> target | completion: continue each document's prefix (docs/completion.md)
    text_column: Optional[str] = None  # completion: the documents' column (a .txt file: one document per line)
    prefix_tokens: int = 10  # completion: prompt length in tokens; shorter documents are skipped and counted
    continuation_tokens: int = 50  # completion: reference continuation, at most this many tokens (+ EOS)
    # completion: keep only documents that end within prefix + continuation tokens, so every reference
    # ends with EOS and not stopping is purely a defect (the others are skipped and counted)
    whole_documents: bool = False
    loss_on: Optional[str] = None  # decoder-only MLE: all (null: prompt and continuation) | continuation
    # completion: windows (a prefix and continuation_tokens more) | paragraphs (each non-empty line of a
    # document is one sequence) | documents (each document whole); the last two end every reference with EOS
    sequences: str = "windows"
    min_sequence_tokens: int = 10  # paragraphs/documents: drop sequences of at most this many tokens (counted)
    max_sequence_tokens: Optional[int] = None  # paragraphs/documents: drop longer sequences (counted); null = keep


@dataclass
class ModelConfig:
    name: str = MISSING  # tiny_marian | tiny_gpt2 | hf
    name_or_path: Optional[str] = None  # hf: hub name or local folder
    kind: str = "auto"  # hf: auto (from the checkpoint's config) | causal | seq2seq
    source_prefix: str = ""  # T5-style task prompt, e.g. "translate German to English: "
    trust_remote_code: bool = False
    # tiny_marian / tiny_gpt2: a MarianMTModel / GPT2LMHeadModel built from this config and a BPE
    # tokenizer trained on the data
    vocab_size: int = 8000
    d_model: int = 256
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1
    max_positions: int = 512  # tiny_gpt2: n_positions (prompt + output tokens)


@dataclass
class MetricConfig:
    """The task loss (docs/metrics.md): what MGS/PG/MRT minimise and validation selects on."""

    name: str = "bleu"  # bleu | chrf | rouge | repetition | seq_rep | nontermination | edit | length | lm | custom | composite
    level: str = "corpus"  # corpus: one loss pooled over the batch; sentence: mean of sentence losses
    reduction: str = "mean"  # lm: mean (NLL per token) | sum (NLL of the whole sequence, MGS-LM's loss)
    rouge_tokenizer: str = "default"  # default | whitespace | char (default drops non-Latin text)
    rouge_key: str = "rougeL"
    n: int = 4  # repetition: n-gram order of seq-rep-n
    unit: str = "word"  # edit, length: word | char
    score_model: Optional[str] = None  # lm: a checkpoint folder; null = a frozen copy of the model at the start
    fn: Optional[str] = None  # custom: package.module:function, fn(decoded) -> one float per output
    losses: List[str] = field(default_factory=list)  # composite: the component losses' names
    weights: List[Any] = field(default_factory=list)  # composite: one number per loss (checked at start)


@dataclass
class EvalConfig:
    metrics: List[str] = field(default_factory=list)  # secondary validation metrics, e.g. [bleu,chrf,repetition]
    # what checkpoints/best and trainer.patience follow: the metric's score, or the references'
    # cross_entropy (lower is better; the MLE optimum, e.g. for a completion base model)
    select: str = "score"


@dataclass
class DecodeConfig:
    num_beams: int = 1
    max_new_tokens: int = 64
    batch_size: int = 128
    length_penalty: float = 1.0


@dataclass
class TrainerConfig:
    name: str = MISSING
    max_steps: int = 1000
    batch_size: int = 64  # per process and micro-batch: the global batch is batch_size x processes x accumulation
    gradient_accumulation_steps: int = 1  # micro-batches per process per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    schedule: str = "inverse_sqrt"  # constant | linear | inverse_sqrt | cosine
    warmup_steps: int = 100
    max_grad_norm: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.0
    eval_every: int = 500
    log_every: int = 25
    save_every: int = 500
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    max_train_s: Optional[float] = None  # stop the phase after this much training time (equal-time comparisons)
    # null: batch_size rows per micro-batch; N: length-sorted batches of at most N padded tokens
    # (completion; the reference code's --chunk-size-train), mleps.data.TokenBudgetStream
    batch_tokens: Optional[int] = None
    # training-time decodes (mgs, pg, mrt) stop at ceil(ratio x the batch's longest reference), at most
    # trainer.max_new_tokens; null = always trainer.max_new_tokens (the reference code uses 1.3)
    max_length_ratio: Optional[float] = None
    patience: Optional[int] = None  # end the phase after this many evaluations without a new best (null = off)
    # The paper's recipe: MLE from scratch, then this rule. Skipped when 0. The warm start is an
    # MLE phase with these settings and this trainer's batch layout, clipping and logging.
    warm_start_steps: int = 0
    warm_start_lr: float = 1e-3
    warm_start_eval_every: int = 500
    warm_start_schedule: str = "inverse_sqrt"
    warm_start_warmup_steps: int = 200
    warm_start_label_smoothing: float = 0.1


@dataclass
class MLEConfig(TrainerConfig):
    name: str = "mle"


@dataclass
class MGSConfig(TrainerConfig):
    name: str = "mgs"
    lr: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    num_samples: int = 4  # K perturbations per step
    proposal: str = "mixture"  # zero | guided | mixture
    mixture_weight: float = 0.5  # lambda: share of zero-centred perturbations
    noise_scale: float = 1.0  # sigma (relative: times each tensor's mean |guide|)
    noise_mode: str = "relative"  # relative | constant
    temperature: Optional[float] = 0.01  # alpha, in units of the task loss (1 - metric/100)
    beta: Optional[float] = None  # the MGS paper's 1/alpha (100 there); set temperature=null to use it
    density: str = "fixed_norm"  # proposal density in the importance weights (see docs/sampling-view.md)
    guide: str = "optimizer"  # scaled: mu = -guide_scale * g ; optimizer: mu = the optimizer's own next step
    guide_scale: float = 1.0
    guide_max_norm: float = 1.0  # the guide gradient g is clipped to this norm first (0 = off)
    decode: str = "greedy"  # greedy | sample
    max_new_tokens: int = 64
    perturb: str = "inplace"  # inplace | copy (deep copy per sample, the original code's way)
    parallel: str = "data"  # several processes: data (each decodes its shard) | population (each its samples)
    decode_population: str = "sequential"  # sequential: one generate per parameter set | batched: one for all
    apply: str = "sgd"  # optimizer: -update handed to the optimizer as .grad ; sgd: theta += update
    sgd_scale: float = 1.0
    update_max_norm: float = 0.0  # clip Δθ* to this norm before it is applied (the reference clips to 1); 0 = off
    # Levers on the weights' signal (docs/mgs.md, "Levers"); the defaults are the plain rule.
    target_ess: Optional[float] = None  # share of the samples in (0, 1]: alpha chosen per step so ESS = share x K
    weighting: str = "boltzmann"  # boltzmann: exp(-(C_k - C_0)/alpha) | rank: softmax of -rank_k/alpha, ranks in [0, 1]
    antithetic: bool = False  # mirrored pairs Delta and -Delta around the same centre (K even)
    scoring_batch_size: Optional[int] = None  # rows decoded and scored per micro-batch (>= batch_size, the guide's)
    perturb_params: str = "all"  # the tensors the noise perturbs: all | norms_biases (1-d tensors) | output
    guide_params: str = "all"  # all: other tensors move along the weighted guide | perturbed: only the searched move
    line_search_scales: List[float] = field(default_factory=list)  # extra noiseless samples at s x mu, e.g. [0.5,1,2,4]
    diagnose_every: Optional[int] = None  # every N steps: held-out rank agreement, taken vs blind step (null = off)
    diagnose_examples: int = 64  # the first N validation examples, the diagnostic's fixed held-out batch
    # A measurement, not a method: weigh the samples by their task loss on validation rows [start, stop)
    oracle_rows: Optional[List[int]] = None


@dataclass
class SequenceSamplingConfig(TrainerConfig):
    """Shared by the rules that sample outputs per source (pg, mrt): fine-tuning defaults."""

    lr: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    num_samples: int = 4  # sampled outputs per source
    sample_temperature: float = 1.0
    mle_mix: float = 0.1  # weight of the token cross-entropy on the references
    max_new_tokens: int = 64


@dataclass
class PGConfig(SequenceSamplingConfig):
    name: str = "pg"
    baseline: str = "loo"  # loo | greedy | none
    standardize: bool = False  # unit-RMS advantages over each micro-batch


@dataclass
class MRTConfig(SequenceSamplingConfig):
    name: str = "mrt"
    sharpness: float = 0.005
    include_reference: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    trainer: TrainerConfig = MISSING
    metric: MetricConfig = field(default_factory=MetricConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    seed: int = 0
    data_dir: str = "data"
    output_dir: Optional[str] = None  # null: Hydra's run dir
    init_from: Optional[str] = None  # start from a saved checkpoint folder
    resume: Any = False  # true, or a run dir to continue
    overwrite: bool = False
    tensorboard: bool = False
    progress: bool = True
    cache_dir: Optional[str] = None  # tokenizer/model cache; null: $MLEPS_CACHE_DIR or ~/.cache/mleps
    mixed_precision: str = "no"  # no | bf16 | fp16 (through accelerate; weights stay fp32)
    cpu: bool = False
    collective_timeout_s: float = 600.0  # a rank waiting this long in a collective fails instead of hanging


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING
    data: DataConfig = MISSING
    metric: MetricConfig = field(default_factory=MetricConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    split: str = "test"
    data_dir: str = "data"
    predictions: Optional[str] = None  # default: <checkpoint>/predictions-<data>-<split>-<file stem>-<hash>.txt
    source_prefix: Optional[str] = None  # null: the checkpoint's own (saved at training time)
    per_example: bool = False  # also write <predictions stem>.per_example.jsonl: each output's tokens, EOS, losses
    seed: int = 0
    progress: bool = True


def register_configs() -> None:
    from mleps.trainers import RULES  # the one table of rules and their schemas

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="metric", name="metric_schema", node=MetricConfig)
    for name, rule in RULES.items():
        cs.store(group="trainer", name=f"{name}_schema", node=rule.schema)
