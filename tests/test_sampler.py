"""nanolab.sampler: cached decoding is exact (tokens and log-probs against full recomputation), filters hold,
stops, padding and groups behave, bad requests fail clearly. Tiny random float32 models of each family, CPU."""
from __future__ import annotations

import pytest
import torch

from nanolab.models import build_model, preset
from nanolab.sampler import (
    Engine,
    completion_texts,
    filter_logits,
    generate,
    generate_groups,
    parse_stops,
    sample_logits,
)

FAMILIES = ["gpt2-char-tiny", "olmo2-char-tiny", "mla-char-tiny"]
PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [7, 7, 30, 12, 63]]


def tiny(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_model(preset(name, n_layer=2, block_size=48, **kw))
    with torch.no_grad():  # sharpen the random model's distributions (no near-ties; not tied to the embedding)
        model.ln_f.weight.mul_(6.0)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny(request.param)


def full_logits(model, seq: list[int]) -> torch.Tensor:
    """(len(seq), V) float32 logits of one sequence, no cache."""
    with torch.no_grad():
        return model(torch.tensor([seq]))[0][0].float()


def greedy_reference(model, prompt: list[int], n: int, stop: int | None = None) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
        if seq[-1] == stop:
            break
    return seq[len(prompt):]


def test_greedy_matches_full_recomputation(model):
    n = 16
    gen = generate(model, PROMPTS, n, temperature=0, return_logprobs=True)
    assert gen.tokens.shape == (len(PROMPTS), n) and gen.tokens.dtype == torch.long
    assert gen.mask.all() and gen.lengths.tolist() == [n] * len(PROMPTS) and not gen.stopped.any()
    for b, p in enumerate(PROMPTS):
        assert gen.tokens_list()[b] == greedy_reference(model, p, n)
        assert gen.sequences[b] == p + gen.tokens_list()[b]
        ref = torch.log_softmax(full_logits(model, gen.sequences[b]), -1)[len(p) - 1:-1]
        torch.testing.assert_close(gen.logprobs[b], ref.gather(1, gen.tokens[b, :, None])[:, 0], atol=1e-5, rtol=0)
    assert (gen.sampling_logprobs == 0).all()  # greedy: a point mass


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, None), (1.3, None, 0.8), (1.0, 8, 0.9)])
def test_logprobs_match_full_forward(model, temperature, top_k, top_p):
    gen = generate(model, PROMPTS, 12, temperature=temperature, top_k=top_k, top_p=top_p, seed=1,
                   return_logprobs=True)
    assert gen.logprobs.dtype == torch.float32 and gen.sampling_logprobs.dtype == torch.float32
    for b, p in enumerate(PROMPTS):
        logits = full_logits(model, gen.sequences[b])[len(p) - 1:-1]
        tok = gen.tokens[b, :, None]
        raw = torch.log_softmax(logits, -1).gather(1, tok)[:, 0]
        samp = torch.log_softmax(filter_logits(logits, temperature, top_k, top_p), -1).gather(1, tok)[:, 0]
        torch.testing.assert_close(gen.logprobs[b], raw, atol=1e-5, rtol=0)
        torch.testing.assert_close(gen.sampling_logprobs[b], samp, atol=1e-5, rtol=0)
        assert torch.isfinite(samp).all()  # every sampled token lies inside the filtered set


def test_filters_never_sample_outside_allowed_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 30, generator=g) * 2
    rows = logits.expand(4000, -1)
    order = logits[0].argsort(descending=True)
    probs = logits[0].softmax(-1)[order]
    nucleus = order[: int((probs.cumsum(0) - probs < 0.6).sum())]  # smallest prefix with mass >= 0.6
    for top_k, top_p, allowed in [(3, None, order[:3]), (None, 0.6, nucleus), (4, 0.6, order[:min(4, len(nucleus))]),
                                  (1, None, order[:1])]:
        tok, logq = sample_logits(rows, 1.0, top_k, top_p, generator=g)
        assert torch.isin(tok, allowed).all(), (top_k, top_p)
        assert torch.isfinite(logq[0, allowed]).all() and torch.isneginf(logq[0]).sum() == 30 - len(allowed)
        # frequencies follow the renormalised distribution
        freq = torch.bincount(tok, minlength=30).float() / len(tok)
        torch.testing.assert_close(freq[allowed], logq[0, allowed].exp(), atol=0.03, rtol=0)
    tok, logq = sample_logits(rows, 0.0)
    assert (tok == order[0]).all() and logq is None


