"""
Prepare the training data, offline: a synthetic corpus that mirrors DeepSeek-VL's data categories (the paper's Tables 1
and 2; as many examples of each, not the paper's proportions, so every category is learnt), real English prose from the
Python standard library, and a tokenizer trained on it. Or import real data in the LLaVA conversation format.

    python prepare_data.py                         # the embedded default: data/ for the tiny preset, in seconds
    python prepare_data.py --config small --n 2000 # bigger images and more of them, into data-small/
    python prepare_data.py --text my_books/*.txt   # add your own text files to the text-only data (and the OCR
                                                   # pages' paragraphs: every page changes, held-out ones too)
    python prepare_data.py --show 3                # print 3 rendered documents and 3 chats: image spans and
                                                   # supervised tokens marked
    python prepare_data.py --llava llava_v1_5.json --images llava_images/ --out data-llava
                                                   # --images: the folder the rows' image paths start from

The synthetic folder holds:

    images/<category>/*.png       generated images; *_seg.png are per-pixel label maps of the shape scenes
    pretrain.jsonl                image-text documents: captions, ocr, chart, code, scene_text, interleaved
    text.jsonl                    text-only documents (standard-library docstrings, plus --text files)
    sft.jsonl                     conversations: multi-turn questions about every category, two one-question chats
                                  of each multiple-choice question (with its options, and open), and text-only
                                  dialogue
    stage0.jsonl                  image and short caption (SigLIP's contrastive loss), with a label map for the scenes
                                  of shapes (SAM's dense loss)
    eval_mc.jsonl                 held-out multiple-choice questions per category (the paper's MCPPL evaluation)
    val_mc.jsonl                  as many again, drawn from seeds of their own: to choose settings by (train.py
                                  --eval_split val), so that eval_mc's figures are not chosen by as well
    eval_text.jsonl               held-out text, for the language model's bits per byte
    tokenizer.json                byte-level BPE at the preset's vocabulary size (tiny and small; the released
                                  sizes read DeepSeek-LLM's tokenizer, from the released model folder)
    meta.json                     what made this folder; written last, so its presence means the folder is complete

Every run with the same arguments, under the same Python version (the prose is its standard library's), writes the
same data (each example has its own seed; only meta.json's timing differs), so a finished folder is reused as it is; a
folder from other arguments is rebuilt aside and then swapped in.
"""

import argparse
import ast
import glob
import hashlib
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from functools import lru_cache
from multiprocessing import Pool

try:  # Ctrl-C while torch loads (a second or more, nanovl imports it): a line, not importlib's traceback
    from tqdm import tqdm

    from nanovl.chat import IMAGE_TAG, prompt_string, render_chat, render_document, show
    from nanovl.config import FROM_SCRATCH, PRESETS, get_config
    from nanovl.data import check_rows, default_folder, folder_kind, read_jsonl, read_text, write_jsonl
    from nanovl.llava import import_llava
    from nanovl.runs import LEFTOVER, Terminated, building, quiet_worker, sigterm_stops, uninterrupted
    from nanovl.synth import CATEGORIES, SEG_LABELS, make_example, mc_prompt
    from nanovl.tokenizer import Tokenizer
except KeyboardInterrupt:
    if __name__ != "__main__":  # imported (by a test, or as a spawned worker's __mp_main__): as any import
        raise
    raise SystemExit("\ninterrupted while starting: nothing was written") from None

VERSION = 10  # bump when the generators change, so old folders are rebuilt


# ---------------------------------------------------------------------------------------------------------------------
# Text: real English prose that every machine has offline

