"""
The safetensors checkpoint format, read and written by nanovl itself (the `safetensors` package is only a test oracle).
The released DeepSeek-VL weights are stored this way, and so is a nanovl model exported with `python -m
nanovl.checkpoint --export` (training's own checkpoints are torch model.pt files). A file is three parts:

    8 bytes    N, the header size, little-endian u64
    N bytes    UTF-8 JSON: {name: {"dtype": "BF16", "shape": [4, 8], "data_offsets": [begin, end]}, ...}
               plus an optional "__metadata__": {str: str}; offsets count from the start of the data buffer
    the rest   the data buffer: each tensor's bytes, C order, little-endian, packed back to back, nothing else

load_file memory-maps the file: nothing is read until a tensor's values are touched, so `names` picks a few tensors out
of a big file for free. The whole header is validated before any tensor is built, so a bad file raises a ValueError
naming the file and the problem (never another exception, nor a half-filled dict). save_file writes, atomically, the
same bytes as `safetensors.torch.save_file`. load_sharded / save_sharded handle Hugging Face's sharded checkpoint
folders. Little-endian hosts only (x86, ARM as run everywhere): bytes are mapped and written as they lie in memory,
unswapped.
"""

import json
import math
import mmap
import os
import re

import torch

from nanovl.runs import atomic_write

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit; a larger claim is a corrupt or hostile file
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Format name -> torch dtype, in the order of the Rust library's `Dtype` enum (grouped by item size, smallest first).
# Writers sort tensors by this rank, descending, so each tensor starts aligned to its item size (the data buffer
# starts at 8 + N, padded to a multiple of 8), and our bytes equal the library's. (Files from other writers may be
# unaligned; torch on x86/ARM reads those too, just slower.)
_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
           "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
           "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
           "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_RANK = {name: i for i, name in enumerate(_DTYPES)}


class DuplicateKeys(ValueError):
    """A JSON object that names one key twice."""


