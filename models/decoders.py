"""The decoder: any causal language model that transformers' AutoModelForCausalLM builds (GPT-2, LLaMA and
SmolLM2, Qwen2/2.5/3, GPT-NeoX and Pythia, OPT, ...), loaded strictly and driven through the small interface
every such model offers: its input embeddings, its body (`base_model`, which takes `inputs_embeds` and a
key/value cache) and its output embeddings (the vocabulary projection).

A caption follows the prefix directly, with no BOS token: the prefix is the start of the sequence, in training
(captions are tokenized without special tokens) and in decoding alike. It ends with the tokenizer's
end-of-sequence token, which training appends; decoding also stops at the generation config's other stop ids.
"""
import functools
import inspect
from typing import Dict, List, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from models.checkpoint_io import CheckpointError

# Config fields of architectures that change the logits after the output embeddings (soft-capping, scaling):
# decoding and training here apply the output embeddings alone, so such a decoder is refused, not mis-scored.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def decoder_config(d: Dict, source="config") -> PretrainedConfig:
    """The decoder's config from its `to_dict()` (as exports record it). Exports of format 1 and 2 hold a GPT-2
    config, which names its model type too."""
    d = dict(d)
    model_type = d.pop("model_type", "gpt2")
    try:
        return AutoConfig.for_model(model_type, **d)
    except ValueError as e:
        raise CheckpointError(f"{source}: the decoder's model_type {model_type!r} is not one this version of "
                              f"transformers knows ({e})") from e


def check_architecture(config: PretrainedConfig, source) -> None:
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or getattr(config, "is_encoder_decoder", False):
        raise CheckpointError(f"decoder {source}: a {config.model_type!r} model is not a causal language model "
                              f"(AutoModelForCausalLM builds none from it); the decoder must be one, such as "
                              f"distilgpt2, SmolLM2, Qwen2.5, Pythia or OPT")
    for name in LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise CheckpointError(f"decoder {source}: a {config.model_type!r} model transforms its logits "
                                  f"({name}={getattr(config, name)}), which this captioner does not apply")


def build_decoder(config: PretrainedConfig) -> PreTrainedModel:
    """A decoder of `config`'s architecture, to be filled with weights (an export's)."""
    check_architecture(config, config.model_type)
    return AutoModelForCausalLM.from_config(config)


def load_decoder(source: str) -> PreTrainedModel:
    """The pretrained causal LM that `source` names (hub name or directory), every weight loaded, in float32 (the
    weights training updates; a bf16 checkpoint widens exactly). A model that is not a causal LM, or whose
    weights do not all load (transformers itself only warns), is an error naming it, never random weights."""
    check_architecture(AutoConfig.from_pretrained(source), source)
    model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True)
    model = model.float().eval()
    check_causal(model, source)
    # Tied output embeddings and non-persistent buffers are not reported: each model's loading expects them.
    problems = {kind: sorted(info[kind]) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(kind)}
    if problems:
        raise CheckpointError(f"decoder {source}: its weights do not all load ("
                              + "; ".join(f"{kind.replace('_', ' ')}: {keys[:5]}" for kind, keys in problems.items())
                              + "); nothing was trained on random weights")
    return model


def check_causal(decoder: PreTrainedModel, source) -> None:
    """A decoder's output at a position must not depend on later positions: a bidirectional model that
    AutoModelForCausalLM also builds (a BERT without `is_decoder`) is refused. Probed on 4 random embeddings."""
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 4, embedding_width(decoder), generator=generator)
    changed = embeds.clone()
    changed[:, -1] = torch.randn(embeds.shape[-1], generator=generator)  # another last position
    try:
        with torch.no_grad():
            before, after = (hidden_states(decoder, inputs_embeds=x) for x in (embeds, changed))
    except TypeError as e:
        raise CheckpointError(f"decoder {source}: it does not take input embeddings ({e}), which a prefix "
                              f"needs") from e
    if not torch.allclose(before[:, :-1], after[:, :-1], atol=1e-5):
        raise CheckpointError(f"decoder {source}: not a causal language model: its first positions change with "
                              f"a later one (bidirectional attention, as a BERT's)")


def embedding_width(decoder: PreTrainedModel) -> int:
    """The width of the decoder's input embeddings, which the mapper produces (OPT-350m's is below its hidden
    size)."""
    return decoder.get_input_embeddings().embedding_dim


def position_limit(config: PretrainedConfig) -> int:
    """Positions the decoder was trained over, learned (GPT-2, OPT) or rotary (LLaMA, Qwen2, GPT-NeoX): prefix
    plus caption stay within it. GPT-2's `n_positions` answers to this name too."""
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        raise CheckpointError(f"the decoder's config ({config.model_type}) gives no position limit "
                              f"(max_position_embeddings)")
    return int(limit)


def output_embeddings_key(decoder: PreTrainedModel) -> Optional[str]:
    """The state-dict key of the output embeddings when they are the input embeddings (tied), else None."""
    out = decoder.get_output_embeddings()
    if out is None or out.weight is not decoder.get_input_embeddings().weight:
        return None
    return next(f"{name}.weight" for name, module in decoder.named_modules() if module is out)


@functools.lru_cache(maxsize=None)  # once per body class: hidden_states runs at every decoding step
def _cache_keyword(body_class: type) -> str:
    # transformers renamed the bodies' `past_key_values` argument to `cache` (5.x); both take a Cache object.
    return "cache" if "cache" in inspect.signature(body_class.forward).parameters else "past_key_values"


def hidden_states(decoder: PreTrainedModel, input_ids: Optional[torch.Tensor] = None,
                  inputs_embeds: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
    """The body's last hidden states (B, T, C) for token ids or embeddings, after the positions in `cache`
    (updated in place) when one is given. Positions continue from the cache's length, rotary or learned."""
    body = decoder.base_model
    kwargs = {_cache_keyword(type(body)): cache, "use_cache": True} if cache is not None else {"use_cache": False}
    return body(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs).last_hidden_state


def caption_end_id(tokenizer, source) -> int:
    """The tokenizer's end-of-sequence id, which training appends to every caption."""
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"decoder {source}: its tokenizer has no end-of-sequence token, which ends every "
                              f"caption; give the tokenizer one (eos_token)")
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer, decoder: PreTrainedModel, source) -> List[int]:
    """The ids a caption ends at: the tokenizer's end-of-sequence token first (the one training appends), then
    the generation config's others (LLaMA 3 and Qwen chat models stop at several)."""
    generation = getattr(decoder, "generation_config", None)
    extra = getattr(generation, "eos_token_id", None) if generation is not None else None
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return list(dict.fromkeys([caption_end_id(tokenizer, source), *map(int, extra)]))
