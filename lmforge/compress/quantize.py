"""Post-training weight quantization with torchao (``torch.ao.quantization`` fallback for int8-dynamic).

Methods (the spec's ``quantize.method``):

==================  ==============================================================================
int8-dynamic        torchao ``Int8DynamicActivationInt8WeightConfig`` on every Linear (lm_head too):
                    per-row int8 weights, activations quantized per token at run time, int8 x int8
                    matmul (``aten::_int_mm``) where the backend has one
int8-weight-only    torchao ``Int8WeightOnlyConfig``: per-row int8 weights, float activations
int4-weight-only    torchao ``Int4WeightOnlyConfig(group_size)`` where its kernels run (CUDA: tinygemm
                    or mslk); on CPU torchao has no packed int4 kernel, so ``IntxWeightOnlyConfig(int4,
                    PerGroup(group_size))`` is used: int4 values stored one per int8 byte (no size gain
                    over int8 on disk) and dequantized before a float matmul. The report says which.
==================  ==============================================================================

The token embedding is quantized too (int8 weight-only, per row): with tied embeddings it is the same
int8 tensor as the head (an embedding lookup reads and dequantizes rows). Linear layers whose input
size is not a multiple of the int4 group size are left in float and listed.

Without torchao only ``int8-dynamic`` is available, through ``torch.ao.quantization.quantize_dynamic``
(fbgemm/onednn ``quantized::linear_dynamic``, a per-tensor int8 weight; the embedding becomes a
``float_qparams`` quantized embedding, so it is no longer tied to the head). torch 2.13 deprecates
that API in favour of torchao.

:func:`kernels_used` runs one forward under ``torch.profiler`` and lists the matmul-like operators that
actually ran: the report's "kernels" is what was observed, not what was hoped for.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from typing import Any

import torch
from torch import nn

from lmforge.trainer.model import GPT

METHODS = ("int8-dynamic", "int8-weight-only", "int4-weight-only")
_KERNEL_HINTS = ("mm", "linear", "matmul", "int4", "int8", "embedding", "quantize", "dequant", "bmm")


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def quiet_torchao() -> None:
    """torchao logs a failed load of each CUDA extension on CPU builds; those are expected here."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch._library.custom_ops").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def _is_linear(module: nn.Module, _fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _is_embedding(module: nn.Module, _fqn: str) -> bool:
    return isinstance(module, nn.Embedding)


def _torchao_quantize(model: GPT, method: str, group_size: int) -> dict[str, Any]:
    quiet_torchao()
    import torchao
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
        quantize_,
    )

    tied = model.embed_tokens.weight is model.lm_head.weight
    if tied:  # quantize_ replaces lm_head.weight; embed_tokens is re-pointed at it below
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    notes: list[str] = []
    config_name: str
    if method == "int8-dynamic":
        quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=_is_linear)
        config_name = "Int8DynamicActivationInt8WeightConfig"
    elif method == "int8-weight-only":
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=_is_linear)
        config_name = "Int8WeightOnlyConfig"
    elif method == "int4-weight-only":
        probe = nn.Sequential(nn.Linear(group_size, 16, bias=False)).to(next(model.parameters()).device)
        try:
            quantize_(probe, Int4WeightOnlyConfig(group_size=group_size))
            probe(torch.zeros(1, group_size, device=next(model.parameters()).device))
            native = True
        except Exception as exc:  # noqa: BLE001 - no int4 kernel on this target
            native = False
            notes.append(
                f"torchao Int4WeightOnlyConfig does not run here ({type(exc).__name__}: {str(exc)[:120]}); "
                "used IntxWeightOnlyConfig(int4, PerGroup): int4 values stored in int8 bytes, dequantized "
                "before a float matmul, so no size or speed gain over int8 on this target"
            )
        skipped = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % group_size]
        if skipped:
            notes.append(
                f"left in float (input size not a multiple of group_size {group_size}): {skipped[:6]}"
                + (" ..." if len(skipped) > 6 else "")
            )

        def fits(module: nn.Module, fqn: str) -> bool:
            return isinstance(module, nn.Linear) and module.in_features % group_size == 0

        if native:
            quantize_(model, Int4WeightOnlyConfig(group_size=group_size), filter_fn=fits)
            config_name = f"Int4WeightOnlyConfig(group_size={group_size})"
        else:
            quantize_(
                model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)), filter_fn=fits
            )
            config_name = f"IntxWeightOnlyConfig(int4, PerGroup({group_size}))"
    else:
        raise ValueError(f"quantize.method must be one of {METHODS}, not {method!r}")

    tied_quantized = False
    if tied:
        head = model.lm_head.weight
        try:
            with torch.no_grad():
                torch.nn.functional.embedding(torch.zeros(1, 1, dtype=torch.long, device=head.device), head)
            model.embed_tokens.weight = head
            tied_quantized = True
        except Exception:  # noqa: BLE001 - the head's format has no embedding op: quantize separately
            tied = False
    if not tied_quantized:
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=_is_embedding)
        notes.append("embedding: int8 weight-only (per row), separate from the head")
    else:
        notes.append("embedding: shares the head's quantized weight (tied)")
    return {
        "library": "torchao",
        "torchao_version": torchao.__version__,
        "method": method,
        "config": config_name,
        "group_size": group_size if method == "int4-weight-only" else None,
        "tied_quantized": tied_quantized,
        "notes": notes,
    }


