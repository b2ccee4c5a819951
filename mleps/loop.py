"""The training loop, written once for every update rule.

setup (accelerate, run dir, data, model, metric) -> phases -> steps. A run has up to two
phases: an optional MLE warm start (`trainer.warm_start_steps`, the paper's recipe) and the
configured rule. The global step counts both. Each step: a global batch that is a pure
function of (seed, step), cut into micro-batches (processes x gradient accumulation);
`rule.update` leaves a direction in `.grad`, identical on every process; the processes agree
that it is finite, the loop clips, applies, and logs. Every `eval_every` steps the processes
check they hold the same parameters and decode the validation set in shards; every
`save_every` steps (and at the end, and on SIGTERM/SIGINT) the main process writes
checkpoints/last.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from mleps import rundir
from mleps.checkpoint import TrainState, find_complete, load_training_state, read_train_state, save_checkpoint
from mleps.data import (BatchStream, Collator, batch_stream, completion_pairs, extra_columns, has_split, load_split,
                        tokenize)
from mleps.decoding import decoded_batch, eos_ids
from mleps.evaluation import evaluate_split
from mleps.families import family_for
from mleps.errors import BAD_STEPS_EXIT, INTERRUPTED_EXIT, TrainingDiverged, UserError
from mleps.metrics_config import eval_metrics_from_config, metric_from_config
from mleps.models import load_checkpoint, load_model_and_tokenizer, num_parameters, prepare_model
from mleps import distributed
from mleps.schedules import build_scheduler
from mleps.task_loss import at_level, require_sentence_form
from mleps.trainers import rule_class
from mleps.trainers.base import Shard, label_tokens
from mleps.trainers.mle import MLEConfig
from mleps.validate import check_family_options, tracker_names, validate_train_config

log = logging.getLogger(__name__)


@dataclass
class Phase:
    name: str  # warm_start | main
    trainer: object  # the trainer config section this phase runs
    first_step: int  # global step at which the phase starts
    steps: int

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps


def _has_gpu() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _fused_adamw_supported(device) -> bool:
    """torch >= 2.4 has a fused AdamW on CPU; CUDA has had one longer; other devices may not."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    try:
        return device.type in _get_fused_kernels_supported_devices()
    except Exception:  # noqa: BLE001  (a private helper: absent or changed in other torch versions)
        return device.type == "cuda"


def make_phases(trainer_cfg) -> list[Phase]:
    phases = []
    if trainer_cfg.warm_start_steps > 0:
        t = trainer_cfg  # the warm start: MLE with the trainer.warm_start_* settings and the trainer's batch layout
        warm = OmegaConf.structured(MLEConfig(
            max_steps=t.warm_start_steps, batch_size=t.batch_size, lr=t.warm_start_lr,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            schedule=t.warm_start_schedule, warmup_steps=t.warm_start_warmup_steps,
            label_smoothing=t.warm_start_label_smoothing,
            eval_every=t.warm_start_eval_every, log_every=t.log_every,
            save_every=t.save_every, max_bad_steps=t.max_bad_steps, batch_tokens=t.get("batch_tokens"),
        ))
        phases.append(Phase("warm_start", warm, 0, trainer_cfg.warm_start_steps))
    start = phases[-1].last_step if phases else 0
    phases.append(Phase("main", trainer_cfg, start, trainer_cfg.max_steps))
    return phases


class Callback:
    """Hooks for code outside the library (mleps_lab installs its MGS probes with one); all optional.

    check_config(cfg)        at start, beside mleps.validate: raise UserError for a bad value
    on_setup(loop)           data, model and task losses are loaded; the run dir is not touched yet
    probes(loop, phase)      per-step hooks handed to the phase's rule (UpdateRule.probes)
    """

    def check_config(self, cfg) -> None:
        pass

    def on_setup(self, loop: "Loop") -> None:
        pass

    def probes(self, loop: "Loop", phase: Phase) -> list:
        return []


RUN_START = "run_start"  # checkpoints/run_start: the model a run started from, for task losses that keep a copy
TRACKERS_DIR = "trackers"  # in the run dir: the trackers' local files (accelerate's logging_dir)


class MetricsLog:
    """metrics.jsonl (one JSON object per event, always) and the accelerator's trackers (trackers=[...]),
    which get each event's numbers as <split>/<key> at its step."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, enabled: bool):
        self.path = run_dir / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = enabled

    def write(self, event: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({f"{event['split']}/{k}": v for k, v in event.items()
                                  if isinstance(v, (int, float)) and k != "step"}, step=event["step"])


def tracker_config(cfg) -> dict:
    """The resolved config as the trackers store it: dotted keys, lists as JSON (TensorBoard's hparams take
    scalars only)."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in rundir.flat_config(cfg).items()}


