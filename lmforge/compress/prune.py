"""Pruning. Structured pruning removes whole structures and returns a smaller GPT; magnitude pruning zeroes.

Structured (``method: structured``), in this order, each on the model the previous one left:

- ``layers``: remove ``round(layers x sparsity)`` whole blocks (at least one block stays).
  Importance of block i: *activation*: its Block Influence (ShortGPT, Men et al. 2024): the mean over
  calibration tokens of ``1 - cos(x_in, x_out)``: a block that barely turns the residual stream does
  little; *magnitude*: ``||o_proj||_F + ||down_proj||_F``, the size of what the block writes into the
  residual stream.
- ``heads``: grouped-query attention stays consistent. With ``kv_heads > 1`` and
  ``round(kv_heads x sparsity) >= 1``, whole kv groups go (a kv head with all its query heads; the KV
  cache shrinks too); otherwise ``round(group x sparsity)`` query heads go from *every* group, so each
  group keeps the same number of query heads. Importance of a head: *activation*: mean L2 norm of its
  attention output (the o_proj input slice) times the norm of its o_proj columns; *magnitude*:
  ``||q rows|| x ||o columns||`` (a kv group adds its k and v rows). Needs a model whose head size
  does not have to equal width / heads (``GPTConfig.head_size``); :func:`supports_head_pruning` tells.
- ``ffn``: keep the ``ffn_size x (1 - sparsity)`` SwiGLU channels (rounded down to a multiple of 8
  when >= 16) with the highest importance in every block (GPTConfig has one ffn_size): *activation*:
  mean ``|silu(gate x) * up x|`` on calibration tokens times ``||down[:, j]||``; *magnitude*:
  ``||gate[j]|| x ||up[j]|| x ||down[:, j]||``.

Magnitude (``method: magnitude``): global unstructured L1 pruning (``torch.nn.utils.prune``) of every
block Linear weight to the given sparsity, made permanent. The weights stay dense: the file on disk,
memory and CPU speed are unchanged without sparse kernels, and the report says so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.trainer.model import GPT, GPTConfig

Batches = Iterable[tuple[Tensor, Tensor]]


@dataclass
class PruneReport:
    """What a pruning step did, in words and numbers."""

    method: str
    importance: str
    removed: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0

    def summary(self) -> str:
        parts = [f"{k}: {v}" for k, v in self.removed.items()]
        return (
            f"{self.method} pruning ({self.importance}): "
            + ("; ".join(parts) or "nothing removed")
            + ("" if not self.notes else " | " + " | ".join(self.notes))
        )


def supports_head_pruning() -> bool:
    """Whether GPTConfig can describe a head size other than width / heads (a ``head_size`` field)."""
    return "head_size" in {f.name for f in fields(GPTConfig)}


def _config(base: GPTConfig, **changes: Any) -> GPTConfig:
    values = base.to_dict()
    values.update(changes)
    return GPTConfig.from_dict(values)


def _rebuild(model: GPT, config: GPTConfig, state: dict[str, Tensor]) -> GPT:
    """A new GPT of ``config`` holding ``state`` (same dtype and device as ``model``)."""
    param = next(model.parameters())
    new = GPT(config).to(device=param.device, dtype=param.dtype)
    if config.tied_embeddings:
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    new.load_state_dict(state, strict=True)
    new.train(model.training)
    return new


# --- calibration ---------------------------------------------------------------------------


@torch.no_grad()
def _calibrate(model: GPT, batches: Batches, what: set[str]) -> dict[str, list[Tensor]]:
    """Activation statistics per block: 'ffn' [ffn], 'heads' [heads], 'layers' scalar."""
    what = set(what) | {"layers"}  # the block hook also counts the tokens every statistic is divided by
    stats: dict[str, list[Tensor]] = {k: [torch.zeros(0) for _ in model.layers] for k in what}
    counts = [0 for _ in model.layers]
    handles = []
    c = model.config

    for i, block in enumerate(model.layers):

        def ffn_hook(_m: nn.Module, inputs: tuple[Tensor], i: int = i) -> None:
            h = inputs[0].detach().float().abs().reshape(-1, inputs[0].shape[-1]).sum(0)
            stats["ffn"][i] = h if stats["ffn"][i].numel() == 0 else stats["ffn"][i] + h

        def head_hook(_m: nn.Module, inputs: tuple[Tensor], i: int = i) -> None:
            x = inputs[0].detach().float()
            per_head = x.reshape(-1, c.heads, x.shape[-1] // c.heads).norm(dim=-1).sum(0)
            stats["heads"][i] = per_head if stats["heads"][i].numel() == 0 else stats["heads"][i] + per_head

        def block_hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, i: int = i) -> None:
            x_in, x_out = inputs[0].detach().float(), output.detach().float()
            influence = (1 - F.cosine_similarity(x_in, x_out, dim=-1)).sum()
            stats["layers"][i] = influence if stats["layers"][i].numel() == 0 else stats["layers"][i] + influence
            counts[i] += x_in.shape[0] * x_in.shape[1]

        if "ffn" in what:
            handles.append(block.mlp.down_proj.register_forward_pre_hook(ffn_hook))
        if "heads" in what:
            handles.append(block.self_attn.o_proj.register_forward_pre_hook(head_hook))
        handles.append(block.register_forward_hook(block_hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        seen = 0
        for x, _ in batches:
            model(x.to(device).long())
            seen += 1
        if seen == 0:
            raise ValueError("activation importance needs at least one calibration batch")
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {k: [s / max(n, 1) for s, n in zip(v, counts, strict=True)] for k, v in stats.items()}


# --- scores --------------------------------------------------------------------------------


def _ffn_scores(model: GPT, acts: list[Tensor] | None) -> list[Tensor]:
    scores = []
    for i, block in enumerate(model.layers):
        mlp = block.mlp
        down = mlp.down_proj.weight.detach().float().norm(dim=0)
        if acts is not None:
            scores.append(acts[i] * down)
        else:
            gate = mlp.gate_proj.weight.detach().float().norm(dim=1)
            up = mlp.up_proj.weight.detach().float().norm(dim=1)
            scores.append(gate * up * down)
    return scores


def _head_scores(model: GPT, acts: list[Tensor] | None) -> list[Tensor]:
    """Per block, a score per query head."""
    c = model.config
    d = c.head_dim
    scores = []
    for i, block in enumerate(model.layers):
        attn = block.self_attn
        o_cols = attn.o_proj.weight.detach().float().reshape(c.width, c.heads, d).norm(dim=(0, 2))
        if acts is not None:
            scores.append(acts[i] * o_cols)
        else:
            q = attn.q_proj.weight.detach().float().reshape(c.heads, d, c.width).norm(dim=(1, 2))
            scores.append(q * o_cols)
    return scores


def _layer_scores(model: GPT, acts: list[Tensor] | None) -> list[float]:
    if acts is not None:
        return [float(a) for a in acts]
    return [
        float(b.self_attn.o_proj.weight.detach().float().norm() + b.mlp.down_proj.weight.detach().float().norm())
        for b in model.layers
    ]


# --- the three structured prunings ---------------------------------------------------------


def prune_layers(model: GPT, sparsity: float, scores: list[float], report: PruneReport) -> GPT:
    c = model.config
    remove = min(c.layers - 1, round(c.layers * sparsity))
    if remove < 1:
        report.notes.append(f"layers: {c.layers} x {sparsity} rounds to 0 blocks; none removed")
        return model
    order = sorted(range(c.layers), key=lambda i: scores[i])
    dropped = sorted(order[:remove])
    keep = [i for i in range(c.layers) if i not in dropped]
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if int(index) in keep:
                state[f"layers.{keep.index(int(index))}.{rest}"] = tensor
        else:
            state[name] = tensor
    report.removed["layers"] = f"blocks {dropped} of {c.layers} (scores {[round(scores[i], 4) for i in dropped]})"
    return _rebuild(model, _config(c, layers=len(keep)), state)


def prune_ffn(model: GPT, sparsity: float, scores: list[Tensor], report: PruneReport) -> GPT:
    c = model.config
    keep_n = int(c.ffn_size * (1 - sparsity))
    if keep_n >= 16:
        keep_n -= keep_n % 8
    keep_n = max(1, keep_n)
    if keep_n >= c.ffn_size:
        report.notes.append("ffn: nothing to remove at this sparsity")
        return model
    state = dict(model.state_dict())
    for i, block_scores in enumerate(scores):
        keep = torch.topk(block_scores, keep_n).indices.sort().values
        p = f"layers.{i}.mlp."
        state[p + "gate_proj.weight"] = state[p + "gate_proj.weight"][keep].clone()
        state[p + "up_proj.weight"] = state[p + "up_proj.weight"][keep].clone()
        state[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, keep].clone()
    report.removed["ffn"] = f"ffn_size {c.ffn_size} -> {keep_n} in each of {c.layers} blocks"
    return _rebuild(model, _config(c, ffn_size=keep_n), state)


def prune_heads(model: GPT, sparsity: float, scores: list[Tensor], report: PruneReport) -> GPT:
    c = model.config
    d = c.head_dim
    group = c.heads // c.kv_heads
    drop_groups = round(c.kv_heads * sparsity) if c.kv_heads > 1 else 0
    drop_groups = min(drop_groups, c.kv_heads - 1)
    drop_per_group = 0 if drop_groups else min(group - 1, round(group * sparsity))
    if drop_groups == 0 and drop_per_group == 0:
        report.notes.append(f"heads: {c.heads} heads / {c.kv_heads} kv heads x {sparsity} rounds to 0; none removed")
        return model
    if not supports_head_pruning():
        report.notes.append(
            "heads: skipped: GPTConfig has no head_size field, so a model with fewer heads but the same "
            "width cannot be described (see lmforge/compress/README or the issue notes)"
        )
        return model
    state = dict(model.state_dict())
    kept_q: list[list[int]] = []
    kept_kv: list[list[int]] = []
    for i, head_scores in enumerate(scores):
        per_group = head_scores.reshape(c.kv_heads, group)
        if drop_groups:
            keep_groups = torch.topk(per_group.sum(1), c.kv_heads - drop_groups).indices.sort().values.tolist()
            kv = keep_groups
            q = [g * group + j for g in keep_groups for j in range(group)]
        else:
            kv = list(range(c.kv_heads))
            q = []
            for g in range(c.kv_heads):
                best = torch.topk(per_group[g], group - drop_per_group).indices.sort().values.tolist()
                q += [g * group + j for j in best]
        kept_q.append(q)
        kept_kv.append(kv)
        p = f"layers.{i}.self_attn."
        q_rows = torch.tensor([h * d + k for h in q for k in range(d)])
        kv_rows = torch.tensor([h * d + k for h in kv for k in range(d)])
        state[p + "q_proj.weight"] = state[p + "q_proj.weight"][q_rows].clone()
        state[p + "k_proj.weight"] = state[p + "k_proj.weight"][kv_rows].clone()
        state[p + "v_proj.weight"] = state[p + "v_proj.weight"][kv_rows].clone()
        state[p + "o_proj.weight"] = state[p + "o_proj.weight"][:, q_rows].clone()
    heads, kv_heads = len(kept_q[0]), len(kept_kv[0])
    how = f"{drop_groups} whole kv group(s)" if drop_groups else f"{drop_per_group} query head(s) per kv group"
    report.removed["heads"] = f"heads {c.heads} -> {heads}, kv_heads {c.kv_heads} -> {kv_heads} ({how}, each block)"
    return _rebuild(model, _config(c, heads=heads, kv_heads=kv_heads, head_size=d), state)


def structured_prune(
    model: GPT,
    sparsity: float,
    targets: list[str],
    importance: str = "magnitude",
    calibration: Callable[[], Batches] | None = None,
) -> tuple[GPT, PruneReport]:
    """A smaller GPT (a new module; ``model`` is untouched) and what was removed.

    ``calibration`` returns fresh calibration batches ``(x, y)``; it is needed for activation
    importance and is called once per target (scores are computed on the model each target leaves).
    """
    if importance == "activation" and calibration is None:
        raise ValueError("activation importance needs calibration batches")
    report = PruneReport("structured", importance, parameters_before=model.num_parameters())
    current = model
    for target in [t for t in ("layers", "heads", "ffn") if t in targets]:
        acts = _calibrate(current, calibration(), {target}) if importance == "activation" else None  # type: ignore[misc]
        if target == "layers":
            current = prune_layers(current, sparsity, _layer_scores(current, acts["layers"] if acts else None), report)
        elif target == "heads":
            current = prune_heads(current, sparsity, _head_scores(current, acts["heads"] if acts else None), report)
        else:
            current = prune_ffn(current, sparsity, _ffn_scores(current, acts["ffn"] if acts else None), report)
    if current is model:
        current = copy.deepcopy(model)
    report.parameters_after = current.num_parameters()
    return current, report


def magnitude_prune(model: GPT, sparsity: float) -> tuple[GPT, PruneReport]:
    """Global unstructured L1 pruning of the blocks' Linear weights, baked in (a new module)."""
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model)
    targets = [(m, "weight") for m in pruned.layers.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        prune.remove(module, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    total = sum(m.weight.numel() for m, _ in targets)
    report = PruneReport(
        "magnitude",
        "magnitude",
        removed={"weights": f"{zeros:,} of {total:,} block weights zeroed ({zeros / total:.0%})"},
        notes=[
            "unstructured sparsity saves nothing on CPU: the weights stay dense on disk and in memory, "
            "and without sparse kernels every zero is still multiplied"
        ],
        parameters_before=model.num_parameters(),
        parameters_after=pruned.num_parameters(),
    )
    return pruned, report
