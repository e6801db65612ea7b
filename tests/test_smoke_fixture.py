from deltakd_cli import data, models


def test_fixture_models_share_tokenizer(tiny):
    base_tok = models.load_tokenizer(str(tiny.teacher_base))
    student_tok = models.load_tokenizer(str(tiny.student))
    models.check_same_tokenizer(base_tok, student_tok, "base", "student")
    model = models.load_model(str(tiny.student))
    assert models.check_model_vocab(model, student_tok, "student") == tiny.vocab_size
    examples = data.load_examples(tiny.train)
    tokenized = data.tokenize_all(examples, "alpaca", base_tok, 64)
    assert all(t.num_targets > 0 for t in tokenized)
    assert tokenized[0].input_ids[-1] == base_tok.eos_token_id