def test_stop_tokens_end_rows_and_finished_rows_do_not_leak(model):
    free = generate(model, PROMPTS, 14, temperature=0)
    stop = free.tokens[0, 4].item()  # some token row 0 emits at step 4 (maybe earlier too)
    gen = generate(model, PROMPTS, 14, temperature=0, stop_tokens=[stop], pad_id=0, return_logprobs=True)
    for b, p in enumerate(PROMPTS):
        row = free.tokens_list()[b]
        n = row.index(stop) + 1 if stop in row else len(row)
        assert gen.tokens_list()[b] == row[:n] == greedy_reference(model, p, 14, stop)
        assert gen.lengths[b] == n and gen.mask[b, :n].all() and not gen.mask[b, n:].any()
        assert (gen.tokens[b, n:] == 0).all() and (gen.logprobs[b, n:] == 0).all()
        assert bool(gen.stopped[b]) == (stop in row)
        # a row's output is the same alone as in the batch (left padding, finished neighbours)
        alone = generate(model, [p], 14, temperature=0, stop_tokens=[stop], return_logprobs=True)
        assert alone.tokens_list()[0] == gen.tokens_list()[b]
        torch.testing.assert_close(alone.logprobs[0], gen.logprobs[b], atol=1e-5, rtol=0)


def test_all_rows_stopped_ends_early_and_callback_streams(model):
    first = generate(model, PROMPTS[:1], 1, temperature=0).tokens[0, 0].item()
    seen = []
    gen = generate(model, PROMPTS[:1] * 2, 20, temperature=0, stop_tokens=[first],
                   on_token=lambda t, tok, m: seen.append((t, tok.tolist(), m.tolist())))
    assert gen.lengths.tolist() == [1, 1] and gen.stopped.all() and gen.tokens.shape == (2, 20)
    assert seen == [(0, [first, first], [True, True])]


def test_stop_strings(model):
    letters = "abcdefghijklmnopqrstuvwxyz"
    decode = lambda ids: "".join(letters[i % 26] for i in ids)
    free = generate(model, PROMPTS, 14, temperature=0)
    text = decode(free.tokens_list()[1])
    stop = text[5:7]
    gen = generate(model, PROMPTS, 14, temperature=0, stop_strings=[stop], decode=decode)
    for b in range(len(PROMPTS)):
        t = decode(free.tokens_list()[b])
        n = t.index(stop) + len(stop) if stop in t else len(t)
        assert gen.tokens_list()[b] == free.tokens_list()[b][:n]
        assert bool(gen.stopped[b]) == (stop in t)


def test_seed_determinism(model):
    a = generate(model, PROMPTS, 10, temperature=1.0, top_k=20, seed=123)
    b = generate(model, PROMPTS, 10, temperature=1.0, top_k=20, seed=123)
    c = generate(model, PROMPTS, 10, temperature=1.0, top_k=20, seed=124)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(generate(model, PROMPTS, 10, generator=g1).tokens, generate(model, PROMPTS, 10, generator=g2).tokens)


def test_group_sampling_equals_separate_prefills(model):
    n = 3
    grouped = generate_groups(model, PROMPTS, n, 10, temperature=0, return_logprobs=True)
    assert grouped.tokens.shape == (len(PROMPTS) * n, 10) and grouped.group_size == n
    assert grouped.prompts == [p for p in PROMPTS for _ in range(n)]
    separate = generate(model, [p for p in PROMPTS for _ in range(n)], 10, temperature=0, return_logprobs=True)
    assert torch.equal(grouped.tokens, separate.tokens)
    torch.testing.assert_close(grouped.logprobs, separate.logprobs, atol=1e-5, rtol=0)
    # sampled groups: rows of a group differ but each is exact under the model
    sampled = generate_groups(model, PROMPTS[:2], 4, 10, temperature=1.0, seed=0, return_logprobs=True)
    assert len({tuple(r) for r in sampled.tokens_list()[:4]}) > 1
    for r, seq in enumerate(sampled.sequences):
        p = sampled.prompts[r]
        ref = torch.log_softmax(full_logits(model, seq), -1)[len(p) - 1:-1].gather(1, sampled.tokens[r, :, None])
        torch.testing.assert_close(sampled.logprobs[r], ref[:, 0], atol=1e-5, rtol=0)