class Interrupt:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits
    with INTERRUPTED_EXIT. A second signal acts at once (the default action): saves are atomic,
    so checkpoints/last is still the previous complete one."""

    def __init__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:  # the caller's handlers again (tests and notebooks run the loop in-process)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum


class Loop:
    """cfg: a composed TrainConfig (mleps.train's CLI, or mleps.api). The keyword inputs replace what the
    config would load (mleps.api hands over Python objects): `model` + `tokenizer` for model.* / init_from,
    `datasets` ({"train": ..., "validation": ...}, HF Datasets in the data files' columns) for
    data.*_file, and `task_loss` (a TaskLoss) for metric.*."""

    def __init__(self, cfg, run_dir: Path, callbacks=(), *, model=None, tokenizer=None, datasets=None,
                 task_loss=None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.callbacks = list(callbacks)
        self.given_model = (model, tokenizer) if model is not None else None
        self.given_datasets = dict(datasets or {})
        self.given_loss = task_loss

    # -- setup ---------------------------------------------------------------
    def setup(self) -> None:
        """Every input is checked and loaded before the run dir is touched: a bad one never costs a run."""
        self._setup_checks()
        self._setup_accelerator()
        self._setup_task_losses()
        train_ds = self._setup_data()
        # None: a new run (or one stopped before its first save)
        self.resume_from = distributed.on_main_then_broadcast(self.accelerator,
                                                              lambda: rundir.check_run_dir(self.cfg, self.run_dir))
        self._setup_model(train_ds)
        self._setup_tokenized(train_ds)
        self._check_task_losses()
        for callback in self.callbacks:
            callback.on_setup(self)
        self._setup_run_dir()
        self._setup_state()

    def _setup_checks(self) -> None:
        self.phases = make_phases(self.cfg.trainer)
        validate_train_config(self.cfg, self.phases)
        for callback in self.callbacks:
            callback.check_config(self.cfg)
        self.interrupt = Interrupt()  # from here on, SIGTERM/SIGINT stop at a step boundary

    def _setup_accelerator(self) -> None:
        cfg = self.cfg
        # A rank stuck in a collective (another one crashed or took a different branch) fails after
        # collective_timeout_s instead of hanging the job.
        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        # Without cpu=True accelerate does not join CPU processes into one group: each would train
        # alone, into the same run dir.
        cpu = cfg.cpu or (launched > 1 and not _has_gpu())
        # The trackers are named here and started once the run dir is ready (_start_trackers).
        self.trackers = tracker_names(cfg)
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, kwargs_handlers=[timeout],
                                       log_with=self.trackers or None,
                                       project_config=ProjectConfiguration(
                                           project_dir=str(self.run_dir), logging_dir=str(self.run_dir / TRACKERS_DIR)))
        if self.accelerator.num_processes != launched:
            raise UserError(f"launched as {launched} processes, but accelerate joined "
                            f"{self.accelerator.num_processes}: on a machine without GPUs pass cpu=true")
        if distributed.fsdp_requested() and not distributed.is_sharded(self.accelerator):
            raise UserError("the accelerate config asks for FSDP, but accelerate shards only on GPUs and would "
                            "train with DDP here: use mleps/conf/accelerate/cpu_2proc.yaml on CPUs")
        if distributed.is_sharded(self.accelerator):
            self._check_sharding()
        self.is_main = self.accelerator.is_main_process
        if not self.is_main:  # one copy of the log; other ranks still report warnings and errors
            logging.getLogger("mleps").setLevel(logging.WARNING)
        set_seed(cfg.seed)

    def _setup_task_losses(self) -> None:
        """Every task loss is built (and checked) before any data, model or training."""
        cfg = self.cfg
        if self.given_loss is not None:
            self.metric, self.eval_metric = self.given_loss, at_level(self.given_loss, "corpus")
        else:
            self.metric = metric_from_config(cfg.metric)
            self.eval_metric = metric_from_config(cfg.metric, level="corpus")
        self.secondary_metrics = eval_metrics_from_config(cfg.metric, cfg.eval.metrics)
        if rule_class(cfg.trainer.name).needs_sentence_loss:
            require_sentence_form(self.metric, cfg.trainer.name)

    def _setup_data(self):
        """The validation split (self.val_ds, None without one); returns the training split, untokenized."""
        cfg = self.cfg
        train_ds = load_split(cfg.data, "train", self.given_datasets.get("train"))
        given_val = self.given_datasets.get("validation")
        self.val_ds = (load_split(cfg.data, "validation", given_val)
                       if given_val is not None or has_split(cfg.data, "validation") else None)
        if self.val_ds is None:
            log.warning("no validation split (data.validation_file or data.validation_split): no evaluations, so no "
                        "checkpoints/best and no early stopping; the result is checkpoints/last")
        return train_ds

    def _setup_model(self, train_ds) -> None:
        cfg = self.cfg
        if self.resume_from is None and self.given_model is not None:  # mleps.api: the caller's own model
            model, tokenizer = self.given_model
            self.source_prefix = cfg.model.source_prefix
        elif self.resume_from is not None:  # the run's own last checkpoint replaces model.* / init_from
            model, tokenizer, meta = load_checkpoint(str(self.resume_from), trust_remote_code=cfg.model.trust_remote_code)
            self.source_prefix = meta.get("source_prefix", "")
        else:
            with self.accelerator.main_process_first():  # the main process trains and caches the tokenizer
                model, tokenizer, self.source_prefix = load_model_and_tokenizer(cfg, train_ds)
        model = prepare_model(model, cfg.model)  # model.peft, model.gradient_checkpointing
        self.model, self.tokenizer = model.to(self.accelerator.device), tokenizer
        log.info("model: %s, %.1f M parameters, %.3g M trainable", type(model).__name__, num_parameters(model) / 1e6,
                 num_parameters(model, trainable=True) / 1e6)
        check_family_options(cfg.data, family_for(model).name)  # model=hf kind=auto / init_from: known now

    def _setup_tokenized(self, train_ds) -> None:
        """The splits in the model's tokens, and the collator that batches them."""
        cfg, tokenizer = self.cfg, self.tokenizer
        if cfg.data.task == "completion":  # documents -> (prefix, continuation), with the model's tokenizer
            train_ds = completion_pairs(train_ds, tokenizer, cfg.data, "train")
            if self.val_ds is not None:
                self.val_ds = completion_pairs(self.val_ds, tokenizer, cfg.data, "validation")
        self.train_ds = tokenize(train_ds, tokenizer, cfg.data, self.source_prefix)
        self.val_tokenized = (tokenize(self.val_ds, tokenizer, cfg.data, self.source_prefix)
                              if self.val_ds is not None else None)  # for the references' cross-entropy
        self.collate = Collator(tokenizer, self.model, cfg.data.loss_on)

    def _setup_run_dir(self) -> None:
        """Only now is the run dir changed (an overwritten run is moved aside, not deleted)."""
        distributed.on_main_then_broadcast(self.accelerator,
                                           lambda: rundir.prepare_run_dir(self.cfg, self.run_dir, self.resume_from))
        rundir.run_dir_ready(self.run_dir)  # the log file opens on every process (mleps.runlog)
        self.logger = MetricsLog(self.run_dir, self.accelerator, self.is_main)
        try:
            self._start_trackers()
        except BaseException:
            self._restore_previous_run()
            raise

    def _setup_state(self) -> None:
        """A new run's state (a resumed run reads its own in _train)."""
        self.state = TrainState()
        if self.resume_from is None and any(loss.needs_start_model for loss in
                                            (self.metric, self.eval_metric, *self.secondary_metrics)):
            if self.is_main:  # what a resumed run's task loss scores with (lm: its frozen copy)
                save_checkpoint(self.ckpt_dir / RUN_START, self.accelerator.unwrap_model(self.model), self.tokenizer,
                                self.meta(), state=self.state)
            self.accelerator.wait_for_everyone()

    @property
    def state(self) -> TrainState:
        return self._state

    @state.setter
    def state(self, value: TrainState | dict) -> None:
        # A dict is a trainer_state.json's contents (any version TrainState reads).
        self._state = value if isinstance(value, TrainState) else TrainState.from_dict(value)

    def _check_sharding(self) -> None:
        """FSDP: version 2 (whose parameters stay in their modules, so generate runs on the model as is),
        and rules that work through the loop's optimizer step."""
        if not self.accelerator.is_fsdp2:
            raise UserError("FSDP needs fsdp_version: 2 in the accelerate config (FSDP1's flat parameters cannot "
                            "generate): use mleps/conf/accelerate/fsdp.yaml")
        for phase in self.phases:
            if rule_class(phase.trainer.name).needs_whole_parameters:
                raise UserError(f"trainer={phase.trainer.name} reads and writes whole parameters, which FSDP shards "
                                f"over the processes: run it with DDP (mleps/conf/accelerate/multi_gpu.yaml) or one process")

    def _start_trackers(self) -> None:
        """accelerate starts them on the main process only. A resumed run logs again from the step after its
        checkpoint: TensorBoard hides the stopped run's later events (purge_step), as metrics.jsonl drops them."""
        if not self.trackers:
            return
        logging_dir = self.run_dir / TRACKERS_DIR
        if self.is_main:
            logging_dir.mkdir(exist_ok=True)
        kwargs = {"wandb": {"dir": str(logging_dir)}, "dvclive": {"dir": str(logging_dir / "dvclive")}}
        if self.resume_from is not None:
            kwargs["tensorboard"] = {"purge_step": read_train_state(self.resume_from).step + 1}
        try:
            self.accelerator.init_trackers(self.cfg.tracker_project, config=tracker_config(self.cfg),
                                           init_kwargs=kwargs)
        except Exception as e:  # noqa: BLE001  (a service that refuses: no login, no server)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise UserError(f"trackers={self.trackers}: could not start ({type(e).__name__}: {first}): check the "
                            f"tracker's login or server settings, or drop it from trackers") from None

    def _finish_trackers(self) -> None:
        # Not accelerator.end_training(): it also destroys the process group, which a caller running several
        # loops in one launched process (tests/distributed_worker.py, a notebook) still needs.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []

    def _check_task_losses(self) -> None:
        """Bind model-based losses to the model as it starts, and score two training references
        with every loss: a custom fn that returns the wrong thing fails here, not at step 1."""
        probe = self.collate(self.train_ds[:2])
        ids = family_for(self.model).reference_rows(probe, self.model)
        decoded = decoded_batch(ids.to(self.accelerator.device), self.tokenizer, eos_ids(self.model),
                                probe["references"], batch={k: (v.to(self.accelerator.device) if torch.is_tensor(v)
                                                                 else v) for k, v in probe.items()})
        losses = (self.metric, self.eval_metric, *self.secondary_metrics)
        start = self._run_start_model() if any(loss.needs_start_model for loss in losses) else None
        for loss in losses:
            loss.bind(start if loss.needs_start_model else self.model, self.tokenizer)
            try:
                value = loss.loss_from_stats(loss.stats(decoded))
            except UserError:
                raise
            except Exception as e:  # a user's own loss (metric=custom) that raises: one line, exit 2 on the CLI;
                # the Python API gets the UserError with the user's exception as its __cause__
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise UserError(f"metric {loss.name} raised {type(e).__name__}: {first} on two training references "
                                f"(the start-up check): fix the task loss or its options (metric.*)") from e
            if not math.isfinite(value):
                raise UserError(f"metric {loss.name} gives a non-finite loss ({value}) on two training references: "
                                f"check its options (metric.*)")

    def _run_start_model(self):
        """The model this run started from: the model itself in a new run (saved as checkpoints/run_start
        once the run dir exists), that checkpoint in a resumed one."""
        if self.resume_from is None:
            return self.model
        return self._saved_model(RUN_START, f"metric.name={self.metric.name} scores with a frozen copy of the model "
                                            f"the run started from (or set metric.score_model to that checkpoint)")

    def _saved_model(self, name: str, needed_by: str):
        """checkpoints/<name>, a model this run saved at a start (its own, a phase's), which a resume needs."""
        folder = find_complete(self.ckpt_dir / name)
        if folder is None:
            raise UserError(f"{needed_by}, but {self.ckpt_dir / name} is missing: start the run again "
                            f"(overwrite=true) instead of resuming it")
        return load_checkpoint(str(folder), trust_remote_code=self.cfg.model.trust_remote_code)[0].to(
            self.accelerator.device)

    def _setup_phase(self, phase: Phase):
        tcfg = phase.trainer
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for all tensors (about half the time of the default loop on CPU), where the
        # installed torch has it for this device
        optimizer = torch.optim.AdamW(params, lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay,
                                      fused=_fused_adamw_supported(self.accelerator.device) or None)
        scheduler = build_scheduler(optimizer, tcfg)
        if distributed.is_sharded(self.accelerator):
            distributed.share_tied_embeddings(self.model)
        model, optimizer = self.accelerator.prepare(self.model, optimizer)
        self.prepared = model  # the wrapped model, which FSDP's gathering collectives take
        rule_cls = rule_class(tcfg.name)
        rule = rule_cls(cfg=tcfg, model=model, tokenizer=self.tokenizer, metric=self.metric,
                        accelerator=self.accelerator, seed=self.cfg.seed,
                        optimizer=optimizer if rule_cls.needs_optimizer else None,
                        probes=[p for callback in self.callbacks for p in callback.probes(self, phase)],
                        start_model=self._start_model(phase) if rule_cls.needs_start_model(tcfg) else None)
        stream = batch_stream(self.train_ds, tcfg, rule.rows_per_micro_batch, self.cfg.seed,
                              self.accelerator.process_index, self.accelerator.num_processes)
        return model, optimizer, scheduler, rule, stream

    def _start_model(self, phase: Phase):
        """The weights `phase` started from, when a resume lands inside it (None at its start: the rule
        copies the model as it is). Saved at the phase's start (run), so the resumed run is the same run."""
        if self.state.step <= phase.first_step:
            return None
        return self._saved_model(f"{phase.name}_start", f"trainer={phase.trainer.name} keeps the model its phase "
                                                        f"started from")

    def on_device(self, rows: dict) -> dict:
        return {k: (v.to(self.accelerator.device) if torch.is_tensor(v) else v) for k, v in rows.items()}

    # -- evaluation ----------------------------------------------------------
    def evaluate(self, step: int, phase: Phase) -> float | None:
        if self.val_ds is None:
            return None
        distributed.check_in_sync(self.accelerator, self.model, step)
        t0 = time.perf_counter()
        # Each process decodes every world-th sentence (a shard may be empty); the task losses'
        # statistics are summed over processes, the texts gathered for the primary metric's details.
        # Under FSDP every forward is a collective, so every process decodes every sentence (in step).
        acc, sharded = self.accelerator, distributed.is_sharded(self.accelerator)
        rank, world = (0, 1) if sharded else (acc.process_index, acc.num_processes)
        reduce = None if sharded else (lambda summed, hyps: (distributed.sum_array(acc, summed),
                                                             distributed.gather_shards(acc, hyps, len(self.val_ds))))
        hyps, result = evaluate_split(acc.unwrap_model(self.model), self.tokenizer, self.val_ds, self.val_tokenized,
                                      self.collate, self.cfg.decode, [self.eval_metric, *self.secondary_metrics],
                                      shard=(rank, world), reduce=reduce, columns=extra_columns(self.val_ds),
                                      source_prefix=self.source_prefix,
                                      max_source_length=self.cfg.data.max_source_length,
                                      progress=self.cfg.progress and self.is_main, desc=f"validate@{step}")
        score = result["score"]
        self.logger.write({
            "step": step, "split": "validation", "phase": phase.name, "metric": self.eval_metric.name,
            "score": score, **{k: v for k, v in result.items() if isinstance(v, (int, float)) and k != "score"},
            "n": len(hyps), "decode_s": time.perf_counter() - t0,
            "elapsed_s": self._elapsed(), "train_s": self.state.train_s,
        })
        log.info("step %d validation %s %.4g", step, self.eval_metric.name, score)
        self._record_evaluation(step, score, result[self.cfg.eval.select])
        return score

    def _record_evaluation(self, step: int, score: float, selected: float) -> None:
        """The state's scores and patience count; a new best is saved as checkpoints/best."""
        state = self.state
        state.last_eval_step, state.last_score = step, score
        higher_is_better = self.eval_metric.higher_is_better and self.cfg.eval.select == "score"
        best = state.best_score
        if best is None or (selected > best if higher_is_better else selected < best):
            state.best_score, state.best_step = selected, step
            state.evals_without_improvement = 0
            self.save("best")
        else:
            state.evals_without_improvement += 1

    def _out_of_patience(self, tcfg) -> bool:
        """trainer.patience evaluations in a row without a new best (counted within the phase)."""
        return bool(tcfg.patience) and self.state.evals_without_improvement >= tcfg.patience

    # -- checkpoints -----------------------------------------------------------
    def meta(self) -> dict:
        return {"source_prefix": self.source_prefix, "data": self.cfg.data.name, "trainer": self.cfg.trainer.name,
                "step": self.state.step, "metric": self.eval_metric.name, "best_score": self.state.best_score,
                # mleps.evaluate reads these back, so a checkpoint needs no repeated data/metric overrides
                "data_config": OmegaConf.to_container(self.cfg.data, resolve=True),
                "metric_config": OmegaConf.to_container(self.cfg.metric, resolve=True),
                "eval_metrics": list(self.cfg.eval.metrics),
                "frozen_parameters": [n for n, p in self.model.named_parameters() if not p.requires_grad]}

    def save(self, name: str, optimizer=None, scheduler=None) -> None:
        self.accelerator.wait_for_everyone()
        sharded = distributed.is_sharded(self.accelerator)
        finite = all(bool(torch.isfinite(p).all()) for p in distributed.local_tensors(self.model))
        if not (distributed.all_true(self.accelerator, finite) if sharded else finite):
            # A finite step can still overflow a weight; never replace a good checkpoint with it.
            log.warning("step %d: the model has non-finite weights; %s not saved", self.state.step, name)
        else:
            # FSDP: the full weights and optimizer state are gathered from every process's shard (collectives)
            weights = (distributed.without_tied_copies(self.model, self.accelerator.get_state_dict(self.prepared))
                       if sharded else None)
            optimizer_state = (distributed.full_optimizer_state(self.prepared, optimizer)
                               if sharded and optimizer is not None else None)
            if self.is_main:
                state = self.state.replace(elapsed_s=self._elapsed())
                save_checkpoint(self.ckpt_dir / name, self.accelerator.unwrap_model(self.model), self.tokenizer,
                                self.meta(), state=state, optimizer=optimizer, scheduler=scheduler,
                                state_dict=weights, optimizer_state=optimizer_state)
                if name == "last":  # the new run can be resumed: an overwritten one is no longer needed
                    rundir.drop_previous_run(self.run_dir)
        self.accelerator.wait_for_everyone()

    def _elapsed(self) -> float:
        return self.state.elapsed_s + time.perf_counter() - self._t_start

    # -- training ---------------------------------------------------------------
    def train(self) -> dict:
        try:
            return self._train()
        except BaseException:
            self._restore_previous_run()
            raise
        finally:
            self.interrupt.restore()
            self._finish_trackers()
            if self.is_main:  # the run dir's lock (taken by prepare_run_dir)
                rundir.release_lock(self.run_dir)

    def _restore_previous_run(self) -> None:
        """overwrite=true and this run stopped before saving checkpoints/last: the old run comes back."""
        if self.is_main:
            rundir.restore_previous_run(self.run_dir)
            rundir.release_lock(self.run_dir)

    def _train(self) -> dict:
        self._t_start = time.perf_counter()
        self._stop_after_phase = False  # a signal at a phase's last step (_stop_if_signalled)
        if self.resume_from is not None:
            self.state = read_train_state(self.resume_from)
            log.info("resuming %s at step %d", self.run_dir, self.state.step)
        summary = {"run_dir": str(self.run_dir), "phases": []}
        firsts = self.state.phase_first_steps
        for i, phase in enumerate(self.phases):
            # A phase starts where the one before it stopped (early, by patience or max_train_s).
            phase.first_step = firsts.setdefault(phase.name, min(self.state.step, phase.first_step))
            later_started = any(p.name in firsts for p in self.phases[i + 1:])  # e.g. this one ran out of max_train_s
            finished = (self.state.step >= phase.last_step or phase.name in self.state.early_stopped
                        or later_started)
            if not finished:  # finished: before a resume
                self._train_phase(phase)
            summary["phases"].append(self._phase_summary(phase))
            self._stop_if_signalled(phase)
        summary["best_score"] = self.state.best_score
        summary["elapsed_s"] = self._elapsed()
        return summary

    def _train_phase(self, phase: Phase) -> None:
        """The phase from its start, or from the resumed step, to its end: final evaluation and save."""
        model, optimizer, scheduler, rule, stream = self._setup_phase(phase)
        if self.resume_from is not None:
            same_phase = self.state.phase == phase.name  # else the optimizer and scheduler start afresh
            sharded = distributed.is_sharded(self.accelerator)
            load_training_state(self.resume_from, optimizer if same_phase else None, scheduler if same_phase else None,
                                load_optimizer_state=partial(distributed.load_full_optimizer_state, model,
                                                             optimizer) if sharded else None)
            self.resume_from = None
        self.state.phase = phase.name
        if self.state.step == phase.first_step:
            self._start_phase(phase, rule)
        self._run_phase(phase, model, optimizer, scheduler, rule, stream, self.interrupt)
        if self.state.last_eval_step != self.state.step:
            self.evaluate(self.state.step, phase)
        self.state.phase_end_scores[phase.name] = self.state.last_score
        self.save("last", optimizer, scheduler)

    def _start_phase(self, phase: Phase, rule) -> None:
        self.state.evals_without_improvement = 0  # patience counts this phase's evaluations only
        if phase.name == "main" and phase.first_step > 0:
            self.save("warm_start")  # the common starting point for comparing rules (init_from=...)
        if rule.needs_start_model(phase.trainer):
            self.save(f"{phase.name}_start")  # what a resume within the phase hands back to the rule
        if phase.name == "main":  # a warm start begins from random weights: nothing to measure
            if self.state.last_eval_step != self.state.step:
                self.evaluate(self.state.step, phase)
            self.state.phase_start_scores[phase.name] = self.state.last_score

    def _stop_if_signalled(self, phase: Phase) -> None:
        """A signal at a phase's last step: the phase ended as usual; the run stops after it."""
        if not self._stop_after_phase:
            return
        if phase is not self.phases[-1]:
            log.warning("signal: saved %s at the end of %s (step %d); continue with resume=true",
                        self.ckpt_dir / "last", phase.name, self.state.step)
            raise SystemExit(INTERRUPTED_EXIT)
        log.warning("signal during the run's final evaluation and save: the run finished")  # it finishes normally

    def _phase_summary(self, phase: Phase) -> dict:
        state = self.state
        stopped = state.early_stopped.get(phase.name, min(state.step, phase.last_step))
        return {"phase": phase.name, "trainer": phase.trainer.name, "steps": stopped - phase.first_step,
                "configured_steps": phase.steps,
                "early_stop_step": state.early_stopped.get(phase.name),
                "start_score": state.phase_start_scores.get(phase.name),
                "end_score": state.phase_end_scores.get(phase.name, state.last_score)}

    def _run_phase(self, phase, model, optimizer, scheduler, rule, stream, interrupt) -> None:
        tcfg = phase.trainer
        window: dict[str, list[float]] = {}
        budget_start_s = self.state.train_s  # for trainer.max_train_s (counted from this process's start)
        bar = tqdm(total=phase.last_step, initial=self.state.step, desc=phase.name,
                   disable=not (self.cfg.progress and self.is_main), dynamic_ncols=True)
        while self.state.step < phase.last_step:
            stats = self._train_step(phase, model, optimizer, scheduler, rule, stream)
            for k, v in stats.items():
                window.setdefault(k, []).append(v)
            bar.update(1)
            done = self.state.step
            if done % tcfg.log_every == 0 or done == phase.last_step:
                self._log_train(phase, window, scheduler.get_last_lr()[0], stream.epoch(done - phase.first_step), bar)
                window = {}
            if (done - phase.first_step) % tcfg.eval_every == 0:
                self.evaluate(done, phase)
            # The decision comes from the same gathered score on every process: no extra agreement needed.
            early_stop = self.val_ds is not None and self._out_of_patience(tcfg)
            if done % tcfg.save_every == 0 and done < phase.last_step:
                self.save("last", optimizer, scheduler)
            if self._stop_now(phase, optimizer, scheduler, bar, interrupt, budget_start_s) or (
                    early_stop and self._stop_early(phase)):
                break
        bar.close()

    def _train_step(self, phase, model, optimizer, scheduler, rule, stream) -> dict:
        """One update (or a skipped non-finite one); the rule's statistics, gradient norm and time."""
        tcfg, step = phase.trainer, self.state.step
        t0 = time.perf_counter()
        micro_batches = self._micro_batches(stream, step - phase.first_step, rule.needs_every_micro_batch)
        optimizer.zero_grad(set_to_none=True)
        model.train()
        stats = rule.update(micro_batches, step)
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = tcfg.max_grad_norm if (rule.clip_in_loop and tcfg.max_grad_norm > 0) else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        # Every process takes the same decision, or their parameters would part ways.
        if distributed.all_true(self.accelerator, self._step_is_finite(stats, grad_norm)):
            rule.apply(optimizer)
            scheduler.step()
            self.state.bad_steps_in_a_row = 0
        else:  # skip: no update, no scheduler step; the step still counts (its batch is not retried)
            optimizer.zero_grad(set_to_none=True)
            self._count_bad_step(step, tcfg.max_bad_steps)
        self.state.step = step + 1
        self.state.train_s += time.perf_counter() - t0
        return dict(stats, grad_norm=grad_norm, step_s=time.perf_counter() - t0)

    def _log_train(self, phase: Phase, window: dict, lr: float, epoch, bar) -> None:
        """The means of the steps since the last train event (non-finite ones left out)."""
        means = {k: sum(v) / len(v) for k, v in window.items() if all(math.isfinite(x) for x in v)}
        self.logger.write({"step": self.state.step, "split": "train", "phase": phase.name,
                           "trainer": phase.trainer.name, "lr": lr, "epoch": epoch,
                           **means, "elapsed_s": self._elapsed(), "train_s": self.state.train_s})
        bar.set_postfix(loss=f"{means.get('loss', float('nan')):.3f}")

    def _stop_now(self, phase, optimizer, scheduler, bar, interrupt, budget_start_s) -> bool:
        """A signal (save and exit) or trainer.max_train_s (end the phase: True)."""
        tcfg, done = phase.trainer, self.state.step
        # Signals and clocks reach processes at different moments: they stop at the same step or
        # one would wait forever in a collective the other never joins.
        out_of_time = tcfg.max_train_s is not None and self.state.train_s - budget_start_s >= tcfg.max_train_s
        signalled, out_of_time = distributed.any_of_each(self.accelerator, [interrupt.signum is not None,
                                                                             out_of_time])
        if signalled and done == phase.last_step:
            # The phase's end (final evaluation, end score, save) comes next in _train, which stops after it:
            # the checkpoint is then the finished phase, as in a run that was never signalled.
            self._stop_after_phase = True
        elif signalled:
            self.save("last", optimizer, scheduler)
            bar.close()
            log.warning("signal %s: saved %s at step %d; continue with resume=true",
                        interrupt.signum or "(on another process)", self.ckpt_dir / "last", done)
            raise SystemExit(INTERRUPTED_EXIT)
        if out_of_time:
            log.info("%s: trainer.max_train_s=%s reached at step %d", phase.name, tcfg.max_train_s, done)
        return out_of_time

    def _stop_early(self, phase: Phase) -> bool:
        """trainer.patience ran out: logged, and the phase's stop step kept in the state."""
        state, done = self.state, self.state.step
        log.warning(f"{phase.name}: early stop at step {done}: {phase.trainer.patience} evaluations without a "
                    f"better validation score; best {state.best_score:.2f} at step {state.best_step} is "
                    f"checkpoints/best")
        self.logger.write({"step": done, "split": "train", "phase": phase.name, "event": "early_stop",
                           "best_step": state.best_step, "best_score": state.best_score})
        state.early_stopped[phase.name] = done
        return True

    def _micro_batches(self, stream: BatchStream, local_step: int, everyone: bool) -> list:
        """This process's micro-batches of the step (or all of them), each with its Shard."""
        acc = self.accelerator
        micro = []
        for index, rows in stream.micro_batches(local_step, everyone):
            batch = self.collate(self.train_ds[rows])
            micro.append((index, {k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in batch.items()}))
        own = [b for i, b in micro if stream.owns(i)]
        # The loss normalisers of the global batch: one all-reduce of two numbers.
        tokens, examples = distributed.sum_ints(acc, [sum(label_tokens(b) for b in own),
                                                      sum(len(b["references"]) for b in own)])
        return [(Shard(index=i, processes=acc.num_processes, tokens=tokens, examples=examples,
                       local=stream.owns(i)), b) for i, b in micro]

    @staticmethod
    def _step_is_finite(stats: dict, grad_norm: float) -> bool:
        """The loss (when the rule reports one) and the gradient norm; other statistics are diagnostics."""
        loss = stats.get("loss", 0.0)
        return math.isfinite(grad_norm) and (loss is None or math.isfinite(loss))

    def _count_bad_step(self, step: int, max_bad_steps: int) -> None:
        self.state.bad_steps_total += 1
        self.state.bad_steps_in_a_row += 1
        in_a_row = self.state.bad_steps_in_a_row
        # Step numbers as in metrics.jsonl: the step that ends with this update.
        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, at most %d)",
                    step + 1, in_a_row, max_bad_steps)
        if in_a_row >= max_bad_steps:
            last, best = find_complete(self.ckpt_dir / "last"), find_complete(self.ckpt_dir / "best")
            where = (f"the last good checkpoint is {last}" if last else
                     f"checkpoints/last was not saved yet; the best is {best}" if best else "no checkpoint was saved")
            raise TrainingDiverged(f"{in_a_row} non-finite steps in a row (up to step {step + 1}, exit code "
                                   f"{BAD_STEPS_EXIT}); {where}: lower trainer.lr or raise trainer.max_bad_steps")
