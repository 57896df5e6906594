"""A Llama-style GPT in plain PyTorch: no parallel code here, it is applied from outside.

Token embedding -> N x [RMSNorm -> causal self-attention with RoPE (optionally
grouped-query) -> residual, RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> logits.
The options of the open model families: biases on the q/k/v projections (Qwen2), an
RMSNorm on each head's query and key (Qwen3), a head size apart from d_model / n_heads,
and RoPE scaling (Llama 3.1's `llama3`, `linear`, `yarn`), computed as transformers does.
Given a `KVCache` (generation), attention appends the new keys and values to it and
attends over everything cached, each sequence at its own positions.
Layers live in a ModuleDict keyed by their index so that a pipeline stage that keeps
only some of them keeps the original parameter names, which keeps checkpoints
independent of the parallel layout. A stage may also lack the embedding (its input is
then hidden states) or the final norm and head (it returns hidden states).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from raytron.model.attention import CAUSAL, ContextShard, Documents, Mask, attention
from raytron.model.kv_cache import KVCache, LayerCache
from raytron.model.spec import GPTShape


def rope_tables(shape: GPTShape) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, shape (max_seq_len, head_dim / 2)."""
    inv_freq, scale = rope_frequencies(shape)
    angles = torch.outer(torch.arange(shape.max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos() * scale, angles.sin() * scale


def rope_frequencies(shape: GPTShape) -> tuple[torch.Tensor, float]:
    """The rotation frequency of each pair of a head's dimensions, and the factor on cos
    and sin, with the shape's scaling: transformers' `modeling_rope_utils`, step by step."""
    dim = shape.head_dim
    base = 1.0 / shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    factor = shape.rope_factor
    if shape.rope_scaling == "linear":
        return base / factor, 1.0
    if shape.rope_scaling == "llama3":
        return llama3_frequencies(base, shape), 1.0
    if shape.rope_scaling == "yarn":
        return yarn_frequencies(base, shape), yarn_attention_factor(shape)
    return base, 1.0


def llama3_frequencies(base: torch.Tensor, shape: GPTShape) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by the factor, short ones kept, those between
    interpolated."""
    factor, context = shape.rope_factor, shape.rope_original_max_seq_len
    low, high = shape.rope_low_freq_factor, shape.rope_high_freq_factor
    wavelength = 2 * math.pi / base
    scaled = torch.where(wavelength > context / low, base / factor, base)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    between = ~(wavelength < context / high) * ~(wavelength > context / low)
    return torch.where(between, smoothed, scaled)


def yarn_frequencies(base: torch.Tensor, shape: GPTShape) -> torch.Tensor:
    """YaRN: dimensions that rotate fewer than beta_slow times over the pre-trained context
    interpolated, more than beta_fast times kept, a linear ramp between."""
    dim, theta, context = shape.head_dim, shape.rope_theta, shape.rope_original_max_seq_len

    def dimension_of(rotations: float) -> float:
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dimension_of(shape.rope_beta_fast)), 0)
    high = min(math.ceil(dimension_of(shape.rope_beta_slow)), dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low if high > low
                                                                   else 0.001)
    kept = 1 - ramp.clamp(0, 1)
    return base / shape.rope_factor * (1 - kept) + base * kept


def yarn_attention_factor(shape: GPTShape) -> float:
    if shape.rope_attention_factor is not None:
        return shape.rope_attention_factor
    return 1.0 if shape.rope_factor <= 1 else 0.1 * math.log(shape.rope_factor) + 1.0


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (batch, heads, seq, head_dim) by the position angles."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.head_dim = shape.head_dim
        bias = shape.qkv_bias
        self.wq = nn.Linear(shape.d_model, shape.n_heads * shape.head_dim, bias=bias)
        self.wk = nn.Linear(shape.d_model, shape.n_kv_heads * shape.head_dim, bias=bias)
        self.wv = nn.Linear(shape.d_model, shape.n_kv_heads * shape.head_dim, bias=bias)
        self.wo = nn.Linear(shape.n_heads * shape.head_dim, shape.d_model, bias=False)
        self.q_norm = nn.RMSNorm(shape.head_dim, eps=shape.norm_eps) if shape.qk_norm \
            else nn.Identity()
        self.k_norm = nn.RMSNorm(shape.head_dim, eps=shape.norm_eps) if shape.qk_norm \
            else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Mask = CAUSAL, cache: LayerCache | None = None) -> torch.Tensor:
        """`cos`, `sin`: rotary tables whose last `seq` rows (dim -2) are the positions
        of x, or which start with them; `mask`: which keys each query sees."""
        batch, seq, _ = x.shape
        # -1 instead of the head count: under tensor parallelism each rank holds a share.
        q = self.q_norm(self.wq(x).view(batch, seq, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.wk(x).view(batch, seq, -1, self.head_dim)).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos[..., :seq, :], sin[..., :seq, :]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        out = attention(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, shape: GPTShape):
        super().__init__()
        self.w1 = nn.Linear(shape.d_model, shape.ffn_hidden, bias=False)
        self.w3 = nn.Linear(shape.d_model, shape.ffn_hidden, bias=False)
        self.w2 = nn.Linear(shape.ffn_hidden, shape.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.attention_norm = nn.RMSNorm(shape.d_model, eps=shape.norm_eps)
        self.attention = Attention(shape)
        self.ffn_norm = nn.RMSNorm(shape.d_model, eps=shape.norm_eps)
        self.feed_forward = FeedForward(shape)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Mask = CAUSAL, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    def __init__(self, shape: GPTShape, seed: int = 0):
        super().__init__()
        self.shape = shape
        # Given its (empty) weight, the embedding skips its own random init, which on the
        # meta device imports torch._dynamo; init_weights sets every value below.
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(
            shape.vocab_size, shape.d_model, _weight=torch.empty(shape.vocab_size, shape.d_model))
        self.layers = nn.ModuleDict({str(i): Block(shape) for i in range(shape.n_layers)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(shape.d_model, eps=shape.norm_eps)
        self.output: nn.Linear | None = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        # The process group a sequence is split over when `order` is given: set from
        # outside, as the other parallelisms are applied (model/parallelize.py).
        self.context_group = None
        # Tokens whose logits the loss computes at once (`labels`); None: all of them
        # (where the head's output is sharded over the vocabulary instead).
        self.loss_chunk_tokens: int | None = max(1, LOSS_CHUNK_ELEMENTS // shape.vocab_size)
        self.init_weights(seed)

    def tie_weights(self) -> None:
        """With `tie_embeddings` the head reads the embedding matrix. Whatever replaces the
        parameters (materializing from the meta device, sharding) unties them: call this
        again after it."""
        if self.shape.tie_embeddings and self.tok_embeddings is not None \
                and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    @property
    def head_is_a_copy(self) -> bool:
        """Whether this is a stage with the tied head but not the embedding (a pipeline's
        last stage): its head is then its own copy of the embedding matrix, which the
        first stage holds too (Megatron's way); training keeps the two equal."""
        return self.shape.tie_embeddings and self.tok_embeddings is None \
            and self.output is not None

    def init_weights(self, seed: int) -> None:
        """Every parameter set to its `initial_value`, and the rotary tables computed; on the
        meta device nothing is (materializing does it): computing there would import
        torch._dynamo, over a second of every worker's start."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if not param.is_meta:
                    param.copy_(self.initial_value(seed, name, param.shape))
        if not self.rope_cos.is_meta:
            self.init_rope()

    def initial_value(self, seed: int, name: str, shape: torch.Size) -> torch.Tensor:
        """The whole initial tensor of parameter `name`: ones for RMSNorm gains, zeros for
        biases, else Normal(0, init_std), the projections into the residual stream scaled by
        1/sqrt(2 * n_layers) (GPT-2) so the residual variance does not grow with depth.
        Drawn from a generator seeded by `seed` and the name alone, so any part of the
        model (a pipeline stage, a rank's shard) gets the values the whole model would
        have: the layout never changes the init. A tied head that lives apart from the
        embedding (another pipeline stage) starts as the embedding does."""
        if len(shape) < 2:
            return torch.zeros(shape) if name.endswith(".bias") else torch.ones(shape)
        if name == "output.weight" and self.shape.tie_embeddings:
            name = "tok_embeddings.weight"
        residual = name.endswith(("wo.weight", "w2.weight"))
        std = self.shape.init_std / (math.sqrt(2 * self.shape.n_layers) if residual else 1)
        generator = torch.Generator().manual_seed(name_seed(seed, name))
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    def init_rope(self) -> None:
        """The rotary tables, which are no parameters: computed, never loaded."""
        cos, sin = rope_tables(self.shape)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                order: torch.Tensor | None = None, documents: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for token ids (batch, seq); a stage without the
        embedding takes hidden states, one without the head returns them. With a `cache`,
        `tokens` continue each cached sequence (all of a prompt, then one at a time).
        With `positions` (batch, seq), each token's position in its own sample of a
        packed sequence: a sample starts at 0 and attends only within itself. With
        `logits_at` (batch,) or (batch, k), the logits of those positions of each row
        alone (batch, 1 or k, vocab): a prompt's prefill needs only its last, scoring a
        continuation only its own, and the head is a large matmul per position. With
        `order` (batch, seq), the tokens are this rank's share of sequences split over
        `context_group`, each at that index of its sequence (its position too, unless
        `positions` says otherwise), and `documents` (batch, seq),
        when given, is the sample of each: attention spans the whole sequences. With
        `labels` (batch, seq), a stage with the head returns each row's summed loss
        (batch,) instead of logits, which never all exist at once (`row_losses`)."""
        x = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        cos, sin, mask = self.rope_cos, self.rope_sin, CAUSAL
        if cache is not None:
            cos, sin = cache.advance(tokens.shape[1], cos, sin)
            mask = cache.mask
        elif positions is not None or order is not None:
            places = positions if positions is not None else order
            cos, sin = cos[places].unsqueeze(1), sin[places].unsqueeze(1)
            mask = Documents.of_positions(positions) if order is None else \
                ContextShard(order, documents, self.context_group)
        for index, layer in self.layers.items():
            x = layer(x, cos, sin, mask, None if cache is None else cache.layers[int(index)])
        if logits_at is not None:
            at = logits_at if logits_at.dim() == 2 else logits_at[:, None]
            x = x[torch.arange(len(x), device=x.device)[:, None], at]
        if self.norm is not None:
            x = self.norm(x)
        if self.output is None:
            return x
        if labels is not None:
            return row_losses(x, self.output, labels, self.loss_chunk_tokens)
        return self.output(x)

    def num_params(self) -> int:
        """Distinct parameters (a tied output head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12*L*d*T.

        N counts the weights of every matmul, the output head included even when tied
        (it is a matmul either way), and not the embedding lookup, which is no matmul.
        A frozen weight (LoRA's base) costs 4 of the 6: its backward pass computes the
        input's gradient and not its own. The attention term counts the full (not
        causal-halved) score matrix.
        """
        matmuls = self.matmul_weights()
        trained = sum(param.numel() for param in matmuls if param.requires_grad)
        return 4 * sum(param.numel() for param in matmuls) + 2 * trained \
            + 12 * self.shape.n_layers * self.shape.d_model * seq_len

    def forward_flops_per_token(self, seq_len: int) -> float:
        """A forward pass's FLOPs per token (a third of `flops_per_token`'s full model):
        what DPO's reference pass costs."""
        return 2 * sum(param.numel() for param in self.matmul_weights()) \
            + 4 * self.shape.n_layers * self.shape.d_model * seq_len

    def matmul_weights(self) -> list[nn.Parameter]:
        return [param for module in self.modules() if isinstance(module, nn.Linear)
                for param in module.parameters(recurse=False) if param.dim() == 2]


def name_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


IGNORE = -100  # a target id that is no target: the loss skips it
LOSS_CHUNK_ELEMENTS = 1 << 26  # logits the loss computes at once: 256 MB in float32


def row_losses(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
               chunk_tokens: int | None) -> torch.Tensor:
    """Each row's summed next-token loss (batch,) in float32, from the hidden states
    before the head. At long context the logits are a step's largest tensor (128k tokens
    of a 128k vocabulary: 64 GB in float32, and as much again for their gradient), so
    they are made `chunk_tokens` tokens at a time: each chunk's loss is recomputed in the
    backward pass (one more head matmul) instead of keeping its logits."""
    batch, seq = labels.shape
    if chunk_tokens is None or batch * seq <= chunk_tokens:
        return token_losses(head(hidden), labels).view(batch, seq).sum(dim=1)

    def chunk_losses(states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_losses(head(states), targets)

    losses = [checkpoint(chunk_losses, states, targets, use_reentrant=False)
              for states, targets in zip(hidden.flatten(0, 1).split(chunk_tokens),
                                         labels.flatten().split(chunk_tokens), strict=True)]
    return torch.cat(losses).view(batch, seq).sum(dim=1)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each token's loss, 0 where its target is IGNORE; in float32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                           ignore_index=IGNORE, reduction="none")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
                  ) -> torch.Tensor:
    """Next-token loss over the targets that are not IGNORE; in float32 whatever the
    autocast dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1),
                           ignore_index=IGNORE, reduction=reduction)
