"""Caption decoding from prefix embeddings: batched beam search, greedy decoding and nucleus sampling.

Every method runs the decoder over the prefix once per image, keeps its key/value cache, and then feeds one
token per sequence and step; an image whose sequences have all ended leaves the batch. Beam search and
sampling copy the prefix's cache to their `beam_size` / `num_samples` rows per image.

Why hand-written rather than transformers' `generate` (measured with bench_decode.py --with_generate; the
figures are in docs/benchmarks.md):
- beam search: `generate` repeats the prefix embeddings once per beam before its first forward pass, so the
  prefix runs `beam_size` times, and it copies the whole key/value cache twice per step (appending, then
  reordering the beams). Sharing the prefix, appending in place and reordering only the generated positions is
  faster on a batch; on one image both are bound by reading the weights at every step.
  It also keeps the original ClipCap scoring (mean log-probability per token, finished beams stay among the
  beams), which `generate`'s length penalty does not reproduce, and drops images whose beams have all ended.
- nucleus sampling: `generate` draws from one global random stream, so a caption depends on the other images
  in its batch; here each image's draws come from its own seed (`sampling_noise`), and the prefix runs once per
  image instead of once per returned sequence.
- greedy: as fast as `generate(do_sample=False)` and with the same output (tests check it). It shares the
  sampling loop, which scores each caption as it goes and drops finished images, where `generate` would keep
  every step's logits (`output_scores`: a (captions, vocabulary) tensor per step) to give the same scores.

Sequences end at any of `eos_token_ids` (the stop token is kept in the sequence); an empty list never stops.
Scores are mean log-probabilities per token, stop token included, under the untempered model.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from models.choices import (DECODINGS, DEFAULT_BEAM_SIZE, DEFAULT_MAX_LENGTH, DEFAULT_TOP_P,  # noqa: F401 (re-exported)
                            MAX_TEMPERATURE, MIN_TEMPERATURE)
from models.decoders import hidden_states, position_limit
from models.kv_cache import append_in_place, new_cache, reorder_beams


def check_temperature(temperature: float) -> None:
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:  # also refuses nan
        raise ValueError(f"temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {temperature}; "
                         f"greedy decoding is the limit of a small temperature")


@dataclass
class DecodingOptions:
    decoding: str = "beam"  # "beam" | "greedy" | "nucleus"
    beam_size: int = DEFAULT_BEAM_SIZE
    max_length: int = DEFAULT_MAX_LENGTH
    top_p: float = DEFAULT_TOP_P  # nucleus: probability mass sampled from
    temperature: float = 1.0  # nucleus and beam (as the original's beam search): logits are divided by it
    num_captions: int = 1  # nucleus: samples per image; beam: best beams returned by `caption`
    seed: Optional[int] = None  # nucleus: reproducible samples, whatever the batch

    def __post_init__(self):
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {self.decoding!r}")
        for name in ("beam_size", "max_length", "num_captions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.decoding == "beam" and self.num_captions > self.beam_size:
            raise ValueError(f"num_captions {self.num_captions} exceeds beam_size {self.beam_size}: beam search "
                             f"returns at most one caption per beam")
        if self.decoding == "greedy" and self.num_captions > 1:
            raise ValueError("greedy decoding gives one caption per image; use nucleus sampling for several")
        if not 0.0 < self.top_p <= 1.0:  # also refuses nan
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        check_temperature(self.temperature)


@dataclass
class Decoded:
    tokens: torch.Tensor  # (B, N, L) token ids; positions at and after `lengths` hold padding
    lengths: torch.Tensor  # (B, N) tokens per sequence, stop token included
    scores: torch.Tensor  # (B, N) mean log-probability per token (float32)

    def sequences(self) -> List[List[List[int]]]:
        """Token ids per image and sequence, each cut at its length."""
        tokens, lengths = self.tokens.tolist(), self.lengths.tolist()
        return [[seq[:n] for seq, n in zip(rows, ns)] for rows, ns in zip(tokens, lengths)]


def check_lengths(gpt: PreTrainedModel, prefix_length: int, max_length: int) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    limit = position_limit(gpt.config)
    if prefix_length + max_length > limit:
        raise ValueError(f"prefix length {prefix_length} + max_length {max_length} exceeds the decoder's "
                         f"{limit} positions; lower max_length")


def prefill(gpt: PreTrainedModel, prefix_embeds: torch.Tensor) -> Tuple[DynamicCache, torch.Tensor]:
    """Run the decoder over the prefixes (B, P, C) once: the filled cache and the next-token logits (B, V).
    The vocabulary projection runs on the last position only."""
    cache = new_cache(gpt)
    hidden = hidden_states(gpt, inputs_embeds=prefix_embeds, cache=cache)
    return cache, gpt.get_output_embeddings()(hidden[:, -1]).float()


def next_logits(gpt: PreTrainedModel, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Feed one token per row (R,) after the cached positions; next-token logits (R, V) in float32."""
    hidden = hidden_states(gpt, input_ids=tokens[:, None], cache=cache)
    return gpt.get_output_embeddings()(hidden[:, -1]).float()


