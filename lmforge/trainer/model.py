"""A decoder-only Transformer in the Llama style, in one file to read top to bottom (nanoGPT's directness).

Pre-norm RMSNorm, rotary positions, SwiGLU feed-forward, grouped-query attention, optional tied embeddings
and sliding-window attention. Parameter names and the rotary convention ("rotate_half", not interleaved)
are those of transformers' ``LlamaForCausalLM`` minus its ``model.`` prefix, so export is a rename with no
permutation and an exported model runs unchanged in the Hugging Face ecosystem.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from lmforge.api.training import ModelShape

IGNORE_INDEX = -100  # targets with this value (SFT prompt tokens, padding) carry no loss


@dataclass
class GPTConfig:
    """Everything that fixes the model's shape; stored next to exported weights (lmforge_model.json)."""

    vocab_size: int
    layers: int
    width: int
    heads: int
    kv_heads: int
    ffn_size: int
    context_length: int
    dropout: float = 0.0
    sliding_window: int | None = None
    tied_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    head_size: int | None = None
    """Per-head size; None means width // heads. Set when heads were pruned without changing width."""

    def __post_init__(self) -> None:
        # The spec validates these with friendlier hints; this guards configs built by hand or read from disk.
        if self.head_size is None:
            if self.width % self.heads or (self.width // self.heads) % 2:
                raise ValueError(f"width ({self.width}) must split into heads ({self.heads}) of even size")
        elif self.head_size < 2 or self.head_size % 2:
            raise ValueError(f"head_size ({self.head_size}) must be even and >= 2")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.width // self.heads

    @classmethod
    def from_spec(cls, shape: ModelShape, vocab_size: int) -> GPTConfig:
        window = shape.attention.window if shape.attention.type == "slidingWindow" else None
        return cls(
            vocab_size=vocab_size,
            layers=shape.layers,
            width=shape.width,
            heads=shape.heads,
            kv_heads=shape.resolved_kv_heads,
            ffn_size=shape.resolved_ffn_size,
            context_length=shape.context_length,
            dropout=shape.dropout,
            sliding_window=window,
            tied_embeddings=shape.tied_embeddings,
            rope_theta=shape.rope_theta,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; expected some of {sorted(known)}")
        return cls(**d)


class KVCache:
    """Keys and values of every layer, preallocated as [batch, kv_heads, max_len, head_dim] tensors.

    Preallocating avoids a reallocation per generated token, and storing kv heads (not the repeated query
    heads) keeps grouped-query attention's memory saving at inference time.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or config.context_length
        shape = (batch_size, config.kv_heads, self.max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Write this call's k/v at positions start_pos.. and return everything cached up to them."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, beam_indices: Tensor) -> None:
        """Row i becomes old row beam_indices[i]: each surviving beam continues its parent's cache.

        The batch size may change (e.g. one prefilled prompt row copied to every beam).
        """
        self.keys = [k.index_select(0, beam_indices) for k in self.keys]
        self.values = [v.index_select(0, beam_indices) for v in self.values]


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean, no bias), computed in fp32 like Llama for stability in bf16."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin [length, head_dim] of the rotary angles, both halves repeated (HF's layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the halves of the head dimension: pairs i and i + head_dim/2 rotate together."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention: heads/kv_heads query heads share each key/value head."""

    def __init__(self, config: GPTConfig, layer_index: int) -> None:
        super().__init__()
        self.config, self.layer_index = config, layer_index
        d = config.head_dim
        self.q_proj = nn.Linear(config.width, config.heads * d, bias=False)
        self.k_proj = nn.Linear(config.width, config.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(config.width, config.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.heads * d, config.width, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None, start_pos: int
    ) -> Tensor:
        c, (b, t, _) = self.config, x.shape
        q = self.q_proj(x).view(b, t, c.heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v, start_pos)
        if c.kv_heads != c.heads:  # query head h reads kv head h // (heads / kv_heads), as in HF's repeat_kv
            k = k.repeat_interleave(c.heads // c.kv_heads, dim=1)
            v = v.repeat_interleave(c.heads // c.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k.to(q.dtype),
            v.to(q.dtype),
            attn_mask=mask,
            dropout_p=c.dropout if self.training else 0.0,
            # Dense training passes no mask so GPUs can pick flash kernels.
            is_causal=mask is None and cache is None,
        )
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(b, t, c.heads * c.head_dim)))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.width, config.ffn_size, bias=False)
        self.up_proj = nn.Linear(config.width, config.ffn_size, bias=False)
        self.down_proj = nn.Linear(config.ffn_size, config.width, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.width, config.norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.width, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None, start_pos: int
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    """The language model: token embedding, ``layers`` blocks, final norm, head to vocabulary logits."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.width)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.layers))
        self.norm = RMSNorm(config.width, config.norm_eps)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tied_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Not persistent: derived from the config, so checkpoints and exports hold only parameters.
        cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # GPT-2/Llama init; residual projections shrink with depth so the residual stream's variance
        # does not grow with the number of blocks adding into it.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _mask(self, start_pos: int, t: int, cached: bool, device: torch.device) -> Tensor | None:
        """Boolean [t, keys] mask (True = attend), or None where is_causal or no mask at all suffices."""
        window = self.config.sliding_window
        if window is None and (not cached or t == 1):
            return None  # dense training: is_causal=True; one cached query attends to the whole cache
        end = start_pos + t
        q_pos = torch.arange(start_pos, end, device=device)[:, None]
        k_pos = torch.arange(0 if cached else start_pos, end, device=device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed = allowed & (k_pos > q_pos - window)  # i - window < j <= i
        return allowed

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits [B, T, vocab] (fp32) and, given targets, the mean cross-entropy over targets != -100.

        With a cache, this call's tokens sit at positions start_pos.. and attend over everything cached.
        """
        _, t = idx.shape
        end = start_pos + t
        if end > self.config.context_length:
            raise ValueError(f"positions up to {end} exceed context_length {self.config.context_length}")
        cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
        mask = self._mask(start_pos, t, cache is not None, idx.device)
        x = self.dropout(self.embed_tokens(idx))
        for block in self.layers:
            x = block(x, cos, sin, mask, cache, start_pos)
        logits = self.lm_head(self.norm(x)).float()
        if targets is None:
            return logits, None
        # Sum / count rather than reduction="mean": a batch whose targets are all -100 gives 0 (with a
        # graph, so backward still works) instead of NaN.
        total = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        count = (targets != IGNORE_INDEX).sum()
        return logits, total / count.clamp(min=1)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied matrix counts once); non_embedding also leaves out embedding and head."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed_tokens.weight.numel()
            if not self.config.tied_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), for MFU.

        6 * N + 6 * vocab * width + 12 * layers * width * T_attended, where N counts the blocks' matmul
        weights (q, k, v, o, gate, up, down; norms excluded), the second term is the head matmul, and the
        third is attention scores and values (2 matmuls x 2 FLOPs x 3 for forward + backward) over
        T_attended = context_length, or min(window, context_length) with sliding-window attention.
        """
        c = self.config
        matmul = sum(m.weight.numel() for m in self.layers.modules() if isinstance(m, nn.Linear))
        attended = min(c.sliding_window, c.context_length) if c.sliding_window else c.context_length
        return 6 * matmul + 6 * c.vocab_size * c.width + 12 * c.layers * c.width * attended

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups as in nanoGPT: every >= 2-D weight (embeddings too) decays, norm gains do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
