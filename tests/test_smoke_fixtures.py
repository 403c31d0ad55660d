from transformers import GPT2LMHeadModel


def test_tiny_gpt2_loads_through_from_pretrained(gpt2_dir, tokenizer):
    model = GPT2LMHeadModel.from_pretrained(str(gpt2_dir))
    assert model.config.n_layer == 2 and model.config.vocab_size == len(tokenizer)
    ids = tokenizer("A red dog on a street.")["input_ids"]
    assert tokenizer.decode(ids) == "A red dog on a street."
