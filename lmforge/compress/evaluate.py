"""`lmforge eval MODEL` and the evaluation after every compression step.

What is measured, on the current device, with the model in eval mode and ``torch.no_grad``:

- perplexity: exp of the token-weighted mean cross-entropy over the first ``batches`` micro-batches of
  the prepared validation split (read in order with :class:`~lmforge.data.reader.SampleReader`, so
  every model sees the same tokens);
- parameters (a tied matrix counts once; quantized weights count their logical elements) and the size
  of the weight files on disk;
- prefill: tokens/s for ``batch x prompt_len`` prompt tokens pushed through the model into a fresh
  KV cache; decode: milliseconds per generation step (one new token for every sequence of the batch)
  over ``decode_tokens`` steps after the prefill; at each batch size, eager and, when asked and it
  works, ``torch.compile``d (the compiled decode reuses one static-shaped step; a failure to compile is
  recorded, not raised);
- optionally a ``torch.profiler`` breakdown: self time per module type (time inside a module minus
  the time of the modules inside it), so a Linear's matmul and the attention kernel are told apart.

Timings are the best of ``repeats`` runs after a warm-up (the least disturbed by other processes on a
shared machine).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.trainer.device import to_device
from lmforge.trainer.model import GPT, IGNORE_INDEX, KVCache


@dataclass
class Latency:
    """Speed at one batch size, one mode (eager or compiled)."""

    batch_size: int
    mode: str
    prefill_tokens_per_second: float | None = None
    decode_ms_per_token: float | None = None
    error: str | None = None


@dataclass
class Evaluation:
    """Everything :func:`evaluate_model` measures."""

    perplexity: float | None
    loss: float | None
    eval_tokens: int
    parameters: int
    size_bytes: int | None
    latency: list[Latency] = field(default_factory=list)
    profile: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)

    def best_latency(self, batch_size: int = 1) -> Latency | None:
        """The fastest decode at ``batch_size`` (compiled if it worked and was faster)."""
        rows = [r for r in self.latency if r.batch_size == batch_size and r.decode_ms_per_token is not None]
        return min(rows, key=lambda r: r.decode_ms_per_token or math.inf) if rows else None

    def get(self, batch_size: int, mode: str) -> Latency | None:
        return next((r for r in self.latency if r.batch_size == batch_size and r.mode == mode), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_parameters(model: nn.Module) -> int:
    """Parameters, a shared tensor once; quantized tensor subclasses count their logical elements."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for tensor in list(module.parameters(recurse=False)) + _packed_weights(module):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def _packed_weights(module: nn.Module) -> list[torch.Tensor]:
    """torch.ao dynamically quantized Linear keeps its weight in packed params, not in parameters()."""
    weight = getattr(module, "weight", None)
    if callable(weight) and hasattr(module, "_packed_params"):
        return [weight()]
    return []