def _torch_ao_qconfig_spec() -> dict[type[nn.Module], Any]:
    from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig

    return {nn.Linear: default_dynamic_qconfig, nn.Embedding: float_qparams_weight_only_qconfig}


def apply_structure(model: GPT, info: dict[str, Any]) -> GPT:
    """Turn a float GPT into the torch.ao module structure ``info`` describes (for loading)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        quantize_dynamic(model, _torch_ao_qconfig_spec(), dtype=torch.qint8, inplace=True)
    return model


def _torch_ao_quantize(model: GPT, method: str) -> dict[str, Any]:
    if method != "int8-dynamic":
        raise RuntimeError(
            f"quantize.method {method} needs torchao, which is not installed; install torchao or use int8-dynamic"
        )
    apply_structure(model, {})
    return {
        "library": "torch.ao",
        "method": method,
        "config": "torch.ao.quantization.quantize_dynamic(qint8; Linear dynamic, Embedding float_qparams)",
        "tied_quantized": False,
        "notes": [
            "torchao is not installed: fell back to torch.ao.quantization.quantize_dynamic (deprecated "
            "in torch 2.13; per-tensor int8 weights; the embedding is quantized separately from the head)"
        ],
    }


def kernels_used(model: GPT) -> list[str]:
    """Matmul-like operators that run in one forward of ``model`` (observed with torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    idx = torch.zeros(1, min(8, model.config.context_length), dtype=torch.long, device=device)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(idx)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(h in n.lower() for h in _KERNEL_HINTS) and not n.startswith("module::"))


def quantize(
    model: GPT, method: str, group_size: int = 128, *, library: str | None = None
) -> tuple[GPT, dict[str, Any]]:
    """A quantized copy of ``model`` and its description (library, config, kernels that ran, notes).

    ``library``: "torchao" or "torch.ao"; None picks torchao when it is installed.
    """
    if method not in METHODS:
        raise ValueError(f"quantize.method must be one of {METHODS}, not {method!r}")
    library = library or ("torchao" if torchao_available() else "torch.ao")
    quantized = copy.deepcopy(model).eval()
    if library == "torchao":
        info = _torchao_quantize(quantized, method, group_size)
    else:
        info = _torch_ao_quantize(quantized, method)
    quantized.eval()
    info["kernels"] = kernels_used(quantized)
    return quantized, info


def describe(info: dict[str, Any]) -> str:
    """One line for the report."""
    text = f"{info['method']} with {info['library']} {info.get('torchao_version', '')}".rstrip()
    text += f" ({info['config']}); kernels that ran: {', '.join(info.get('kernels', [])) or '-'}"
    if info.get("notes"):
        text += " | " + " | ".join(info["notes"])
    return text
