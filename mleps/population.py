"""Decode P parameter sets of one model in one batched `generate` call.

MGS decodes the same batch of B sources with θ and with K perturbed copies θ+Δ_k. Instead of
K+1 `generate` calls of B rows, `decode` makes one call of P·B rows (P = K+1, or a process's
share of the samples): the inputs are repeated group-major (`input_ids.repeat(P, 1)`), so rows
p·R … (p+1)·R-1 of every activation belong to group p (R = rows per group), and every
parametrised leaf module (Linear, Embedding, LayerNorm, GPT-2's Conv1D, T5's and Llama's RMSNorm)
applies group p's weights to group p's rows: a batched matmul over stacked weights [P, ...], a
lookup into the stacked embedding tables, a broadcast scale. Attention (Llama's rotary embedding
has no parameters), the cache, beam bookkeeping and the stopping logic stay HF's own; they act
row by row, and `generate` keeps each group's rows contiguous (beams and returned sequences are
expanded with repeat_interleave, row by row).

    stacks = stack_parameters(params, P)          # [P, *shape] per tensor, every group = θ
    apply_perturbation_([s[p] for s in stacks], ...)   # group p becomes θ+Δ_k in place
    with population(model, dict(zip(params, stacks))):
        ids = decode(model, batch, P, max_new_tokens=64)   # P tensors, one per group

Memory: the stacks hold P copies of the parameters they cover, i.e. P models when every
parameter is perturbed. A parameter that is not in the mapping (frozen, e.g. Marian's
sinusoidal positions, or outside a perturbed subset) is shared by all groups: a module none of
whose parameters is perturbed keeps its own forward, and an unperturbed parameter of a swapped
module (a Linear's bias, say) is broadcast without a copy.

Modules are swapped by an instance attribute `forward` that is deleted on exit, so the model
afterwards is the one that went in (the check is `check_supported`, run before anything else:
one error naming the first module type that has perturbed parameters but no population form).
T5's relative position bias is an Embedding indexed by positions, not by rows: its attention
module gets a population `compute_bias` that returns one bias per row instead.
"""
from __future__ import annotations

import contextlib
import sys
from functools import partial
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mleps.decoding import generate
from mleps.errors import UserError


def _grouped(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, ...] -> [P, N/P, ...]: group p's rows are p·N/P … (p+1)·N/P-1."""
    if x.shape[0] % size:
        raise RuntimeError(f"population of {size}: {x.shape[0]} rows are not a whole number of groups")
    return x.reshape(size, x.shape[0] // size, *x.shape[1:])


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, ..., in] times group p's weight [P, in, out] (+ bias [P, out]) -> [N, ..., out]."""
    rows = _grouped(x, weight.shape[0]).flatten(1, -2)  # [P, rows·positions, in]: a view when contiguous
    out = torch.bmm(rows, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), rows, weight)
    return out.reshape(*x.shape[:-1], weight.shape[-1])


def _linear(module: nn.Linear, weights: dict, x: torch.Tensor) -> torch.Tensor:
    return _matmul(x, weights["weight"].transpose(1, 2), weights.get("bias"))


def _conv1d(module, weights: dict, x: torch.Tensor) -> torch.Tensor:  # GPT-2's Conv1D: weight [in, out]
    return _matmul(x, weights["weight"], weights.get("bias"))


def _embedding(module: nn.Embedding, weights: dict, ids: torch.Tensor) -> torch.Tensor:
    table = weights["weight"]  # [P, V, d]
    size, vocab = table.shape[:2]
    group = torch.arange(size, device=ids.device).repeat_interleave(_grouped(ids, size).shape[1])
    shifted = ids + (group * vocab).view(-1, *([1] * (ids.dim() - 1)))  # row r looks up in its group's table
    return F.embedding(shifted, table.reshape(size * vocab, -1))