def _no_duplicates(pairs):
    # json.loads silently keeps the last of two equal keys; two tensors with one name (or two shards for one tensor, in
    # an index) means a corrupt file
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise DuplicateKeys(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def read_header(path):
    """Parse and validate the header of the safetensors file at `path`, reading no tensor data.
    Returns (header, data_start): the JSON header as a dict (with "__metadata__" if the file has one) and the file
    offset where the data buffer begins (8 + N)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such safetensors file (for a sharded checkpoint folder: load_sharded)")
    size = os.path.getsize(path)

    def bad(msg):
        return ValueError(f"{path}: not a valid safetensors file: {msg}")

    if size < 8:
        raise bad(f"the file is {size} bytes, shorter than the 8-byte header size that starts every safetensors file")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise bad(f"header size {n} is larger than the {MAX_HEADER_BYTES}-byte limit")
        if n > size - 8:
            raise bad(f"header size {n} runs past the end of the file ({size} bytes); truncated, or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except DuplicateKeys as e:  # (valid JSON, but not a valid header)
        raise bad(f"the header has {e}") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise bad(f"the header is not valid UTF-8 JSON ({e})") from None
    except RecursionError:  # (thousands of nested brackets: no header of tensor entries nests deeper than 3)
        raise bad("the header's JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise bad(f"the header is JSON {type(header).__name__}, expected an object of tensor entries")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad(f"__metadata__ must map strings to strings, got {meta!r}")

    buffer_size = size - 8 - n
    spans = []
    for name, entry in ((k, v) for k, v in header.items() if k != "__metadata__"):
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} should be {{dtype, shape, data_offsets}}, got {entry!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}; known dtypes: {', '.join(_DTYPES)}")
        # `type(x) is int`, not isinstance: JSON true would pass as the integer 1, and 2.0 must not pass at all
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}, expected a list of non-negative integers")
        if math.prod(d for d in shape if d) * _DTYPES[dtype].itemsize >= 2 ** 63:  # (0 x 2**64 is empty, and no view)
            raise bad(f"tensor {name!r} has shape {shape}, more bytes than a tensor can address")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}, expected [begin, end], non-negative integers")
        begin, end = offsets
        if end < begin:
            raise bad(f"tensor {name!r} has data_offsets [{begin}, {end}]: end is before begin")
        expected = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != expected:
            raise bad(f"tensor {name!r} has data_offsets [{begin}, {end}] ({end - begin} bytes), but shape {shape} "
                      f"of {dtype} needs {expected} bytes")
        if end > buffer_size:
            raise bad(f"tensor {name!r} has data_offsets [{begin}, {end}], past the end of the {buffer_size}-byte "
                      f"data buffer; the file is truncated")
        spans.append((begin, end, name))
    # Sorted by start, the tensors must tile the data buffer: each starts where the one before ended, and the last
    # ends at the end of the file, as the library requires. An overlap would let a tensor read another's bytes; a
    # hole or bytes after the last tensor could hide another file inside this one.
    pos, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise bad(f"tensors {prev!r} (ends at {pos}) and {name!r} (data_offsets [{begin}, {end}]) overlap")
        if begin > pos:
            raise bad(f"bytes {pos} to {begin} of the data buffer belong to no tensor (a hole before {name!r})")
        pos, prev = end, name
    if pos != buffer_size:
        raise bad(f"the tensors end at byte {pos} of the {buffer_size}-byte data buffer: the rest belongs to none")
    return header, 8 + n


def metadata(path) -> dict:
    """The file's "__metadata__" (a {str: str} dict; Hugging Face writes {"format": "pt"}), or {} if it has none."""
    return read_header(path)[0].get("__metadata__", {})


def load_file(path, device="cpu", names=None) -> dict:
    """Load the tensors of a safetensors file (all of them, or only `names`) as {name: tensor} on `device`.
    On CPU the tensors are views of a private memory map of the file: nothing is read until it is used, writing to
    a tensor never changes the file, and the map lives as long as any tensor does."""
    header, data_start = read_header(path)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if names is not None:
        missing = sorted(set(names) - set(entries))
        if missing:
            raise KeyError(f"{path}: no tensors named {missing}; the file holds {sorted(entries)}")
        entries = {k: entries[k] for k in names}
    # ACCESS_COPY maps the file copy-on-write: pages are shared with the page cache until written, a write goes to a
    # private copy (never to disk), and the buffer is writable, so torch.frombuffer does not warn about read-only
    # memory. frombuffer holds a reference to the mmap object, which keeps the map alive after we return.
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # the file may be closed once mapped
    out = {}
    for name, e in entries.items():
        dtype, (begin, end) = _DTYPES[e["dtype"]], e["data_offsets"]
        count = (end - begin) // dtype.itemsize  # frombuffer refuses count=0; an empty tensor has no bytes to share
        t = (torch.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin) if count
             else torch.empty(0, dtype=dtype))
        out[name] = t.view(e["shape"]).to(device)  # .to is a no-op on CPU, a copy onto an accelerator
    return out


def save_file(tensors: dict, path, metadata: dict = None):
    """Write {name: tensor} (any device, any strides) and optional {str: str} metadata to `path` as safetensors.
    The bytes equal `safetensors.torch.save_file`'s for the same input, except that the library writes metadata keys
    in a random order (a Rust HashMap) while we sort them, so files with 2+ metadata keys match only as JSON.
    Tensors that share memory (tied weights, views) are each written as their own copy; the library refuses them
    instead, but a copy is what reading the file back would give anyway."""
    if metadata is not None:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise ValueError(f"metadata must map str to str (use str() or json.dumps()); these do not: {bad!r}")
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"expected {{str: torch.Tensor}}, got {type(name).__name__} {name!r}: {type(t).__name__}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved by the format; pass metadata=... instead")
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}; supported: {', '.join(map(str, _NAMES))}")
    # The library's order: largest dtype rank first, then name (Python compares str by code point, which is the
    # same order as Rust's byte-wise comparison of UTF-8).
    order = sorted(tensors, key=lambda k: (-_RANK[_NAMES[tensors[k].dtype]], k))
    header = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        t, begin = tensors[name], offset
        offset += t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [begin, offset]}
    # Compact JSON with raw UTF-8 (no \u escapes) is what serde_json writes; spaces pad it to a multiple of 8.
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def write(f):
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:  # one tensor at a time on CPU, so a GPU model is never copied to host memory whole
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy())  # numpy has no bf16/fp8, but raw bytes it can hand over

    atomic_write(path, write)  # (a reader, or a process killed mid-save, sees the old file or the new one)