@lru_cache(maxsize=1)
def stdlib_docstrings(min_chars: int = 200) -> list:
    """Docstrings of the Python standard library (parsed with ast, nothing is imported), in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo",
            "ensurepip"}
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            module = os.path.relpath(os.path.join(folder, name), root)[:-3].replace(os.sep, ".")
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        docs.append({"text": doc, "name": getattr(node, "name", module), "module": module})
    return docs


def prose_paragraphs(docs: list) -> list:
    """Paragraphs that read as prose (no code, no tables), flattened to one line: the text of the OCR pages."""
    out = []
    for d in docs:
        for para in d["text"].split("\n\n"):
            flat = " ".join(para.split())
            letters = sum(c.isalpha() or c == " " for c in flat)
            if 150 <= len(flat) <= 800 and letters > 0.9 * len(flat) and ">>>" not in para:
                out.append(flat)
    return out


def is_held_out(text: str, share: float = 0.03) -> bool:
    """A stable split by content hash: the same text is always on the same side."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def text_dialogue(doc: dict) -> list:
    """A text-only conversation from a docstring: what does X do, and the first paragraph as the answer."""
    first = " ".join(doc["text"].split("\n\n")[0].split())
    return [{"role": "user", "content": f"What does `{doc['name']}` do in Python's `{doc['module']}` module?"},
            {"role": "assistant", "content": first}]


# ---------------------------------------------------------------------------------------------------------------------
# Images: one task per example, each with its own seed, so the output does not depend on the number of workers

def draw_example(task):
    """One example, drawn and saved: (split, category, index, seed, size, snippet, out) -> {jsonl name: rows}. The
    eval and val splits give their multiple-choice question (eval_mc, val_mc); the train split its pretraining
    document, its chats (sft) and its stage-0 pair."""
    split, category, index, seed, size, snippet, out = task
    rng = random.Random(f"{seed}-{split}-{category}-{index}")
    ex = make_example(category, rng, size, snippet)
    stem = f"{split}_{index:06d}"
    paths = []
    for j, img in enumerate(ex.images):
        rel = f"images/{category}/{stem}{'' if len(ex.images) == 1 else f'_{j}'}.png"
        img.save(os.path.join(out, rel))
        paths.append(rel)
    rows = {}
    if split != "train":
        if ex.mc:
            rows[f"{split}_mc"] = [dict(category=category, images=paths, **ex.mc)]
        return rows
    rows["pretrain"] = [{"category": category, "images": paths, "text": ex.text}]
    qa = list(ex.qa)
    if ex.mc:  # one turn in the evaluation's multiple-choice format, asked first or later
        mc = ex.mc
        qa.insert(rng.randint(0, len(qa)), (mc_prompt(mc["question"], mc["options"]), mc["options"][mc["answer"]]))
    turns, first = [], True
    for q, a in qa:
        if first and IMAGE_TAG not in q:
            q = IMAGE_TAG * len(paths) + q
        first = False
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    rows["sft"] = [{"category": category, "images": paths, "conversation": turns}]
    if ex.mc:
        # And two short chats with only that question: cheap, focused practice at answering from the image. One
        # asks it with its options, as the evaluation does; the other asks it open, as a user of sample.py would,
        # answered by the generator's sentence. Without the open one, a model trained on this corpus chose the
        # right title among four options 47 times in 50, but asked "What is the title of this document?" it gave
        # a sign's word for all 50 pages ("PARK" 47 times): the multi-turn chats alone did not teach it to read.
        open_answer = dict(ex.qa).get(mc["question"])
        if open_answer is None:
            raise ValueError(f"{category} example {stem}: its multiple-choice question {mc['question']!r} has no "
                             "open question-answer pair among its chats")
        for q, a in ((mc_prompt(mc["question"], mc["options"]), mc["options"][mc["answer"]]),
                     (mc["question"], open_answer)):
            rows["sft"].append({"category": category, "images": paths, "conversation": [
                {"role": "user", "content": IMAGE_TAG * len(paths) + q}, {"role": "assistant", "content": a}]})
    if ex.caption is not None:
        seg_rel = None
        if ex.seg is not None:
            seg_rel = f"images/{category}/{stem}_seg.png"
            ex.seg.save(os.path.join(out, seg_rel))
        rows["stage0"] = [{"category": category, "image": paths[0], "caption": ex.caption, "seg": seg_rel}]
    return rows


