"""What a HybridLM keeps between decoding steps: one small object per layer, and the model's list of them.

    L (Gated DeltaNet)     DeltaNetState: the last conv_size - 1 inputs of the short convolution (q, k, v before
                           it) and the recurrent state S [B, H, K, V] in fp32; neither grows with the context.
    F (attention)          KVCache: keys (after RoPE) and values of every earlier position, or of the last
                           `window` positions for a windowed layer (a ring buffer: slot = position % window).
    D (sparse attention)   KVCache with index_keys: the lightning indexer's keys as well.

Buffers are allocated once, at the first tokens a layer sees, for every position the cache may ever hold
(`capacity`), and written in place: a decoding step copies one row per layer, never the whole cache.

A batch of prompts of different lengths is left-padded: `pad` [B] holds each row's padding. Attention never lets a
real query see a pad key (a pad query sees itself alone, so no row of the softmax is empty), and Gated DeltaNet
leaves its state unchanged over pads (beta = 0, no decay, zero convolution input), so each row computes what it
would alone. Positions count the padding: RoPE depends only on the distance between query and key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerCache:
    pad: Tensor | None = None  # [B] left padding of each row; None: no row is padded
    max_pad: int = 0  # the longest padding, kept on the host (reading it from the device would wait for it)
    length: int = 0  # positions seen so far (padding included)

    def real_tokens(self, T: int, device) -> Tensor | None:
        """[B, T] True at the real (not pad) tokens among the next T positions; None when all are real."""
        if self.pad is None or self.length >= self.max_pad:
            return None
        positions = torch.arange(self.length, self.length + T, device=device)
        return positions[None, :] >= self.pad[:, None].to(device)

    def tensors(self) -> list[Tensor]:
        return []


@dataclass
class DeltaNetState(LayerCache):
    conv: Tensor | None = None  # [B, conv_size - 1, channels]: the convolution's inputs of the last positions
    recurrent: Tensor | None = None  # [B, H, K, V] fp32

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.conv, self.recurrent) if t is not None]


@dataclass
class KVCache(LayerCache):
    capacity: int = 0  # the most positions this cache will see
    window: int = 0  # 0: every earlier key; N: the last N (a ring of N slots)
    keys: Tensor | None = None  # [B, slots, H, D], after RoPE
    values: Tensor | None = None  # [B, slots, H, D]
    index_keys: Tensor | None = None  # [B, slots, Di]: the sparse layer's indexer keys

    @property
    def slots(self) -> int:
        return min(self.window, self.capacity) if self.window else self.capacity

    @property
    def ring(self) -> bool:
        return bool(self.window) and self.window < self.capacity

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.keys, self.values, self.index_keys) if t is not None]

    def append(self, k: Tensor, v: Tensor, index_k: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store the keys of the next T positions (k, v: [B, T, H, D]; index_k: [B, T, Di]) and return every key
        the queries of those positions may see: [B, H, S, D] (index keys [B, S, Di]); `key_positions` says where
        each one stands and `visible` which query sees which."""
        B, T = k.shape[:2]
        start, end = self.length, self.length + T
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {end} were asked for")
        if self.keys is None:
            self.keys = k.new_empty(B, self.slots, *k.shape[2:])
            self.values = v.new_empty(B, self.slots, *v.shape[2:])
            if index_k is not None:
                self.index_keys = index_k.new_empty(B, self.slots, index_k.shape[-1])
        stored = [t for t in (self.keys, self.values, self.index_keys) if t is not None]
        new = [t for t in (k, v, index_k) if t is not None]
        if not self.ring:  # slot = position
            for buffer, part in zip(stored, new):
                buffer[:, start:end] = part
            seen = [buffer[:, :end] for buffer in stored]
        elif T == 1:  # a decoding step: write its slot, attend to every filled slot (the ring holds the window)
            for buffer, part in zip(stored, new):
                buffer[:, start % self.window] = part[:, 0]
            seen = [buffer[:, :min(end, self.window)] for buffer in stored]
        else:  # several positions: the ring's keys in position order, then the new ones
            kept = min(start, self.window)
            shift = -(start % self.window) if start > self.window else 0
            seen = [torch.cat([buffer[:, :kept].roll(shift, 1), part], 1) for buffer, part in zip(stored, new)]
            last = min(T, self.window)
            slots = torch.arange(end - last, end, device=k.device) % self.window
            for buffer, part in zip(stored, new):
                buffer[:, slots] = part[:, T - last:]
        self.length = end
        return seen[0].transpose(1, 2), seen[1].transpose(1, 2), (seen[2] if index_k is not None else None)

    def write_at(self, k: Tensor, v: Tensor, position: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One decoding step at `position` (a 0-d device tensor), with shapes and indices that do not change from
        step to step, as a CUDA graph needs: store k, v [B, 1, H, D] in the position's slot and return the keys
        and values of every slot [B, H, slots, D] with which of them the query sees [B or 1, 1, 1, slots]. The
        host's `length` is left to the caller (ModelCache.advance)."""
        if self.keys is None:
            raise ValueError("a fixed-shape step continues a cache that a prompt has filled")
        slot = (position % self.window if self.ring else position).reshape(1)
        self.keys.index_copy_(1, slot, k)
        self.values.index_copy_(1, slot, v)
        slots = torch.arange(self.slots, device=k.device)
        # the position each slot holds: slot itself, or in a ring the latest position <= `position` on that slot
        held = position - (position - slots) % self.window if self.ring else slots
        visible = ((held <= position) & (held >= 0))[None]
        if self.pad is not None:
            visible = visible & (held[None] >= self.pad.to(k.device)[:, None])
        return self.keys.transpose(1, 2), self.values.transpose(1, 2), visible[:, None, None]

    def key_positions(self, T: int, S: int, device) -> Tensor:
        """Positions [S] of the keys the last `append` (of T positions) returned."""
        if self.ring and T == 1:
            start = self.length - 1
            return start - (start - torch.arange(S, device=device)) % self.window
        return torch.arange(self.length - S, self.length, device=device)

    def visible(self, T: int, S: int, device) -> Tensor | None:
        """Boolean [B or 1, T, S]: True where the query at each of the last T positions may see each of the S keys
        `append` returned (causal, within the window, not padding); None when every query sees every key (a
        decoding step without padding among its keys)."""
        pads = self.length - S < self.max_pad  # the oldest key is at length - S
        if T == 1 and not pads:
            return None
        keys = self.key_positions(T, S, device)[None, :]
        queries = torch.arange(self.length - T, self.length, device=device)[:, None]
        allowed = keys <= queries
        if self.window:
            allowed = allowed & (keys > queries - self.window)
        if pads:  # pad keys are hidden from real queries; a pad query sees itself alone
            real_key = keys[None] >= self.pad.to(device)[:, None, None]
            return allowed[None] & (real_key | (keys == queries)[None])
        return allowed[None]


@dataclass
class ModelCache:
    layers: list[LayerCache]
    capacity: int
    length: int = 0
    pad: Tensor | None = None

    def nbytes(self) -> int:
        """Bytes held by every cache and state tensor of every layer."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def advance(self, positions: int) -> None:
        """Count `positions` more as seen, after steps that took their position from a device tensor."""
        self.length += positions
        for layer in self.layers:
            layer.length += positions


def new_cache(layer_kinds: list[str], capacity: int, window: int = 0, pad: Tensor | None = None) -> ModelCache:
    """An empty cache for layers of these kinds (L, F, D), room for `capacity` positions; `pad` [B] is each row's
    left padding (None: none). Buffers are allocated by the layers, at their first tokens."""
    max_pad = 0 if pad is None else int(pad.max())
    pad = pad if max_pad else None
    layers: list[LayerCache] = [
        DeltaNetState(pad=pad, max_pad=max_pad) if kind == "L"
        else KVCache(pad=pad, max_pad=max_pad, capacity=capacity, window=window) for kind in layer_kinds]
    return ModelCache(layers, capacity, pad=pad)
