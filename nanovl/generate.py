"""
Generation: how the next token is picked, batched decoding with the KV cache, and a chat session whose cache holds
the conversation between turns (nanochat's engine pattern; the official repo calls HF's generate, facts section 9).

    prompt ids (B, T), left-padded, and the images of every row in order
      -> one forward pass fills the KV cache with the whole prompt (the images go through the towers here, once)
      -> then one token at a time: logits of the last position -> pick -> feed it back, attending over the cache
      -> a row stops at a stop id (the chat passes <｜end▁of▁sentence｜>); generation stops when every row has, or at
         max_new_tokens

The official cli_chat.py and inference example stop at <｜end▁of▁sentence｜> alone, as we do. The template's second
stop string, "User:" (facts section 9), is used only by the Gradio demo (serve/inference.py's stopping criteria), which
ends an answer that goes on to write the user's next turn.

Picking (`pick`), in HF's order: repetition penalty -> temperature -> top-k -> top-p -> sample; temperature 0 is
greedy. The official chat CLI samples with temperature 0.2, top-p 0.95, repetition penalty 1.1 (and top-k 50:
it sets no top_k, and transformers 4's GenerationConfig defaults to 50); its inference example decodes greedily, 512
new tokens at most.

A chat turn (`ChatSession.ask`) feeds only what is new since the cache was last written: the end-of-sentence token
that closes the previous answer, then "User: ...\\n\\nAssistant:". The system prompt, earlier turns and their images
are never run again. The ids are the ones render_chat gives for the same conversation, each earlier answer encoded
again from its stripped text, as the official processor renders a conversation given as messages
(apply_sft_template_for_multi_turn_prompts strips every content; where the model's own ids for the text differ, they
leave the cache). The official cli_chat.py re-renders its history the same way but unstripped (it passes
conv.get_prompt() as the prompt, which process_one takes as it is), so there an earlier answer also keeps the space
its first word was generated with, after the template's own: "Assistant:  The ...". We do not copy that doubled
space; the first turn's prompt is the same either way.
"""

import numbers
import reprlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from nanovl.chat import IMAGE_TAG, SYSTEM_PROMPT, expand_images, start_ids, user_ids


FP32_MAX = torch.finfo(torch.float32).max  # (the logits are divided in fp32)


@dataclass
class Sampling:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; >1 discourages tokens already generated in this answer
    seed: int = 0

    def check(self) -> "Sampling":
        """self, or ValueError naming each setting of the wrong type or out of its range."""
        kinds = {"max_new_tokens": int, "top_k": int, "seed": int, "temperature": float, "top_p": float,
                 "repetition_penalty": float}
        # numpy's numbers count as numbers (numbers.Integral, numbers.Real); a bool does not (True is no count)
        wrong = [f"{name} must be {'an integer' if kind is int else 'a number'}, got {getattr(self, name)!r}"
                 for name, kind in kinds.items() if isinstance(getattr(self, name), bool) or
                 not isinstance(getattr(self, name), numbers.Integral if kind is int else numbers.Real)]
        if wrong:  # (the ranges below compare numbers; max_new_tokens=2.5 would fail deep in the cache)
            raise ValueError("bad sampling settings: " + "; ".join(wrong))
        # Sampling divides the fp32 logits by the temperature, and a repetition penalty divides some: far enough below
        # 1 (around 1e-37 for a logit of 30) a logit passes the largest float, and the softmax of inf is NaN. 1e-4 is a
        # floor well clear of that, and a temperature that small is greedy in effect anyway. Above fp32's largest
        # float, the divisor itself is inf, and the image token's -inf logit divided by it NaN.
        bad = [f"{name} must be {need}, got {value}" for name, value, ok, need in (
            ("temperature", self.temperature, self.temperature == 0 or 1e-4 <= self.temperature <= FP32_MAX,
             "0 (greedy), or at least 1e-4 and finite in fp32"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0 (0: off)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1] (1: off)"),
            ("repetition_penalty", self.repetition_penalty, 1e-4 <= self.repetition_penalty <= FP32_MAX,
             "at least 1e-4 and finite in fp32 (1: off)"),
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
            ("seed", self.seed, -2 ** 63 <= self.seed < 2 ** 64, "a 64-bit integer")) if not ok]
        if self.temperature == 0 and (self.top_k > 0 or 0 < self.top_p < 1):
            bad.append("top_k and top_p choose among the tokens a sample is drawn from, so they need temperature > 0 "
                       "(temperature 0 decodes greedily: the likeliest token, whatever they say)")
        if bad:
            raise ValueError("bad sampling settings: " + "; ".join(bad))
        for name, kind in kinds.items():  # as Python's own (np.float32(0.7) would divide the logits in its precision)
            setattr(self, name, kind(getattr(self, name)))  # (in range now: 10**400 was refused above, not overflowed)
        return self


