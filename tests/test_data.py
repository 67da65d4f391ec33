"""prepare_data.py end to end on a small run, the LLaVA import with bad rows, and the batches the trainer reads."""

import argparse
import errno
import fcntl
import gzip
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

import prepare_data
from nanovl.chat import IMAGE_TAG, render_document
from nanovl.config import get_config
from nanovl.data import (PackedBatches, PackedRows, PlannedBatches, Sample, Source, collate, epochs, folder_kind,
                         hash_chunks, plan_batches, plan_digest, read_jsonl, write_jsonl)
from nanovl.image import ImageProcessor
from nanovl.llava import import_llava
from nanovl.runs import building
from nanovl.synth import CATEGORIES, COLORS, NUMBERS, SEG_LABELS, SHAPES, make_example
from nanovl.tokenizer import Tokenizer


def folder_digest(path) -> str:
    h = hashlib.sha1()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            if name == "meta.json":
                continue  # holds the run time
            h.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


USER_TEXT = "Gulliver woke to find himself tied down by a great many very small people. " * 4


@pytest.fixture(scope="module")
def user_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "gulliver.txt"
    path.write_text(USER_TEXT)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, user_text):
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare_data.main(["--out", str(out), "--n", "6", "--workers", "2", "--text", user_text])
    return out


def test_ocr_pages_take_prose_paragraphs_only():
    # The docstring paragraphs that read as prose, flattened: not code examples (>>>), not short or symbol-heavy ones.
    prose = "This function returns the number of items held in the container, counting each one once. " * 2
    docs = [{"text": f"Short.\n\n{prose}\n\n>>> {prose}\n\n{prose.replace(' ', ' = 1; ')}\n\n  {prose}\n  again"}]
    assert prepare_data.prose_paragraphs(docs) == [prose.strip(), prose.strip() + " again"]


def test_a_text_file_with_windows_line_ends_is_split_into_its_paragraphs(tmp_path, monkeypatch):
    # Paragraphs are split at "\n\n", which "\r\n\r\n" does not hold: such a file reached no OCR page, its "\r" kept
    crlf = tmp_path / "notes.txt"
    crlf.write_bytes(b"First paragraph.\r\n\r\nSecond one,\ron an old Mac.\r\n")
    given = []
    monkeypatch.setattr(prepare_data, "prepare", lambda args: given.append(args.user_text))
    prepare_data.main(["--out", str(tmp_path / "data"), "--n", "1", "--text", str(crlf)])
    assert given == [[(str(crlf), "First paragraph.\n\nSecond one,\non an old Mac.\n")]]
    # A folder made from it before counts it by its text as read now, so it is made again; one made from a file with
    # "\n" line ends, by the same hash as before (its bytes'), so it is not
    lf = tmp_path / "notes-lf.txt"
    lf.write_bytes(b"First paragraph.\n\nSecond one,\non an old Mac.\n")
    made = lambda path: prepare_data.identity(argparse.Namespace(config="tiny", n=1, seed=1, image_size=0,  # noqa: E731
                                                                 text=[str(path)]))["text"][str(path)]
    sha1 = lambda path: hashlib.sha1(path.read_bytes()).hexdigest()  # noqa: E731
    assert made(crlf) == made(lf) == sha1(lf) != sha1(crlf)


def test_a_questions_wrong_options_are_drawn_from_every_other_answer():
    # else the odd one out among the options (an answer never offered wrongly) would give itself away unseen
    from nanovl.synth import mc_question
    pool = ["red", "green", "blue", "yellow", "white"]
    asked = [mc_question(random.Random(seed), "Which colour?", "red", pool) for seed in range(40)]
    assert {option for q in asked for option in q["options"]} == set(pool)
    assert all(q["options"][q["answer"]] == "red" and len(set(q["options"])) == 4 for q in asked)


