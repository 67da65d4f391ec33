"""
From data files to model-ready batches (real data in the LLaVA format is imported into these rows by
nanovl/llava.py).

Rows (JSON lines, written by prepare_data.py or by the LLaVA import):

    pretrain.jsonl   {"category", "images": [paths], "text": "...<image_placeholder>..."}     a document
    sft.jsonl        {"category", "images": [paths], "conversation": [{"role", "content"}]}   a chat
    text.jsonl       {"text"}                                                                 text only

A `Source` renders every row of one kind once, up front, into token ids and a loss mask (nanovl.chat) and keeps them
with the row's image paths; images are read and processed only when a batch needs them. Text documents longer than
the context are cut into context-sized pieces; chats and image documents that do not fit are dropped and counted
(cutting them would cut an image span or an answer).

A plan (`plan_batches`) fixes, before training starts, which rows every optimizer step reads: each step draws one
modality group (language or multimodal; in stage 2 also chats with and without images, in stage 3 kinds of chat; the
paper's modality-grouped batches, section 4.4, Figure 8) with probabilities that may change with the step (modality
warm-up, paper Figure 9: the language share starts at 1 and falls to its target, 0.7, over stage 2's first 30%:
nanovl/recipe.py's stage2_share), and each modality walks through its rows in a fresh shuffled order every epoch. The
plan is a pure function of the seed and the data, so a resumed run reads exactly the batches it would have read (a
checkpoint keeps a fingerprint of both, which a resume compares), and with several processes each rank takes its own
slice of the same global batch. `PlannedBatches` turns (step, micro-batch) into tensors, so a torch DataLoader can build
the next batches in worker processes while the model trains; `PackedBatches` lays several samples end to end in each row
instead (stage 2, given a plan made with their lengths).

Last, reading and writing JSON-lines files (read_jsonl names a malformed line by file and line), what a data folder
is (folder_kind) and checking its images (check_images), which prepare_data.py, nanovl/llava.py and nanovl/evaluate.py
share.
"""

import codecs
import hashlib
import itertools
import json
import os
import random
import re
from array import array
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from nanovl.chat import IMAGE_TAG, check_conversation, render_chat, render_document
from nanovl.image import ImageProcessor, load_image
from nanovl.runs import atomic_write, denied, quiet_worker


# ---------------------------------------------------------------------------------------------------------------------
# Rendering rows into (ids, mask, image paths)

@dataclass
class Sample:
    ids: List[int]
    mask: List[int]
    images: List[str]  # paths (under the row's folder, as --data gives it), in the order of their spans
    where: str = ""  # the row it came from ("FILE, line N"), for errors found later (an unreadable image)


def read_images(samples: Sequence[Sample], processor) -> List[torch.Tensor]:
    """The images of the samples, in order, through the processor; an image that cannot be read is an error that
    also names the row it belongs to."""
    out = []
    for s in samples:
        for p in s.images:
            try:
                out.append(processor(p))
            except ValueError as e:
                raise ValueError(f"{s.where}: {e}" if s.where else str(e)) from None
    return out


# What each kind of row holds (prepare_data.py writes them; a LLaVA import writes the first two).
ROW_FORMAT = {
    "pretrain": '{"text": "... <image_placeholder> ...", "images": [one path per tag]}',
    "sft": '{"conversation": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...], "images": [...]}',
    "text": '{"text": "..."}',
}


def text_field(row: dict, key: str) -> str:
    if not isinstance(row[key], str):
        raise ValueError(f"'{key}' must be a string, got {type(row[key]).__name__}")
    return row[key]


def check_row(row: dict, kind: str) -> List[str]:
    """The row's image paths as written, or the KeyError, TypeError or ValueError of what is wrong with its shape
    (fields, types, turns, one image per tag): everything Source checks but what needs the tokenizer, so that a run
    can check the rows of its later stages before the first one trains."""
    images = row.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise ValueError(f"'images' must be a list of paths, got {images!r}")
    if kind in ("text", "pretrain"):
        text = text_field(row, "text")
        if not text.strip():
            raise ValueError("empty document")
        n_tags = text.count(IMAGE_TAG)
        if kind == "text" and (n_tags or images):  # a text row is read without images: a tag would ask for one
            raise ValueError(f"a text row has no images, but this one has {n_tags} {IMAGE_TAG} tags and "
                             f"{len(images)} images")
    else:
        check_conversation(row["conversation"])
        if len(row["conversation"]) < 2:  # (a LLaVA import drops such rows; one of one's own would train nothing)
            raise ValueError("the conversation has no assistant turn: nothing to learn from")
        n_tags = sum(m["content"].count(IMAGE_TAG) for m in row["conversation"])
    if n_tags != len(images):
        raise ValueError(f"{n_tags} {IMAGE_TAG} tags but {len(images)} images")
    return images


