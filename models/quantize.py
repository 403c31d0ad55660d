"""int8 weights for captioning on a CPU: every linear layer of a module (the decoder's, the mapper's) becomes torch's
dynamically quantized linear layer, int8 weights with a scale per output channel, its input quantized to int8 at
each call. Decoding one image is bound by reading the decoder's weights at every step, and int8 weights are a
quarter of fp32's bytes; the products run in fbgemm's int8 kernels (x86) or qnnpack's (ARM).

The output embeddings (the vocabulary projection, the largest product of a step) are a linear layer too and are
quantized; where they are tied to the input embeddings, the quantized copy is the output's own and the input
lookup keeps the fp32 table. GPT-2's `Conv1D` layers become `nn.Linear` first: the same product with the weight
stored transposed, which `quantize_dynamic` does not know.

Dynamic quantization through `torch.ao.quantization` measured faster than torchao's int8 weight-only and dynamic
configurations on AVX2 and AVX-512 CPUs (benchmarks/bench_decode.py, docs/benchmarks.md).
"""
import warnings

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as quantized_dynamic
from transformers.pytorch_utils import Conv1D

# torch.ao.quantization announces its move to torchao; it is kept because it measured faster (see above), and
# its warnings would otherwise reach every user of --quantize int8.
DEPRECATION_NOTICES = (r"torch\.ao\.quantization is deprecated", r"torch\.quantize_per_tensor, torch\.quantize_per")


def conv1d_to_linear(module: nn.Module) -> int:
    """Replace each GPT-2 `Conv1D` inside `module` by the `nn.Linear` computing the same product (Conv1D keeps
    its weight as (in, out), Linear as (out, in)); returns how many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(*child.weight.shape, device="meta")  # no random initialisation to discard
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
                linear.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


def quantize_int8(module: nn.Module) -> nn.Module:
    """`module` (fp32, for inference) with every linear layer as an int8 dynamically quantized one, in place."""
    conv1d_to_linear(module)
    wrong = {p.dtype for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters()} - {torch.float32}
    if wrong:
        raise ValueError(f"int8 quantization starts from fp32 linear layers, found {sorted(map(str, wrong))}")
    with warnings.catch_warnings():
        for notice in DEPRECATION_NOTICES:
            warnings.filterwarnings("ignore", message=notice)
        torch.ao.quantization.quantize_dynamic(
            module, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8,
            inplace=True)
    return module


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, quantized_dynamic.Linear) for m in module.modules())


def weight_count(module: nn.Module) -> int:
    """Parameters, as before quantization: the int8 weights of quantized linear layers (which are not parameters)
    count too, except a decoder's output embeddings where its config ties them to the input embeddings."""
    count = sum(p.numel() for p in module.parameters())
    tied = getattr(getattr(module, "config", None), "tie_word_embeddings", False)
    output = module.get_output_embeddings() if tied and hasattr(module, "get_output_embeddings") else None
    for m in module.modules():
        if isinstance(m, quantized_dynamic.Linear) and m is not output:
            bias = m.bias()
            count += m.weight().numel() + (bias.numel() if bias is not None else 0)
    return count
