"""
Real data: the LLaVA format, in which LLaVA-1.5's data and many open image-chat sets are released, imported into our
rows (nanovl/data.py) for train.py's stages 1 and 3 trained on it alone, or beside the synthetic corpus with
--extra_data, where stage 2 reads it too (prepare_data.py --llava FILE --images DIR).

    LLaVA row   {"image": path, [paths] or none, "conversations": [{"from": "human" or "gpt", "value": "..."}]}
                ("images" is read as "image" too, as several multi-image sets name it)
                or {"image": path, "caption" (or "text"): "..."}; "<image>" in the text marks where the image goes
                (without it, one image goes before the first question, or before the caption; a chat's lone image
                goes to the front of its turn, as LLaVA's training code puts it); roles in any
                case, "user" and "assistant" too; a first turn that is not the human's is dropped, as LLaVA's own
                loader drops it, and so is a last question without its answer
    ours        sft.jsonl: {"category": "llava", "images", "conversation": [{"role", "content"}]}   (stage 3)
                pretrain.jsonl: {"category": "caption", "images", "text"}                          (stage 1)
                the images as absolute paths, and <image> written as <image_placeholder>

The file is a JSON array or JSON lines, read row by row (iter_json_rows), so that one bad row is skipped and named by
its place in the file rather than ending the import; import_llava checks every image once, converts each row
(llava_row), and writes the rows kept, with a report of those skipped, aside before moving them in: the folder never
holds a half-written file.
"""

import collections
import json
import os
import reprlib
import shutil
from typing import Callable, List, Tuple

from nanovl.chat import IMAGE_TAG, check_conversation
from nanovl.data import (check_images, folder_kind, half_character, image_error, json_error, json_lines, read_text,
                         write_jsonl)
from nanovl.runs import LEFTOVER


class BrokenFile(ValueError):
    """A JSON array that breaks off (bad syntax, cut short, or more after its end): the rows before it are kept,
    nothing after it can be trusted. is_row: whether it stands where a row was read (bad syntax in a row), or between
    or after the rows (a missing comma, no closing ], more after it)."""

    def __init__(self, message: str, is_row: bool = False):
        super().__init__(message)
        self.is_row = is_row


def iter_json_rows(path: str):
    """Yield (where, row or exception) for a JSON array file or a JSON-lines file, row by row, so one bad row can be
    reported and skipped. where: "line N" for JSON lines; "row K, line N" in an array (K counts from 1), since an
    array written by json.dump is often all on one line. A broken array yields a BrokenFile where it breaks, last."""
    text = read_text(path)
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] != "[":  # JSON lines: one row a line
        for n, _, row in json_lines(text):
            if isinstance(row, ValueError) and n == 1 + text.count("\n", 0, start):
                # the first row: is the file one JSON object, not rows?
                whole = json_or_none(text)
                if isinstance(whole, dict):
                    raise one_object(path, whole) from None
                if spans_lines(text, start):
                    raise ValueError(f"{path} holds rows written over several lines (as jq '.[]' prints them): "
                                     "expected a JSON array of rows, or one row a line (jq -c)")
            yield f"line {n}", row
        return
    decoder, pos, line, counted, k = json.JSONDecoder(), start + 1, 1, 0, 0

    def skip_space(p):
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_of(p):
        return line + text.count("\n", counted, p)

    pos = skip_space(pos)
    if text[pos:pos + 1] == "]":  # an empty array
        pos += 1
    else:
        while True:
            line += text.count("\n", counted, pos)  # counted on from the last row: linear in the file, not quadratic
            counted, k = pos, k + 1
            try:
                row, pos = decoder.raw_decode(text, pos)
            except (json.JSONDecodeError, RecursionError) as e:  # the array is broken: nothing after it can be trusted
                yield f"row {k}, line {line}", BrokenFile(f"not valid JSON: {json_error(e)}; the rest of the file was "
                                                          "not read", is_row=True)
                return
            yield f"row {k}, line {line}", row
            pos = skip_space(pos)
            if text[pos:pos + 1] == "]":
                pos += 1
                break
            if text[pos:pos + 1] == "," and text[skip_space(pos + 1):skip_space(pos + 1) + 1] == "]":
                pos = skip_space(pos + 1) + 1  # a comma after the last row: not JSON, but nothing is lost
                break
            if text[pos:pos + 1] != ",":
                yield (f"after row {k}, line {line_of(pos)}",
                       BrokenFile("the file ends before the array's closing ] (was it cut short?)" if pos >= len(text)
                                  else f"expected ',' or ']' after the row, got {text[pos:pos + 20]!r}; the rest of "
                                       "the file was not read"))
                return
            pos = skip_space(pos + 1)
    pos = skip_space(pos)
    if pos < len(text):
        yield f"line {line_of(pos)}", BrokenFile(f"more after the array's closing ] ({text[pos:pos + 20]!r}: two "
                                                 "files joined?); the rest of the file was not read")