def test_prepare_data_writes_every_part(data_dir):
    names = sorted(os.listdir(data_dir))
    assert names == ["eval_mc.jsonl", "eval_text.jsonl", "images", "meta.json", "pretrain.jsonl", "sft.jsonl",
                     "stage0.jsonl", "text.jsonl", "tokenizer.json", "val_mc.jsonl"]
    meta = json.load(open(data_dir / "meta.json"))
    assert meta["image_size"] == 256 and meta["n_image_tokens"] == 36
    pretrain = read_jsonl(data_dir / "pretrain.jsonl")
    assert sorted({r["category"] for r in pretrain}) == sorted(CATEGORIES)
    assert len(pretrain) == 6 * len(CATEGORIES)
    for row in pretrain:
        assert row["text"].count(IMAGE_TAG) == len(row["images"]) >= 1
        for p in row["images"]:
            with Image.open(data_dir / p) as img:
                assert max(img.size) == 256  # generated at the preset's canvas size
    assert any(len(r["images"]) > 1 for r in pretrain)  # interleaved documents hold several images
    for row in pretrain:  # images/caption/train_000003.png; a document's several images _0.png, _1.png, ...
        n = len(row["images"])
        stem = row["images"][0].removesuffix("_0.png" if n > 1 else ".png")
        assert re.fullmatch(rf"images/{row['category']}/train_\d{{6}}", stem), row["images"]
        assert row["images"] == ([f"{stem}_{j}.png" for j in range(n)] if n > 1 else [f"{stem}.png"])
    sft = read_jsonl(data_dir / "sft.jsonl")
    assert {r["category"] for r in sft} == set(CATEGORIES) | {"text"}
    assert any(len(r["conversation"]) >= 4 for r in sft)  # multi-turn
    assert any(not r["images"] for r in sft)  # text-only dialogue
    # An image chat's first question holds a placeholder for each of its images; the long chats ask their
    # multiple-choice question at any turn, the first or a later one.
    assert all(r["conversation"][0]["content"].count(IMAGE_TAG) == len(r["images"]) for r in sft)
    turn = lambda r: next((i for i, m in enumerate(r["conversation"][::2]) if "Options:" in m["content"]), None)
    at = [turn(r) for r in sft if len(r["conversation"]) >= 4 and turn(r) is not None]
    assert len(at) > 20 and 0 in at and max(at) > 0
    assert any(turn(r) == len(r["conversation"]) // 2 - 1 for r in sft if len(r["conversation"]) >= 4)  # the last
    stage0 = read_jsonl(data_dir / "stage0.jsonl")
    assert {r["category"] for r in stage0} == set(CATEGORIES) - {"interleaved"}
    for row in stage0:
        assert row["caption"] and IMAGE_TAG not in row["caption"]  # the image's one fact, not its document
        if row["seg"]:
            seg = np.asarray(Image.open(data_dir / row["seg"]))
            assert seg.max() <= len(SEG_LABELS) and seg.max() > 0
    assert {r["category"] for r in stage0 if r["seg"]} == {"caption", "scene_text"}
    mc = read_jsonl(data_dir / "eval_mc.jsonl")
    assert {r["category"] for r in mc} == set(CATEGORIES) - {"interleaved"}
    assert all(len(r["options"]) == 4 and 0 <= r["answer"] < 4 for r in mc)
    train_images = {p for r in pretrain for p in r["images"]}
    assert not train_images & {p for r in mc for p in r["images"]}  # held out
    assert read_jsonl(data_dir / "eval_text.jsonl")
    assert USER_TEXT in [r["text"] for r in read_jsonl(data_dir / "text.jsonl")]  # --text files join the text data
    # Held out means unseen: no evaluation image is a training image, and no held-out text is in the training text
    # (nor on the OCR pages, whose prose comes from the training text).
    digest = lambda p: hashlib.sha1((data_dir / p).read_bytes()).hexdigest()
    assert not {digest(p) for p in train_images} & {digest(p) for r in mc for p in r["images"]}
    flat = lambda text: " ".join(text.split())
    train_text = "\n".join(flat(t) for t in [r["text"] for r in read_jsonl(data_dir / "text.jsonl")] +
                           [r["text"] for r in pretrain] + [m["content"] for r in sft for m in r["conversation"]])
    for row in read_jsonl(data_dir / "eval_text.jsonl"):
        for paragraph in [flat(p) for p in row["text"].split("\n\n") if len(flat(p)) >= 80]:
            assert paragraph[:80] not in train_text
    # A short chat asks a long chat's multiple-choice question again, word for word: the same answer
    answers = {}
    for r in sft:
        for q, a in zip(r["conversation"][::2], r["conversation"][1::2]):
            if "Options:" in q["content"]:
                answers.setdefault((tuple(r["images"]), q["content"].replace(IMAGE_TAG, "")), []).append(a["content"])
    assert len(answers) == sum(r["category"] != "interleaved" for r in pretrain)  # one per example that has one
    assert all(len(a) == 2 and a[0] == a[1] for a in answers.values())
    sft_questions = [m["content"] for r in sft for m in r["conversation"][::2]]
    assert sum("Options:" in q for q in sft_questions) >= 2 * 5 * 6  # a multiple-choice turn, and a short chat
    # ... and a second short chat asks it open, as a user would, answered by a sentence that names the right option
    short = [(tuple(r["images"]), q["content"].replace(IMAGE_TAG, ""), a["content"])
             for r in sft if r["images"] and len(r["conversation"]) == 2 for q, a in [r["conversation"]]]
    open_short = {(images, q): a for images, q, a in short if "Options:" not in q}
    for images, q, a in [s for s in short if "Options:" in s[1]]:
        assert a in open_short[images, q.split("\n")[0]], (images, q)
    assert len(open_short) == len(short) // 2 == len(answers)
    tok = Tokenizer.load(data_dir / "tokenizer.json")
    assert tok.vocab_size == get_config("tiny").llm.vocab_size and tok.image_id == get_config("tiny").image_token_id


def stated_answer(question: str, text: str) -> str:
    """The answer to a synthetic multiple-choice question, read from the example's own text (what it states)."""
    text = text.replace(IMAGE_TAG, "")
    if question == "What colour is the button?":
        return re.search(r"background:(\w+)", text).group(1)
    if question.startswith("What colour is the "):
        return re.search(rf"(\w+) {question.removeprefix('What colour is the ').rstrip('?')}\b", text).group(1)
    if question == "How many shapes are in the picture?":
        return text.split()[0].lower()  # "Three shapes on a white background: ..."
    if question == "What does the sign say?":
        return re.search(r'says "(\w+)"', text).group(1)
    if question == "What is the title of this document?":
        return text.split("\n")[0]
    if question == "Which bar is the tallest?":
        bars = dict((item, int(v)) for item, v in re.findall(r"(\w+): (\d+)", text))
        return max(bars, key=bars.get)
    if question.startswith("How many rows does the table have"):
        return NUMBERS[len(text.strip().split("\n")) - 2]  # less the header and its rule
    raise AssertionError(f"no rule for {question!r}")


def test_every_multiple_choice_answer_is_what_the_example_states():
    kinds, shapes = set(), re.compile(rf"(\w+) ({'|'.join(SHAPES)})")
    answers, offered = defaultdict(set), defaultdict(set)  # per question: the right options, and all options
    places = [0] * 4  # how often the right answer is the first, second, ... option
    for category in [c for c in CATEGORIES if c != "interleaved"]:
        for i in range(200):
            ex = make_example(category, random.Random(f"check-{category}-{i}"), 64, "A snippet of prose.")
            right = ex.mc["options"][ex.mc["answer"]]
            kind = re.sub("|".join(SHAPES), "<shape>", ex.mc["question"])  # any shape may be any colour
            answers[kind].add(right)
            offered[kind].update(ex.mc["options"])
            assert right == stated_answer(ex.mc["question"], ex.text), (category, i, ex.mc, ex.text)
            assert len(set(ex.mc["options"])) == 4
            places[ex.mc["answer"]] += 1
            if ex.mc["question"] == "Which bar is the tallest?":  # one bar only: the values differ
                values = [int(v) for v in re.findall(r"\w+: (\d+)", ex.text)]
                assert len(set(values)) == len(values), ex.text
            assert not re.search(r"\ba [aeiou]", ex.text), ex.text  # "an orange circle"
            assert right.lower() in ex.caption.lower() and IMAGE_TAG not in ex.caption  # stage 0's one fact
            # the question asked open (a short chat of its own) is answered by a sentence naming that option alone
            words = set(re.findall(r"\w+", dict(ex.qa)[ex.mc["question"]].lower()))
            assert {o.lower() for o in ex.mc["options"]} & words == {right.lower()}, (category, i, ex.qa)
            q = ex.mc["question"]
            kinds.add((category, "colour" if "colour" in q else "count" if "shapes" in q
                       else "tallest" if "tallest" in q else "rows" if "rows" in q else q))
            if ex.seg is not None:  # every shape is labelled by its (shape, colour), the background 0
                drawn = {1 + SEG_LABELS.index((s, c)) for c, s in shapes.findall(ex.text) if c in COLORS}
                scene = [(c, s) for c, s in shapes.findall(ex.text) if c in COLORS]
                for q, _ in ex.qa:  # "where is the black square?" only of a scene with one black square
                    if q.startswith("Where is the"):
                        assert scene.count(tuple(q[len("Where is the "):-1].split())) == 1, (q, ex.text)
                assert set(np.unique(np.asarray(ex.seg)).tolist()) == drawn | {0}, (category, i)
    # every kind of question is asked: colours and counts of shapes, tallest bars and table rows
    assert {("caption", "colour"), ("caption", "count"), ("chart", "tallest"), ("chart", "rows")} <= kinds
    # Every option is the right answer to some image: one that never is (a yellow button, where buttons are never
    # yellow; six rows, where tables have two to five) is ruled out without looking, and chance is above a quarter.
    never = {q: sorted(offered[q] - answers[q]) for q in answers if offered[q] - answers[q]}
    assert not never, never
    # Nor is any place among the options the right one more often than chance: 1000 questions, about 250 each.
    assert all(200 <= n <= 300 for n in places), places


def test_scenes_keep_out_of_the_cells_they_are_told_and_canvases_keep_their_long_side():
    from nanovl.synth import PLACES, canvas_shape, scene

    for i in range(50):  # scene text keeps the middle row for its sign
        objects = scene(random.Random(i), 64, 3, avoid=(3, 4, 5))[2]
        assert len(objects) == 3 and not {o["place"] for o in objects} & {PLACES[c] for c in (3, 4, 5)}
    assert canvas_shape(random.Random(0), 64, shapes=((3, 4),)) == (48, 64)  # portrait: the height is the long side
    assert canvas_shape(random.Random(0), 64, shapes=((4, 3),)) == (64, 48)


def test_a_scene_texts_sign_hides_no_shape_its_label_map_and_caption_name():
    # The sign is painted over the middle row after the shapes: a shape there would be hidden, yet named by the caption
    # and labelled, pixel by pixel, in the label map stage 0 trains SAM on. Every labelled pixel shows its shape.
    from nanovl.synth import COLORS, SEG_LABELS, SHAPES, make_scene_text

    for i in range(40):
        example = make_scene_text(random.Random(i), 128)
        img, seg = np.array(example.images[0]), np.array(example.seg)
        labels = set(np.unique(seg).tolist()) - {0}
        assert len(labels) == len(set(re.findall(rf"(\w+) ({'|'.join(SHAPES)})", example.text)))  # each one named
        for label in labels:
            shape, color = SEG_LABELS[label - 1]
            assert (img[seg == label] == COLORS[color]).all(), (i, shape, color)


def test_every_rendered_text_is_on_the_page_and_apart(monkeypatch):
    from PIL import ImageDraw

    from nanovl.synth import font, make_bar_chart, make_ocr, wrap
    # An OCR page's lines: a word wider than the page (a URL) is broken, never drawn past the edge.
    draw = ImageDraw.Draw(Image.new("RGB", (100, 100)))
    f, text = font(12), "see http://xml.org/sax/features/namespaces-and-more for the details"
    lines = wrap(draw, text, f, 90)
    assert max(draw.textlength(line, font=f) for line in lines) <= 90
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")  # every character, in order
    # A bar chart's labels each stay in their own bar's slot: "peaches" ran into "melons" in a third of the charts.
    drawn = []
    real_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, **kw: (
        drawn.append((xy[0], self.textlength(text, font=kw["font"]), text)), real_text(self, xy, text, **kw))[1])
    for seed in range(40):
        drawn.clear()
        make_bar_chart(random.Random(seed), 256)
        labels = sorted((x, x + width) for x, width, text in drawn if not text.isdigit())
        assert all(end < start for (_, end), (start, _) in zip(labels, labels[1:])), (seed, drawn)
    # An OCR page ends its paragraph at the bottom margin: every line is drawn on the page, and the target text holds
    # the lines drawn, no more.
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, **kw: (
        drawn.append((self.textbbox(xy, text, font=kw["font"])[3], text)), real_text(self, xy, text, **kw))[1])
    for seed in range(10):
        drawn.clear()
        ex = make_ocr(random.Random(seed), 128, "a long paragraph of plain words " * 40)
        assert max(bottom for bottom, _ in drawn) <= ex.images[0].size[1], seed
        assert ex.text.removeprefix(IMAGE_TAG).split("\n") == [text for _, text in drawn]


def test_interleaved_documents_answer_from_their_pictures():
    # Each picture's shapes, counted from its description in the text, answer both questions of the document.
    for i in range(100):
        ex = make_example("interleaved", random.Random(f"interleaved-{i}"), 32)
        counts = [NUMBERS.index(m) for m in re.findall(r"picture shows (\w+) shapes?", ex.text)]
        assert len(counts) == len(ex.images) == ex.text.count(IMAGE_TAG) in (2, 3)
        (together, total), (most, which) = ex.qa
        assert together == IMAGE_TAG * len(counts) + "How many shapes are there in all the pictures together?"
        assert most == "Which picture has the most shapes?"
        assert total == f"There are {sum(counts)} shapes in total."
        top = [k for k, c in enumerate(counts) if c == max(counts)]
        assert which == ("They all have the same number." if len(set(counts)) == 1 else
                         f"The {('first', 'second', 'third')[top[0]]} picture." if len(top) == 1 else
                         "Several pictures share the largest number.")


def test_a_corpus_is_rebuilt_when_anything_that_makes_it_changes(user_text, tmp_path):
    # A folder is "already prepared" only when what made it is the same: the preset, --n, --seed, --image-size and
    # the bytes of each --text file (edited in place, the same path makes another corpus). The command line that
    # rebuilds a folder of an older version carries its --text files too.
    import types
    mine = tmp_path / "mine.txt"
    mine.write_text("my own words, long enough to be a text of their own.")
    make = lambda **kw: types.SimpleNamespace(**dict(dict(config="tiny", n=6, seed=1, image_size=0,  # noqa: E731
                                                           text=[str(mine), user_text]), **kw))
    before = prepare_data.identity(make())
    for change in (dict(config="small"), dict(n=7), dict(seed=2), dict(image_size=320), dict(text=[user_text])):
        assert prepare_data.identity(make(**change)) != before, change
    mine.write_text("my own words, edited")
    assert prepare_data.identity(make()) != before
    assert prepare_data.arguments(before, "data")[-3:] == ["--text", str(mine), user_text]
    # and the held-out split keeps a small share of the texts (3%), not the rest
    held = sum(prepare_data.is_held_out(f"a docstring, number {i}") for i in range(4000)) / 4000
    assert 0.02 < held < 0.04


def test_two_builds_of_one_folder_take_turns(data_dir, user_text, tmp_path, capsys):
    """Two at once cleared each other's .partial, and left one's rows with the other's images. The second waits for
    the first, then builds (or finds the folder built), and the lock beside the folder goes with the last."""
    out, held, done = tmp_path / "again", threading.Event(), []

    def first():
        with building(str(out)):
            held.set()
            time.sleep(0.5)
            done.append(time.time())

    other = threading.Thread(target=first)
    other.start()
    held.wait()
    prepare_data.main(["--out", str(out), "--n", "6", "--workers", "1", "--text", user_text])
    other.join()
    assert f"waiting for another build of {out} to end (process {os.getpid()} on {socket.gethostname()})" in \
        capsys.readouterr().out
    assert os.path.getmtime(out / "meta.json") >= done[0]  # built once the first had ended
    assert folder_digest(out) == folder_digest(data_dir) and not (tmp_path / ".again.lock").exists()
    with building(f"{out}/."):  # one lock however the folder is spelt
        assert os.listdir(tmp_path).count(".again.lock") == 1
        with pytest.raises(BlockingIOError):
            with open(tmp_path / ".again.lock") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_build_goes_on_unlocked_where_the_file_system_has_no_locks(tmp_path, monkeypatch):
    def no_locks(f, how):  # Lustre mounted without flock, some NFS: the build worked before it took a lock
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with building(str(tmp_path / "data")):
        built = True
    assert built and os.listdir(tmp_path) == []