def test_reused_cache_is_reset_between_calls(model):
    engine = Engine(model)
    long_batch = [[1] * 30, [2]]  # 29 padding slots in row 1
    short = [[3, 4], [5, 6, 7]]
    for n in (1, 2):
        engine.generate(long_batch, 5, temperature=0, group_size=n)
        dec = engine._decoder
        reused = engine.generate(short, 32, temperature=0, group_size=n)  # same rows, cache length 30 + 5 - 1
        assert engine._decoder is dec  # the cache that held long_batch's padding
        fresh = generate(model, short, 32, temperature=0, group_size=n)
        assert torch.equal(reused.tokens, fresh.tokens)


def test_engine_reuses_its_decoder_and_frees_it(model):
    import gc
    import weakref

    import nanolab.sampler as S

    assert not hasattr(S, "_DECODERS") and not hasattr(S, "release_decoder")  # no hidden per-model state
    kw = dict(temperature=1.0, top_k=20, seed=7, return_logprobs=True)
    ref = generate(model, PROMPTS, 10, **kw)
    engine = Engine(model)
    assert engine._decoder is None and "empty" in repr(engine)  # nothing allocated before the first call
    a = engine.generate(PROMPTS, 10, **kw)
    dec = engine._decoder
    b = engine.generate(PROMPTS, 10, **kw)  # same shape: the same cache
    assert engine._decoder is dec and "4 rows" in repr(engine)
    for g in (a, b):  # same results as the one-off function, and the caller's own tensors
        assert torch.equal(g.tokens, ref.tokens) and torch.equal(g.mask, ref.mask)
        torch.testing.assert_close(g.logprobs, ref.logprobs, atol=0, rtol=0)
    assert a.tokens.data_ptr() != b.tokens.data_ptr()
    old = weakref.ref(dec)
    del dec
    big = engine.generate(PROMPTS, 10, group_size=2, **kw)  # more rows: a new decoder, the old one freed
    assert old() is None and engine._decoder.idx.shape[0] == 8
    assert torch.equal(big.tokens, generate(model, PROMPTS, 10, group_size=2, **kw).tokens)
    longer = engine.generate(PROMPTS, 20, **kw)  # a longer cache: reallocated too
    assert engine._decoder.cache.valid.shape[1] == 11 + 20 - 1 and longer.tokens.shape == (4, 20)
    engine.release()
    assert engine._decoder is None
    assert torch.equal(engine.generate(PROMPTS, 10, **kw).tokens, ref.tokens)  # usable after release
    # garbage collection frees the decoder at once (no reference cycles), and the engine does not outlive use
    freed = weakref.ref(engine._decoder)
    del engine
    assert freed() is None
    with Engine(model) as engine:
        engine.generate(PROMPTS[:1], 3, temperature=0)
        assert engine._decoder is not None
    assert engine._decoder is None
    gc.collect()


def test_engine_reentrant_call_uses_a_temporary_decoder(model):
    engine = Engine(model)
    inner = []

    def on_token(t, tok, m):  # a streaming callback that samples again with the same engine
        if t == 2:
            inner.append(engine.generate(PROMPTS[:1], 4, temperature=0))

    outer = engine.generate(PROMPTS, 8, temperature=0, on_token=on_token)
    assert torch.equal(outer.tokens, generate(model, PROMPTS, 8, temperature=0).tokens)
    assert torch.equal(inner[0].tokens, generate(model, PROMPTS[:1], 4, temperature=0).tokens)
    assert engine._decoder.idx.shape[0] == len(PROMPTS)  # the outer call's decoder is the one kept


