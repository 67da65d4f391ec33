"""The tokenizer against Hugging Face's `tokenizers` (the library that runs DeepSeek's tokenizer.json): the same
pre-tokenizer splits, the same ids in both directions of file exchange, and exact round trips on varied text."""

import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import Regex, decoders, models, normalizers, processors, trainers
from tokenizers import pre_tokenizers as pt

from conftest import write_swapped_tokenizer

from nanovl.tokenizer import BYTE_TO_CHAR, DEEPSEEK_SPLITS, EOS, IMAGE, SPECIAL_TOKENS, Tokenizer, byte_level

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog. It's 5 o'clock; isn't it?",
    "深度求索（DeepSeek）发布了视觉语言模型。你好，世界！",
    "日本語のテキスト：こんにちは、世界。カタカナとひらがな。",
    "한국어 텍스트: 안녕하세요, 세계!",
    "emoji: 👋🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 ✨ 🇫🇷",
    "café naïve résumé Ωhm Kelvin Åström e\u0301 a\u0308 Ἀθῆναι ΐ ώ ι Привет мир",
    # the letter-class characters that Unicode normalisation would change: ohm, kelvin, angstrom signs, Greek
    "\u2126 x\u212a \u212b\u212c \u1f7d\u1fbe\u1fd3\u1fdb a\u1f7db",
    "def f(x):\n\tif x:\n\t\treturn x  # tab indent\n    else:\n        return {'a': [1, 2]}\n",
    "spaces:     five, tabs:\t\t\tthree\n\n\n\nblank lines\n   \n  trailing   ",
    "windows\r\nline\r\nendings\r\n\r\n",
    "numbers 0 12 345 6789 3.14159 1,000,000 2024-05-06 ٣٤٥ ۴ ①② Ⅻ ½ x² ００７",
    "full-width：！？（）【】「」，。、　ｆｕｌｌ　ｗｉｄｔｈ ＨＥＬＬＯ “quotes” ‘single’ — dash…",
    "<｜begin▁of▁sentence｜>User: <image_placeholder>Describe this.\n\nAssistant: A cat.<｜end▁of▁sentence｜><pad>",
    "odd spaces: a\x1cb\x1dc \x85 d\xa0e\u2003\u2003f \u3000g\u200bh\u2028i\x0bj\x0ck",
    "punctuation runs: ... !!! ??? ->> <<= {}[]()'\"` ~@#$%^&*_+=|\\/ µs",
    "",
    " ",
    "\n",
    "a" * 3000 + " " * 2000 + "ab" * 500,
]


