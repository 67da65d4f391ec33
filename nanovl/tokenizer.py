"""
The tokenizer: DeepSeek-LLM's byte-level BPE, written from scratch (paper section 3.1: DeepSeek-VL uses "the same
tokenizer with DeepSeek-LLM"; facts section 10).

    text -> special tokens cut out -> pre-tokenizer (regex splits) -> UTF-8 bytes -> BPE merges -> ids
    ids  -> bytes of each token, joined -> UTF-8 text                                   (exact inverse)

One class, `Tokenizer`, does all of it: `train` learns merges from text, `encode`/`decode` use them, and
`load`/`save` read and write Hugging Face's `tokenizer.json`, so the same code runs the released 100k DeepSeek
tokenizer and the small ones we train for the scaled-down presets. Anything in a tokenizer.json that this file does
not implement raises a ValueError naming the field: a tokenizer that silently gives different ids is worse than none.

Byte-level BPE in three lines. Every UTF-8 byte is a token, so any text can be encoded. Training repeatedly fuses
the most frequent adjacent pair of tokens into a new token; the fusions, in order, are the "merges". Encoding replays
them: in each piece, the adjacent pair whose merge came earliest in training is fused first.

Only the standard library (and tqdm for train's optional progress bar): Python's `re` lacks \\p{N} and friends, so we
build those classes from `unicodedata`.
"""

import functools
import hashlib
import heapq
import json
import numbers
import re
import reprlib
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Optional

# ----------------------------------------------------------------------------------------------------------------------
# Special tokens. Our trained tokenizers put them first (ids 0..3, so the tiny presets use image_token_id 3); the
# released tokenizer has them at 100000 (BOS), 100001 (EOS) and 100015 (image), and no pad token (facts sections 9, 10).

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<pad>"
IMAGE = "<image_placeholder>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE]
TRAIN_PIECE_BYTES = 256  # Tokenizer.train counts a longer pre-token piece in parts of this many bytes (see there)

# ----------------------------------------------------------------------------------------------------------------------
# DeepSeek-LLM's pre-tokenizer (facts section 10). Each Split cuts every piece left by the previous one into matches
# and the text between them ("Isolated": both kept). Note that a later split also re-cuts the earlier matches: " café"
# is one match of the letter rule, then the punctuation rule (whose ranges `:-~` include A-Za-z) cuts it into " caf"
# and "é". The letter class is the cased letters (Unicode Lu, Ll, Lt) minus a few scripts. Six of its characters
# (U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126, U+212A) change under Unicode NFC normalisation, and a normalised copy is
# broken (three ranges become empty, "K-ℭ" becomes a huge range), so they are written as escapes here.

DEEPSEEK_SPLITS = [
    r"[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝ"
    "Ὗ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳ"
    "Ꙁ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",  # ASCII and full-width punctuation (and, through `:-~`, ASCII letters again)
    r"\s+$",  # trailing whitespace of a piece
    r"[一-龥ࠀ-一가-퟿]+",  # CJK and Hangul runs; U+0800-U+4E00 also covers many symbols and spaces such as U+3000
    r"\p{N}+",  # numbers. The released file may use {"type": "Digits", "individual_digits": true} here instead.
]
DEEPSEEK_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
                      for p in DEEPSEEK_SPLITS]
    + [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}],
}
# What ByteLevel(use_regex=true) splits with: GPT-2's pattern (not used by DeepSeek, but common in tokenizer.json).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ----------------------------------------------------------------------------------------------------------------------
# Bytes as printable characters. tokenizer.json stores tokens as strings, so GPT-2 maps each byte to a visible
# character: printable Latin-1 bytes stand for themselves, the other 68 get U+0100 onwards (space -> 'Ġ', \n -> 'Ċ').

def _bytes_to_unicode() -> list:
    printable = lambda b: ord("!") <= b <= ord("~") or ord("¡") <= b <= ord("¬") or ord("®") <= b <= ord("ÿ")
    others = [b for b in range(256) if not printable(b)]
    return [chr(b) if printable(b) else chr(256 + others.index(b)) for b in range(256)]


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# The bytes a UTF-8 text can hold: all but 0xC0, 0xC1 and 0xF5-0xFF, which no valid UTF-8 has. A vocabulary learnt
# from text never sees those 13, and a file may leave them out of its vocab (DeepSeek-LLM's is thought to add their
# characters, "ø", "ö", "ú", ..., as added tokens 100002-100014; facts section 10 leaves those contents unverified).
UTF8_BYTES = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]


