"""The few collectives the loop needs beyond what accelerate's DDP does for gradients.

Every function is a no-op returning its input when there is one process, so the loop reads the
same either way. Each is called by every process at the same point: a process that skipped
one would leave the others waiting, which `collective_timeout_s` turns into an error.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import DistributedType, broadcast_object_list, gather_object

from mleps.errors import RanksDiverged, UserError


class ReportedByMain(UserError):
    """The main process's UserError, raised again on the others so every process exits with its
    code; only the main process prints it."""

    reported_by_main = True


def on_main_then_broadcast(accelerator, fn):
    """fn() on the main process only (e.g. preparing the run dir); its result, or its UserError,
    reaches every process."""
    if accelerator.num_processes == 1:
        return fn()
    payload = [None]
    if accelerator.is_main_process:
        try:
            payload = [("ok", fn())]
        except UserError as e:
            payload = [("error", str(e), e.exit_code)]
    broadcast_object_list(payload)
    outcome = payload[0]
    if outcome[0] == "error":
        if accelerator.is_main_process:
            raise UserError(outcome[1]).with_code(outcome[2])
        raise ReportedByMain(outcome[1]).with_code(outcome[2])
    return outcome[1]


def is_sharded(accelerator) -> bool:
    """FSDP: every process holds a shard of each parameter, not a full copy (DDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config (it passes the choice on in the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def share_tied_embeddings(model) -> None:
    """Encoder-decoders in transformers 5 hold the tied token embedding in three modules (shared,
    encoder.embed_tokens, decoder.embed_tokens) of one class around one weight. accelerate's FSDP2
    wrapping puts the input and output embeddings in one unit and leaves the other holders to the root,
    and torch (>= 2.13) refuses a parameter seen by two units. Making the holders one module object (they
    differ in nothing but their name) leaves one unit holding it; outputs and saved keys are unchanged."""
    embed = model.get_input_embeddings()
    if embed is None:
        return
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if (module is not embed and getattr(module, "weight", None) is embed.weight and type(module) is type(embed)
                and module.extra_repr() == embed.extra_repr()
                and getattr(module, "embed_scale", None) == getattr(embed, "embed_scale", None)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, embed)


def without_tied_copies(model, state_dict: dict) -> dict:
    """A gathered full state dict names a tied weight once per holder, each a separate copy, so
    save_pretrained cannot see the tie and would write them all. Keep the names a one-process save
    keeps: one per parameter object."""
    keep = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in state_dict.items() if name in keep}


def local_tensors(model):
    """This process's own part of each parameter (its shard under FSDP2's DTensors)."""
    for p in model.parameters():
        yield p.to_local() if hasattr(p, "to_local") else p


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's state for the whole model, gathered from the shards (FSDP; a collective); the
    main process gets it, keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """The inverse of full_optimizer_state: every process reads the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def _all_reduce(accelerator, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    on_device = tensor.to(accelerator.device)
    dist.all_reduce(on_device, op=op)
    return on_device.cpu()


def all_true(accelerator, flag: bool) -> bool:
    """True on every process when it is true on every process."""
    if accelerator.num_processes == 1:
        return flag
    return bool(_all_reduce(accelerator, torch.tensor([int(flag)]), dist.ReduceOp.MIN).item())


def any_of_each(accelerator, flags: list[bool]) -> list[bool]:
    """Flag i is true on every process when it is true on any process."""
    if accelerator.num_processes == 1:
        return flags
    reduced = _all_reduce(accelerator, torch.tensor([int(f) for f in flags]), dist.ReduceOp.MAX)
    return [bool(x) for x in reduced.tolist()]


def sum_ints(accelerator, values: list[int]) -> list[int]:
    if accelerator.num_processes == 1:
        return values
    return _all_reduce(accelerator, torch.tensor(values, dtype=torch.int64)).tolist()


def sum_array(accelerator, values: np.ndarray) -> np.ndarray:
    """Element-wise sum over processes (float64: exact for counts, as metric statistics are)."""
    if accelerator.num_processes == 1:
        return values
    return _all_reduce(accelerator, torch.from_numpy(np.asarray(values, dtype=np.float64))).numpy()


def gather_shards(accelerator, shard: list, total: int) -> list:
    """Items i = rank, rank + W, ... from each process, back in their order 0..total-1."""
    world = accelerator.num_processes
    if world == 1:
        return shard
    shards = gather_object([shard])  # one list per process, in rank order
    return [shards[i % world][i // world] for i in range(total)]


def parameter_fingerprint(model) -> torch.Tensor:
    """One int64 per parameter: the sum of its bits read as integers. Any change of one element
    changes it, so equal fingerprints mean (all but certainly) bit-identical parameters."""
    sums = []
    for p in model.parameters():
        as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[p.element_size()]
        sums.append(p.detach().contiguous().view(as_int).to(torch.int64).sum())
    return torch.stack(sums)


def check_in_sync(accelerator, model, step: int) -> None:
    """Raise RanksDiverged, on every process, unless every process holds the same parameters."""
    if accelerator.num_processes == 1 or is_sharded(accelerator):  # FSDP: one copy, in shards, nothing to compare
        return
    model = accelerator.unwrap_model(model)
    mine = parameter_fingerprint(model).to(accelerator.device)
    everyone = accelerator.gather(mine.unsqueeze(0)).cpu()  # (processes, parameters)
    differs = (everyone != everyone[0]).nonzero()
    if len(differs):
        rank, index = differs[0].tolist()
        name = [n for n, _ in model.named_parameters()][index]
        error = RanksDiverged(
            f"processes hold different parameters at step {step} (first: {name} on rank {rank} differs from rank 0): "
            f"the update is not identical on every process, a bug; please report it with the command you ran")
        error.reported_by_main = not accelerator.is_main_process
        raise error