def test_prepare_data_is_deterministic_and_idempotent(data_dir, user_text, tmp_path, capsys, monkeypatch):
    again = tmp_path / "again"
    prepare_data.main(["--out", str(again), "--n", "6", "--workers", "1", "--text", user_text])  # 1 worker, same bytes
    assert folder_digest(again) == folder_digest(data_dir)
    capsys.readouterr()
    monkeypatch.chdir(os.path.dirname(user_text))  # the same file named another way: the same folder
    prepare_data.main(["--out", str(again), "--n", "6", "--text", "./" + os.path.basename(user_text)])
    assert "already prepared" in capsys.readouterr().out
    monkeypatch.undo()
    (again / "text.jsonl").unlink()  # removed since: rebuilt, not "already prepared"
    prepare_data.main(["--out", str(again), "--n", "6", "--workers", "1", "--text", user_text])
    assert f"{again} lacks text.jsonl: rebuilding it" in capsys.readouterr().out
    assert folder_digest(again) == folder_digest(data_dir)
    text = (again / "text.jsonl").read_bytes()
    (again / "text.jsonl").unlink()
    (again / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"is to be rebuilt \(text.jsonl missing\), but it also holds notes.txt"):
        prepare_data.main(["--out", str(again), "--n", "6", "--text", user_text])
    assert "rebuilding" not in capsys.readouterr().out  # (refused: not said to go ahead first)
    (again / "notes.txt").unlink()
    (again / "text.jsonl").write_bytes(text)
    (again / "my_questions.jsonl").write_text("mine")  # what a rebuild would delete: it stops and says so
    with pytest.raises(SystemExit, match="to be rebuilt .new arguments., but it also holds my_questions.jsonl, which "
                                         "prepare_data.py did not write and the rebuild would delete: move it out"):
        prepare_data.main(["--out", str(again), "--n", "5", "--text", user_text])
    (again / "my_questions.jsonl").unlink()
    (again / "images" / "caption" / "my_photo.png").write_bytes(b"mine")  # among the generated images: found too
    with pytest.raises(SystemExit, match="but it also holds images/caption/my_photo.png, which prepare_data.py did"):
        prepare_data.main(["--out", str(again), "--n", "5", "--text", user_text])
    (again / "images" / "caption" / "my_photo.png").unlink()
    # What an interrupted run left beside the folder is cleared only if this script wrote all of it.
    partial = tmp_path / "again.partial"
    (partial / "images" / "ocr").mkdir(parents=True)
    (partial / "images" / "ocr" / "train_000003.png").write_bytes(b"half")
    (partial / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit, match=r"again.partial is where an interrupted build is left, but it holds "
                                         "thesis.tex, which prepare_data.py did not write"):
        prepare_data.main(["--out", str(again), "--n", "5", "--text", user_text])
    assert "rebuilding" not in capsys.readouterr().out  # (refused: not said to go ahead first)
    assert (partial / "thesis.tex").read_text() == "precious"
    (partial / "thesis.tex").unlink()
    shutil.copytree(again, tmp_path / "again.old")  # a backup of one's own, under an obvious name: never touched
    aside = tmp_path / "again.replaced-by-prepare_data"
    shutil.copytree(again, aside)  # what a rebuild killed after moving the old corpus aside leaves
    capsys.readouterr()
    prepare_data.main(["--out", str(again), "--n", "5", "--text", user_text])  # other arguments: rebuilt, and said
    printed = capsys.readouterr().out
    assert "wrote" in printed
    assert f"{again} was prepared with other arguments (--n 6 -> 5): rebuilding it; the old corpus is deleted" \
        in printed
    assert not os.path.exists(partial) and not os.path.exists(aside)
    assert folder_digest(tmp_path / "again.old") == folder_digest(data_dir)
    # Killed between the swap's two renames: no folder, the old corpus aside. The next run puts it back first.
    os.replace(again, aside)
    prepare_data.main(["--out", str(again), "--n", "5", "--text", user_text])
    printed = capsys.readouterr().out
    assert f"{again}: put back from {aside}" in printed and "already prepared" in printed
    prepare_data.main(["--out", str(again), "--n", "5", "--seed", "2", "--text", user_text])  # the same --n: rebuilt
    assert "wrote" in capsys.readouterr().out


def test_a_build_that_cannot_be_written_leaves_no_partial_folder(data_dir, user_text, tmp_path, monkeypatch):
    out = tmp_path / "data"
    shutil.copytree(data_dir, out)  # an earlier corpus, which a failed rebuild leaves as it was
    plain = prepare_data.write_jsonl

    def full(path, rows):  # the disk fills up once the images are written
        if path.endswith("pretrain.jsonl"):
            raise OSError(28, "No space left on device", path)
        plain(path, rows)

    monkeypatch.setattr(prepare_data, "write_jsonl", full)
    with pytest.raises(SystemExit, match=r"^cannot write .*data.partial/pretrain.jsonl: No space left on device$"):
        prepare_data.main(["--out", str(out), "--n", "1", "--workers", "1", "--text", user_text])
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no data.partial holding the images on the full disk
    assert folder_digest(out) == folder_digest(data_dir)


def test_a_sigterm_while_the_images_are_drawn_ends_the_build_in_one_line(tmp_path):
    # `kill PID` (SIGTERM, to the parent alone): left to its default, it killed the build without a word, and each
    # pool worker, its parent gone, printed a BrokenPipeError's traceback. It is now a stop, as Ctrl-C is.
    log = tmp_path / "log"
    with open(log, "wb") as f:
        build = subprocess.Popen([sys.executable, "prepare_data.py", "--out", str(tmp_path / "d"), "--workers", "2"],
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=f,
                                 stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while b"images:" not in log.read_bytes() and build.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # (tqdm's bar: the workers are drawing)
    time.sleep(0.3)
    build.send_signal(signal.SIGTERM)
    assert build.wait(60) == 1
    time.sleep(0.5)  # (time for any worker left behind to say something)
    out = log.read_text()
    assert out.rstrip().endswith(f"stopped by SIGTERM: {tmp_path / 'd'} is as it was (the new data was being built "
                                 f"aside, in {tmp_path / 'd'}.partial, which the next run starts again)"), out[-500:]
    assert "Traceback" not in out and not os.path.exists(tmp_path / "d")


def test_your_own_text_files_are_checked_and_all_trained_on(data_dir, tmp_path, capsys):
    # --text files are training text: none is held out (the hash split would keep about 3% of them from training),
    # and none is made into a question about a Python module.
    text = [r["text"] for r in read_jsonl(data_dir / "text.jsonl")]
    assert sum(USER_TEXT in t for t in text) == 1
    assert not any(USER_TEXT in r["text"] for r in read_jsonl(data_dir / "eval_text.jsonl"))
    assert not any("gulliver" in json.dumps(r) for r in read_jsonl(data_dir / "sft.jsonl"))
    held = next(f"My notes, page {i}." for i in range(1000) if prepare_data.is_held_out(f"My notes, page {i}."))
    (tmp_path / "held.txt").write_text(held)  # a text the docstrings' hash split would hold out
    prepare_data.main(["--out", str(tmp_path / "h"), "--n", "1", "--text", str(tmp_path / "held.txt")])
    assert held in [r["text"] for r in read_jsonl(tmp_path / "h" / "text.jsonl")]
    assert held not in [r["text"] for r in read_jsonl(tmp_path / "h" / "eval_text.jsonl")]
    out = ["--out", str(tmp_path / "d"), "--n", "1"]
    for name, content, message in (("latin.txt", "Caf\xe9".encode("latin-1"), r"latin.txt is not UTF-8 text \(byte "
                                                                              r"0xe9 at line 1"),
                                   ("empty.txt", b" \n", "empty.txt is empty"),
                                   ("utf16.txt", "A line\nmore".encode("utf-16-le"), r"utf16.txt is not UTF-8 text "
                                                                                     r"\(a NUL byte at line 1: UTF-16"),
                                   ("tags.txt", IMAGE_TAG.encode(), "tags.txt holds <image_placeholder>, which a model "
                                                                    "reads as an image's place")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit):  # argparse's error: usage, then the message, on stderr
            prepare_data.main(out + ["--text", str(tmp_path / name)])
        assert re.search(message, capsys.readouterr().err), message
    assert not os.path.exists(tmp_path / "d") and not os.path.exists(tmp_path / "d.partial")


def test_bad_arguments_are_named_before_anything_is_written(tmp_path, capsys):
    out = ["--out", str(tmp_path / "d"), "--n", "1"]
    for args, message in ((["--image-size", "128"], "--image-size must be at least 256, the smallest preset's canvas"),
                          (["--image-size", "4097"], "--image-size must be at most 4096"),  # 100000: out of memory
                          (["--text", os.devnull], f"--text {os.devnull} is not a regular file; expected a text file"),
                          (["--llava", "l.json", "--images", str(tmp_path), "--image-size", "512", "--text", "a.txt",
                            "--config", "small"],  # (and out's --n 1) would be ignored by an import
                           "--config, --n, --image-size, --text: not for --llava, which imports"),
                          (["--llava", "l.json", "--images", str(tmp_path), "--seed", "5", "--show", "1",
                            "--tokenizer", "t.json"], "--n, --seed, --show, --tokenizer: not for --llava"),
                          (["--show", "-1"], "--show must be at least 0, got -1"),
                          (["--text", str(tmp_path)], "is a folder; expected text files"),
                          (["--text", str(tmp_path / "latin.txt")], "latin.txt does not exist"),
                          (["--images", str(tmp_path)], "--images is for --llava"),
                          (["--show", "1", "--config", "small"],  # the way to make it is for that preset
                           r"holds no prepared data; make it first \(prepare_data.py --config small --out .*d\)")):
        with pytest.raises(SystemExit):
            prepare_data.main(out + args)
        assert re.search(message, capsys.readouterr().err), (args, message)
    assert not os.path.exists(tmp_path / "d")


def test_a_malformed_row_is_named_by_its_file_and_line(data_dir, tmp_path):
    tok = Tokenizer.load(data_dir / "tokenizer.json")
    path = tmp_path / "rows.jsonl"
    good = {"text": f"{IMAGE_TAG} A red square.", "images": ["a.png"]}
    chat = {"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    for kind, bad, why in [
        ("pretrain", {"images": []}, "no 'text' field; a pretrain row is {\"text\""),
        ("pretrain", dict(good, images="a.png"), "'images' must be a list of paths, got 'a.png'"),
        ("pretrain", dict(good, images=[]), f"1 {IMAGE_TAG} tags but 0 images"),
        ("pretrain", dict(good, images=["a.png", "b.png"]), f"1 {IMAGE_TAG} tags but 2 images"),
        ("pretrain", dict(good, images=[""]), "'images' must be a list of paths, got ['']"),  # (the folder itself)
        ("text", {"text": 3}, "'text' must be a string, got int"),
        # a text row is read without images: a tag in one used to stop stage 2 mid-run, deep in the model
        ("text", {"text": f"hello {IMAGE_TAG} world"}, f"a text row has no images, but this one has 1 {IMAGE_TAG} "
                                                       "tags and 0 images"),
        ("text", {"text": "hello", "images": ["a.png"]},
         f"a text row has no images, but this one has 0 {IMAGE_TAG} tags and 1 images"),
        ("sft", {"conversation": chat["conversation"][::-1]}, "message 0 has role 'assistant', expected 'user'"),
        ("sft", {"conversation": chat["conversation"][:1]}, "the conversation has no assistant turn: nothing to learn"),
        ("sft", {"conversation": 5}, "the conversation must be a list of messages, got int"),
    ]:
        first = {"pretrain": good, "text": {"text": "A red square."}, "sft": chat}[kind]
        path.write_text(json.dumps(first) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError) as e:
            Source(read_jsonl(str(path), origin=True), kind, tok, 36, 512)
        assert str(e.value).startswith(f"{path}, line 2: {why}"), str(e.value)
    path.write_text(json.dumps(good) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match="line 2: expected a JSON object, got list"):
        read_jsonl(str(path), origin=True)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + "\n{\"text\": \"caf\u00e9\"}".encode("latin-1"))
    with pytest.raises(ValueError, match=r"rows.jsonl is not UTF-8 text \(byte 0xe9 at line 2: .*\); save it as UTF-8"):
        read_jsonl(str(path))  # (line 1's byte-order mark is fine)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good)[:20] + "\n")  # a line cut short: where in it, too
    with pytest.raises(ValueError, match=r"rows.jsonl, line 2: not valid JSON: Unterminated string starting at "
                                         r"column 10$"):
        read_jsonl(str(path))
    path.write_text(json.dumps(good) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"rows.jsonl, line 2: not valid JSON: nested too deeply"):
        read_jsonl(str(path))
    path.write_bytes((json.dumps(good) + "\r" + json.dumps(good) + "\r").encode())  # old Mac line ends: one line
    with pytest.raises(ValueError, match=r"line 1: not valid JSON: Extra data at column \d+; its lines end in \\r "
                                         r"alone, where JSON Lines needs \\n$"):
        read_jsonl(str(path))
    from nanovl.llava import iter_json_rows

    [(where, error)] = list(iter_json_rows(str(path)))  # the LLaVA import's reader says the same
    assert where == "line 1" and str(error).endswith("its lines end in \\r alone, where JSON Lines needs \\n")
    # Windows line ends (\r\n) are not that: a bad line there is named without the remark, and a line of spaces
    # alone is skipped as an empty one is.
    path.write_bytes((json.dumps(good) + "\r\n   \r\n" + json.dumps(good) + "}\r\n").encode())
    with pytest.raises(ValueError, match=r"rows.jsonl, line 3: not valid JSON: Extra data at column \d+$"):
        read_jsonl(str(path))
    path.write_bytes((json.dumps(good) + "\r\n \t \n" + json.dumps(good) + "\r\n").encode())
    assert read_jsonl(str(path)) == [good, good]


