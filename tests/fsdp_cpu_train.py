"""`python -m mleps.train` under FSDP2 on CPU processes, for tests/test_fsdp_cpu.py.

    accelerate launch --config_file mleps/conf/accelerate/fsdp.yaml --num_processes 2 tests/fsdp_cpu_train.py [overrides]

accelerate (1.16) builds its FSDP state only on an accelerator: with cpu=True it falls back to
DDP (MULTI_CPU) and ignores the FSDP settings the launcher passed in the environment, and without
it the CPU processes do not join one group. torch's fully_shard itself runs on CPU over gloo, so
this shim lets accelerate join the group as MULTI_CPU, then switches its state to FSDP with the
plugin the launcher's environment describes (mleps/conf/accelerate/fsdp.yaml). From there on every line
that runs is mleps's and accelerate's own FSDP path (prepare → fully_shard, gathered saves,
synced decoding, sharded optimizer state), which is what the tests check. Test code only: users
run FSDP on GPUs with the shipped config.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mleps.loop  # noqa: E402


class CPUFullyShardedAccelerator(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            raise RuntimeError(f"expected accelerate's CPU process group, got {self.distributed_type}")
        plugin = FullyShardedDataParallelPlugin()  # fsdp_version, wrap policy, state dict type: from the launcher
        self.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = plugin


if __name__ == "__main__":
    mleps.loop.Accelerator = CPUFullyShardedAccelerator
    # the CLI itself, as `python -m mleps.train` runs it (Hydra finds mleps/conf/ from its __main__ file)
    runpy.run_module("mleps.train", run_name="__main__", alter_sys=True)
