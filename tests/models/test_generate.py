from joules.models.generate import generate_timed


def test_generates_exactly_the_requested_tokens(tiny):
    model, tok, _ = tiny
    r = generate_timed(model, tok, "Hello there", new_tokens=7)
    assert r.new_tokens == 7
    assert r.prompt_tokens == len(tok("Hello there")["input_ids"])
    assert r.latency_s > 0 and r.tokens_per_s > 0
    assert set(r.to_dict()) >= {"text", "latency_s", "tokens_per_s"}


def test_greedy_is_deterministic(tiny):
    model, tok, _ = tiny
    assert generate_timed(model, tok, "abc", 5).text == generate_timed(model, tok, "abc", 5).text