def test_a_row_that_cannot_be_written_leaves_neither_a_temporary_nor_a_changed_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(str(path), [{"a": 1}])
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_jsonl(str(path), [{"a": 2}, {"b": object()}])
    assert os.listdir(tmp_path) == ["rows.jsonl"] and read_jsonl(str(path)) == [{"a": 1}]


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA import

def test_a_llava_row_becomes_the_row_llava_means():
    """llava_row alone, on the variants other datasets write: what each becomes, or why it is refused."""
    from nanovl.llava import llava_row
    row = lambda **kw: llava_row(kw, "imgs", lambda path: None)  # images_dir relative, no image read
    ask = lambda q, a, who=("human", "gpt"): [{"from": who[0], "value": q}, {"from": who[1], "value": a}]
    kind, chat = row(image="a.png", conversations=ask("<image>\nWhat is it?", "A cat."))
    assert kind == "sft" and chat["images"] == [os.path.abspath(os.path.join("imgs", "a.png"))]  # absolute: the
    assert chat["conversation"] == [{"role": "user", "content": f"{IMAGE_TAG}\nWhat is it?"},  # folder may move
                                    {"role": "assistant", "content": "A cat."}]
    assert row(image="a.png", conversations=ask("<image>\nWhat is it?", "A cat.", ("user", "assistant"))) == \
        (kind, chat)  # the role names newer exports write
    assert row(image="a.png", conversations=ask("<image>\nWhat is it?", "A cat.", ("USER", "Gpt"))) == (kind, chat)
    assert row(image="a.png", conversations=ask("", "Welcome!")[1:] + ask("<image>\nWhat is it?", "A cat.")) == \
        (kind, chat)  # a first turn that is not a question: dropped, as LLaVA's own loader drops it
    assert row(image="a.png", conversations=ask("What is it?", "A cat.")) == (kind, chat)  # the tag LLaVA implies
    for placed in ("What is it?\n<image>", "  What is it? <image>  ", "<image>\n\n  What is it?"):  # as LLaVA
        assert row(image="a.png", conversations=ask(placed, "A cat.")) == (kind, chat)  # moves it: to the front
    two = row(image=["a.png", "b.png"], conversations=ask("This <image> or <image>?", "The first."))[1]
    assert two["conversation"][0]["content"] == f"This {IMAGE_TAG} or {IMAGE_TAG}?"  # several: where they stand
    assert row(image="a.png", conversations=ask("<image>\nWhat is it?", "A cat.") + ask("And?", "")[:1]) == \
        (kind, chat)  # a last question without its answer teaches nothing: dropped
    assert row(image="a.png", conversations=ask("<image>\nWhat is it?", "A cat.") + ask(" ", "")[:1]) == (kind, chat)
    assert row(images=["a.png"], conversations=ask("<image>\nWhat is it?", "A cat.")) == (kind, chat)  # other sets'
    assert row(image=None, images="a.png", conversations=ask("What is it?", "A cat.")) == (kind, chat)  # field name
    text_only = row(image=None, image_id="none", id="a.png", conversations=ask("Hi", "Hello"))  # no image's name
    assert text_only[1]["images"] == []
    # captions, under "caption" or "text", stripped, the image before them
    assert row(image="a.png", text="  a cat on a mat \n") == ("pretrain", {"category": "caption", "images": chat[
        "images"], "text": f"{IMAGE_TAG}a cat on a mat"})
    for empty in [dict(caption=None), dict(caption=""), dict(caption="  "), dict(conversations=None)]:  # (null fields,
        # as exports write them, and empty ones)
        assert row(image="a.png", text="  a cat on a mat \n", **empty) == row(image="a.png", text="a cat on a mat")
    # --captions: a one-question chat is its answer, stripped; unless the answer itself holds an image
    assert llava_row({"image": "a.png", "conversations": ask("What is it?", " A cat. ")}, "imgs", lambda p: None,
                     as_captions=True)[1]["text"] == f"{IMAGE_TAG}A cat."
    assert llava_row({"image": "a.png", "conversations": ask("What is it?", "Like <image>.")}, "imgs",
                     lambda p: None, as_captions=True)[0] == "sft"
    for bad, why in [(dict(image=["a.png", ""], text="a cat"),
                      "'image' must be a path or a list of paths, got ['a.png', '']"),
                     (dict(text="a cat"), "a caption row needs exactly one image, got 0"),
                     (dict(image=["a.png", "b.png"], conversations=ask("Compare them.", "Same.")),
                      "0 <image> tags but 2 images"),
                     (dict(image=["a.png", "b.png"], conversations=ask("<image> and this?", "Same.")),
                      "1 <image> tags but 2 images"),
                     (dict(image="a.png", conversations=ask(f"<image> and {IMAGE_TAG}?", "Same.")),
                      f"2 <image> tags but 1 images ({IMAGE_TAG} written in the text counts as one)"),
                     (dict(image="a.png", caption=f"<image> a {IMAGE_TAG}"),
                      f"its caption has 2 <image> tags ({IMAGE_TAG} written in the text counts as one)"),
                     (dict(image="a.png", caption="   "), "no 'conversations' and no non-empty 'caption' or 'text'"),
                     (dict(images=["a.png"], conversation=[{"role": "user", "content": "Hi"}]),
                      "no 'conversations' and no non-empty 'caption' or 'text' (a 'conversation' of role and content "
                      "turns is nanovl's own row: train.py reads a folder of those as it is, with --extra_data"),
                     (dict(image="a.png", caption=["a red box", "a red square"]),  # (some COCO exports)
                      "'caption' must be a string, got list ['a red box', 'a red square']; write a row for each"),
                     (dict(image="a.png", caption=None, text=3), "'text' must be a string, got int 3"),
                     (dict(image="a.png", conversations=[{"from": "human", "value": None}]), "turn 0 must be"),
                     (dict(image="a.png", conversations=[{"from": "system", "value": "Be brief."}] +
                           ask("<image>What is it?", "A cat.")),
                      "turn 0 must be {'from': 'human' or 'gpt' (or 'user', 'assistant')"),
                     (dict(image="a.png", conversations=ask("", "<image> Look.")[1:] + ask("What is it?", "A cat.")),
                      "the first turn, an answer with no question, holds an <image> tag"),
                     (dict(image="a.png", conversations=ask("What is it?", "A cat.")[:1]),
                      "a question with no answer: nothing to learn from"),
                     (dict(image="a.png", conversations=ask("What is it?", "A cat.")[1:]),
                      "an answer with no question: nothing to learn from"),
                     # after a first answer is dropped, the messages counted are not the row's turns: said
                     (dict(image="a.png", conversations=ask("", "Hi!")[1:] + ask("<image>Q", "A") + ask("Q2", " ")),
                      "message 3 (assistant) is empty (counted from the first question: the answer before it was "
                      "dropped)"),
                     # dropping the last question would move its image to the first one
                     (dict(image="a.png", conversations=ask("Hello", "Hi!") + ask("<image>\nWhat is it?", "")[:1]),
                      "the last question, which has no answer, holds an <image> tag"),
                     (dict(image=["a.png"], images=["b.png"], text="a cat"), "both 'image' and 'images'"),
                     (dict(images=[3], text="a cat"), "'images' must be a path or a list of paths, got [3]"),
                     (dict(image="http://example.com/a.png", text="a cat"),
                      "image 'http://example.com/a.png' is a web address: download the images"),
                     # images under a name the import does not read were dropped, the chat kept as text-only
                     (dict(image=None, image_path="a.png", conversations=ask("Describe it.", "Red.")),
                      "the row names images under 'image_path', a field this import does not read: expected 'image'"),
                     (dict(image=None, Images=["a.png"], conversations=ask("<image>Describe it.", "Red.")),
                      "the row names images under 'Images'"),
                     (dict(image=None, img="photos/A.JPG", conversations=ask("Describe it.", "Red.")),
                      "the row names images under 'img'")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            row(**bad)


def test_llava_import_keeps_good_rows_and_reports_bad_ones(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(images / "a.png")
    Image.new("RGB", (20, 20), (10, 200, 10)).save(images / "b.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = {"id": "1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}
    rows = [
        good,                                                                          # kept
        {"image": "b.jpg", "caption": "A green square."},                              # kept (caption pair)
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},  # kept
        {"image": "b.jpg", "conversations": [{"from": "human", "value": "No tag here"},
                                             {"from": "gpt", "value": "Fine."}]},     # kept, tag added
        {"image": "missing.png", "conversations": good["conversations"]},              # missing image
        {"image": "broken.jpg", "conversations": good["conversations"]},               # unreadable image
        {"image": "a.png", "conversations": "not a list"},                             # malformed
        {"image": "a.png", "conversations": [{"from": "human", "value": "Hi"}] * 2},   # wrong roles
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>two?"},
                                             {"from": "gpt", "value": "one"}]},       # 2 tags, 1 image
        ["not", "an", "object"],                                                       # not an object
    ]
    path = tmp_path / "llava.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")  # row k on line k + 2
    out = tmp_path / "out"
    summary = import_llava(str(path), str(images), str(out))
    assert "10 rows read, 3 conversations (2 with images) and 1 captions kept, 6 skipped" in summary
    report = (out / "report.txt").read_text()
    for line, reason in [(6, "missing.png does not exist"), (7, "cannot read image"), (8, "must be a non-empty list"),
                         (9, "role 'user', expected 'assistant'"), (10, "2 <image> tags but 1 images"),
                         (11, "expected an object")]:
        where = f"skipped row {line - 1}, line {line}: "
        assert where in report and reason in report.split(where)[1]
    sft = read_jsonl(out / "sft.jsonl")
    assert sft[0]["conversation"][0]["content"] == IMAGE_TAG + "\nWhat colour is it?"
    assert sft[0]["images"] == [str(images / "a.png")]
    assert sft[2]["conversation"][0]["content"].startswith(IMAGE_TAG)
    assert read_jsonl(out / "pretrain.jsonl")[0]["text"] == IMAGE_TAG + "A green square."
    # --captions: a one-question chat about one image is a caption (LLaVA-Pretrain's rows); the others stay chats
    summary = import_llava(str(path), str(images), str(out), as_captions=True)
    assert "10 rows read, 2 conversations (1 with images) and 2 captions kept, 6 skipped" in summary
    captions = [r["text"] for r in read_jsonl(out / "pretrain.jsonl")]
    assert captions == [IMAGE_TAG + "A green square.", IMAGE_TAG + "Fine."]
    assert [len(r["conversation"]) for r in read_jsonl(out / "sft.jsonl")] == [4, 2]  # multi-turn; no image
    # --images, a folder where none of the images named are: the wrong one, most likely (LLaVA-1.5's images are in
    # subfolders, coco/..., of the folder to give). Refused, rather than keep the rows without an image alone in
    # place of the earlier import.
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    with pytest.raises(ValueError, match=r"none of the 4 images the rows name is in .*tmp.* \(the first: .*a.png\): is "
                                         r"--images the folder the file's image paths are relative to\? Nothing was "
                                         r"written$"):
        import_llava(str(path), str(tmp_path), str(out))
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_an_import_that_cannot_be_written_says_so_in_a_line_and_leaves_nothing(tmp_path, monkeypatch):
    import nanovl.llava
    ok = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ok) + "\n")
    (tmp_path / "file").write_text("")
    checked = []
    monkeypatch.setattr(nanovl.llava, "check_images", lambda paths, workers: checked.append(paths) or {})
    with pytest.raises(ValueError, match=r"cannot write .*file/d.partial, where the import is written before it is "
                                         r"moved to .*file/d: Not a directory"):
        import_llava(str(path), str(tmp_path), str(tmp_path / "file" / "d"))
    assert not checked  # said before any image was read
    plain = nanovl.llava.write_jsonl

    def full(p, rows):  # a disk that fills up while pretrain.jsonl is written
        if p.endswith("pretrain.jsonl"):
            raise OSError(28, "No space left on device", p)
        plain(p, rows)

    monkeypatch.setattr(nanovl.llava, "write_jsonl", full)
    for out in (tmp_path / "new", tmp_path / "earlier"):
        if out.name == "earlier":  # an earlier import there: its files stay as they were
            monkeypatch.setattr(nanovl.llava, "write_jsonl", plain)
            import_llava(str(path), str(tmp_path), str(out))
            before = {f: (out / f).read_bytes() for f in os.listdir(out)}
            monkeypatch.setattr(nanovl.llava, "write_jsonl", full)
        with pytest.raises(ValueError, match=rf"cannot write .*{out.name}.partial/pretrain.jsonl: No space left on "
                                             rf"device; .*{out.name} is as it was"):
            import_llava(str(path), str(tmp_path), str(out))
        assert not os.path.exists(f"{out}.partial")
        after = {f: (out / f).read_bytes() for f in os.listdir(out)} if out.exists() else None
        assert after is None if out.name == "new" else after == before