def image_paths(images: Sequence[str], root: str) -> List[str]:
    """A row's image paths as files: each relative to its folder (root), unless absolute."""
    return [p if os.path.isabs(p) else os.path.join(root, p) for p in images]


def row_error(row, i: int, kind: str, name: str, e: Exception) -> ValueError:
    """A malformed row's error, named by its file and line when it carries them (read_jsonl(origin=True))."""
    where = row.get("_where", f"{name}, row {i}") if isinstance(row, dict) else f"{name}, row {i}"
    what = f"no {e} field" if isinstance(e, KeyError) else str(e)
    return ValueError(f"{where}: {what}; a {kind} row is " + ROW_FORMAT[kind])


def check_rows(rows: Sequence[dict], kind: str, name: str = "") -> None:
    """check_row for each row: a ValueError naming the first malformed one."""
    for i, row in enumerate(rows):
        try:
            check_row(row, kind)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise row_error(row, i, kind, name or kind, e) from None


class Source:
    """One kind of row ("pretrain", "sft" or "text"), rendered to token ids once."""

    def __init__(self, rows: Sequence[dict], kind: str, tokenizer, n_image_tokens: int, max_len: int,
                 root: str = "", name: str = ""):
        if kind not in ("pretrain", "sft", "text"):
            raise ValueError(f"unknown source kind {kind!r}; expected 'pretrain', 'sft' or 'text'")
        self.name = name or kind
        self.samples: List[Sample] = []
        self.dropped = 0
        for i, row in enumerate(rows):
            try:
                self.add(row, kind, tokenizer, n_image_tokens, max_len, root)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise row_error(row, i, kind, self.name, e) from None

    def add(self, row: dict, kind: str, tokenizer, n_image_tokens: int, max_len: int, root: str):
        """Render one row into samples (a text row may give several), or count it as dropped if too long."""
        images = check_row(row, kind)
        paths = image_paths(images, row.get("_root", root))  # rows gathered from several folders carry their own
        if kind == "text":
            ids, mask = render_document(row["text"], tokenizer, n_image_tokens)
            # Pieces of max_len + 1 ids (max_len inputs, each with the next id as its target) that overlap by one:
            # a piece's last target is the next piece's first input, so every id but the first is predicted once.
            # (start stops short of the last id, so every piece holds at least two.) The first bit of a piece's mask
            # is never read (nothing in the piece predicts its first id); it is set to 0 all the same.
            for start in range(0, len(ids) - 1, max_len):
                piece = slice(start, start + max_len + 1)
                self.samples.append(Sample(ids[piece], [0] + mask[piece][1:], []))
            return
        if kind == "pretrain":
            ids, mask = render_document(row["text"], tokenizer, n_image_tokens)
        else:
            ids, mask = render_chat(row["conversation"], tokenizer, n_image_tokens)
        if len(ids) > max_len + 1:  # inputs are ids[:-1], so max_len + 1 ids fill the context exactly
            self.dropped += 1
            return
        self.samples.append(Sample(ids, mask, paths, row.get("_where", "")))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i) -> Sample:
        return self.samples[i]

    def digest(self) -> str:
        """A short hash of what this source trains on: every sample's token ids and loss mask, in order (an image is
        there as its span of image tokens; the files themselves are not read)."""
        return hash_chunks(array("i", s.ids).tobytes() + bytes(s.mask) for s in self.samples)


def hash_chunks(chunks) -> str:
    """A 16-hex-digit hash of a sequence of byte strings (each one's length goes in too, so where one ends and the
    next begins is part of what is hashed): the fingerprints a checkpoint keeps of its run's data and plan."""
    h = hashlib.blake2b(digest_size=8)
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "little"))
        h.update(chunk)
    return h.hexdigest()


def collate(samples: Sequence[Sample], pad_id: int, processor: Optional[ImageProcessor] = None):
    """Samples -> (ids (B, T), targets (B, T), images (N, 3, S, S) or None), right-padded; no images without a
    processor.

    targets[b, t] is the id at t + 1 where that token is supervised, else -100 (nanoGPT's shifted convention).
    Right padding is safe for training: with causal attention no real token ever sees the padding after it.
    """
    T = max(len(s.ids) for s in samples) - 1
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), T), -100, dtype=torch.long)
    for b, s in enumerate(samples):
        x = torch.tensor(s.ids)
        m = torch.tensor(s.mask, dtype=torch.bool)
        ids[b, :len(x) - 1] = x[:-1]
        targets[b, :len(x) - 1] = x[1:].masked_fill(~m[1:], -100)
    images = read_images(samples, processor) if processor is not None else []
    return ids, targets, torch.stack(images) if images else None


