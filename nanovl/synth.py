"""
Synthetic image-text data whose text is exactly known, one generator per category of the paper's pretraining mix
(Table 1) so that every stage of the recipe trains offline on a fresh machine:

    caption      scenes of coloured shapes, described (colours, counts, positions)     ShareGPT4V-style captions
    ocr          a page with a title and a paragraph of real prose                       document OCR
    chart        a bar chart or a table, with its data                                   table and chart
    code         a small web page rendered from markup, the markup as the target        web code
    scene_text   a sign with a word on it, inside a scene of shapes                      scene text OCR
    interleaved  several scenes inside running text that refers to them                 interleaved image-text

Each generator takes a seeded `random.Random` and the canvas size (and make_ocr a paragraph of prose) and returns an
`Example`: the image(s), the pretraining text (with one <image_placeholder> per image), question-answer pairs for
chat fine-tuning, one multiple-choice question for evaluation (the paper's MCPPL), a short caption of the fact that
question asks about (stage 0: SigLIP's contrastive loss), and for the scenes of shapes a per-pixel segmentation map
(stage 0: SAM's dense loss). Interleaved documents have no multiple-choice question and no caption (their chats ask
about all the pictures together). The questions ask about what the picture shows (a colour, a count, the tallest
bar, the word on a sign, the title of a page), so a model can only answer them by looking.
"""

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw, ImageFont

from nanovl.chat import IMAGE_TAG

COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220), "yellow": (240, 200, 20),
          "purple": (148, 70, 190), "orange": (250, 127, 14), "black": (25, 25, 25)}
BACKGROUNDS = {"white": (250, 250, 250), "light grey": (215, 215, 215), "light blue": (200, 225, 245),
               "cream": (245, 235, 200), "light green": (210, 240, 210)}
SHAPES = ("circle", "square", "triangle", "diamond")
# A 3x3 grid of places, named as a caption would name them.
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
SIGN_WORDS = ("OPEN", "STOP", "EXIT", "SALE", "CAFE", "HOTEL", "BANK", "TAXI", "PARK", "BOOKS", "PIZZA", "MUSEUM",
              "BAKERY", "POLICE", "GARDEN", "MARKET", "SCHOOL", "CINEMA", "PHARMACY", "STATION")
TITLE_WORDS = ("Report", "Notes", "Summary", "Letter", "Minutes", "Agenda", "Invoice", "Recipe", "Manual", "Memo",
               "Review", "Budget", "Guide", "Story", "Lesson", "Notice")
ITEMS = ("apples", "pears", "plums", "grapes", "lemons", "melons", "cherries", "peaches")
PAGE_WORDS = ("Welcome", "Shop", "Contact", "About", "News", "Login", "Search", "Gallery", "Blog", "Events")
BUTTON_WORDS = ("Buy", "Send", "Join", "Next", "Save", "Go", "Open", "Start")
BUTTON_COLORS = ("red", "green", "blue", "purple", "orange")  # white button text reads on each; the bars' too
CATEGORIES = ("caption", "ocr", "chart", "code", "scene_text", "interleaved")
# Segmentation labels for the stage-0 dense objective on SAM: 0 is background, then one per (shape, colour).
SEG_LABELS = [(s, c) for s in SHAPES for c in COLORS]


@dataclass
class Example:
    category: str
    images: List[Image.Image]
    text: str  # pretraining text, one IMAGE_TAG per image
    # question-answer pairs for SFT; the images go before the first question (prepare_data.py puts their tags there,
    # but for the interleaved documents, whose first question holds its own)
    qa: List[Tuple[str, str]]
    mc: Optional[dict] = None  # {"question", "options", "answer"} for multiple-choice evaluation
    # A short caption of the image's main fact, the one its multiple-choice question asks about (stage 0, SigLIP's
    # image-text contrastive loss): one fact per caption keeps the captions few and distinct, so each contrastive
    # batch can hold only different ones, and the tower learns exactly the facts a question can ask.
    caption: Optional[str] = None
    seg: Optional[Image.Image] = None  # mode "L" label map of a scene of shapes (stage 0, SAM's dense objective)


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(6, size))  # Pillow's built-in scalable font: no font files needed