def test_a_rebuild_names_the_arguments_that_changed():
    was = {"version": prepare_data.VERSION, "config": "tiny", "n": 6, "seed": 0, "image_size": 0, "text": {"a": "1"}}
    assert prepare_data.changed_arguments(was, dict(was, n=5, image_size=256, text={})) == \
        "--n 6 -> 5, --image-size the preset's -> 256, --text (none now)"
    assert prepare_data.changed_arguments(dict(was, text={}), dict(was, seed=1)) == "--seed 0 -> 1, --text (given now)"
    assert prepare_data.changed_arguments(was, dict(was, text={"a": "2"})) == \
        "--text (other files, or their text changed)"


def test_llava_json_lines_with_a_broken_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    ok = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    path.write_text(json.dumps(ok) + "\n{broken\n" + json.dumps(ok) + "\n")
    summary = import_llava(str(path), str(tmp_path), str(tmp_path / "out"))
    assert "3 rows read, 2 conversations (0 with images) and 0 captions kept, 1 skipped; written to" in summary
    assert "skipped line 2: not valid JSON: Expecting property name enclosed in double quotes at column 2" in \
        (tmp_path / "out" / "report.txt").read_text()
    # Turns a kept chat loses (an answer before any question, a last question left unanswered) are counted
    opened, unanswered = ({"conversations": [{"from": "gpt", "value": "Hello"}] + ok["conversations"]},
                          {"conversations": ok["conversations"] + [{"from": "human", "value": "And?"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in [ok, opened, unanswered, unanswered]))
    assert ("4 rows read, 4 conversations (0 with images) and 0 captions kept, 0 skipped; turns dropped from rows "
            "kept: 1 opening answers (no question before them), 2 last questions (no answer after them); written to"
            ) in import_llava(str(path), str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="does not exist"):
        import_llava(str(tmp_path / "nope.json"), str(tmp_path), str(tmp_path / "out"))


def test_llava_array_on_one_line_names_rows_by_index_and_id_and_reads_in_linear_time(tmp_path, monkeypatch):
    ok = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    rows = [dict(ok, id=str(i)) for i in range(4)] + [{"id": "bad", "conversations": []}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))  # as json.dump writes it: one line
    summary = import_llava(str(path), str(tmp_path), str(tmp_path / "out"))
    assert "5 rows read, 4 conversations (0 with images) and 0 captions kept, 1 skipped" in summary
    assert "skipped row 5, line 1 (id 'bad'): 'conversations' must be a non-empty list" in \
           (tmp_path / "out" / "report.txt").read_text()
    # A broken array: the rows before the break are kept, and the summary says where the rest was lost.
    path.write_text(json.dumps(rows[:3])[:-1] + ", {broken")
    summary = import_llava(str(path), str(tmp_path), str(tmp_path / "out"))
    assert "4 rows read, 3 conversations" in summary and "The file is broken: row 4, line 1: not valid JSON: " \
        "Expecting property name enclosed in double quotes at line 1, column 306; the rest of the file was not " \
        "read" in summary
    # Nothing to keep is an error, and nothing is written.
    path.write_text("[]")
    with pytest.raises(ValueError, match="no row to keep .0 read.; nothing was written"):
        import_llava(str(path), str(tmp_path), str(tmp_path / "empty"))
    assert not (tmp_path / "empty").exists()
    # Linear in the rows: the line of each row is counted on from the one before, not from the top of the file. The
    # file's text counts the characters its newline counts scan: each at most once.
    import nanovl.llava
    scanned = []

    class Counted(str):
        def count(self, sub, start=0, end=None):
            end = len(self) if end is None else end
            scanned.append(end - start)
            return str.count(self, sub, start, end)

    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in [ok] * 2000) + "\n]")  # a row a line, 2000 lines
    monkeypatch.setattr(nanovl.llava, "read_text", lambda p: Counted(open(p, encoding="utf-8").read()))
    wheres = [where for where, _ in nanovl.llava.iter_json_rows(str(path))]
    assert len(wheres) == 2000 and wheres[-1] == "row 2000, line 2001"
    # (every row's line is counted by str.count, watched here: a count made another way, as on a slice, which a
    # str subclass does not keep, would leave this test blind, and fails it instead)
    assert len(scanned) >= 2000 and sum(scanned) <= len(path.read_text())  # quadratic: about 2000 x the file / 2


