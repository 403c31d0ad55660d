"""models/decoding.py against plain step-by-step references: full recomputation, the original ClipCap beam
search, transformers' generate and TopPLogitsWarper."""
import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import TopPLogitsWarper

from captioning.original_decoding import original_beam_search
from models.decoding import DecodingOptions, beam_search, greedy, nucleus_pick, sample, sampling_noise

VOCAB = 300
STOPS = [31, 110, 149]  # frequent with this model: some captions stop early, some run to max_length


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    # A wide initialisation gives peaked distributions: no near-ties that float rounding could flip.
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB, initializer_range=0.2,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def prefix():
    torch.manual_seed(1)
    return torch.randn(6, 4, 32)  # (B, P, C)


def stepwise_argmax(gpt, prefix, stops, max_length):
    """Greedy decoding the slow way: the whole sequence through the model at every step, no cache."""
    tokens = []
    with torch.no_grad():
        for _ in range(max_length):
            embeds = torch.cat([prefix[None], gpt.transformer.wte(torch.tensor([tokens], dtype=torch.long))], 1)
            tokens.append(int(gpt(inputs_embeds=embeds).logits[0, -1].argmax()))
            if tokens[-1] in stops:
                break
    return tokens


def mean_logprob(gpt, prefix, tokens):
    with torch.no_grad():
        embeds = torch.cat([prefix[None], gpt.transformer.wte(torch.tensor([tokens]))], 1)
        logp = gpt(inputs_embeds=embeds).logits[0, prefix.shape[0] - 1:-1].log_softmax(-1)
    return float(logp[torch.arange(len(tokens)), tokens].mean())


def test_greedy_equals_stepwise_argmax_and_generate(gpt, prefix):
    out = greedy(gpt, prefix, STOPS, max_length=15)
    sequences = [rows[0] for rows in out.sequences()]
    assert sequences == [stepwise_argmax(gpt, p, STOPS, 15) for p in prefix]
    assert any(len(s) < 15 for s in sequences) and any(len(s) == 15 for s in sequences)
    config = GenerationConfig(max_new_tokens=15, do_sample=False, eos_token_id=STOPS, pad_token_id=STOPS[0])
    generated = gpt.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                             generation_config=config)
    assert [row[:len(s)].tolist() for row, s in zip(generated, sequences)] == sequences
    for p, s, score in zip(prefix, sequences, out.scores[:, 0].tolist()):
        assert score == pytest.approx(mean_logprob(gpt, p, s), abs=1e-5)


@pytest.mark.parametrize("beam_size", [2, 5])
@pytest.mark.parametrize("stops", [[], STOPS])
def test_beam_search_equals_original_algorithm(gpt, prefix, beam_size, stops):
    out = beam_search(gpt, prefix, stops, beam_size, max_length=12)
    for i, p in enumerate(prefix):
        sequences, scores = original_beam_search(gpt, p[None], stops, beam_size, 12)
        assert out.sequences()[i] == sequences
        assert out.scores[i].tolist() == pytest.approx(scores, abs=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_beam_search_divides_logits_by_the_temperature_as_the_original(gpt, prefix, temperature):
    out = beam_search(gpt, prefix, STOPS, 3, max_length=12, temperature=temperature)
    plain = beam_search(gpt, prefix, STOPS, 3, max_length=12)
    assert not torch.allclose(out.scores, plain.scores)
    for i, p in enumerate(prefix):
        sequences, scores = original_beam_search(gpt, p[None], STOPS, 3, 12, temperature=temperature)
        assert out.sequences()[i] == sequences
        assert out.scores[i].tolist() == pytest.approx(scores, abs=1e-5)


def test_long_captions_grow_the_cache_buffers_and_still_equal_the_original(gpt, prefix):
    # 40 tokens outgrow the first buffer (prefix + 1 + GROWTH positions) twice; no stop token, no early exit
    out = beam_search(gpt, prefix[:2], [], 3, max_length=40)
    for i in range(2):
        sequences, scores = original_beam_search(gpt, prefix[i:i + 1], [], 3, 40)
        assert out.sequences()[i] == sequences and out.scores[i].tolist() == pytest.approx(scores, abs=1e-5)


def test_beam_scores_are_sorted_mean_logprobs_and_stops_end_captions(gpt, prefix):
    out = beam_search(gpt, prefix, STOPS, 5, max_length=12)
    assert out.tokens.shape == (6, 5, 12)
    assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()
    finished = 0
    for p, rows, scores in zip(prefix, out.sequences(), out.scores.tolist()):
        for tokens, score in zip(rows, scores):
            assert score == pytest.approx(mean_logprob(gpt, p, tokens), abs=1e-5)
            assert not set(tokens[:-1]) & set(STOPS)  # nothing after a stop token
            assert tokens[-1] in STOPS or len(tokens) == 12
            finished += tokens[-1] in STOPS
    assert finished > 0


def test_beam_size_one_equals_greedy(gpt, prefix):
    assert beam_search(gpt, prefix, STOPS, 1, 15).sequences() == greedy(gpt, prefix, STOPS, 15).sequences()


def test_batch_equals_one_image_at_a_time(gpt, prefix):
    batched = beam_search(gpt, prefix, STOPS, 3, 12).sequences()
    assert batched == [beam_search(gpt, p[None], STOPS, 3, 12).sequences()[0] for p in prefix]
    batched = greedy(gpt, prefix, STOPS, 12).sequences()
    assert batched == [greedy(gpt, p[None], STOPS, 12).sequences()[0] for p in prefix]


def test_finished_images_leave_the_batch(gpt, prefix):
    rows = []
    hook = gpt.transformer.register_forward_pre_hook(  # rows of the token steps, not of the prefix's pass
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0])
        if kwargs.get("input_ids") is not None else None, with_kwargs=True)
    try:
        lengths = [len(rows_[0]) for rows_ in greedy(gpt, prefix, STOPS, 12).sequences()]
        assert rows == [sum(n > t for n in lengths) for t in range(1, max(lengths))]
        rows.clear()
        beams = beam_search(gpt, prefix, STOPS, 3, 30)
    finally:
        hook.remove()
    assert rows[0] == 18 and rows == sorted(rows, reverse=True) and all(r % 3 == 0 for r in rows)
    assert rows[-1] < 18 and len(rows) == int(beams.lengths.max()) - 1


