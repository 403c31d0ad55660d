"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny GPT-2, saved to disk and loaded back through
the same `from_pretrained` paths users take with `distilgpt2`, and the exports and data files that several test
modules use. Nothing is downloaded. The plain helpers behind them are in builders.py."""
import dataclasses
import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests run the fp32 path of `--precision auto` on every CPU, as on an AVX2 laptop, so that their figures do not
# depend on the machine: with oneDNN capped below bf16, captioning/runtime.py finds no native bf16 (here and in
# the subprocesses the tests start). tests/test_runtime.py patches the capability checks to test the rule itself.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
# ATen's own kernels too: with AVX-512 a matrix product's last bits can depend on the batch size, which tests of
# batch-size invariance (nucleus samples, features) would see as differences.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
# Caption-token caches of the tests' runs go to a directory of their own, not the user's cache.
os.environ["TINYTINY_CACHE"] = tempfile.mkdtemp(prefix="tinytiny-test-cache-")

# After the environment above: these import torch and transformers.
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import builders  # noqa: E402
from builders import DECODER_SIZES, caption_corpus, llama_style_tokenizer, tiny_captioner, tiny_decoder, tiny_gpt2  # noqa: E402,E501
from captioning.inference import Captioner  # noqa: E402
from models import EncoderConfig, ImageEncoder  # noqa: E402

FIXTURES = builders.FIXTURES  # test_encoder.py and test_convert_checkpoint.py import it from here still


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
    path = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(tokenizer).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def decoder_dirs(tmp_path_factory, tokenizer):
    """A tiny random decoder of each supported architecture with its tokenizer, saved as `save_pretrained` saves
    SmolLM2 or Pythia: {model_type: directory}. The LLaMA has a LLaMA-style tokenizer (byte fallback, a BOS it
    adds by default, no pad token); the others the test tokenizer."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("decoders")
    llama_dir = root / "llama_tokenizer"
    llama_style_tokenizer().save_pretrained(str(llama_dir))
    dirs = {}
    for model_type in DECODER_SIZES:
        own = AutoTokenizer.from_pretrained(str(llama_dir)) if model_type == "llama" else tokenizer
        dirs[model_type] = root / model_type
        tiny_decoder(model_type, own).save_pretrained(str(dirs[model_type]))
        own.save_pretrained(str(dirs[model_type]))
    return dirs


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spin-waiting makes
    them several times slower; modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`, and the
    setting is restored afterwards. OMP_NUM_THREADS=1 keeps the scripts' thread budget at one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


# ---- exports and data that several test modules use --------------------------------------------------------

@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    """Three exports of the same weights: encoder inside, encoder recorded as a weights file, no encoder."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32)).eval()
    inside = tiny_captioner(tokenizer, encoder)
    inside.save_pretrained(root / "inside", tokenizer)
    weights = root / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(weights))
    recorded = dataclasses.replace(encoder.config, weights=str(weights)).to_dict()
    from_file = tiny_captioner(tokenizer, encoder_config=recorded)
    from_file.load_state_dict({k: v for k, v in inside.state_dict().items() if not k.startswith("encoder.")})
    from_file.save_pretrained(root / "from_file", tokenizer)
    tiny_captioner(tokenizer).save_pretrained(root / "features_only", tokenizer)
    return dict(inside=root / "inside", from_file=root / "from_file", features_only=root / "features_only",
                weights=weights, root=root)


@pytest.fixture(scope="module")
def captioner(exports):
    """The Captioner of the export with its encoder inside."""
    return Captioner.from_pretrained(exports["inside"])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An images folder to caption (builders.write_predict_images): three good images, two bad files."""
    return builders.write_predict_images(tmp_path_factory.mktemp("images"))


@pytest.fixture
def export(tmp_path, tokenizer):
    """An export with a test_resnet encoder inside (32 px) in its own tmp_path, as evaluate.py --checkpoint takes
    it (its default --out_dir is beside it)."""
    torch.manual_seed(0)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32)).eval()
    path = tmp_path / "export"
    tiny_captioner(tokenizer, encoder).save_pretrained(path, tokenizer)
    return path


@pytest.fixture
def karpathy_file(tmp_path):
    """dataset_coco.json of builders.SPLITS, with builders.REFERENCES for the 6 test images."""
    return builders.write_karpathy_file(tmp_path / "dataset_coco.json")


@pytest.fixture
def coco_images(tmp_path):
    """An images root with val2014/ images for the ids of karpathy_file; each image's width is its id + 10."""
    return builders.write_coco_images(tmp_path / "coco")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A COCO-style tree for parse_coco.py (builders.make_coco_tree): images, annotations, an encoder file."""
    return builders.make_coco_tree(tmp_path_factory.mktemp("coco"))
