"""
Benchmarks, one function per part of the system. Run one with

    python bench.py --what tokenizer                  # encode throughput of a 100k and a 4k byte-level BPE
    python bench.py --what tokenizer --tokenizer PATH # ... of an existing tokenizer.json (e.g. DeepSeek's) instead

Everything runs offline. The tokenizer benchmark trains its tokenizers on the Python standard library's own source
(the .py files next to this interpreter), encodes a held-out tenth of those files, and caches the 100k tokenizer under
~/.cache/nanovl/ so that reruns start at once (delete the file to retrain it after changing the trainer).
"""

import argparse
import os
import sysconfig
import time
from pathlib import Path

CACHE = Path.home() / ".cache" / "nanovl"


def stdlib_texts():
    """The standard library's .py files as text, split 9:1 into (training texts, held-out texts)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts)
    train, held_out = [], []
    for i, f in enumerate(files):
        (held_out if i % 10 == 1 else train).append(f.read_text(encoding="utf-8", errors="replace"))
    return train, held_out


def bench_tokenizer(args):
    from nanovl.tokenizer import Tokenizer

    if hasattr(os, "sched_setaffinity"):  # one core: the tokenizer is plain single-threaded Python anyway
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    train, held_out = stdlib_texts()
    text = "".join(held_out)[: int(args.mb * 1e6)]
    n_bytes = len(text.encode("utf-8"))
    print(f"encoding {n_bytes / 1e6:.2f} MB of held-out Python stdlib source on one core")

    # A small tokenizer, trained here: this also times the trainer on a few MB, as the scaled-down presets need.
    corpus, size = [], 0
    for t in train:
        if size >= args.small_corpus_mb * 1e6:
            break
        corpus.append(t)
        size += len(t.encode("utf-8"))
    t0 = time.perf_counter()
    small = Tokenizer.train(corpus, args.small_vocab)
    print(f"trained a {small.vocab_size:,}-id tokenizer on {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
    runs = [("small", small)]

    # The big one: a given tokenizer.json, or a 100k one trained once on the whole training split and cached.
    if args.tokenizer:
        path = Path(args.tokenizer)
    else:
        path = CACHE / f"stdlib-bpe-{args.vocab_size}.json"
        if not path.exists():
            size = sum(len(t.encode("utf-8")) for t in train)
            print(f"training a {args.vocab_size:,}-id tokenizer on {size / 1e6:.1f} MB (once; cached afterwards)")
            t0 = time.perf_counter()
            big = Tokenizer.train(train, args.vocab_size, progress=True)
            print(f"trained in {time.perf_counter() - t0:.1f} s")
            CACHE.mkdir(parents=True, exist_ok=True)
            big.save(path)
    t0 = time.perf_counter()
    big = Tokenizer.load(path)  # a fresh instance: its caches start empty
    print(f"loaded {path} ({big.vocab_size:,} ids) in {time.perf_counter() - t0:.1f} s")
    runs.append(("big", big))

    print(f"\n{'tokenizer':>10} {'vocab':>9} {'MB':>6} {'cold s':>7} {'cold MB/s':>10} {'warm s':>7} {'warm MB/s':>10} "
          f"{'tokens/byte':>12}")
    for name, tok in runs:
        # cold: the first pass, every distinct word is pre-tokenized and merged; warm: the same text again, when
        # every word is a cache hit and only the line-level regex splits and lookups remain.
        t0 = time.perf_counter()
        ids = tok.encode(text)
        t1 = time.perf_counter()
        tok.encode(text)
        t2 = time.perf_counter()
        if tok.decode(ids) != text:
            raise RuntimeError(f"the {name} tokenizer does not round-trip the benchmark text")
        mb = n_bytes / 1e6
        print(f"{name:>10} {tok.vocab_size:>9,} {mb:>6.2f} {t1 - t0:>7.2f} {mb / (t1 - t0):>10.2f} {t2 - t1:>7.2f} "
              f"{mb / (t2 - t1):>10.2f} {len(ids) / n_bytes:>12.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", required=True, choices=["tokenizer"], help="which benchmark to run")
    parser.add_argument("--tokenizer", help="tokenizer: a tokenizer.json (or its folder) to use as the big one")
    parser.add_argument("--vocab-size", type=int, default=100_000, help="tokenizer: size of the big trained one")
    parser.add_argument("--small-vocab", type=int, default=4096, help="tokenizer: size of the small trained one")
    parser.add_argument("--small-corpus-mb", type=float, default=3.0, help="tokenizer: text for the small one")
    parser.add_argument("--mb", type=float, default=4.0, help="tokenizer: at most this much text is encoded")
    args = parser.parse_args()
    if args.what == "tokenizer":
        bench_tokenizer(args)


if __name__ == "__main__":
    main()
