"""The hybrid language model, top to bottom: token embedding, one block per letter of the layer pattern
(L = Gated DeltaNet, F = softmax attention, D = sparse attention), final RMSNorm, tied output head.

Each block is pre-norm: x + mixer(norm(x)), then x + mlp(norm(x)); each residual add is done by the norm after it
(one kernel on CUDA). Modules that add an auxiliary loss (the sparse-attention indexer, the MoE router) leave it
in `aux_loss` after their forward; the model adds them up.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridctl.core.model.attention import CausalSelfAttention
from hybridctl.core.config import ModelConfig
from hybridctl.core.model.cache import LayerCache, ModelCache, new_cache
from hybridctl.core.model.gated_delta import GatedDeltaNet
from hybridctl.core.model.layers import RMSNorm, SwiGLU


def make_mixer(kind: str, cfg: ModelConfig) -> nn.Module:
    if kind == "L":
        g = cfg.gdn
        return GatedDeltaNet(cfg.d_model, g.num_heads, g.head_dim, g.expand_v, g.conv_size,
                             norm_eps=cfg.norm_eps, backend=g.backend, chunk_size=g.chunk_size)
    if kind == "F":
        return CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.attention.window, cfg.attention.rope_theta)
    if kind == "D":
        from hybridctl.core.model.sparse_attention import DeepSeekSparseAttention

        return DeepSeekSparseAttention(cfg)
    raise ValueError(f"unknown layer kind {kind!r}")


def uses_moe(layer: int, cfg: ModelConfig) -> bool:
    return cfg.moe.n_experts > 0 and (layer + 1) % cfg.moe.moe_every == 0


def make_mlp(layer: int, cfg: ModelConfig) -> nn.Module:
    if uses_moe(layer, cfg):
        from hybridctl.core.model.moe import MoE

        return MoE(cfg.d_model, cfg.ffn_dim, cfg.moe)
    return SwiGLU(cfg.d_model, cfg.ffn_dim)


class Block(nn.Module):
    def __init__(self, layer: int, kind: str, cfg: ModelConfig):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = make_mixer(kind, cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cast_to_autocast=not uses_moe(layer, cfg))
        self.mlp = make_mlp(layer, cfg)

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x + mixer(norm(x)), then + mlp(norm(...)), with each add done by the norm that follows it: `pending` is
        the previous block's MLP output, not yet in the residual stream x, and this block returns its own."""
        x, h = self.mixer_norm.add_and_norm(x, pending)
        x, h = self.mlp_norm.add_and_norm(x, self.mixer(h))
        return x, self.mlp(h)

    def forward_cached(self, x: torch.Tensor, pending: torch.Tensor | None, cache: LayerCache
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward for the next positions of the sequences in `cache` (decoding); an MoE MLP drops no token."""
        x, h = self.mixer_norm.add_and_norm(x, pending)
        x, h = self.mlp_norm.add_and_norm(x, self.mixer.forward_cached(h, cache))
        return x, (self.mlp.forward_without_drops(h) if hasattr(self.mlp, "forward_without_drops") else self.mlp(h))

    def step_at(self, x: torch.Tensor, pending: torch.Tensor | None, cache: LayerCache, position: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward_cached for one decoding step at `position` (a 0-d device tensor); see HybridLM.step_at."""
        x, h = self.mixer_norm.add_and_norm(x, pending)
        x, h = self.mlp_norm.add_and_norm(x, self.mixer.step_at(h, cache, position))
        return x, self.mlp(h)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ weight.T) against targets, chunk by chunk over tokens.

    The full [tokens, vocab] logits are never held at once (49152-token vocab x 49152 tokens would be 9.7 GB in
    fp32): each chunk's logits are made, turned into the loss and into the gradients for h and weight, and
    dropped. Same three matmuls as the plain version, so it costs memory traffic, not time.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_tokens: int):
        compute = torch.get_autocast_dtype("cuda") if h.is_cuda and torch.is_autocast_enabled("cuda") else h.dtype
        acc = torch.float64 if compute == torch.float64 else torch.float32  # accumulation precision
        n = h.shape[0]
        w = weight.to(compute)
        grad_h = torch.empty(h.shape, dtype=compute, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        loss = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, n, chunk_tokens):
            hc, tc = h[start : start + chunk_tokens].to(compute), targets[start : start + chunk_tokens]
            logits = (hc @ w.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            grad[torch.arange(len(tc), device=h.device), tc] -= 1.0
            grad = (grad / n).to(compute)
            grad_h[start : start + chunk_tokens] = grad @ w
            grad_w += (grad.t() @ hc).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h * grad_loss).to(h_dtype), (grad_w * grad_loss).to(w_dtype), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
    return LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), chunk_tokens)


@dataclass
class ModelOutput:
    loss: torch.Tensor | None  # what backward sees: cross-entropy plus weighted auxiliary losses
    ce_loss: torch.Tensor | None
    logits: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