# ---------------------------------------------------------------------------------------------------------------------
# Which rows each optimizer step reads

def epochs(n: int, key: str):
    """Row indices 0..n-1 forever, in a new permutation each epoch, seeded by (key, epoch): a source's stream."""
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(f"{key}-epoch-{epoch}").shuffle(order)  # (a str seed is hashed the same in every process)
        yield from order
        epoch += 1


def plan_batches(sizes: Dict[str, int], global_batch: int, steps: int, share: Callable[[int], Dict[str, float]],
                 seed: int, lengths: Optional[Dict[str, List[int]]] = None, row_len: int = 0) -> List[Tuple[str, list]]:
    """For each step: (modality, global_batch row indices of that modality's source; packed, a PackedRows).

    share(step) gives each modality's probability at that step (they need not sum to 1). Each modality has its own
    stream of indices: a new permutation every epoch, seeded by (seed, modality, epoch).

    Packed (lengths, each sample's token count per modality, and row_len given): the batch counts rows of row_len
    tokens, as Table 4's stage 2 does (1024 sequences of 4096 tokens), and each step holds global_batch rows, each a
    list of the sample indices laid end to end in it. Samples fill rows next fit, in stream order: a row is closed
    when the next sample does not fit, and that sample starts the next row (or the modality's next step).
    """
    empty = [m for m, n in sizes.items() if n == 0]
    if empty:
        raise ValueError(f"no rows for modality {empty}; check the data folder (or drop that modality's share to 0)")
    streams = {m: epochs(n, f"{seed}-{m}") for m, n in sizes.items()}
    waiting: Dict[str, int] = {}  # per modality: the sample that did not fit the last row of its previous step
    plan = []
    for step in range(steps):
        weights = share(step)
        names = [m for m in sizes if weights.get(m, 0) > 0]
        if not names:
            raise ValueError(f"step {step}: every modality has share 0 ({weights})")
        modality = random.Random(f"{seed}-step-{step}").choices(names, [weights[m] for m in names])[0]
        stream = streams[modality]
        if lengths is None:
            plan.append((modality, list(itertools.islice(stream, global_batch))))
            continue
        rows, row, used = [], [], 0
        while len(rows) < global_batch:
            i = waiting.pop(modality) if modality in waiting else next(stream)
            n = lengths[modality][i]
            if row and used + n > row_len:
                rows.append(row)
                row, used = [], 0
                if len(rows) == global_batch:
                    waiting[modality] = i
                    break
            row.append(i)
            used += n
        plan.append((modality, PackedRows(rows)))
    return plan


class PackedRows:
    """One step's packed rows (plan_batches), each a list of sample indices, held in two flat arrays: the released
    sizes' stage 2 plans about 100 million rows (Table 4: 96,000 steps of 1024 at 1.3B), which as Python lists of
    ints would take about 16 GB in each process, and as arrays a twelfth of that. rows[k] is row k as a list,
    rows[a:b] a list of rows."""

    def __init__(self, rows: List[List[int]]):
        self.ids = array("i", [i for row in rows for i in row])  # every row's indices, end to end
        self.starts = array("i", itertools.accumulate([len(row) for row in rows], initial=0))  # row k: [k], [k + 1]

    def __len__(self):
        return len(self.starts) - 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(f"row {k} of {len(self)}")
        k %= len(self)
        return self.ids[self.starts[k]:self.starts[k + 1]].tolist()


def plan_digest(plan) -> str:
    """A short hash of a plan (plan_batches' or stage 0's): every step's modality and row indices."""
    def chunks():
        for modality, rows in plan:
            yield modality.encode()
            if isinstance(rows, PackedRows):  # (its arrays as they are: hashing them is as fast as copying)
                yield rows.ids.tobytes() + rows.starts.tobytes()
            else:
                yield array("i", rows).tobytes()
    return hash_chunks(chunks())