def _eos_tensor(eos_token_ids: Sequence[int], device) -> Tuple[torch.Tensor, int]:
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    return eos, (int(eos_token_ids[0]) if len(eos_token_ids) else 0)


@torch.no_grad()
def beam_search(gpt: PreTrainedModel, prefix_embeds: torch.Tensor, eos_token_ids: Sequence[int],
                beam_size: int = DEFAULT_BEAM_SIZE, max_length: int = DEFAULT_MAX_LENGTH,
                temperature: float = 1.0) -> Decoded:
    """Batched beam search with the original ClipCap scoring, `beam_size` sequences per image, best first.

    As the original `generate_beam`, beams compete on their mean log-probability per token (of the logits
    divided by `temperature`), and a finished beam stays among the beams with its score frozen until every
    beam of its image has finished. Each image's beams only ever take candidates from that image, so a batch
    gives the same captions as one image at a time.
    """
    batch, vocab = prefix_embeds.shape[0], gpt.get_output_embeddings().out_features
    if not 1 <= beam_size <= vocab:
        raise ValueError(f"beam_size must be between 1 and the vocabulary size {vocab}, got {beam_size}")
    check_temperature(temperature)
    check_lengths(gpt, prefix_embeds.shape[1], max_length)
    device, k = prefix_embeds.device, beam_size
    eos, pad = _eos_tensor(eos_token_ids, device)
    cache, logits = prefill(gpt, prefix_embeds)
    if temperature != 1.0:
        logits = logits / temperature
    scores, first = logits.log_softmax(-1).topk(k, dim=-1)  # (B, K) summed log-probabilities
    tokens = torch.full((batch, k, max_length), pad, dtype=torch.long, device=device)
    tokens[:, :, 0] = first
    lengths = torch.ones(batch, k, dtype=torch.long, device=device)
    stopped = torch.isin(first, eos)
    cache.batch_repeat_interleave(k)  # rows b * K + j: the prefix is computed once and shared by the beams
    append_in_place(cache)
    frozen = torch.full((k,), float("-inf"), device=device)
    frozen[0] = 0.0  # a finished beam's only continuation: padding, at no cost
    out = _Finished(tokens, lengths, scores)
    active = torch.arange(batch, device=device)
    for t in range(1, max_length):
        active, (tokens, lengths, scores, stopped) = out.retire(active, stopped, cache, k,
                                                                 (tokens, lengths, scores, stopped))
        if active.numel() == 0:
            break
        n = active.numel()
        logits = next_logits(gpt, tokens[:, :, t - 1].reshape(-1), cache)  # (n * K, V)
        if temperature != 1.0:
            logits = logits / temperature
        # The best K continuations of a beam hold all of its candidates for the image's top K, because
        # within one beam the score and length are shared: no need to add scores over the whole vocabulary.
        top_logits, top_tokens = logits.topk(k, dim=-1)
        top_logp = (top_logits - logits.logsumexp(-1, keepdim=True)).view(n, k, k)
        done = stopped[..., None]
        top_logp = torch.where(done, frozen, top_logp)
        top_tokens = torch.where(done, pad, top_tokens.view(n, k, k))
        grown = lengths + (~stopped).long()
        mean = (scores[..., None] + top_logp) / grown[..., None]  # (n, K, K) mean log-probability
        best, index = mean.view(n, -1).topk(k, dim=-1)
        source = index // k  # (n, K) beam each new beam continues
        lengths = grown.gather(1, source)
        scores = best * lengths
        new = top_tokens.view(n, -1).gather(1, index)
        tokens = tokens.gather(1, source[..., None].expand_as(tokens))
        tokens[:, :, t] = new
        stopped = stopped.gather(1, source) | torch.isin(new, eos)
        offsets = torch.arange(n, device=device)[:, None] * k
        reorder_beams(cache, (source + offsets).view(-1), prefix_embeds.shape[1])
    out.store(active, tokens, lengths, scores)
    return out.result(sort=True)


