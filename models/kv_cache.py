"""The key/value cache of decoding: transformers' DynamicCache, with one small adapter for beam search.

The adapter appends new positions into a buffer with room to spare instead of concatenating (a copy of the whole
cache at every step), and reorders beams by copying only the generated positions (the prefix is the same in all
beams of an image): measured by benchmarks/bench_decode.py, figures in docs/benchmarks.md. It patches a layer
only when the layer is exactly transformers' `DynamicLayer` holding its keys and values as tensors of shape
(rows, heads, positions, head size), the layout it was written for; any other cache (an older transformers,
sliding-window or quantized layers) goes through the public Cache API: `update` by concatenation and
`reorder_cache`.
"""
import functools
import inspect
from typing import List, Optional

import torch
from transformers import DynamicCache

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers before 4.56 kept the cache as lists of tensors: the public API serves
    DynamicLayer = None

CACHE_TAKES_CONFIG = "config" in inspect.signature(DynamicCache.__init__).parameters
GROWTH = 16  # positions a cache buffer grows by: one copy of the cache per 16 steps instead of one per step


def new_cache(decoder) -> DynamicCache:
    """An empty cache for `decoder`, with the layer kinds its config asks for (sliding windows) where the
    installed transformers takes the config."""
    return DynamicCache(config=decoder.config) if CACHE_TAKES_CONFIG else DynamicCache()


def patchable_layers(cache) -> Optional[List]:
    """The cache's layers when every one has the layout the adapter was written for, else None."""
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or not layers:
        return None
    if not all(type(layer) is DynamicLayer and isinstance(getattr(layer, "keys", None), torch.Tensor)
               and layer.keys.dim() == 4 for layer in layers):
        return None
    return layers


def append_in_place(cache) -> bool:
    """Make each layer of a filled `cache` append into a buffer. The layers' `keys` / `values` stay tensors of the
    cached length, views of the buffer, so every other cache method works as before; one that replaces them
    (selecting rows) leads to a new buffer at the next append. Returns whether the cache was patched."""
    layers = patchable_layers(cache)
    for layer in layers or []:
        layer.update = functools.partial(_append_into_buffer, layer)
    return layers is not None


def _append_into_buffer(layer, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
    keys, values = layer.keys, layer.values  # (rows, heads, positions, head size)
    n, add = keys.shape[-2], key_states.shape[-2]
    buffers = getattr(layer, "_kv_buffers", None)
    if buffers is None or buffers[0].shape[-2] < n + add or keys.data_ptr() != buffers[0].data_ptr() or \
            keys.shape[:2] != buffers[0].shape[:2]:
        size = n + add + GROWTH
        buffers = tuple(t.new_empty(*t.shape[:2], size, t.shape[-1]) for t in (keys, values))
        buffers[0][:, :, :n], buffers[1][:, :, :n] = keys, values
        layer._kv_buffers = buffers
    buffers[0][:, :, n:n + add], buffers[1][:, :, n:n + add] = key_states, value_states
    layer.keys, layer.values = buffers[0][:, :, :n + add], buffers[1][:, :, :n + add]
    return layer.keys, layer.values


def reorder_beams(cache, rows: torch.Tensor, shared: int) -> None:
    """`cache.reorder_cache(rows)` where rows move only among the beams of one image: the first `shared`
    positions (the image's prefix) are the same in all of them, so only the generated positions are copied."""
    layers = patchable_layers(cache)
    if layers is None:
        cache.reorder_cache(rows)
        return
    for layer in layers:
        for tensor in (layer.keys, layer.values):  # (rows, heads, positions, head size)
            tensor[:, :, shared:] = tensor[:, :, shared:].index_select(0, rows)