@torch.no_grad()
def perplexity(model: GPT, reader: Any, batches: int, micro_batch: int) -> tuple[float, float, int]:
    """(perplexity, mean loss, tokens) over the first ``batches`` micro-batches of ``reader`` (in order)."""
    model.eval()
    reader.load_state_dict({**reader.state_dict(), "position": 0})
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for _ in range(batches):
        x, y = reader.next_batch(micro_batch)
        x, y = to_device(x, y, device)
        logits, _ = model(x)
        total += float(
            F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        )
        count += int((y != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return math.exp(min(loss, 50.0)), loss, count


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    """Best seconds of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def measure_latency(
    model: GPT,
    batch_size: int,
    *,
    prompt_len: int,
    decode_tokens: int,
    repeats: int = 3,
    compiled: bool = False,
) -> Latency:
    """Prefill tokens/s and decode ms per step at ``batch_size`` (see the module docstring)."""
    mode = "compiled" if compiled else "eager"
    config = model.config
    prompt_len = max(1, min(prompt_len, config.context_length - decode_tokens))
    param = next(model.parameters())
    device, dtype = param.device, param.dtype if param.dtype.is_floating_point else torch.float32
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (batch_size, prompt_len), generator=generator).to(device)
    token = prompt[:, -1:].contiguous()
    max_len = prompt_len + decode_tokens
    forward: Callable[..., Any] = model
    try:
        if compiled:
            forward = torch.compile(model, dynamic=True)

        def prefill() -> KVCache:
            cache = KVCache(config, batch_size, max_len, device=device, dtype=dtype)
            forward(prompt, cache=cache, start_pos=0)
            return cache

        prefill_s = _timed(prefill, repeats)

        def decode() -> None:
            cache = prefill()
            start = time.perf_counter()
            for step in range(decode_tokens):
                forward(token, cache=cache, start_pos=prompt_len + step)
            decode_times.append(time.perf_counter() - start)

        decode_times: list[float] = []
        decode()  # warm-up (compiles every decode position for the compiled model)
        decode_times.clear()
        for _ in range(repeats):
            decode()
        decode_s = min(decode_times)
    except Exception as exc:  # noqa: BLE001 - a backend that cannot compile is a result, not a crash
        return Latency(batch_size, mode, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return Latency(
        batch_size,
        mode,
        prefill_tokens_per_second=batch_size * prompt_len / prefill_s,
        decode_ms_per_token=1000.0 * decode_s / decode_tokens,
    )


@torch.no_grad()
def profile_modules(model: GPT, batch_size: int = 1, prompt_len: int = 64, decode_tokens: int = 16) -> dict[str, float]:
    """Self CPU/GPU milliseconds per module type over one prefill + decode, from ``torch.profiler``.

    Every module runs inside ``record_function("module::<Type>")`` (the head as ``module::lm_head``);
    a module's self time is its time less that of the labelled modules inside it. ``other`` is what
    ran outside every module (sampling-free here, so mostly the cache bookkeeping).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    handles = []
    stack: list[Any] = []

    def label(name: str) -> tuple[Callable[..., None], Callable[..., None]]:
        def pre(_module: nn.Module, _inputs: Any) -> None:
            ctx = record_function(f"module::{name}")
            ctx.__enter__()
            stack.append(ctx)

        def post(_module: nn.Module, _inputs: Any, _output: Any) -> None:
            stack.pop().__exit__(None, None, None)

        return pre, post

    for name, module in model.named_modules():
        if module is model or isinstance(module, nn.ModuleList | nn.Dropout):
            continue
        pre, post = label("lm_head" if name == "lm_head" else type(module).__name__)
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    config = model.config
    device = next(model.parameters()).device
    prompt_len = max(1, min(prompt_len, config.context_length - decode_tokens))
    prompt = torch.randint(0, config.vocab_size, (batch_size, prompt_len), device=device)
    try:
        with profile(activities=activities) as prof, record_function("model::total"):
            cache = KVCache(config, batch_size, prompt_len + decode_tokens, device=device)
            model(prompt, cache=cache, start_pos=0)
            for step in range(decode_tokens):
                model(prompt[:, -1:], cache=cache, start_pos=prompt_len + step)
    finally:
        for handle in handles:
            handle.remove()
    events = prof.events()
    totals: dict[str, float] = {}
    grand = 0.0

    def module_time_inside(event: Any) -> float:
        """Time of the outermost labelled modules below ``event``."""
        inner = 0.0
        for child in event.cpu_children:
            if child.name.startswith("module::"):
                inner += child.cpu_time_total
            else:
                inner += module_time_inside(child)
        return inner

    for event in events:
        if event.name == "model::total":
            grand = event.cpu_time_total
            totals["other"] = (event.cpu_time_total - module_time_inside(event)) / 1000.0
        elif event.name.startswith("module::"):
            key = event.name.removeprefix("module::")
            totals[key] = totals.get(key, 0.0) + (event.cpu_time_total - module_time_inside(event)) / 1000.0
    totals["total"] = grand / 1000.0
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def evaluate_model(
    model: GPT,
    *,
    reader: Any | None = None,
    batches: int = 20,
    micro_batch: int = 8,
    size_bytes: int | None = None,
    batch_sizes: tuple[int, ...] | list[int] = (1, 8),
    compile: bool = False,
    prompt_len: int = 128,
    decode_tokens: int = 32,
    repeats: int = 3,
    profile: bool = False,
    log: Callable[[str], None] = lambda text: None,
) -> Evaluation:
    """Measure ``model`` (see the module docstring); ``reader`` None skips perplexity."""
    model.eval()
    ppl = loss = None
    tokens = 0
    if reader is not None:
        ppl, loss, tokens = perplexity(model, reader, batches, micro_batch)
        log(f"eval: perplexity {ppl:.3f} over {tokens:,} tokens")
    result = Evaluation(
        perplexity=ppl, loss=loss, eval_tokens=tokens, parameters=count_parameters(model), size_bytes=size_bytes
    )
    for batch_size in batch_sizes:
        for compiled in (False, True) if compile else (False,):
            row = measure_latency(
                model,
                batch_size,
                prompt_len=prompt_len,
                decode_tokens=decode_tokens,
                repeats=repeats,
                compiled=compiled,
            )
            result.latency.append(row)
            if row.error:
                result.notes.append(f"{row.mode} at batch {batch_size} failed: {row.error}")
                log(f"eval: {row.mode} batch {batch_size}: {row.error}")
            else:
                log(
                    f"eval: {row.mode} batch {batch_size}: prefill {row.prefill_tokens_per_second:,.0f} tok/s, "
                    f"decode {row.decode_ms_per_token:.2f} ms/token"
                )
    if compile:
        torch._dynamo.reset()
    if profile:
        result.profile = profile_modules(model, prompt_len=min(prompt_len, 64))
    return result


def format_evaluation(name: str, ev: Evaluation) -> str:
    """A human-readable summary (what `lmforge eval` prints)."""
    lines = [f"model        {name}"]
    if ev.perplexity is not None:
        lines.append(f"perplexity   {ev.perplexity:.3f}  (loss {ev.loss:.4f}, {ev.eval_tokens:,} tokens)")
    lines.append(f"parameters   {ev.parameters:,}")
    if ev.size_bytes is not None:
        lines.append(f"size         {ev.size_bytes / 1e6:.2f} MB")
    lines.append("")
    lines.append(f"{'batch':>5}  {'mode':<9}{'prefill tok/s':>14}{'decode ms/token':>17}")
    for row in ev.latency:
        if row.error:
            lines.append(f"{row.batch_size:>5}  {row.mode:<9}  failed: {row.error}")
        else:
            prefill, decode = row.prefill_tokens_per_second, row.decode_ms_per_token
            lines.append(f"{row.batch_size:>5}  {row.mode:<9}{prefill:>14,.0f}{decode:>17.3f}")
    if ev.profile:
        total = ev.profile.get("total") or 1.0
        lines.append("")
        lines.append("where the time goes (self time by module type, one prefill + 16 decode steps)")
        for key, ms in ev.profile.items():
            if key != "total":
                lines.append(f"  {key:<20}{ms:>9.2f} ms  {100 * ms / total:5.1f}%")
        lines.append(f"  {'total':<20}{total:>9.2f} ms")
    return "\n".join(lines)


def val_reader_for(prepared_uri: str, context_length: int, s3: Any = None) -> Any:
    """A :class:`SampleReader` over ``prepared_uri``'s val split, in order."""
    from lmforge.data.reader import SampleReader
    from lmforge.data.storage import join_uri, storage_for

    return SampleReader(join_uri(prepared_uri, "val"), storage_for(prepared_uri, s3), context_length, shuffle=False)


def evaluate_dir(
    model_dir: str,
    *,
    prepared_uri: str | None = None,
    s3: Any = None,
    **kwargs: Any,
) -> Evaluation:
    """Load an exported (possibly quantized) model directory and evaluate it."""
    from lmforge.compress.modelio import load_any, weights_bytes

    model, _, _ = load_any(model_dir)
    reader = val_reader_for(prepared_uri, model.config.context_length, s3) if prepared_uri else None
    return evaluate_model(model, reader=reader, size_bytes=weights_bytes(model_dir), **kwargs)
