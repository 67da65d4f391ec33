"""Generation and sample.py: the cache gives the tokens a full recompute gives, sampling matches HF's logits
processors and is seeded, a chat turn prefills only its new tokens, and bad input leaves a session as it was."""

import copy
import errno
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

import sample
from conftest import randomize_, write_swapped_tokenizer
from nanovl import DeepSeekVL, checkpoint, get_config
from nanovl.chat import IMAGE_TAG, SYSTEM_PROMPT, render_chat, start_ids, user_ids
from nanovl.generate import ChatSession, Sampling, generate, pick, warp
from nanovl.image import ImageProcessor
from nanovl.tokenizer import Tokenizer

TEXT = "what colour is the circle? it is red. the square is blue, the sign says open. " * 30


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], 280)


@pytest.fixture(scope="module")
def tiny(tok):
    torch.manual_seed(0)
    cfg = get_config("tiny", **{"llm.vocab_size": tok.vocab_size})
    # Large random weights, so that greedy decoding wanders over many tokens instead of repeating one.
    return randomize_(DeepSeekVL(cfg), std=0.3).eval()


def picture(seed: int, size=(40, 30)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def naive_greedy(model, ids, images, n):
    """Greedy decoding without a cache: the whole sequence again at every step."""
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]), images)
        ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


def test_greedy_with_the_cache_equals_recomputing_every_step(tiny, tok):
    proc = ImageProcessor.for_config(tiny.cfg)
    img = torch.stack([proc(picture(1)), proc(picture(2))])
    n_img = tiny.cfg.n_image_tokens
    long = render_chat([{"role": "user", "content": f"{IMAGE_TAG}what colour is the circle?"}], tok, n_img,
                       generation_prompt=True)[0]
    short = render_chat([{"role": "user", "content": f"{IMAGE_TAG}red"}], tok, n_img, system="",
                        generation_prompt=True)[0]
    assert len(long) != len(short)  # so the batch is left-padded
    got = generate(tiny, [long, short], img, Sampling(max_new_tokens=12), pad_id=tok.pad_id)
    assert got[0] == naive_greedy(tiny, long, img[:1], 12)
    assert got[1] == naive_greedy(tiny, short, img[1:], 12)
    assert len(set(got[0])) > 3  # the test means something only if the model says varied things


def test_warping_matches_hf_logits_processors():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    generated = torch.randint(0, 50, (3, 7))
    s = Sampling(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(generated, logits.clone())
    for hf in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        expected = hf(generated, expected)
    got = warp(logits, generated, s)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    assert torch.allclose(got[kept], expected[kept], atol=1e-6)
    assert 1 < kept.sum(1).min() and kept.sum(1).max() < 20  # top-p cut below top-k: both rules did something


def test_repetition_penalty_matches_hf_on_every_logit_and_applies_to_greedy_decoding():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)  # about half negative: those are multiplied by the penalty, the rest divided
    generated = torch.randint(0, 50, (3, 12))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(generated, logits.clone())
    got = warp(logits, generated, Sampling(repetition_penalty=1.3))  # temperature 0: greedy
    assert torch.allclose(got, expected, atol=1e-6) and (logits.gather(1, generated) < 0).any()
    said = int(generated[0, 0])  # a token this answer already has ...
    other = next(t for t in range(50) if t not in generated[0])  # ... and one it has not
    logits[0, said], logits[0, other] = 10.0, 9.0
    assert int(pick(logits, generated, Sampling())[0]) == said  # greedy
    assert int(pick(logits, generated, Sampling(repetition_penalty=1.3))[0]) == other  # greedy, 10 / 1.3 < 9


def test_generate_applies_the_repetition_penalty_to_the_answer_so_far(tiny, tok):
    # As the official CLI (HF generate from input embeddings: its ids hold the answer only), the penalty reads the
    # tokens generated so far, not the prompt's. A loop that recomputes everything and picks with pick() gives the
    # same tokens as generate's cached decoding.
    s = Sampling(max_new_tokens=16, repetition_penalty=1.3)
    prompt = render_chat([{"role": "user", "content": "say it again and again"}], tok, tiny.cfg.n_image_tokens,
                         generation_prompt=True)[0]
    out = []
    for _ in range(s.max_new_tokens):
        with torch.no_grad():
            logits = tiny(torch.tensor([prompt + out]))[0][:, -1]  # (1, V)
        logits[:, tiny.cfg.image_token_id] = float("-inf")  # never picked (generate's rule)
        out.append(int(pick(logits, torch.tensor([out], dtype=torch.long).view(1, -1), s)[0]))
    assert generate(tiny, [prompt], sampling=s)[0] == out
    assert out != generate(tiny, [prompt], sampling=Sampling(max_new_tokens=16))[0]  # the penalty changed something


def test_decoding_never_picks_padded_or_image_ids_keeps_each_rows_stop_and_penalises_the_whole_answer():
    from types import SimpleNamespace
    from nanovl.generate import _decode
    V, n_words, image_id = 12, 8, 3
    model = SimpleNamespace(cfg=SimpleNamespace(image_token_id=image_id))
    logits = torch.zeros(2, V)
    logits[:, 8:] = 100.0  # ids past the tokenizer's 8 words: rows of the padded embedding, nothing to decode to
    logits[:, image_id] = 50.0  # fed back, <image_placeholder> would ask for an image that does not exist
    logits[0, 6], logits[1, 5] = 10.0, 10.0  # then row 0 says the stop id 6 at once; row 1 goes on saying 5

    class Step:  # stands in for DecodeStep: a cache with 3 free slots
        def __init__(self):
            self.cache, self.fed = SimpleNamespace(max_len=10, length=7), []

        def __call__(self, tok):
            self.fed.append(tok[:, 0].tolist())
            self.cache.length += 1
            return logits.clone()

    step = Step()
    out = _decode(model, step, logits.clone(), Sampling(max_new_tokens=50), {6}, pad_id=0, n_words=n_words)
    # 3 free slots give 4 new tokens (the last is never fed back); row 0 keeps its stop id, then pads
    assert out.tolist() == [[6, 0, 0, 0], [5, 5, 5, 5]] and len(step.fed) == 3
    step = Step()
    out = _decode(model, step, logits.clone(), Sampling(max_new_tokens=50), {5, 6}, pad_id=0, n_words=n_words)
    assert out.tolist() == [[6], [5]] and step.fed == []  # every row stopped at its first token: no step runs
    # The repetition penalty reads the whole answer so far, its first token too: 5 (10), then 4 (10 / 1.3 < 9), then
    # 5 again (9 / 1.3 < 10 / 1.3), as HF's does: a token said twice is penalised once.
    logits[1, 4] = 9.0
    out = _decode(model, Step(), logits.clone(), Sampling(max_new_tokens=4, repetition_penalty=1.3), set(), 0, n_words)
    assert out[1].tolist() == [5, 4, 5, 5]


def test_a_decoding_step_past_the_end_of_its_cache_is_refused_and_changes_nothing():
    from nanovl.generate import DecodeStep
    tiny = DeepSeekVL(get_config("tiny"))
    cache = tiny.llm.new_cache(1, 2)
    step = DecodeStep(tiny.llm, cache)
    with torch.no_grad():
        step(torch.tensor([[5]])), step(torch.tensor([[6]]))
        with pytest.raises(ValueError, match="1 new tokens do not fit a KV cache of 2 holding 2"):
            step(torch.tensor([[7]]))
    assert cache.length == 2


