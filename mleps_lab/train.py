"""python -m mleps_lab.train [group=option ...] [key=value ...]

`python -m mleps.train` with the lab's MGS probes (mleps_lab.probes): trainer=mgs also takes
trainer.diagnose_every / diagnose_examples / oracle_rows. Everything else is the library's CLI.
"""
from __future__ import annotations

import hydra

from mleps.config import CONF_DIR
from mleps.errors import exit_on_user_error, run_hydra
from mleps.train import run_from_command_line  # noqa: I001  (also registers the run_dir resolver)
from mleps_lab.probes import MGSProbes, register_probe_configs as register_lab_configs

register_lab_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@exit_on_user_error
def train(cfg) -> None:
    run_from_command_line(cfg, callbacks=[MGSProbes()])


def main() -> None:
    register_lab_configs()  # again: the process may have registered the library's alone since the import
    run_hydra(train)


if __name__ == "__main__":
    main()
