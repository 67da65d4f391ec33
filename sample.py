"""
Chat about images with a trained nanovl checkpoint or a released DeepSeek-VL model folder.

    python sample.py --ckpt out/stage3 --image data/images/caption/eval_000000.png --prompt "How many shapes are there?"
    python sample.py --ckpt out/stage3 --image a.png --image b.png \\
        --prompt "<image_placeholder> <image_placeholder> Same?"
    python sample.py --ckpt deepseek-vl-7b-chat --image photo.jpg     # interactive chat (no --prompt)
    python sample.py --ckpt out/stage3 --prompt "one" --prompt "two"  # several prompts, one left-padded batch

--ckpt is a nanovl stage folder (model.pt; its tokenizer.json, or --tokenizer) or a released model folder (config.json,
model.safetensors or its shards and model.safetensors.index.json, tokenizer.json, preprocessor_config.json; or a folder
in transformers' own DeepSeek-VL layout). A prompt without <image_placeholder> gets one in front for each --image, as in
the official examples (with several prompts, each places its own). Decoding is greedy by default; --temperature samples
instead, from the distribution that --top_k and --top_p narrow (they need a temperature), seeded by --seed, so a run is
reproducible. --repetition_penalty above 1 makes tokens already in the answer less likely (below 1, more), greedy or
not. The official CLI samples with temperature 0.2, top_p 0.95 and repetition_penalty 1.1, and with the top_k 50 of
transformers 4's default generation config; it sets the penalty only when it samples, so its greedy answers have none.

In the interactive chat each turn reuses the KV cache: only the new message is run through the model (with the end of
the last answer, which the cache does not hold yet, or the whole answer when its text encodes to other ids than the
model produced: README, Chat), never the earlier turns or their images. Commands: `new` starts a new chat, `image PATH`
attaches an image to the next message, `help`, `exit`. An error in a turn is said and the chat goes on; a chat read
from a pipe or a file (`sample.py --ckpt out/stage3 < questions.txt`) stops at its first error, with exit status 1.
"""

import argparse
import contextlib
import errno
import io
import os
import sys

try:  # Ctrl-C while torch loads (a second or more): a line, not the import machinery's traceback
    import torch
    from PIL import Image

    from nanovl.chat import IMAGE_TAG, SYSTEM_PROMPT, render_chat, start_ids
    from nanovl.checkpoint import load_model
    from nanovl.generate import ChatSession, Sampling, TextStream, generate
    from nanovl.image import load_image
    from nanovl.runs import denied
except KeyboardInterrupt:  # (as main's other Ctrl-C's)
    if __name__ != "__main__":  # imported (by a test, or as a spawned worker's __mp_main__): as any import
        raise
    print("\n(interrupted)", file=sys.stderr)
    raise SystemExit(130) from None