class _Finished:
    """Results per image, filled in as images finish: their rows then leave the batch and the cache, so
    long captions of some images do not keep the decoder busy for the finished others."""

    def __init__(self, tokens: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor):
        self.tokens, self.lengths, self.scores = tokens.clone(), lengths.clone(), scores.clone()

    def store(self, images: torch.Tensor, tokens, lengths, scores) -> None:
        self.tokens[images], self.lengths[images], self.scores[images] = tokens, lengths, scores

    def retire(self, active, stopped, cache, rows_per_image: int, state):
        finished = stopped.all(dim=1)
        if not finished.any():
            return active, state
        self.store(active[finished], *(x[finished] for x in state[:3]))
        keep = (~finished).nonzero().squeeze(1)
        if keep.numel():
            rows = (keep[:, None] * rows_per_image + torch.arange(rows_per_image, device=keep.device)).view(-1)
            cache.batch_select_indices(rows)
        return active[keep], tuple(x[keep] for x in state)

    def result(self, sort: bool) -> Decoded:
        mean = self.scores / self.lengths
        if not sort:
            return Decoded(self.tokens, self.lengths, mean)
        order = mean.argsort(dim=1, descending=True, stable=True)
        tokens = self.tokens.gather(1, order[..., None].expand_as(self.tokens))
        return Decoded(tokens, self.lengths.gather(1, order), mean.gather(1, order))