def test_llava_files_as_other_tools_write_them(tmp_path):
    """Valid JSON that other tools write is read whole; a broken array says where it breaks; text that cannot be
    stored is one skipped row, not a failed import."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    chat = {"conversations": [{"from": "human", "value": "Hi\u2028there"}, {"from": "gpt", "value": "Yo"}]}
    out = str(tmp_path / "out")

    def run(text: str, **kw):
        (tmp_path / "rows.json").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return import_llava(str(tmp_path / "rows.json"), str(tmp_path), out, **kw)

    # JSON lines with a raw U+2028 (what json.dumps(ensure_ascii=False) writes) and a byte-order mark: 2 rows
    lines = "\n".join(json.dumps(row, ensure_ascii=False) for row in (chat, dict(chat, image=None)))  # null: none
    assert "2 rows read, 2 conversations" in run("\ufeff" + lines)
    assert read_jsonl(f"{out}/sft.jsonl")[0]["conversation"][0]["content"] == "Hi\u2028there"
    assert "1 rows read, 1 conversations" in run("\ufeff" + json.dumps([chat]))
    # captions: LLaVA's <image> tag becomes ours where it stands; one with two tags, or half a character, is skipped
    caption = {"image": "a.png", "caption": "<image> A square."}
    summary = run(json.dumps([caption, dict(caption, caption="<image><image>"), dict(caption, caption="\ud83d!"),
                              dict(chat, id="half", conversations=[{"from": "human", "value": "\ud83d"},
                                                                   {"from": "gpt", "value": "ok"}])]))
    assert "4 rows read, 0 conversations and 1 captions kept, 3 skipped" in summary
    assert read_jsonl(f"{out}/pretrain.jsonl")[0]["text"] == IMAGE_TAG + " A square."
    report = open(f"{out}/report.txt").read()
    assert "row 2, line 1: a caption row has one image, but its caption has 2 <image> tags" in report
    assert "row 3, line 1: the text holds half of a character" in report
    assert "row 4, line 1 (id 'half'): the text holds half of a character" in report
    # arrays that break: the rows before are kept, and the summary says where
    rows = json.dumps([chat, chat])
    for text, n, broken in [(rows + rows, 2, "line 1: more after the array's closing ]"),
                            (rows + "x", 2, "line 1: more after the array's closing ] ('x'"),
                            (rows[:-1], 2, "after row 2, line 1: the file ends before the array's closing ] (was it "
                                           "cut short?)"),
                            (f"[{json.dumps(chat)} {json.dumps(chat)}]", 1, "after row 1, line 1: expected ',' or ']' "
                                                                            "after the row"),
                            ("[\n" + rows[1:] + "\n\n{}", 2, "line 4: more after the array's closing ]")]:
        summary = run(text)  # what stands between or after the rows is no row: not counted as one read or skipped
        assert f"{n} rows read, {n} conversations (0 with images) and 0 captions kept, 0 skipped" in summary, \
            (text, summary)
        assert f"The file is broken: {broken}" in summary and summary in open(f"{out}/report.txt").read()
    assert "1 rows read, 1 conversations" in run(f"[{json.dumps(chat)},\n]")  # a trailing comma loses nothing
    # two rows on one line: a bad line, not rows over several lines
    assert "2 rows read, 1 conversations (0 with images) and 0 captions kept, 1 skipped" in run(
        json.dumps(chat) + json.dumps(chat) + "\n" + json.dumps(chat))
    # files that are not rows at all: an error naming the file, and nothing written over the last import
    before = open(f"{out}/sft.jsonl").read()
    for text, error in [(json.dumps({"data": [chat]}, indent=2), "holds one JSON object .keys data., expected a JSON"),
                        (json.dumps({"data": [chat], "info": {}}), r"rows.json holds one JSON object \(keys data, "
                                                                   r"info\), expected a JSON array of rows or one row "
                                                                   r"a line$"),  # one line: read as one row first
                        (json.dumps({"image": "a.png"}), r"no row to keep \(1 read; the first skipped: line 1: no "
                                                         r"'conversations' and no non-empty 'caption'"),  # a row: said
                        (json.dumps(chat, indent=2), r"holds one JSON object \(keys .*\), expected a JSON array of "
                                                     r"rows or one row a line \(one row over several lines\? put it in "
                                                     r"\[ \]\)$"),  # one row, pretty-printed
                        (json.dumps(chat, indent=2) + "\n" + json.dumps(chat, indent=2),  # jq '.[]' without -c
                         r"rows.json holds rows written over several lines \(as jq '.\[\]' prints them\): expected a "
                         r"JSON array of rows, or one row a line \(jq -c\)$"),
                        (json.dumps([{"data": [chat]}]), r"no row to keep \(1 read; the first skipped: row 1, line 1: "
                                                         r"no 'conversations'"),  # a row in an array, however odd
                        ("[{}]".encode() + "\n\u00e9".encode("latin-1"), "rows.json is not UTF-8 text .byte 0xe9 at "
                                                                         "line 2"),
                        (gzip.compress(json.dumps([chat]).encode()), "rows.json is a gzip-compressed file, not text: "
                                                                     "decompress it first$")]:  # as downloaded
        with pytest.raises(ValueError, match=error):
            run(text)
    assert open(f"{out}/sft.jsonl").read() == before


def test_a_file_this_user_may_not_read_is_said_to_be_unreadable(tmp_path, monkeypatch):
    # The import's OSError handler is for an --out it cannot write; a LLaVA file it may not read was said as one it
    # "cannot write". Root reads any file, so open plays the refusal here (a chmod 000 file, read by another user,
    # was checked by hand).
    import builtins
    import nanovl.data
    rows = tmp_path / "rows.json"
    rows.write_text("[]")

    def denying(path, *args, **kwargs):
        if str(path) == str(rows):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(nanovl.data, "open", denying, raising=False)
    with pytest.raises(SystemExit, match=rf"^cannot read {re.escape(str(rows))}: Permission denied \(the user running "
                                         r"this may not read it\)$"):
        prepare_data.main(["--llava", str(rows), "--images", str(tmp_path), "--out", str(tmp_path / "imp")])
    assert not (tmp_path / "imp").exists()
    with pytest.raises(ValueError, match="^cannot read .*rows.json: Permission denied"):  # rows of a stage, alike
        read_jsonl(str(rows))


def test_images_are_checked_alike_in_one_process_or_several(tmp_path, monkeypatch):
    from nanovl.data import check_images
    paths = []
    for i in range(1000):  # the pool is used from 1000 images on
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (2, 2), (i % 256, 0, 0)).save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    paths += [str(tmp_path / "broken.png"), str(tmp_path / "missing.png"), paths[0]]  # a repeat is checked once
    import multiprocessing
    pools, real_pool = [], multiprocessing.Pool
    monkeypatch.setattr(multiprocessing, "Pool", lambda n, **k: pools.append(n) or real_pool(n, **k))
    one, two = check_images(paths, workers=1), check_images(paths, workers=2)
    assert pools == [2] and one == two and len(one) == 1002  # the second in a pool of two processes
    broken = [str(tmp_path / "broken.png"), str(tmp_path / "missing.png")]
    assert sorted(p for p, error in one.items() if error) == broken


def test_show_renders_samples_with_the_folders_tokenizer_or_a_given_one(data_dir, tmp_path, capsys):
    prepare_data.main(["--out", str(data_dir), "--show", "2"])
    shown = capsys.readouterr().out
    assert shown.count("--- pretrain / ") == 2 and shown.count("--- sft / ") == 2 and "⟦" in shown
    # a LLaVA import has no tokenizer of its own: --show asks for one, then renders with it
    rows = tmp_path / "rows.json"
    chat = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    rows.write_text(json.dumps([{"conversations": chat}]))
    prepare_data.main(["--llava", str(rows), "--images", str(tmp_path), "--out", str(tmp_path / "imp")])
    with pytest.raises(SystemExit):
        prepare_data.main(["--out", str(tmp_path / "imp"), "--show", "1"])
    assert "pass --tokenizer" in capsys.readouterr().err
    prepare_data.main(["--out", str(tmp_path / "imp"), "--show", "1", "--tokenizer",
                       os.path.join(data_dir, "tokenizer.json")])
    shown = capsys.readouterr().out
    assert "--- sft / llava / no image" in shown and "⟦ Hello" in shown
    (tmp_path / "imp" / "sft.jsonl").write_text(json.dumps({"conversation": [{"role": "user", "content": "Hi"}, {
        "role": "assistant", "content": "Hello"}]}) + "\n")  # a row of one's own: no category, no images
    prepare_data.main(["--out", str(tmp_path / "imp"), "--show", "1", "--tokenizer",
                       os.path.join(data_dir, "tokenizer.json")])
    assert "--- sft / - / no image" in capsys.readouterr().out
    # A malformed row of one's own is named by its file and line (it was a KeyError's traceback), an empty file said
    given = ["--out", str(tmp_path / "imp"), "--show", "1", "--tokenizer", os.path.join(data_dir, "tokenizer.json")]
    for row, why in [({"images": []}, "line 1: no 'text' field; a pretrain row is"),
                     ({"text": 5}, "line 1: 'text' must be a string, got int"),
                     (["a"], "line 1: expected a JSON object")]:
        (tmp_path / "imp" / "pretrain.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'imp' / 'pretrain.jsonl'}, {why}")):
            prepare_data.main(given)
    (tmp_path / "imp" / "pretrain.jsonl").write_text("")
    prepare_data.main(given)
    assert f"--- pretrain: {tmp_path / 'imp' / 'pretrain.jsonl'} holds no rows" in capsys.readouterr().out
    (tmp_path / "pictures").mkdir()  # a folder of pictures alone: no rows (the tokenizer was said to be missing)
    (tmp_path / "imp" / "pretrain.jsonl").rename(tmp_path / "pictures" / "a.png")
    with pytest.raises(SystemExit):
        prepare_data.main(["--out", str(tmp_path / "pictures"), "--show", "1"])
    assert "--show: " + str(tmp_path / "pictures") + " holds no rows to show" in capsys.readouterr().err


def test_an_import_into_a_symlinked_out_goes_to_the_folder_it_points_to(tmp_path, capsys):
    # as a build of the synthetic corpus does (it was refused as "Not a directory", the link's .partial beside it)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}))
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(tmp_path / "later", tmp_path / "dangling")  # (a link to a folder not made yet)
    os.symlink(tmp_path / "real2", tmp_path / "link2")
    for link, folder in (("link", "real"), ("dangling", "later"), ("link2/", "real2")):  # ("link2/": named with a /)
        prepare_data.main(["--llava", str(rows), "--images", str(tmp_path), "--out", os.path.join(tmp_path, link)])
        link = link.rstrip("/")
        assert "1 conversations (0 with images) and 0 captions kept" in capsys.readouterr().out
        assert os.path.islink(tmp_path / link) and read_jsonl(tmp_path / folder / "sft.jsonl")[0]["conversation"]


def test_a_build_into_a_symlinked_out_named_with_a_slash_goes_to_the_folder_it_points_to(tmp_path, capsys):
    # "link/" is no link to os.path.islink: the build made link.partial/ and was refused, the link a folder already
    os.symlink(tmp_path / "real", tmp_path / "link")
    prepare_data.main(["--out", str(tmp_path / "link") + "/", "--n", "1", "--workers", "1"])
    assert "wrote " in capsys.readouterr().out and os.path.islink(tmp_path / "link")
    assert sorted(os.listdir(tmp_path)) == ["link", "real"] and (tmp_path / "real" / "tokenizer.json").exists()


def test_no_folder_is_written_over_unless_this_script_made_it_for_the_same_purpose(data_dir, tmp_path):
    """prepare_data.py rebuilds only its own synthetic folders, an import replaces only an earlier import, and
    neither ever touches a folder something else made."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    with pytest.raises(SystemExit, match="already holds files that prepare_data.py did not make"):
        prepare_data.main(["--out", str(mine), "--n", "2"])
    (mine / "meta.json").write_text('{"identity": {"vers')  # a corpus whose meta.json was cut short: named as such
    with pytest.raises(SystemExit, match="holds a meta.json that is not one prepare_data.py writes .cut short"):
        prepare_data.main(["--out", str(mine), "--n", "2"])
    (mine / "meta.json").unlink()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}))
    with pytest.raises(SystemExit, match="holds files that no LLaVA import made"):
        prepare_data.main(["--llava", str(rows), "--images", str(tmp_path), "--out", str(mine)])
    with pytest.raises(SystemExit, match="--out .*thesis.txt is a file: expected a folder for the import"):
        prepare_data.main(["--llava", str(rows), "--images", str(tmp_path), "--out", str(mine / "thesis.txt")])
    with pytest.raises(SystemExit, match="cannot write .*thesis.txt"):  # (the build's lock goes beside the folder)
        prepare_data.main(["--llava", str(rows), "--images", str(tmp_path), "--out", str(mine / "thesis.txt" / "x")])
    assert os.listdir(mine) == ["thesis.txt"] and (mine / "thesis.txt").read_text() == "precious"
    before = folder_digest(data_dir)
    with pytest.raises(SystemExit, match="holds prepare_data.py's synthetic corpus"):
        prepare_data.main(["--llava", str(rows), "--images", str(tmp_path), "--out", str(data_dir)])
    assert folder_digest(data_dir) == before
    out = tmp_path / "imported"
    assert "replacing" not in import_llava(str(rows), str(tmp_path), str(out))
    # What the README says to put beside an import (questions of your own, their images) stays when it is replaced.
    (out / "eval_mc.jsonl").write_text("mine")
    (out / "img").mkdir()
    (out / "img" / "0.png").write_text("mine too")
    rows.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}))
    said = import_llava(str(rows), str(tmp_path), str(out))  # an earlier import is replaced, and that is said
    assert said.endswith(f"written to {out}, replacing the import of {rows} made there before")
    assert said in (out / "report.txt").read_text()
    assert sorted(os.listdir(out)) == ["eval_mc.jsonl", "img", "meta.json", "pretrain.jsonl", "report.txt", "sft.jsonl"]
    assert read_jsonl(out / "sft.jsonl")[0]["conversation"][1]["content"] == "Hey"
    assert (out / "eval_mc.jsonl").read_text() == "mine" and (out / "img" / "0.png").read_text() == "mine too"
    assert not os.path.exists(f"{out}.partial")
    # The folder an import is written in first is cleared only if it holds nothing but an import's files.
    os.makedirs(f"{out}.partial")
    open(f"{out}.partial/thesis.txt", "w").close()
    with pytest.raises(ValueError, match="holds files an import does not write; move it out of the way"):
        import_llava(str(rows), str(tmp_path), str(out))
    assert os.listdir(f"{out}.partial") == ["thesis.txt"]
    os.remove(f"{out}.partial/thesis.txt")
    open(f"{out}.partial/sft.jsonl.tmp4321", "w").close()  # what an import killed while writing leaves: cleared
    import_llava(str(rows), str(tmp_path), str(out))
    assert not os.path.exists(f"{out}.partial")
    with pytest.raises(SystemExit, match="holds a LLaVA import"):
        prepare_data.main(["--out", str(out), "--n", "2"])
    # An empty folder is as good as none; a meta.json without prepare_data.py's identity is someone else's.
    (tmp_path / "empty").mkdir()
    assert [folder_kind(str(tmp_path / name)) for name in ("empty", "nowhere", "rows.jsonl")] == \
        ["missing", "missing", "file"]
    (mine / "meta.json").write_text('{"identity": {"seed": 1}}')
    assert (folder_kind(str(mine)), folder_kind(str(data_dir))) == ("other", "synthetic")