def checked(sampling) -> Sampling:
    """sampling.check(), or ValueError if what was passed as sampling is not a Sampling at all."""
    if not isinstance(sampling, Sampling):
        raise ValueError(f"expected sampling=Sampling(...), got {type(sampling).__name__}")
    return sampling.check()


def warp(logits, generated, s: Sampling):
    """The sampling distribution's logits: (B, V) last-position logits, generated (B, t) ids of this answer so far.
    Tokens that may not be picked get -inf. Each step matches its HF logits processor (a test checks this)."""
    logits = logits.float()
    if s.repetition_penalty != 1.0 and generated.shape[1]:
        # HF's RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the penalty if positive and
        # multiplied if negative, so it always becomes less likely. HF's generate applies it to input_ids, which are
        # only the generated tokens when the prompt comes as embeddings, as in DeepSeek-VL's CLI.
        seen = logits.gather(1, generated)  # (B, t)
        logits = logits.scatter(1, generated, torch.where(seen > 0, seen / s.repetition_penalty,
                                                          seen * s.repetition_penalty))
    if s.temperature == 0:
        return logits
    logits = logits / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probabilities add up to top_p. Counted as HF's
        # TopPLogitsWarper counts, from the least likely end: a token is dropped when it and every token less likely
        # hold at most 1 - top_p of the mass (the most likely token is always kept). Summed from the top instead
        # (drop a token once those above it reach top_p), the running sum nears 1, where fp32 keeps 7 digits: over
        # 102,400 tokens its rounding moved the cut by a token in 0 to 55% of random rows, by their spread and top_p.
        # From the bottom, the sums that decide are small and exact enough, and tied tokens at the cut are kept as HF
        # keeps them.
        sorted_logits, order = logits.sort(dim=-1)  # (B, V) least likely first
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - s.top_p  # (B, V) in sorted order
        drop_sorted[:, -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def pick(logits, generated, s: Sampling, generator: Optional[torch.Generator] = None):
    """logits (B, V) of the last position, generated (B, t) ids of this answer so far -> next ids (B,)."""
    logits = warp(logits, generated, s)
    if s.temperature == 0:
        return logits.argmax(-1)  # greedy
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


class DecodeStep:
    """Feeds one new token per row through the decoder and its cache: step(tok (B, 1)) -> logits (B, V).

    It runs Llama.decode_step, whose shapes need not change from one token to the next. On a GPU the step is recorded as
    a CUDA graph the first time and replayed after that: one launch per token instead of several hundred small kernels,
    whose launch overhead would otherwise set the decoding speed of a 1.3B model (gpt-fast's recipe). compile=True also
    runs it through torch.compile, which fuses the norms, rotary embeddings and activations into fewer kernels and, at
    batch 1, writes the projections as reductions (nanovl.llama.compiling_one_row); the first call then takes a while
    (compiling, and trying block sizes for those reductions: coordinate-descent tuning, as gpt-fast does), the later
    ones, and later generations of the same shapes, do not. Compiled, the step also reads q, k and v's weights in one
    product, and gate and up's in another (nanovl.llama.stacked_weights, which moves them into one block of memory each,
    the first time). Recorded or compiled, the step keeps one shape, so its attention reads every slot of the cache,
    filled or not; run as it is (off CUDA, not compiled: the CPU) it reads only the slots filled so far, which in a
    chat's 4096-slot cache saves about a fifth of the 1.3B's step (README, Chat).
    """

    # torch.compile's options for the step; they win over torch._inductor.config (bench.py --inductor replaces them
    # for a run, to measure the step without the tuning).
    compile_options = {"coordinate_descent_tuning": True}
    stack = True  # compiled: stacked projections (bench.py --separate-projections times the step without, too)

    def __init__(self, llm, cache, compile: bool = False):
        self.llm, self.cache = llm, cache
        step = torch.compile(llm.decode_step, fullgraph=True, options=dict(self.compile_options)) \
            if compile else llm.decode_step
        stacked = llm.stacked_projections() if compile and self.stack else None
        # (bench.py's profile calls run too)
        self.run = lambda tok, cache, pos, span=None: step(tok, cache, pos, stacked, span)
        self.device = cache.device
        self.fixed = compile or self.device.type == "cuda"  # one shape for every token (recorded, or compiled for it)
        # What a recorded graph reads: it replays on these very tensors, so each call copies its inputs into them.
        self.tok = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph = self.logits = None

    def __call__(self, tok):
        self.llm.check_length(1, self.cache)
        if self.device.type != "cuda":
            self.tok.copy_(tok)
            self.pos.fill_(self.cache.length)
            logits = self.run(self.tok, self.cache, self.pos, None if self.fixed else self.cache.length + 1)
        else:
            with torch.cuda.device(self.device):  # streams and graphs belong to the current device: make it the model's
                self.tok.copy_(tok)
                self.pos.fill_(self.cache.length)
                if self.graph is None:
                    self.record()
                self.graph.replay()
                logits = self.logits
        self.cache.length += 1
        return logits

    def record(self):
        # Warm up on a side stream first (cuBLAS handles, compilation and autotuning happen on the first calls, and
        # may not happen inside a recording), as torch.cuda.graphs documents. Warming up and recording write this
        # token's keys into the cache slot it is about to be written to anyway: nothing else changes.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run(self.tok, self.cache, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.run(self.tok, self.cache, self.pos)  # (B, V), rewritten in place by each replay
        self.graph, self.logits = graph, logits  # kept only once recorded: a failed recording is tried again


def _decode(model, step: DecodeStep, logits, s: Sampling, stop_ids, pad_id: int, n_words: int,
            on_step=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Decode from the prompt's last logits (B, V) until every row hit a stop id or max_new_tokens. -> (B, n) ids,
    with pad_id after a row's stop token. on_step(ids (B,)) is called with each token picked (for streaming).
    generator: the random stream samples are drawn from (default: a new one seeded with s.seed; a chat session keeps
    one for all its turns).

    Only ids below n_words (the tokenizer's size) are ever picked: the embedding is padded past the tokenizer (to
    102400 in the released models), and those rows have no text to decode to. Nor is <image_placeholder>: fed back,
    it would ask for an image that does not exist."""
    B, device = logits.shape[0], logits.device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(s.seed)
    image_id = torch.tensor([model.cfg.image_token_id], device=device)  # made once, not per step
    stop = torch.tensor(sorted(stop_ids), device=device)
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_new = min(s.max_new_tokens, step.cache.max_len - step.cache.length + 1)  # the last token is never fed back
    # Whether every row has stopped is a question for the host, which must wait for the answer. On a GPU, asked after
    # the next step is queued it would wait for that step too, and asked before, the GPU would idle while the host
    # picks and queues the step. So the answer is copied out before the step is queued (an event marks the copy),
    # and the host waits for the copy alone while the GPU runs the step. The step after every row's last token is
    # then queued in vain, and its cache slot given back (this halved generate's time beyond its step on an H200:
    # README, History). Not the first step: it records the graph (and compiles), too dear to risk for an answer
    # that is one token long.
    cuda = device.type == "cuda"
    all_done = torch.zeros((), dtype=torch.bool, pin_memory=cuda)
    copied = torch.cuda.Event() if cuda else None
    for i in range(n_new):
        # (B, n_words): the embedding's padded rows past the vocabulary, and the image token, are never picked
        logits = logits[:, :n_words].index_fill(1, image_id, float("-inf"))
        nxt = pick(logits, out, s, generator)  # (B,)
        nxt = torch.where(done, pad_id, nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, stop)
        if on_step is not None:
            on_step(nxt)
        if i == n_new - 1:
            break
        ahead = cuda and i > 0  # queue the step before the answer is known
        all_done.copy_(done.all(), non_blocking=ahead)
        if not ahead:  # the answer is at hand: no step is wasted
            if bool(all_done):
                break
        else:
            copied.record(torch.cuda.current_stream(device))
        logits = step(nxt[:, None])  # (B, V): one new token per row
        if ahead:
            copied.synchronize()  # the copy is done; the step may still be running
            if bool(all_done):
                step.cache.length -= 1  # that step fed a token past every row's end: its slot is free again
                break
    return out


def is_id(t) -> bool:
    """A token id: an integer, numpy's too, but not a bool (True would pass for id 1, which the model refuses)."""
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], images=None, sampling: Sampling = Sampling(), stop_ids=(),
             pad_id: int = 0, n_words: Optional[int] = None, on_step: Optional[Callable] = None,
             compile: bool = False) -> List[List[int]]:
    """Several prompts in one left-padded batch -> the new ids of each (the stop token included if reached).

    prompts: token ids with image spans already expanded; images (N, 3, S, S): the images of all rows, in order;
    stop_ids: ids that end a row (none by default: every row runs to max_new_tokens); pad_id: what a row that has
    stopped gets for the rest of the batch's steps (it is cut off the returned ids); n_words: the tokenizer's
    vocabulary size (default: the model's; ids past it, the embedding's padding rows, are never picked); on_step:
    called with each step's (B,) new ids; compile: torch.compile the decoding step (DecodeStep).

    Every prompt must be shorter than the context (a ValueError says so). A row also ends when the context is full: at
    most context - (longest prompt) + 1 new tokens (the last one is never fed back, so needs no cache slot), whatever
    sampling.max_new_tokens says (sample.py says when an answer was cut there; ChatSession leaves that to its caller, as
    sample.py's chat loop does).
    """
    s = checked(sampling)
    if torch.is_tensor(prompts):  # (B, T) ids, unpadded: a list of rows
        prompts = prompts.tolist() if prompts.ndim == 2 else [prompts.tolist()] if prompts.ndim == 1 else prompts
    if isinstance(prompts, Iterator):  # (read once, by the check below)
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not all(isinstance(p, (list, tuple)) and all(map(is_id, p))
                                                    for p in prompts):
        raise ValueError(f"expected prompts as a list of token-id lists (one per prompt: [[1, 2, 3]] for one), got "
                         f"{reprlib.repr(prompts)}")
    if isinstance(stop_ids, Iterator):  # (read once: the check below used it up, and no row ever stopped)
        stop_ids = list(stop_ids)
    if not isinstance(stop_ids, Collection) or isinstance(stop_ids, (str, bytes)) or not all(map(is_id, stop_ids)):
        raise ValueError(f"expected stop_ids as a collection of token ids ({{eos_id}} for one), got {stop_ids!r}")
    vocab = model.cfg.llm.vocab_size
    if n_words is not None and not (isinstance(n_words, numbers.Integral) and model.cfg.image_token_id < n_words <=
                                    vocab):
        raise ValueError(f"n_words is the tokenizer's vocabulary size, the ids that may be picked: expected an integer "
                         f"above the image token's id {model.cfg.image_token_id} and at most the model's {vocab}, got "
                         f"{n_words!r}")
    # A stopped row's pad ids are fed back, and looked up among the picked ids by the repetition penalty.
    words = vocab if n_words is None else n_words
    if not (is_id(pad_id) and 0 <= pad_id < words):
        raise ValueError(f"pad_id must be a token id, 0 to {words - 1} (the tokenizer's pad_id), got {pad_id!r}")
    if images is not None and not torch.is_tensor(images):
        raise ValueError(f"expected images as one (N, 3, S, S) tensor, got {type(images).__name__} (torch.stack a "
                         "list of processed images)")
    if not prompts or not all(len(p) for p in prompts):
        raise ValueError(f"expected one or more prompts of at least one token each, got lengths "
                         f"{[len(p) for p in prompts]}")
    T, ctx = max(len(p) for p in prompts), model.cfg.llm.max_seq_len
    if T >= ctx:
        raise ValueError(f"the longest prompt has {T} tokens but the model's context is {ctx}: at least one token "
                         f"must fit after it; shorten the prompt")
    device = model.llm.embed_tokens.weight.device
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    pad_mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for r, p in enumerate(prompts):  # left padding: every prompt ends at the same position, where decoding starts
        ids[r, T - len(p):] = torch.tensor(p, dtype=torch.long)
        pad_mask[r, T - len(p):] = True
    cache = model.llm.new_cache(len(prompts), min(ctx, T + s.max_new_tokens))
    # Prompts of one length need no padding mask, and without one the prompt runs as plain causal attention.
    pad_mask = None if pad_mask.all() else pad_mask.to(device)
    logits, _ = model(ids.to(device), None if images is None else images.to(device), cache=cache, pad_mask=pad_mask,
                      last_only=True)  # (B, 1, V)
    out = _decode(model, DecodeStep(model.llm, cache, compile), logits[:, -1], s, stop_ids, pad_id, words, on_step)
    rows = []
    for row in out.tolist():  # cut each row after its stop token
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:end])
    return rows