class PlannedBatches(Dataset):
    """Item k = micro-batch k % accum of step k // accum, for this rank: a map-style dataset a DataLoader can
    prefetch with workers. Each rank reads global_batch / world rows per step, accum micro-batches of them."""

    def __init__(self, plan, sources: Dict[str, Source], pad_id: int, processor: ImageProcessor, accum: int = 1,
                 rank: int = 0, world: int = 1):
        global_batch = len(plan[0][1]) if plan else 0
        if global_batch % (world * accum):
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes x {accum} "
                             "accumulation steps")
        self.plan, self.sources, self.pad_id, self.processor = plan, sources, pad_id, processor
        self.accum, self.rank, self.world = accum, rank, world

    def __len__(self):
        return len(self.plan) * self.accum

    def rows(self, k, plan=None):
        """This rank's row indices for item k: its slice of micro-batch k % accum of step k // accum."""
        step, micro = divmod(k, self.accum)
        rows = (plan or self.plan)[step][1]
        per = len(rows) // (self.world * self.accum)
        start = (self.rank * self.accum + micro) * per
        return rows[start:start + per]

    def samples(self, k) -> List[Sample]:
        modality = self.plan[k // self.accum][0]
        return [self.sources[modality][i] for i in self.rows(k)]

    def __getitem__(self, k):
        return collate(self.samples(k), self.pad_id, self.processor)

    def fingerprint(self) -> dict:
        """What these batches are made of, for a checkpoint to keep and a resume to compare (train.py): each source's
        sample count and digest, by modality, and the plan's digest."""
        return {"sources": {m: [len(s), s.digest()] for m, s in self.sources.items()}, "plan": plan_digest(self.plan)}


class PackedBatches(PlannedBatches):
    """PlannedBatches over a packed plan (plan_batches with lengths): each item is this rank's rows of the micro-batch,
    every row samples laid end to end (stage 2). Attention and positions stay inside each sample (doc_ids)."""

    def samples(self, k) -> List[List[Sample]]:
        """Item k's rows, each the samples laid end to end in it."""
        modality = self.plan[k // self.accum][0]
        return [[self.sources[modality][i] for i in row] for row in self.rows(k)]

    def __getitem__(self, k):
        packed = self.samples(k)  # this micro-batch's B rows
        T = max(sum(len(s.ids) - 1 for s in r) for r in packed)  # the longest row (at most the plan's row_len)
        ids = torch.full((len(packed), T), self.pad_id, dtype=torch.long)  # (B, T)
        targets = torch.full((len(packed), T), -100, dtype=torch.long)  # (B, T)
        doc_ids = torch.full((len(packed), T), -1, dtype=torch.long)  # (B, T); padding: a "sample" of its own
        images = []
        for b, r in enumerate(packed):
            x, y, _ = collate(r, self.pad_id)  # each sample shifted on its own, then laid end to end
            pos = 0
            for j, s in enumerate(r):
                n = len(s.ids) - 1
                ids[b, pos:pos + n], targets[b, pos:pos + n], doc_ids[b, pos:pos + n] = x[j, :n], y[j, :n], j
                pos += n
            images += read_images(r, self.processor)
        return ids, targets, (torch.stack(images) if images else None), doc_ids


# ---------------------------------------------------------------------------------------------------------------------
# Reading and writing rows (JSON lines); data folders, and checking their images

def read_text(path: str) -> str:
    """A UTF-8 text file's text, without the byte-order mark some editors write; ValueError naming the file and line
    for text in another encoding, or for a file this user may not read (which the callers' error handling would
    otherwise take for one they could not write: prepare_data.py's, say)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except PermissionError as e:
        raise ValueError(denied(e)) from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    packed = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
              b"\x28\xb5\x2f\xfd": "zstd"}  # what datasets are downloaded as, told by their first bytes
    kind = next((name for magic, name in packed.items() if raw.startswith(magic)), None)
    if kind:
        raise ValueError(f"{path} is a {kind}-compressed file, not text: decompress it first")
    if b"\x00" in raw:  # valid UTF-8, but never in text: UTF-16 without its byte-order mark reads as ASCII and NULs
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        raise ValueError(f"{path} is not UTF-8 text (a NUL byte at line {line}: UTF-16 text, or a binary file?); "
                         "save it as UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}: a compressed file, "
                         "or text saved in another encoding?); save it as UTF-8") from None


def cr_only(line: str) -> str:
    """What to add to the error for a JSON line that did not parse, when the file's lines end in "\\r" alone (old Mac
    line ends): the whole file then reads as one line holding every row."""
    return "; its lines end in \\r alone, where JSON Lines needs \\n" if "\r" in line.strip() else ""


def json_error(e: Exception, lines: bool = True) -> str:
    """What a row that did not parse has wrong, and where. JSONDecodeError's msg alone can stop mid-sentence
    ("Unterminated string starting at"): its position completes it. lines=False: a JSON line, where only the column
    says more."""
    if not isinstance(e, json.JSONDecodeError):
        return "nested too deeply"  # (a RecursionError)
    at = "" if e.msg.endswith(" at") else " at"  # ("... starting at" already says it)
    return f"{e.msg}{at} " + (f"line {e.lineno}, column {e.colno}" if lines else f"column {e.colno}")


# A JSON escape of a UTF-16 surrogate, "\ud800" to "\udfff": half of a character unless its pair follows
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def json_lines(text: str):
    """(line number, line, row) for each line of a JSON-lines text that is not blank; for a line that is not JSON,
    the row is the ValueError that says why. Split at "\n" only: str.splitlines would also split at characters a JSON
    string may hold raw (U+2028, U+0085, ...), cutting such a row in two."""
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield n, line, json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                yield n, line, ValueError(f"not valid JSON: {json_error(e, lines=False)}{cr_only(line)}")


def read_jsonl(path: str, origin: bool = False) -> List[dict]:
    """All rows of a JSON-lines file; a malformed line is an error that names the file and line. origin=True also
    writes where each row came from into it ("_where": "FILE, line N"), for the errors found in it later."""
    rows = []
    for n, line, row in json_lines(read_text(path)):
        if isinstance(row, ValueError):
            raise ValueError(f"{path}, line {n}: {row}")
        # The file itself is UTF-8, so only a JSON escape can spell half a character (a pair spells a whole one).
        if SURROGATE_ESCAPE.search(line) and (bad := half_character(row)):
            raise ValueError(f"{path}, line {n}: {bad}")
        if origin:
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            row["_where"] = f"{path}, line {n}"
        rows.append(row)
    return rows


def half_character(row) -> str:
    """What is wrong when some string in row cannot be written as UTF-8, else "". JSON can spell half of a character
    (a lone surrogate such as "\\ud83d", left where a tool cut an emoji in two), which no UTF-8 file can hold."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"the text holds half of a character ({e.object[e.start:e.end]!r}, a lone surrogate: text cut in the "
                "middle of an emoji?)")
    return ""


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    """One JSON object per line, UTF-8, written whole or not at all (runs.atomic_write): a killed run never leaves
    half a file, and a row that cannot be written leaves the old file as it was."""
    def write(f):
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))

    atomic_write(path, write)