def load_sharded(folder) -> dict:
    """Load a Hugging Face checkpoint folder: the shards listed in `model.safetensors.index.json` ({"metadata": ...,
    "weight_map": {name: shard file}}), checking each shard holds exactly the names the index gives it; or the single
    `model.safetensors`, which transformers' from_pretrained reads first when a folder holds both (so do we: the same
    folder gives the same weights). save_sharded leaves only one of the two layouts in a folder."""
    folder = os.fspath(folder)
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(os.path.join(folder, SINGLE_NAME)):
        return load_file(os.path.join(folder, SINGLE_NAME))
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{folder}: holds neither {INDEX_NAME} nor {SINGLE_NAME}")
    by_shard = {}  # shard file -> the names the index puts in it
    try:
        with open(index_path, encoding="utf-8") as f:
            for name, shard in json.load(f, object_pairs_hook=_no_duplicates)["weight_map"].items():
                if not (isinstance(shard, str) and shard):
                    raise TypeError(f"the shard of {name!r} is {shard!r}, not a file name")
                by_shard.setdefault(shard, set()).add(name)
    except DuplicateKeys as e:  # (the last shard named would have been believed)
        raise ValueError(f"{index_path} has {e}: each key once (a tensor named twice could be read from either shard; "
                         f"transformers keeps the last, silently)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f'{index_path}: expected JSON {{"weight_map": {{name: shard file}}}} ({e!r})') from None
    outside = [s for s in by_shard if os.path.basename(s) != s]  # an index names files of its folder: no ../, no /
    if outside:
        raise ValueError(f"{index_path} lists shard {outside[0]!r}: expected a file name in {folder}")
    # Validate every shard before loading any, so a broken checkpoint fails before gigabytes are mapped.
    for shard, expected in by_shard.items():
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise ValueError(f"{index_path} lists shard {shard!r}, which is not in {folder}")
        held = set(read_header(shard_path)[0]) - {"__metadata__"}
        if held != expected:
            raise ValueError(f"{shard_path} does not match {INDEX_NAME}: missing {sorted(expected - held)}, "
                             f"extra {sorted(held - expected)}")
    out = {}
    for shard in by_shard:
        out.update(load_file(os.path.join(folder, shard)))
    return out


def save_sharded(tensors: dict, folder, max_shard_bytes: int):
    """Save into `folder` as Hugging Face does: one `model.safetensors` if everything fits in `max_shard_bytes`,
    else shards `model-00001-of-0000K.safetensors` ... plus `model.safetensors.index.json` ({"metadata":
    {"total_size": bytes of all tensors}, "weight_map": {name: shard file}}). The split and every byte equal
    huggingface_hub's `save_torch_state_dict` for tensors that share no memory. Stale files of an older save go."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    # huggingface_hub's greedy split, in dict order: close a shard when the next tensor would overflow it; a tensor
    # over the limit on its own gets a shard at once, while the open shard stays open for the tensors after it.
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if nbytes > max_shard_bytes:
            shards.append({name: t})
            continue
        if size + nbytes > max_shard_bytes:
            shards, current, size = shards + [current], {}, 0
        current[name], size = t, size + nbytes
    if current or not shards:
        shards.append(current)
    files = [SINGLE_NAME] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                      for i in range(len(shards))]
    for file, shard in zip(files, shards):  # HF writes {"format": "pt"} into every file; transformers 4 checks it
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
    if len(shards) > 1:  # the index goes last, once every shard it names is complete
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
        text = json.dumps(index, indent=2)  # huggingface_hub's layout, so the index is byte-identical too
        atomic_write(os.path.join(folder, INDEX_NAME), lambda f: f.write(text.encode("utf-8")))
        files.append(INDEX_NAME)
    # Stale files of the other layout go last: a leftover model.safetensors would be read before the new index (as
    # transformers reads it), a leftover index is litter, leftover shards waste disk. Until then the folder still
    # reads as the old save (sharded to single: already as the new one). Each file is replaced atomically, but a crash
    # between files can leave old and new shards mixed: save to a fresh folder when that matters (load_sharded's name
    # checks catch most, not all, such mixes).
    stale = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
    for file in os.listdir(folder):
        if file not in files and stale.fullmatch(file):
            os.remove(os.path.join(folder, file))
