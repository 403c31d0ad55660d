"""Training data pieces: tokens and their cache, dynamic padding, the resumable sampler, padding invariance."""
import numpy as np
import pytest
import torch

from builders import tiny_captioner_on
from captioning.runtime import Distributed
from captioning.training.datasets import (MAX_CAPTION_TOKENS, CaptionCollator, CaptionTable, CaptionTokens,
                                          FeatureCaptionDataset, ResumableDistributedSampler, cached_tokens,
                                          caption_char_limit, split_by_image, token_cache_key, tokenize_captions)
from captioning.training.loop import CaptionLoss, Stepper

CAPTIONS = ["A red dog on a street.", "A cat.", "There is a bus in a field , and it is blue!"]



pytestmark = pytest.mark.usefixtures("one_thread")


def test_tokens_end_with_eos_and_round_trip(tokenizer):
    tokens = tokenize_captions(CAPTIONS, tokenizer, progress=False)
    assert len(tokens) == 3 and tokens.flat.dtype == np.int32
    for i, caption in enumerate(CAPTIONS):
        ids = tokens.get(i)
        assert ids[-1].item() == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:-1]) == caption
    assert tokens.get(2, max_tokens=3).tolist() == tokens.get(2)[:3].tolist()


def test_a_caption_of_megabytes_is_cut_before_it_is_tokenized(tokenizer):
    import tracemalloc
    huge = "a red dog " * 600_000  # 6 MB, 1.8 million tokens: tokenized whole, its ids alone took 60 MB
    tracemalloc.start()
    try:
        tokens = tokenize_captions([huge, CAPTIONS[0]], tokenizer, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8e6, f"{peak / 1e6:.1f} MB"
    assert len(tokens.get(0)) == MAX_CAPTION_TOKENS + 1 and tokens.get(0)[-1].item() == tokenizer.eos_token_id
    head = tokenizer(huge[:caption_char_limit(tokenizer) // 4], add_special_tokens=False)["input_ids"]
    n = min(len(head) - 1, MAX_CAPTION_TOKENS)  # the last token of a cut text may be a cut word's
    assert n > 1000 and tokens.get(0)[:n].tolist() == head[:n]  # the caption's first tokens, as they were
    assert tokenizer.decode(tokens.get(1)[:-1]) == CAPTIONS[0]


def test_token_cache_is_keyed_by_captions_and_tokenizer(tmp_path, tokenizer, tokenizer_dir):
    logs = []
    first = cached_tokens(CAPTIONS, tokenizer, [tmp_path], "data.pkl", logs.append)
    again = cached_tokens(CAPTIONS, tokenizer, [tmp_path], "data.pkl", logs.append)
    assert "(cached)" in logs[-1] and np.array_equal(first.flat, again.flat)

    changed = CAPTIONS[:2] + ["A yellow horse at the beach."]  # same file name, other captions: a new key
    tokens = cached_tokens(changed, tokenizer, [tmp_path], "data.pkl", logs.append)
    assert "(cached)" not in logs[-1]
    assert tokenizer.decode(tokens.get(2)[:-1]) == "A yellow horse at the beach."
    assert len(list(tmp_path.glob("data.pkl.tokens-*.npz"))) == 2

    from transformers import AutoTokenizer
    other = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    other.add_tokens(["<extra>"])  # another vocabulary: another key
    assert token_cache_key(CAPTIONS, other) != token_cache_key(CAPTIONS, tokenizer)


def test_token_cache_with_a_foreign_key_inside_is_not_used(tmp_path, tokenizer):
    cached_tokens(CAPTIONS, tokenizer, [tmp_path], "data.pkl", print)
    (path,) = tmp_path.glob("data.pkl.tokens-*.npz")
    np.savez(open(path, "wb"), key=np.array("someone else's"), flat=np.zeros(3, np.int32),
             offsets=np.array([0, 1, 2, 3]))
    logs = []
    tokens = cached_tokens(CAPTIONS, tokenizer, [tmp_path], "data.pkl", logs.append)
    assert "(cached)" not in logs[-1] and tokenizer.decode(tokens.get(1)[:-1]) == "A cat."
    path.write_bytes(b"truncated")
    tokens = cached_tokens(CAPTIONS, tokenizer, [tmp_path], "data.pkl", logs.append)
    assert "(cached)" not in logs[-1] and len(tokens) == 3


def test_collator_pads_dynamically_with_a_mask():
    batch = CaptionCollator(pad_id=9)([(torch.tensor([1, 2]), torch.zeros(4)), (torch.tensor([3, 4, 5, 6]),
                                                                                 torch.ones(4))])
    assert batch["tokens"].tolist() == [[1, 2, 9, 9], [3, 4, 5, 6]]
    assert batch["mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["num_tokens"] == 6 and batch["inputs"].shape == (2, 4)


def test_sampler_shards_cover_the_single_process_order_and_resume_mid_epoch():
    data = list(range(22))
    single = ResumableDistributedSampler(data, 1, 0, seed=3)
    single.set_epoch(2)
    order = list(single)
    ranks = [ResumableDistributedSampler(data, 2, r, seed=3) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    shards = [list(s) for s in ranks]
    # batches of 2 per process: process r's batch k holds positions 4k + r and 4k + 2 + r
    first_two_batches = sorted(shards[0][:4] + shards[1][:4])
    assert first_two_batches == sorted(order[:8])
    for s in ranks:
        s.set_epoch(2, start=8)
    assert [list(s) for s in ranks] == [shards[0][4:], shards[1][4:]]
    other_epoch = ResumableDistributedSampler(data, 1, 0, seed=3)
    other_epoch.set_epoch(3)
    assert list(other_epoch) != order and sorted(list(other_epoch)) == sorted(order)


def test_validation_split_holds_out_whole_images():
    table = CaptionTable([f"c{i}" for i in range(30)], np.repeat(np.arange(10), 3))
    train, val = split_by_image(table, 0.2, seed=0)
    assert len(val) == 6 and len(train) == 24
    assert not set(table.image_index[train]) & set(table.image_index[val])
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_by_image(table, 1.0, seed=0)


@pytest.fixture()
def tiny_model(gpt2_dir, tokenizer):
    return tiny_captioner_on(gpt2_dir, tokenizer).eval()  # eval: no dropout, so runs compare exactly


def gradients(model, batches, pad_id):
    model.zero_grad()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stepper = Stepper(CaptionLoss(model, images=False), optimizer, scheduler, Distributed())
    grads = {}
    original_update = stepper.update
    stepper.update = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None}) or original_update()
    loss = stepper([CaptionCollator(pad_id)(b) for b in batches])
    return loss, grads


def test_padding_does_not_change_loss_or_gradients(tiny_model, tokenizer):
    tokens = tokenize_captions(CAPTIONS, tokenizer, progress=False)
    features = torch.randn(3, 16)
    items = [(tokens.get(i), features[i]) for i in range(3)]
    loss_a, grads_a = gradients(tiny_model, [items], pad_id=0)
    loss_b, grads_b = gradients(tiny_model, [items], pad_id=tokenizer.eos_token_id)
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[k], grads_b[k], atol=1e-7) for k in grads_a)
    # each caption alone, its loss weighted by its tokens: the same token mean as the padded batch
    alone = [tiny_model.loss(*[x.unsqueeze(0) for x in item]).item() * len(item[0]) for item in items]
    assert loss_a.item() == pytest.approx(sum(alone) / sum(len(t) for t, _ in items), rel=1e-5)
    # one batch of 3 or accumulation over micro-batches of 1 and 2: the same update
    loss_c, grads_c = gradients(tiny_model, [items[:1], items[1:]], pad_id=0)
    assert loss_c.item() == pytest.approx(loss_a.item(), rel=1e-6)
    assert all(torch.allclose(grads_a[k], grads_c[k], atol=1e-6) for k in grads_a)


def test_frozen_decoder_gets_no_gradients(tiny_model, tokenizer):
    tiny_model.freeze_decoder()
    tokens = tokenize_captions(CAPTIONS, tokenizer, progress=False)
    dataset = FeatureCaptionDataset(torch.randn(3, 16), CaptionTable(CAPTIONS, np.arange(3)), tokens, np.arange(3))
    _, grads = gradients(tiny_model, [[dataset[i] for i in range(3)]], pad_id=0)
    assert grads and all(name.startswith("clip_project.") for name in grads)
    assert all(p.grad is None for p in tiny_model.gpt.parameters())


def test_augmentation_depends_on_seed_epoch_and_caption_only(tmp_path):
    from PIL import Image

    from captioning.data.images import load_image
    from captioning.training.datasets import ImageCaptionDataset
    from captioning.training.inputs import augmentation

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    config = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    tokens = CaptionTokens.from_sequences([[1, 0], [2, 0]])
    table = CaptionTable(["a", "b"], np.array([0, 0]))
    dataset = ImageCaptionDataset([str(tmp_path / "a.png")], table, tokens, np.arange(2), transform=None,
                                  load_image=load_image, augment=augmentation(config), seed=5)
    first = dataset[0][1]
    torch.rand(10)  # the global RNG does not matter
    assert first.shape == (3, 32, 32) and torch.equal(dataset[0][1], first)
    assert not torch.equal(dataset[1][1], first)  # the image's other caption: another crop
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][1], first)