def padded_vocab(vocab_size: int) -> int:
    """Embedding rows rounded up to a multiple of 64 for matmul efficiency; extra rows are never targets."""
    return 64 * math.ceil(vocab_size / 64)


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (the trainer sets it from the tokenizer)")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.embed = nn.Embedding(padded_vocab(cfg.vocab_size), cfg.d_model)
        self.blocks = nn.ModuleList(Block(i, kind, cfg) for i, kind in enumerate(cfg.layer_types()))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, self.embed.num_embeddings, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.loss_impl = "chunked"  # "plain", "chunked" or "fused": see pick_loss; the trainer sets it from train.loss
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.cfg.init_std
        # Residual output projections are scaled down with depth (GPT-2) so the residual stream starts small.
        residual_std = std / math.sqrt(2 * len(self.blocks))
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, 0.0, residual_std)
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
        for m in self.modules():
            if isinstance(m, GatedDeltaNet):
                m.reset_gates()
                nn.init.normal_(m.conv_weight, 0.0, 1.0 / math.sqrt(m.conv_size))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def hidden_states(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, pending = self.embed(idx), None
        aux: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            x, pending = block(x, pending)
            for module in (block.mixer, block.mlp):
                for key, value in getattr(module, "aux_losses", {}).items():
                    aux[key] = aux.get(key, 0) + value
        return self.norm.add_and_norm(x, pending)[1], aux

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = False) -> ModelOutput:
        h, aux = self.hidden_states(idx)
        if targets is None:
            return ModelOutput(None, None, self.lm_head(h)[..., : self.vocab_size], aux)
        logits = None
        if return_logits or not torch.is_grad_enabled() or self.loss_impl == "plain":
            logits = self.lm_head(h)
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or fp64 in fp64 checks
            ce = F.cross_entropy(wide.view(-1, wide.shape[-1]), targets.reshape(-1))
        elif self.loss_impl == "fused":
            from hybridctl.core.kernels.fused_loss import fused_linear_cross_entropy  # needs Triton

            ce = fused_linear_cross_entropy(h, self.lm_head.weight, targets)
        else:
            ce = linear_cross_entropy(h, self.lm_head.weight, targets)
        loss = ce
        for key, value in aux.items():
            loss = loss + self.aux_weight(key) * value
        return ModelOutput(loss, ce, logits[..., : self.vocab_size] if return_logits else None, aux)

    def new_cache(self, capacity: int, pad: torch.Tensor | None = None) -> ModelCache:
        """An empty decoding cache with room for `capacity` positions; pad [B]: each row's left padding."""
        return new_cache(self.cfg.layer_types(), capacity, self.cfg.attention.window, pad)

    def forward_cached(self, idx: torch.Tensor, cache: ModelCache, all_logits: bool = False) -> torch.Tensor:
        """The next tokens idx [B, T] of the sequences in `cache`, which takes in their states: a whole prompt in
        one parallel pass (chunked recurrence, causal attention), then one token per call. Returns the logits of
        the last position [B, 1, vocab], or of all T with all_logits. The same function as forward over the whole
        sequence, but for MoE layers, which drop no token here (see MoE.forward_without_drops)."""
        if cache.length + idx.shape[1] > cache.capacity:
            raise ValueError(f"the cache holds {cache.capacity} positions; {cache.length + idx.shape[1]} were asked for")
        x, pending = self.embed(idx), None
        for block, layer_cache in zip(self.blocks, cache.layers):
            x, pending = block.forward_cached(x, pending, layer_cache)
        cache.length += idx.shape[1]
        h = self.norm.add_and_norm(x if all_logits else x[:, -1:], pending if all_logits else pending[:, -1:])[1]
        return self.lm_head(h)[..., : self.vocab_size]

    def step_at(self, idx: torch.Tensor, cache: ModelCache, position: torch.Tensor) -> torch.Tensor:
        """forward_cached for one token per row, idx [B, 1], at `position`, a 0-d device tensor that the caller
        counts (cache.advance(1) after the step). Nothing in it depends on a value held by the host: shapes are
        those of the whole cache (attention masks the slots not yet seen), states are updated in place, so the
        step can be captured once as a CUDA graph and replayed for every token (GraphedStep)."""
        if not can_step_at(self.cfg):
            raise ValueError("step_at takes Gated DeltaNet and attention layers with dense MLPs (L, F); "
                             "decode this model with forward_cached")
        x, pending = self.embed(idx), None
        for block, layer_cache in zip(self.blocks, cache.layers):
            x, pending = block.step_at(x, pending, layer_cache, position)
        return self.lm_head(self.norm.add_and_norm(x, pending)[1])[..., : self.vocab_size]

    def aux_weight(self, key: str) -> float:
        weights = {"indexer_kl": self.cfg.dsa.aux_loss_weight, "moe_balance": self.cfg.moe.balance_loss_weight}
        return weights.get(key, 1.0)


def can_step_at(cfg: ModelConfig) -> bool:
    """Whether HybridLM.step_at, and so a CUDA graph of the decoding step, covers this model: Gated DeltaNet and
    attention layers (L, F) with dense MLPs. Sparse attention selects its keys by a top-k over a growing set and
    MoE routes by the data; those models decode step by step (forward_cached)."""
    return set(cfg.layer_types()) <= {"L", "F"} and cfg.moe.n_experts == 0


def pick_loss(loss: str, device_type: str) -> str:
    """train.loss -> the cross-entropy the model trains with: "plain" (logits in full, left to torch.compile to
    fuse), "chunked" (PyTorch, chunk by chunk) or "fused" (fused_loss.py: one Triton kernel per chunk, CUDA only).
    "auto" is fused on CUDA, where it is the fastest and the leanest of the three, and chunked elsewhere."""
    if loss == "auto":
        return "fused" if device_type == "cuda" else "chunked"
    if loss == "fused" and device_type != "cuda":
        warnings.warn("train.loss = 'fused' needs CUDA; using the chunked loss on this device", RuntimeWarning, stacklevel=2)
        return "chunked"
    return loss


def build_model(cfg: ModelConfig) -> HybridLM:
    return HybridLM(cfg)