def test_the_step_run_as_it_is_reads_only_the_filled_slots(tiny):
    # On the CPU, uncompiled, nothing needs the step's shapes fixed, so its attention reads the slots filled so far and
    # no more (at a chat's 4096-slot cache, most of them empty). NaN in every unfilled value would poison any output
    # that read them, masked or not (0 * NaN): the logits are a clean cache's.
    from nanovl.generate import DecodeStep
    llm = tiny.llm
    caches = [llm.new_cache(1, 32) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            llm(torch.tensor([[5, 9, 14, 200]]), cache=cache)
        for v in caches[1].v:
            v[:, :, caches[1].length:] = float("nan")
        steps = [DecodeStep(llm, cache) for cache in caches]
        tok = torch.tensor([[40]])
        for _ in range(3):
            expected, got = (step(tok) for step in steps)
            assert torch.isfinite(got).all() and torch.equal(got, expected)
            tok = expected.argmax(-1, keepdim=True)


def test_generation_ends_each_row_with_its_stop_id(tiny, tok):
    prompts = [tok.encode("what colour is the circle?"), tok.encode("red")]
    free = generate(tiny, prompts, sampling=Sampling(max_new_tokens=6))
    stop = free[0][2]  # row 0's third token (or an earlier one, if it said it before)
    got = generate(tiny, prompts, sampling=Sampling(max_new_tokens=6), stop_ids={stop})
    for row, expected in zip(got, free):  # each row up to and including its first stop id, if it says it
        assert row == expected[:expected.index(stop) + 1 if stop in expected else None]
    assert got[0][-1] == stop


def test_sampling_settings_out_of_range_are_refused_and_the_smallest_allowed_ones_still_sample():
    for bad, message in [(dict(temperature=float("inf")), r"temperature must be 0 \(greedy\), or at least 1e-4 and "
                                                          "finite in fp32, got inf"),
                         # (finite in Python, inf in fp32: the image token's -inf logit divided by it was NaN)
                         (dict(temperature=1e39), "temperature must be .* finite in fp32, got 1e\\+39"),
                         (dict(repetition_penalty=1e39), "repetition_penalty must be .* finite in fp32"),
                         (dict(temperature=1e-40), "temperature must be"), (dict(temperature=float("nan")), "temper"),
                         (dict(repetition_penalty=1e-40), "repetition_penalty must be at least 1e-4 and finite"),
                         (dict(repetition_penalty=float("inf")), "repetition_penalty must be"),
                         (dict(seed=2 ** 64), "seed must be a 64-bit integer"),
                         (dict(seed=-2 ** 63 - 1), "seed must be a 64-bit integer"),
                         (dict(top_k=-1, temperature=1.0), r"top_k must be >= 0 \(0: off\), got -1"),
                         (dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\] \(1: off\), got 0.0"),
                         (dict(top_k=True, temperature=1.0), "top_k must be an integer, got True"),
                         (dict(max_new_tokens=2.5), "max_new_tokens must be an integer, got 2.5"),
                         (dict(top_k="5"), "top_k must be an integer, got '5'"),
                         (dict(top_p=None), "top_p must be a number, got None")]:
        with pytest.raises(ValueError, match=message):
            Sampling(**bad).check()
    # Logits as large as any model gives, divided by the penalty then the temperature, stay finite: they sample.
    logits = torch.tensor([[30.0, 40.0, 39.9, -30.0]])
    s = Sampling(temperature=1e-4, repetition_penalty=1e-4).check()
    assert [int(pick(logits, torch.tensor([[1]]), s, torch.Generator().manual_seed(i))) for i in range(5)] == [1] * 5
    # Both ends of the seed's range are seeds torch.Generator takes (it reads a negative one as its two's complement).
    for seed in (-2 ** 63, 2 ** 64 - 1):
        assert Sampling(seed=seed).check().seed == seed
        torch.Generator().manual_seed(seed)
    with pytest.raises(ValueError, match="temperature must be 0 .greedy., or at least 1e-4"):  # (not OverflowError)
        Sampling(temperature=10 ** 400).check()
    # numpy's numbers are numbers (they were refused as "must be an integer, got np.int64(8)"), taken as Python's
    s = Sampling(max_new_tokens=np.int64(8), temperature=np.float32(0.5), top_k=np.int32(3), seed=np.uint64(5)).check()
    assert [(type(v), v) for v in (s.max_new_tokens, s.temperature, s.top_k, s.seed)] == \
        [(int, 8), (float, 0.5), (int, 3), (int, 5)]
    with pytest.raises(ValueError, match="max_new_tokens must be an integer, got np.float64"):
        Sampling(max_new_tokens=np.float64(8)).check()


def test_the_default_sampling_is_the_official_inference_example():
    # inference.py in the official repository: do_sample=False, max_new_tokens=512 (facts section 9).
    s = Sampling()
    assert (s.temperature, s.max_new_tokens, s.top_k, s.top_p, s.repetition_penalty) == (0.0, 512, 0, 1.0, 1.0)


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.zeros(1, 10)
    draws = lambda seed, **kw: [int(pick(logits, torch.empty(1, 0, dtype=torch.long),
                                         Sampling(**{"temperature": 1.0, **kw}),
                                         torch.Generator().manual_seed(seed + i))) for i in range(50)]
    assert draws(0) == draws(0) and draws(0) != draws(1)
    logits[0, 3], logits[0, 7] = 5.0, 4.0
    assert set(draws(0, top_k=2)) == {3, 7}
    assert set(draws(0, top_p=0.5)) == {3}
    wide = warp(logits, torch.empty(1, 0, dtype=torch.long), Sampling(temperature=1.0, top_k=50))
    assert torch.isfinite(wide).all()  # a k past the vocabulary keeps every token (HF's min(k, V))
    assert set(draws(0, top_k=1)) == {3}  # k=1 samples the likeliest alone
    cut = warp(torch.tensor([[10.0, 0, 0, 0]]), torch.empty(1, 0, dtype=torch.long),
               Sampling(temperature=1.0, top_p=0.995))
    assert torch.isfinite(cut).tolist() == [[True, False, False, False]]  # 0.99986 of the mass: p close to 1 cuts too
    logits[0, 7] = 5.0 - 1e-4
    assert set(draws(0, temperature=1e-4)) == {3, 7}  # the smallest temperature still samples: e^1 to 1 here


def test_top_p_keeps_a_token_only_while_those_above_it_fall_short_of_p_as_hf_does():
    # Four equal tokens have probabilities of exactly 0.25, so the tokens above the third add up to exactly 0.5: at
    # top_p=0.5 the first two are kept and the third is dropped, as HF's TopPLogitsWarper drops it (the boundary a
    # random test never meets).
    logits = torch.zeros(1, 4)
    got = warp(logits, torch.empty(1, 0, dtype=torch.long), Sampling(temperature=1.0, top_p=0.5))
    expected = TopPLogitsWarper(0.5)(None, logits.clone())
    assert int(torch.isfinite(got).sum()) == int(torch.isfinite(expected).sum()) == 2
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))  # which two: of tied tokens, the ones HF keeps


def test_top_p_cuts_where_hf_does_over_the_released_vocabulary():
    # Over 102,400 tokens a sum of probabilities run from the most likely token sits near 1, where fp32 rounding
    # moved the cut by one token in 4 of these 80 rows (up to half, for other spreads); the small warper test above
    # never sees it.
    torch.manual_seed(0)
    logits = torch.randn(40, 102400) * 2
    for p in (0.9, 0.95):
        got = warp(logits, torch.empty(40, 0, dtype=torch.long), Sampling(temperature=1.0, top_p=p))
        expected = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
        assert torch.equal(got[torch.isfinite(got)], expected[torch.isfinite(expected)])


def test_a_chat_draws_its_turns_from_one_random_stream_and_reset_starts_a_new_chat(tiny, tok):
    # Each turn was seeded anew, so every turn drew the same random numbers (the official CLI seeds once a process).
    proc = ImageProcessor.for_config(tiny.cfg)
    s = Sampling(max_new_tokens=8, temperature=5.0, seed=3)  # (hot: each token nearly uniform over the vocabulary)
    chat = ChatSession(tiny, tok, proc)
    first = chat.ask("hello", [], s)
    # its first turn draws what generate draws from the same seed: the stream starts at the seed
    prompt = render_chat([{"role": "user", "content": "hello"}], tok, tiny.cfg.n_image_tokens, generation_prompt=True)
    drawn = generate(tiny, [prompt[0]], sampling=s, stop_ids={tok.eos_id}, pad_id=tok.pad_id, n_words=tok.vocab_size)
    assert tok.decode(drawn[0], skip_special_tokens=True).strip() == first
    chat.ask("and?", [], Sampling(max_new_tokens=3))  # a greedy turn between draws nothing, and leaves the stream
    chat.cut = True
    chat.reset()  # the same conversation again, the stream going on
    assert (chat.cache.length, chat.ids, chat.turns, chat.answer, chat.cut) == (0, [], 0, [], False)
    again = chat.ask("hello", [], s)
    assert again != first and first == ChatSession(tiny, tok, proc).ask("hello", [], s)  # (a seed reproduces a chat)
    chat.reset()
    assert chat.ask("hello", [], Sampling(8, 5.0, seed=3)) not in (first, again)  # the stream goes on with its seed
    other = ChatSession(tiny, tok, proc).ask("hello", [], Sampling(8, 5.0, seed=4))
    chat.reset()
    assert other != first and chat.ask("hello", [], Sampling(8, 5.0, seed=4)) == other  # a new seed: a new stream
    # reset leaves nothing of the conversation: greedy, a reset chat answers as a fresh one, token for token
    greedy = Sampling(max_new_tokens=6)
    chat.reset()
    fresh = ChatSession(tiny, tok, proc)
    for message in ("hi", "and then?"):
        assert chat.ask(message, [], greedy) == fresh.ask(message, [], greedy)
        assert (chat.ids, chat.pending) == (fresh.ids, fresh.pending)


def test_a_chat_refuses_what_would_break_every_later_turn(tiny, tok):
    proc = ImageProcessor.for_config(tiny.cfg)
    # An image placeholder in the system prompt was an image span with no image: every turn then failed with "1
    # span(s) of <image_placeholder> tokens are not whole images" (sample.py refused it; the API did not).
    with pytest.raises(ValueError, match="the system prompt holds <image_placeholder>, but images go in messages"):
        ChatSession(tiny, tok, proc, system=f"{IMAGE_TAG} describe")
    # A model moved to another dtype after the chat began: its cache is the old dtype's (advice the session's user
    # can follow, not "make it with this model's new_cache")
    model = copy.deepcopy(tiny)
    chat = ChatSession(model, tok, proc)
    chat.ask("hi", [], Sampling(max_new_tokens=2))
    model.to(torch.float64)
    with pytest.raises(ValueError, match=r"the model was moved to cpu, torch.float64 after this chat began \(its KV "
                                         r"cache is cpu, torch.float32\): start a new ChatSession"):
        chat.ask("and?", [], Sampling(max_new_tokens=2))
    assert ChatSession(model, tok, proc).ask("and?", [], Sampling(max_new_tokens=2)) is not None


def test_generation_is_reproducible_with_a_seed(tiny, tok):
    prompt = tok.encode("what colour", bos=True)
    s = Sampling(max_new_tokens=10, temperature=1.5, seed=7)
    assert generate(tiny, [prompt], sampling=s) == generate(tiny, [prompt], sampling=s)
    assert generate(tiny, [prompt], sampling=s) != generate(tiny, [prompt], sampling=Sampling(10, 1.5, seed=8))


def test_chat_turns_prefill_only_their_new_tokens(tiny, tok, monkeypatch):
    proc = ImageProcessor.for_config(tiny.cfg)
    fed, stepped, images_seen = [], [], []
    forward, decode_step, encode = tiny.llm.forward, tiny.llm.decode_step, tiny.encode_images
    monkeypatch.setattr(tiny.llm, "forward", lambda *a, **k: fed.append(k["embeds"].shape[1]) or forward(*a, **k))
    monkeypatch.setattr(tiny.llm, "decode_step", lambda tok, *a: stepped.append(tuple(tok.shape)) or
                        decode_step(tok, *a))
    monkeypatch.setattr(tiny, "encode_images", lambda x, **k: images_seen.append(len(x)) or encode(x, **k))

    chat = ChatSession(tiny, tok, proc)
    s = Sampling(max_new_tokens=6)
    first = chat.ask(f"{IMAGE_TAG}what colour is the circle?", [picture(3)], s)
    turn1 = render_chat([{"role": "user", "content": f"{IMAGE_TAG}what colour is the circle?"}], tok,
                        tiny.cfg.n_image_tokens, generation_prompt=True)[0]
    assert chat.ids[:len(turn1)] == turn1 and fed[0] == len(turn1)  # the first prefill is the official prompt
    assert chat.pending[-1] == tok.eos_id  # the answer's end (or all of it, see below), fed with the next turn
    fed.clear()
    stepped.clear()
    pending = len(chat.pending)
    second = chat.ask("and the square?", [], s)
    assert fed == [pending + len(chat.turn_ids("and the square?"))]  # one pass over the new message only ...
    assert stepped and set(stepped) == {(1, 1)}  # ... then one token per decoding step,
    assert chat.cache.length == len(chat.ids)  # and the cache holds exactly the ids the session says it does
    assert images_seen == [1]  # the image went through the towers once, in the first turn
    # a message is stripped, as render_chat strips it (the template's prompt_string does)
    assert chat.turn_ids(" and the square? \n") == chat.turn_ids("and the square?")

    # The conversation is the official processor's: the answer is kept as its text and the whole conversation is encoded
    # again (render_chat of the messages), whatever ids the model produced the text with. And the cache is right: the
    # third turn answers as decoding that whole conversation from scratch does.
    pixels = proc(picture(3))[None]
    said = [{"role": "user", "content": f"{IMAGE_TAG}what colour is the circle?"},
            {"role": "assistant", "content": first}, {"role": "user", "content": "and the square?"},
            {"role": "assistant", "content": second}, {"role": "user", "content": "and the sign?"}]
    official = render_chat(said, tok, tiny.cfg.n_image_tokens, generation_prompt=True)[0]
    assert chat.ids + chat.pending == official[:len(chat.ids + chat.pending)]
    third = chat.ask("and the sign?", [], s)
    expected = generate(tiny, [official], pixels, s, stop_ids={tok.eos_id}, n_words=tok.vocab_size)[0]
    assert third == tok.decode([t for t in expected if t not in tok.special_ids]).strip()
    assert chat.cache.length == len(chat.ids)