def test_engine_needs_a_causal_lm(model):
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DDP looks like from outside
    with pytest.raises(TypeError, match="raw model, e.g. model.module"):
        Engine(wrapper)
    with pytest.raises(TypeError, match="CausalLM"):
        generate(torch.nn.Linear(2, 2), [[1]], 2)


def test_outputs_are_trainable_and_mode_restored(model):
    model.train()
    gen = generate(model, PROMPTS, 4, temperature=1.0, seed=0, return_logprobs=True)
    assert model.training
    model.eval()
    assert not gen.tokens.is_inference() and not gen.logprobs.is_inference()
    logits, loss = model(gen.tokens, targets=gen.tokens)  # inference tensors could not be saved for backward
    loss.backward()
    model.zero_grad(set_to_none=True)


def test_bad_requests_raise_clear_errors(model):
    bs = model.config.block_size
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, [[1] * 10, [2]], bs - 9)
    generate(model, [[1] * 10, [2]], bs - 10, temperature=0)  # exactly fits
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match="non-empty list"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 999]], 4)
    with pytest.raises(ValueError, match="list of token ids"):
        generate(model, [1, 2, 3], 4)
    with pytest.raises(ValueError, match="decode"):
        generate(model, [[1]], 4, stop_strings=["x"])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 4, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], 0)
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(model, [[1]], 4, cuda_graph=True)
    with pytest.raises(ValueError, match="stop_tokens must be a list"):
        generate(model, [[1]], 4, stop_tokens=3)
    with pytest.raises(ValueError, match="stop_strings must be a list"):
        generate(model, [[1]], 4, stop_strings="END", decode=str)


def test_float_token_ids_are_refused(model):
    engine = Engine(model)
    for call in (generate, lambda *a, **k: engine.generate(*a[1:], **k)):
        for prompts in (torch.tensor([[1.0, 2.0]]), [[1, 2.0]], [[1.5]], [torch.tensor([1.0, 2.0])], [[True, 2]],
                        [torch.tensor([1]), torch.tensor([2.0])]):
            with pytest.raises(ValueError, match=r"prompts(\[\d\])? must hold integer token ids"):
                call(model, prompts, 4)
        with pytest.raises(ValueError, match="stop_tokens must hold integer token ids"):
            call(model, [[1]], 4, stop_tokens=[2.0])
        with pytest.raises(ValueError, match="stop_tokens must hold integer token ids"):
            call(model, [[1]], 4, stop_tokens=torch.tensor([2.0]))
        with pytest.raises(ValueError, match="pad_id must hold integer token ids"):
            call(model, [[1]], 4, pad_id=0.0)
    # integer types other than int are fine: numpy integers, integer tensors (2-D, rows, elements)
    import numpy as np

    ref = generate(model, [[1, 2], [3, 4]], 4, temperature=0, stop_tokens=[63]).tokens
    for prompts in (np.array([[1, 2], [3, 4]]), torch.tensor([[1, 2], [3, 4]], dtype=torch.int32),
                    [torch.tensor([1, 2]), [np.int64(3), torch.tensor(4)]]):
        out = engine.generate(prompts, 4, temperature=0, stop_tokens=np.array([63]), pad_id=np.int32(0))
        assert torch.equal(out.tokens, ref)


def test_bool_temperature_is_refused(model):
    engine = Engine(model)
    for call in (generate, lambda *a, **k: engine.generate(*a[1:], **k)):
        for t in (True, False):
            with pytest.raises(ValueError, match="temperature.*bool"):
                call(model, [[1]], 4, temperature=t)
    for name in ("top_k", "top_p", "group_size"):  # bools are refused for the other numeric arguments too
        with pytest.raises(ValueError, match=name):
            engine.generate([[1]], 4, **{name: True})
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1]], True)
    assert engine._decoder is None  # nothing was allocated for a refused call
    engine.generate([[1]], 2, temperature=1)  # an int temperature is a number, not a bool


class _WordTokenizer:
    """A toy tokenizer: id i <-> WORDS[i]; id 0 is the end-of-text token."""

    WORDS = ["<eot>", " the", " cat", " sat", "\n", " down", "END", "\n\n"]
    eot_token, name = 0, "words"

    def decode(self, ids):
        return "".join(self.WORDS[i] for i in ids)


