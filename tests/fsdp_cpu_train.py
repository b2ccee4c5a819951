"""`python -m mleps.train` under FSDP2 on CPU processes, for tests/test_fsdp_cpu.py.

    accelerate launch --config_file conf/accelerate/fsdp.yaml --num_processes 2 tests/fsdp_cpu_train.py [overrides]

accelerate (1.16) builds its FSDP state only on an accelerator: with cpu=True it falls back to
DDP (MULTI_CPU) and ignores the FSDP settings the launcher passed in the environment, and without
it the CPU processes do not join one group. torch's fully_shard itself runs on CPU over gloo, so
this shim lets accelerate join the group as MULTI_CPU, then switches its state to FSDP with the
plugin the launcher's environment describes (conf/accelerate/fsdp.yaml). From there on every line
that runs is mleps's and accelerate's own FSDP path (prepare → fully_shard, gathered saves,
synced decoding, sharded optimizer state), which is what the tests check. Test code only: users
run FSDP on GPUs with the shipped config.
"""
from __future__ import annotations

import sys
from pathlib import Path

import accelerate
import hydra
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mleps.loop  # noqa: E402
from mleps.errors import exit_on_user_error, run_hydra  # noqa: E402
from mleps.train import run_from_command_line  # noqa: E402


class CPUFullyShardedAccelerator(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            raise RuntimeError(f"expected accelerate's CPU process group, got {self.distributed_type}")
        plugin = FullyShardedDataParallelPlugin()  # fsdp_version, wrap policy, state dict type: from the launcher
        self.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = plugin


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="train")
@exit_on_user_error
def train(cfg) -> None:
    run_from_command_line(cfg)


if __name__ == "__main__":
    mleps.loop.Accelerator = CPUFullyShardedAccelerator
    run_hydra(train)