def build(args, out: str):
    cfg = get_config(args.config)
    size = args.image_size or cfg.image_size
    t0 = time.time()
    print(f"nanovl data for preset {cfg.name!r}: {args.n} examples per category, images at {size} px, into {args.out}"
          + (f" (built in {out} first)" if out != args.out else ""))

    docs = list(stdlib_docstrings())
    # Your own files (read and checked in main) are for training: none is held out, and none becomes a "what does
    # X do in Python's module?" dialogue, which only a docstring answers.
    docs += [{"text": text, "name": os.path.basename(path), "module": "user"} for path, text in args.user_text]
    is_held_out_doc = lambda d: d["module"] != "user" and is_held_out(d["text"])
    train_docs = [d for d in docs if not is_held_out_doc(d)]
    # The standard library repeats paragraphs across docstrings, whole or with a few words changed (inspect's
    # findsource and getsourcelines, os's spawnlpe and spawnvp). A held-out docstring with a paragraph that opens as
    # a training paragraph does (the same first 80 characters, whitespace flattened) would not be unseen text, so it
    # is left out of the held-out text as well (and stays out of training): 5 of 57 with Python 3.11's library.
    def openings(doc):
        return {p[:80] for p in (" ".join(q.split()) for q in doc["text"].split("\n\n")) if len(p) >= 80}

    seen = set().union(*map(openings, train_docs))
    eval_docs = [d for d in docs if is_held_out_doc(d) and not openings(d) & seen]
    snippets = prose_paragraphs(train_docs)
    print(f"text: {len(docs)} documents ({sum(len(d['text']) for d in docs) / 1e6:.2f} MB), {len(eval_docs)} held out,"
          f" {len(snippets)} prose paragraphs for the OCR pages")

    for c in CATEGORIES:
        os.makedirs(os.path.join(out, "images", c), exist_ok=True)
    n_eval = max(20, args.n // 8)
    tasks = []
    for split, n in (("train", args.n), ("eval", n_eval), ("val", n_eval)):  # (each split's seeds its own)
        for c in CATEGORIES:
            if split != "train" and c == "interleaved":
                continue  # no multiple-choice question for interleaved documents
            for i in range(n):
                snippet = snippets[random.Random(f"{args.seed}-{split}-{c}-{i}-text").randrange(len(snippets))]
                tasks.append((split, c, i, args.seed, size, snippet, out))
    rows = {k: [] for k in ("pretrain", "sft", "stage0", "eval_mc", "val_mc")}
    with Pool(args.workers, initializer=quiet_worker) as pool:
        for result in tqdm(pool.imap(draw_example, tasks, chunksize=16), total=len(tasks), desc="images", unit="ex"):
            for k, v in result.items():
                rows[k] += v

    rows["sft"] += [{"category": "text", "images": [], "conversation": text_dialogue(d)} for d in train_docs
                    if d["module"] != "user"]
    text_rows = [{"text": d["text"]} for d in train_docs]
    for name, data in list(rows.items()) + [("text", text_rows), ("eval_text", [{"text": d["text"]}
                                                                                 for d in eval_docs])]:
        write_jsonl(os.path.join(out, f"{name}.jsonl"), data)

    if cfg.name in FROM_SCRATCH:
        # The tokenizer learns from everything the model will read: prose, the synthetic texts, and the dialogues as
        # the chat template renders them, system prompt and role names included (they are in every chat: as words of
        # their own, the system prompt takes 35 tokens where pieces of words took 63, a fifth of a short chat).
        corpus = [d["text"] for d in train_docs] + [r["text"] for r in rows["pretrain"]]
        corpus += [prompt_string(r["conversation"]) for r in rows["sft"]]
        t1 = time.time()
        tok = Tokenizer.train(corpus, cfg.llm.vocab_size, progress=True)
        tok.save(os.path.join(out, "tokenizer.json"))
        if tok.image_id != cfg.image_token_id:
            raise RuntimeError(f"tokenizer puts <image_placeholder> at {tok.image_id}, the preset expects "
                               f"{cfg.image_token_id}")
        print(f"tokenizer: {tok.vocab_size} tokens, trained in {time.time() - t1:.1f}s")
    else:  # 102,400 tokens could not be learnt from this corpus, and the released weights need their own anyway
        print(f"tokenizer: none; the {cfg.name!r} preset reads DeepSeek-LLM's, from the released model folder "
              "(train.py --init_from, or --tokenizer)")

    counts = {k: len(v) for k, v in rows.items()} | {"text": len(text_rows), "eval_text": len(eval_docs)}
    meta = {"identity": identity(args), "image_size": size,
            "n_image_tokens": cfg.n_image_tokens, "counts": counts, "seg_labels": ["background"] +
            [f"{c} {s}" for s, c in SEG_LABELS], "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print("wrote " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" in {time.time() - t0:.0f}s")


def read_user_text(path: str) -> str:
    """A --text file's text, its line ends "\n": Windows' "\r\n" and old Macs' "\r" would leave each paragraph
    (split at blank lines, "\n\n") unsplit, and a "\r" in the text trained on."""
    return read_text(path).replace("\r\n", "\n").replace("\r", "\n")


def identity(args) -> dict:
    """What determines the folder's content (not where it is, nor how many workers made it). A --text file counts by
    its text as read (read_user_text), so a folder made from a Windows file before its line ends were read as "\n" is
    made again."""
    texts = {path: hashlib.sha1(read_user_text(path).encode("utf-8")).hexdigest() for path in args.text}
    return {"version": VERSION, "config": args.config, "n": args.n, "seed": args.seed, "image_size": args.image_size,
            "text": texts}


def changed_arguments(was: dict, now: dict) -> str:
    """How two identities of one version differ, as flags: "--n 6 -> 5, --seed 0 -> 1". A mistyped --n or --seed
    replaces a corpus that may have taken long to make: said, with what changed."""
    shown = lambda k, v: ("the preset's" if k == "image_size" and not v else v)  # (0: the preset's size)
    flag = lambda k: "--" + k.replace("_", "-")
    text = ("none now" if not now["text"] else "given now" if not was.get("text") else
            "other files, or their text changed")
    return ", ".join(f"--text ({text})" if k == "text" else f"{flag(k)} {shown(k, was.get(k))} -> {shown(k, now[k])}"
                     for k in now if k != "version" and was.get(k) != now[k])


def arguments(ident: dict, out: str) -> list:
    """The command line that made a folder of this identity (the inverse of identity), to rebuild it in place."""
    return ["--out", out, "--config", ident["config"], "--n", str(ident["n"]), "--seed", str(ident["seed"]),
            "--image-size", str(ident["image_size"])] + (["--text", *ident["text"]] if ident.get("text") else [])


# What build() writes: these names at the top of the folder, and in images/ only files named as draw_example() names
# them.
BUILT = {"images", "meta.json", "tokenizer.json"} | {f"{k}.jsonl" for k in ("pretrain", "sft", "stage0", "eval_mc",
                                                                             "val_mc", "text", "eval_text")}
BUILT_IMAGE = re.compile(rf"({'|'.join(CATEGORIES)})/(train|eval|val)_\d{{6}}(_\d+)?(_seg)?\.png")


# What training reads of a corpus; the held-out files are optional there (a stage without them is not evaluated).
TRAINED_ON = {"images", "tokenizer.json", "pretrain.jsonl", "sft.jsonl", "stage0.jsonl", "text.jsonl"}


def missing(folder: str, preset: str, names=BUILT) -> list:
    """The entries of names missing at the top of folder, a corpus this version made (removed since: it is rebuilt).
    The released sizes' corpus has no tokenizer.json to miss: they read the released model's."""
    need = names - {"meta.json"} - (set() if preset in FROM_SCRATCH else {"tokenizer.json"})
    return sorted(f for f in need if not os.path.exists(os.path.join(folder, f)))


def data_to_prepare(folder: str, preset: str):
    """For train.py, which makes its --data when it must: (why, the arguments to main that make it again) when the
    synthetic folder is missing, was made by an older prepare_data.py (its generators changed, e.g. the stage-0
    captions) or lacks a file training reads (removed since), else None. A rebuild keeps the folder's own arguments; a
    folder made for another preset is refused, never rebuilt. A LLaVA import is used as it is: training on one's own
    data alone."""
    kind = folder_kind(folder)
    if kind == "missing":
        return "no prepared data", ["--out", folder, "--config", preset]
    if kind == "llava":
        return None
    if kind == "file":
        raise SystemExit(f"--data {folder} is a file: expected a folder made by prepare_data.py (or a LLaVA import), "
                         "or a path that does not exist yet to make one there")
    if kind == "other":  # never build over files prepare_data did not make
        rows = [f for f in ("pretrain.jsonl", "sft.jsonl") if os.path.isfile(os.path.join(folder, f))]
        raise SystemExit(f"--data {folder} holds files but no meta.json of prepare_data.py's; give --data a folder "
                         "made by prepare_data.py, or a path that does not exist yet to make one there" + (
                             f" (its {' and '.join(rows)}, rows of your own, are read with --extra_data {folder}, "
                             "beside that --data)" if rows else ""))
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    ident = meta["identity"]
    if ident["config"] != preset:  # its images are another size, its tokenizer (if any) another model's
        raise SystemExit(f"--data {folder} was prepared for the {ident['config']!r} preset (images at "
                         f"{meta.get('image_size')} px); the {preset!r} model needs data of its own: pass "
                         f"--data {default_folder(preset)} (made there if missing)")
    if ident["version"] != VERSION:
        return (f"made by an older prepare_data.py (version {ident['version']}, now {VERSION})",
                arguments(ident, folder))
    # A file training reads, removed since: a stage would find it missing, and say it less clearly. (A held-out file
    # removed leaves its evaluation out, as for one's own data without it.)
    gone = missing(folder, preset, TRAINED_ON)
    return (f"{', '.join(gone)} missing", arguments(ident, folder)) if gone else None


def not_built(folder: str) -> list:
    """What in a corpus folder (or a build's .partial) prepare_data.py did not write: a rebuild would delete it."""
    others = sorted(f for f in os.listdir(folder) if f not in BUILT and not LEFTOVER.fullmatch(f))
    images = os.path.join(folder, "images")
    for root, _, files in sorted(os.walk(images)):
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(root, f), images).replace(os.sep, "/")  # caption/train_000001.png
            if not BUILT_IMAGE.fullmatch(rel):
                others.append(f"images/{rel}")
    return others


def clear_leftover(path: str, what: str):
    """Remove what an interrupted run left at path (a build's .partial, or the folder it replaced), but only if
    prepare_data.py wrote all of it: anything else is named, and left as it is."""
    if not os.path.lexists(path):
        return
    others = not_built(path) if os.path.isdir(path) and not os.path.islink(path) else [os.path.basename(path)]
    if others:
        raise SystemExit(f"{path} is where {what}, but it holds {', '.join(others[:5])}, which prepare_data.py did not "
                         "write: move it away (or remove it), then run again")
    shutil.rmtree(path)


def prepare(args):
    """Build the synthetic folder unless an identical one is already there; never leave a half-written folder."""
    old = args.out.rstrip("/") + ".replaced-by-prepare_data"  # where the swap below moves the old corpus aside
    if folder_kind(args.out) == "missing" and folder_kind(old) == "synthetic":  # killed between the swap's renames
        if os.path.isdir(args.out):
            os.rmdir(args.out)  # (empty)
        os.replace(old, args.out)
        print(f"{args.out}: put back from {old}, where an interrupted rebuild had moved it")
    kind = folder_kind(args.out)
    if kind in ("llava", "other", "file"):  # only a corpus this script made is ever rebuilt in place
        meta = os.path.join(args.out, "meta.json")
        raise SystemExit(f"--out {args.out} " + (
            "already holds a LLaVA import" if kind == "llava" else
            "is a file, not a folder" if kind == "file" else
            "holds a meta.json that is not one prepare_data.py writes (cut short, or edited?), so the folder cannot "
            "be told from one of yours" if os.path.isfile(meta) else
            "already holds files that prepare_data.py did not make (no meta.json of its own)") +
            "; choose another --out, or remove it first")
    rebuilding = ""  # (what is said once the build goes ahead over an earlier corpus)
    if kind == "synthetic":
        with open(os.path.join(args.out, "meta.json")) as f:
            was = json.load(f)["identity"]
        now, gone = identity(args), missing(args.out, args.config)
        if was == now and not gone:
            print(f"{args.out} is already prepared with these arguments; nothing to do")
            return
        if was == now:
            why, rebuilding = f"{', '.join(gone)} missing", f"{args.out} lacks {', '.join(gone)}: rebuilding it"
        elif was.get("version") != VERSION:
            why = "a new version of the corpus"
            rebuilding = (f"{args.out} was made by another version of prepare_data.py (its corpus version "
                          f"{was.get('version')}, now {VERSION}): rebuilding it")
        else:
            why = "new arguments"
            rebuilding = (f"{args.out} was prepared with other arguments ({changed_arguments(was, now)}): rebuilding "
                          "it; the old corpus is deleted once the new one is made")
        # Rebuilt whole: so anything else put in the folder (questions of one's own, notes, pictures among the
        # generated ones) would go with it.
        others = not_built(args.out)
        if others:
            raise SystemExit(f"{args.out} is to be rebuilt ({why}), but it also holds {', '.join(others[:5])}, which "
                             "prepare_data.py did not write and the rebuild would delete: move "
                             f"{'them' if len(others) > 1 else 'it'} out of the folder first, or use another folder")
    partial = args.out.rstrip("/") + ".partial"
    clear_leftover(partial, "an interrupted build is left")
    clear_leftover(old, "a replaced corpus is left by an interrupted swap")
    if rebuilding:  # (said once nothing can stop the build but the build itself)
        print(rebuilding)
    os.makedirs(partial)
    try:
        build(args, partial)
    except OSError:  # a full disk, say: what was written goes too, rather than keep the space it took until next run
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # The swap: the old folder moves aside, the new one takes its place, and only then is the old one deleted, so
    # that at every moment one whole corpus exists (one killed between the renames is put back by the next run).
    # Ctrl-C and SIGTERM wait for that moment (the build is done: the swap completes).
    with uninterrupted():
        if os.path.exists(args.out):
            os.replace(args.out, old)
        os.replace(partial, args.out)
        if os.path.exists(old):
            shutil.rmtree(old)


def show_samples(args):
    """Print rendered samples as the model sees them: [image xN] spans, supervised tokens inside ⟦ ⟧."""
    tok = Tokenizer.load(args.tokenizer)
    try:  # the folder says what it was made for (a synthetic one: the preset's image tokens), else --config does
        with open(os.path.join(args.out, "meta.json")) as f:
            n_img = int(json.load(f)["n_image_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        n_img = get_config(args.config).n_image_tokens
    rng = random.Random(args.seed)
    for name in ("pretrain", "sft"):
        if not os.path.isfile(os.path.join(args.out, f"{name}.jsonl")):
            continue  # (a folder of one's own rows may hold only one of the two)
        rows = read_jsonl(os.path.join(args.out, f"{name}.jsonl"), origin=True)
        check_rows(rows, name)  # (a malformed row, named by its file and line, as train.py names it)
        if not rows:
            print(f"--- {name}: {os.path.join(args.out, f'{name}.jsonl')} holds no rows")
        for row in rng.sample(rows, min(args.show, len(rows))):
            if name == "pretrain":
                ids, mask = render_document(row["text"], tok, n_img)
            else:
                ids, mask = render_chat(row["conversation"], tok, n_img)
            print(f"--- {name} / {row.get('category', '-')} / {', '.join(row.get('images', [])) or 'no image'} "
                  f"({len(ids)} tokens, {sum(mask)} supervised)")
            print(show(ids, mask, tok))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: data for tiny, data-<preset> for the other "
                                                "presets, data-llava with --llava)")
    p.add_argument("--config", default="tiny", choices=list(PRESETS), help="preset: image size and vocabulary size")
    p.add_argument("--n", type=int, default=400, help="training examples per category (default 400); held out: "
                                                       "n / 8 per category, at least 20 (50 at the default)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--image-size", type=int, default=0, help="long side of the generated images (default: the "
                                                              "preset's canvas)")
    p.add_argument("--text", nargs="*", default=[], help="your own UTF-8 text files to add to the text-only data "
                                                           "(their paragraphs also go on the OCR pages)")
    p.add_argument("--show", type=int, default=0,
                   help="print this many rendered pretraining documents, and as many chats, of an existing folder")
    p.add_argument("--tokenizer", help="with --show: the tokenizer to render with (default: the folder's own "
                                       "tokenizer.json; a folder for a released preset, or a LLaVA import, has none: "
                                       "give the released model's, e.g. deepseek-vl-1.3b-chat/tokenizer.json)")
    p.add_argument("--llava", help="import a LLaVA-format JSON (or JSON lines) file of conversations or captions")
    p.add_argument("--images", help="with --llava: the folder its image paths are relative to")
    p.add_argument("--captions", action="store_true",
                   help="with --llava: import one-question chats about one image as captions (the answer; for "
                        "LLaVA-Pretrain, whose captions are written as such chats), for stage 1")
    args = p.parse_args(argv)
    if args.images and not args.llava:  # (it would be ignored, and the synthetic corpus built instead)
        p.error("--images is for --llava: the folder that a LLaVA file's image paths are relative to")
    if args.captions and not args.llava:
        p.error("--captions is for --llava: it imports one-question chats as captions")
    if args.llava:
        if not args.images:
            p.error("--llava needs --images DIR, the folder that the file's image paths are relative to")
        # What only the synthetic corpus uses would be ignored: say so, rather than import without it.
        ignored = [f"--{dest.replace('_', '-') if dest == 'image_size' else dest}"
                   for dest in ("config", "n", "seed", "image_size", "text", "show", "tokenizer")
                   if getattr(args, dest) != p.get_default(dest)]
        if ignored:
            p.error(f"{', '.join(ignored)}: not for --llava, which imports the file's conversations and images as "
                    "they are (the synthetic corpus's settings; --show a folder once it is imported)")
        out = args.out or "data-llava"
        if os.path.islink(out.rstrip("/") or out):  # import into the folder it points to, as a build does
            # (stripped: a link named with a trailing slash, "link/", is not a link to os.path.islink)
            out = os.path.realpath(out)
        try:
            with sigterm_stops(), building(out):  # (one build of a folder at a time)
                report = import_llava(args.llava, args.images, out, workers=max(1, args.workers),
                                      as_captions=args.captions)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        except OSError as e:  # (the lock beside --out, in a folder that cannot be written)
            raise SystemExit(f"cannot write {e.filename or out}: {e.strerror or e}") from None
        except KeyboardInterrupt as e:  # Ctrl-C or a SIGTERM: a line instead of a traceback
            raise SystemExit(f"\n{stopped(e)}: {out} is as it was (an import is written aside "
                             "and swapped in only when whole)") from None
        print(report)
        return
    for name, value, least in (("--n", args.n, 1), ("--workers", args.workers, 1), ("--show", args.show, 0)):
        if value < least:
            p.error(f"{name} must be at least {least}, got {value}")
    if args.image_size and args.image_size < 256:  # smaller, a chart's labels and a page's text no longer fit legibly
        p.error(f"--image-size must be at least 256, the smallest preset's canvas (or 0, the preset's own), got "
                f"{args.image_size}")
    if args.image_size > 4096:  # (each image is drawn whole in memory: 100000 ran out of it)
        p.error(f"--image-size must be at most 4096, four times the largest preset's canvas, got {args.image_size}")
    args.out = args.out or default_folder(args.config)
    if os.path.islink(args.out.rstrip("/") or args.out):  # build beside the folder it points to, and swap that one
        args.out = os.path.realpath(args.out)
    if args.show:
        if folder_kind(args.out) == "missing":
            p.error(f"--show: {args.out} holds no prepared data; make it first (prepare_data.py --config "
                    f"{args.config} --out {args.out})")
        if not any(os.path.isfile(os.path.join(args.out, f"{name}.jsonl")) for name in ("pretrain", "sft")):
            p.error(f"--show: {args.out} holds no rows to show (pretrain.jsonl or sft.jsonl): expected a folder that "
                    "prepare_data.py made, an import, or one of your own rows")
        args.tokenizer = args.tokenizer or os.path.join(args.out, "tokenizer.json")
        if not os.path.isfile(args.tokenizer):
            p.error(f"--show: no tokenizer at {args.tokenizer} to render with (a folder for a released preset, or a "
                    "LLaVA import, has none: pass --tokenizer, e.g. the released model's tokenizer.json)")
        try:
            return show_samples(args)
        except ValueError as e:  # a malformed row or tokenizer, named
            raise SystemExit(str(e)) from None
    # Absolute paths: the folder's identity names them, and train.py, run from anywhere, rebuilds from them. Each
    # once, however many patterns name it (the identity counts it once too).
    args.text = sorted({os.path.abspath(f) for pattern in args.text for f in (glob.glob(pattern) or [pattern])})
    args.user_text = []  # (path, text) of each --text file, checked now rather than found wrong in training
    for f in args.text:
        if not os.path.isfile(f):
            p.error(f"--text {f} " + ("is a folder; expected text files (a pattern such as DIR/*.txt will do)"
                                      if os.path.isdir(f) else "is not a regular file; expected a text file"
                                      if os.path.exists(f) else "does not exist"))
        try:
            text = read_user_text(f)
        except (ValueError, OSError) as e:
            p.error(f"--text: {e}")
        if not text.strip():
            p.error(f"--text {f} is empty")
        if IMAGE_TAG in text:
            p.error(f"--text {f} holds {IMAGE_TAG}, which a model reads as an image's place, and a text-only "
                    "document has no image: remove or reword it")
        args.user_text.append((f, text))
    try:
        # One build of a folder at a time: a second waits, then finds what the first made
        with sigterm_stops(), building(args.out):
            prepare(args)
    except OSError as e:  # --out in a folder that cannot be written, or a full disk
        raise SystemExit(f"cannot write {e.filename or args.out}: {e.strerror or e}") from None
    except KeyboardInterrupt as e:  # Ctrl-C or a SIGTERM: a line instead of a traceback
        raise SystemExit(f"\n{stopped(e)}: {args.out} is as it was (the new data was being built aside, in "
                         f"{args.out.rstrip('/')}.partial, which the next run starts again)") from None


def stopped(e: KeyboardInterrupt) -> str:
    return "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"


if __name__ == "__main__":
    sys.exit(main())