def default_folder(preset: str) -> str:
    """Where prepare_data.py writes a preset's synthetic corpus and train.py reads it unless told otherwise: data/ for
    the embedded default (tiny), data-<preset>/ for the others, whose images are of another size."""
    return "data" if preset == "tiny" else f"data-{preset}"


def folder_kind(path: str) -> str:
    """What a data folder is, from the meta.json prepare_data.py writes into each folder it makes: "missing" (no
    folder, or an empty one), "synthetic" (prepare_data.py's corpus), "llava" (an import), "other" (made by
    something else, which nothing here may write over), or "file" (no folder at all: a file of that name)."""
    if not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return "missing"
    if not os.path.isdir(path):
        return "file"
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return "other"
    if isinstance(meta, dict) and "llava" in meta:
        return "llava"
    return "synthetic" if isinstance(meta, dict) and "version" in (meta.get("identity") or {}) else "other"


def folder_stamp(path: str) -> Optional[str]:
    """Which build of a data folder this is: its meta.json's inode and modification time (None without one).
    prepare_data.py builds a synthetic corpus beside the old one and swaps it in, so a folder made anew while a run
    reads it has another stamp, and the images of the rows the run read at its start are then other pictures of the
    same names: train.py compares the stamps of its synthetic folders every step (one stat each)."""
    try:
        st = os.stat(os.path.join(path, "meta.json"))
    except OSError:
        return None
    return f"{st.st_ino}-{st.st_mtime_ns}"


def image_error(path: str) -> Optional[str]:
    """Why the image at path cannot be read (missing, corrupt, truncated, not an image, too large), or None."""
    try:
        load_image(path)  # decodes the whole file: a truncated one is found now, not in the middle of training
        return None
    except ValueError as e:
        return str(e)


def check_images(paths: Sequence[str], workers: int = 1) -> Dict[str, Optional[str]]:
    """{path: image_error(path)} for distinct paths, decoded in `workers` processes, with a progress bar: LLaVA-1.5's
    665k rows name hundreds of thousands of images, minutes of decoding even in parallel. (Under 1,000 images: in
    this process, without a bar.)"""
    from tqdm import tqdm

    paths = sorted(set(paths))
    bar = dict(total=len(paths), desc="checking images", unit="img", disable=len(paths) < 1000)
    if workers <= 1 or len(paths) < 1000:
        return dict(zip(paths, tqdm(map(image_error, paths), **bar)))
    import multiprocessing

    with multiprocessing.Pool(workers, initializer=quiet_worker) as pool:
        return dict(zip(paths, tqdm(pool.imap(image_error, paths, chunksize=64), **bar)))