# ---------------------------------------------------------------------------------------------------------------------
# Samples, batches and the plan

def test_collate_shifts_targets_and_masks_unsupervised_tokens():
    a = Sample([10, 11, 12, 13], [0, 0, 1, 1], [])
    b = Sample([20, 21], [0, 1], [])
    ids, targets, images = collate([a, b], pad_id=2)
    assert ids.tolist() == [[10, 11, 12], [20, 2, 2]]
    assert targets.tolist() == [[-100, 12, 13], [21, -100, -100]]
    assert images is None


def test_sources_render_rows_and_handle_long_ones(data_dir):
    tok = Tokenizer.load(data_dir / "tokenizer.json")
    cfg = get_config("tiny")
    sft = Source(read_jsonl(data_dir / "sft.jsonl"), "sft", tok, cfg.n_image_tokens, max_len=120, root=str(data_dir))
    assert sft.dropped > 0 and all(len(s.ids) <= 121 for s in sft.samples)  # too long for 120: dropped, not cut
    words = " ".join(f"w{i}" for i in range(400))  # no two tokens alike in a row, so an overlap cannot happen by chance
    text = Source([{"text": words}], "text", tok, cfg.n_image_tokens, max_len=64)
    ids, _ = render_document(words, tok, cfg.n_image_tokens)
    # Long text is cut into context-sized pieces (64 inputs and their 64 targets) that overlap by one token: each
    # piece's last token is the next one's first, so every token of the document is predicted once.
    assert len(ids) > 2 * 65 and [s.ids for s in text.samples] == [ids[i:i + 65] for i in range(0, len(ids) - 1, 64)]
    # (a piece's first token is context only, predicted by the piece before: its mask says so, as show() and the
    # resume fingerprint read it; collate's targets never read a row's first bit)
    assert [s.mask for s in text.samples] == [[0] + [1] * (len(s.ids) - 1) for s in text.samples]
    words = next(w for w in (" ".join(f"w{i}" for i in range(n)) for n in range(10, 300))
                 if len(render_document(w, tok, 36)[0]) % 64 == 2 and len(render_document(w, tok, 36)[0]) > 64)
    ids, _ = render_document(words, tok, cfg.n_image_tokens)
    pieces = [s.ids for s in Source([{"text": words}], "text", tok, cfg.n_image_tokens, max_len=64).samples]
    assert pieces[-1] == ids[-2:] and sum(len(p) - 1 for p in pieces) == len(ids) - 1  # the last predicts one token
    # A row of max_len + 1 ids fills the context exactly (its inputs are all but the last id): kept. One id more is
    # dropped.
    row = {"conversation": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4 w5"}]}
    size = len(Source([row], "sft", tok, 36, max_len=4096).samples[0].ids)
    assert len(Source([row], "sft", tok, 36, max_len=size - 1).samples) == 1
    short = Source([row], "sft", tok, 36, max_len=size - 2)
    assert (len(short.samples), short.dropped) == (0, 1)
    # Each row's images are under its own folder when it names one (train.py gathers rows of several folders).
    rows = [{"text": f"{IMAGE_TAG} a", "images": ["x.png"], "_root": "/one"},
            {"text": f"{IMAGE_TAG} b", "images": ["y.png"]}]
    assert [s.images for s in Source(rows, "pretrain", tok, 36, 512, root="/two")] == [["/one/x.png"], ["/two/y.png"]]
    proc = ImageProcessor.for_config(cfg)
    pre = Source(read_jsonl(data_dir / "pretrain.jsonl"), "pretrain", tok, cfg.n_image_tokens, 512, str(data_dir))
    ids, targets, images = collate([pre[0], pre[1]], tok.pad_id, proc)
    assert images.shape == (2, 3, 256, 256)
    assert (ids == tok.image_id).sum() == 2 * cfg.n_image_tokens
    assert (targets[ids == tok.image_id] == -100).sum() >= 2 * cfg.n_image_tokens - 2  # image positions not trained


def test_plan_draws_one_modality_per_step_and_covers_each_epoch():
    sizes = {"language": 10, "multimodal": 6}
    plan = plan_batches(sizes, global_batch=4, steps=200, share=lambda s: {"language": 0.7, "multimodal": 0.3}, seed=1)
    assert plan == plan_batches(sizes, 4, 200, lambda s: {"language": 0.7, "multimodal": 0.3}, seed=1)
    assert plan != plan_batches(sizes, 4, 200, lambda s: {"language": 0.7, "multimodal": 0.3}, seed=2)
    one = lambda seed: plan_batches({"language": 10}, 4, 5, lambda s: {"language": 1.0}, seed)
    assert one(1) != one(2)  # the seed also shuffles each modality's rows
    share = sum(m == "language" for m, _ in plan) / len(plan)
    assert 0.6 < share < 0.8
    stream = [i for m, rows in plan if m == "multimodal" for i in rows]
    for epoch in range(len(stream) // 6):
        assert sorted(stream[6 * epoch:6 * epoch + 6]) == list(range(6))  # every row once per epoch
    # shares can change with the step (modality warm-up): language only for the first 25 steps here
    warm = plan_batches(sizes, 4, 50, lambda s: {"language": 1.0, "multimodal": 0.0 if s < 25 else 1.0}, seed=1)
    assert {m for m, _ in warm[:25]} == {"language"} and {m for m, _ in warm[25:]} == {"language", "multimodal"}
    only_language = plan_batches(sizes, 4, 20, lambda s: {"language": 1.0, "multimodal": 0.0}, seed=1)
    assert {m for m, _ in only_language} == {"language"}
    with pytest.raises(ValueError, match="no rows for modality"):
        plan_batches({"language": 0}, 4, 2, lambda s: {"language": 1.0}, seed=1)
    # A modality the share leaves out is not drawn; a share of nothing at all is named.
    assert {m for m, _ in plan_batches(sizes, 4, 20, lambda s: {"language": 1.0}, seed=1)} == {"language"}
    with pytest.raises(ValueError, match=r"step 0: every modality has share 0 \({'language': 0.0}\)"):
        plan_batches(sizes, 4, 2, lambda s: {"language": 0.0}, seed=1)
    # Each epoch of a stream is a permutation of its own: the same order every epoch would repeat the same batches.
    ten = list(itertools.islice(epochs(10, "k"), 30))
    assert all(sorted(ten[e * 10:e * 10 + 10]) == list(range(10)) for e in range(3)) and len({*map(tuple, (
        ten[:10], ten[10:20], ten[20:]))}) == 3


def test_ranks_and_micro_batches_split_the_same_global_batch():
    source = Source([{"text": f"row {i} " * (1 + i % 3)} for i in range(12)], "text",
                    Tokenizer.train(["row 1 2 3 4 5 6 7 8 9 10 11"], vocab_size=262), 4, 64)
    plan = plan_batches({"language": len(source)}, 8, 3, lambda s: {"language": 1.0}, seed=0)
    whole = PlannedBatches(plan, {"language": source}, 2, None)
    parts = [PlannedBatches(plan, {"language": source}, 2, None, accum=2, rank=r, world=2) for r in range(2)]
    for step in range(3):
        got = [i for r in range(2) for micro in range(2) for i in parts[r].rows(step * 2 + micro)]
        assert got == plan[step][1]  # the four slices, disjoint, in order, make up the step's global batch
        ids, _, _ = whole[step]
        pieces = [parts[r][step * 2 + micro][0] for r in range(2) for micro in range(2)]
        assert sum(p.shape[0] for p in pieces) == ids.shape[0] == 8
    with pytest.raises(ValueError, match="not divisible"):
        PlannedBatches(plan, {"language": source}, 2, None, accum=3, world=1)
    # Each step reads the rows of the modality its plan drew.
    other = Source([{"text": f"image row {i}"} for i in range(12)], "text", Tokenizer.train(["image row"], 262), 4, 64)
    sources = {"language": source, "multimodal": other}
    plan = plan_batches({m: 12 for m in sources}, 8, 20, lambda s: {"language": 0.5, "multimodal": 0.5}, seed=0)
    assert {m for m, _ in plan} == {"language", "multimodal"}
    batches = PlannedBatches(plan, sources, 2, None, accum=2, rank=1, world=2)
    assert len(batches) == 2 * len(plan)  # an item per micro-batch
    for k in range(len(batches)):
        modality, rows = plan[k // 2]
        assert batches.samples(k) == [sources[modality][i] for i in batches.rows(k)]


def test_packing_lays_samples_end_to_end():
    samples = [Sample(list(range(10 * i + 1, 10 * i + 1 + n)), [0] + [1] * (n - 1), []) for i, n in
               enumerate((5, 9, 4, 7))]  # inputs of 4, 8, 3 and 6 tokens
    lengths = {"language": [len(s.ids) - 1 for s in samples]}
    # The batch counts rows: 2 rows of 12 a step. Next fit in the stream's order; a sample that does not fit closes
    # the row and starts the next, or the next step.
    plan = plan_batches({"language": 4}, 2, 3, lambda step: {"language": 1.0}, 0, lengths, 12)
    laid = [i for _, rows in plan for row in rows for i in row]
    assert laid == list(itertools.islice(epochs(4, "0-language"), len(laid)))  # the stream, in order, none skipped
    expected, row = [], []
    for i in laid:  # next fit, by hand
        if row and sum(lengths["language"][j] for j in row + [i]) > 12:
            expected.append(row)
            row = []
        row.append(i)
    assert [row for _, rows in plan for row in rows] == expected + [row] and all(len(rows) == 2 for _, rows in plan)

    # Two modalities taking turns: each lays its own stream in order, the sample left over at the end of a step
    # waiting for that modality's next step (of the same size, the other's indices would fit its rows unseen).
    lengths = {"language": [3, 5, 2, 6, 4, 1, 3], "multimodal": [5, 2, 7, 3, 3, 6, 2]}
    plan = plan_batches({"language": 7, "multimodal": 7}, 2, 12, lambda step: {"language": 1, "multimodal": 1}, 0,
                        lengths, 8)
    assert {m for m, _ in plan} == set(lengths)
    for m in lengths:
        laid = [i for modality, rows in plan if modality == m for row in rows for i in row]
        assert laid == list(itertools.islice(epochs(7, f"0-{m}"), len(laid)))
    assert all(sum(lengths[m][i] for i in row) <= 8 for m, rows in plan for row in rows)

    exact = plan_batches({"language": 2}, 1, 2, lambda step: {"language": 1.0}, 0, {"language": [6, 6]}, 12)
    assert [sorted(rows[0]) for _, rows in exact] == [[0, 1], [0, 1]]  # 6 + 6 tokens fill a row of 12 exactly

    # A step's rows are held in flat arrays (the released sizes plan about 100M rows), read back as lists.
    rows = PackedRows([[4, 1], [7], [2, 0, 5]])
    assert len(rows) == 3 and rows[0] == [4, 1] and rows[-1] == [2, 0, 5] and list(rows) == [[4, 1], [7], [2, 0, 5]]
    assert rows[1:3] == [[7], [2, 0, 5]] and rows[5:] == [] and PackedRows([])[:] == []
    with pytest.raises(IndexError):
        rows[3]
    assert all(isinstance(rows, PackedRows) for _, rows in plan)

    plan = [("language", [[0, 1], [2, 3]])]
    ids, targets, images, doc_ids = PackedBatches(plan, {"language": samples}, 0, None)[0]
    assert ids.tolist() == [[1, 2, 3, 4, 11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 31, 32, 33, 34, 35, 36, 0, 0, 0]]
    assert doc_ids.tolist() == [[0] * 4 + [1] * 8, [0] * 3 + [1] * 6 + [-1] * 3]
    assert targets[0, :4].tolist() == [2, 3, 4, 5] and targets[1, 9:].tolist() == [-100] * 3
    assert images is None
    # Three samples in a row, and the images of every row, in order (sample i's image here is filled with i).
    pictured = [Sample(s.ids, s.mask, [str(i)]) for i, s in enumerate(samples)]
    ids, targets, images, doc_ids = PackedBatches([("multimodal", [[0, 2, 0], [3, 1]])], {"multimodal": pictured}, 0,
                                                  lambda p: torch.full((3, 2, 2), float(p)))[0]
    assert ids.tolist() == [[1, 2, 3, 4, 21, 22, 23, 1, 2, 3, 4, 0, 0, 0],
                            [31, 32, 33, 34, 35, 36] + list(range(11, 19))]
    assert doc_ids[0].tolist() == [0] * 4 + [1] * 3 + [2] * 4 + [-1] * 3
    assert targets[0, 4:11].tolist() == [22, 23, 24, 2, 3, 4, 5]
    assert images[:, 0, 0, 0].tolist() == [0, 2, 0, 3, 1]
    # Each step's rows come from the source of the modality its plan drew (stage 2 mixes them).
    shifted = [Sample([t + 100 for t in s.ids], s.mask, []) for s in samples]
    mixed = PackedBatches([("language", [[0]]), ("multimodal", [[0]])], {"language": samples, "multimodal": shifted},
                          0, None)
    assert [mixed[k][0][0, 0].item() for k in range(2)] == [1, 101]
    assert mixed.samples(1) == [[shifted[0]]]  # (a row of samples each; PlannedBatches' own, inherited, raised)


def test_a_fingerprint_changes_with_any_token_mask_or_planned_row():
    def source(samples):
        src = Source([], "text", None, 1, 8)
        src.samples = samples
        return src

    samples = [Sample([1, 2, 3], [0, 1, 1], []), Sample([4, 5], [0, 1], [])]
    plan = plan_batches({"language": 2}, 1, 4, lambda step: {"language": 1.0}, 0)
    base = PlannedBatches(plan, {"language": source(samples)}, 0, None).fingerprint()
    assert base == PlannedBatches(plan, {"language": source(list(samples))}, 0, None).fingerprint()
    assert base["sources"]["language"][0] == 2
    for other in ([Sample([1, 2, 9], [0, 1, 1], []), samples[1]],  # a token
                  [Sample([1, 2, 3], [0, 0, 1], []), samples[1]],  # the loss mask
                  [Sample([1, 2], [0, 1], []), Sample([3, 4, 5], [0, 1, 1], [])],  # where one sample ends
                  samples[::-1]):  # their order
        changed = PlannedBatches(plan, {"language": source(other)}, 0, None).fingerprint()
        assert changed["sources"] != base["sources"] and changed["plan"] == base["plan"]
    replanned = plan_batches({"language": 2}, 1, 4, lambda step: {"language": 1.0}, 2)  # another seed
    assert [rows for _, rows in replanned] != [rows for _, rows in plan]
    changed = PlannedBatches(replanned, {"language": source(samples)}, 0, None).fingerprint()
    assert changed["plan"] != base["plan"] and changed["sources"] == base["sources"]
    packed = [("language", PackedRows([[0, 1]])), ("language", PackedRows([[1], [0]]))]
    assert plan_digest(packed) != plan_digest([("language", PackedRows([[0], [1]])), packed[1]])
    assert plan_digest(packed) != plan_digest([("multimodal", packed[0][1]), packed[1]])  # the modality drawn
    assert hash_chunks([b"ab", b"c"]) != hash_chunks([b"a", b"bc"])  # where each chunk ends is part of what is hashed