def test_parse_stops():
    tok = _WordTokenizer()
    toks, strs = parse_stops(["<|endoftext|>", "13", "\\n", "END"], tok, 50)
    assert toks == [0, 13] and strs == ["\n", "END"]
    assert parse_stops([], tok, 50) == ([], [])
    assert parse_stops(["é\\t—", "a\\\\b"], tok, 50) == ([], ["é\t—", "a\\b"])  # escapes decoded, text kept
    assert parse_stops(["x y", "007"], tok, 50) == ([7], ["x y"])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        parse_stops(["50"], tok, 50)
    with pytest.raises(ValueError, match="no end-of-text token"):
        from nanolab.tokenizers import CharTokenizer

        parse_stops(["<|endoftext|>"], CharTokenizer.from_text("abc"), 3)


def test_completion_texts():
    tok = _WordTokenizer()
    a, b = [1, 2], [3, 4, 5]  # " the cat", " sat\n down"
    texts = completion_texts(tok, [a + [0], b, a, a + [0], [3, 7, 6]], [True, True, False, False, True], [0],
                             ["\n", "END"])
    # stop token dropped when the row stopped on it (not when it merely ran out); text cut at the stop string
    assert texts == [" the cat", " sat", " the cat", " the cat<eot>", " sat"]
    assert completion_texts(tok, [[1, 6, 2, 4]], [True], [], ["\n", "END"]) == [" the"]  # the earliest stop
    assert completion_texts(tok, [[]], [False], [0], ["\n"]) == [""]


def test_stops_from_parse_stops_drive_generate(model):
    letters = "abcdefghijklmnopqrstuvwxyz"

    class Tok:
        eot_token, name = 63, "letters"

        def decode(self, ids):
            return "".join(letters[i % 26] for i in ids)

    free = generate(model, PROMPTS, 14, temperature=0)
    text = Tok().decode(free.tokens_list()[1])
    stop_tokens, stop_strings = parse_stops([str(free.tokens[0, 3].item()), text[5:7]], Tok(), 64)
    gen = generate(model, PROMPTS, 14, temperature=0, stop_tokens=stop_tokens, stop_strings=stop_strings,
                   decode=Tok().decode)
    texts = completion_texts(Tok(), gen.tokens_list(), gen.stopped.tolist(), stop_tokens, stop_strings)
    for b, t in enumerate(texts):
        assert stop_strings[0] not in t and Tok().decode(gen.tokens_list()[b]).startswith(t)
        assert len(t) <= int(gen.lengths[b])


