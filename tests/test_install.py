"""The package as a user installs it: a wheel built from the sources, installed into a folder outside the
checkout, run from yet another folder. Only the venv's site-packages (the dependencies) and the installed
folder are on the path (`python -S`: the editable install's hook into the checkout is never read), so
the configs, the embedded models and the data path must all come from the wheel."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, TINY_CLI, assert_user_error

pytestmark = pytest.mark.slow  # a wheel build, an install and four real processes: about 30 s


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder a wheel of the current sources is installed into (pip install --target)."""
    import setuptools
    from packaging.version import Version

    if Version(setuptools.__version__) < Version("77"):  # `make install` installs a newer one (the test extra)
        pytest.skip(f"setuptools {setuptools.__version__} in the venv is older than pyproject's build requirement")
    work = tmp_path_factory.mktemp("install")
    src = work / "src"  # a copy: building in the checkout would leave build/ there for every other process
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mleps", src / "mleps", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # --no-build-isolation: the venv's setuptools builds it, offline.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(src)],
                   check=True, capture_output=True, cwd=work)
    (wheel,) = (work / "dist").glob("mleps-*.whl")
    target = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, cwd=work)
    return target


def run_installed(target: Path, args: list[str], cwd: Path, env: dict | None = None) -> tuple[int, str, str]:
    """`python -S args...` with the installed folder first on the path, then the venv's dependencies."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLEPS_DATA_DIR")}
    full_env.update(PYTHONPATH=os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]),
                    PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_installed_wheel_trains_and_evaluates_from_another_folder(installed, data_dir, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    rc, out, err = run_installed(installed, ["-c", "import mleps.config as c; print(c.CONF_DIR)"], cwd)
    assert rc == 0 and Path(out.strip()) == installed / "mleps" / "conf", (out, err)  # not the checkout's copy
    # the console script mleps-train, the data through data_dir=
    run = tmp_path / "run"
    rc, out, err = run_installed(installed, [
        str(installed / "bin" / "mleps-train"), "trainer=mle", "trainer.max_steps=2", "trainer.batch_size=8",
        "trainer.eval_every=2", "data.max_train_examples=64", "data.max_eval_examples=8", *TINY_CLI,
        "decode.max_new_tokens=8", f"data_dir={data_dir}", f"output_dir={run}"], cwd)
    assert rc == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert [p["steps"] for p in summary["phases"]] == [2]
    assert (run / "checkpoints" / "last" / "model.safetensors").is_file()
    # python -m mleps.evaluate, the data through MLEPS_DATA_DIR
    rc, out, err = run_installed(installed, [
        "-m", "mleps.evaluate", f"checkpoint={run / 'checkpoints' / 'last'}", "split=test",
        "data.max_eval_examples=8", "decode.max_new_tokens=8", "progress=false"], cwd,
        env={"MLEPS_DATA_DIR": str(data_dir)})
    assert rc == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 8 and result["metric"] == "bleu"
    assert Path(result["predictions"]).is_file()
    assert sorted(p.name for p in cwd.iterdir()) == []  # nothing written into the working folder


@pytest.mark.parametrize("missing", ["train.yaml", "trainer/mgs.yaml"])
def test_a_config_missing_from_the_installed_package_is_one_line(installed, tmp_path, missing):
    broken = tmp_path / "site"
    shutil.copytree(installed / "mleps", broken / "mleps")
    (broken / "mleps" / "conf" / missing).unlink()
    rc, _, err = run_installed(broken, ["-m", "mleps.train", "cpu=true"], tmp_path)
    assert_user_error(rc, err, missing.removesuffix(".yaml"))
