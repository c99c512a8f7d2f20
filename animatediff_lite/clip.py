"""CLIP text encoder (the ViT-L/14 text tower of SD1.5): token ids -> per-token hidden states.

Parameter names are those of transformers' ``CLIPTextModel`` without the leading ``text_model.``, so
``loading/clip_map.py`` maps checkpoints with prefix edits only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import CLIPConfig

ACTIVATIONS = ("quick_gelu", "gelu")


def _embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)`` with the same N(0, 1) init, skipped on the meta device: there torch's
    ``normal_`` imports torch._dynamo (1-2 s and ~150 MB per process) to fill a table the checkpoint replaces."""
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


class Embeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = _embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions are 0..L-1 for every row: slice the table instead of keeping a position_ids buffer.
        positions = self.position_embedding.weight[: input_ids.shape[1]]  # (L, C)
        return self.token_embedding(input_ids) + positions  # (n, L, C)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention with biased q/k/v/out projections."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)
        self.kernel_backend = None  # set once per pipeline (ops.set_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.num_heads, c // self.num_heads).transpose(1, 2)  # (n, H, L, D)

        out = attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), causal=True,
                        backend=self.kernel_backend)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, c))


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        # quick_gelu is CLIP's sigmoid approximation of GELU, which the trained weights expect.
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """The stack of transformer layers (a module of its own so keys read ``encoder.layers.{i}``)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.Sequential(*[EncoderLayer(cfg) for _ in range(cfg.num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TextEncoder(nn.Module):
    """CLIP text transformer returning ``last_hidden_state`` (after the final LayerNorm), as SD1.5 uses it.

    Keys: ``embeddings.{token,position}_embedding.weight``, ``encoder.layers.{i}.self_attn.{q,k,v,out}_proj.*``,
    ``encoder.layers.{i}.layer_norm{1,2}.*``, ``encoder.layers.{i}.mlp.fc{1,2}.*``, ``final_layer_norm.*``.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"cfg.hidden_act must be one of {ACTIVATIONS}, got {cfg.hidden_act!r}")
        if cfg.num_heads < 1 or cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"cfg.hidden_size ({cfg.hidden_size}) must be a multiple of cfg.num_heads "
                             f"({cfg.num_heads})")
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids LongTensor (n, L), L <= max_position_embeddings -> last_hidden_state (n, L, hidden_size)."""
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids must be (n, L) with L <= {self.config.max_position_embeddings}, "
                             f"got shape {tuple(input_ids.shape)}")
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