def test_a_chat_keeps_each_answer_as_the_official_cli_does_as_its_text_encoded_again(tiny, tok, monkeypatch):
    """The official code keeps an answer as its text and encodes the whole conversation again for the next turn.
    Generated ids that are the text's own encoding stay in the cache; any others are dropped from it, and the text's
    ids take their place."""
    import nanovl.generate as generation

    word = next(w for w in TEXT.split() if w.isascii() and len(tok.encode(" " + w)) < len(w) + 1)  # merged ids
    canonical = tok.encode(" " + word)
    spelled = [i for ch in " " + word for i in tok.encode(ch)]  # the same text, an id per character
    proc = ImageProcessor.for_config(tiny.cfg)
    for ids, kept in ((canonical, True), (spelled, False)):
        script = iter(ids + [tok.eos_id])  # the model "answers" with these ids
        monkeypatch.setattr(generation, "pick", lambda *a: torch.tensor([next(script)]))
        chat = ChatSession(tiny, tok, proc)
        assert chat.ask("hello", [], Sampling(max_new_tokens=20)) == word
        turn = start_ids(tok) + chat.turn_ids("hello")
        assert chat.ids == turn + (ids if kept else []) and chat.cache.length == len(chat.ids)
        assert chat.pending == ([] if kept else canonical) + [tok.eos_id]
        assert chat.answer == ids + [tok.eos_id]  # as generated, whatever the cache keeps
    # An answer cut at max_new_tokens: its last token was never fed back, so it starts the next turn, then the
    # end-of-sentence that the template closes every answer with.
    script = iter(canonical)
    monkeypatch.setattr(generation, "pick", lambda *a: torch.tensor([next(script)]))
    chat = ChatSession(tiny, tok, proc)
    assert chat.ask("hello", [], Sampling(max_new_tokens=len(canonical))) == word
    assert chat.ids == turn + canonical[:-1] and chat.pending == canonical[-1:] + [tok.eos_id]
    # An answer that spells out <image_placeholder> in ordinary pieces keeps them: encoded again, the text would be an
    # image slot with no image, and every later turn would be refused.
    pieces = [i for part in (" <", "image", "_", "placeholder", ">") for i in tok.encode(part)]
    assert tok.image_id in tok.encode(tok.decode(pieces))
    script = iter(pieces + [tok.bos_id, tok.eos_id])  # (and a stray special token, which is no text: left out)
    monkeypatch.setattr(generation, "pick", lambda *a: torch.tensor([next(script)]))
    chat = ChatSession(tiny, tok, proc)
    assert chat.ask("hello", [], Sampling(max_new_tokens=30)) == IMAGE_TAG
    assert tok.image_id not in chat.ids + chat.pending and chat.pending == pieces + [tok.eos_id]
    monkeypatch.setattr(generation, "pick", lambda *a: torch.tensor([tok.eos_id]))
    before = list(chat.ids + chat.pending)
    # An empty answer is rendered as the bare "Assistant:" (conversation.py), with no end-of-sentence after it.
    assert chat.ask("and then?", [], Sampling(max_new_tokens=3)) == ""  # the next turn goes through
    assert chat.ids == before + chat.turn_ids("and then?") and chat.pending == []


def test_the_streamed_answer_is_the_text_returned_without_special_tokens(tiny, tok, monkeypatch):
    import nanovl.generate as generation
    script = iter(tok.encode(" Hi") + [tok.bos_id] + tok.encode(" there") + [tok.eos_id])  # a stray special token
    monkeypatch.setattr(generation, "pick", lambda *a: torch.tensor([next(script)]))
    shown = []
    chat = ChatSession(tiny, tok, ImageProcessor.for_config(tiny.cfg))
    assert chat.ask("hello", [], Sampling(max_new_tokens=20), on_text=shown.append) == "Hi there" == "".join(shown)


def test_a_character_split_across_tokens_is_streamed_once_it_is_whole(tok):
    from nanovl.generate import TextStream
    ids = tok.encode(" café €5")
    assert len(tok.encode("€")) == 3  # three byte tokens, none a character by itself
    shown = []
    stream = TextStream(tok, shown.append)
    for t in ids + [tok.eos_id]:  # (the end-of-sentence adds no text: nothing is shown for it)
        stream.add(t)
        with pytest.raises(ValueError):  # a bad id is refused, and not kept: it broke every later add
            stream.add("x")
    assert "".join(shown) == "café €5" and all(piece and "\ufffd" not in piece for piece in shown)
    # An answer that ends inside a character (cut by max_new_tokens): finish shows it as the returned text has it
    shown = []
    stream = TextStream(tok, shown.append)
    for t in tok.encode(" café €")[:-1]:  # the euro sign's last byte never comes
        stream.add(t)
    assert "".join(shown) == "café "
    stream.finish()
    assert "".join(shown) == tok.decode(tok.encode(" café €")[:-1]).lstrip() == "café \ufffd"


def test_a_chat_answer_streams_all_of_the_text_it_returns(tiny, tok, monkeypatch):
    # (cut inside a character by max_new_tokens: the stream held the last piece back, and never showed it)
    import nanovl.generate as generation
    script = iter(tok.encode(" é")[:-1] + tok.encode(" more"))
    monkeypatch.setattr(generation, "pick", lambda *a: torch.tensor([next(script)]))
    shown = []
    chat = ChatSession(tiny, tok, ImageProcessor.for_config(tiny.cfg))
    answer = chat.ask("hello", [], Sampling(max_new_tokens=len(tok.encode(" é")) - 1), on_text=shown.append)
    assert answer == "".join(shown) == "\ufffd"


def test_a_bad_turn_leaves_the_session_as_it_was(tiny, tok, tmp_path):
    proc = ImageProcessor.for_config(tiny.cfg)
    # Another model's tokenizer, or no system prompt given as None: named when the session starts (the first was
    # found later as "expected 0 images for 0 <image_placeholder> tokens" for a message that has one)
    with pytest.raises(ValueError, match=r"the tokenizer given has 300 tokens .*; the .* model has a vocabulary of 28"):
        ChatSession(tiny, Tokenizer.train([TEXT + " abcdefghijklmnopqrstuvwxyz zyxwv"], 300), proc)
    with pytest.raises(ValueError, match=r"expected the system prompt as a string \('' for none\), got NoneType"):
        ChatSession(tiny, tok, proc, system=None)
    s = Sampling(max_new_tokens=5)
    chat, fresh = ChatSession(tiny, tok, proc), ChatSession(tiny, tok, proc)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    for content, images, message in [(f"{IMAGE_TAG}{IMAGE_TAG}two?", [picture(1)], "2 <image_placeholder> but 1"),
                                     (f"{IMAGE_TAG}this?", [str(bad)], "cannot read image"),
                                     (f"{IMAGE_TAG}this?", [42], "a PIL image or a path, got int"),
                                     (f"{IMAGE_TAG}this?", str(bad), "images as a list of PIL images or paths "
                                                                     r"\(\[image\] for one\), got str"),
                                     (f"{IMAGE_TAG}this?", [Image.new("RGB", (0, 3))], "0x3 pixels"),
                                     (None, [], "expected the message as a string, got NoneType"),
                                     ("red " * 600, [], "shorten the message .or the system prompt.$"),
                                     (f"{IMAGE_TAG}this?", [picture(1), picture(2)], "1 <image_placeholder> but 2"),
                                     (" \n", [], "the message is empty")]:
        with pytest.raises(ValueError, match=message):
            chat.ask(content, images, s)
        assert chat.cache.length == 0 and chat.ids == [] and chat.turns == 0
    # A turn that fails halfway, after its prompt and some answer tokens are in the cache, is forgotten as well.

    def printer_breaks(text):
        raise RuntimeError("the printer broke")

    with pytest.raises(RuntimeError, match="the printer broke"):
        chat.ask(f"{IMAGE_TAG}what?", [picture(4)], s, on_text=printer_breaks)
    assert chat.cache.length == 0 and chat.ids == [] and chat.turns == 0

    def ctrl_c(text):
        raise KeyboardInterrupt  # (Ctrl-C while the answer streams: sample.py's chat then takes the next message)

    with pytest.raises(KeyboardInterrupt):
        chat.ask(f"{IMAGE_TAG}what?", [picture(4)], s, on_text=ctrl_c)
    assert chat.cache.length == 0 and chat.ids == [] and chat.turns == 0
    # A turn must leave at least one slot of the cache free, for the answer's first token to be fed back.
    turn = len(start_ids(tok) + chat.turn_ids("hello"))
    with pytest.raises(ValueError, match=f"this turn would make the conversation {turn} tokens long, but the context "
                                         f"holds {turn}"):
        ChatSession(tiny, tok, proc, max_len=turn).ask("hello", [], s)
    assert ChatSession(tiny, tok, proc, max_len=turn + 1).ask("hello", [], s) is not None
    assert chat.ask(f"{IMAGE_TAG}what?", [picture(4)], s) == fresh.ask(f"{IMAGE_TAG}what?", [picture(4)], s)
    # later in a chat, what was said before fills it too
    with pytest.raises(ValueError, match=r"start a new chat \(reset\)$"):
        chat.ask("red " * 600, [], s)
    many = 1 + tiny.cfg.llm.max_seq_len // tiny.cfg.n_image_tokens  # images alone fill the context
    with pytest.raises(ValueError, match=rf"shorten the message \(or the system prompt\), or give fewer images \(each "
                                         rf"takes {tiny.cfg.n_image_tokens} tokens\)$"):
        ChatSession(tiny, tok, proc).ask(IMAGE_TAG * many + "what?", [picture(4)] * many, s)


