"""nanolab.sampler: cached decoding is exact (tokens and log-probs against full recomputation), filters hold,
stops, padding and groups behave, bad requests fail clearly. Tiny random float32 models of each family, CPU."""
from __future__ import annotations

import pytest
import torch

from nanolab.models import build_model, preset
from nanolab.sampler import filter_logits, generate, generate_groups, release_decoder, sample_logits

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
    long_batch = [[1] * 30, [2]]  # 29 padding slots in row 1
    generate(model, long_batch, 5, temperature=0)
    short = [[3, 4], [5, 6, 7]]
    for n in (1, 2):
        reused = generate(model, short, 17, temperature=0, group_size=n)  # same rows/max_len as the last call?
        release_decoder(model)
        fresh = generate(model, short, 17, temperature=0, group_size=n)
        assert torch.equal(reused.tokens, fresh.tokens)
        generate(model, long_batch, 5, temperature=0, group_size=n)


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
    release_decoder(model)

    def run(prompts, n, **kw):  # generate() refuses cuda_graph on the CPU: call its core directly
        with torch.inference_mode():
            tokens, mask, stopped, lp, slp = S._generate(
                model, prompts, n, kw.get("temperature", 0), None, None, [], kw.get("generator"), True,
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
    release_decoder(model)
    for (prompts, n, group), ref in zip(cases, refs):
        tokens, lp = run(prompts, n, group_size=group)
        assert torch.equal(tokens, ref.tokens)
        torch.testing.assert_close(lp, ref.logprobs, atol=1e-5, rtol=0)
    assert state["captures"] == 3  # calls 2 and 3 replayed call 1's graph (4 rows, same rounded cache length)
    release_decoder(model)


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
