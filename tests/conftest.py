"""Shared fixtures: the real Hydra config shrunk for CPU, the datasets, and a CLI runner.

* `MLEPS_CACHE_DIR` points at one temporary folder for the whole session (tokenizer caches
  never touch ~/.cache, and tests in one session share the trained tokenizers). Under
  pytest-xdist a session is one worker: each worker has its own folder (tmp_path_factory's
  basetemp is per worker), so no two workers write one cache.
* Under xdist (`make test` runs `-n 2 --dist loadfile`): one thread per worker and per
  subprocess, one HF datasets cache per worker, and each test file kept in one worker (the
  files that share `trained_run` in one worker together): see pytest_xdist_make_scheduler.
* `data_dir`: `$MLEPS_DATA_DIR` or `<repo>/data` (`make data` creates it); tests that need the
  real datasets skip with the reason when it is absent.
* `base_cfg`: mleps/conf/train.yaml composed once with Hydra (the typed schemas registered), then
  shrunk to a tiny model and small slices; each test gets its own copy.
* `run_cli(module, *overrides)`: `python -m <module> ...` as a real subprocess.
"""
from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "mleps" / "conf"

# `datasets` reads its cache location when imported: keep its Arrow caches out of ~/.cache too.
# One folder per process: pytest-xdist workers inherit the controller's environment, so a value
# this file set in the controller (marked by _OWN_CACHE) is replaced by a fresh one in each worker.
_OWN_CACHE = "MLEPS_TEST_OWN_HF_DATASETS_CACHE"
if "HF_DATASETS_CACHE" not in os.environ or os.environ.get(_OWN_CACHE) == os.environ["HF_DATASETS_CACHE"]:
    os.environ["HF_DATASETS_CACHE"] = os.environ[_OWN_CACHE] = tempfile.mkdtemp(prefix="mleps-test-hf-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

# Under pytest-xdist (`make test`: -n 2 on a 2-core machine) each worker and every process a test
# starts should use one thread, or the workers oversubscribe the cores (see single_torch_thread).
# setdefault: a value set on purpose wins. Subprocesses inherit these.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...; None without -n
if XDIST_WORKER:
    for _name, _value in (("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(_name, _value)

# `--dist loadfile` keeps each test file in one worker (its module fixtures are built once, its
# module-level state stays in one process). The files below share a session fixture too expensive
# to build once per worker: they are one unit of work, run by the same worker. (xdist's
# `xdist_group` marks would do this with --dist loadgroup, but pytest-xdist 3.8 sets the group
# through Item._nodeid, which pytest 9 no longer reads: the marks are silently ignored.)
SHARED_FILES = {
    "trained_run": {"test_train_mle.py", "test_evaluate_cli.py", "test_models.py"},  # one real training run
}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist installed it is never called
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return next((group for group, names in SHARED_FILES.items() if Path(file).name in names), file)

    return FileScheduling(config, log)


# A model that trains in seconds on two CPU cores.
TINY_MODEL = ["model.vocab_size=300", "model.d_model=32", "model.layers=1", "model.heads=2",
              "model.ffn_dim=64", "model.dropout=0.0"]
# The same shrinking for the CLIs (progress bars off, CPU, short decodes).
TINY_CLI = [*TINY_MODEL, "progress=false", "cpu=true", "decode.max_new_tokens=24"]


def find_data_dir() -> Path | None:
    env = os.environ.get("MLEPS_DATA_DIR")
    path = Path(env) if env else REPO / "data"
    path = path.resolve()
    return path if (path / "multi30k" / "train.jsonl").is_file() else None


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
    """One tokenizer/model cache for the whole session, never ~/.cache."""
    path = tmp_path_factory.mktemp("mleps_cache")
    old = os.environ.get("MLEPS_CACHE_DIR")
    os.environ["MLEPS_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MLEPS_CACHE_DIR", None)
    else:
        os.environ["MLEPS_CACHE_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than
    two threads fighting other processes for the cores (and the numbers do not depend on it)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = find_data_dir()
    if path is None:
        where = os.environ.get("MLEPS_DATA_DIR") or REPO / "data"
        pytest.skip(f"datasets not found under {where} (multi30k/train.jsonl): run `make data` "
                    f"or set MLEPS_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def _composed_cfg(data_dir):
    """mleps/conf/train.yaml through Hydra's compose, once per session."""
    from hydra import compose, initialize_config_dir

    import mleps.config
    import mleps.train  # noqa: F401  (registers the run_dir resolver used by hydra.run.dir)

    mleps.config.register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "trainer=mle", f"data_dir={data_dir}", *TINY_MODEL,
            "data.max_train_examples=256", "data.max_eval_examples=32",
            "data.max_source_length=64", "data.max_target_length=64",
            "trainer.max_steps=5", "trainer.batch_size=16", "trainer.eval_every=1000",
            "trainer.log_every=1", "trainer.save_every=1000", "trainer.warmup_steps=0",
            "trainer.schedule=constant", "trainer.label_smoothing=0.0",
            "decode.max_new_tokens=32", "decode.batch_size=64",
            "progress=false", "cpu=true",
        ])
    OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture
def base_cfg(_composed_cfg):
    """A fresh, still typed and struct, copy of the shrunk config for one test."""
    return _composed_cfg.copy()


def compose_cfg(*overrides: str, config_name: str = "train", lab: bool = False):
    """Compose a config with extra overrides (for groups other than the fixture's); lab: with the
    schemas of `python -m mleps_lab.train` (trainer=mgs takes the probes' keys)."""
    from hydra import compose, initialize_config_dir

    import mleps.config
    import mleps.train  # noqa: F401

    mleps.config.register_configs()
    if lab:
        from mleps_lab.probes import register_probe_configs

        register_probe_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def run_cli(module: str, *overrides: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 300) -> tuple[int, str, str]:
    """`python -m <module> overrides...` as a subprocess: (returncode, stdout, stderr)."""
    full_env = dict(os.environ)
    full_env.setdefault("MLEPS_DATA_DIR", str(find_data_dir() or REPO / "data"))
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.setdefault("OMP_NUM_THREADS", "1")  # see single_torch_thread
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=str(cwd or REPO), env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def run_main(module: str, *overrides: str, capfd) -> tuple[int, str, str]:
    """The same CLI entry point, called in this process (seconds cheaper than a subprocess).

    `module.main` is the @hydra.main function: it parses sys.argv like the command line does.
    Returns (exit code, stdout, stderr). Signal handlers, root log handlers and Hydra's global
    state are restored afterwards so later tests are not affected.
    """
    from hydra.core.hydra_config import HydraConfig

    main = importlib.import_module(module).main
    saved_argv = sys.argv
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    capfd.readouterr()  # drop anything captured before
    # Imported (not run as __main__), Hydra would look for mleps/conf/ inside the package: name the
    # folder that `python -m` finds through the file's relative config_path="../conf".
    # Hydra's logging setup (dictConfig) would close pytest's own log handlers: leave logging
    # alone here (records reach caplog); the subprocess tests cover the log file.
    sys.argv = [module, f"--config-path={CONF_DIR}", "hydra/job_logging=none", "hydra/hydra_logging=none",
                *overrides]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        for s, h in saved_signals.items():
            signal.signal(s, h)
        for h in root.handlers[:]:
            if h not in saved_handlers:
                root.removeHandler(h)
                h.close()
        for h in saved_handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(saved_level)
        HydraConfig.instance().cfg = None
    out, err = capfd.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> str:
    """Exit 2, a single `error: ...` line last on stderr, no traceback; returns the message."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, f"nothing on stderr (exit {code})"
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one final `error: ...` line:\n{err}"
    assert code == 2, f"exit code {code}, expected 2:\n{err}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def multi30k_rows(data_dir) -> list[dict]:
    """The first 600 training pairs of Multi30k (for writing small local files)."""
    rows = []
    with open(data_dir / "multi30k" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == 600:
                break
    return rows


# The end-to-end command, with the tiny model.
E2E_TRAIN = ["trainer=mle", "trainer.max_steps=30", "data.max_train_examples=512", "data.max_eval_examples=64",
             "trainer.eval_every=30", "trainer.batch_size=16", *TINY_CLI]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    """One real `python -m mleps.train` run, shared by the CLI tests (train and evaluate)."""
    from types import SimpleNamespace

    work = tmp_path_factory.mktemp("e2e")
    out = work / "run"
    rc, stdout, stderr = run_cli("mleps.train", *E2E_TRAIN, f"output_dir={out}", cwd=work,
                                 env={"MLEPS_DATA_DIR": str(data_dir)})
    return SimpleNamespace(rc=rc, stdout=stdout, stderr=stderr, dir=out, cwd=work)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, multi30k_rows):
    """40 Multi30k pairs as a local JSONL train file and 8 of them as its validation file (data=local)."""
    folder = tmp_path_factory.mktemp("pairs")
    rows = [{"source": r["de"], "target": r["en"]} for r in multi30k_rows[:40]]
    return write_jsonl(folder / "train.jsonl", rows), write_jsonl(folder / "dev.jsonl", rows[:8])


def allocated_peak(fn) -> int:
    """Peak bytes torch allocated on the CPU over fn() beyond what was allocated before it
    (the profiler's allocation events, summed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


# -- a word-level tokenizer for unit tests: one token per word, ids known by hand -----------------
WORDS = "a b c d e f g h i j k l m n o p".split()


def word_tokenizer(append_eos: bool = True):
    """<pad> 0, <unk> 1, </s> 2, then WORDS. append_eos: Marian's habit (every encoded text ends
    with </s>); False: GPT-2's (nothing appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
