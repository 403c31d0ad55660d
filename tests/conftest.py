"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny GPT-2, saved to disk and loaded back through
the same `from_pretrained` paths users take with `distilgpt2`. Nothing is downloaded."""
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests run the fp32 path of `--precision auto` on every CPU, as on an AVX2 laptop, so that their figures do not
# depend on the machine: with oneDNN capped below bf16, captioning/runtime.py finds no native bf16 (here and in
# the subprocesses the tests start). tests/test_runtime.py patches the capability checks to test the rule itself.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
# Caption-token caches of the tests' runs go to a directory of their own, not the user's cache.
os.environ["TINYTINY_CACHE"] = tempfile.mkdtemp(prefix="tinytiny-test-cache-")
FIXTURES = Path(__file__).parent / "fixtures"

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
THINGS = ["dog", "cat", "man", "woman", "bus", "pizza", "horse", "table"]
PLACES = ["on a street", "in a field", "next to a tree", "on a table", "in the kitchen", "at the beach"]


def caption_corpus():
    """A few hundred COCO-like captions for training the test tokenizer."""
    out = []
    for i, colour in enumerate(COLOURS):
        for j, thing in enumerate(THINGS):
            for k, place in enumerate(PLACES):
                article = "An" if colour[0] in "aeiou" else "A"
                out.append(f"{article} {colour} {thing} {place}.")
                out.append(f"There is a {thing} {place} , and it is {colour}!")
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(caption_corpus(), vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(str(path))
    assert AutoTokenizer.from_pretrained(str(path)).eos_token == "<|endoftext|>"
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer):
    """A 2-layer, 32-wide GPT-2 with the test tokenizer: a stand-in for `--gpt2 distilgpt2`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=128, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spin-waiting makes
    them several times slower; modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`, and the
    setting is restored afterwards. OMP_NUM_THREADS=1 keeps the scripts' thread budget at one thread too."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)