def one_object(path: str, whole: dict) -> ValueError:
    """The error for a file that is one JSON object, such as rows wrapped as {"data": [...]}, rather than rows."""
    keys = list(whole)
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "") if keys else "none"
    row = " (one row over several lines? put it in [ ])" if {"conversations", "image", "images"} & set(keys) else ""
    return ValueError(f"{path} holds one JSON object (keys {shown}), expected a JSON array of rows or one row a "
                      f"line{row}")


def spans_lines(text: str, start: int) -> bool:
    """Whether text, from start, begins with a JSON object that runs over more than one line (and reads as JSON)."""
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except (json.JSONDecodeError, RecursionError):
        return False
    return "\n" in text[start:end]


def json_or_none(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def llava_row(row, images_dir: str, check_image: Callable[[str], None], as_captions: bool = False,
              dropped: collections.Counter = None) -> Tuple[str, dict]:
    """One LLaVA row -> ("sft" or "pretrain", our row). Raises ValueError saying what is wrong with it. as_captions:
    a one-question chat about one image is a caption, its answer the text (see import_llava). dropped: counts the
    turns a kept chat loses (an opening answer, an unanswered last question), for the import's summary."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    key, image = image_field(row)
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise ValueError(f"'{key}' must be a path or a list of paths, got {image!r}")
    for i in images:  # (joined to the folder, "http://x" would become "DIR/http:/x" and read as a missing file)
        if "://" in i:
            raise ValueError(f"image {i!r} is a web address: download the images and name them by their paths in "
                             "the folder given with --images")
    paths = named_images(row, images_dir)
    for p in paths:
        check_image(p)
    if row.get("conversations") is None:  # a plain image-caption pair ("conversations": null is none, like "image")
        field = "caption"  # (a null or empty caption does not hide a text)
        if not (isinstance(row.get(field), str) and row[field].strip()) and row.get("text") is not None:
            field = "text"
        caption = row.get(field)
        if caption is not None and not isinstance(caption, str):  # (several captions of one image, say)
            raise ValueError(f"'{field}' must be a string, got {type(caption).__name__} {reprlib.repr(caption)}" +
                             ("; write a row for each caption" if isinstance(caption, list) else ""))
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError("no 'conversations' and no non-empty 'caption' or 'text'" + (
                " (a 'conversation' of role and content turns is nanovl's own row: train.py reads a folder of those "
                "as it is, with --extra_data, without an import)" if "conversation" in row else ""))
        if len(paths) != 1:
            raise ValueError(f"a caption row needs exactly one image, got {len(paths)}")
        text = caption.strip().replace("<image>", IMAGE_TAG)
        if IMAGE_TAG not in text:
            text = IMAGE_TAG + text  # the image before its caption
        if text.count(IMAGE_TAG) != 1:
            raise ValueError(f"a caption row has one image, but its caption has {text.count(IMAGE_TAG)} <image> tags" +
                             placeholder_note([caption]))
        return "pretrain", checked_text({"category": "caption", "images": paths, "text": text})
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    conversation = []
    for i, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        role = ROLE_NAMES.get(role.lower()) if isinstance(role, str) else None  # ("USER" too)
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} must be {{'from': 'human' or 'gpt' (or 'user', 'assistant'), 'value': text}}, "
                             f"got {turn!r}")
        conversation.append({"role": role, "content": turn["value"].replace("<image>", IMAGE_TAG)})
    first_dropped = conversation[0]["role"] == "assistant"
    if first_dropped:  # LLaVA's own loader skips a first turn that is not the human's
        if IMAGE_TAG in conversation[0]["content"]:  # dropped, its image would move to the first question
            raise ValueError("the first turn, an answer with no question, holds an <image> tag")
        conversation = conversation[1:]
        if not conversation:
            raise ValueError("an answer with no question: nothing to learn from")
    # A last question without its answer teaches nothing: dropped (unless the turns before do not alternate either).
    last_dropped = conversation[-1]["role"] == "user" and (len(conversation) == 1 or
                                                          conversation[-2]["role"] == "assistant")
    if last_dropped:
        if IMAGE_TAG in conversation[-1]["content"]:  # dropped, its image would move to the first question
            raise ValueError("the last question, which has no answer, holds an <image> tag")
        conversation = conversation[:-1]
        if not conversation:
            raise ValueError("a question with no answer: nothing to learn from")
    try:
        check_conversation(conversation)  # (user, assistant, user, ...)
    except ValueError as e:  # (it counts the messages kept from 0: said when they are not the row's turns)
        raise ValueError(f"{e} (counted from the first question: the answer before it was dropped)" if first_dropped
                         else str(e)) from None
    n_tags = sum(m["content"].count(IMAGE_TAG) for m in conversation)
    if n_tags == 0 and len(paths) == 1:  # some sets omit the tag; LLaVA puts the image before the first question
        conversation[0]["content"] = IMAGE_TAG + "\n" + conversation[0]["content"]
    elif n_tags != len(paths):
        raise ValueError(f"{n_tags} <image> tags but {len(paths)} images" +
                         placeholder_note(turn["value"] for turn in turns))
    elif len(paths) == 1:
        # LLaVA's training code (preprocess_multimodal) moves a lone image's tag to the front of its turn, a newline
        # after it, wherever the row wrote it: LLaVA-Pretrain and ShareGPT4V often end a question with "\n<image>".
        # So the model always sees the image before the words about it, as DeepSeek-VL's prompts and sample.py put it.
        for m in conversation:
            if IMAGE_TAG in m["content"]:
                m["content"] = (IMAGE_TAG + "\n" + m["content"].replace(IMAGE_TAG, "").strip()).strip()
    answer = conversation[-1]["content"].strip()
    if as_captions and len(paths) == 1 and len(conversation) == 2 and IMAGE_TAG not in answer:
        kept = "pretrain", checked_text({"category": "caption", "images": paths, "text": IMAGE_TAG + answer})
    else:
        kept = "sft", checked_text({"category": "llava", "images": paths, "conversation": conversation})
    if dropped is not None:  # (the row is kept: counted)
        dropped.update(["opening answer"] * first_dropped + ["unanswered last question"] * last_dropped)
    return kept


def placeholder_note(texts) -> str:
    """What to add to a count of <image> tags when the row's texts also hold DeepSeek-VL's own tag, which counts."""
    return f" ({IMAGE_TAG} written in the text counts as one)" if any(IMAGE_TAG in t for t in texts) else ""


def checked_text(row: dict) -> dict:
    """row, or ValueError if some string in it cannot be written as UTF-8 (half_character)."""
    if bad := half_character(row):
        raise ValueError(bad)
    return row


# What an image file's name ends with: a field of other name holding such names is taken for the row's images
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def image_field(row: dict) -> Tuple[str, object]:
    """(its name, its value or []) of the field naming a row's images: "image", as LLaVA writes it, or "images", as
    several multi-image sets do. A row with both is refused, rather than one of them dropped unseen."""
    given = [k for k in ("image", "images") if row.get(k)]  # "image": null or "", as some exports write: none
    if len(given) == 2:
        raise ValueError("the row has both 'image' and 'images': expected one field naming its images")
    if not given:  # images under another name ("image_path", "img") would be dropped unseen: the chat trains blind
        other = [k for k, v in row.items() if k not in ("id", "conversations", "caption", "text") and
                 any(isinstance(p, str) and p.lower().endswith(IMAGE_EXTENSIONS) for p in (v if isinstance(v, list)
                                                                                           else [v]))]
        if other:
            raise ValueError(f"the row names images under {other[0]!r}, a field this import does not read: expected "
                             "'image' (LLaVA's) or 'images'; rename the field in the file")
    return (given[0], row[given[0]]) if given else ("image", [])


def named_images(row, images_dir: str) -> List[str]:
    """The image paths a LLaVA row names, as llava_row resolves them; [] when its image field is malformed (which
    llava_row reports)."""
    try:
        image = image_field(row)[1] if isinstance(row, dict) else []
    except ValueError:
        return []
    images = [image] if isinstance(image, str) else image if isinstance(image, list) else []
    return [os.path.abspath(os.path.join(images_dir, i)) for i in images
            if isinstance(i, str) and i and "://" not in i]


IMPORT_FILES = ("sft.jsonl", "pretrain.jsonl", "report.txt", "meta.json")  # what an import writes, meta.json last


def import_record(folder: str) -> dict:
    """What an import wrote into its folder's meta.json: {"file", "images", "as_captions"}; {} for a folder that is no
    import, or one whose meta.json was edited past reading (each caller then says less, never fails on it)."""
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            made = json.load(f)["llava"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return made if isinstance(made, dict) else {}


def earlier_import(out: str) -> str:
    """What an import into `out` replaces, for its summary line: ", replacing the import of FILE made there before"
    (its meta.json names the file), or "" for a new folder. Replacing one is allowed (re-importing is how a changed
    file comes in), but not without a word: the earlier file may have been another one."""
    if folder_kind(out) != "llava":
        return ""
    made = import_record(out)  # (a meta.json edited by hand: still an import's folder)
    return f", replacing the import of {made['file']} made there before" if "file" in made else \
        ", replacing the import made there before"


def import_llava(path: str, images_dir: str, out: str, workers: int = 1, as_captions: bool = False) -> str:
    """Convert a LLaVA-format file into our rows in `out` (sft.jsonl, pretrain.jsonl, report.txt, meta.json).
    Plain image-caption rows become captions (stage 1 reads them), conversations chats (stage 3). as_captions: a
    one-question chat about one image becomes a caption too, the image then the answer, its instruction dropped.
    That is the shape of LLaVA's own caption set (LLaVA-Pretrain: "<image> Render a clear and concise summary of
    the photo." and the caption), and how LLaVA trains on it in its first stage (its "plain" template).

    Every image the rows name is checked first, once, in `workers` processes. Rows with a missing or unreadable
    image or a malformed field are skipped, each listed with where it is in the file in report.txt; every other row
    is kept. Returns the report's summary. `out` never holds a half-written file: the import is written aside and
    moved in (a new folder at once; over an earlier import, its four files one by one, meta.json last). Only an
    earlier import is replaced: its files, not others put beside them (your eval_mc.jsonl and its images).
    """
    if not os.path.isfile(path):
        raise ValueError(f"LLaVA file {path} " + ("is a folder: expected a JSON or JSON-lines file"
                                                  if os.path.isdir(path) else "does not exist"))
    if not os.path.isdir(images_dir):
        raise ValueError(f"image folder {images_dir} " + ("is a file: expected the folder the image paths are "
                                                          "relative to" if os.path.exists(images_dir)
                                                          else "does not exist"))
    kind = folder_kind(out)
    if kind == "file":
        raise ValueError(f"--out {out} is a file: expected a folder for the import (one that does not exist yet, or "
                         "an earlier import)")
    if kind not in ("missing", "llava"):
        raise ValueError(f"{out} already holds " + ("prepare_data.py's synthetic corpus" if kind == "synthetic" else
                                                    "files that no LLaVA import made") +
                         "; choose another --out for the import (an earlier import there would be replaced)")
    # Written aside, in a folder of the import's files only, then moved in: never a half-written folder. Made first,
    # so that a place that cannot be written is said before the images are read (minutes, for many of them).
    partial = out.rstrip("/") + ".partial"
    if os.path.exists(partial) and not all(f in IMPORT_FILES or LEFTOVER.fullmatch(f) for f in os.listdir(partial)):
        raise ValueError(f"{partial}, where an import is written before it is moved to {out}, holds files an import "
                         "does not write; move it out of the way")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted import left
    try:
        os.makedirs(partial)
    except OSError as e:
        raise ValueError(f"cannot write {partial}, where the import is written before it is moved to {out}: "
                         f"{e.strerror or e}") from None
    moved = False
    try:
        rows = list(iter_json_rows(path))
        named = [p for _, row in rows for p in named_images(row, images_dir)]
        # None there at all: the wrong folder, most likely. Every row with an image would be skipped, and the rows
        # without one (LLaVA-1.5's mix has 40k) kept, replacing an earlier import with a text-only one.
        if named and not any(os.path.exists(p) for p in named):
            raise ValueError(f"none of the {len(set(named))} images the rows name is in {images_dir} (the first: "
                             f"{named[0]}): is --images the folder the file's image paths are relative to? Nothing "
                             "was written")
        checked = check_images(named, workers)

        def check_image(p):
            error = checked[p] if p in checked else image_error(p)
            if error:
                raise ValueError(error)

        kept = {"sft": [], "pretrain": []}
        skipped, broken, dropped = [], "", collections.Counter()
        total = 0
        for where, row in rows:
            if isinstance(row, BrokenFile):  # always the last
                broken = f"{where}: {row}"
                if not row.is_row:
                    continue  # between or after the rows: not a row read, nor one skipped
            total += 1
            try:
                if isinstance(row, Exception):
                    raise row
                dest, ours = llava_row(row, images_dir, check_image, as_captions, dropped)
                kept[dest].append(ours)
            except ValueError as e:
                id_note = f" (id {row['id']!r})" if isinstance(row, dict) and "id" in row else ""
                skipped.append(f"{where}{id_note}: {e}")
        if not kept["sft"] and not kept["pretrain"]:
            # One object on one line reads as JSON lines of one row; with none of a row's fields, it is no row but
            # the whole file (rows wrapped as {"data": [...]}), and is said to be, as one over several lines is.
            only = rows[0][1] if len(rows) == 1 and rows[0][0].startswith("line ") else None
            if isinstance(only, dict) and not {"image", "conversations", "caption", "text"} & set(only):
                raise one_object(path, only)
            raise ValueError(f"{path}: no row to keep ({total} read" +
                             (f"; the first skipped: {skipped[0]}" if skipped else "") + "); nothing was written")
        with_images = sum(1 for row in kept["sft"] if row["images"])
        summary = (f"{path}: {total} rows read, {len(kept['sft'])} conversations" +
                   (f" ({with_images} with images)" if kept["sft"] else "") +
                   f" and {len(kept['pretrain'])} captions kept, {len(skipped)} skipped" +
                   (f"; turns dropped from rows kept: {dropped['opening answer']} opening answers (no question "
                    f"before them), {dropped['unanswered last question']} last questions (no answer after them)"
                    if dropped else "") + f"; written to {out}" +
                   earlier_import(out) + (f". The file is broken: {broken}" if broken else ""))
        try:
            for name in ("sft", "pretrain"):
                write_jsonl(os.path.join(partial, f"{name}.jsonl"), kept[name])
            with open(os.path.join(partial, "report.txt"), "w", encoding="utf-8") as f:
                f.write(summary + "\n" + "".join(f"skipped {s}\n" for s in skipped))
            with open(os.path.join(partial, "meta.json"), "w") as f:
                json.dump({"llava": {"file": os.path.abspath(path), "images": os.path.abspath(images_dir),
                                     "as_captions": as_captions}}, f, indent=2)
            if folder_kind(out) == "missing":
                if os.path.isdir(out):
                    os.rmdir(out)  # an empty folder
                os.replace(partial, out)
            else:  # an earlier import: only its files are replaced (meta.json last), not what else is there
                moved = True  # (from here on, some of them may be the new ones)
                for name in IMPORT_FILES:
                    os.replace(os.path.join(partial, name), os.path.join(out, name))
                os.rmdir(partial)
        except OSError as e:  # a full disk, say: one line, and nothing half-written left behind
            raise ValueError(f"cannot write {e.filename or partial}: {e.strerror or e}" +
                             (f"; {out} may hold some of the new files" if moved else f"; {out} is as it was")
                             ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # (moved in whole, it is gone already)
    return summary + (f" (reasons in {os.path.join(out, 'report.txt')})" if skipped else "")