HELP = f"""commands:
  new          forget the conversation and start again
  image PATH   attach an image to your next message (its {IMAGE_TAG} goes in front unless you place it);
               ("image of a cat: what is it?", not shaped as a path, is a message)
  help         this text
  exit, quit   leave (so does Ctrl-D)
A message may hold several {IMAGE_TAG}; you are asked for a path for each one not attached yet."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a nanovl stage folder / model.pt, or a released model folder")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    p.add_argument("--prompt", action="append", default=[], help="answer once and exit; repeat for a batch")
    p.add_argument("--tokenizer", default="", help="tokenizer.json for a nanovl checkpoint without one beside it")
    p.add_argument("--system", default=SYSTEM_PROMPT, help="system prompt ('' for none)")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0,
                   help="sample from the k likeliest tokens (0: off; needs a temperature)")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="sample from the likeliest tokens that make up this probability (1: off; needs a temperature)")
    p.add_argument("--repetition_penalty", type=float, default=1.0,
                   help="above 1: tokens already in the answer less likely (1: off; the official CLI uses 1.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step: faster tokens on a GPU after a slow first answer")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--official_rope", action="store_true",
                   help="round RoPE's frequencies to --dtype, as the official scripts' cast to bf16 does: their GPU "
                        "outputs, where nanovl keeps the frequencies exact (README, Released weights); with --dtype "
                        "bf16 (or fp16); in fp32 there is nothing to round: refused")
    args = p.parse_args(argv)
    if not args.ckpt.strip():  # (an unset shell variable, say: "" would read as the current folder's model.pt)
        p.error("--ckpt is empty: expected a stage folder, a model.pt file or a released model folder")
    return args


def with_tags(message: str, n_images: int) -> str:
    """The official examples put the image first: prepend a placeholder per image when the message has none."""
    return message if IMAGE_TAG in message or not n_images else IMAGE_TAG * n_images + message


def tagged_prompts(args) -> list:
    """The --prompt texts with their image placeholders: one prompt alone gets one per --image when it has none;
    several must place their own, one per image, in order."""
    if args.image and len(args.prompt) == 1 and "<image>" in args.prompt[0] and IMAGE_TAG not in args.prompt[0]:
        # (it would stay in the prompt as text, the images put in front of it; several prompts place their own tags,
        # and one of them may well be about the SVG element)
        raise SystemExit(f"--prompt holds <image>, LLaVA's tag; DeepSeek-VL's is {IMAGE_TAG}: write that, or leave "
                         "it out (a prompt alone gets one in front for each --image)")
    prompts = [with_tags(p, len(args.image)) for p in args.prompt] if len(args.prompt) == 1 else args.prompt
    n_tags = sum(p.count(IMAGE_TAG) for p in prompts)
    if n_tags != len(args.image):
        raise SystemExit(f"the prompts hold {n_tags} {IMAGE_TAG} but {len(args.image)} --image were given: give one "
                         "image per placeholder, in order" + (" (with several prompts, each places its own)"
                                                              if len(prompts) > 1 else ""))
    return prompts


def no_answer(ids, tok) -> str:
    """Why an answer's text is empty: the model ended its turn at once, or wrote only white space (newlines, which
    an undertrained model often does) or special tokens, which the text leaves out, until it stopped or ran out of
    tokens. ids: the answer as generated."""
    ids = [int(t) for t in ids]
    if ids and ids[0] == tok.eos_id:
        return "(no answer: the model ended its turn at once; an undertrained model often does)"
    ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    what = "white space" if not set(ids) & tok.special_ids else "white space and special tokens"
    return f"(no answer: the model wrote only {what}, {len(ids)} token(s); an undertrained model often does)"


def answer_prompts(args, prompts, model, tok, proc, sampling, pictures):
    """--prompt given: one batch of prompts (tagged_prompts); the images (from --image) fill their placeholders in
    order."""
    try:
        pixels = torch.stack([proc(picture) for picture in pictures]) if pictures else None  # (N, 3, S, S)
        ids = [render_chat([{"role": "user", "content": p}], tok, model.cfg.n_image_tokens, system=args.system,
                           generation_prompt=True)[0] for p in prompts]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    ctx = model.cfg.llm.max_seq_len
    for i, x in enumerate(ids):  # (generate would say how long the longest is, not which prompt it is)
        if len(x) >= ctx:
            which = f" {i + 1} of {len(prompts)}" if len(prompts) > 1 else ""
            n_img = prompts[i].count(IMAGE_TAG)
            images = f" with its {n_img} image(s), {model.cfg.n_image_tokens} tokens each," if n_img else ""
            raise SystemExit(f"--prompt{which} is {len(x)} tokens in the chat template{images} and the model's "
                             f"context holds {ctx}: at least one token must fit after it; shorten it" +
                             (" or give fewer images" if n_img else ""))
    stream = len(prompts) == 1  # a single prompt's answer is printed as it comes
    text = TextStream(tok, lambda piece: print(piece, end="", flush=True))
    try:
        outs = generate(model, ids, pixels, sampling, stop_ids={tok.eos_id}, pad_id=tok.pad_id, n_words=tok.vocab_size,
                        on_step=(lambda nxt: text.add(int(nxt[0]))) if stream else None, compile=args.compile)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if stream:
        text.finish()  # (a character the last token left incomplete)
    # generate ends every answer where the context does (the longest prompt, left-padded, sets where): an answer
    # that got there without its end-of-sentence was cut, and says so, as the chat does.
    room = ctx - max(len(i) for i in ids) + 1  # (the last new token is never fed back, so it needs no slot)
    cut = [tok.eos_id not in out and len(out) == room < sampling.max_new_tokens for out in outs]
    note = f" (cut: the {'longest prompt of the batch' if len(prompts) > 1 else 'prompt'} and the answer fill the " \
        f"model's context of {ctx} tokens)"
    if stream:
        answered = tok.decode(outs[0], skip_special_tokens=True).strip()
        print(("\n" + note.strip() if cut[0] else "") if answered else no_answer(outs[0], tok))
    else:
        for p, out, was_cut in zip(prompts, outs, cut):
            answered = tok.decode(out, skip_special_tokens=True).strip()
            print(f"User: {p}\nAssistant: {answered or no_answer(out, tok)}" + (note if was_cut else "") + "\n")


def read_image(path: str):
    """The image at path, or ValueError saying why it cannot be read (missing, corrupt, not an image, too large).
    A path typed or pasted with quotes around it, or starting with ~, is read as a shell would."""
    path = path.strip()
    if len(path) > 1 and path[0] == path[-1] and path[0] in "'\"":
        path = path[1:-1]
    return load_image(os.path.expanduser(path))


def is_image_command(line: str) -> bool:
    """`image PATH` attaches an image, but "image of a cat: what colour is it?" is a message: the line is a command
    when what follows `image` is one word, is quoted, names a file, or looks like a path (it starts as one, or ends
    in an image's extension), so that a mistyped path with a space in it is said to be missing, not sent."""
    word, _, rest = line.partition(" ")
    if word.lower() != "image":
        return False
    rest = rest.strip()
    looks_like_path = rest.startswith(("/", "~", "./", "../")) or \
        os.path.splitext(rest)[1].lower() in Image.registered_extensions()
    return len(rest.split()) <= 1 or rest[0] in "'\"" or looks_like_path or os.path.isfile(os.path.expanduser(rest))


def attached(queued) -> str:
    return f"; {len(queued)} image(s) stay attached to your next message ('new' drops them)" if queued else ""


def at_a_terminal() -> bool:
    return sys.stdin.isatty()


def chat(args, model, tok, proc, sampling, pictures):
    """The interactive loop, with the --image pictures attached to the first message. Errors in a turn (a bad image,
    more attached images than placeholders, a full context) are printed and the conversation goes on as it was.
    A chat read from a pipe or a file stops at its first error instead (below)."""
    session = ChatSession(model, tok, proc, system=args.system, compile=args.compile)
    queued = list(pictures)
    typed, n_line = at_a_terminal(), 0  # n_line: the lines read so far, blank ones and image paths included

    def read_line(prompt: str) -> str:
        """The next line of the chat's input, stripped. Read from a pipe or a file it is printed after its prompt,
        as a terminal shows what is typed, so the output reads "User: hi" then "Assistant: ...". A byte-order mark,
        which Windows editors put at the start of a UTF-8 file, is dropped: "\ufeffimage a.png" is the command."""
        line = input(prompt).lstrip("\ufeff").strip()
        if not typed:  # (bytes that are not UTF-8, which the loop refuses, shown as ?)
            print(line.encode("utf-8", "replace").decode("utf-8"))
        return line

    def trouble(why: str, then: str, line: int = 0):
        """At a terminal, say why a line failed (line: that line, if not the last read) and what happens now (then),
        and go on: the user sees it and answers it. From a pipe or a file, stop with exit status 1: the lines after it
        were written for a conversation that did not happen (a question about an image that could not be read, a
        follow-up to a message refused, an answer interrupted)."""
        if not typed:
            raise SystemExit(f"sample.py: line {line or n_line} of the chat's input: {why.removeprefix('error: ')}. "
                             "Stopping there, as the input is not a terminal and its next lines were written for the "
                             "conversation this line would have made")
        print(f"({why}{then})")

    # Input bytes that are not UTF-8 are read as escapes, for the check below to name (a UTF-8 locale reads them
    # strictly: a traceback). Not possible once stdin was read.
    if isinstance(sys.stdin, io.TextIOWrapper):
        with contextlib.suppress(io.UnsupportedOperation):
            sys.stdin.reconfigure(errors="surrogateescape")
    print(f"chatting with {args.ckpt} ({model.cfg.name}); type 'help' for commands" +
          (f"\n({len(queued)} image(s) attached to your first message)" if queued else ""))
    while True:
        try:
            line = read_line("\nUser: ")
            n_line += 1
            message_line = n_line  # (the image paths asked for after a message are lines of their own)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave, without a traceback
            print()
            return
        if not line:
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # the terminal sent bytes that are not UTF-8
            trouble("that message is not UTF-8 text: check the terminal's (or the file's) encoding",
                    "; the conversation is as it was")
            continue
        if line.lower() in ("exit", "quit"):
            return
        if line.lower() == "help":
            print(HELP)
            continue
        if line.lower() == "new":
            session.reset()  # (its cache, and on a GPU its recorded decoding step, serve the new chat)
            queued = []
            print("(new chat)")
            continue
        if is_image_command(line):
            if not line[len("image"):].strip():
                trouble("image needs a PATH: image photo.jpg", "")
                continue
            try:
                queued.append(read_image(line[len("image"):]))  # read now: a bad path is said at once
                print(f"({len(queued)} image(s) attached to your next message)")
            except ValueError as e:
                trouble(f"error: {e}", "; not attached")
            except KeyboardInterrupt:  # Ctrl-C while a large image loads: that image only, not the chat
                print()
                trouble("interrupted: that image is not attached", attached(queued))
            continue
        # With images attached, as --prompt with --image refuses it: LLaVA's tag would stay in the message as text
        if queued and "<image>" in line and IMAGE_TAG not in line:
            trouble(f"that message holds <image>, LLaVA's tag; DeepSeek-VL's is {IMAGE_TAG}: write that, or leave it "
                    "out to put the attached images first", f"; the message was not sent{attached(queued)}")
            continue
        message = with_tags(line, len(queued))
        n_tags = message.count(IMAGE_TAG)
        if n_tags < len(queued):
            trouble(f"this message has {n_tags} {IMAGE_TAG} for {len(queued)} attached images: write one for each, "
                    "or none to put them all first", attached(queued))
            continue
        images = list(queued)
        while len(images) < n_tags:
            try:
                path = read_line(f"  path of image {len(images) + 1} of {n_tags} (empty: drop the message): ")
                n_line += 1
            except EOFError:  # the input ended (Ctrl-D, or the end of a piped chat)
                print()
                trouble(f"message dropped: the input ended before the path of its image {len(images) + 1}", "",
                        message_line)
                return
            except KeyboardInterrupt:
                path = ""
            if not path:
                break
            try:
                images.append(read_image(path))
            except ValueError as e:
                trouble(f"error: {e}", "; not attached")  # (and asked again for that image's path)
            except KeyboardInterrupt:  # as Ctrl-C at the path prompt: the message is dropped
                break
        if len(images) < n_tags:
            print()
            trouble("message dropped", f"; the conversation is as it was{attached(queued)}", message_line)
            continue
        try:  # a message too long for the context, say: said on its own line, not as the start of an answer
            session.check_turn(message, images, sampling)
        except ValueError as e:
            trouble(f"error: {str(e).replace('start a new chat (reset)', 'start a new chat (new)')}",
                    f"; the conversation is as it was{attached(queued)}", message_line)
            continue
        print("Assistant: ", end="", flush=True)
        try:
            if not session.ask(message, images, sampling, on_text=lambda t: print(t, end="", flush=True)):
                print(no_answer(session.answer, tok), end="")
            queued = []
            if session.cut or session.cache.length + len(session.pending) >= session.cache.max_len:  # (full now)
                print(f"\n(the conversation now fills the context of {session.cache.max_len} tokens, so the answer may "
                      "have been cut: 'new' starts a new chat)")
                continue
        except (ValueError, RuntimeError) as e:  # RuntimeError: out of memory on a GPU, say; ask undid the turn
            print()
            trouble(f"error: {e}", f"; the conversation is as it was{attached(queued)}", message_line)
            continue
        except KeyboardInterrupt:
            print()
            trouble("interrupted: that turn is forgotten", attached(queued), message_line)
            continue
        print()


def main(argv=None):
    args = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32}[args.dtype]
    if args.official_rope and dtype == torch.float32:  # (it would change nothing, and say nothing)
        raise SystemExit("--official_rope rounds RoPE's frequencies as the official scripts' cast to bf16 does, and in "
                         f"fp32 there is nothing to round (--dtype {args.dtype} on {device}): add --dtype bf16 (or "
                         "fp16)")
    empty = [i + 1 for i, p in enumerate(args.prompt) if not p.strip()]
    if empty and not (len(args.prompt) == 1 and args.image):  # (an image alone is a prompt: it gets its placeholder)
        raise SystemExit(f"--prompt {empty[0]} of {len(args.prompt)} is empty: expected some text")
    if not args.prompt and sys.stdin is None:  # (closed: `<&-`, a service; input() then raised a RuntimeError)
        raise SystemExit("the chat reads your messages from the standard input, which is closed: give one, or ask "
                         "with --prompt TEXT")
    if IMAGE_TAG in args.system:
        raise SystemExit(f"--system holds {IMAGE_TAG}, but images go in messages (the system prompt has none)")
    n = len(args.prompt)
    for flag, text in [("--system", args.system)] + [(f"--prompt{f' {i + 1} of {n}' * (n > 1)}", p)
                                                     for i, p in enumerate(args.prompt)]:
        try:  # (Python reads argument bytes that are not UTF-8 as lone surrogates, which no tokenizer can encode)
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SystemExit(f"{flag} is not UTF-8 text (byte 0x{ord(text[e.start]) - 0xDC00:02x} after "
                             f"{text[:e.start]!r}): check the terminal's encoding") from None
    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                            args.seed).check()
        prompts = tagged_prompts(args) if args.prompt else None  # what needs no model is said before one loads,
        pictures = [load_image(path) for path in args.image]  # which may take minutes
        model, tok, proc = load_model(args.ckpt, device, dtype, tokenizer=args.tokenizer or None)
        if args.official_rope:
            model.llm.round_rope_freqs(dtype)
    except PermissionError as e:  # a checkpoint or tokenizer this user may not read
        raise SystemExit(denied(e)) from None
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:  # Ctrl-C while the images or a large model load: a line, not a traceback from PIL
        print("\n(interrupted)", file=sys.stderr)
        raise SystemExit(130) from None
    n_system, context = len(start_ids(tok, args.system)), model.cfg.llm.max_seq_len
    if n_system + 8 > context:  # 8: room for the shortest turn, "User: hi" and "Assistant:"
        raise SystemExit(f"--system is {n_system} tokens, and the context holds {context}: no room for a message")
    try:
        if args.prompt:
            answer_prompts(args, prompts, model, tok, proc, sampling, pictures)
        else:
            chat(args, model, tok, proc, sampling, pictures)
    except KeyboardInterrupt:  # Ctrl-C while a one-shot answer is printed: a line, not a traceback from the model
        print("\n(interrupted)", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as e:  # the answer cannot be printed: into a pipe whose reader stopped (| head), or a full disk
        pipe = isinstance(e, BrokenPipeError)
        if not pipe and e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # (other errors are not the output's)
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that Python's exit flush fails quietly
        raise SystemExit(1 if pipe else f"cannot write the answer to the standard output: {e.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