def test_generate_builds_no_autograd_graph(tiny):
    # (a function put between generate and its no_grad decorator took the decorator: every step then kept its graph)
    # A decoder layer runs in the prefill and in every step (Llama.decode_step is a method, which a hook on the Llama
    # module itself would not see): the prefill and two steps, the third token never fed back.
    grad_on = []
    handle = tiny.llm.layers[0].register_forward_pre_hook(lambda module, args: grad_on.append(torch.is_grad_enabled()))
    try:
        generate(tiny, [[1, 5, 6]], sampling=Sampling(max_new_tokens=3))
    finally:
        handle.remove()
    assert len(grad_on) == 3 and not any(grad_on)


def test_prompt_longer_than_the_context_or_empty_is_refused(tiny, tok):
    with pytest.raises(ValueError, match="context is 512"):
        generate(tiny, [[1] * 600])
    with pytest.raises(ValueError, match="the longest prompt has 512 tokens but the model's context is 512: at least "
                                         "one token must fit after it"):
        generate(tiny, [[1] * 512])
    # One token short of the context: that token, and one more (its logits need no slot of the cache).
    assert len(generate(tiny, [[1] * 511], sampling=Sampling(max_new_tokens=5))[0]) == 2
    for prompts in ([], [[1, 2], []]):
        with pytest.raises(ValueError, match="one or more prompts of at least one token each"):
            generate(tiny, prompts)
    # Arguments of the wrong kind are named, not met by a TypeError deep inside (a flat list of ids was "object of
    # type 'int' has no len()"); a (B, T) tensor of ids is taken as B prompts.
    s = Sampling(max_new_tokens=3)
    assert generate(tiny, torch.tensor([[1, 5, 6]]), sampling=s) == generate(tiny, [[1, 5, 6]], sampling=s) == \
        generate(tiny, torch.tensor([1, 5, 6]), sampling=s)  # and a 1-D tensor as one prompt
    for kwargs, message in ((dict(prompts=[1, 5, 6]), r"prompts as a list of token-id lists \(one per prompt: "),
                            (dict(prompts=[[1, 5]], stop_ids=2), "stop_ids as a collection of token ids"),
                            (dict(prompts=[[1, 5]], stop_ids=None), r"stop_ids .* \(\{eos_id\} for one\), got None"),
                            (dict(prompts=[[1, 5]], sampling={"max_new_tokens": 3}), "sampling=Sampling"),
                            (dict(prompts=[[1] + [3] * 36], images=[torch.rand(3, 256, 256)]), "images as one"),
                            (dict(prompts=[[1, 5]], n_words=1), "n_words .* above the image token's id 3 and at most "
                                                                "the model's 280, got 1"),
                            (dict(prompts=[[1, 5]], n_words=0), "got 0"), (dict(prompts=[[1, 5]], n_words=281),
                                                                          "got 281"),
                            (dict(prompts=[[1, 5]], n_words=3), "got 3"),  # the image token's id: not above it
                            (dict(prompts=[[1, 5]], pad_id=-1), r"pad_id must be a token id, 0 to 279 \(the "
                                                                r"tokenizer's pad_id\), got -1"),
                            (dict(prompts=[[1, 5]], pad_id=280), "got 280"),
                            (dict(prompts=[[1, 5]], pad_id=200, n_words=200), r"0 to 199 .* got 200"),
                            # bools pass for ids 0 and 1 in Python, which the model refuses
                            (dict(prompts=[[True, False]]), "prompts as a list of token-id lists"),
                            (dict(prompts=torch.tensor([[1, 0]], dtype=torch.bool)), "got \\[\\[True, False\\]\\]"),
                            (dict(prompts=[[1, 5]], pad_id=True), "pad_id must be a token id"),
                            (dict(prompts=[[1, 5]], stop_ids=[True]), "stop_ids as a collection of token ids")):
        with pytest.raises(ValueError, match=message):
            generate(tiny, **kwargs)
    # A generator is read once: stop_ids' check used it up (no row ever stopped), and prompts' left none
    free = generate(tiny, [[1, 5, 6]], sampling=s)[0]
    assert generate(tiny, [[1, 5, 6]], sampling=s, stop_ids=(t for t in [free[0]])) == [free[:1]]
    assert generate(tiny, (p for p in [[1, 5, 6]]), sampling=s) == [free]


def test_decoding_under_autocast_writes_the_cache_in_its_own_dtype(tiny):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # values come in bf16, the cache is fp32: written all the same
        assert len(generate(tiny, [[1, 5, 6]], sampling=Sampling(max_new_tokens=3))[0]) == 3
    # (here the rotary tables' fp32 brings the keys back to fp32; a step given bf16 keys converts them itself)
    from nanovl.llama import CacheSlot
    cache = tiny.llm.new_cache(1, 4)
    k = torch.randn(1, tiny.cfg.llm.n_kv_heads, 1, tiny.cfg.llm.head_dim, dtype=torch.bfloat16)
    keys, values = CacheSlot(cache, torch.tensor([2])).update(0, k, k)
    assert keys.dtype == values.dtype == torch.float32 and torch.equal(keys[:, :, 2:3], k.float())


@pytest.fixture(scope="module")
def stage_folder(tiny, tok, tmp_path_factory):
    """A trained-looking stage folder: model.pt and tokenizer.json, as train.py writes them."""
    folder = tmp_path_factory.mktemp("stage3")
    torch.save({"model": tiny.state_dict(), "config": tiny.cfg.to_dict()}, folder / "model.pt")
    tok.save(folder / "tokenizer.json")
    picture(5, (64, 48)).save(folder / "cat.png")
    return folder