def deepseek_pre_tokenizer(digits: bool = False):
    """DeepSeek-LLM's pre-tokenizer (facts section 10) built with tokenizers. `digits` swaps the last split for
    Digits(individual_digits=True), the form the released tokenizer.json is reported to use."""
    splits = [pt.Split(Regex(p), "isolated") for p in (DEEPSEEK_SPLITS[:5] if digits else DEEPSEEK_SPLITS)]
    return pt.Sequence(splits + ([pt.Digits(individual_digits=True)] if digits else [])
                       + [pt.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.fixture(scope="module")
def corpus():
    # Varied text (so that merges cross UTF-8 byte boundaries) plus the library's own source for volume.
    sources = [p.read_text(encoding="utf-8") for p in sorted(Path(__file__).parents[1].glob("nanovl/*.py"))]
    return TEXTS * 20 + sources


@pytest.fixture(scope="module")
def ours(corpus):
    return Tokenizer.train(corpus, 1000)


@pytest.fixture(scope="module", params=["six-splits", "released-layout"])
def from_tokenizers(request, corpus, tmp_path_factory):
    """A DeepSeek-style tokenizer.json trained and written by tokenizers, and (theirs, ours loaded from it). The
    "released-layout" one is laid out as DeepSeek-LLM's file is reported to be: Digits instead of the sixth split,
    an empty normalizer Sequence, and a post-processor that adds BOS."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = deepseek_pre_tokenizer(digits=request.param == "released-layout")
    hf.decoder = decoders.ByteLevel()
    if request.param == "released-layout":
        hf.normalizer = normalizers.Sequence([])
        hf.post_processor = processors.TemplateProcessing(single=f"{SPECIAL_TOKENS[0]} $A",
                                                          special_tokens=[(SPECIAL_TOKENS[0], 0)])
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pt.ByteLevel.alphabet())
    hf.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    hf.save(str(path))
    return hf, Tokenizer.load(path)


def test_round_trip_is_exact(ours):
    for text in TEXTS + ["".join(TEXTS)]:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        assert ours.encode(text, bos=True, eos=True) == [ours.bos_id] + ids + [ours.eos_id]
    everything = "".join(TEXTS)
    assert len(ours.encode(everything)) < len(everything.encode("utf-8")) / 4  # it does merge (about 11 bytes/token)


@pytest.mark.parametrize("digits", [False, True], ids=["six-splits", "digits"])
def test_pre_tokenizer_matches_tokenizers(digits, ours):
    theirs = deepseek_pre_tokenizer(digits)
    mine = Tokenizer(ours.vocab, ours.merges, ours.added_tokens, _spec(theirs))  # read from tokenizers' own JSON
    for text in TEXTS:
        expected = [piece for piece, _ in theirs.pre_tokenize_str(text)]
        assert [byte_level(p) for p in mine.pre_tokenize(text)] == expected, text[:40]
        if not digits:  # and our built-in copy of the DeepSeek splits is the same
            assert [byte_level(p) for p in ours.pre_tokenize(text)] == expected


def _spec(pre_tokenizer) -> dict:
    """The tokenizer.json spec of a tokenizers pre-tokenizer object."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizer
    return json.loads(hf.to_str())["pre_tokenizer"]


def test_deepseek_split_patterns_are_intact():
    # The parity tests feed tokenizers our own copy of the patterns, so they cannot see a damaged copy. The letter
    # class must hold exactly the released 2729 code points, all cased letters, including the six that Unicode
    # normalisation changes (a normalised "K-ℭ" would silently become the huge range U+004B..U+212D).
    letters = re.compile(DEEPSEEK_SPLITS[1][3:-1])  # the class without the leading \s? and the trailing +
    members = [cp for cp in range(0x30000) if letters.fullmatch(chr(cp))]
    assert len(members) == 2729
    assert {unicodedata.category(chr(cp)) for cp in members} == {"Lu", "Ll", "Lt"}
    assert {0x1F7D, 0x1FBE, 0x1FD3, 0x1FDB, 0x2126, 0x212A} <= set(members)
    # The other five, as the facts sheet writes them (section 10, the llama.cpp transcription), to the code point
    assert [DEEPSEEK_SPLITS[i] for i in (0, 2, 3, 4, 5)] == [
        r"[\r\n]", "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}+"]


def test_gpt2_byte_level_regex_matches_tokenizers(ours):
    # ByteLevel(use_regex=True) splits with GPT-2's pattern, which needs \p{L}, \p{N} and \s translated for `re`.
    theirs = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    mine = Tokenizer(ours.vocab, ours.merges, ours.added_tokens, _spec(theirs))
    for text in TEXTS:
        assert [byte_level(p) for p in mine.pre_tokenize(text)] == [p for p, _ in theirs.pre_tokenize_str(text)]


@pytest.mark.parametrize("behavior", ["isolated", "removed", "merged_with_previous", "merged_with_next", "contiguous"])
@pytest.mark.parametrize("invert", [False, True])
def test_split_behaviors_match_tokenizers(behavior, invert, ours):
    texts = ["a--b-c-", "-x- -y--", "ab\nab\nb", "word  word\t1 2-3", "a.b..c", ""]
    # (-): a capturing group; ".": a String pattern, the literal full stop
    for pattern in [Regex(r"(-)|\s"), Regex(r"b$"), Regex(r"\p{N}|^a"), Regex("-"), "."]:
        theirs = pt.Sequence([pt.Split(pattern, behavior, invert=invert),
                              pt.ByteLevel(add_prefix_space=False, use_regex=False)])
        mine = Tokenizer(ours.vocab, ours.merges, ours.added_tokens, _spec(theirs))
        for text in texts:
            expected = [p for p, _ in theirs.pre_tokenize_str(text)]
            assert [byte_level(p) for p in mine.pre_tokenize(text)] == expected, (pattern, text)


def test_a_byte_level_step_that_adds_a_prefix_space_is_refused(ours):
    # (it would put a space before every text, which nanovl's encode does not do: refused rather than ignored)
    theirs = pt.Sequence([pt.Split(Regex(r"\s"), "isolated"), pt.ByteLevel(add_prefix_space=True, use_regex=False)])
    with pytest.raises(ValueError, match=r"pretokenizers\[1\].add_prefix_space = True is not supported"):
        Tokenizer(ours.vocab, ours.merges, ours.added_tokens, _spec(theirs))


def test_loading_a_tokenizers_file_gives_the_same_ids(from_tokenizers):
    hf, mine = from_tokenizers
    assert mine.vocab_size == hf.get_vocab_size() == 1200
    for text in TEXTS + ["".join(TEXTS)]:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert mine.encode(text) == ids, text[:40]
        assert mine.decode(ids) == text
        if hf.post_processor is not None:  # its BOS template is what encode(bos=True) gives
            assert mine.encode(text, bos=True) == hf.encode(text).ids


def test_a_loaded_tokenizer_saves_back_what_it_read(from_tokenizers, ours, tmp_path):
    # An export writes the tokenizer it loaded: its pre-tokenizer (the released layout splits digits one by one) and
    # its post-processor (the BOS template the official processor relies on) must survive, or tokenizers reading the
    # exported file gives other ids than it gave from the original.
    hf, mine = from_tokenizers
    again = tokenizers.Tokenizer.from_file(str(mine.save(tmp_path)))
    for text in TEXTS + ["".join(TEXTS)]:
        assert again.encode(text).ids == hf.encode(text).ids, text[:40]  # (post-processor included)
        assert Tokenizer.load(tmp_path).encode(text) == mine.encode(text)
    # a pre-tokenizer of one's own too (splitting on whitespace only, where DeepSeek's would cut "x-y" in three)
    own = Tokenizer(ours.vocab, ours.merges, ours.added_tokens, _spec(pt.Sequence([
        pt.Split(Regex(r"\s"), "isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)])))
    reread = Tokenizer.load(own.save(tmp_path / "own"))
    assert reread.pre_tokenize("x-y z") == own.pre_tokenize("x-y z") == ["x-y", " ", "z"]


def test_ignore_merges_is_read_and_followed(corpus, tmp_path):
    # (Llama-3-style files: a piece that is itself a token is taken whole, whatever the merges would make of it)
    hf = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer, hf.decoder = deepseek_pre_tokenizer(), decoders.ByteLevel()
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1200, special_tokens=SPECIAL_TOKENS,
                                                       initial_alphabet=pt.ByteLevel.alphabet(), show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["ignore_merges"] is True
    mine = Tokenizer.load(tmp_path)
    assert mine.ignore_merges and Tokenizer.load(mine.save(tmp_path / "again")).ignore_merges
    for text in TEXTS:
        assert mine.encode(text) == hf.encode(text, add_special_tokens=False).ids, text[:40]


def test_same_ids_compares_the_added_tokens_too(ours):
    more = Tokenizer(ours.vocab, ours.merges, ours.added_tokens + [
        {"id": ours.vocab_size, "content": "<extra>", "special": True, "normalized": False}])
    assert ours.same_ids(ours) and not ours.same_ids(more) and not more.same_ids(ours)


def test_the_fingerprint_tells_tokenizers_apart_as_same_ids_does(ours, tmp_path):
    again = Tokenizer.load(ours.save(tmp_path))  # the same tokenizer, read back: the same fingerprint
    assert again.fingerprint() == ours.fingerprint() and len(ours.fingerprint()) == 16
    more = Tokenizer(ours.vocab, ours.merges, ours.added_tokens + [
        {"id": ours.vocab_size, "content": "<extra>", "special": True, "normalized": False}])
    swapped = write_swapped_tokenizer(ours.to_json(), tmp_path / "swapped.json")  # same size, two ids swapped
    fewer = Tokenizer(ours.vocab, ours.merges[:-1], ours.added_tokens)  # one merge less: other splits
    prints = {t.fingerprint() for t in (ours, more, Tokenizer.load(swapped), fewer)}
    assert len(prints) == 4


def test_added_tokens_are_taken_exactly_when_tokenizers_keeps_their_ids(ours, tmp_path):
    # tokenizers ignores an added token's "id": a token of the vocab gets its vocab id, the others the ids after the
    # vocab in file order. A file that says otherwise gave other ids here than there (the image token's, say).
    n = len(ours.vocab)
    layouts = {"after the vocab": [("<a>", n), ("<b>", n + 1)], "a vocab token at its own id": [("a", ours.vocab["a"])],
               "out of order": [("<b>", n + 1), ("<a>", n)], "after a gap": [("<a>", n), ("<b>", n + 5)],
               "a vocab token at another id": [("a", n)], "one token twice": [("<a>", n), ("<a>", n + 1)],
               # a token without text, which tokenizers skips (no id, never matched): numbered as if it were not there
               "an empty one skipped": [("", n), ("<a>", n)], "an empty one numbered": [("", n), ("<a>", n + 1)]}
    taken = []
    for name, added in layouts.items():
        spec = json.loads(ours.to_json())
        spec["added_tokens"] += [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                                  "normalized": False, "special": True} for c, i in added]
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(spec), encoding="utf-8")
        hf = tokenizers.Tokenizer.from_file(str(path))
        if all(hf.token_to_id(c) == i for c, i in added if c):
            mine = Tokenizer.load(path)
            assert mine.encode("x<a>y<b>a") == hf.encode("x<a>y<b>a", add_special_tokens=False).ids
            taken.append(name)
        else:
            with pytest.raises(ValueError, match=r"added token '[<>ab]+' has id \d+, but the tokenizers library, "
                                                 r"which ignores an added token's id, would number it \d+"):
                Tokenizer.load(path)
    assert taken == ["after the vocab", "a vocab token at its own id", "an empty one skipped"]  # (others: refused)


def test_a_vocab_without_the_bytes_utf8_never_holds_is_read_as_tokenizers_reads_it(corpus, tmp_path):
    # No UTF-8 text holds the bytes 0xC0, 0xC1 or 0xF5-0xFF, so a vocabulary learnt from text lacks their tokens;
    # DeepSeek-LLM's file is thought to add their characters ("ø", "ü", ...) as added tokens instead. Such a file was
    # refused for lacking byte tokens. Text then matches those added tokens literally, and each decodes to its one
    # byte, which alone is no UTF-8: "München" comes back as "M\ufffdnchen", in tokenizers as here.
    never = [b for b in range(256) if b in (0xC0, 0xC1) or b >= 0xF5]
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = deepseek_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=[SPECIAL_TOKENS[0], EOS], show_progress=False,
                                  initial_alphabet=[c for b, c in enumerate(BYTE_TO_CHAR) if b not in never])
    hf.train_from_iterator(corpus, trainer)
    hf.add_tokens([BYTE_TO_CHAR[b] for b in never])
    hf.add_special_tokens([IMAGE])
    assert not {BYTE_TO_CHAR[b] for b in never} & set(json.loads(hf.to_str())["model"]["vocab"])
    hf.save(str(tmp_path / "tokenizer.json"))
    mine = Tokenizer.load(tmp_path / "tokenizer.json")
    for text in TEXTS + ["München, Ærø: façade ÿ þ <image_placeholder>!"]:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert mine.encode(text) == ids, text[:40]
        assert mine.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        assert mine.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert mine.decode(mine.encode("München")) == "M\ufffdnchen"


def test_a_special_token_is_added_where_tokenizers_adds_it(ours, tmp_path):
    # as the official processor adds <image_placeholder> to a tokenizer without it (transformers' add_special_tokens):
    # after the vocab and the added tokens, or at its vocab id where the vocab has it
    n = len(ours.vocab)
    for name, mine in [("ours", ours), ("a vocab entry", Tokenizer({**ours.vocab, "<x>": n}, ours.merges,
                                                                    ours.added_tokens))]:
        path = mine.save(tmp_path / f"{name}.json")
        hf = tokenizers.Tokenizer.from_file(str(path))
        hf.add_special_tokens(["<x>"])
        added = mine.with_special_token("<x>")
        assert added.token_to_id("<x>") == hf.token_to_id("<x>") == n
        assert added.encode("a<x>b") == hf.encode("a<x>b", add_special_tokens=False).ids
        assert added.with_special_token("<x>") is added and ours.with_special_token(IMAGE) is ours  # (had it)


def test_tokenizers_reads_our_file_and_gives_the_same_ids(ours, tmp_path):
    hf = tokenizers.Tokenizer.from_file(str(ours.save(tmp_path)))
    assert hf.get_vocab_size() == ours.vocab_size
    for text in TEXTS + ["".join(TEXTS)]:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text[:40]
        assert hf.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_and_id_layout(ours):
    assert ours.vocab_size == 1000
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.image_id) == (0, 1, 2, 3)  # tiny presets: image_token_id 3
    assert [ours.id_to_token(i) for i in range(4)] == SPECIAL_TOKENS
    assert [ours.id_to_token(4 + b) for b in range(256)] == BYTE_TO_CHAR  # then the bytes, in byte order
    assert ours.encode("<image_placeholder>") == [3]
    ids = ours.encode("x<image_placeholder><image_placeholder>y<pad>")
    assert ids[1:3] == [3, 3] and ids[-1] == 2 and ours.decode(ids) == "x<image_placeholder><image_placeholder>y<pad>"
    assert ours.token_to_id("<｜end▁of▁sentence｜>") == 1
    assert ours.token_to_id(byte_level(" ")) == 4 + 32


def test_trainer_merges_the_most_frequent_pair_first():
    # Pieces: "abab", " abab" x2, " xy". (a, b) occurs 6 times; then (ab, ab) 3 times beats (" ", ab) twice.
    tok = Tokenizer.train(["abab abab abab xy"], 4 + 256 + 2)
    assert tok.merges == [("a", "b"), ("ab", "ab")]
    assert tok.encode(" abab") == [tok.token_to_id("Ġ"), tok.token_to_id("abab")]
    # Ties go to the pair with the smaller ids: (" ", "a") < ("a", "b") < ("x", "y"), all seen once.
    assert Tokenizer.train(["xy ab"], 4 + 256 + 1).merges == [("Ġ", "a")]


def test_trainer_is_deterministic(corpus, ours):
    again = Tokenizer.train(corpus, 1000)
    assert again.merges == ours.merges and again.vocab == ours.vocab


def test_trainer_never_spells_a_special_token():
    # A special token spelled like byte-level text ("Ġx" is how " x" is stored) must not collide with a merge.
    tok = Tokenizer.train([" x" * 50 + " yz" * 10], 5 + 256 + 2, special_tokens=SPECIAL_TOKENS + ["Ġx"])
    assert tok.merges == [("Ġ", "y"), ("Ġy", "z")]  # (Ġ, x), seen 50 times, is skipped
    assert tok.encode(" xĠx") == [tok.token_to_id("Ġ"), tok.token_to_id("x"), 4]


def test_trainer_learns_nothing_from_the_special_tokens_in_its_corpus():
    # Rendered chats and pretraining text are full of <image_placeholder> and <｜end▁of▁sentence｜>, which encode as
    # single ids: merges learned from their spelling would be ids no text ever encodes to.
    corpus = [f"{IMAGE * 5} a cat {EOS}", f"{IMAGE} the dog{EOS}"] * 20
    tok = Tokenizer.train(corpus, len(SPECIAL_TOKENS) + 256 + 6)
    assert len(tok.merges) == 6 and set("".join(a + b for a, b in tok.merges)) <= set("Ġacthedog")


def test_a_cut_off_character_decodes_to_the_replacement_character_as_in_tokenizers(tmp_path):
    # An answer stopped by max_new_tokens can end inside a character: its bytes show as U+FFFD, not dropped unseen.
    ours = Tokenizer.train(["héllo wörld"] * 5, len(SPECIAL_TOKENS) + 256 + 2)
    hf = tokenizers.Tokenizer.from_file(str(ours.save(tmp_path)))
    first_byte_of_e = len(SPECIAL_TOKENS) + "é".encode()[0]  # the byte tokens come after the special ones
    for ids in ([first_byte_of_e], [ours.token_to_id("h"), first_byte_of_e, ours.token_to_id("l")]):
        assert "\ufffd" in ours.decode(ids) and ours.decode(ids) == hf.decode(ids)


def test_trainer_counts_a_very_long_piece_in_parts(monkeypatch):
    # A run of letters is one piece; the trainer counts it in parts of TRAIN_PIECE_BYTES (256: 4 here), so that a
    # long one (a DNA sequence) does not make training quadratic. Whole, this one would merge up to "abcdabcd".
    import nanovl.tokenizer
    monkeypatch.setattr(nanovl.tokenizer, "TRAIN_PIECE_BYTES", 4)
    tok = Tokenizer.train(["abcd" * 100], 4 + 256 + 3)
    assert tok.merges == [("a", "b"), ("c", "d"), ("ab", "cd")]  # never across a cut: at most 4 bytes a token
    assert tok.encode("abcd" * 3) == [tok.token_to_id("abcd")] * 3
    with pytest.raises(ValueError, match="too small"):  # each part is one token now: no pair is left to merge
        Tokenizer.train(["abcd" * 100], 4 + 256 + 4)


def test_trainer_says_when_the_corpus_is_too_small():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["ab"], 4 + 256 + 5)


def test_merges_written_as_pairs_load_too(ours, tmp_path):
    data = json.loads(ours.save(tmp_path).read_text(encoding="utf-8"))
    data["model"]["merges"] = [m.split(" ") for m in data["model"]["merges"]]  # newer tokenizers write pairs
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert Tokenizer.load(tmp_path).encode(TEXTS[0]) == ours.encode(TEXTS[0])


def test_added_tokens_are_matched_like_tokenizers(ours, tmp_path):
    # tokenizers cuts out added tokens with normalized=false first (specials), then those with normalized=true;
    # in each pass the leftmost, then longest, match wins.
    hf = tokenizers.Tokenizer.from_file(str(ours.save(tmp_path)))
    hf.add_special_tokens(["<s>", "<s>x"])
    hf.add_tokens(["ab<", "abc", "abcd"])
    hf.save(str(tmp_path / "tokenizer.json"))
    mine = Tokenizer.load(tmp_path)
    for text in ["ab<s>", "<s>x<s>xy", "xabcde abc ab<", "<<s>x"]:
        assert mine.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
        assert mine.decode(mine.encode(text)) == text
        # skip_special_tokens drops "<s>" and "<s>x", and keeps the added tokens that are not special
        assert mine.decode(mine.encode(text), skip_special_tokens=True) == \
            hf.decode(hf.encode(text, add_special_tokens=False).ids, skip_special_tokens=True), text


def test_a_tokenizer_without_pad_or_image_token(corpus, tmp_path):
    # The released tokenizer has no <pad> (pad falls back to EOS, facts section 10).
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = deepseek_pre_tokenizer(), decoders.ByteLevel()
    hf.train_from_iterator(corpus[:20], trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS[:2],
                                                            initial_alphabet=pt.ByteLevel.alphabet(),
                                                            show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.pad_id == tok.eos_id == 1
    with pytest.raises(ValueError, match="this tokenizer has no <image_placeholder> token: DeepSeek-VL adds it as a "
                                         "special token"):
        tok.image_id
    no_eos = Tokenizer({t: i for t, i in tok.vocab.items() if t != EOS}, tok.merges,
                       [t for t in tok.added_tokens if t["content"] != EOS])  # a tokenizer of one's own, say
    with pytest.raises(ValueError, match=f"'{EOS}' is not a token of this tokenizer: it has no such added token"):
        no_eos.eos_id


@pytest.mark.parametrize("field, value", [
    ("normalizer", {"type": "Lowercase"}),
    ("normalizer", {"type": "NFC"}),  # (it would change the letter-class characters TEXTS holds)
    ("model.byte_fallback", True),
    ("model.dropout", 0.1),
    ("model.continuing_subword_prefix", "##"),
    ("pre_tokenizer", {"type": "Whitespace"}),
    ("decoder", {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}),
    ("truncation", {"max_length": 8, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}),
])
def test_unsupported_fields_are_refused_by_name(ours, tmp_path, field, value):
    data = json.loads(ours.save(tmp_path).read_text(encoding="utf-8"))
    *parents, key = field.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[key] = value
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=key):
        Tokenizer.load(tmp_path)


def test_added_tokens_matched_other_than_as_exact_text_are_refused(ours, tmp_path):
    for flag in ("single_word", "lstrip", "rstrip"):
        data = json.loads(ours.save(tmp_path).read_text(encoding="utf-8"))
        data["added_tokens"][1][flag] = True
        (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(ValueError, match=rf"added_tokens\[1\].{flag} = True is not supported"):
            Tokenizer.load(tmp_path)


def test_a_file_that_is_no_tokenizer_json_is_named_with_what_is_wrong(ours, tmp_path):
    good = json.loads(ours.save(tmp_path).read_text(encoding="utf-8"))
    broken = {"model a string": dict(good, model="BPE"),
              "vocab a list": dict(good, model=dict(good["model"], vocab=[["a", 0]])),
              "ids as strings": dict(good, model=dict(good["model"], vocab={"a": "0"})),
              "merges of numbers": dict(good, model=dict(good["model"], merges=[[1, 2]])),
              "added tokens as strings": dict(good, added_tokens=["<pad>"]),
              "an id twice": dict(good, model=dict(good["model"], vocab={"a": 0, "b": 0})),
              "a negative id": dict(good, model=dict(good["model"], vocab={"a": -1})),
              "a negative added id": dict(good, added_tokens=[{"id": -2, "content": "<x>"}])}
    for case, data in broken.items():
        (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(ValueError, match=f"^{tmp_path / 'tokenizer.json'}: .* is not supported: "):
            Tokenizer.load(tmp_path)
    for content, message in [(b"{bad", "is not valid JSON"), (b"[1, 2]", "holds a JSON list, but a tokenizer.json is"),
                             (b"\x80\x02PK", "is not a tokenizer.json: it is not text")]:
        (tmp_path / "tokenizer.json").write_bytes(content)
        with pytest.raises(ValueError, match=f"^{tmp_path / 'tokenizer.json'} {message}"):
            Tokenizer.load(tmp_path)


def test_regex_features_that_would_change_meaning_are_refused(ours):
    # Oniguruma (tokenizers) and Python's re read these differently, or nanovl's translation does not handle them:
    # refused by name rather than run with another meaning (a class inverted, \w's other letters)
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    for pattern, message in [(r"[\P{L}x]", r"\\P\{..\} inside a character class is not supported"),
                             (r"[\Sx]", r"\\S inside a character class is not supported"),
                             (r"\w+", r"\\w is not supported \(spell the class with \\p\{..\}\)")]:
        with pytest.raises(ValueError, match=message):
            Tokenizer(ours.vocab, ours.merges, ours.added_tokens,
                      _spec(pt.Sequence([pt.Split(Regex(pattern), "isolated"), byte_level])))
    split = {"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Bogus", "invert": False}
    with pytest.raises(ValueError, match=r"pretokenizers\[0\].behavior = 'Bogus' is not supported: use one of"):
        Tokenizer(ours.vocab, ours.merges, ours.added_tokens,
                  {"type": "Sequence", "pretokenizers": [split, _spec(byte_level)]})


def test_unsupported_pre_tokenizer_step_is_named(ours):
    spec = _spec(pt.Sequence([pt.Split(Regex(r"\s"), "isolated"), pt.Punctuation(),
                                 pt.ByteLevel(add_prefix_space=False)]))
    with pytest.raises(ValueError, match=r"pretokenizers\[1\].type = 'Punctuation'"):
        Tokenizer(ours.vocab, ours.merges, ours.added_tokens, spec)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    for malformed, message in [  # named, not an AttributeError, KeyError or TypeError from inside
            ({"type": "Sequence", "pretokenizers": [None, byte_level]}, r"pretokenizers\[0\] = None is not supported"),
            ({"type": "Sequence"}, "pre_tokenizer.pretokenizers = None: expected a list of steps"),
            ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": None, "behavior": "Isolated"},
                                                    byte_level]}, r"pattern = None is not supported"),
            ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": 5},
                                                     "behavior": "Isolated"}, byte_level]}, r"\{'Regex': 5\}"),
            ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": r"\p{L"},
                                                     "behavior": "Isolated"}, byte_level]},
             r"\\p\{ without its closing \} in"),
    ]:
        with pytest.raises(ValueError, match=message):
            Tokenizer(ours.vocab, ours.merges, ours.added_tokens, malformed)
    with pytest.raises(ValueError, match=r"token ids run up to 10000000000 for \d+ tokens"):
        Tokenizer({**ours.vocab, "<far>": 10 ** 10}, ours.merges, ours.added_tokens)
    with pytest.raises(ValueError, match=r"added token '<far>' has id 10000000000, but the tokenizers library"):
        Tokenizer(ours.vocab, ours.merges, ours.added_tokens + [{"id": 10 ** 10, "content": "<far>"}])