def _layer_norm(module: nn.LayerNorm, weights: dict, x: torch.Tensor) -> torch.Tensor:
    weight, bias = weights.get("weight"), weights.get("bias")
    size = (weight if weight is not None else bias).shape[0]
    normed = _grouped(F.layer_norm(x, module.normalized_shape, None, None, module.eps), size)
    scale_shape = (size,) + (1,) * (normed.dim() - 1 - len(module.normalized_shape)) + tuple(module.normalized_shape)
    if weight is not None and bias is not None:  # one addcmul rounds as F.layer_norm's fused affine does on CPU
        normed = torch.addcmul(bias.reshape(scale_shape), normed, weight.reshape(scale_shape))
    elif weight is not None:
        normed = normed * weight.reshape(scale_shape)
    elif bias is not None:
        normed = normed + bias.reshape(scale_shape)
    return normed.reshape(x.shape)


def _rms_norm(module, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """T5LayerNorm's forward, with group p's scale on group p's rows."""
    weight = weights["weight"]  # [P, d]
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + module.variance_epsilon)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    grouped = _grouped(x, weight.shape[0])
    return (weight.reshape(weight.shape[0], *([1] * (grouped.dim() - 2)), -1) * grouped).reshape(x.shape)


def _llama_rms_norm(module, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's forward (back to the input's dtype before the scale, unlike T5's), with group
    p's scale on group p's rows: the same float operations in the same order, so the same bits."""
    weight = weights["weight"]  # [P, d]
    dtype = x.dtype
    x = x.to(torch.float32)
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(dtype)
    grouped = _grouped(x, weight.shape[0])
    return (weight.reshape(weight.shape[0], *([1] * (grouped.dim() - 2)), -1) * grouped).reshape(x.shape)


def _forwards() -> dict[type, Callable]:
    """Exact types (a subclass may use its parameters differently, e.g. Marian's positions)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    from transformers.pytorch_utils import Conv1D

    return {nn.Linear: _linear, nn.Embedding: _embedding, nn.LayerNorm: _layer_norm, Conv1D: _conv1d,
            T5LayerNorm: _rms_norm, LlamaRMSNorm: _llama_rms_norm}


def _has_relative_bias(module: nn.Module) -> bool:
    return bool(getattr(module, "has_relative_attention_bias", False)) and hasattr(module, "compute_bias")


def _perturbed_modules(model: nn.Module, perturbed: set[int]) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module that holds a perturbed parameter directly, once each."""
    seen = set()
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        if any(id(p) in perturbed for p in module.parameters(recurse=False)):
            yield name, module


def check_supported(model: nn.Module, params: Sequence[torch.Tensor]) -> None:
    """Raise a UserError naming the first module with perturbed parameters and no population form."""
    forwards = _forwards()
    relative_tables = {id(m.relative_attention_bias) for m in model.modules() if _has_relative_bias(m)}
    for name, module in _perturbed_modules(model, {id(p) for p in params}):
        if id(module) in relative_tables:
            continue
        unsupported = type(module) not in forwards or (type(module) is nn.Embedding and module.max_norm is not None)
        if unsupported:
            raise UserError(
                f"trainer.decode_population=batched cannot batch {type(module).__name__} (module '{name}' holds "
                f"perturbed parameters; supported: {', '.join(t.__name__ for t in forwards)}, T5 relative "
                f"position bias): use trainer.decode_population=sequential, or freeze its parameters")


def stack_parameters(params: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
    """[size, *shape] per parameter, every group a copy of the parameter."""
    with torch.no_grad():
        return [p.detach().unsqueeze(0).repeat(size, *([1] * p.dim())) for p in params]


@contextlib.contextmanager
def population(model: nn.Module, stacks: Mapping[torch.Tensor, torch.Tensor]) -> Iterator[None]:
    """Within: `model` computes group p's rows with parameters {param: stacks[param][p]}."""
    check_supported(model, list(stacks))
    forwards = _forwards()
    by_id = {id(p): s for p, s in stacks.items()}
    size = next(iter(stacks.values())).shape[0] if stacks else 1
    patched: list[tuple[nn.Module, str, object, object]] = []  # (module, attribute, ours, what it replaced)
    hooks = []
    relative = [m for m in model.modules() if _has_relative_bias(m) and id(m.relative_attention_bias.weight) in by_id]
    kernelized = _suspend_kernelize(model)
    try:
        for attention in relative:
            rows = [0]  # the row count of the attention's current call, read by its compute_bias
            hooks.append(attention.register_forward_pre_hook(partial(_count_rows, rows), with_kwargs=True))
            table = by_id[id(attention.relative_attention_bias.weight)]
            _patch(patched, attention, "compute_bias",
                   partial(_relative_bias, attention, type(attention).compute_bias, table, rows))
        tables = {id(m.relative_attention_bias) for m in relative}
        for _, module in _perturbed_modules(model, set(by_id)):
            if id(module) in tables:
                continue
            weights = {name: by_id[id(p)] if id(p) in by_id else p.detach().expand(size, *p.shape)
                       for name, p in module.named_parameters(recurse=False)}
            _patch(patched, module, "forward", partial(forwards[type(module)], module, weights))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        lost = []
        for module, attribute, ours, replaced in patched:
            if module.__dict__.get(attribute) is not ours:
                lost.append(type(module).__name__)
            if replaced is _ABSENT:
                module.__dict__.pop(attribute, None)  # the class's own method shows through again
            else:
                setattr(module, attribute, replaced)  # e.g. a kernel forward transformers installed
        for holder in kernelized:
            holder._use_kernels = True
        if lost and sys.exc_info()[0] is None:  # its rows were decoded with θ: never return them silently
            raise RuntimeError(f"population decoding: the population form of {lost[0]} was replaced while "
                               f"decoding (by kernelize?); the decoded groups are not the perturbed models")


_ABSENT = object()


def _patch(patched: list, module: nn.Module, attribute: str, value) -> None:
    patched.append((module, attribute, value, module.__dict__.get(attribute, _ABSENT)))
    setattr(module, attribute, value)


def _suspend_kernelize(model: nn.Module) -> list[nn.Module]:
    """transformers (5.x, the `kernels` package installed) kernelizes a model loaded by from_pretrained and
    kernelizes it again whenever train()/eval() changes its mode, which pops every kernel-decorated
    module's instance `forward` (Llama's RMSNorm): generate's eval() would silently remove the population
    form. Within the population its models are marked as not kernelized (the mode switch then leaves the
    modules alone) and marked again on exit; -> the models whose mark was cleared."""
    holders = [m for m in model.modules() if m.__dict__.get("_use_kernels")]
    for holder in holders:
        holder._use_kernels = False
    return holders


def _count_rows(rows: list, module, args, kwargs) -> None:
    hidden = args[0] if args else kwargs["hidden_states"]
    rows[0] = hidden.shape[0]


def _relative_bias(attention, compute_bias, table, rows, *args, **kwargs) -> torch.Tensor:
    """HF's compute_bias once per group's table -> [P, heads, q, k], repeated to one bias per row."""
    embedding = attention.relative_attention_bias
    biases = []
    try:
        for group_table in table:
            embedding.forward = partial(F.embedding, weight=group_table)
            biases.append(compute_bias(attention, *args, **kwargs))
    finally:
        del embedding.forward
    size = len(biases)
    return torch.cat(biases).repeat_interleave(rows[0] // size, dim=0)


def decode(model, batch: dict, size: int, **generate_kwargs) -> list[torch.Tensor]:
    """One `generate` call over `size` copies of the batch -> each group's ids, as a call of that
    group alone would return them (trailing columns that only other groups needed are cut)."""
    repeated = {key: batch[key].repeat(size, 1) for key in ("input_ids", "attention_mask")}
    ids = generate(model, repeated, **generate_kwargs)
    start = 1  # generate's rows: a start column, then the output (a decoder-only model's prompt removed)
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=ids.device)
    return [group[:, :_decoded_length(group, start, eos)] for group in ids.chunk(size)]


def _decoded_length(ids: torch.Tensor, start: int, eos: torch.Tensor) -> int:
    """generate stops when every row has produced an EOS: the length it would have had alone."""
    is_eos = torch.isin(ids[:, start:], eos)
    if not len(eos) or not is_eos.any(1).all():
        return ids.shape[1]  # some row never ended: it ran to max_new_tokens
    return start + int(is_eos.int().argmax(1).max()) + 1