def test_a_stop_token_ends_the_caption_there(gpt, prefix):
    free = greedy(gpt, prefix[:1], [], 10).sequences()[0][0]
    stop = free[3]
    first = free.index(stop)
    assert greedy(gpt, prefix[:1], [stop], 10).sequences()[0][0] == free[:first + 1]


def test_nucleus_with_a_seed_is_reproducible_and_independent_of_the_batch(gpt, prefix):
    noise = sampling_noise(7, range(6), 3, 12)
    a = sample(gpt, prefix, STOPS, 3, top_p=0.9, temperature=1.0, max_length=12, noise=noise)
    b = sample(gpt, prefix, STOPS, 3, top_p=0.9, temperature=1.0, max_length=12, noise=noise)
    assert a.sequences() == b.sequences()
    part = sample(gpt, prefix[2:4], STOPS, 3, 0.9, 1.0, 12, noise=sampling_noise(7, [2, 3], 3, 12))
    assert part.sequences() == a.sequences()[2:4]
    other = sample(gpt, prefix, STOPS, 3, 0.9, 1.0, 12, noise=sampling_noise(8, range(6), 3, 12))
    assert other.sequences() != a.sequences()
    assert len({tuple(s) for rows in a.sequences() for s in rows}) > 6  # several different captions per image
    for p, rows, scores in zip(prefix, a.sequences(), a.scores.tolist()):
        assert scores[0] == pytest.approx(mean_logprob(gpt, p, rows[0]), abs=1e-5)


def test_nucleus_with_top_p_near_zero_equals_greedy(gpt, prefix):
    sampled = sample(gpt, prefix, STOPS, 2, top_p=1e-6, temperature=1.0, max_length=12,
                     noise=sampling_noise(0, range(6), 2, 12))
    expected = greedy(gpt, prefix, STOPS, 12).sequences()
    assert sampled.sequences() == [[rows[0], rows[0]] for rows in expected]


def test_nucleus_keeps_the_top_p_set_and_samples_its_renormalised_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(50, 400) * 3
    for top_p in (0.3, 0.8, 0.95):
        kept = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        picks = torch.stack([nucleus_pick(logits, top_p, torch.rand(50)) for _ in range(200)], dim=1)
        assert kept.gather(1, picks).all()
        probs = logits.softmax(-1) * kept
        # the most probable token is drawn as often as its share of the nucleus says (200 draws per row)
        top = probs.argmax(-1)
        share = (probs.max(-1).values / probs.sum(-1))
        drawn = (picks == top[:, None]).float().mean()
        assert float(drawn) == pytest.approx(float(share.mean()), abs=0.04)
    row = torch.tensor([[0.0, 1.0, 2.0]])
    assert [int(nucleus_pick(row, 1.0, torch.tensor([u]))) for u in (0.0, 0.5, 0.99)] == [0, 2, 2]


def test_invalid_arguments_are_refused(gpt, prefix):
    with pytest.raises(ValueError, match="exceeds the decoder's 64 positions"):
        greedy(gpt, prefix, STOPS, max_length=61)
    with pytest.raises(ValueError, match="beam_size must be between 1 and the vocabulary size 300"):
        beam_search(gpt, prefix, STOPS, 0)
    for temperature in (0.0, 1e-45, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"temperature must be in \[0.01, 100.0\], got"):
            sample(gpt, prefix, STOPS, temperature=temperature)
        with pytest.raises(ValueError, match=r"temperature must be in \[0.01, 100.0\], got"):
            DecodingOptions(decoding="nucleus", temperature=temperature)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got nan"):
        DecodingOptions(decoding="nucleus", top_p=float("nan"))