def byte_level(text: str) -> str:
    """The byte-level spelling of a text, as tokens appear in tokenizer.json: byte_level(" the") == "Ġthe"."""
    return "".join(BYTE_TO_CHAR[b] for b in text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------------
# Regexes. tokenizer.json patterns are Oniguruma (Ruby syntax), run by the tokenizers library; we translate the
# constructs where Python's `re` differs: \p{..} (absent in `re`), \s (Python also counts \x1c-\x1f as space,
# Oniguruma counts the Unicode White_Space set only), $ / ^ (Ruby: end / start of any line, not just of the text),
# and capturing groups, made non-capturing so that re.split returns just [gap, match, gap, ...].

_SPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.cache
def _category_ranges() -> dict:
    """{general category ("Lu", "Nd", ...): [[first, last], ...]} over all code points, computed once (~0.5 s).
    These are the running Python's Unicode tables, which may be older than those of tokenizers' regex engine: with
    Python 3.11 (Unicode 14) and tokenizers 0.23, 120 code points of scripts encoded since (Kawi and Garay digits,
    say) are \\p{N} there and not here, so a text holding them can split otherwise. Rare enough to leave."""
    ranges = defaultdict(list)
    for cp in range(0x110000):
        r = ranges[unicodedata.category(chr(cp))]
        if r and r[-1][1] == cp - 1:
            r[-1][1] = cp
        else:
            r.append([cp, cp])
    return ranges


@functools.cache
def _unicode_class(name: str) -> str:
    """The body of a character class (no brackets) for \\p{name}: "N" = Nd+Nl+No, "Lu" = Lu, "LC" = Lu+Ll+Lt."""
    cats = [c for c in _category_ranges() if c == name or c[0] == name or (name == "LC" and c in ("Lu", "Ll", "Lt"))]
    if not cats:
        raise ValueError(f"unknown Unicode class \\p{{{name}}}: nanovl supports general categories such as "
                         f"\\p{{L}}, \\p{{N}}, \\p{{Lu}}, \\p{{P}}")
    merged = []
    for lo, hi in sorted(r for c in cats for r in _category_ranges()[c]):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return "".join(f"\\U{lo:08x}" + (f"-\\U{hi:08x}" if hi > lo else "") for lo, hi in merged)


def translate_regex(pattern: str) -> str:
    """An Oniguruma pattern from tokenizer.json -> the equivalent Python `re` pattern."""
    out, i, in_class, class_start = [], 0, False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            d = pattern[i + 1]
            if d in "pP" and pattern[i + 2:i + 3] == "{":
                end = pattern.find("}", i)
                if end < 0:
                    raise ValueError(f"\\{d}{{ without its closing }} in {pattern!r}")
                body, i = _unicode_class(pattern[i + 3:end]), end + 1
                if in_class and d == "P":
                    raise ValueError(f"\\P{{..}} inside a character class is not supported: {pattern!r}")
                out.append(body if in_class else f"[{'^' if d == 'P' else ''}{body}]")
            elif d in "sS":
                if in_class and d == "S":
                    raise ValueError(f"\\S inside a character class is not supported: {pattern!r}")
                out.append(_SPACE if in_class else f"[{'^' if d == 'S' else ''}{_SPACE}]")
                i += 2
            elif d in "wWbB":  # Oniguruma's word characters differ from Python's (and even between [\w] and \w)
                raise ValueError(f"\\{d} is not supported (spell the class with \\p{{..}}): {pattern!r}")
            else:  # Ruby's \Z also matches before a final newline, and \z is Python's \Z; others mean the same
                out.append({"\\Z": r"(?=\n?\Z)", "\\z": r"\Z"}.get(pattern[i:i + 2], pattern[i:i + 2]))
                i += 2
            continue
        if in_class:
            if c == "[" or pattern[i:i + 2] == "&&":
                raise ValueError(f"nested classes and && (Ruby syntax) are not supported: {pattern!r}")
            if c == "]" and i != class_start:  # a ] right after [ or [^ is a literal
                in_class = False
        elif c == "[":
            in_class, class_start = True, i + 1 + (pattern[i + 1:i + 2] == "^")
        elif c == "$":
            c = r"(?![^\n])"  # end of a line
        elif c == "^":
            c = r"(?<![^\n])"  # start of a line
        elif c == "(" and pattern[i + 1:i + 2] != "?":
            c = "(?:"
        out.append(c)
        i += 1
    return "".join(out)


# How a Split treats its matches; names and semantics are tokenizers' SplitDelimiterBehavior.
_BEHAVIORS = ("Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous")


class _Split:
    """One pre-tokenizer stage: cuts a string into pieces around the matches of a regex."""

    def __init__(self, source: str, behavior: str = "Isolated", invert: bool = False):
        try:  # one capturing group around it all: split() then gives [gap, match, gap, ..., gap], entirely in C
            self.rx = re.compile(f"({source})")
        except re.error as e:
            raise ValueError(f"cannot compile the pre-tokenizer regex {source[:200]!r}: {e}") from None
        self.behavior, self.invert = behavior, invert

    def __call__(self, s: str) -> list:
        parts = self.rx.split(s)
        if self.behavior == "Isolated":  # every match and every gap is a piece; `invert` changes nothing
            return [p for p in parts if p]
        # tokenizers keeps empty matches (not empty gaps) until after the merging below, then drops empty pieces.
        marked = [(p, (i % 2 == 1) != self.invert) for i, p in enumerate(parts) if p or i % 2 == 1]
        if self.behavior == "Removed":
            return [p for p, is_match in marked if p and not is_match]
        out, previous = [], False
        if self.behavior == "MergedWithNext":  # a match joins the piece after it, so walk backwards
            for p, is_match in reversed(marked):
                if out and is_match and not previous:
                    out[-1] = p + out[-1]
                else:
                    out.append(p)
                previous = is_match
            return [p for p in reversed(out) if p]
        for p, is_match in marked:  # MergedWithPrevious: a match joins the piece before; Contiguous: runs of matches
            joins = (is_match and not previous) if self.behavior == "MergedWithPrevious" else (is_match == previous)
            if out and joins:
                out[-1] += p
            else:
                out.append(p)
            previous = is_match
        return [p for p in out if p]


def _compile_pre_tokenizer(spec) -> list:
    """A tokenizer.json "pre_tokenizer" -> our list of _Split stages (the final ByteLevel is the UTF-8 encoding)."""
    steps, todo = [], [("pre_tokenizer", spec)]
    while todo:  # flatten (nested) Sequences, keeping each step's path for error messages
        where, step = todo.pop(0)
        if not isinstance(step, dict):
            raise ValueError(f"{where} = {step!r} is not supported: expected an object with a 'type'")
        if step.get("type") == "Sequence":
            if not isinstance(step.get("pretokenizers"), list):
                raise ValueError(f"{where}.pretokenizers = {step.get('pretokenizers')!r}: expected a list of steps")
            todo = [(f"{where}.pretokenizers[{i}]", s) for i, s in enumerate(step["pretokenizers"])] + todo
        else:
            steps.append((where, step))
    if not steps or steps[-1][1].get("type") != "ByteLevel":
        raise ValueError(f"pre_tokenizer = {spec!r} is not supported: nanovl implements byte-level BPE, whose "
                         f"pre-tokenizer ends with {{'type': 'ByteLevel'}}")
    stages = []
    for k, (where, step) in enumerate(steps):
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern", {})
            if isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str):
                source = translate_regex(pattern["Regex"])
            elif isinstance(pattern, dict) and isinstance(pattern.get("String"), str):
                source = re.escape(pattern["String"])
            else:
                raise ValueError(f"{where}.pattern = {pattern!r} is not supported: expected {{'Regex': ...}} "
                                 f"or {{'String': ...}}")
            if step.get("behavior") not in _BEHAVIORS:
                raise ValueError(f"{where}.behavior = {step.get('behavior')!r} is not supported: use one of "
                                 f"{', '.join(_BEHAVIORS)}")
            stages.append(_Split(source, step["behavior"], bool(step.get("invert", False))))
        elif kind == "Digits":  # tokenizers: numeric characters (Unicode N) alone, or in contiguous runs
            stages.append(_Split(translate_regex(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")))
        elif kind == "ByteLevel" and k == len(steps) - 1:
            if step.get("add_prefix_space"):
                raise ValueError(f"{where}.add_prefix_space = True is not supported (DeepSeek uses False)")
            if step.get("use_regex", True):  # tokenizers' default is true: split with GPT-2's pattern first
                stages.append(_Split(translate_regex(GPT2_PATTERN)))
        else:
            raise ValueError(f"{where}.type = {kind!r} is not supported here: nanovl implements Split, Digits and "
                             f"ByteLevel as the last step (see nanovl/tokenizer.py)")
    return stages


# ----------------------------------------------------------------------------------------------------------------------
# Added tokens, as tokenizer.json writes them and the tokenizers library numbers them

def special_token(id: int, content: str) -> dict:
    """A special token's tokenizer.json entry: matched literally, never split or normalised."""
    return {"id": id, "content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": True}


def added_token_id(content: str, vocab: dict, taken) -> int:
    """The id the tokenizers library gives a token added after those with the ids `taken` (it ignores any id a file
    gives): its vocab id if the vocab has it, else the next after the vocab and the added tokens."""
    top = max(taken, default=-1)
    return vocab[content] if content in vocab else top + 1 if top >= len(vocab) else len(vocab)


_CACHE_SIZE = 1 << 18  # pieces remembered per cache (Tokenizer's, below); a full cache is simply emptied


class Tokenizer:
    """Byte-level BPE. `vocab` maps byte-level token strings ("Ġthe") to ids, `merges` lists the fused pairs in
    training order, `added_tokens` are tokenizer.json's entries ({"id", "content", "special", ...}) matched literally
    in text before anything else, `pre_tokenizer` is a tokenizer.json pre_tokenizer spec."""

    def __init__(self, vocab: dict, merges: list, added_tokens: list, pre_tokenizer: dict = DEEPSEEK_PRE_TOKENIZER,
                 ignore_merges: bool = False, post_processor: Optional[dict] = None):
        self.vocab, self.merges, self.added_tokens = vocab, [tuple(m) for m in merges], added_tokens
        self.pre_tokenizer, self.ignore_merges, self.post_processor = pre_tokenizer, ignore_merges, post_processor
        self._stages = _compile_pre_tokenizer(pre_tokenizer)
        missing = [b for b in UTF8_BYTES if BYTE_TO_CHAR[b] not in vocab]
        if missing:  # tokenizers would silently drop such bytes (or emit unk); refuse instead
            raise ValueError(f"the vocabulary lacks the byte tokens for bytes {missing[:10]}...: byte-level BPE needs "
                             f"all {len(UTF8_BYTES)} that UTF-8 text can hold, so that every text can be encoded")
        self._byte_ids = [vocab.get(BYTE_TO_CHAR[b]) for b in range(256)]  # (None: a byte no text holds)
        # (left id, right id) -> (rank, merged id). Later duplicates win, as in tokenizers.
        self._merge_map = {}
        for rank, (a, b) in enumerate(self.merges):
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise ValueError(f"merge #{rank} {a!r} + {b!r}: {a!r}, {b!r} and {a + b!r} must all be in the vocab")
            self._merge_map[vocab[a], vocab[b]] = (rank, vocab[a + b])
        # tokenizers does not read an added token's "id" from the file: it gives a token of the vocab its vocab id,
        # and each other one the next id after the vocab and the added tokens before it, in file order. A file whose
        # ids say otherwise would give other ids there than here (the image token's among them): refused. An added
        # token without text it skips altogether (no id, never matched), and so do we (it is kept for save alone).
        added = [t for t in added_tokens if t["content"]]
        numbered = {}
        for t in added:
            numbered.setdefault(t["content"], added_token_id(t["content"], vocab, numbered.values()))
        renumbered = [(t["content"], t["id"], numbered[t["content"]]) for t in added
                      if numbered[t["content"]] != t["id"]]
        if renumbered:
            content, given, theirs = renumbered[0]
            raise ValueError(f"added token {content!r} has id {given}, but the tokenizers library, which ignores an "
                             f"added token's id, would number it {theirs} (a token of the vocab keeps its vocab id; "
                             f"the others follow the vocab's {len(vocab)} ids in file order, without gaps), so the "
                             f"ids would differ from the reference's ({len(renumbered)} of the {len(added)} "
                             f"added tokens are numbered otherwise there)")
        # id -> the bytes it decodes to, as tokenizers' ByteLevel decoder gives them: a token spelt in the byte
        # alphabet ("Ġthe") is those bytes, any other (a special token such as "<｜end▁of▁sentence｜>") its own UTF-8.
        # Added tokens decode the same way: an added "ø" is byte 0xF8, which alone is no UTF-8 and decodes to U+FFFD.
        self._added = {t["content"]: t["id"] for t in added}
        # What decoding for display leaves out, as HF's decode(skip_special_tokens=True): added tokens marked special
        self.special_ids = frozenset(t["id"] for t in added if t.get("special"))
        ids = [*vocab.values(), *self._added.values()]
        if ids and max(ids) >= max(2 * len(ids), 1 << 20):  # every id gets a slot below: an id of 10**10 would not fit
            raise ValueError(f"token ids run up to {max(ids)} for {len(ids)} tokens: ids are numbered from 0, without "
                             "wide gaps (a corrupt or hand-edited file?)")
        self._id_bytes = [None] * (max(ids) + 1 if ids else 0)
        spelt = lambda token: bytes(CHAR_TO_BYTE[c] for c in token) if all(c in CHAR_TO_BYTE for c in token) \
            else token.encode("utf-8")
        for token, i in vocab.items():
            self._id_bytes[i] = spelt(token)
        self._id_token = {i: t for t, i in vocab.items()}
        for content, i in self._added.items():
            self._id_token[i] = content
            self._id_bytes[i] = spelt(content)
        # tokenizers first cuts out the added tokens with normalized=false, then (in what is left) those with
        # normalized=true; in each pass the leftmost match wins, then the longest, which is what an alternation
        # sorted longest first gives.
        self._added_res = []
        for normalized in (False, True):
            tokens = sorted((t["content"] for t in added if bool(t.get("normalized")) == normalized),
                            key=len, reverse=True)
            if tokens:
                self._added_res.append(re.compile("|".join(map(re.escape, tokens))))
        self._piece_cache = [{} for _ in self._stages]  # per stage: piece -> the final pieces it becomes
        self._bpe_cache = {}  # final piece -> ids

    # ---- encoding ----------------------------------------------------------------------------------------------------

    def _split_added(self, text: str) -> list:
        """[(chunk, None) for ordinary text or (content, id) for an added token], in order."""
        parts = [(text, None)]
        for rx in self._added_res:
            out = []
            for chunk, tid in parts:
                pos = 0
                if tid is None:
                    for m in rx.finditer(chunk):
                        out += [(chunk[pos:m.start()], None), (m.group(), self._added[m.group()])]
                        pos = m.end()
                out.append((chunk[pos:], None) if tid is None else (chunk, tid))
            parts = out
        return [(c, t) for c, t in parts if c]

    def pre_tokenize(self, text: str) -> list:
        """The pieces that BPE merges within, as text. Matches tokenizers' pre_tokenizer (before byte mapping)."""
        if not self._stages:
            return [text] if text else []
        out = []
        for piece in self._stages[0](text):
            out += self._pre_tokenize_rest(piece, 1)
        return out

    def _pre_tokenize_rest(self, piece: str, k: int):
        # Stages k.. act on each piece independently, so their result is memoised per piece. For DeepSeek, stage 0
        # cuts lines, stage 1 cuts words, and from stage 2 on almost every piece has been seen before: encoding
        # costs one regex split per line plus a dictionary lookup per word.
        if k == len(self._stages):
            return (piece,)
        cache = self._piece_cache[k]
        got = cache.get(piece)
        if got is None:
            got = []
            for sub in self._stages[k](piece):
                got += self._pre_tokenize_rest(sub, k + 1)
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[piece] = got = tuple(got)
        return got

    def _bpe(self, piece: str) -> list:
        """Merge the bytes of one piece, exactly as tokenizers' BPE (word.rs, merge_all): a heap of the adjacent pairs
        ordered by (merge rank, position); pop the best, fuse it if still present, push the two pairs it creates.
        O(n log n) in the piece length, so a 10,000-space run is no problem."""
        if self.ignore_merges and byte_level(piece) in self.vocab:  # Llama-3-style files: known words go whole
            return [self.vocab[byte_level(piece)]]
        ids = [self._byte_ids[b] for b in piece.encode("utf-8")]
        merges, n = self._merge_map, len(ids)
        heap = [(m[0], i, m[1]) for i in range(n - 1) if (m := merges.get((ids[i], ids[i + 1])))]
        if not heap:
            return ids
        heapq.heapify(heap)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))  # a linked list over the surviving symbols
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] is None or j >= n:  # the left symbol was already fused away, or is now the last one
                continue
            m = merges.get((ids[i], ids[j]))
            if m is None or m[1] != new:  # stale entry: the pair at i changed since it was pushed
                continue
            ids[i], ids[j] = new, None
            nxt[i] = k = nxt[j]
            if k < n:
                prv[k] = i
                if m := merges.get((new, ids[k])):
                    heapq.heappush(heap, (m[0], i, m[1]))
            if (p := prv[i]) >= 0 and (m := merges.get((ids[p], new))):
                heapq.heappush(heap, (m[0], p, m[1]))
        return [t for t in ids if t is not None]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list:
        """Text -> token ids. Added tokens written in the text (e.g. "<image_placeholder>") become their ids."""
        if not isinstance(text, str):
            raise ValueError(f"expected text as a string, got {type(text).__name__}" +
                             (" (decode bytes first: text.decode('utf-8'))" if isinstance(text, bytes) else ""))
        try:  # (UTF-8 cannot encode a lone surrogate: a broken character from a bad decode, or a JSON escape)
            if not text.isascii():
                text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text holds a lone surrogate, {text[e.start]!r}, at character {e.start} "
                             f"({text[max(0, e.start - 20):e.start]!r} before it), which is no character; fix the "
                             "text") from None
        ids = [self.bos_id] if bos else []
        cache = self._bpe_cache
        for chunk, added_id in self._split_added(text):
            if added_id is not None:
                ids.append(added_id)
                continue
            for piece in self.pre_tokenize(chunk):
                got = cache.get(piece)
                if got is None:
                    if len(cache) >= _CACHE_SIZE:
                        cache.clear()
                    got = cache[piece] = self._bpe(piece)
                ids += got
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Token ids -> text. Bytes are joined before UTF-8 decoding, so a character split across tokens comes back
        whole; bytes that are not valid UTF-8 (a cut-off sequence) become U+FFFD. skip_special_tokens: leave out the
        added tokens marked special (BOS, EOS, ...), as HF's decode does for an answer shown to a user."""
        table, chunks = self._id_bytes, []
        if hasattr(ids, "ndim") and hasattr(ids, "tolist"):  # a tensor or a numpy array
            ids = ids.tolist() if ids.ndim else [ids.tolist()]
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise ValueError(f"expected a list of token ids, got {type(ids).__name__} {reprlib.repr(ids)}")
        for i in ids:
            if not isinstance(i, numbers.Integral) or isinstance(i, bool):  # int(108.9) would decode as 108
                raise ValueError(f"expected token ids (integers), got {reprlib.repr(i)} in {reprlib.repr(ids)}" +
                                 (": decode one row at a time" if isinstance(i, (list, tuple)) else ""))
            i = int(i)
            if not 0 <= i < len(table) or table[i] is None:
                raise ValueError(f"token id {i} is not in this tokenizer: valid ids are 0..{len(table) - 1}"
                                 + ("" if all(b is not None for b in table) else " (with gaps)"))
            if not (skip_special_tokens and i in self.special_ids):
                chunks.append(table[i])
        return b"".join(chunks).decode("utf-8", errors="replace")

    # ---- vocabulary --------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: every id is in 0..vocab_size-1."""
        return len(self._id_bytes)

    def token_to_id(self, token: str) -> int:
        """An added token's text ("<pad>") or a model token in byte-level spelling ("Ġthe", see byte_level) -> id."""
        if token in self._added:
            return self._added[token]
        if token in self.vocab:
            return self.vocab[token]
        if token in (BOS, EOS):  # a special token that a tokenizer of one's own may lack
            raise ValueError(f"{token!r} is not a token of this tokenizer: it has no such added token (DeepSeek's has "
                             f"it as a special token)")
        raise ValueError(f"{token!r} is not a token of this tokenizer (model tokens are spelled byte-level: "
                         f"{byte_level(token)!r})")

    def id_to_token(self, i: int) -> str:
        if i not in self._id_token:
            raise ValueError(f"token id {i} is not in this tokenizer: valid ids are 0..{self.vocab_size - 1}")
        return self._id_token[i]

    @property
    def bos_id(self) -> int:
        return self.token_to_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(EOS)

    @property
    def pad_id(self) -> int:
        # <pad> where the tokenizer has one (ours do, id 2); the released one has none, and DeepSeek pads with EOS
        # (facts section 10), as we then do.
        return self._added.get(PAD, self.eos_id)

    @property
    def image_id(self) -> int:
        if IMAGE not in self._added:
            raise ValueError(f"this tokenizer has no {IMAGE} token: DeepSeek-VL adds it as a special token (id 100015 "
                             f"in the released tokenizer, facts section 9); train with it in special_tokens")
        return self._added[IMAGE]

    def with_special_token(self, content: str) -> "Tokenizer":
        """This tokenizer, with `content` added as a special token if it has none, at the id the tokenizers library
        gives it (added_token_id), as transformers' add_special_tokens adds one."""
        if content in self._added:
            return self
        token = special_token(added_token_id(content, self.vocab, self._added.values()), content)
        return Tokenizer(self.vocab, self.merges, self.added_tokens + [token], self.pre_tokenizer, self.ignore_merges,
                         self.post_processor)

    # ---- training ----------------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens=SPECIAL_TOKENS,
              progress: bool = False) -> "Tokenizer":
        """Learn a byte-level BPE of exactly `vocab_size` ids: the special tokens (ids 0..k-1), the 256 bytes (id
        k + byte value), then one token per merge. Deterministic: ties go to the pair with the smaller ids."""
        k = len(special_tokens)
        if vocab_size < k + 256:
            raise ValueError(f"vocab_size {vocab_size} is too small: {k} special tokens + 256 byte tokens come first")
        added = [special_token(i, t) for i, t in enumerate(special_tokens)]
        base = cls({**{t: i for i, t in enumerate(special_tokens)}, **{BYTE_TO_CHAR[b]: k + b for b in range(256)}}, [],
                   added)  # (the special tokens in its vocab too, as in the one returned: see the end)
        # 1. Count pre-token pieces: BPE never merges across pieces, so each distinct piece is one "word" with a count.
        counts = Counter()
        for text in texts:
            for chunk, tid in base._split_added(text):  # special tokens in the corpus are not merged into words
                if tid is None:
                    counts.update(base.pre_tokenize(chunk))
        # Each word is rescanned whole at every merge that touches it, so a piece tens of thousands of bytes long (a
        # DNA sequence or a hex dump among --text files: letters with no space or punctuation to split them) made
        # training quadratic: 40,000 random ACGT letters beside three copies of the README took 100 s to train 2048
        # ids on, 1.2 s counted in parts (the README alone: 0.3 s). Pieces are counted in parts of at most
        # TRAIN_PIECE_BYTES; only pairs across a cut go uncounted, and no token that long is wanted.
        words, freqs = [], []
        for piece, count in counts.items():
            raw = piece.encode("utf-8")
            for start in range(0, len(raw), TRAIN_PIECE_BYTES):
                words.append([k + b for b in raw[start:start + TRAIN_PIECE_BYTES]])
                freqs.append(count)
        # 2. Count adjacent pairs (weighted by word count), remembering which words hold each pair.
        pair_count, where = defaultdict(int), defaultdict(list)
        for w, word in enumerate(words):
            for pair in zip(word, word[1:]):
                pair_count[pair] += freqs[w]
                where[pair].append(w)
        # 3. Merge the best pair, again and again. The heap holds (-count, pair) entries that may be stale: counts
        # only go down between pushes (a pair that goes up always contains the new token and is pushed afresh), so a
        # popped entry whose count is current is the true best; a stale one is pushed back with its current count.
        heap = [(-c, pair) for pair, c in pair_count.items()]
        heapq.heapify(heap)
        token_bytes = [t.encode("utf-8") for t in special_tokens] + [bytes([b]) for b in range(256)]
        id_of = {t: i for i, t in enumerate(token_bytes) if i >= k}  # bytes -> id, for the model's tokens
        forbidden = {bytes(CHAR_TO_BYTE[c] for c in t) for t in special_tokens if all(c in CHAR_TO_BYTE for c in t)}
        merges = []
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=vocab_size - len(token_bytes), desc="BPE merges")
        while len(token_bytes) < vocab_size:
            while heap:
                neg, pair = heapq.heappop(heap)
                if pair_count.get(pair, 0) == -neg:
                    break
                if pair_count.get(pair, 0) > 0:
                    heapq.heappush(heap, (-pair_count[pair], pair))
            else:
                raise ValueError(f"the corpus is too small for vocab_size {vocab_size}: every piece is a single "
                                 f"token after {len(token_bytes)} ids; use more text or vocab_size <= "
                                 f"{len(token_bytes)}")
            a, b = pair
            merged = token_bytes[a] + token_bytes[b]
            if merged in forbidden:  # it would be spelled like a special token (e.g. "<pad>"): never make it
                del pair_count[pair], where[pair]
                continue
            new = id_of.get(merged)  # two different pairs can spell the same token ("a"+"bc", "ab"+"c"): reuse it
            if new is None:
                new = id_of[merged] = len(token_bytes)
                token_bytes.append(merged)
                if progress:
                    bar.update()
            merges.append(pair)
            grown = set()  # the pairs holding the new token: their counts went up, so they get fresh heap entries
            for w in where.pop(pair):
                word, out, i = words[w], [], 0
                while i < len(word):
                    if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                        out.append(new)
                        i += 2
                    else:
                        out.append(word[i])
                        i += 1
                if len(out) == len(word):  # stale: an earlier merge in this word already used a or b
                    continue
                f, indexed = freqs[w], set()
                for p in zip(word, word[1:]):  # recount this word's pairs: cheap, words are short
                    pair_count[p] -= f
                for p in zip(out, out[1:]):
                    pair_count[p] += f
                    if new in p and p not in indexed:
                        indexed.add(p)
                        where[p].append(w)
                grown |= indexed
                words[w] = out
            del pair_count[pair]
            for p in grown:
                heapq.heappush(heap, (-pair_count[p], p))
        if progress:
            bar.close()
        # As tokenizers' trainer does, the special tokens are in the model's vocab too (tokenizers reassigns the ids
        # of added tokens that are not), spelled as themselves.
        spell = list(special_tokens) + ["".join(BYTE_TO_CHAR[x] for x in t) for t in token_bytes[k:]]
        return cls({t: i for i, t in enumerate(spell)}, [(spell[a], spell[b]) for a, b in merges], added)

    # ---- tokenizer.json ----------------------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write Hugging Face's tokenizer.json (a folder gets path/tokenizer.json). `tokenizers` reads it back."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def same_ids(self, other: "Tokenizer") -> bool:
        """Whether both turn every text into the same ids: the same vocabulary, merges and special tokens."""
        return (self.vocab, self.merges, self.added_tokens) == (other.vocab, other.merges, other.added_tokens)

    def fingerprint(self) -> str:
        """A short digest of what same_ids compares. train.py keeps it in the checkpoints it writes, so that weights
        which travel without their tokenizer.json still refuse another tokenizer of the same size, whose ids would
        mean other words to the model (and which nothing else could tell apart)."""
        what = json.dumps([self.vocab, [list(m) for m in self.merges], self.added_tokens], sort_keys=True,
                          ensure_ascii=False)
        return hashlib.sha256(what.encode("utf-8")).hexdigest()[:16]

    def to_json(self) -> str:
        """The text of the tokenizer.json that save writes."""
        data = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": self.added_tokens,
            "normalizer": None,
            "pre_tokenizer": self.pre_tokenizer,
            "post_processor": self.post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": self.ignore_merges, "vocab": self.vocab,
                      # "a b" strings: every version of tokenizers reads them (byte-level tokens contain no space)
                      "merges": [f"{a} {b}" for a, b in self.merges]},
        }
        return json.dumps(data, ensure_ascii=False, indent=1)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read a tokenizer.json (or a folder holding one): ours, or a released one such as DeepSeek-LLM's."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}: pass the file, or a model folder that holds one")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{file} is not a tokenizer.json: it is not text (a model file?)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON ({e}): expected a tokenizer.json") from None

        def refuse(field, value, why):
            raise ValueError(f"{file}: {field} = {reprlib.repr(value)} is not supported: {why}")

        if not isinstance(data, dict):
            raise ValueError(f"{file} holds a JSON {type(data).__name__}, but a tokenizer.json is a JSON object")
        for field, kind in [("model", dict), ("added_tokens", list), ("decoder", dict)]:
            if not isinstance(data.get(field) or kind(), kind):
                refuse(field, data[field], f"expected a JSON {'object' if kind is dict else 'array'}")
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            refuse("model.type", model.get("type"), "nanovl implements byte-level BPE only")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
            refuse("model.vocab", vocab, "expected an object of token: integer id")
        if len(set(vocab.values())) != len(vocab) or min(vocab.values(), default=0) < 0:
            seen = Counter(vocab.values())
            twice = sorted(i for i, n in seen.items() if i < 0 or n > 1)[:3]
            refuse("model.vocab", vocab, f"ids must be distinct and not negative (ids such as {twice} are not): a "
                                         "corrupt or hand-edited file")
        if not isinstance(model.get("merges", []), list):
            refuse("model.merges", model["merges"], "expected an array of merges")
        for field, allowed in [("dropout", (None, 0, 0.0)), ("continuing_subword_prefix", (None, "")),
                               ("end_of_word_suffix", (None, "")), ("byte_fallback", (None, False))]:
            if model.get(field) not in allowed:
                refuse(f"model.{field}", model[field], f"only {allowed[0]!r} (byte-level BPE needs no more)")
        if data.get("normalizer") not in (None, {"type": "Sequence", "normalizers": []}):
            refuse("normalizer", data["normalizer"], "DeepSeek's tokenizer has none (null or an empty Sequence)")
        if data.get("truncation") is not None:
            refuse("truncation", data["truncation"], "truncate the id list yourself")
        decoder = data.get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            refuse("decoder", data.get("decoder"), "decoding joins the tokens' bytes, which is the ByteLevel decoder")
        bad = [t for t in data.get("added_tokens") or []
               if not isinstance(t, dict) or not isinstance(t.get("id"), int) or t["id"] < 0 or
               not isinstance(t.get("content"), str)]
        if bad:
            refuse("added_tokens", bad[0], 'each must be an object with an integer "id" (0 or more) and a string '
                                           '"content"')
        for i, t in enumerate(data.get("added_tokens") or []):
            for flag in ("single_word", "lstrip", "rstrip"):
                if t.get(flag):
                    refuse(f"added_tokens[{i}].{flag}", True, "added tokens are matched as exact text only")
        # The post_processor (e.g. a template adding BOS) is kept for save() but not applied: encode() adds no BOS
        # unless asked (bos=True). The official processor gets its BOS from that template (facts section 9); nanovl.chat
        # writes bos_id first itself, so each rendered sequence shows where its BOS comes from.
        merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
        bad = [m for m in merges if not isinstance(m, list) or len(m) != 2 or not all(isinstance(s, str) for s in m)]
        if bad:
            refuse("model.merges", bad[0], 'each merge must be "left right" or ["left", "right"]')
        return cls(model["vocab"], merges, data.get("added_tokens") or [], data.get("pre_tokenizer"),
                   bool(model.get("ignore_merges")), data.get("post_processor"))
