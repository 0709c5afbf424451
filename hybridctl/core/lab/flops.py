"""The FLOPs model behind MFU.

Speed counts model FLOPs per token, for a sequence of T tokens (d = d_model, V_pad = embedding rows):
  forward = 2 * N_matmul                    every Linear weight inside the blocks (a multiply-add per
                                            weight per token); MoE layers count top_k / n_experts of theirs
          + 2 * V_pad * d                   the output head (tied to the embedding, still a matmul)
          + per F layer: 4 * d * k(T)       QK^T and AV over k(T) keys per query; causal attention counts only the
                                            keys a query sees, k(T) = (T + 1) / 2, or with a window W < T,
                                            k(T) = (W (W + 1) / 2 + (T - W) W) / T; this is half of the
                                            convention that counts all T keys
          + per D layer: 4 * d * min(topk, k(T)) + 2 * indexer_heads * indexer_dim * k(T)   (an estimate)
          + per L layer, Gated DeltaNet in chunks of C (H heads, key dim K, value dim Vh), per chunk and head:
                6 C^2 K + 4 C^2 Vh + 6 C K Vh   (K K^T, the two WY products, Q K^T, the intra-chunk A V,
                                                 W S, Q S and the state update K^T V)
              + 2 C^3 / 3                        (the unit-triangular solve, C^3 / 3 multiply-adds)
            divided by C tokens, with T padded up to whole chunks
  train   = 3 * forward                     (backward = 2 * forward; no recomputation counted)
MFU = tok/s * FLOPs per token / the GPU's dense bf16 peak. Norms, activations, rotary embedding, gates, the
Gated DeltaNet short convolution (4 multiply-adds per channel) and the loss are elementwise work and not counted.
"""

from __future__ import annotations

import math
import torch.nn as nn

from hybridctl.core.config import ModelConfig
from hybridctl.core.model.hybrid_lm import HybridLM, uses_moe


# Dense bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name (first match wins).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def peak_bf16_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def keys_per_query(seq_len: int, window: int = 0) -> float:
    """Mean number of keys a causal query attends to (itself included)."""
    T = seq_len
    if window and window < T:
        return (window * (window + 1) / 2 + (T - window) * window) / T
    return (T + 1) / 2


def gdn_flops_per_token(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    """Forward FLOPs of one Gated DeltaNet layer's chunked recurrence per token: (matmuls, triangular solve)."""
    g = cfg.gdn
    C, K, V, H = g.chunk_size, g.head_dim, int(g.head_dim * g.expand_v), g.num_heads
    chunks_per_token = math.ceil(seq_len / C) / seq_len
    matmuls = H * (6 * C * C * K + 4 * C * C * V + 6 * C * K * V) * chunks_per_token
    solve = H * (2 * C**3 / 3) * chunks_per_token
    return matmuls, solve


def matmul_params(model: HybridLM) -> float:
    """Weights of every Linear in the blocks; MoE layers count only the share each token uses."""
    total = 0.0
    for layer, block in enumerate(model.blocks):
        for part in (block.mixer, block.mlp):
            n = sum(m.weight.numel() for m in part.modules() if isinstance(m, nn.Linear))
            if part is block.mlp and uses_moe(layer, model.cfg):
                n *= model.cfg.moe.top_k / model.cfg.moe.n_experts
            total += n
    return total


def flops_per_token(model: HybridLM, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by part, their sum `forward`, and `train` = 3 * forward."""
    cfg = model.cfg
    d, keys = cfg.d_model, keys_per_query(seq_len, cfg.attention.window)
    kinds = cfg.layer_types()
    gdn, solve = gdn_flops_per_token(cfg, seq_len)
    parts = {
        "dense": 2 * matmul_params(model),
        "head": 2 * model.lm_head.weight.numel(),
        "attention": kinds.count("F") * 4 * d * keys,
        "sparse_attention": kinds.count("D") * (4 * d * min(cfg.dsa.topk, keys) + 2 * cfg.dsa.indexer_heads * cfg.dsa.indexer_dim * keys),
        "gdn": kinds.count("L") * gdn,
        "gdn_solve": kinds.count("L") * solve,
    }
    forward = sum(parts.values())
    return {**parts, "forward": forward, "train": 3 * forward}
