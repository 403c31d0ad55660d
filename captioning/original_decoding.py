"""The original ClipCap `generate_beam`, the baseline of benchmarks/bench_decode.py and the reference of the tests.

One image at a time, and at every step the decoder runs over the whole prefix and every token generated so far,
once per beam, with no key/value cache. Changes from the original, none of which alter its results: stop
tokens are a list of ids instead of one string, tokens are returned instead of decoded text, the decoder is any
causal LM (its input embeddings stand for GPT-2's `wte`), and the squeezes that broke `beam_size=1` keep the
beam dimension.
"""
from typing import List, Sequence, Tuple

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def original_beam_search(gpt: PreTrainedModel, embed: torch.Tensor, stop_token_ids: Sequence[int],
                         beam_size: int = 5, entry_length: int = 67,
                         temperature: float = 1.0) -> Tuple[List[List[int]], List[float]]:
    """`embed` (1, P, C) prefix embeddings -> (token lists best first, mean log-probability per token)."""
    stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=embed.device)
    tokens = scores = None
    seq_lengths = torch.ones(beam_size, device=embed.device)
    is_stopped = torch.zeros(beam_size, device=embed.device, dtype=torch.bool)
    generated = embed
    for _ in range(entry_length):
        logits = gpt(inputs_embeds=generated).logits
        logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
        logits = logits.softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = -float("inf")
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            scores_sum_average = scores_sum / seq_lengths[:, None]
            scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
            next_tokens_source = next_tokens // scores_sum.shape[1]
            seq_lengths = seq_lengths[next_tokens_source]
            next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[next_tokens_source], next_tokens), dim=1)
            generated = generated[next_tokens_source]
            scores = scores_sum_average * seq_lengths
            is_stopped = is_stopped[next_tokens_source]
        next_token_embed = gpt.get_input_embeddings()(next_tokens.view(-1)).view(generated.shape[0], 1, -1)
        generated = torch.cat((generated, next_token_embed), dim=1)
        is_stopped = is_stopped | torch.isin(next_tokens.view(-1), stop)
        if is_stopped.all():
            break
    scores = scores / seq_lengths
    order = scores.argsort(descending=True)
    sequences = [tokens[i, :int(seq_lengths[i])].tolist() for i in order]
    return sequences, scores[order].tolist()