def test_mla_absorbed_and_plain_decode_agree():
    model = tiny("mla-char-tiny", seed=3)
    a = generate(model, PROMPTS, 12, temperature=0, return_logprobs=True)
    model.set_absorb(False)
    b = generate(model, PROMPTS, 12, temperature=0, return_logprobs=True)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_cuda_graph_plumbing_with_a_simulated_graph(monkeypatch):
    """The CUDA-graph path cannot run here; simulate torch.cuda's graph API on the CPU to check its plumbing:
    warm-up undone, capture not executed (state restored), replay = re-running the step into the static output,
    and a decoder reused across calls of different prompt lengths and groups."""
    import contextlib
    import functools

    import nanolab.sampler as S

    state = {"captures": 0}

    class FakeGraph:
        def replay(self):
            self.step()

    @contextlib.contextmanager
    def fake_graph(graph):  # recording, not running: put back whatever the recorded step changed
        dec, rec = state["dec"], state["rec"]
        tensors = [dec.cache.pos, dec.pos, dec.idx, *rec.tensors()]
        tensors += [b for layer in dec.cache.layers for b in layer.values()]
        saved = [t.clone() for t in tensors]
        yield
        for t, s in zip(tensors, saved):
            t.copy_(s)

    real_capture = S._Decoder._capture

    def capture(self, rec, rule):
        state.update(dec=self, rec=rec, captures=state["captures"] + 1)
        graph = real_capture(self, rec, rule)
        graph.step = functools.partial(self._full_step, rec, rule)  # what the real graph would replay
        return graph

    class FakeStream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(S._Decoder, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)

    model = tiny("olmo2-char-tiny", seed=1)
    engine = S.Engine(model)

    def run(prompts, n, **kw):  # generate() refuses cuda_graph on the CPU: call the engine's core directly
        with torch.inference_mode():
            tokens, mask, stopped, lp, slp = engine._generate(
                prompts, n, kw.get("temperature", 0), None, None, [], kw.get("generator"), True,
                kw.get("group_size", 1), [], None, 0, (True, False), None, 1, torch.device("cpu"))
        return tokens.clone(), lp.clone()  # generate() clones the reused buffers too

    with torch.autocast("cpu", dtype=torch.bfloat16):  # capture under autocast (its weight-cast cache switched off)
        eager = generate(model, PROMPTS, 6, temperature=0, return_logprobs=True)
        tokens, lp = run(PROMPTS, 6)
    assert state["dec"].cache.layers[0]["k"].dtype == torch.bfloat16 and lp.dtype == torch.float32
    # under autocast the captured step reads bf16 copies of the Linear weights (not the tied embedding/head)
    assert state["dec"].shadow and "wte.weight" not in state["dec"].shadow
    assert all(t.dtype == torch.bfloat16 for t in state["dec"].shadow.values())
    assert torch.equal(tokens, eager.tokens)
    torch.testing.assert_close(lp, eager.logprobs, atol=2e-2, rtol=0)
    with torch.no_grad():  # an in-place update (an optimizer step) reaches the copies at the next call
        model.lm_head.weight.neg_()  # untied in OLMo-2: shadowed
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens2, _ = run(PROMPTS, 6)  # the same decoder and graph
        assert state["captures"] == 1
        eager2 = generate(model, PROMPTS, 6, temperature=0)
    assert torch.equal(tokens2, eager2.tokens) and not torch.equal(tokens2, tokens)
    cases = [(PROMPTS, 14, 1), ([[3, 4], [9], [1], [2, 2]], 14, 1), (PROMPTS[:2], 14, 2), (PROMPTS[:1], 20, 1)]
    refs = [generate(model, p, n, temperature=0, group_size=g, return_logprobs=True) for p, n, g in cases]
    assert state["captures"] == 1  # the one-off generate() calls (eager) left the engine's decoder alone
    engine.release()
    assert engine._decoder is None
    for (prompts, n, group), ref in zip(cases, refs):
        tokens, lp = run(prompts, n, group_size=group)
        assert torch.equal(tokens, ref.tokens)
        torch.testing.assert_close(lp, ref.logprobs, atol=1e-5, rtol=0)
    assert state["captures"] == 3  # calls 2 and 3 replayed call 1's graph (4 rows, same rounded cache length)
    graphs = engine._decoder.graphs
    tokens, _ = run(PROMPTS[:1], 20)  # the last shape again: its graph replayed, nothing captured
    assert state["captures"] == 3 and engine._decoder.graphs is graphs
    engine.release()


def test_sample_script_streams_and_batches(tmp_path, capsys):
    import importlib.util

    from nanolab.checkpoint import save_checkpoint
    from nanolab.tokenizers import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh ROMEO:\n")
    model = build_model(preset("gpt2-char-tiny", vocab_size=tok.vocab_size, n_layer=1))
    save_checkpoint(tmp_path / "run", 7, model, state={"tokenizer": tok.to_dict()})
    spec = importlib.util.spec_from_file_location("sample_script", "scripts/sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--ckpt", str(tmp_path / "run"), "--prompt", "ROMEO:", "--max_new_tokens", "20", "--seed", "3"])
    streamed = capsys.readouterr().out
    assert streamed.startswith("ROMEO:") and len(streamed) == len("ROMEO:") + 20 + 1  # + final newline
    script.main(["--init_from", str(tmp_path / "run" / "step000007"), "--prompt", "ROMEO:", "--max_new_tokens", "20",
                 "--seed", "3", "--num_samples", "2", "--temperature", "0"])
    out = capsys.readouterr().out.split("\n---------------\n")
    assert len(out) == 2 and out[0] == out[1].rstrip("\n") and out[0].startswith("ROMEO:")