def nucleus_pick(logits: torch.Tensor, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row from the smallest set of most probable tokens whose probability reaches `top_p`
    (at least one token; the same set as transformers' TopPLogitsWarper), drawn by inverse transform
    sampling with `uniform` (R,) in [0, 1): a fixed uniform gives a fixed token whatever the batch."""
    probs = logits.softmax(dim=-1)
    if top_p >= 1.0:
        return _inverse_cdf(probs, uniform, probs.shape[-1])
    # Sorting the whole vocabulary at every step is slow on a CPU; the nucleus almost always lies within the few
    # most probable tokens, so look there first and widen only when needed.
    k = min(64, probs.shape[-1])
    while True:
        top_probs, top_tokens = probs.topk(k, dim=-1)  # (R, k), descending
        if k == probs.shape[-1] or bool((top_probs.sum(dim=-1) >= top_p).all()):
            break  # every nucleus lies within these k tokens
        k = min(8 * k, probs.shape[-1])
    keep = (top_probs.cumsum(dim=-1) - top_probs) < top_p  # the mass before a token is still short of top_p
    keep[:, 0] = True
    index = _inverse_cdf(top_probs * keep, uniform, keep.sum(dim=-1, keepdim=True))
    return top_tokens.gather(1, index[:, None]).squeeze(1)


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor, count) -> torch.Tensor:
    """Index of the first of `count` leading columns whose cumulative weight exceeds uniform * total."""
    cdf = weights.cumsum(dim=-1)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True)
    limit = count - 1 if torch.is_tensor(count) else torch.full_like(index, count - 1)
    return torch.minimum(index, limit).squeeze(1)  # float rounding at the top never leaves the kept tokens


def sampling_noise(seed: Union[int, Sequence[int]], image_indices: Sequence[int], num_samples: int,
                   max_length: int) -> torch.Tensor:
    """Uniforms (B, N, max_length) for `sample`, a function of (seed, image index, sample index) only: the
    same seed gives the same captions for an image whatever else shares its batch. A seed may be several
    numbers (CIDEr optimisation draws with (run seed, step))."""
    entropy = [int(s) for s in np.atleast_1d(seed)]
    rows = [np.random.default_rng([*entropy, int(i), j]).random(max_length)
            for i in image_indices for j in range(num_samples)]
    return torch.from_numpy(np.stack(rows)).view(len(image_indices), num_samples, max_length)


@torch.no_grad()
def sample(gpt: PreTrainedModel, prefix_embeds: torch.Tensor, eos_token_ids: Sequence[int],
           num_samples: int = 1, top_p: float = DEFAULT_TOP_P, temperature: float = 1.0,
           max_length: int = DEFAULT_MAX_LENGTH, noise: Optional[torch.Tensor] = None) -> Decoded:
    """Nucleus sampling: `num_samples` captions per image, each token drawn from the tempered distribution
    restricted to its top-`top_p` nucleus. `noise` (B, N, max_length) uniforms in [0, 1) make it
    reproducible (see `sampling_noise`); without it, torch's global generator draws them."""
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    check_temperature(temperature)
    batch = prefix_embeds.shape[0]
    if noise is None:
        noise = torch.rand(batch, num_samples, max_length)
    if tuple(noise.shape) != (batch, num_samples, max_length):
        raise ValueError(f"noise must have shape {(batch, num_samples, max_length)}, got {tuple(noise.shape)}")
    noise = noise.to(prefix_embeds.device).reshape(batch * num_samples, max_length)

    def pick(logits, rows, t):
        return nucleus_pick(logits / temperature, top_p, noise[rows, t])
    return _decode_loop(gpt, prefix_embeds, eos_token_ids, num_samples, max_length, pick)


@torch.no_grad()
def greedy(gpt: PreTrainedModel, prefix_embeds: torch.Tensor, eos_token_ids: Sequence[int],
           max_length: int = 67) -> Decoded:
    """The most probable next token at every step, one caption per image."""
    return _decode_loop(gpt, prefix_embeds, eos_token_ids, 1, max_length,
                        lambda logits, rows, t: logits.argmax(dim=-1))


def _decode_loop(gpt: PreTrainedModel, prefix_embeds: torch.Tensor, eos_token_ids: Sequence[int],
                 rows_per_image: int, max_length: int,
                 pick: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> Decoded:
    """Sequences drawn token by token by `pick(logits (R, V), row ids (R,), step)`, rows_per_image per image."""
    check_lengths(gpt, prefix_embeds.shape[1], max_length)
    batch, n, device = prefix_embeds.shape[0], rows_per_image, prefix_embeds.device
    eos, pad = _eos_tensor(eos_token_ids, device)
    cache, logits = prefill(gpt, prefix_embeds)
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
    tokens = torch.full((batch, n, max_length), pad, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, n, dtype=torch.long, device=device)
    scores = torch.zeros(batch, n, device=device)
    stopped = torch.zeros(batch, n, dtype=torch.bool, device=device)
    out = _Finished(tokens, lengths, scores)
    active = torch.arange(batch, device=device)
    for t in range(max_length):
        if t > 0:
            logits = next_logits(gpt, tokens[:, :, t - 1].reshape(-1), cache)
        rows = (active[:, None] * n + torch.arange(n, device=device)).view(-1)  # ids of the rows in the batch
        new = pick(logits, rows, t).view(-1, n)
        logp = logits.log_softmax(dim=-1).gather(1, new.view(-1, 1)).view(-1, n)
        live = ~stopped
        tokens[:, :, t] = torch.where(live, new, pad)
        scores = scores + torch.where(live, logp, 0.0)
        lengths = lengths + live.long()
        stopped = stopped | torch.isin(new, eos)
        active, (tokens, lengths, scores, stopped) = out.retire(active, stopped, cache, n,
                                                                (tokens, lengths, scores, stopped))
        if active.numel() == 0:
            break
    out.store(active, tokens, lengths, scores)
    return out.result(sort=False)


def decode(gpt: PreTrainedModel, prefix_embeds: torch.Tensor, eos_token_ids: Sequence[int],
           options: DecodingOptions, image_indices: Optional[Sequence[int]] = None) -> Decoded:
    """Decode with `options`; `image_indices` (default 0..B-1) number the images for seeded sampling."""
    if options.decoding == "beam":
        return beam_search(gpt, prefix_embeds, eos_token_ids, options.beam_size, options.max_length,
                           options.temperature)
    if options.decoding == "greedy":
        return greedy(gpt, prefix_embeds, eos_token_ids, options.max_length)
    noise = None
    if options.seed is not None:
        indices = range(prefix_embeds.shape[0]) if image_indices is None else image_indices
        noise = sampling_noise(options.seed, indices, options.num_captions, options.max_length)
    return sample(gpt, prefix_embeds, eos_token_ids, options.num_captions, options.top_p, options.temperature,
                  options.max_length, noise)