class TextStream:
    """Token ids -> text as they come, for printing an answer while it is generated: on_text gets each new piece
    once it decodes to whole characters (a character split across tokens waits for its last byte). The answer's
    leading space and its special tokens (the end-of-sentence, ...) are not shown: the text is the one ask returns
    (but for the trailing spaces or newlines, which ask strips), decoded as the official CLI decodes
    (skip_special_tokens)."""

    def __init__(self, tokenizer, on_text: Optional[Callable[[str], None]]):
        self.tok, self.on_text, self.ids, self.shown = tokenizer, on_text, [], ""

    def add(self, token: int):
        text = self.tok.decode(self.ids + [token], skip_special_tokens=True).lstrip()  # (a bad id: refused, not kept)
        self.ids.append(token)
        if not text.endswith("\ufffd"):
            self.show(text)

    def finish(self):
        """Once the answer has ended: what it still holds back, a character its last token left incomplete, shown as
        the returned text has it ("\ufffd")."""
        self.show(self.tok.decode(self.ids, skip_special_tokens=True).lstrip())

    def show(self, text: str):
        if self.on_text is not None and len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text


class ChatSession:
    """A conversation with one model, its KV cache holding everything said so far. Samples (temperature > 0) are drawn
    from one random stream for the whole session, seeded by the first turn's Sampling.seed (the official CLI does not
    seed; we seed once so that a chat can be replayed): each turn draws on from where the last stopped (a new seed
    starts a new stream)."""

    def __init__(self, model, tokenizer, processor, system: str = SYSTEM_PROMPT, max_len: Optional[int] = None,
                 compile: bool = False):
        from nanovl.checkpoint import check_tokenizer_fits
        # (another tokenizer's <image_placeholder> is text to this model: "expected 0 images for 0 placeholders")
        check_tokenizer_fits(tokenizer, model.cfg, "the tokenizer given")
        if isinstance(system, str) and IMAGE_TAG in system:  # (an image span with no image: every turn would fail)
            raise ValueError(f"the system prompt holds {IMAGE_TAG}, but images go in messages (the system prompt has "
                             "none)")
        self.model, self.tok, self.proc, self.system = model, tokenizer, processor, system
        self.cache = model.llm.new_cache(1, max_len)
        self.step = DecodeStep(model.llm, self.cache, compile)  # one for the whole chat: on a GPU, one recording
        self.generator: Optional[torch.Generator] = None  # made at the first turn, from its seed
        self.seed: Optional[int] = None
        self.reset()

    def reset(self):
        """Start a new conversation: the same system prompt, the KV cache emptied (its memory, and on a GPU the
        recorded decoding step, kept), the random stream going on."""
        self.cache.length = 0
        self.ids: List[int] = []  # exactly what the cache holds
        # ids decided but not yet fed: the start, or the previous answer's end-of-sentence
        self.pending = start_ids(self.tok, self.system)
        self.turns = 0  # answered so far
        self.cut = False  # whether the last answer stopped at the end of the context, without its end-of-sentence
        self.answer: List[int] = []  # the last answer's ids, as generated (its end-of-sentence included)

    def turn_ids(self, content: str) -> List[int]:
        """The ids a user turn adds, up to and including the generation prompt (the pieces render_chat uses)."""
        tok = self.tok
        ids = user_ids(tok, content) + tok.encode("Assistant:")
        return expand_images(ids, [0] * len(ids), tok.image_id, self.model.cfg.n_image_tokens)[0]

    def check_turn(self, content: str, images: Sequence = (), sampling: Sampling = Sampling()) -> List[int]:
        """The ids this turn would feed, or the ValueError ask would raise for a bad message, image count, setting or
        a conversation too long for the context; it changes nothing. (sample.py asks first, so that an error line is
        not printed after the "Assistant: " that opens an answer.)"""
        checked(sampling)
        if not isinstance(content, str):
            raise ValueError(f"expected the message as a string, got {type(content).__name__}")
        if not isinstance(images, (list, tuple)):  # (a path string would be read letter by letter)
            raise ValueError(f"expected images as a list of PIL images or paths ([image] for one), got "
                             f"{type(images).__name__}")
        if not content.strip():
            raise ValueError(f"the message is empty: expected some text, or an {IMAGE_TAG} for an image")
        weights = self.model.llm.embed_tokens.weight
        if (self.cache.device, self.cache.k[0].dtype) != (weights.device, weights.dtype):
            raise ValueError(f"the model was moved to {weights.device}, {weights.dtype} after this chat began (its KV "
                             f"cache is {self.cache.device}, {self.cache.k[0].dtype}): start a new ChatSession")
        n_tags = content.count(IMAGE_TAG)
        if n_tags != len(images):
            raise ValueError(f"this message has {n_tags} {IMAGE_TAG} but {len(images)} images were given: put one "
                             f"{IMAGE_TAG} in the message for each image, in order")
        new = self.pending + self.turn_ids(content)
        end = self.cache.length + len(new)
        if end >= self.cache.max_len:
            raise ValueError(f"this turn would make the conversation {end} tokens long, but the context holds "
                             f"{self.cache.max_len} (with room for an answer); " +
                             ("start a new chat (reset)" if self.turns else
                              "shorten the message (or the system prompt)") +
                             (f", or give fewer images (each takes {self.model.cfg.n_image_tokens} tokens)"
                              if images else ""))
        return new

    @torch.no_grad()
    def ask(self, content: str, images: Sequence = (), sampling: Sampling = Sampling(),
            on_text: Optional[Callable[[str], None]] = None) -> str:
        """One user turn -> the answer's text. `images` (PIL images or paths) fill the turn's placeholders in order.
        A bad image, a wrong image count or a conversation too long for the context raises ValueError and leaves the
        session as it was."""
        new = self.check_turn(content, images, sampling)
        pixels = torch.stack([self.proc(im) for im in images]) if images else None  # (N, 3, S, S); may raise
        device = self.model.llm.embed_tokens.weight.device
        start = self.cache.length
        try:
            logits, _ = self.model(torch.tensor([new], device=device), None if pixels is None else pixels.to(device),
                                   cache=self.cache, last_only=True)
            stream = TextStream(self.tok, on_text)  # prints the answer as it comes
            # (only a sampled turn draws from the stream, so only it starts one: a greedy turn in between leaves it)
            if sampling.temperature > 0 and (self.generator is None or sampling.seed != self.seed):
                self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
                self.seed = sampling.seed
            out = _decode(self.model, self.step, logits[:, -1], sampling, {self.tok.eos_id}, self.tok.pad_id,
                          self.tok.vocab_size, lambda nxt: stream.add(int(nxt[0])), self.generator)  # (1, n)
            stream.finish()
        except BaseException:
            self.cache.length = start  # forget the half-written turn: the next one overwrites those slots
            raise
        # The cache now holds the turn and every answer token but the last (a token is fed back only to get the next
        # one). The official code keeps an answer as its text (decoded without special tokens) and encodes the whole
        # conversation again for the next turn (cli_chat.py, conv.update_last_message). Rendered as the processor
        # renders messages (each stripped; the module docstring has the CLI's unstripped variant), the answer comes back
        # as the ids of " " + its stripped text, closed by <｜end▁of▁sentence｜>, or, if it is empty, as nothing at all
        # (conversation.py renders an empty message as the bare "Assistant:"). Where those are the generated ids, as
        # they mostly are, the cache keeps them and only the answer's end (its last token if it was cut at
        # max_new_tokens, and the end-of-sentence) starts the next turn; where not, the answer is dropped from the cache
        # and the next turn feeds the text's ids in its place.
        eos, answer = self.tok.eos_id, out[0].tolist()  # one row: it stops at its end-of-sentence, no padding
        held = self.cache.length - start - len(new)  # the answer's ids fed back into the cache: all but its last
        # (said before the cache is rolled back below, which the answer's text encoded again may be shorter than)
        self.cut = eos not in answer and len(answer) == self.cache.max_len - (start + len(new)) + 1
        self.answer = answer
        text = self.tok.decode(answer, skip_special_tokens=True).strip()
        said = self.tok.encode(" " + text) if text else []  # the answer as render_chat writes it
        if self.tok.image_id in said:  # it spelt out "<image_placeholder>": encoded again, that is an image slot with
            said = [t for t in answer if t not in self.tok.special_ids]  # no image, so its own ids stay instead
        if text and [t for t in answer if t != eos] == said:
            self.ids += new + answer[:held]
            self.pending = [t for t in answer[held:] if t != eos] + [eos]
        else:
            self.cache.length = start + len(new)
            self.ids += new
            self.pending = said + [eos] if text else []
        self.turns += 1
        return text