def test_the_readmes_python_chat_runs_as_written(stage_folder, tok, tmp_path, capsys, monkeypatch):
    # The README's snippet of the library's chat API (load_model, render_chat, generate, the loss on an answer,
    # ChatSession), run as written in a folder laid out as it expects: out/stage3 and one of data/'s images. (Random
    # weights never say their end-of-sentence: each chat answer runs to the 512 new tokens, which the context holds.)
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    code = readme.split("## Chat: `sample.py`", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    folder = tmp_path / "out" / "stage3"
    folder.mkdir(parents=True)
    cfg = get_config("tiny", **{"llm.vocab_size": tok.vocab_size, "llm.max_seq_len": 1536})
    torch.save({"model": DeepSeekVL(cfg).state_dict(), "config": cfg.to_dict()}, folder / "model.pt")
    tok.save(folder / "tokenizer.json")
    (tmp_path / "data" / "images" / "caption").mkdir(parents=True)
    os.symlink(stage_folder / "cat.png", tmp_path / "data" / "images" / "caption" / "eval_000000.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    loss = [line for line in out.splitlines() if line.startswith("loss ")]
    assert len(loss) == 1 and 0 < float(loss[0].split()[1]) < 20, out


def test_sample_answers_a_prompt_and_streams_the_text(stage_folder, tiny, tok, capsys, monkeypatch):
    streamed = []  # what had been printed by the time generation ended

    def spy(*a, **k):
        ids = generate(*a, **k)
        streamed.append(capsys.readouterr().out)
        return ids

    monkeypatch.setattr(sample, "generate", spy)
    sample.main(["--ckpt", str(stage_folder), "--image", str(stage_folder / "cat.png"), "--prompt", "what colour?",
                 "--max_new_tokens", "8"])
    out = streamed[0] + capsys.readouterr().out
    assert streamed[0].strip() and streamed[0].strip() == out.strip()  # the whole answer, printed as it came
    proc = ImageProcessor.for_config(tiny.cfg)
    ids = render_chat([{"role": "user", "content": f"{IMAGE_TAG}what colour?"}], tok, tiny.cfg.n_image_tokens,
                      generation_prompt=True)[0]
    expected = generate(tiny, [ids], proc(stage_folder / "cat.png")[None], Sampling(8), stop_ids={tok.eos_id},
                        n_words=tok.vocab_size)[0]
    assert out.strip() == tok.decode([t for t in expected if t != tok.eos_id]).strip()


def test_sample_streams_an_answer_cut_inside_a_character_whole(stage_folder, tok, capsys, monkeypatch):
    # (the stream held the incomplete character back, and the answer's last piece was never printed)
    import nanovl.generate as generation
    script = iter(tok.encode(" é")[:-1])
    monkeypatch.setattr(generation, "pick", lambda *a: torch.tensor([next(script)]))
    sample.main(["--ckpt", str(stage_folder), "--prompt", "hello", "--max_new_tokens", str(len(tok.encode(" é")) - 1)])
    assert capsys.readouterr().out.strip() == "\ufffd"


def test_sample_answers_a_batch_of_prompts_each_with_its_own_answer(stage_folder, tiny, tok, capsys, monkeypatch):
    # Two prompts, the image's placeholder written where it belongs, no system prompt: each printed answer is its
    # own prompt's (decoded alone, with the same template).
    prompts = [f"{IMAGE_TAG}what colour?", "and the sign says"]
    args = ["--ckpt", str(stage_folder), "--image", str(stage_folder / "cat.png"), "--system", "",
            "--max_new_tokens", "5"]
    asked = []  # the prompts' ids, as sample.py hands them to generate
    monkeypatch.setattr(sample, "generate", lambda model, ids, *a, **k: asked.append(ids) or generate(model, ids, *a,
                                                                                                      **k))
    sample.main(args + [x for p in prompts for x in ("--prompt", p)])
    out = capsys.readouterr().out
    assert asked == [[render_chat([{"role": "user", "content": p}], tok, tiny.cfg.n_image_tokens, system="",
                                  generation_prompt=True)[0] for p in prompts]]
    pixels = ImageProcessor.for_config(tiny.cfg)(stage_folder / "cat.png")[None]
    for p, images in zip(prompts, (pixels, None)):
        ids = render_chat([{"role": "user", "content": p}], tok, tiny.cfg.n_image_tokens, system="",
                          generation_prompt=True)[0]
        alone = generate(tiny, [ids], images, Sampling(5), stop_ids={tok.eos_id}, n_words=tok.vocab_size)[0]
        assert f"User: {p}\nAssistant: {tok.decode([t for t in alone if t != tok.eos_id]).strip()}\n" in out
    sample.main(["--ckpt", str(stage_folder), "--prompt", "hello", "--max_new_tokens", "3"])  # text only: no image


def test_sample_rounds_the_rope_frequencies_to_its_dtype_when_asked(stage_folder, monkeypatch, capsys):
    from nanovl.llama import rope_cos_sin
    tables = []  # the rotary cos table of the model sample.py decodes with
    monkeypatch.setattr(sample, "generate", lambda model, *a, **k: tables.append(model.llm.rope_cos) or
                        generate(model, *a, **k))
    for extra in ([], ["--official_rope"]):
        sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--max_new_tokens", "2", "--dtype", "bf16"] + extra)
    cfg = get_config("tiny").llm
    exact, rounded = (rope_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, freq_dtype=d)[0]
                      for d in (torch.float32, torch.bfloat16))
    assert torch.equal(tables[0], exact) and torch.equal(tables[1], rounded) and not torch.equal(exact, rounded)
    with pytest.raises(SystemExit, match=r"in fp32 there is nothing to round \(--dtype auto on cpu\): add --dtype "
                                         r"bf16"):
        sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--official_rope", "--device", "cpu"])


def test_sample_says_when_the_context_cut_an_answer(stage_folder, tiny, tok, capsys):
    ctx = tiny.cfg.llm.max_seq_len
    words = 1
    while len(render_chat([{"role": "user", "content": "hello " * (words + 1)}], tok, tiny.cfg.n_image_tokens,
                          generation_prompt=True)[0]) < ctx - 2:
        words += 1  # a prompt that leaves room for 3 new tokens at most, of the 20 asked for
    prompt = "hello " * words
    ids = render_chat([{"role": "user", "content": prompt}], tok, tiny.cfg.n_image_tokens, generation_prompt=True)[0]
    out = generate(tiny, [ids], None, Sampling(20), stop_ids={tok.eos_id}, n_words=tok.vocab_size)[0]
    assert tok.eos_id not in out and len(out) == ctx - len(ids) + 1 < 20  # what sample.py will get: a cut answer
    note = f"(cut: the prompt and the answer fill the model's context of {ctx} tokens)"
    sample.main(["--ckpt", str(stage_folder), "--prompt", prompt, "--max_new_tokens", "20"])
    assert capsys.readouterr().out.rstrip().endswith("\n" + note)  # one prompt: on a line after its streamed answer
    sample.main(["--ckpt", str(stage_folder), "--prompt", prompt, "--prompt", "hi", "--max_new_tokens", "20"])
    printed = capsys.readouterr().out  # a batch: every row ends where the longest prompt's context does
    assert printed.count(note.replace("the prompt", "the longest prompt of the batch")) == 2
    sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--max_new_tokens", "3"])
    assert "cut:" not in capsys.readouterr().out  # an answer that stopped at --max_new_tokens was not cut
    sample.main(["--ckpt", str(stage_folder), "--prompt", prompt, "--max_new_tokens", str(len(out))])
    assert "cut:" not in capsys.readouterr().out  # nor one that reached both limits at once


def test_an_empty_answer_says_whether_the_model_ended_at_once_or_wrote_only_white_space(stage_folder, tok, capsys,
                                                                                      monkeypatch):
    newline = tok.encode("\n")
    assert tok.decode(newline * 3).strip() == ""
    answers = {"hi": [tok.eos_id], "yo": newline * 3 + [tok.eos_id], "eh": newline * 4,  # (out of tokens)
               "sp": [tok.bos_id] + newline + [tok.eos_id]}  # (a special token: no text either)

    def answering(model, ids, *a, **k):  # each prompt's answer, padded as generate pads a batch
        rows = [answers[tok.decode(row).split("User: ")[-1].split("\n")[0]] for row in ids]
        return torch.tensor([row + [tok.pad_id] * (4 - len(row)) for row in rows])

    monkeypatch.setattr(sample, "generate", answering)
    at_once = "(no answer: the model ended its turn at once; an undertrained model often does)"
    spaces = "(no answer: the model wrote only white space, {} token(s); an undertrained model often does)"
    sample.main(["--ckpt", str(stage_folder), "--prompt", "hi"])
    assert capsys.readouterr().out.strip().endswith(at_once)
    sample.main(["--ckpt", str(stage_folder), "--prompt", "yo"])
    assert capsys.readouterr().out.strip().endswith(spaces.format(3))
    sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--prompt", "yo", "--prompt", "eh"])
    printed = capsys.readouterr().out
    assert f"User: hi\nAssistant: {at_once}\n" in printed and f"User: yo\nAssistant: {spaces.format(3)}\n" in printed
    assert f"User: eh\nAssistant: {spaces.format(4)}\n" in printed
    sample.main(["--ckpt", str(stage_folder), "--prompt", "sp"])
    assert capsys.readouterr().out.strip().endswith(spaces.format(2).replace("white space", "white space and special "
                                                                             "tokens"))

    class Answering(ChatSession):  # the chat: the answer's ids as the session generated them
        def ask(self, content, *a, **k):
            self.answer = answers[content]
            return ""

    lines = iter(["hi", "yo", "exit"])
    monkeypatch.setattr(sample, "ChatSession", Answering)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    sample.main(["--ckpt", str(stage_folder)])
    printed = capsys.readouterr().out
    assert f"Assistant: {at_once}\n" in printed and f"Assistant: {spaces.format(3)}\n" in printed


def test_a_loaded_model_owns_its_weights_so_that_its_file_may_be_written_over(stage_folder, tiny, tmp_path):
    # Read memory-mapped, the weights stayed views of the file's pages: a file written over in place (torch.save to
    # the same path, after fine-tuning) changed the model under its user, or crashed the process with a bus error.
    from nanovl.checkpoint import load_model
    folder = tmp_path / "stage"
    shutil.copytree(stage_folder, folder)
    ids = torch.tensor([[1, 5, 6, 7]])
    other = {k: torch.randn_like(v) for k, v in tiny.state_dict().items()}
    torch.save({"model": other, "config": tiny.cfg.to_dict()}, tmp_path / "other.pt")  # (the same size)
    for dtype in (None, torch.float32, torch.bfloat16):
        shutil.copyfile(stage_folder / "model.pt", folder / "model.pt")
        model, _, _ = load_model(folder, dtype=dtype)
        with torch.no_grad():
            before = model(ids)[0]
            shutil.copyfile(tmp_path / "other.pt", folder / "model.pt")  # written over in place, not replaced
            assert torch.equal(model(ids)[0], before), dtype


def test_load_model_takes_a_dtype_and_a_tokenizer_and_refuses_one_that_does_not_fit(stage_folder, tiny, tok,
                                                                                  tmp_path):
    import dataclasses
    import shutil
    from nanovl.checkpoint import load_model
    model, _, _ = load_model(stage_folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    bare = tmp_path / "bare"  # weights without a tokenizer beside them
    bare.mkdir()
    shutil.copy(stage_folder / "model.pt", bare / "model.pt")
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_model(bare)
    _, given, _ = load_model(bare, tokenizer=stage_folder / "tokenizer.json")
    assert given.encode("the circle is red") == tok.encode("the circle is red")
    other = dataclasses.replace(tiny.cfg, image_token_id=tok.image_id + 1)  # a model that reads images elsewhere
    torch.save({"model": DeepSeekVL(other).state_dict(), "config": other.to_dict()}, bare / "model.pt")
    with pytest.raises(ValueError, match=f"<image_placeholder> = {tok.image_id}; the 'tiny' model .* expects "
                                         f"{tok.image_id + 1}"):
        load_model(bare, tokenizer=stage_folder / "tokenizer.json")
    # A scratch preset's tokenizer was made at its vocabulary size: a smaller one is another tokenizer (train.py
    # refuses it the same way), whose ids would mean other words to the model.
    Tokenizer.train([TEXT], tok.vocab_size - 10).save(bare / "small.json")
    shutil.copy(stage_folder / "model.pt", bare / "model.pt")  # (the right model again, without a tokenizer)
    with pytest.raises(ValueError, match=f"small.json has {tok.vocab_size - 10} tokens and <image_placeholder> = "
                                         f"{tok.image_id}; the 'tiny' model has a vocabulary of {tok.vocab_size} and"):
        load_model(bare, tokenizer=bare / "small.json")
    # One of the same size, beside weights saved with their own: two ids swapped turn the same text into other ids.
    write_swapped_tokenizer((stage_folder / "tokenizer.json").read_text(encoding="utf-8"), bare / "swapped.json")
    with pytest.raises(ValueError, match=r"--tokenizer .*swapped.json differs from .*tokenizer.json, the tokenizer "
                                         "saved with the weights"):
        load_model(stage_folder, tokenizer=bare / "swapped.json")
    assert load_model(stage_folder, tokenizer=stage_folder)[1].same_ids(tok)  # the saved one itself, as its folder
    shutil.copy(stage_folder / "tokenizer.json", bare / "copy.json")
    assert load_model(stage_folder, tokenizer=bare / "copy.json")[1].same_ids(tok)  # or a copy of it, elsewhere
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*typo.json, the --tokenizer given"):
        load_model(stage_folder, tokenizer=bare / "typo.json")
    # Weights alone, as train.py writes them now, keep the fingerprint of their tokenizer: another of the same size
    # given for them (the data folder's, made anew since) is refused; theirs, from anywhere, loads. An older file has
    # none, and takes the swapped one without a word: all it can do.
    load_model(bare, tokenizer=bare / "swapped.json")
    torch.save({"model": tiny.state_dict(), "config": tiny.cfg.to_dict(), "tokenizer": tok.fingerprint()},
               bare / "model.pt")
    with pytest.raises(ValueError, match=rf"swapped.json is not the tokenizer .*bare.model.pt was trained with "
                                         rf"\(fingerprints \w+ and {tok.fingerprint()}\), though it fits the "
                                         "model: the same text would become other ids"):
        load_model(bare, tokenizer=bare / "swapped.json")
    assert load_model(bare, tokenizer=bare / "copy.json")[1].same_ids(tok)
    # From Python: a path that is not one is named (it was pathlib's TypeError), and device None is the default
    for args, kwargs, reason in [((None,), {}, "expected path as a path .*, got NoneType"),
                                 ((stage_folder,), {"tokenizer": 3}, "expected tokenizer as a path .*, got int")]:
        with pytest.raises(ValueError, match=reason):
            load_model(*args, **kwargs)
    assert next(load_model(stage_folder, device=None)[0].parameters()).device.type == "cpu"


def test_an_edited_config_json_beside_model_pt_is_named_not_silently_ignored(stage_folder, tiny, tmp_path):
    import shutil
    import warnings
    from nanovl.checkpoint import load_model
    folder = tmp_path / "stage3"
    shutil.copytree(stage_folder, folder)
    (folder / "config.json").write_text(tiny.cfg.to_json())  # as train.py writes it: loads without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(folder)
    edited = json.loads(tiny.cfg.to_json())
    edited["llm"]["max_seq_len"] *= 2  # a longer context, hoped for
    (folder / "config.json").write_text(json.dumps(edited))
    with pytest.warns(UserWarning, match=r"config.json differs from the config inside .*model.pt \(llm.max_seq_len: "
                                         rf"{2 * tiny.cfg.llm.max_seq_len} there, {tiny.cfg.llm.max_seq_len} in "
                                         r"model.pt\)\. model.pt's config is the one .* editing it changes nothing"):
        model, _, _ = load_model(folder)
    assert model.cfg.llm.max_seq_len == tiny.cfg.llm.max_seq_len
    edited["llm"].update(n_layers=9, n_heads=8, ffn_dim=7)  # four changes: three are named, the rest counted
    (folder / "config.json").write_text(json.dumps(edited))
    with pytest.warns(UserWarning, match=r"\(llm.*; llm.*; llm[^;]*; and 1 more\)\. model.pt's config is the one"):
        load_model(folder)
    (folder / "config.json").write_text("[]")
    with pytest.warns(UserWarning, match=r"config.json is not a JSON object\. model.pt's config is the one"):
        load_model(folder)
    (folder / "config.json").write_text('{"llm": {"max_seq_len": 1024,}}')  # an edit that broke it: said too
    with pytest.warns(UserWarning, match=r"config.json is not valid JSON \(Expecting property name .*\)\. model.pt's"):
        load_model(folder)


def recorded_sessions(monkeypatch) -> list:
    """The list every ChatSession sample.py makes from now on is appended to (the sessions themselves are real)."""
    sessions = []

    class Recorded(ChatSession):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            sessions.append(self)

    monkeypatch.setattr(sample, "ChatSession", Recorded)
    return sessions


def test_interactive_chat_takes_the_system_prompt(stage_folder, monkeypatch, capsys):
    sessions = recorded_sessions(monkeypatch)
    monkeypatch.setattr("builtins.input", lambda prompt="", lines=iter(["hi", "exit"]): next(lines))
    sample.main(["--ckpt", str(stage_folder), "--system", "Answer in one word.", "--max_new_tokens", "2"])
    tok = sessions[0].tok
    assert "Answer in one word." in tok.decode(sessions[0].ids[:30])


def test_a_checkpoint_this_user_may_not_read_is_named_in_a_line(stage_folder, monkeypatch):
    # (root reads any file: the load plays the refusal; a chmod 000 model.pt, read by another user, was checked by hand)
    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(path, "model.pt"))

    monkeypatch.setattr(sample, "load_model", denied)
    with pytest.raises(SystemExit, match=r"^cannot read .*model.pt: Permission denied \(the user running this may "
                                         r"not read it\)$"):
        sample.main(["--ckpt", str(stage_folder), "--prompt", "hi"])
    monkeypatch.setattr(checkpoint, "load_model", denied)  # the export's load, alike
    with pytest.raises(SystemExit, match=r"^cannot read .*model.pt: Permission denied"):
        checkpoint.main(["--ckpt", str(stage_folder), "--export", str(stage_folder / "exported")])


def test_sample_refuses_mismatched_images_and_missing_checkpoints(stage_folder, tmp_path):
    with pytest.raises(SystemExit, match="hold 2 <image_placeholder> but 1 --image"):  # said before the model loads
        sample.main(["--ckpt", str(tmp_path / "nothing"), "--image", str(stage_folder / "cat.png"),
                     "--prompt", f"{IMAGE_TAG}{IMAGE_TAG}same?"])
    with pytest.raises(SystemExit, match="hold 1 <image_placeholder> but 2 --image"):  # and fewer than the images
        sample.main(["--ckpt", str(tmp_path / "nothing"), "--image", str(stage_folder / "cat.png"), "--image",
                     str(stage_folder / "cat.png"), "--prompt", f"{IMAGE_TAG}same?"])
    with pytest.raises(SystemExit, match=r"hold 1 <image_placeholder> but 0 --image were given: give one image per "
                                         r"placeholder, in order \(with several prompts, each places its own\)"):
        sample.main(["--ckpt", str(stage_folder), "--prompt", f"{IMAGE_TAG}same?", "--prompt", "hi"])
    with pytest.raises(SystemExit, match=r"^--prompt holds <image>, LLaVA's tag; DeepSeek-VL's is <image_placeholder>: "
                                         r"write that, or leave it out"):  # (it stayed as text, the image in front)
        sample.main(["--ckpt", str(tmp_path / "nothing"), "--image", str(stage_folder / "cat.png"),
                     "--prompt", "<image>\nWhat colour?"])
    with pytest.raises(SystemExit, match="no checkpoint at .*nothing .nothing there: nanovl reads local folders; a "
                                         "released model is downloaded first"):  # a model's name, not yet fetched
        sample.main(["--ckpt", str(tmp_path / "nothing"), "--prompt", "hi"])
    for stage in ("stage2", "stage3"):
        (tmp_path / "out" / stage).mkdir(parents=True)
        shutil.copy(stage_folder / "model.pt", tmp_path / "out" / stage / "model.pt")
    with pytest.raises(SystemExit, match=r"no checkpoint at .*out.model.pt \(.*out holds the stage folders stage2, "
                                         r"stage3: pass one of them, as .*stage3\)"):  # train.py's --out, not a stage
        sample.main(["--ckpt", str(tmp_path / "out"), "--prompt", "hi"])
    killed = tmp_path / "killed"  # a stage killed before its end: its ckpt.pt, no model.pt
    killed.mkdir()
    (killed / "ckpt.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"no checkpoint at .*killed/model.pt \(the stage has not finished: its "
                                         r"training state .*killed/ckpt.pt loads too, or --resume it to its end\)"):
        sample.main(["--ckpt", str(killed), "--prompt", "hi"])
    for chat in ([], ["--prompt", "hi"]):  # a bad --image, in either mode, is named before the model is loaded
        with pytest.raises(SystemExit, match="nope.png does not exist"):
            sample.main(["--ckpt", str(tmp_path / "nothing"), "--image", str(tmp_path / "nope.png")] + chat)
    with pytest.raises(SystemExit, match="'tpu' is not a device torch knows"):
        sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--device", "tpu"])
    with pytest.raises(SystemExit, match="device 'meta' holds shapes but no values"):
        sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--device", "meta"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="device 'cuda:0', but torch sees no CUDA device$"):
            sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--device", "cuda:0"])
        from nanovl.checkpoint import load_model
        with pytest.raises(ValueError, match="^device 'cuda', but torch sees no CUDA device$"):  # load_model's too
            load_model(str(stage_folder), device=torch.device("cuda"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="empty.pt is not a torch checkpoint .0 bytes"):
        sample.main(["--ckpt", str(tmp_path / "empty.pt"), "--prompt", "hi"])
    with pytest.raises(SystemExit, match=r"^bad sampling settings: top_p must be in \(0, 1\] \(1: off\), got 2.0; "
                                         "max_new_tokens must be >= 1, got 0$"):
        sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--top_p", "2", "--max_new_tokens", "0"])
    for setting in (["--top_k", "5"], ["--top_p", "0.9"]):  # not silently greedy
        with pytest.raises(SystemExit, match="top_k and top_p .* need temperature > 0"):
            sample.main(["--ckpt", str(stage_folder), "--prompt", "hi"] + setting)


@pytest.fixture(autouse=True)
def typed_at_a_terminal(monkeypatch):
    """The chat tests type their lines as a user at a terminal would, where an error is said and the chat goes on
    (under pytest, stdin is no terminal: a chat read from a pipe stops at its first error, tested below)."""
    monkeypatch.setattr(sample, "at_a_terminal", lambda: True)


def test_a_chat_read_from_a_pipe_stops_at_its_first_error(stage_folder, monkeypatch):
    # The lines after a failed one were written for a conversation that did not happen: the question about an image
    # that could not be read must not go without it. A real pipe, so that the terminal test is the real one.
    import subprocess
    lines = "hi\nimage missing.png\nwhat colour is it?\n"
    run = subprocess.run([sys.executable, "sample.py", "--ckpt", str(stage_folder), "--max_new_tokens", "2"],
                         input=lines, capture_output=True, text=True, cwd=os.path.dirname(sample.__file__),
                         timeout=300)
    assert run.returncode == 1 and run.stdout.count("Assistant: ") == 1, (run.stdout, run.stderr)
    assert "\nUser: hi\nAssistant: " in run.stdout  # each line read is shown after its prompt, as one typed is
    # A line that is not UTF-8, under a strict output encoding: shown ("?" for the byte) and refused, not a traceback
    strict = subprocess.run([sys.executable, "sample.py", "--ckpt", str(stage_folder)], input=b"caf\xe9\nhi\n",
                            capture_output=True, cwd=os.path.dirname(sample.__file__), timeout=300,
                            env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"))
    assert strict.returncode == 1 and b"\nUser: caf?\n" in strict.stdout, (strict.stdout, strict.stderr)
    assert b"line 1 of the chat's input: that message is not UTF-8 text" in strict.stderr
    assert "sample.py: line 2 of the chat's input: image missing.png does not exist. Stopping" in run.stderr
    assert "Stopping there, as the input is not a terminal" in run.stderr
    # A message whose image paths the input ends before is dropped: an error too, not a chat that ended well. The
    # line named is the message's (line 2), not its first image's path (line 3).
    monkeypatch.setattr(sample, "at_a_terminal", lambda: False)
    lines = iter(["", f"{IMAGE_TAG} and {IMAGE_TAG}: which is bigger?", str(stage_folder / "cat.png")])

    def typed(prompt=""):
        line = next(lines, None)
        if line is None:  # as input() at the end of the input
            raise EOFError
        return line

    monkeypatch.setattr("builtins.input", typed)
    with pytest.raises(SystemExit, match=r"^sample.py: line 2 of the chat's input: message dropped: the input ended "
                                         r"before the path of its image 2\. Stopping"):
        sample.main(["--ckpt", str(stage_folder), "--max_new_tokens", "2"])
    # Ctrl-C during an answer: the turn is forgotten, so the lines after it cannot go on either
    lines = iter(["hi", "and then?"])

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample.ChatSession, "ask", interrupted)
    with pytest.raises(SystemExit, match=r"^sample.py: line 1 of the chat's input: interrupted: that turn is "
                                         r"forgotten\. Stopping"):
        sample.main(["--ckpt", str(stage_folder), "--max_new_tokens", "2"])


def test_interactive_chat_commands(stage_folder, monkeypatch, capsys):
    cat, missing = stage_folder / "cat.png", stage_folder / "missing.png"
    lines = iter(["\ufeffhelp",  # (the byte-order mark a Windows editor starts a file with: not part of the command)
                  f"image {cat}", f"image {missing}", "what colour?",  # a bad image is said when attached
                  f"{IMAGE_TAG}and this?", str(missing), str(cat),  # and when asked for, which asks again
                  f"{IMAGE_TAG}and that?", "",  # no path: the message is dropped
                  f"image {cat}", "<image> and this one?",  # LLaVA's tag: not sent (it would stay as text)
                  "new", "what is <image> in LLaVA's data?",  # (with no image attached, it is text to ask about)
                  "Exit"])  # (any case)
    sessions = recorded_sessions(monkeypatch)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    sample.main(["--ckpt", str(stage_folder), "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert "commands:" in out and "1 image(s) attached" in out and "2 image(s)" not in out
    assert out.count("missing.png does not exist") == 2 and out.count("; not attached)") == 2
    assert "(message dropped; the conversation is as it was)" in out
    assert (f"(that message holds <image>, LLaVA's tag; DeepSeek-VL's is {IMAGE_TAG}: write that, or leave it out to "
            "put the attached images first; the message was not sent; 1 image(s) stay attached") in out
    assert "(new chat)" in out and len(sessions) == 1 and sessions[0].turns == 1  # 'new' reset the one session
    assert out.count("Assistant: ") == 3 and out.count("LLaVA's tag") == 1


def test_sample_hands_on_its_sampling_flags_and_its_images_in_the_order_given(stage_folder, monkeypatch, capsys,
                                                                             tmp_path):
    # --temperature and the other flags reach generate and the chat (a run that ignored them would decode greedily,
    # unseen), and the images fill the placeholders in the order given: in a prompt, and in the chat, the --image ones
    # first, then those attached, until 'new' drops them.
    from nanovl.image import load_image
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (40, 30), (250, 0, 0)).save(red)
    Image.new("RGB", (30, 40), (0, 0, 250)).save(blue)
    flags = ["--temperature", "0.7", "--top_k", "5", "--top_p", "0.9", "--repetition_penalty", "1.2", "--seed", "3",
             "--max_new_tokens", "2"]
    expected = Sampling(2, 0.7, 5, 0.9, 1.2, 3)
    proc = ImageProcessor.for_config(get_config("tiny"))
    pixels = lambda *paths: torch.stack([proc(load_image(p)) for p in paths])  # noqa: E731

    given, plain = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, ids, images, sampling, **k: given.append((images, sampling))
                        or plain(model, ids, images, sampling, **k))
    sample.main(["--ckpt", str(stage_folder), "--image", str(red), "--image", str(blue), "--prompt",
                 f"{IMAGE_TAG}{IMAGE_TAG}same?"] + flags)
    (images, sampling), = given
    assert sampling == expected and torch.equal(images, pixels(red, blue))

    asked = []

    class Recorded(ChatSession):
        def ask(self, content, images=(), sampling=None, **k):
            asked.append(([proc(image) for image in images], sampling))
            return super().ask(content, images, sampling, **k)

    lines = iter([f"image {blue}", f"{IMAGE_TAG}{IMAGE_TAG}same?", f"image {red}", "new", "hi", "exit"])
    monkeypatch.setattr(sample, "ChatSession", Recorded)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    sample.main(["--ckpt", str(stage_folder), "--image", str(red)] + flags)
    assert [len(images) for images, _ in asked] == [2, 0] and all(s == expected for _, s in asked)
    assert torch.equal(torch.stack(asked[0][0]), pixels(red, blue))
    capsys.readouterr()


def test_interactive_chat_loses_nothing_to_a_failed_turn_or_a_misread_line(stage_folder, monkeypatch, capsys):
    cat = stage_folder / "cat.png"
    asked = []  # (message, number of images) of each turn sample.py asked

    class Recorded(ChatSession):
        def ask(self, content, images=(), *a, **k):
            asked.append((content, len(images)))
            if content.endswith("boom"):
                raise RuntimeError("CUDA out of memory")  # what a GPU says; ask rolls back every exception
            return super().ask(content, images, *a, **k)

    lines = iter(["image of a cat: what colour is it?",  # a message that starts with "image", not a command
                  "image", f"image '{cat}'", f"IMAGE {cat}",  # no path; a quoted one; any case
                  f"image '{cat}", "image ~/cat.png",  # one quote is part of the name; ~ is the home folder
                  "image /no/such folder/cat.png", "image my cat.JPG",  # missing paths with a space: said, not sent
                  "image ./no such/cat",  # (one that starts as a path, without an image's extension)
                  f"{IMAGE_TAG} which?",  # 1 placeholder for 3 images: refused, and all stay attached
                  "boom",  # fails in the model: the images stay attached for the next message
                  "all?",  # gets them all
                  f"{IMAGE_TAG}this?", KeyboardInterrupt(),  # Ctrl-C at the path prompt drops the message
                  KeyboardInterrupt()])  # and at the User prompt leaves, without a traceback

    def typed(prompt=""):
        line = next(lines)
        if isinstance(line, BaseException):
            raise line
        return line

    monkeypatch.setattr(sample, "ChatSession", Recorded)
    monkeypatch.setattr("builtins.input", typed)
    monkeypatch.setenv("HOME", str(stage_folder))
    sample.main(["--ckpt", str(stage_folder), "--max_new_tokens", "2"])
    out = capsys.readouterr().out
    assert asked == [("image of a cat: what colour is it?", 0), (f"{IMAGE_TAG}{IMAGE_TAG}{IMAGE_TAG}boom", 3),
                     (f"{IMAGE_TAG}{IMAGE_TAG}{IMAGE_TAG}all?", 3)]
    assert f"(error: image '{cat} does not exist; not attached)" in out and "3 image(s) attached" in out
    assert "(error: image /no/such folder/cat.png does not exist" in out and "(error: image my cat.JPG does not" in out
    assert "(error: image ./no such/cat does not exist" in out
    assert "(image needs a PATH: image photo.jpg)" in out and "2 image(s) attached" in out
    assert f"(this message has 1 {IMAGE_TAG} for 3 attached images: write one for each, or none to put them all " \
           "first; 3 image(s) stay attached to your next message ('new' drops them))" in out
    assert "(error: CUDA out of memory; the conversation is as it was; 3 image(s) stay attached" in out
    assert "(message dropped; the conversation is as it was)" in out


def test_ctrl_c_while_an_image_loads_drops_that_image_not_the_chat(stage_folder, monkeypatch, capsys):
    cat = stage_folder / "cat.png"
    slow = iter([KeyboardInterrupt(), KeyboardInterrupt()])  # the first two reads are interrupted, as by Ctrl-C

    def read_image(path):
        error = next(slow, None)
        if error:
            raise error
        return sample.load_image(str(cat))

    lines = iter([f"image {cat}",  # interrupted: not attached
                  f"{IMAGE_TAG}this?", str(cat),  # interrupted at the path prompt's read: the message is dropped
                  f"image {cat}", "and now?", "exit"])  # the chat goes on
    monkeypatch.setattr(sample, "read_image", read_image)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    sample.main(["--ckpt", str(stage_folder), "--max_new_tokens", "2"])
    out = capsys.readouterr().out
    assert "(interrupted: that image is not attached)" in out and "(message dropped;" in out
    assert "1 image(s) attached" in out and out.count("Assistant: ") == 1
    monkeypatch.setattr(sample, "load_image", lambda path: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:  # a one-shot --image read interrupted: a line, not PIL's traceback
        sample.main(["--ckpt", str(stage_folder), "--image", str(cat), "--prompt", "hi"])
    assert e.value.code == 130 and "(interrupted)" in capsys.readouterr().err


def test_the_chat_says_when_an_answer_was_cut_by_a_full_context(stage_folder, monkeypatch, capsys):
    class Short(ChatSession):  # a context just long enough for the first turn and 4 answer tokens
        def __init__(self, model, tok, *a, **k):
            turn = start_ids(tok, SYSTEM_PROMPT) + user_ids(tok, "hi") + tok.encode("Assistant:")
            super().__init__(model, tok, *a, **k, max_len=len(turn) + 4)

    monkeypatch.setattr(sample, "ChatSession", Short)
    monkeypatch.setattr("builtins.input", lambda prompt="", lines=iter(["hi", "exit"]): next(lines))
    sample.main(["--ckpt", str(stage_folder), "--max_new_tokens", "50"])
    assert "(the conversation now fills the context of" in capsys.readouterr().out


def test_an_answer_spelt_byte_by_byte_and_cut_by_the_context_is_said_cut(stage_folder, tok, monkeypatch, capsys):
    """A session keeps an answer as its text's own ids when the model spelt it otherwise (here byte by byte, where
    the text encodes to fewer tokens): the cache then ends short of the context, though decoding stopped there."""
    import nanovl.generate
    spelt = [tok._byte_ids[b] for b in b" the circle is red."] * 50  # more than the context holds
    assert len(tok.encode(" the circle is red.")) < len(b" the circle is red.")  # merged, encoded again
    monkeypatch.setattr(nanovl.generate, "pick", lambda logits, generated, s, generator=None: torch.full(
        (logits.shape[0],), spelt[generated.shape[1]], dtype=torch.long))

    class Short(ChatSession):  # room for 40 answer tokens after the first turn
        def __init__(self, model, tok, *a, **k):
            turn = start_ids(tok, SYSTEM_PROMPT) + user_ids(tok, "hi") + tok.encode("Assistant:")
            super().__init__(model, tok, *a, **k, max_len=len(turn) + 39)

    sessions = []
    monkeypatch.setattr(sample, "ChatSession", lambda *a, **k: sessions.append(Short(*a, **k)) or sessions[-1])
    monkeypatch.setattr("builtins.input", lambda prompt="", lines=iter(["hi", "exit"]): next(lines))
    sample.main(["--ckpt", str(stage_folder), "--max_new_tokens", "100"])
    session = sessions[0]
    assert session.cut and session.cache.length + len(session.pending) < session.cache.max_len  # (no longer full)
    assert "(the conversation now fills the context of" in capsys.readouterr().out
    monkeypatch.setattr("builtins.input", lambda prompt="", lines=iter(["hi", "exit"]): next(lines))
    sample.main(["--ckpt", str(stage_folder), "--max_new_tokens", "5"])  # stopped by --max_new_tokens: not cut
    assert not sessions[1].cut and "fills the context" not in capsys.readouterr().out


def test_a_chat_line_that_is_not_utf8_is_named_and_the_chat_goes_on(stage_folder, monkeypatch, capsys):
    # A UTF-8 locale reads the terminal strictly: a Latin-1 line was a UnicodeDecodeError's traceback out of input()
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\nhi\nexit\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)
    sample.main(["--ckpt", str(stage_folder), "--max_new_tokens", "2"])
    out = capsys.readouterr().out
    assert ("(that message is not UTF-8 text: check the terminal's (or the file's) encoding; the conversation is as it "
            "was)") in out
    assert out.count("Assistant: ") == 1  # "hi" was answered


def test_a_chat_message_too_long_is_refused_before_an_answer_starts(stage_folder, monkeypatch, capsys):
    # The error line stands alone: it was printed after the "Assistant: " that opens an answer, as if the model said it
    monkeypatch.setattr("builtins.input", lambda prompt="", lines=iter(["red " * 2000, "hi", "exit"]): next(lines))
    sample.main(["--ckpt", str(stage_folder), "--max_new_tokens", "2"])
    out = capsys.readouterr().out
    assert "\n(error: this turn would make the conversation " in out and "\n\n(error" not in out
    assert "Assistant: \n(error" not in out
    assert out.count("Assistant: ") == 1  # "hi" was answered


def test_sample_refuses_a_system_prompt_that_cannot_work_and_names_an_empty_prompt(stage_folder, tok, capsys,
                                                                                   monkeypatch):
    with monkeypatch.context() as m:  # a closed standard input (`<&-`) is None: input() raised a RuntimeError
        m.setattr(sys, "stdin", None)
        with pytest.raises(SystemExit, match="the chat reads your messages from the standard input, which is closed"):
            sample.main(["--ckpt", str(stage_folder)])
        m.setattr(sample, "answer_prompts", lambda *a: print("answered"))  # --prompt needs no standard input
        sample.main(["--ckpt", str(stage_folder), "--prompt", "hi"])
        assert "answered" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=f"--system holds {IMAGE_TAG}, but images go in messages"):
        sample.main(["--ckpt", str(stage_folder), "--system", f"Look at {IMAGE_TAG}"])
    with pytest.raises(SystemExit, match=r"--system is \d+ tokens, and the context holds 512: no room for a message"):
        sample.main(["--ckpt", str(stage_folder), "--system", "red " * 600])
    words = next(k for k in range(1, 600) if len(start_ids(tok, "red " * k)) > 512 - 8)  # fits, but leaves < 8
    assert len(start_ids(tok, "red " * words)) <= 512
    with pytest.raises(SystemExit, match=r"--system is \d+ tokens, and the context holds 512: no room for a message"):
        sample.main(["--ckpt", str(stage_folder), "--system", "red " * words])
    with pytest.raises(SystemExit, match="--prompt 2 of 3 is empty"):
        sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--prompt", " ", "--prompt", "yo"])
    # A prompt too long for the context is named among the batch's (generate's error gives the longest's length only)
    cat = str(stage_folder / "cat.png")
    for argv, message in ((["--prompt", "hi", "--prompt", "red " * 600], r"--prompt 2 of 2 is \d+ tokens in the chat "
                           r"template and the model's context holds 512: at least one token must fit after it; "
                           r"shorten it$"),
                          (["--prompt", "red " * 600], r"--prompt is \d+ tokens in the chat template and"),
                          (["--prompt", f"{IMAGE_TAG}{IMAGE_TAG}" + "red " * 200] + ["--image", cat] * 2,
                           r"with its 2 image\(s\), 36 tokens each, and the .* shorten it or give fewer images$")):
        with pytest.raises(SystemExit, match=message):
            sample.main(["--ckpt", str(stage_folder)] + argv)
    # Arguments that are not UTF-8 (Python reads such bytes as lone surrogates): named before the model loads.
    latin1 = "caf\udce9"
    with pytest.raises(SystemExit, match=r"^--system is not UTF-8 text \(byte 0xe9 after 'caf'\): check the terminal"):
        sample.main(["--ckpt", str(stage_folder), "--system", latin1, "--prompt", "hi"])
    with pytest.raises(SystemExit, match=r"^--prompt 2 of 2 is not UTF-8 text \(byte 0xe9 after 'caf'\)"):
        sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--prompt", latin1])
    capsys.readouterr()
    sample.main(["--ckpt", str(stage_folder), "--prompt", "", "--image", str(stage_folder / "cat.png"),
                 "--max_new_tokens", "2"])  # one image alone is a prompt: it gets its placeholder
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit):  # (an unset shell variable): not the current folder's model.pt
        sample.main(["--ckpt", "  ", "--prompt", "hi"])
    assert "--ckpt is empty: expected a stage folder" in capsys.readouterr().err
    loads = []  # --dtype auto: bf16 on a GPU, fp32 on the CPU (read from what load_model is asked for)
    monkeypatch.setattr(sample, "load_model", lambda ckpt, device, dtype, tokenizer: loads.append((device, dtype)) or
                        (_ for _ in ()).throw(ValueError("stop")))
    for device in ("cuda", "cpu"):
        with pytest.raises(SystemExit, match="stop"):
            sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--device", device])
    assert loads == [("cuda", torch.bfloat16), ("cpu", torch.float32)]


def test_an_answer_into_a_full_disk_is_said_in_a_line_and_into_a_closed_pipe_ends_quietly(stage_folder, monkeypatch):
    read_end, write_end = os.pipe()
    os.close(read_end)  # (| head, once head has exited)
    with open(write_end, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        with pytest.raises(SystemExit) as ended:
            sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--max_new_tokens", "3"])
    assert ended.value.code == 1  # nothing to say, and nowhere to say it
    if not os.path.exists("/dev/full"):  # (Linux's always-full device)
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        with pytest.raises(SystemExit, match=r"^cannot write the answer to the standard output: No space left on "
                                             "device$"):
            sample.main(["--ckpt", str(stage_folder), "--prompt", "hi", "--max_new_tokens", "3"])


def test_compiled_decoding_step_gives_the_same_tokens(tiny, tok, monkeypatch):
    # torch.compile(fullgraph=True) must take the whole step, with no graph break (a break would also stop a CUDA
    # graph from recording it), and give the tokens of the eager step.
    compiled, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **k: compiled.append((fn, k)) or real_compile(fn, **k))
    prompts = [tok.encode("what colour is the circle?"), tok.encode("red")]
    s = Sampling(max_new_tokens=6)
    assert generate(tiny, prompts, sampling=s, compile=True) == generate(tiny, prompts, sampling=s)
    assert compiled == [(tiny.llm.decode_step, {"fullgraph": True, "options": {"coordinate_descent_tuning": True}})]


def test_the_compiled_step_writes_one_rows_products_as_reductions(tiny, monkeypatch):
    # What torch.compile is given to compile, read from the graph it traces: at batch 1 the projections are no matmuls
    # (compiling_one_row), so lm_head's is the one nn.Linear left; at batch 2, the plain path, every layer calls four
    # matmuls: q, k, v stacked, o, gate and up stacked, down (Llama.stacked_projections); seven, one per projection,
    # with DecodeStep.stack off. Attention is scaled_dot_product_attention at either batch.
    from nanovl.generate import DecodeStep
    from nanovl.llama import compiling_one_row

    def calls(gm):  # the names of what the traced graph calls (modules by their class, as torch 2.4 keeps them)
        return [type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else n.target.__name__
                for n in gm.graph.nodes if n.op in ("call_module", "call_function")]

    graphs, real_compile = [], torch.compile
    backend = lambda gm, inputs: graphs.append(calls(gm)) or gm.forward  # noqa: E731 (runs the graph as traced)
    monkeypatch.setattr(torch, "compile", lambda fn, **k: real_compile(fn, fullgraph=True, backend=backend))
    torch._dynamo.reset()  # trace anew, rather than reuse an earlier test's compilation of the step
    llm, L = tiny.llm, tiny.cfg.llm.n_layers
    with torch.no_grad():
        for B, stack in ((1, True), (2, True), (2, False)):
            monkeypatch.setattr(DecodeStep, "stack", stack)
            cache = llm.new_cache(B, 16)
            llm(torch.tensor([[5, 9, 14, 200]] * B), cache=cache)
            DecodeStep(llm, cache, compile=True)(torch.tensor([[40]] * B))
    (one_row, two_rows, unstacked) = graphs
    linears = lambda names: names.count("linear") + names.count("Linear")  # noqa: E731
    assert (linears(one_row), one_row.count("scaled_dot_product_attention")) == (1, L)
    assert (linears(two_rows), two_rows.count("scaled_dot_product_attention")) == (4 * L + 1, L)
    assert linears(unstacked) == 7 * L + 1
    assert not compiling_one_row(torch.randn(1, 1, 16))  # one row, eager: nn.Linear, the plain path


def test_only_the_compiled_step_stacks_the_weights():
    # stacked_weights moves q, k, v's (and gate, up's) weights into one block each for the compiled step, whose speed
    # it was measured for; an eager DecodeStep (train.py's evaluations, generate by default) leaves them as they are.
    from nanovl.config import get_config
    from nanovl.generate import DecodeStep
    from nanovl.llama import Llama

    llm = Llama(get_config("tiny", **{"llm.n_layers": 1}).llm)
    a = llm.layers[0].self_attn
    ptrs = [p.weight.data_ptr() for p in (a.q_proj, a.k_proj, a.v_proj)]
    DecodeStep(llm, llm.new_cache(1, 8))
    assert [p.weight.data_ptr() for p in (a.q_proj, a.k_proj, a.v_proj)] == ptrs
    DecodeStep(llm, llm.new_cache(1, 8), compile=True)  # (torch.compile compiles at the first call, not here)
    q = a.q_proj.weight
    assert a.k_proj.weight.data_ptr() == q.data_ptr() + q.numel() * q.element_size() != ptrs[1]


def test_compiled_one_row_step_gives_the_eager_step_logits(tiny):
    # Batch 1, compiled: the projections run as multiply-and-sum reductions (compiling_one_row), a different order of
    # the same sums as the eager step's matmuls.
    from nanovl.generate import DecodeStep

    llm = tiny.llm
    prompt = torch.tensor([[5, 9, 14, 200, 31, 7]])
    caches = [llm.new_cache(1, 16) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            llm(prompt, cache=cache)
        steps = [DecodeStep(llm, caches[0], compile=True), DecodeStep(llm, caches[1])]
        tok = torch.tensor([[40]])
        for _ in range(4):
            got, expected = (step(tok) for step in steps)
            assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
            tok = expected.argmax(-1, keepdim=True)
        prompts = [[5, 9, 14, 200, 31, 7]]
        assert generate(tiny, prompts, sampling=Sampling(max_new_tokens=6), compile=True) == \
            generate(tiny, prompts, sampling=Sampling(max_new_tokens=6))