def canvas_shape(rng: random.Random, size: int, shapes=((1, 1), (4, 3), (3, 4))) -> Tuple[int, int]:
    """(width, height) with the long side = size, in one of a few aspect ratios (so padding is exercised too)."""
    aw, ah = rng.choice(shapes)
    return (size, size * ah // aw) if aw >= ah else (size * aw // ah, size)


def mc_question(rng: random.Random, question: str, answer: str, pool) -> dict:
    """Four options, the answer among them at a random place. pool: the answers the generator can give to this
    question, so that every option is right for some image: an option that never is (a yellow button, where buttons
    are never yellow) can be ruled out without looking, and would lift chance above a quarter."""
    wrong = rng.sample([p for p in pool if p != answer], 3)
    options = wrong + [answer]
    rng.shuffle(options)
    return {"question": question, "options": options, "answer": options.index(answer)}


def mc_prompt(question: str, options) -> str:
    """How a multiple-choice question is asked, in training chats and in evaluation alike; the answer is the text of
    one option, so the model is scored on saying it (MCPPL compares the options' perplexities)."""
    return f"{question}\nOptions: {', '.join(options)}.\nAnswer with one of the options."


def with_article(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


# ---------------------------------------------------------------------------------------------------------------------
# Scenes of shapes (captions, scene text, interleaved documents, and stage 0)

def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def scene(rng: random.Random, size: int, n_shapes: int, avoid=()) -> Tuple[Image.Image, Image.Image, list, str]:
    """Draw n shapes in distinct cells of a 3x3 grid. Returns (image, label map, objects, background name)."""
    w, h = canvas_shape(rng, size)
    bg = rng.choice(list(BACKGROUNDS))
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    seg = Image.new("L", (w, h), 0)
    draw, seg_draw = ImageDraw.Draw(img), ImageDraw.Draw(seg)
    cells = rng.sample([c for c in range(9) if c not in avoid], n_shapes)
    objects = []
    for cell in cells:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        cw, ch = w / 3, h / 3
        side = min(cw, ch) * rng.uniform(0.55, 0.8)
        cx = (cell % 3 + 0.5) * cw + rng.uniform(-0.08, 0.08) * cw
        cy = (cell // 3 + 0.5) * ch + rng.uniform(-0.08, 0.08) * ch
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        draw_shape(draw, shape, box, COLORS[color])
        draw_shape(seg_draw, shape, box, 1 + SEG_LABELS.index((shape, color)))
        objects.append({"shape": shape, "color": color, "place": PLACES[cell]})
    return img, seg, objects, bg


def describe(objects: list, bg: str) -> str:
    def where(o):
        return ("in the " if o["place"] in ("center",) else "at the ") + o["place"]

    parts = [f"{with_article(o['color'] + ' ' + o['shape'])} {where(o)}" for o in objects]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "shape" if len(objects) == 1 else "shapes"
    return f"{NUMBERS[len(objects)].capitalize()} {noun} on a {bg} background: {listing}."


def scene_questions(rng: random.Random, objects: list) -> Tuple[List[Tuple[str, str]], dict, str]:
    """QA pairs about a scene, one multiple-choice question whose answer is visible in the picture (its open form
    first among the pairs), and that question's fact as a sentence (the scene's short caption)."""
    n = len(objects)
    qa = [("How many shapes are in the picture?", f"There {'is' if n == 1 else 'are'} {NUMBERS[n]}.")]
    choices = []
    for o in objects:
        same_shape = [p for p in objects if p["shape"] == o["shape"]]
        if len(same_shape) == 1:
            qa.append((f"What colour is the {o['shape']}?", f"The {o['shape']} is {o['color']}."))
            choices.append(("color", o))
        if sum(p["shape"] == o["shape"] and p["color"] == o["color"] for p in objects) == 1:  # else: which one?
            qa.append((f"Where is the {o['color']} {o['shape']}?", f"It is at the {o['place']}."))
    kind, o = rng.choice(choices) if choices and rng.random() < 0.7 else ("count", None)
    if kind == "color":
        mc = mc_question(rng, f"What colour is the {o['shape']}?", o["color"], list(COLORS))
        fact = f"The {o['shape']} is {o['color']}."
    else:
        mc = mc_question(rng, "How many shapes are in the picture?", NUMBERS[n], NUMBERS[1:5])
        fact = f"{NUMBERS[n].capitalize()} {'shape' if n == 1 else 'shapes'}."
    qa.sort(key=lambda pair: pair[0] != mc["question"])  # (stable: the others keep their order)
    return qa, mc, fact


def make_caption(rng: random.Random, size: int) -> Example:
    img, seg, objects, bg = scene(rng, size, rng.randint(1, 4))
    caption = describe(objects, bg)
    qa, mc, fact = scene_questions(rng, objects)
    qa = [("Describe the image.", caption), qa[0]] + rng.sample(qa[1:], min(1, len(qa) - 1))  # qa[0]: the mc's
    return Example("caption", [img], IMAGE_TAG + caption, qa, mc, caption=fact, seg=seg)


def make_scene_text(rng: random.Random, size: int) -> Example:
    img, seg, objects, bg = scene(rng, size, rng.randint(1, 2), avoid=(3, 4, 5))  # keep the middle row for the sign
    word = rng.choice(SIGN_WORDS)
    w, h = img.size
    draw = ImageDraw.Draw(img)
    f = font(int(min(w, h) * 0.16 * min(1.0, 6 / len(word))))
    tw, th = draw.textbbox((0, 0), word, font=f)[2:]
    x0, y0 = (w - tw) / 2 - 0.04 * w, h / 2 - th / 2 - 0.04 * h
    board = rng.choice([(255, 255, 255), (250, 220, 60)])
    draw.rectangle((x0, y0, x0 + tw + 0.08 * w, y0 + th + 0.08 * h), fill=board, outline=(40, 40, 40), width=2)
    draw.text((x0 + 0.04 * w, y0 + 0.04 * h), word, fill=(20, 20, 20), font=f)
    things = " and ".join(with_article(f"{o['color']} {o['shape']}") for o in objects)
    caption = f'A sign that says "{word}" with {things} on a {bg} background.'
    qa = [("What does the sign say?", f'The sign says "{word}".'), ("Describe the image.", caption)]
    mc = mc_question(rng, "What does the sign say?", word, SIGN_WORDS)
    return Example("scene_text", [img], IMAGE_TAG + caption, qa, mc, caption=f'A sign that says "{word}".', seg=seg)


def make_interleaved(rng: random.Random, size: int) -> Example:
    """A short document with 2-3 pictures in the running text, which refers to each of them."""
    n = rng.randint(2, 3)
    scenes = [scene(rng, size, rng.randint(1, 3)) for _ in range(n)]
    ordinals = ("first", "second", "third")
    text = f"Here are {NUMBERS[n]} pictures of shapes."
    for i, (_, _, objects, bg) in enumerate(scenes):
        d = describe(objects, bg)
        text += f" {IMAGE_TAG}The {ordinals[i]} picture shows {d[0].lower()}{d[1:]}"
    counts = [len(s[2]) for s in scenes]
    total = sum(counts)
    qa = [("How many shapes are there in all the pictures together?", f"There are {total} shapes in total."),
          ("Which picture has the most shapes?",
           "They all have the same number." if len(set(counts)) == 1 else
           f"The {ordinals[counts.index(max(counts))]} picture." if counts.count(max(counts)) == 1 else
           "Several pictures share the largest number.")]
    return Example("interleaved", [s[0] for s in scenes], text, [(IMAGE_TAG * n + qa[0][0], qa[0][1]), qa[1]])


# ---------------------------------------------------------------------------------------------------------------------
# Documents, charts and tables, web pages

def wrap(draw, text: str, f, width: float) -> List[str]:
    """Greedy word wrap to a pixel width. A word wider than a line (a URL, a dotted name) is broken where the line
    ends, so that every character of the target text is on the page."""
    lines, line = [], ""
    words = text.split()
    for k, word in enumerate(words):
        if draw.textlength(word, font=f) > width:
            cut = max((i for i in range(1, len(word)) if draw.textlength(word[:i], font=f) <= width), default=1)
            words[k + 1:k + 1] = [word[cut:]]  # the rest is the next word, broken again if it is still too wide
            word = word[:cut]
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=f) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def make_ocr(rng: random.Random, size: int, snippet: str) -> Example:
    """A page with a large title word and a paragraph of real prose; the target is exactly the rendered text."""
    w, h = canvas_shape(rng, size, shapes=((3, 4), (1, 1)))
    img = Image.new("RGB", (w, h), rng.choice([(255, 255, 255), (250, 248, 240)]))
    draw = ImageDraw.Draw(img)
    title = rng.choice(TITLE_WORDS)
    margin = 0.06 * w
    tf, bf = font(int(h * 0.15)), font(int(h * 0.045))  # the title stays legible at the tiny SigLIP's 96 px
    draw.text((margin, margin), title, fill=(0, 0, 0), font=tf)
    y = margin + h * 0.2
    lines = []
    for line in wrap(draw, snippet, bf, w - 2 * margin):
        if y + h * 0.055 > h - margin:
            break
        draw.text((margin, y), line, fill=(30, 30, 30), font=bf)
        lines.append(line)
        y += h * 0.055
    body = "\n".join(lines)
    text = f"{title}\n{body}"
    qa = [("What is the title of this document?", f"The title is \"{title}\"."),
          ("Read all the text in the document.", text)]
    mc = mc_question(rng, "What is the title of this document?", title, TITLE_WORDS)
    return Example("ocr", [img], IMAGE_TAG + text, qa, mc, caption=f"A document titled {title}.")


def make_chart(rng: random.Random, size: int) -> Example:
    if rng.random() < 0.5:
        return make_bar_chart(rng, size)
    return make_table(rng, size)


def white_page(rng: random.Random, size: int, shapes):
    """A blank white image of one of the given aspect ratios, and a pen for it."""
    w, h = canvas_shape(rng, size, shapes=shapes)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    return img, ImageDraw.Draw(img), w, h


def make_bar_chart(rng: random.Random, size: int) -> Example:
    img, draw, w, h = white_page(rng, size, ((4, 3), (1, 1)))
    n = rng.randint(3, 5)
    items = rng.sample(ITEMS, n)
    values = rng.sample(range(1, 10), n)  # distinct, so "the tallest" is always one bar
    color = COLORS[rng.choice(BUTTON_COLORS)]
    base, top, left = h * 0.82, h * 0.1, w * 0.08
    slot = (w - 2 * left) / n
    size_px = int(min(slot * 0.28, h * 0.06))
    while size_px > 6 and max(draw.textlength(item, font=font(size_px)) for item in items) > slot * 0.95:
        size_px -= 1  # each label within its own bar's slot: "peaches" ran into "melons" in a third of the charts
    lf = font(size_px)
    draw.line((left, base, w - left, base), fill=(0, 0, 0), width=2)
    for i, (item, v) in enumerate(zip(items, values)):
        x0 = left + i * slot + slot * 0.15
        y0 = base - (base - top) * v / 9
        draw.rectangle((x0, y0, x0 + slot * 0.7, base), fill=color)
        draw.text((x0, base + h * 0.02), item, fill=(0, 0, 0), font=lf)
        draw.text((x0 + slot * 0.25, y0 - h * 0.07), str(v), fill=(0, 0, 0), font=lf)
    data = ", ".join(f"{item}: {v}" for item, v in zip(items, values))
    tallest = items[values.index(max(values))]
    text = f"A bar chart of fruit counts. {data}."
    qa = [("Which bar is the tallest?", f"The tallest bar is {tallest}, with {max(values)}."),
          ("What data does the chart show?", data + ".")]
    mc = mc_question(rng, "Which bar is the tallest?", tallest, ITEMS)
    return Example("chart", [img], IMAGE_TAG + text, qa, mc, caption=f"A bar chart; the tallest bar is {tallest}.")


def make_table(rng: random.Random, size: int) -> Example:
    img, draw, w, h = white_page(rng, size, ((4, 3), (1, 1)))
    rows = rng.randint(2, 5)
    items = rng.sample(ITEMS, rows)
    values = [rng.randint(1, 99) for _ in range(rows)]
    header = ("item", "count")
    row_h = h * 0.8 / (rows + 1)
    x0, y0, col_w = w * 0.1, h * 0.1, w * 0.4
    f = font(int(row_h * 0.45))
    for r, cells in enumerate([header] + [(i, str(v)) for i, v in zip(items, values)]):
        y = y0 + r * row_h
        if r == 0:
            draw.rectangle((x0, y, x0 + 2 * col_w, y + row_h), fill=(220, 220, 220))
        for c, cell in enumerate(cells):
            draw.rectangle((x0 + c * col_w, y, x0 + (c + 1) * col_w, y + row_h), outline=(0, 0, 0), width=2)
            draw.text((x0 + c * col_w + col_w * 0.08, y + row_h * 0.25), cell, fill=(0, 0, 0), font=f)
    table = "| item | count |\n|---|---|\n" + "\n".join(f"| {i} | {v} |" for i, v in zip(items, values))
    qa = [("How many rows does the table have, not counting the header?", f"It has {NUMBERS[rows]} rows."),
          ("Convert the table to markdown.", table)]
    mc = mc_question(rng, "How many rows does the table have, not counting the header?", NUMBERS[rows],
                         NUMBERS[2:6])
    return Example("chart", [img], IMAGE_TAG + table, qa, mc, caption=f"A table with {NUMBERS[rows]} rows.")


def make_code(rng: random.Random, size: int) -> Example:
    """A small web page laid out top to bottom from markup; the markup is the target."""
    img, draw, w, h = white_page(rng, size, ((3, 4), (1, 1)))
    heading, label = rng.choice(PAGE_WORDS), rng.choice(BUTTON_WORDS)
    color = rng.choice(BUTTON_COLORS)
    body = " ".join(rng.sample(["fresh", "bread", "every", "day", "open", "late", "new", "books", "cheap", "tickets",
                                "free", "coffee"], 3))
    elements = [("h1", heading), ("p", body)]
    if rng.random() < 0.5:
        elements.append(("img", ""))
    elements.insert(rng.randint(1, len(elements)), ("button", label))
    markup, y, m = [], h * 0.06, w * 0.08
    for tag, content in elements:
        if tag == "h1":
            draw.text((m, y), content, fill=(0, 0, 0), font=font(int(h * 0.1)))
            y += h * 0.16
            markup.append(f"<h1>{content}</h1>")
        elif tag == "p":
            draw.text((m, y), content, fill=(60, 60, 60), font=font(int(h * 0.05)))
            y += h * 0.1
            markup.append(f"<p>{content}</p>")
        elif tag == "img":
            draw.rectangle((m, y, w * 0.6, y + h * 0.22), fill=(180, 180, 180))
            y += h * 0.27
            markup.append('<img src="photo.png">')
        else:
            bw, bh = w * 0.35, h * 0.11
            draw.rounded_rectangle((m, y, m + bw, y + bh), radius=bh * 0.3, fill=COLORS[color])
            draw.text((m + bw * 0.15, y + bh * 0.15), content, fill=(255, 255, 255), font=font(int(bh * 0.6)))
            y += bh + h * 0.06
            markup.append(f'<button style="background:{color}">{content}</button>')
    code = "\n".join(markup)
    qa = [("Write the HTML for this web page.", code), ("What colour is the button?", f"The button is {color}.")]
    mc = mc_question(rng, "What colour is the button?", color, BUTTON_COLORS)
    return Example("code", [img], IMAGE_TAG + code, qa, mc, caption=f"A web page with a {color} button.")


def make_example(category: str, rng: random.Random, size: int, snippet: str = "") -> Example:
    if category == "caption":
        return make_caption(rng, size)
    if category == "ocr":
        return make_ocr(rng, size, snippet)
    if category == "chart":
        return make_chart(rng, size)
    if category == "code":
        return make_code(rng, size)
    if category == "scene_text":
        return make_scene_text(rng, size)
    if category == "interleaved":
        return make_interleaved(rng, size)
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