def test_missing_file_and_bad_ids(ours, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "nowhere")
    ids = [ours.bos_id] + ours.encode("hi there") + [ours.eos_id]  # special tokens left out for display, as HF's
    assert ours.decode(ids, skip_special_tokens=True) == "hi there" != ours.decode(ids)
    with pytest.raises(ValueError, match="0..999"):
        ours.decode([5, 1000])
    with pytest.raises(ValueError, match="0..999"):
        ours.decode([-1])
    # Anything but integer ids is refused rather than coerced: int(108.9) decoded as 108, and a string's characters
    # were read as ids one by one.
    ids = ours.encode("hello world")
    assert ours.decode(torch.tensor(ids)) == ours.decode(np.array(ids)) == ours.decode(ids) == "hello world"
    assert ours.decode(torch.tensor(ids[0])) == ours.decode(ids[:1])  # one sampled token, a 0-d tensor
    with pytest.raises(ValueError, match=r"expected token ids \(integers\), got True in"):
        ours.decode([True])  # (a bool is an int to Python: it would decode as id 1)
    with pytest.raises(ValueError, match=r"expected token ids \(integers\), got \d+\.9 in"):
        ours.decode([i + 0.9 for i in ids])
    with pytest.raises(ValueError, match="expected a list of token ids, got str '123'"):
        ours.decode("123")
    with pytest.raises(ValueError, match="decode one row at a time"):
        ours.decode(torch.tensor([ids, ids]))
    for text, message in ((None, "expected text as a string, got NoneType"), (b"hi", r"decode bytes first"),
                          ("ok \ud800 then", r"a lone surrogate, '\\ud800', at character 3 \('ok ' before it\)")):
        with pytest.raises(ValueError, match=message):
            ours.encode(text)
