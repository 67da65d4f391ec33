"""train.py: freeze maps, the stage-2 mix, loss normalisation, exact resume, DDP, bad starts, evaluation, and a few
steps of every stage on the tiny preset. Runs on CPU; the data folder is a small prepare_data.py run."""

import dataclasses
import errno
import fcntl
import glob
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import prepare_data
import train
from conftest import write_swapped_tokenizer
from nanovl import DeepSeekVL, checkpoint, evaluate, get_config, recipe, resume, runs
from nanovl.chat import IMAGE_TAG, render_chat
from nanovl.data import read_jsonl, write_jsonl
from nanovl.evaluate import multiple_choice
from nanovl.synth import mc_prompt
from nanovl.image import ImageProcessor
from nanovl.stage0 import Stage0Heads, Stage0Model
from nanovl.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--workers", "0", "--eval_limit", "10", "--log_every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "data"
    prepare_data.main(["--out", str(out), "--n", "6", "--workers", "2"])
    return str(out)


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory):
    """A random tiny model saved as a stage's model.pt, to start stages 1-3 from without running the ones before."""
    path = tmp_path_factory.mktemp("init") / "model.pt"
    torch.manual_seed(0)
    cfg = get_config("tiny")
    torch.save({"model": DeepSeekVL(cfg).state_dict(), "config": cfg.to_dict()}, path)
    return str(path)


def load_model(folder):
    return torch.load(os.path.join(folder, "model.pt"), weights_only=True)["model"]


def free_port() -> int:
    """A port no one listens on now: torchrun's rendezvous on a fixed one could meet the last run's, not yet closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, cwd=ROOT, module="train.py", torchrun=0, fails=False):
    """train.py in a fresh process (resume must survive a real process exit); with fails, a run that must fail, and
    its stdout and stderr."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                               f"--master_port={free_port()}"] if torchrun else []) + [module] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert (result.returncode != 0) == fails, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr if fails else result.stdout


def noting_scored_rows(tmp_path) -> str:
    """A train.py whose processes each note the held-out rows they score, by file and line (scored_rows reads them)."""
    path = tmp_path / "noting_scored_rows.py"
    path.write_text(f"""import os, sys
sys.path.insert(0, {ROOT!r})
import train
from nanovl import evaluate

def noting(name, score):
    def noted(model, rows, *args):
        with open(os.path.join({str(tmp_path)!r}, "scored" + os.environ["RANK"]), "a") as f:
            f.write(" ".join([name] + [row["_where"].replace(" ", "") for row in rows]) + "\\n")
        return score(model, rows, *args)
    return noted

for name in ("mc_choices", "open_answers", "text_bits"):
    setattr(evaluate, name, noting(name, getattr(evaluate, name)))
train.main(sys.argv[1:])
""")
    return str(path)


def scored_rows(tmp_path, world: int) -> list:
    """What each process of a noting_scored_rows run scored, in order: (function, [file:line of each row])."""
    return [[(line.split()[0], line.split()[1:]) for line in (tmp_path / f"scored{rank}").read_text().splitlines()]
            for rank in range(world)]


def evaluation_share(data, limit: int, rank: int, world: int) -> list:
    """What scored_rows gives for one evaluation of a process that scores its share, rows[rank::world]."""
    mc_rows, text_rows = evaluate.held_out(data, limit)
    where = lambda rows: [row["_where"].replace(" ", "") for row in rows[rank::world]]
    return [("mc_choices", where(mc_rows)), ("open_answers", where(mc_rows)), ("text_bits", where(text_rows))]


# ---------------------------------------------------------------------------------------------------------------------

def test_freeze_maps_follow_the_paper():
    cfg = get_config("tiny")
    model = DeepSeekVL(cfg)

    def trained(stage):
        recipe.apply_freeze_map(model, recipe.trainable_prefixes(stage, cfg))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    names = {n for n, _ in model.named_parameters()}
    sam_tail = {n for n in names if n.split(".")[:2] in (["sam", "neck"], ["sam", "neck_hd"], ["sam", "downsamples"])
                or n == "sam.hd_alpha_downsamples"}
    aligner = {n for n in names if n.startswith("aligner.")}
    llm = {n for n in names if n.startswith("llm.")}
    siglip = {n for n in names if n.startswith("siglip.")}
    sam_trunk = {n for n in names if n.startswith(("sam.patch_embed.", "sam.pos_embed", "sam.blocks.", "sam.neck."))}
    # stage 0 (scratch presets): each part on its own task; the adaptor and SAM's side path wait for stage 1
    assert trained(0) == llm | siglip | sam_trunk
    assert trained(1) == aligner | sam_tail  # adaptor warm-up: the adaptor, SAM's tail counted in (section 3.1)
    assert trained(2) == aligner | sam_tail | llm  # vision frozen
    assert trained(3) == aligner | sam_tail | llm | siglip  # SigLIP joins; SAM's trunk stays frozen
    counts = recipe.apply_freeze_map(model, ["llm"])
    assert counts["llm"][0] == counts["llm"][1] and counts["siglip"][0] == 0


def test_trainable_takes_any_prefix_and_names_one_that_matches_nothing():
    cfg, quiet = get_config("tiny"), lambda *a: None
    # Stage 0 trains the VLM inside a wrapper, beside its heads: a prefix means the same there as in stages 1-3.
    _, net = train.stage_model(0, recipe.TrainConfig(trainable="heads.seg_head,llm.layers.0"), cfg, [], False, quiet)
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in net.named_parameters() if n.startswith(("heads.seg_head.", "model.llm.layers.0."))}
    with pytest.raises(SystemExit, match="stage 0: --trainable siglp names no parameter of the model; its modules: "
                                         "siglip, sam, aligner, llm, heads"):
        train.stage_model(0, recipe.TrainConfig(trainable="llm,siglp"), cfg, [], False, quiet)  # a typo among others
    assert recipe.listed(" llm, aligner ,,sam ") == ["llm", "aligner", "sam"]  # (" aligner" matched nothing)


def test_stage0_clips_each_of_its_three_models_on_its_own():
    cfg = get_config("tiny")
    net = Stage0Model(DeepSeekVL(cfg), Stage0Heads(cfg, n_seg_classes=5))
    counts = recipe.apply_freeze_map(net, ["model." + p for p in recipe.trainable_prefixes(0, cfg)] + ["heads"])
    # (what the run prints, module by module: the adaptor waits for stage 1, and so does SAM's tail)
    assert list(counts) == ["siglip", "sam", "aligner", "llm", "heads"] and counts["aligner"][0] == 0
    assert 0 < counts["sam"][0] < counts["sam"][1] and counts["llm"][0] == counts["llm"][1]
    groups = {k: {id(p) for p in v} for k, v in recipe.clipping_groups(net, 0).items()}
    ids = lambda *prefixes: {id(p) for n, p in net.named_parameters() if p.requires_grad and n.startswith(prefixes)}
    assert groups == {"llm": ids("model.llm."), "sam": ids("model.sam.", "heads.seg_head."),
                      "siglip": ids("model.siglip.", "heads.text_tower.", "heads.image_proj.", "heads.log_t",
                                    "heads.bias")}
    model = DeepSeekVL(cfg)
    recipe.apply_freeze_map(model, recipe.trainable_prefixes(3, cfg))
    assert list(recipe.clipping_groups(model, 3)) == ["model"]  # stages 1-3 train one model, clipped as one


def test_stage2_mix_warms_up_from_language_only_one_modality_a_step(data):
    tc = recipe.TrainConfig(data=data, steps=100, lang_share=0.7, modality_warmup=0.3, sft_share=0.1)
    share = recipe.stage2_share(tc, n_chats=30, n_text_chats=70)  # the chats split by modality, as their rows
    assert share(0) == pytest.approx({"language": 0.9, "multimodal": 0.0, "sft": 0.0, "text_sft": 0.07})
    assert share(15) == pytest.approx({"language": 0.85 * 0.9, "multimodal": 0.15 * 0.9, "sft": 0.015,
                                       "text_sft": 0.07})  # halfway through the warm-up
    for step in (30, 99):  # 7:3, then the chats: 10% of the steps
        assert share(step) == pytest.approx({"language": 0.63, "multimodal": 0.27, "sft": 0.03, "text_sft": 0.07})
    # --modality_warmup 0, or a warm-up shorter than a step: 7:3 from the first step
    for no_warmup in (dataclasses.replace(tc, modality_warmup=0.0), dataclasses.replace(tc, steps=3)):
        assert recipe.stage2_share(no_warmup, 30, 70)(0) == share(99)
    assert recipe.stage2_share(tc, 0, 0)(99)["sft"] == pytest.approx(0.1)  # none: the group whose absence is said
    all_chats = dataclasses.replace(tc, sft_share=1.0)  # and no text-only chats: step 0 would have nothing to draw
    with pytest.raises(ValueError, match=r"--sft_share 1 leaves stage 2's first step nothing to train on: .* "
                                         r"warm-up \(30 steps\): pass an --sft_share below 1, or --modality_warmup 0"):
        recipe.stage2_share(all_chats, 30, 0)
    assert recipe.stage2_share(all_chats, 30, 70)(0)["text_sft"] == pytest.approx(0.7)  # with them: the first steps'
    assert recipe.stage2_share(dataclasses.replace(all_chats, modality_warmup=0), 30, 0)(0)["sft"] == 1.0
    # and it is the mix stage 2 reads its sources with, each step's samples of one modality
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    sources, mix = recipe.stage_data(2, tc, tok, get_config("tiny"), 512, [data])
    assert set(sources) == {"language", "multimodal", "sft", "text_sft"} and all(len(s) for s in sources.values())
    assert all(s.images for s in sources["sft"].samples) and not any(s.images for s in sources["text_sft"].samples)
    expected = recipe.stage2_share(tc, len(sources["sft"]), len(sources["text_sft"]))
    assert all(mix(step) == expected(step) for step in (0, 15, 30, 99))


def test_released_sizes_default_to_table_4():
    rows = lambda preset: [tuple(recipe.stage_defaults(preset, s)[k] for k in ("lr", "steps", "batch_size", "warmup"))
                           for s in (1, 2, 3)]
    assert rows("1.3b") == rows("1.3b-hybrid") == [(1e-3, 15000, 256, 128), (3e-5, 96000, 1024, 2000),
                                                   (2e-5, 10000, 256, 256)]
    assert rows("7b") == [(1e-3, 15000, 256, 128), (4.2e-5, 42000, 2304, 2000), (2e-5, 10000, 256, 256)]
    # Table 4's stage-1 length of 512, read as text tokens plus one image's 576 (or no caption pair would fit)
    assert [recipe.stage_defaults("7b", s)["seq_len"] for s in (1, 2, 3)] == [512 + 576, 4096, 4096]


def test_adamw_is_table_4s():
    # AdamW with betas (0.9, 0.95) and no weight decay (Table 4), in two groups: the vision side at vision_lr_mult.
    model = DeepSeekVL(get_config("tiny"))
    recipe.apply_freeze_map(model, recipe.trainable_prefixes(3, model.cfg))
    opt = recipe.stage_optimizer(model, recipe.TrainConfig(), {"lr": 1e-3, "vision_lr_mult": 0.1}, "cpu")
    assert [(g["betas"], g["weight_decay"], g["lr_mult"]) for g in opt.param_groups] == [((0.9, 0.95), 0.0, 1.0),
                                                                                           ((0.9, 0.95), 0.0, 0.1)]


def test_stage_hparams_pack_stage_2_and_fit_the_context():
    # Stage 2 packs its samples into full rows (Table 4 counts its batches in sequences), the others do not; a
    # preset's sequence length longer than the model's context is cut to it (a --seq_len longer is refused).
    tc = recipe.TrainConfig()
    assert [recipe.stage_hparams(s, tc, get_config("tiny"))[0]["pack"] for s in (0, 1, 2, 3)] == [0, 0, 1, 0]
    assert [recipe.stage_hparams(s, tc, get_config("tiny"))[1] for s in (0, 1)] == [128, 512]  # preset's; context
    assert recipe.stage_hparams(0, tc, get_config("tiny", **{"llm.max_seq_len": 100}))[1] == 100
    with pytest.raises(SystemExit, match="--seq_len 600 is longer than the model's context of 512"):
        recipe.stage_hparams(1, recipe.TrainConfig(seq_len=600), get_config("tiny"))


def test_learning_rate_schedules():
    cos = dict(lr=1.0, warmup=10, steps=110, schedule="cosine")
    assert recipe.learning_rate(0, cos, 0.1) == pytest.approx(0.1)
    assert recipe.learning_rate(9, cos, 0.1) == recipe.learning_rate(10, cos, 0.1) == pytest.approx(1.0)  # the peak
    assert recipe.learning_rate(60, cos, 0.1) == pytest.approx(0.55)
    assert recipe.learning_rate(109, cos, 0.1) == pytest.approx(0.1, abs=1e-3)
    step = dict(lr=1.0, warmup=0, steps=100, schedule="step")
    assert [recipe.learning_rate(s, step, 0.1) for s in (79, 80, 90)] == [1.0, 0.316, 0.1]
    # the milestones are 80% and 90% of the whole run, warm-up included
    warm = dict(step, warmup=10, steps=110)
    assert [recipe.learning_rate(s, warm, 0.1) for s in (87, 88, 98, 99)] == [1.0, 0.316, 0.316, 0.1]


class FavouriteTokens(torch.nn.Module):
    """A stand-in model whose next-token logits are `bonus` for the given ids and 0 for every other, at every
    position; its loss is the per-token NLL (reduction="none", as the questions are scored) or their sum ("sum", as
    the held-out text is). Its cfg is tiny's, whose context the evaluations check each question against."""

    def __init__(self, vocab_size, favourite=(), bonus=0.0):
        super().__init__()
        self.w, self.cfg = torch.nn.Parameter(torch.zeros(1)), get_config("tiny")
        self.vocab_size, self.favourite, self.bonus = vocab_size, list(favourite), bonus

    def forward(self, ids, images=None, image_embeds=None, targets=None, reduction="none"):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        logits[..., self.favourite] = self.bonus
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        return None, nll.sum() if reduction == "sum" else nll.view(ids.shape)


def test_multiple_choice_picks_the_option_the_model_finds_likeliest(data):
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    cfg = get_config("tiny")
    oracle = FavouriteTokens(tok.vocab_size, tok.encode(" blue"), 10.0)  # always expects the tokens of " blue"
    rows = [{"category": "code", "images": [], "question": "What colour is the button?",
             "options": ["red", "green", "blue", "black"], "answer": 2},
            {"category": "caption", "images": [], "question": "What colour is it?",
             "options": ["blue", "red", "green", "yellow"], "answer": 1}]
    acc = multiple_choice(oracle, rows, tok, ImageProcessor.for_config(cfg), cfg.n_image_tokens)
    assert acc == {"caption": 0.0, "code": 1.0, "mean": 0.5, "chance": 0.25}
    assert list(acc) == ["caption", "code", "mean", "chance"]  # categories in name order, as the table lists them
    # The prompt shows the question and every option (MCPPL), each option then scored as the answer.
    samples = evaluate.option_samples(rows[0], tok, cfg.n_image_tokens)
    prompt = tok.decode(samples[0].ids[:samples[0].mask.index(1)])
    assert [tok.decode(s.ids[s.mask.index(1):]) for s in samples] == [f" {o}<｜end▁of▁sentence｜>" for o in
                                                                      rows[0]["options"]]
    assert prompt.endswith(mc_prompt(rows[0]["question"], rows[0]["options"]) + "\n\nAssistant:")
    # Chance is each question's 1 / options, averaged per category, then over categories as the accuracy is.
    rows = [dict(rows[0], options=["a", "b"], answer=0), dict(rows[0], options=["a", "b", "c", "d"], answer=0),
            dict(rows[1], options=["a", "b"], answer=0)]
    assert evaluate.mc_accuracy(rows, [0, 1, 1])["chance"] == pytest.approx(((1 / 2 + 1 / 4) / 2 + 1 / 2) / 2)


def test_questions_built_in_python_are_checked_as_a_files_rows_are(data):
    # multiple_choice and open_questions are a library's API too: a row built in Python with an answer out of range
    # was scored as a wrong answer without a word, and a string of options as its letters.
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    cfg = get_config("tiny")
    model = FavouriteTokens(tok.vocab_size)
    good = {"category": "code", "images": [], "question": "Which?", "options": ["red", "blue"], "answer": 1}
    for rows, reason in [([dict(good, answer=7)], r"rows\[1\]: 'answer' must be the index of the right "
                                                  r"option, 0 to 1, got 7"),
                         ([dict(good, answer="1")], "'answer' must be the index of the right option, 0 to 1, got '1'"),
                         ([dict(good, options="abcd")], "'options' must be a list of at least 2 strings, got 'abcd'"),
                         ([dict(good, options=[])], "'options' must be a list of at least 2 strings, got \\[\\]"),
                         ([dict(good, question=None)], "'question' must be a string of text, got None"),
                         ([dict(good, images="a.png")], "'images' must be a list of paths"),
                         ([{k: v for k, v in good.items() if k != "category"}], "'category' must be a string"),
                         (["what?"], r"rows\[1\]: expected a dict \{category, .*\}, got str"),
                         (good, "expected the questions as a list of dicts, got dict"),
                         ([dict(good, question="why " * 600)], r"rows\[1\]: the question and its "
                                                               r"longest option make \d+ input tokens, but the "
                                                               r"model's context is 512")]:
        rows = rows if isinstance(rows, dict) else [good] + rows  # (the bad one second: named by its index)
        for ask in (evaluate.multiple_choice, evaluate.open_questions):
            with pytest.raises(ValueError, match=reason):
                ask(model, rows, tok, ImageProcessor.for_config(cfg), cfg.n_image_tokens)
    with pytest.raises(ValueError, match="batch_questions must be an integer of at least 1, got 0"):
        evaluate.multiple_choice(model, [good], tok, ImageProcessor.for_config(cfg), cfg.n_image_tokens,
                                 batch_questions=0)
    blue = FavouriteTokens(tok.vocab_size, tok.encode(" blue"), 10.0)  # picks "blue", option 1
    assert evaluate.multiple_choice(blue, [good], tok, None, cfg.n_image_tokens)["code"] == 1.0
    import numpy as np  # (numpy's integers are integers: an answer index, a batch size)
    for answer, accuracy in ((1, 1.0), (0, 0.0)):
        assert evaluate.multiple_choice(blue, [dict(good, answer=np.int64(answer))], tok, None, cfg.n_image_tokens,
                                        batch_questions=np.int64(2))["code"] == accuracy


class ImageEcho(torch.nn.Module):
    """A stand-in model whose image embedding is the image's first pixel, and which records the embeddings each
    forward pass is given (its loss is 0 everywhere)."""

    def __init__(self):
        super().__init__()
        self.w, self.seen = torch.nn.Parameter(torch.zeros(1)), []

    def encode_images(self, pixels):
        return pixels[:, 0, 0, :1]  # (N, 1)

    def forward(self, ids, image_embeds=None, targets=None, reduction="none"):
        self.seen.append(None if image_embeds is None else image_embeds[:, 0].tolist())
        return None, torch.zeros(ids.shape)


def test_multiple_choice_gives_each_option_its_own_questions_images(data):
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    pixels = {os.path.join("/root", name): float(i) for i, name in enumerate(["a.png", "b.png", "c.png"], 1)}
    processor = lambda path: torch.full((3, 2, 2), pixels[path])  # (a path not under the root is a KeyError)
    row = {"category": "c", "question": "Which?", "answer": 0}
    rows = [dict(row, images=["a.png"], options=["x", "y"]), dict(row, images=[], options=["x", "y"]),
            dict(row, images=["b.png", "c.png"], options=["x", "y", "z"])]
    model = ImageEcho()
    assert evaluate.mc_choices(model, rows, tok, processor, 4, root="/root") == [0, 0, 0]
    assert model.seen == [[1.0, 1.0, 2.0, 3.0, 2.0, 3.0, 2.0, 3.0]]  # one image span per option row, in order
    assert [s.ids.count(tok.image_id) for s in evaluate.option_samples(rows[2], tok, 4)] == [2 * 4] * 3


def test_multiple_choice_ranks_options_by_perplexity_not_summed_loss(data):
    from nanovl.chat import render_chat
    from nanovl.data import Sample, collate
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    cfg = get_config("tiny")
    model = FavouriteTokens(tok.vocab_size, set(tok.encode(" blue")), bonus=3.0)
    options = ["red", " ".join(["blue"] * 12)]  # a short unlikely answer, and a long one of likely tokens
    row = {"category": "chart", "images": [], "question": "Which?", "options": options, "answer": 1}
    chats = [render_chat([{"role": "user", "content": mc_prompt(row["question"], options)},
                          {"role": "assistant", "content": o}], tok, cfg.n_image_tokens) for o in options]
    _, targets, _ = collate([Sample(ids, mask, []) for ids, mask in chats], tok.pad_id)
    _, nll = model(torch.zeros_like(targets), targets=targets)
    summed, n = nll.sum(dim=1), (targets != -100).sum(dim=1)
    assert summed[0] < summed[1] and (summed / n)[1] < (summed / n)[0]  # the two rules disagree here
    acc = multiple_choice(model, [row], tok, ImageProcessor.for_config(cfg), cfg.n_image_tokens)
    assert acc["chart"] == 1.0  # the lower perplexity (mean NLL per answer token), as the paper's MCPPL


def test_an_open_answer_is_right_when_it_names_the_right_option_alone():
    from nanovl.evaluate import names_only
    assert names_only('The title is "Notes".', ["Report", "Notes", "Memo"], 1)
    assert names_only("There are three.", ["one", "two", "three", "four"], 2)
    assert names_only("the sign says park", ["PARK", "EXIT"], 0)  # in any case
    assert not names_only('The title is "Report".', ["Report", "Notes"], 1)
    assert not names_only("Notes, or maybe Report", ["Report", "Notes"], 1)  # a hedge names two
    assert not names_only("Someone", ["one", "two"], 0)  # whole words only
    assert not names_only("", ["one", "two"], 0)
    assert names_only("It is dark red.", ["red", "dark red", "blue"], 1)  # the option inside the right one is fine
    assert not names_only("It is red.", ["red", "dark red"], 1)
    # An option's closing punctuation is not asked for; curly and straight apostrophes, and case-folded letters, match.
    assert names_only("Notes", ["Notes.", "Report."], 0) and not names_only("Report", ["Notes.", "Report."], 0)
    assert names_only("I don\u2019t know", ["Don't know", "Know"], 0)
    assert names_only("STRASSE", ["Straße", "Weg"], 0)
    assert names_only("It says ?", ["?", "!"], 0) and not names_only("It says !", ["?", "!"], 0)
    assert names_only("Yes", ["Yes?", "No?"], 0) and names_only("No", ["Yes!", "No!"], 1)
    # ... but only where the options stay apart so: each is then asked for as written, as before.
    assert names_only("3.", ["3", "3."], 1) and not names_only("3.", ["3", "3."], 0)
    assert names_only("Maße", ["Masse", "Maße"], 1) and not names_only("Maße", ["Masse", "Maße"], 0)
    assert not names_only("1, 2 or 12", ["12", "1", "2"], 0)  # "1" is not words of "12": the hedge names three
    assert names_only("It  is DARK\nred", ["red", "dark red"], 1)  # in any spacing
    # Options written with their labels, in order, are read without them: asked open, a model says "yellow"
    assert names_only("The square is yellow.", ["(A) yellow", "(B) blue"], 0)
    assert names_only("5 cm", ["1. 5 cm", "2. 7 cm"], 0) and names_only("blue", ["a: red", "b: blue"], 1)
    assert not names_only("yellow", ["A. yellow", "C. blue"], 0)  # not in order: not labels
    assert names_only("A dog", ["A dog", "B cat"], 0)  # a word, not a label: kept
    assert not names_only("2.5 cm", ["1.5 cm", "2.5 cm"], 0)  # "1." of "1.5" is no label: a label has a space after
    assert names_only("(A) red", ["(A) red", "blue"], 0)  # one labelled option alone: options as written
    assert not names_only("I don't know.", ["A. ", "B. yes"], 0)  # a label with no option after: options as written
    assert names_only("It costs $5.", ["$5", "$7"], 0) and names_only("in C++ mostly", ["C", "C++"], 1)


def test_open_questions_ask_without_the_options_and_score_what_comes_back(data, monkeypatch):
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    cfg = get_config("tiny")
    images = [r["images"] for r in evaluate.read_mc_rows(os.path.join(data, "eval_mc.jsonl"))[:3]]
    rows = [{"category": "code", "images": images[0], "question": "What colour is the button?",
             "options": ["red", "green", "blue"], "answer": 2},
            {"category": "code", "images": images[1], "question": "What colour is the button?",
             "options": ["red", "green", "blue"], "answer": 0},
            {"category": "ocr", "images": images[2], "question": "What is the title?",
             "options": ["Report", "Notes"], "answer": 1}]
    replies = iter(["The button is blue.", "The button is blue.", 'The title is "Notes".'])
    asked = []

    def fake_generate(model, prompts, pixels, sampling, stop_ids, pad_id, n_words):
        asked.append((prompts, pixels.shape, sampling.temperature, stop_ids))
        return [tok.encode(" " + next(replies)) + [tok.eos_id] for _ in prompts]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    model = torch.nn.Linear(1, 1)  # (never run: generate is faked)
    model.cfg = cfg  # (whose context each question is checked against)
    acc = evaluate.open_questions(model, rows, tok, ImageProcessor.for_config(cfg), cfg.n_image_tokens, root=data,
                                  batch_questions=2)
    assert acc == {"code": 0.5, "ocr": 1.0, "mean": 0.75}
    assert [a[1][0] for a in asked] == [2, 1]  # every question's image, in batches of two questions
    prompt = tok.decode(asked[0][0][0])  # the image's tokens in front of the question, as sample.py puts them
    assert prompt.endswith("User: " + "<image_placeholder>" * cfg.n_image_tokens +
                           "What colour is the button?\n\nAssistant:") and "Options" not in prompt
    assert all(a[2] == 0 and a[3] == {tok.eos_id} for a in asked)  # greedy, up to the end of the answer



def test_open_answers_are_their_text_without_special_tokens(data, monkeypatch):
    # An answer is scored as the text a user would read: its end-of-sentence spelt out would name an option "end" or
    # "sentence" for a model that said nothing at all.
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    rows = [{"category": "c", "images": [], "question": "Which?", "options": ["end", "start"], "answer": 1}] * 2
    replies = iter([[tok.eos_id], tok.encode(" start") + [tok.eos_id]])  # nothing said, then "start"
    monkeypatch.setattr(evaluate, "generate", lambda model, prompts, *args, **kwargs: [next(replies) for _ in prompts])
    model = torch.nn.Linear(1, 1)  # (never run: generate is faked)
    model.cfg = get_config("tiny")  # (whose context the questions are measured against)
    answers = evaluate.open_answers(model, rows, tok, None, 36, batch_questions=1)
    assert [a.strip() for a in answers] == ["", "start"]
    assert evaluate.open_accuracy(rows, answers) == {"c": 0.5, "mean": 0.5}


def test_a_question_near_the_end_of_the_context_is_asked_alone_so_the_others_answer_in_full(data, monkeypatch):
    # generate ends all the rows of a batch where the context is full after the longest prompt: a question that
    # leaves fewer than max_new_tokens would cut the answers of the short questions asked beside it.
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    cfg = get_config("tiny")
    ctx, max_new = cfg.llm.max_seq_len, 32
    prompt = lambda row: render_chat([{"role": "user", "content": row["question"]}], tok, cfg.n_image_tokens,
                                     generation_prompt=True)[0]
    row = lambda question: {"category": "c", "images": [], "question": question, "options": ["a", "b"], "answer": 0}
    long = next(r for r in (row("Which? " + "word " * k) for k in range(ctx)) if len(prompt(r)) + max_new - 1 > ctx)
    assert len(prompt(long)) < ctx  # (room for an answer of its own, shorter than max_new)
    rows = [row("Which?"), long, row("And which one?")]
    asked = []

    def fake_generate(model, prompts, images, sampling, **kwargs):
        asked.append([len(p) for p in prompts])
        return [tok.encode(f" {len(p)}") + [tok.eos_id] for p in prompts]  # each answer names its prompt's length

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    model = torch.nn.Linear(1, 1)  # (never run: generate is faked)
    model.cfg = cfg
    answers = evaluate.open_answers(model, rows, tok, None, cfg.n_image_tokens, batch_questions=3,
                                    max_new_tokens=max_new)
    lengths = [len(prompt(r)) for r in rows]
    assert asked == [[lengths[0], lengths[2]], [lengths[1]]]  # the long one alone, after the others
    assert [int(a) for a in answers] == lengths  # each answer back at its own row

def test_bits_per_byte_counts_bits_over_utf8_bytes(data):
    from nanovl.data import Source, collate
    from nanovl.evaluate import bits_per_byte
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    rows = [{"text": "Naïve café, 20 °C: déjà vu. " * 30}, {"text": "Short one."}]
    uniform = FavouriteTokens(tok.vocab_size)  # every token costs log(V) nats, log2(V) bits
    pieces = Source(rows, "text", tok, 4, max_len=64).samples
    assert len(pieces) > 2  # the long text is cut into pieces
    _, targets, _ = collate(pieces, tok.pad_id)
    n_bytes = sum(len(r["text"].encode("utf-8")) for r in rows)
    assert n_bytes > sum(len(r["text"]) for r in rows)  # multibyte characters
    expected = int((targets != -100).sum()) * math.log2(tok.vocab_size) / n_bytes
    assert bits_per_byte(uniform, rows, tok, 4, max_len=64) == pytest.approx(expected, rel=1e-6)
    one = [{"text": "Short one."}]  # a single piece: scored too
    _, targets, _ = collate(Source(one, "text", tok, 4, max_len=64).samples, tok.pad_id)
    assert bits_per_byte(uniform, one, tok, 4, max_len=64) == pytest.approx(
        int((targets != -100).sum()) * math.log2(tok.vocab_size) / 10, rel=1e-6)


def test_held_out_text_is_scored_by_the_summed_loss_never_by_each_positions_logits(data):
    # Every position of a text is supervised: scored as the questions' answers are (reduction="none"), a batch of
    # 8 x 4096 tokens would make 13 GB of fp32 logits at the released vocabulary. The summed loss (training's chunked
    # path) gives the same bits.
    from nanovl.data import Source, collate
    from nanovl.evaluate import sequence_nll, text_bits
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = DeepSeekVL(cfg).eval()
    rows = [{"text": "the red circle is left of the blue square. " * 12}, {"text": "Short one."}]
    asked = []
    llm_forward = model.llm.forward
    model.llm.forward = lambda *a, **kw: asked.append(kw.get("reduction")) or llm_forward(*a, **kw)
    bits = text_bits(model, rows, tok, cfg.n_image_tokens, 64, batch_size=2)
    assert asked and set(asked) == {"sum"}
    ids, targets, _ = collate(Source(rows, "text", tok, cfg.n_image_tokens, 64).samples, tok.pad_id)
    with torch.no_grad():
        each = sequence_nll(model, ids, targets, "cpu").sum().item() / math.log(2)
    assert bits == pytest.approx(each, rel=1e-5)



class PieceLengths(torch.nn.Module):
    """A stand-in model whose loss at each supervised position is the number of tokens before it in its row: the
    summed loss of a text then tells how long the pieces it was cut into were."""

    def __init__(self):
        super().__init__()
        self.w, self.cfg = torch.nn.Parameter(torch.zeros(1)), get_config("tiny")

    def forward(self, ids, image_embeds=None, targets=None, reduction="none"):
        nll = torch.arange(ids.shape[1], dtype=torch.float32).expand(ids.shape) * (targets != -100)
        return None, nll.sum() if reduction == "sum" else nll


def test_an_evaluation_scores_text_in_pieces_of_the_whole_context(data):
    # Every stage's bits per byte is scored in pieces of the model's whole context (evaluate's docstring: scored at
    # other lengths, the figures of the stages would not compare).
    from nanovl.evaluate import bits_per_byte
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    rows = [{"text": " ".join(f"word{i}" for i in range(400))}]
    model, ctx = PieceLengths(), get_config("tiny").llm.max_seq_len
    whole, half = (bits_per_byte(model, rows, tok, 36, max_len=n) for n in (ctx, ctx // 2))
    assert whole != pytest.approx(half)  # the text is longer than half the context: the lengths tell
    assert evaluate.evaluate(model, (None, rows), tok, None)[2] == pytest.approx(whole, rel=1e-6)

def test_held_out_text_refuses_blank_rows_and_reads_an_empty_file_as_no_text(tmp_path):
    path = tmp_path / "eval_text.jsonl"
    path.write_text('{"text": "a"}\n{"text": " \\n "}\n')
    with pytest.raises(ValueError, match="eval_text.jsonl, line 2: 'text' must be a string of text"):
        evaluate.held_out_text(str(tmp_path))
    path.write_text("\n")
    assert evaluate.held_out_text(str(tmp_path)) is None  # no text to score: no bits per byte, rather than 0
    # Half of a character, as a JSON escape (a tool cut an emoji in two): refused as the file is read, where it had
    # passed these checks and stopped the run with a traceback at its evaluation, after training (any JSON-lines
    # file: the questions, the training rows). A whole pair, and an escaped backslash before "u", are text.
    path.write_text('{"text": "a \\ud83d\\ude00 b"}\n{"text": "C:\\\\udf8 c"}\n{"text": "x \\ud800 y"}\n')
    with pytest.raises(ValueError, match=r"eval_text.jsonl, line 3: the text holds half of a character \('\\ud800', a "
                                         "lone surrogate: text cut in the middle of an emoji"):
        evaluate.held_out_text(str(tmp_path))
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    assert [r["text"] for r in evaluate.held_out_text(str(tmp_path))] == ["a \U0001f600 b", "C:\\udf8 c"]


def test_an_evaluation_leaves_the_model_in_the_mode_it_found_and_its_table_lists_categories_alone():
    model = torch.nn.Linear(1, 1)
    model.cfg = get_config("tiny")
    for training in (True, False):
        model.train(training)
        assert evaluate.evaluate(model, (None, None), None, None) == (None, None, None)
        assert model.training is training
    table = evaluate.format_table({"caption": 0.5, "code": 1.0, "mean": 0.75, "chance": 0.25}, 1.25, "stage 3")
    assert table.splitlines() == ["stage 3", f"{'category':<14}{'MCPPL accuracy':>16}", f"{'caption':<14}{50.0:>15}%",
                                  f"{'code':<14}{100.0:>15}%", f"{'mean':<14}{75.0:>15}%   (chance 25.0%)",
                                  "text bits per byte: 1.250"]


def test_a_bad_held_out_question_is_named_before_training(tmp_path):
    from nanovl.evaluate import read_mc_rows
    row = {"category": "code", "images": [], "question": "Which?", "options": ["a", "b"], "answer": 1}
    path = tmp_path / "eval_mc.jsonl"
    for bad, why in [({"answer": 2}, "'answer' must be the index of the right option, 0 to 1, got 2"),
                     ({"options": "ab"}, "'options' must be a list of at least 2 strings, got 'ab'"),
                     ({"options": [1, 2]}, r"'options' must be a list of at least 2 strings, got \[1, 2\]"),
                     ({"options": ["a", " a"]}, "'options' must be different in any case and spacing, and not empty"),
                     ({"options": ["Notes", "notes"]}, "'options' must be different in any case and spacing"),
                     ({"options": ["a", " "]}, "'options' must be different in any case and spacing, and not empty"),
                     ({"question": "<image_placeholder> Which?"}, "<image_placeholder> in the question or an option"),
                     ({"question": "<image>\nWhich?", "images": ["a.png"]}, "LLaVA's <image> tag in the question"),
                     ({"question": " "}, "'question' must be a string of text, got ' '"),
                     ({"category": 3}, "'category' must be a string, got 3"),
                     ({"category": "mean"}, "'category' may not be 'mean', which the results use"),
                     ({"category": "chance"}, "'category' may not be 'chance', which the results use"),
                     ({"options": ["a"]}, r"'options' must be a list of at least 2 strings, got \['a'\]"),
                     ({"answer": True}, "'answer' must be the index of the right option, 0 to 1, got True"),
                     ({"answer": -1}, "'answer' must be the index of the right option, 0 to 1, got -1"),
                     ({"images": [1]}, r"'images' must be a list of paths \(empty for a question without one\)"),
                     ({"images": None}, r"'images' must be a list of paths \(empty for a question without one\), got "
                                        "None")]:
        path.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, **bad)) + "\n")
        with pytest.raises(ValueError, match=f"line 2: {why}"):
            read_mc_rows(str(path))
    path.write_text(json.dumps(row) + "\n")
    assert [r["answer"] for r in read_mc_rows(str(path))] == [1]
    path.write_text("\n")
    with pytest.raises(ValueError, match="eval_mc.jsonl holds no questions"):
        read_mc_rows(str(path))


def test_bad_held_out_text_or_images_stop_a_run_before_it_trains_and_a_finished_stage_resumes(data, start_weights,
                                                                                                tmp_path, capsys,
                                                                                                monkeypatch):
    import shutil
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    text, mc = (copy / "eval_text.jsonl").read_text(), (copy / "eval_mc.jsonl").read_text()
    args = ["--data", str(copy), "--stage", "1", "--init_from", start_weights, "--steps", "2", "--batch_size", "2",
            "--workers", "0", "--log_every", "1"]
    (copy / "eval_text.jsonl").write_text(text.replace('"text": ', '"text": 5, "was": ', 1))
    with pytest.raises(SystemExit, match=r"eval_text.jsonl, line 1: 'text' must be a string of text, without "):
        train.main(args + ["--out", str(tmp_path / "a")])
    (copy / "eval_text.jsonl").write_text(text)
    long_option = mc.replace('"options": ["', '"options": ["' + "very " * 400, 1)  # past the 512-token context
    (copy / "eval_mc.jsonl").write_text(long_option)
    with pytest.raises(SystemExit, match=r"eval_mc.jsonl, line 1: with its 1 image .36 tokens each., the question and "
                                         r"its longest option make \d+ input tokens, but the model's context is 512"):
        train.main(args + ["--out", str(tmp_path / "b")])
    with monkeypatch.context() as m:  # --eval-only says so before it builds the weights (minutes for a 7B)
        m.setattr(checkpoint, "build_loaded", lambda *a, **k: pytest.fail("the weights were loaded first"))
        with pytest.raises(SystemExit, match=r"eval_mc.jsonl, line 1: with its 1 image .36 tokens each., the "
                                             r"question and its longest option make \d+ input tokens, but the "
                                             r"model's context is 512"):
            train.main(["--eval-only", "--ckpt", start_weights, "--data", str(copy)])
    # The model reads all but an answer's last token: a question whose longest option makes context + 1 ids fits.
    from nanovl.evaluate import check_fits, option_samples
    row = dict(json.loads(mc.splitlines()[0]), _where="q")
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    ids = max(len(s.ids) for s in option_samples(row, tok, 36))
    check_fits([row], tok, 36, ids - 1)
    with pytest.raises(ValueError, match=f"make {ids - 1} input tokens, but the model's context is {ids - 2}"):
        check_fits([row], tok, 36, ids - 2)
    with pytest.raises(ValueError, match="^q: the question and its longest option make"):  # (no images to name)
        check_fits([dict(row, images=[], question=row["question"].replace(IMAGE_TAG, ""))], tok, 36, 5)
    (copy / "eval_mc.jsonl").write_text(mc)
    first_image = json.loads(mc.splitlines()[0])["images"][0]
    image = (copy / first_image).read_bytes()
    (copy / first_image).write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=rf"eval_mc.jsonl, line 1: cannot read image .*{first_image}"):
        train.main(args + ["--out", str(tmp_path / "b")])
    (copy / first_image).write_bytes(image)
    assert not any(os.path.exists(tmp_path / out / "stage1" / "ckpt.pt") for out in "ab")  # no step was trained
    # Stage 0 reads only the held-out text; a folder without it (or with an empty one) trains, unevaluated, instead of
    # failing at the end.
    for empty, out in ((False, "c"), (True, "d")):
        if empty:
            (copy / "eval_text.jsonl").write_text("")
        else:
            (copy / "eval_text.jsonl").unlink()
        capsys.readouterr()
        train.main(["--data", str(copy), "--stage", "0", "--out", str(tmp_path / out), "--steps", "1",
                    "--batch_size", "4"] + FAST + ["--warmup", "1"] * empty)
        printed = capsys.readouterr().out
        assert "has no held-out text (eval_text.jsonl), so stage 0 is not evaluated" in printed
        # (tiny's stage 0 warms up over 20 steps; --warmup 1 reaches the peak at the one step)
        warned = ("stage 0: its one step ends inside the learning rate's warm-up of 20 steps, so the rate never "
                  "reaches its peak, 0.003 (a smaller --warmup reaches it)")
        assert warned in printed if not empty else "learning rate's warm-up" not in printed
        assert json.loads((tmp_path / out / "stage0" / "eval.json").read_text())["bpb"] is None
    # A finished stage is skipped by --resume even when the weights it started from are gone (only ckpt.pt is kept
    # for resuming; the stage before may have been removed to save the space).
    train.main(["--data", str(copy), "--stage", "1", "--out", str(tmp_path / "d"), "--resume", "--steps", "1",
                "--batch_size", "4"] + FAST + ["--init_from", str(tmp_path / "d" / "stage0")])
    shutil.rmtree(tmp_path / "d" / "stage0")
    capsys.readouterr()
    train.main(["--data", str(copy), "--stage", "1", "--out", str(tmp_path / "d"), "--resume", "--steps", "1",
                "--batch_size", "4"] + FAST)
    assert "stage 1: already finished" in capsys.readouterr().out


def test_stage0_rows_are_checked_before_training_and_a_bad_label_map_is_named_by_its_row(data, tmp_path):
    import shutil
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    rows = (copy / "stage0.jsonl").read_text().splitlines()
    args = ["--data", str(copy), "--stage", "0", "--steps", "2", "--batch_size", "4"] + FAST
    (copy / "stage0.jsonl").write_text("\n".join(rows[:2] + [rows[2].replace('"caption"', '"title"')] + rows[3:]))
    with pytest.raises(SystemExit, match=r"stage0.jsonl, line 3: a stage-0 row is \{\"image\": path, \"caption\".*"
                                         r"; got \{.*\"title\": \"[^\"]+\", \"seg\": \"images/[^\"]+\"\}$"):
        train.main(args + ["--out", str(tmp_path / "a")])
    (copy / "stage0.jsonl").write_text("\n".join(rows))
    for row in map(json.loads, rows):
        if row.get("seg"):
            (copy / row["seg"]).write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"stage 0, step 1: .*stage0.jsonl, line \d+: cannot read label map .*Fix or "
                                         "remove that row"):
        train.main(args + ["--out", str(tmp_path / "b")])
    from PIL import Image
    for row in map(json.loads, rows):  # label maps of the wrong size: shifted against their images, unseen
        if row.get("seg"):
            Image.new("L", (7, 5)).save(copy / row["seg"])
    with pytest.raises(SystemExit, match=r"stage 0, step 1: .*: label map .* is 7x5 but its image is \d+x\d+: padded "
                                         "to a square, its labels would be shifted"):
        train.main(args + ["--out", str(tmp_path / "c")])


def test_eval_limit_bounds_questions_per_category_and_text_rows(data):
    mc, text = evaluate.held_out(data)
    categories = sorted({r["category"] for r in mc})
    assert len(categories) > 1 and len(text) > 3
    mc3, text3 = evaluate.held_out(data, limit=3)
    # ceil(3 / categories) questions from each category, the first of each; and the first 3 text rows
    per = -(-3 // len(categories))
    assert mc3 == [r for c in categories for r in [r for r in mc if r["category"] == c][:per]]
    assert text3 == text[:3]



def test_eval_limit_rounds_each_categorys_share_up(tmp_path):
    # limit / categories questions from each category, rounded up: a limit of 3 over two categories takes 2 of each,
    # so that a limit never gives fewer questions than it says (rounded down, 1 of each).
    row = {"images": [], "question": "Which?", "options": ["a", "b"], "answer": 0}
    rows = [dict(row, category=c, question=f"Which {i}?") for c in ("chart", "code") for i in range(3)]
    (tmp_path / "eval_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mc, text = evaluate.held_out(str(tmp_path), limit=3)
    assert [(r["category"], r["question"]) for r in mc] == [(c, f"Which {i}?") for c in ("chart", "code")
                                                            for i in range(2)]
    assert text is None  # no eval_text.jsonl: nothing to score

def test_every_stage_runs_a_few_steps(data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main(["--data", data, "--out", out, "--steps", "2", "--batch_size", "4", "--micro_batch", "2"] + FAST)
    printed = capsys.readouterr().out
    for stage in range(4):
        folder = os.path.join(out, f"stage{stage}")
        for name in ("model.pt", "config.json", "ckpt.pt", "metrics.jsonl", "loss.png", "eval.json"):
            assert os.path.exists(os.path.join(folder, name)), (stage, name)
    assert "trainable parameters per module" in printed and "MCPPL accuracy" in printed
    # each stage started from the one before: weights SAM's trunk never trains after stage 0 are identical
    w0, w3 = load_model(os.path.join(out, "stage0")), load_model(os.path.join(out, "stage3"))
    assert torch.equal(w0["sam.blocks.0.attn.qkv.weight"], w3["sam.blocks.0.attn.qkv.weight"])
    for stage in (1, 2, 3):  # the one right before, not another earlier one
        assert f"stage {stage}: starting from {os.path.join(out, f'stage{stage - 1}', 'model.pt')}\n" in printed
    w1, w2 = load_model(os.path.join(out, "stage1")), load_model(os.path.join(out, "stage2"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if k.startswith("llm."))  # stage 1 trains the adaptor alone
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if k.startswith("siglip."))  # stage 2: not SigLIP
    assert not torch.equal(w0["llm.layers.0.mlp.up_proj.weight"], w3["llm.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("stage", [0, 1])
def test_a_steps_loss_learning_rates_and_clipping_are_the_recipes(data, start_weights, tmp_path, monkeypatch, stage):
    """The training loop against the recipe, computed here independently of it: the first step's logged loss is the
    model's loss on that step's batch (stage 0: the decoder's over the whole step's supervised tokens, plus the mean of
    the contrastive and dense losses over the micro-batches; stage 1, packed: each sample's loss computed on its own,
    unpacked, so attention and positions must stay inside each sample); every step's logged learning rate follows the
    schedule with --min_lr_ratio; each clipping group is clipped at --grad_clip every step; and the vision side
    trains at vision_lr_mult of the rate."""
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: clipped.append((len(params), max_norm)) or clip(params, max_norm))
    asked, ask = [], evaluate.open_answers  # (a random model names no option: its open accuracy alone shows nothing)
    monkeypatch.setattr(evaluate, "open_answers", lambda model, rows, *a, **k: asked.append(len(rows)) or
                        ask(model, rows, *a, **k))
    decoded, decode = [], ImageProcessor.pixels
    monkeypatch.setattr(ImageProcessor, "pixels", lambda self, image, *a: decoded.append(str(image)) or
                        decode(self, image, *a))
    out = str(tmp_path / "out")
    args = ["--data", data, "--stage", str(stage), "--out", out, "--steps", "3", "--batch_size", "4", "--micro_batch",
            "2", "--warmup", "0", "--min_lr_ratio", "0.5", "--grad_clip", "0.5", "--workers", "0", "--log_every", "1",
            "--eval_limit", "5", "--eval_every", "2"] + (["--init_from", start_weights, "--pack", "1"] if stage else [])
    on_disk, rate = [], recipe.learning_rate

    def watching(step, *a):  # metrics.jsonl as the third step starts: step 2's evaluation is in it already
        if step == 2:
            on_disk.extend(read_jsonl(os.path.join(out, f"stage{stage}", "metrics.jsonl")))
        return rate(step, *a)

    monkeypatch.setattr(train, "learning_rate", watching)
    train.main(args)
    assert [m["step"] for m in on_disk if "mc_mean" in m] == ([2] if stage else [])
    metrics = read_jsonl(os.path.join(out, f"stage{stage}", "metrics.jsonl"))
    # evaluated every 2 steps and at the end, both ways (stage 0, which has no questions to ask: at the end, text only)
    evals = [m for m in metrics if "bpb" in m]
    assert [m["step"] for m in evals] == ([2, 3] if stage else [3])
    assert asked == ([len(evaluate.held_out(data, 5)[0])] * 2 if stage else [])  # the questions asked open, each time
    # each held-out image decoded once, though read four times (two evaluations, MCPPL and asked open in each)
    held = [os.path.join(data, image) for row in (evaluate.held_out(data, 5)[0] if stage else []) for image in
            row["images"]]
    assert sorted(path for path in decoded if path in held) == sorted(set(held))
    assert all(0 <= m["mc_mean"] <= 1 and 0 <= m["open_mean"] <= 1 if stage else m["mc_mean"] is m["open_mean"] is None
               for m in evals)

    tc, _ = train.parse_args(args)
    cfg = get_config("tiny")
    hp, seq_len, stc = recipe.stage_hparams(stage, tc, cfg)
    assert [m["lr"] for m in metrics if "loss" in m] == [recipe.learning_rate(s, hp, 0.5) for s in range(3)]
    assert recipe.learning_rate(2, hp, 0.5) != recipe.learning_rate(2, hp, 0.1)  # (the ratio shows at step 3)
    micro, accum = recipe.split_batch(stage, hp, 1)
    assert (micro, accum) == (2, 2)
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    if stage == 0:  # held-out text is scored in pieces of the model's context, as in every stage, not of stage 0's 128
        from nanovl.evaluate import bits_per_byte
        trained = DeepSeekVL(cfg).eval()
        trained.load_state_dict(load_model(os.path.join(out, "stage0")))
        rows = read_jsonl(os.path.join(data, "eval_text.jsonl"))[:5]
        assert seq_len == 128 and cfg.llm.max_seq_len == 512
        assert evals[-1]["bpb"] == pytest.approx(bits_per_byte(trained, rows, tok, cfg.n_image_tokens, 512), rel=1e-6)
        assert evals[-1]["bpb"] != pytest.approx(bits_per_byte(trained, rows, tok, cfg.n_image_tokens, 128), rel=1e-3)
    else:  # the final evaluation is the trained model's, both ways, as nanovl.evaluate computes them
        from nanovl.evaluate import open_questions
        trained = DeepSeekVL(cfg).eval()
        trained.load_state_dict(load_model(os.path.join(out, "stage1")))
        mc_rows, proc = evaluate.held_out(data, 5)[0], ImageProcessor.for_config(cfg)
        result = json.loads(open(os.path.join(out, "stage1", "eval.json")).read())
        assert result["mc"] == multiple_choice(trained, mc_rows, tok, proc, cfg.n_image_tokens, root=data)
        assert result["open"] == open_questions(trained, mc_rows, tok, proc, cfg.n_image_tokens, root=data)
    quiet = lambda *a, **k: None
    planned, plan = [], train.plan_batches
    monkeypatch.setattr(train, "plan_batches", lambda *a: planned.append(a[5:6]) or plan(*a))  # (its lengths)
    dataset = train.stage_batches(stage, stc, hp, cfg, tok, ImageProcessor.for_config(cfg), seq_len, micro, accum, 0,
                                  1, quiet)
    if stage:  # packed: the rows are planned with the tokens each sample then takes in them, and fit
        m = dataset.plan[0][0]  # step 1's modality
        for k in range(accum):  # step 1's micro-batches
            doc_ids = dataset[k][3]
            for b, row in enumerate(dataset.rows(k)):
                assert [int((doc_ids[b] == j).sum()) for j in range(len(row))] == [planned[0][0][m][i] for i in row]
        assert all(sum(planned[0][0][m][i] for i in row) <= seq_len for m, rows in dataset.plan for row in rows)
    model, net = train.stage_model(stage, tc, cfg, [start_weights], False, quiet)  # the run's starting weights
    n_groups = 3 if stage == 0 else 1
    trainable = sum(p.requires_grad for p in net.parameters())
    assert len(clipped) == 3 * n_groups and all(max_norm == 0.5 for _, max_norm in clipped)  # every group, every step
    assert sum(n for n, _ in clipped[:n_groups]) == trainable

    with torch.no_grad():
        micros = [dataset[k] for k in range(accum)]  # step 1's micro-batches
        if stage == 0:  # the decoder's summed loss, SigLIP's contrastive loss and SAM's dense loss, each on its own
            n_sup = sum((m["targets"] != -100).sum() for m in micros)
            lm = [model.llm(m["ids"], targets=m["targets"], reduction="sum")[1] for m in micros]
            heads = net.heads
            aux = [heads.contrastive_loss(model, m["pair_images"], m["cap_ids"], m["cap_len"]) +
                   heads.segmentation_loss(model.sam, m["seg_images"], m["seg_labels"]) for m in micros]
            assert all("seg_images" in m for m in micros)  # (so the dense loss is in the step)
            expected = sum(lm) / n_sup + sum(aux) / accum
        else:
            total, n_sup = 0.0, 0
            for ids, targets, images, doc_ids in micros:
                assert doc_ids.max() > 0  # rows hold several samples
                images = list(images)
                for b in range(ids.shape[0]):
                    for j in range(int(doc_ids[b].max()) + 1):
                        keep = doc_ids[b] == j
                        x, y = ids[b, keep][None], targets[b, keep][None]
                        n_img = int((x == cfg.image_token_id).sum()) // cfg.n_image_tokens
                        mine, images = images[:n_img], images[n_img:]
                        _, loss = model(x, torch.stack(mine) if mine else None, targets=y, reduction="sum")
                        total, n_sup = total + loss, n_sup + int((y != -100).sum())
            expected = total / n_sup
    assert metrics[0]["loss"] == pytest.approx(float(expected), abs=2e-5)

    groups = torch.load(os.path.join(out, f"stage{stage}", "ckpt.pt"), weights_only=True)["optimizer"]["param_groups"]
    vision = [n for n, p in net.named_parameters() if p.requires_grad and n.removeprefix("model.").startswith(
        ("siglip.", "sam."))]
    mult = 1.0 if stage == 0 else 0.1  # the from-scratch default: stages 1-3 hold the vision side nearly still
    assert len(groups) == 2 and len(groups[1]["params"]) == len(vision) > 0
    assert groups[1]["lr"] == pytest.approx(mult * groups[0]["lr"]) and groups[0]["lr"] == metrics[-2]["lr"]


def test_gradient_accumulation_normalises_over_the_whole_step(data, start_weights, tmp_path):
    common = ["--data", data, "--stage", "3", "--init_from", start_weights, "--steps", "3", "--batch_size", "8",
              "--eval_limit", "5", "--workers", "0"]
    train.main(common + ["--out", str(tmp_path / "a"), "--micro_batch", "8"])
    train.main(common + ["--out", str(tmp_path / "b"), "--micro_batch", "2"])  # 4 micro-batches of unequal lengths
    a, b = load_model(tmp_path / "a" / "stage3"), load_model(tmp_path / "b" / "stage3")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_every_stages_batches_survive_pickling_as_spawned_data_workers_need(data):
    """On macOS and Windows a DataLoader worker is a fresh process that gets the dataset pickled (Linux forks, so a
    dataset holding a lambda or an open file would break there only): each stage's batches pickle, and the copy
    gives the same micro-batches."""
    import pickle

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    cfg = get_config("tiny")
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    for stage in (1, 2, 3, 0):  # (stage 0 last: its batches are looked at again below)
        tc, _ = train.parse_args(["--data", data, "--stage", str(stage), "--steps", "3", "--batch_size", "4",
                                  "--micro_batch", "2"])
        hp, seq_len, stc = recipe.stage_hparams(stage, tc, cfg)
        micro, accum = recipe.split_batch(stage, hp, 1)
        dataset = train.stage_batches(stage, stc, hp, cfg, tok, ImageProcessor.for_config(cfg), seq_len, micro,
                                      accum, 0, 1, lambda *a, **k: None)
        copy = pickle.loads(pickle.dumps(dataset))
        assert len(copy) == len(dataset) == 3 * accum
        assert all(same(copy[k], dataset[k]) for k in (0, len(dataset) - 1)), stage
        assert copy.fingerprint() == dataset.fingerprint()  # (what a checkpoint keeps, a resume compares)
    # Stage 0's fingerprint holds its image-caption pairs, its scenes and their plans too.
    seen = dataset.fingerprint()
    for what, where in (("caption", copy.pairs), ("seg", copy.scenes)):
        where[0] = {**where[0], what: "other"}
        assert copy.fingerprint()["sources"] != seen["sources"]
        seen = copy.fingerprint()
    copy.plan_scenes = copy.plan_scenes[::-1]
    assert copy.fingerprint()["plan"] != seen["plan"] and copy.fingerprint()["sources"] == seen["sources"]


def test_resume_is_bitwise_identical(data, start_weights, tmp_path):
    # Logged every 4 steps, checkpointed every 3: the losses since the last log go into the metrics at each
    # checkpoint, or a resumed run would have lost them. Evaluated every 3: at step 3 and once at the end.
    common = ["--data", data, "--stage", "2", "--init_from", start_weights, "--steps", "6", "--batch_size", "4",
              "--micro_batch", "2", "--ckpt_every", "3", "--eval_limit", "5", "--workers", "1", "--log_every", "4",
              "--eval_every", "3"]
    run(common + ["--out", str(tmp_path / "whole")])
    printed = run(common + ["--out", str(tmp_path / "killed"), "--stop_after", "3"])
    assert "stopping after step 3" in printed and not os.path.exists(tmp_path / "killed" / "stage2" / "model.pt")
    # Step 3's checkpoint is written before its evaluation (a run killed while evaluating loses no steps), and the
    # resume evaluates those weights.
    assert "stage 2, step 3" not in printed
    printed = run(common + ["--out", str(tmp_path / "killed"), "--resume"])
    assert "resuming from" in printed and "at step 3" in printed and "stage 2, step 3" in printed
    assert "resuming on" not in printed  # (the same data and plan: data_change says nothing)
    whole, resumed = load_model(tmp_path / "whole" / "stage2"), load_model(tmp_path / "killed" / "stage2")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    logged = [[(m["step"], m.get("loss"), m.get("mc_mean"))
               for m in read_jsonl(tmp_path / folder / "stage2" / "metrics.jsonl")]
              for folder in ("whole", "killed")]
    assert logged[0] == logged[1]
    assert [s for s, loss, _ in logged[0] if loss is not None] == [3, 4, 6]
    assert [s for s, _, mc in logged[0] if mc is not None] == [3, 6]
    # Each log counts the modality groups of its steps (the plan's): 3, 1 and 2 steps, resumed or not.
    groups = [[m["groups"] for m in read_jsonl(tmp_path / folder / "stage2" / "metrics.jsonl") if "loss" in m]
              for folder in ("whole", "killed")]
    assert groups[0] == groups[1] and [sum(g.values()) for g in groups[0]] == [3, 1, 2]
    assert set().union(*groups[0]) <= {"language", "multimodal", "sft", "text_sft"}


def test_a_checkpoint_that_does_not_fit_the_stage_is_refused_in_a_line_and_kept(data, start_weights, tmp_path,
                                                                                 monkeypatch):
    # Whole files of this stage and config, with weights, optimizer, random state or step as another version of
    # train.py (or an edit) would leave them: each stopped the resume with a traceback from load_state_dict,
    # set_rng_state or a comparison.
    common = ["--data", data, "--stage", "3", "--steps", "4", "--batch_size", "2", "--micro_batch", "2",
              "--ckpt_every", "2", "--workers", "0", "--eval_limit", "5", "--out", str(tmp_path / "run")]
    run(common + ["--init_from", start_weights, "--stop_after", "2"])
    ckpt = tmp_path / "run" / "stage3" / "ckpt.pt"
    good = ckpt.read_bytes()
    for change, said in [(dict(model={"llm.norm.weight": torch.ones(3)}), "size mismatch for llm.norm.weight"),
                         (dict(model={}), 'Missing key.s. in state_dict: "siglip.pos_embed"'),
                         (dict(optimizer={"state": {}, "param_groups": []}), "different number of parameter groups"),
                         (dict(rng={"python": 1}), "not subscriptable"),
                         (dict(step="2"), "its step is '2', where one of 1 to 4 was expected"),
                         (dict(step=9), "its step is 9, where one of 1 to 4 was expected")]:
        state = torch.load(io.BytesIO(good), weights_only=True)
        state.update({k: {**state[k], **v} if k == "model" and v else v for k, v in change.items()})
        torch.save(state, ckpt)
        changed = ckpt.read_bytes()
        with pytest.raises(SystemExit, match=rf"^{re.escape(str(ckpt))} does not fit this stage's model, optimizer or "
                                             rf"steps \(written by another version of train.py, or changed since\?\): "
                                             rf".*{said}.*\. Restore it, or move the stage folder, .*, aside to train "
                                             "stage 3 again$"):
            train.main(common + ["--resume"])
        assert ckpt.read_bytes() == changed  # kept as it was, for whoever restores it
    # Out of GPU memory as AdamW's moments move there is no fault of the file: not said to be one
    ckpt.write_bytes(good)

    def no_memory(self, state):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 56.00 GiB")

    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", no_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="Tried to allocate"):
        train.main(common + ["--resume"])
    monkeypatch.undo()
    # --init_from a model.pt of the right config whose weights do not fit it: each key named, as load_model names them
    init = tmp_path / "init.pt"
    state = torch.load(start_weights, weights_only=True)
    state["model"]["llm.norm.weight"] = torch.ones(3)
    del state["model"]["siglip.pos_embed"]
    torch.save(state, init)
    with pytest.raises(SystemExit, match=r"init.pt does not match the model it describes .*\n  1 missing: "
                                         r"siglip.pos_embed\n  1 with the wrong shape: llm.norm.weight: file \(3,\)"):
        train.main(common[:-1] + [str(tmp_path / "fresh"), "--init_from", str(init)])
    assert not os.path.exists(tmp_path / "fresh")


def test_a_full_disk_stops_the_run_in_a_line_keeping_the_last_checkpoint_whole(data, start_weights, tmp_path,
                                                                                monkeypatch):
    common = ["--data", data, "--stage", "3", "--init_from", start_weights, "--steps", "4", "--batch_size", "4",
              "--micro_batch", "2", "--ckpt_every", "2", "--out", str(tmp_path / "o")] + FAST
    folder, plain, saves = tmp_path / "o" / "stage3", torch.save, []

    def fills_up(obj, f, *args, **kwargs):  # the disk is full when the second checkpoint is half written
        saves.append(f.name)
        if len(saves) == 2:
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        plain(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(SystemExit, match=r"stage 3: cannot write .*ckpt.pt: No space left on device\. Its last "
                                         r"checkpoint, .*ckpt.pt \(step 2\), is kept: run the same command with "
                                         r"--resume"):
        train.main(common)
    assert sorted(os.listdir(folder)) == ["ckpt.pt", "metrics.jsonl", "tokenizer.json"]  # no temporary file left
    assert torch.load(folder / "ckpt.pt", weights_only=True)["step"] == 2  # the first checkpoint, whole
    monkeypatch.setattr(torch, "save", plain)  # space freed: the run goes on from step 2
    train.main(common + ["--resume"])
    assert (folder / "eval.json").exists()


def test_a_sigterm_stops_the_run_as_ctrl_c_does_keeping_the_last_checkpoint_whole(data, start_weights, tmp_path,
                                                                                 monkeypatch):
    # kill's default signal, or a cluster's preemption, arriving while the second checkpoint is half written
    common = ["--data", data, "--stage", "3", "--init_from", start_weights, "--steps", "4", "--batch_size", "4",
              "--micro_batch", "2", "--ckpt_every", "2", "--out", str(tmp_path / "o")] + FAST
    folder, plain, saves = tmp_path / "o" / "stage3", torch.save, []

    def terminated_midway(obj, f, *args, **kwargs):
        saves.append(f.name)
        if len(saves) == 2:
            f.write(b"half a checkpoint")
            assert signal.getsignal(signal.SIGTERM) is not before  # (else the signal would end pytest itself)
            os.kill(os.getpid(), signal.SIGTERM)
        plain(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", terminated_midway)
    let_go, lets_go = [], train.let_go_of_workers  # (the stage's data workers shut down at once: the test below)
    monkeypatch.setattr(train, "let_go_of_workers", lambda e: let_go.append(type(e)) or lets_go(e))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match=r"stage 3: stopped by SIGTERM\. Its last checkpoint, .*ckpt.pt \(step 2\), "
                                         "is kept: run the same command with --resume"):
        train.main(common)
    assert signal.getsignal(signal.SIGTERM) == before  # the handler was train.main's only while it ran
    assert let_go == [runs.Terminated]
    assert sorted(os.listdir(folder)) == ["ckpt.pt", "metrics.jsonl", "tokenizer.json"]  # no temporary file left
    assert torch.load(folder / "ckpt.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(torch, "save", plain)
    train.main(common + ["--resume"])
    assert (folder / "eval.json").exists()


def test_a_file_this_user_may_not_read_ends_the_run_in_a_line_that_names_it(monkeypatch):
    # Another user's checkpoint, tokenizer or start weights, read anywhere in the run (--resume, --init_from,
    # --eval-only): a line naming the file, not a traceback. (Root reads any file: the run plays the refusal here; a
    # chmod 000 model.pt and tokenizer.json, read by another user with --eval-only, were checked by hand.)
    def denied(*args):
        raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere/stage3/model.pt")

    monkeypatch.setattr(train, "train_or_evaluate", denied)
    with pytest.raises(SystemExit, match=r"^cannot read or write /elsewhere/stage3/model.pt: Permission denied \(the "
                                         r"user running this may not read or write it\)$"):
        train.main(["--eval-only", "--ckpt", "/elsewhere/stage3"])


def test_ctrl_c_while_starting_ends_the_run_in_one_line(tmp_path):
    # Ctrl-C in the first second or two, while torch is imported (it gave a traceback from importlib's frames), or
    # while no stage is training: a line, as a stage gives (and so do prepare_data.py and sample.py while they
    # import). Stood in for by an import, and by a call of main's, that raise KeyboardInterrupt, as a Ctrl-C would.
    (tmp_path / "fake" / "PIL").mkdir(parents=True)
    (tmp_path / "fake" / "PIL" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    for script, status, line in (("prepare_data.py", 1, "interrupted while starting: nothing was written"),
                                 ("sample.py", 130, "(interrupted)")):
        done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == status and done.stderr.strip() == line
    starting = "import nanovl, runpy, sys\n" \
               "def interrupted(*args, **kwargs):\n    raise KeyboardInterrupt\n" \
               "nanovl.get_config = interrupted\n" \
               f"sys.argv = ['train.py', '--out', {str(tmp_path / 'o')!r}]\n" \
               "runpy.run_path('train.py', run_name='__main__')\n"
    for cmd, env, line in (([sys.executable, "train.py", "--out", str(tmp_path / "o")], env,
                            "interrupted while starting: nothing was written"),
                           ([sys.executable, "-c", starting], os.environ, "interrupted while no stage was training")):
        for rank in ("0", "1"):  # under torchrun, the first process says it for all; the others stop without a word
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(env, RANK=rank), timeout=300)
            assert done.returncode == 1 and done.stderr.strip() == (line if rank == "0" else "")
            assert not os.path.exists(tmp_path / "o")


def test_a_stopped_stage_lets_go_of_its_workers_at_once_without_a_traceback_for_those_the_signal_killed(monkeypatch):
    # What a SIGTERM to the process group left behind: the stage's frame holds a loader whose shutdown raises (torch's
    # SIGCHLD handler, for a worker killed by the signal) and printed "Exception ignored in ..." at exit.
    heard, shut = [], []

    class Loader:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            shut.append(self.error)
            raise RuntimeError(self.error)

    def stage(error):
        batches = Loader(error)  # noqa: F841 (held by the frame, as run_stage holds its loader)
        raise runs.Terminated()

    def hook(unraisable):
        heard.append(str(unraisable.exc_value))

    monkeypatch.setattr(sys, "unraisablehook", hook)
    for error in ("DataLoader worker (pid 7) is killed by signal: Terminated. ", "a bug in a destructor"):
        try:
            stage(error)
        except runs.Terminated as e:
            train.let_go_of_workers(e)
            assert shut[-1] == error  # shut down now, not when Python tidies up
    assert heard == ["a bug in a destructor"]  # anything else still said
    assert sys.unraisablehook is hook  # (put back)


@pytest.mark.skipif(torch.multiprocessing.get_start_method() != "fork",
                    reason="the patched image reader reaches the worker only in a forked process")
def test_a_data_worker_killed_stops_the_run_in_a_line_that_says_what_to_lower(data, start_weights, tmp_path,
                                                                             monkeypatch):
    # What the kernel's out-of-memory killer does to a DataLoader worker (each holds up to --image_cache MB).
    common = ["--data", data, "--stage", "3", "--init_from", start_weights, "--steps", "12", "--batch_size", "2",
              "--micro_batch", "2", "--ckpt_every", "2", "--short_chat_share", "0", "--text_sft_share", "0",
              "--out", str(tmp_path / "o"), "--eval_limit", "10", "--workers", "1"]
    readable, parent, ckpt = ImageProcessor.pixels, os.getpid(), tmp_path / "o" / "stage3" / "ckpt.pt"

    def killed_later(self, image):
        if os.getpid() != parent and ckpt.exists():  # in the worker (ahead by a few steps), once a checkpoint is
            os.kill(os.getpid(), signal.SIGKILL)
        return readable(self, image)

    monkeypatch.setattr(ImageProcessor, "pixels", killed_later)
    with pytest.raises(SystemExit, match=r"stage 3: DataLoader worker \(pid.*\) .*killed for memory, most often: run "
                                         r"again with fewer --workers or a smaller --image_cache\)\. Its last "
                                         r"checkpoint, .*ckpt.pt \(step (\d+)\), is kept: run the same command "
                                         r"with --resume") as stopped:
        train.main(common)
    step = torch.load(ckpt, weights_only=True)["step"]
    assert step in (2, 4, 6, 8, 10) and f"(step {step})" in str(stopped.value)


def test_a_run_killed_for_memory_resumes_with_a_smaller_micro_batch_except_in_stage_0(data, start_weights, tmp_path,
                                                                                      capsys):
    common = ["--data", data, "--stage", "3", "--init_from", start_weights, "--steps", "4", "--batch_size", "4",
              "--ckpt_every", "2", "--eval_limit", "5", "--workers", "0"]
    train.main(common + ["--out", str(tmp_path / "whole"), "--micro_batch", "4"])
    run(common + ["--out", str(tmp_path / "killed"), "--micro_batch", "4", "--stop_after", "2"])
    shutil.copytree(tmp_path / "killed", tmp_path / "killed2")
    printed = run(common + ["--out", str(tmp_path / "killed2"), "--resume"], torchrun=2)  # micro_batch 4 -> 2 each
    assert "resuming with 2 process(es) x micro_batch 2 where the checkpoint's run had 1 x 4" in printed
    capsys.readouterr()
    train.main(common + ["--out", str(tmp_path / "killed"), "--micro_batch", "1", "--resume"])
    assert ("resuming with 1 process(es) x micro_batch 1 where the checkpoint's run had 1 x 4: each step takes the same"
            " samples" in capsys.readouterr().out)
    whole = load_model(tmp_path / "whole" / "stage3")
    for resumed in (load_model(tmp_path / "killed" / "stage3"), load_model(tmp_path / "killed2" / "stage3")):
        assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-5
    # Stage 0 counts its contrastive pairs and scenes per micro-batch: there the split is part of the run.
    state = torch.load(tmp_path / "killed" / "stage3" / "ckpt.pt", weights_only=True)
    stage0 = tmp_path / "s0" / "stage0"
    stage0.mkdir(parents=True)
    torch.save(dict(state, stage=0, hparams=recipe.stage_defaults("tiny", 0), step=2), stage0 / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"other training settings:\n  --micro_batch: checkpoint 4 vs now 2\npass the "
                                         r"same settings to resume it \(to fit in less memory, --grad_ckpt may"):
        train.main(["--data", data, "--stage", "0", "--out", str(tmp_path / "s0"), "--resume", "--micro_batch", "2"])
    with pytest.raises(SystemExit, match=r"run of 1 process\(es\) x micro_batch 1; this one would be 1 x 4\. Stage 0"):
        train.main(["--data", data, "--stage", "0", "--out", str(tmp_path / "s0"), "--resume"])  # split [1, 1] saved


def test_two_processes_match_one_with_the_same_global_batch(data, start_weights, tmp_path):
    common = ["--data", data, "--stage", "3", "--init_from", start_weights, "--steps", "3", "--batch_size", "8",
              "--eval_limit", "5", "--workers", "0"]
    run(common + ["--out", str(tmp_path / "one"), "--micro_batch", "2"])
    # The stage's default micro-batch is the whole batch (8): two processes take 4 rows each without being told. Each
    # scores every other held-out row, at the evaluation after step 2 and at the end.
    run(common + ["--out", str(tmp_path / "two"), "--eval_every", "2"], module=noting_scored_rows(tmp_path), torchrun=2)
    assert scored_rows(tmp_path, 2) == [evaluation_share(data, 5, rank, 2) * 2 for rank in (0, 1)]
    mc_rows, text_rows = evaluate.held_out(data, 5)
    assert len(mc_rows) > 2 and len(text_rows) > 2
    # and the figures they gather are those of one process evaluating the same weights
    cfg, tok = get_config("tiny"), Tokenizer.load(os.path.join(data, "tokenizer.json"))
    trained = DeepSeekVL(cfg)
    trained.load_state_dict(load_model(tmp_path / "two" / "stage3"))
    acc, asked_open, bpb = evaluate.evaluate(trained, (mc_rows, text_rows), tok, ImageProcessor.for_config(cfg), data)
    result = json.loads((tmp_path / "two" / "stage3" / "eval.json").read_text())
    assert (result["mc"], result["open"]) == (acc, asked_open) and result["bpb"] == pytest.approx(bpb, rel=1e-6)
    one, two = load_model(tmp_path / "one" / "stage3"), load_model(tmp_path / "two" / "stage3")
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    # and the same loss at every step: AdamW's update barely moves when every gradient is scaled alike, so a loss
    # that two processes counted at the wrong scale (and gradients with it, under another clip) shows only here
    losses = [[m["loss"] for m in read_jsonl(tmp_path / run / "stage3" / "metrics.jsonl") if "loss" in m]
              for run in ("one", "two")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_earlier_runs_are_never_written_over_and_resume_checks_what_it_continues(data, start_weights, tmp_path,
                                                                                  capsys):
    out, folder = str(tmp_path / "o"), tmp_path / "o" / "stage3"
    common = ["--data", data, "--stage", "3", "--init_from", start_weights, "--steps", "2", "--batch_size", "4",
              "--micro_batch", "2", "--out", out] + FAST
    train.main(common)
    files = lambda: {f: (folder / f).read_bytes() for f in ("ckpt.pt", "model.pt", "tokenizer.json")}
    before = files()
    with pytest.raises(SystemExit, match="already holds ckpt.pt and model.pt from an earlier run: pass --resume"):
        train.main(common)
    assert files() == before  # nothing written over
    fresh = str(tmp_path / "fresh")  # and said before anything else is made, even for the last of several stages
    for stage in ("3", "all"):
        with pytest.raises(SystemExit, match="stage3 already holds ckpt.pt and model.pt from an earlier run"):
            train.main(["--data", fresh, "--stage", stage, "--out", out] + FAST)
    assert not os.path.exists(fresh)  # its data was never built
    capsys.readouterr()
    train.main(common + ["--resume"])
    assert "stage 3: already finished" in capsys.readouterr().out
    train.main(common + ["--resume", "--micro_batch", "3"])  # how a finished stage's steps would split is not asked
    assert "stage 3: already finished" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"other training settings:\n  --seed: checkpoint 1337 vs now 3"):
        train.main(common + ["--resume", "--seed", "3"])  # finished, but by another run than this one asks for
    # Killed after its last step, before its final weights: the resume writes them. Without the folder's tokenizer,
    # it had fallen back on the data's without a word (the one the stage trained with, or not); now it asks which.
    (folder / "model.pt").rename(tmp_path / "model.pt")
    (folder / "eval.json").rename(tmp_path / "eval.json")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(SystemExit, match=r"stage3.tokenizer.json, written when stage 3 began, is gone: pass "
                                         r"--tokenizer PATH, the one the stage trained with, to resume it"):
        train.main(common + ["--resume"])
    train.main(common + ["--resume", "--tokenizer", os.path.join(data, "tokenizer.json")])
    assert files() == before  # the same final weights, and the tokenizer written back
    capsys.readouterr()
    edited = json.loads((folder / "config.json").read_text())  # the copy for reading, edited: the weights are not
    edited["llm"]["n_layers"] += 3
    (folder / "config.json").write_text(json.dumps(edited))
    train.main(common + ["--resume"])  # (it was refused as "trained with another model config", the weights' own)
    assert "stage 3: already finished" in capsys.readouterr().out
    (folder / "ckpt.pt").unlink()  # a finished stage's training state, deleted to save space: still finished
    train.main(common + ["--resume"])
    assert "stage 3: already finished" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="stage3 was trained with another model config:\n  llm.n_layers: checkpoint 4 "
                                         "vs now 2"):  # finished, but not for this model: said before data is made
        train.main(common + ["--resume", "--llm.n_layers=2", "--data", fresh])
    assert not os.path.exists(fresh)
    (folder / "ckpt.pt").write_bytes(before["ckpt.pt"])

    # Killed after the last checkpoint, before the final weights and evaluation: resuming checks the settings, then
    # writes them from the checkpoint.
    (folder / "model.pt").unlink()
    (folder / "eval.json").unlink()
    with pytest.raises(SystemExit, match=r"other training settings:\n  --warmup: checkpoint \d+ vs now 7\n  "
                                         r"--vision_lr_mult: checkpoint 0.1 vs now 0.5\n  --seed: checkpoint 1337 vs "
                                         r"now 3\npass the same settings to resume it: --warmup=\d+ "
                                         r"--vision_lr_mult=0.1 --seed=1337$"):
        train.main(common + ["--resume", "--warmup", "7", "--vision_lr_mult", "0.5", "--seed", "3"])  # (--lr: below)
    with pytest.raises(SystemExit, match=r"--trainable: checkpoint '' vs now 'llm, aligner'\npass the same settings "
                                         r"to resume it: --trainable=''$"):  # (as a shell reads it back)
        train.main(common + ["--resume", "--trainable", "llm, aligner"])
    with pytest.raises(SystemExit, match="another model config:\n  llm.n_layers: checkpoint 4 vs now 3\npass"):
        train.main(common + ["--resume", "--llm.n_layers=3", "--data", fresh])  # (the checkpoint's, read mapped)
    assert not os.path.exists(fresh)
    with pytest.raises(SystemExit, match="--extra_data .*typo: no such folder"):
        train.main(common + ["--resume", "--extra_data", str(tmp_path / "typo")])
    write_swapped_tokenizer(before["tokenizer.json"].decode("utf-8"), tmp_path / "other.json")  # same size, other ids
    with pytest.raises(SystemExit, match=r"--tokenizer .*other.json differs from .*stage3.tokenizer.json, the "
                                         "tokenizer this stage was trained with"):
        train.main(common + ["--resume", "--tokenizer", str(tmp_path / "other.json")])
    assert (folder / "ckpt.pt").read_bytes() == before["ckpt.pt"] and not (folder / "model.pt").exists()
    dead, live = folder / f"ckpt.pt.tmp{2 ** 22 + 1}", folder / f"ckpt.pt.tmp{os.getppid()}"  # pid_max <= 2 ** 22
    dead.write_bytes(b"half a checkpo")  # left by a process killed while saving: removed
    live.write_bytes(b"half a mod")  # a save still going on in a live process: kept
    huge = folder / f"notes.tmp{10 ** 20}"  # a number no process has: not one of ours, kept (it raised OverflowError)
    huge.write_bytes(b"mine")
    capsys.readouterr()
    # the stage's own learning rate, vision rate and packing, given explicitly: the same run
    train.main(common + ["--resume", "--lr", "2e-3", "--vision_lr_mult", "0.1", "--pack", "0"])
    assert "trained to step 2, but its final weights or evaluation were never written" in capsys.readouterr().out
    assert (folder / "eval.json").exists() and not dead.exists() and live.exists() and huge.exists()
    assert (folder / "model.pt").read_bytes() == before["model.pt"]  # what the first run wrote, byte for byte
    steps = [m["step"] for m in read_jsonl(folder / "metrics.jsonl")]
    assert steps == [1, 2, 2]  # the metrics came back from the checkpoint, then the evaluation's line
    (folder / "eval.json").unlink()  # unfinished again: the checks below look at the checkpoint

    state = torch.load(folder / "ckpt.pt", weights_only=True)
    torch.save(dict(state, stage=1), folder / "ckpt.pt")  # stage 1's training state, copied into stage 3's folder
    with pytest.raises(SystemExit, match="holds stage 1's training state, not stage 3's"):
        train.main(common + ["--resume"])
    (folder / "ckpt.pt").write_bytes(before["ckpt.pt"][:1000])
    with pytest.raises(SystemExit, match="truncated or corrupt; remove the stage folder, .*stage3, to train stage 3"):
        train.main(common + ["--resume"])
    stage0 = tmp_path / "stage0-ckpt.pt"  # stage 0's training state: the model inside the stage-0 heads
    torch.save({"model": {"model.llm.norm.weight": torch.ones(4), "heads.log_t": torch.zeros(())},
                "optimizer": {}, "config": get_config("tiny").to_dict()}, stage0)
    with pytest.raises(SystemExit, match="stage 0's training state .* pass the stage folder's model.pt"):
        train.main(["--data", data, "--stage", "3", "--init_from", str(stage0), "--out", str(tmp_path / "p")])


def test_init_from_starts_the_first_stage_of_a_run_and_each_later_one_starts_from_the_one_before(data, monkeypatch,
                                                                                                    tmp_path):
    seen = []
    monkeypatch.setattr(train, "run_stage", lambda stage, tc, *a: seen.append((stage, tc.init_from)))
    monkeypatch.setattr(train, "data_to_prepare", lambda folder, preset: None)  # tiny's data, 1.3b's stages
    released = tmp_path / "released"  # stands in for a released folder (run_stage, which would read it, is not run)
    released.mkdir()
    train.main(["--data", data, "--config", "1.3b", "--init_from", str(released), "--out", str(tmp_path)])
    assert seen == [(1, str(released)), (2, ""), (3, "")]  # "": out/stage<k-1>/model.pt
    with pytest.raises(SystemExit, match="this run begins with stage 0, which trains from scratch"):
        train.main(["--data", data, "--init_from", str(released), "--out", str(tmp_path)])


def test_an_unreadable_image_stops_the_run_naming_its_row_and_keeps_the_steps_done(data, start_weights, tmp_path,
                                                                                    monkeypatch, capsys):
    from nanovl.image import ImageProcessor
    args = ["--data", data, "--stage", "3", "--init_from", start_weights, "--out", str(tmp_path / "o"), "--steps", "3",
            "--batch_size", "4", "--micro_batch", "4", "--short_chat_share", "0", "--text_sft_share", "0",
            "--ckpt_every", "3"] + FAST + ["--log_every", "3"]
    readable, calls = ImageProcessor.pixels, []

    def breaks_later(self, image):  # every image of step 1 reads; the first of step 2 does not
        calls.append(image)
        if len(calls) > 4:
            raise ValueError(f"cannot read image {image}: broken")
        return readable(self, image)

    monkeypatch.setattr(ImageProcessor, "pixels", breaks_later)
    with pytest.raises(SystemExit, match=r"stage 3, step 2: .*sft.jsonl, line \d+: cannot read image .*: broken\. "
                                         r"Training up to step 1 is saved in .*ckpt.pt\. Fix or remove that row, "
                                         "then run again with --resume"):
        train.main(args)
    ckpt = torch.load(tmp_path / "o" / "stage3" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 1  # saved on failure: the first checkpoint was due at step 3
    assert [(m["step"], math.isfinite(m["loss"])) for m in ckpt["metrics"]] == [(1, True)]  # and the log at step 3
    monkeypatch.setattr(ImageProcessor, "pixels", readable)  # the row fixed: the run goes on from step 1
    train.main(args + ["--resume"])
    assert torch.load(tmp_path / "o" / "stage3" / "ckpt.pt", weights_only=False)["step"] == 3

    calls[:] = range(4)  # now the very first image is unreadable: nothing to keep, nothing to resume
    monkeypatch.setattr(ImageProcessor, "pixels", breaks_later)
    with pytest.raises(SystemExit, match=r"step 1: .*broken\. Fix or remove that row, then run again$"):
        train.main(args[:7] + [str(tmp_path / "p")] + args[8:])
    assert not os.path.exists(tmp_path / "p" / "stage3" / "ckpt.pt")

    # Evaluated at every step: step 1's checkpoint was written before step 1's evaluation, so its metrics lack that
    # evaluation, and the resume makes it again; each evaluation is in metrics.jsonl once.
    trained = []

    def training_breaks_later(self, image):  # (the held-out images read on)
        if "/train_" in str(image):
            trained.append(image)
            if len(trained) > 4:
                raise ValueError(f"cannot read image {image}: broken")
        return readable(self, image)

    monkeypatch.setattr(ImageProcessor, "pixels", training_breaks_later)
    evaluated = args[:7] + [str(tmp_path / "q")] + args[8:] + ["--eval_every", "1"]
    with pytest.raises(SystemExit, match=r"stage 3, step 2: .*Training up to step 1 is saved"):
        train.main(evaluated)
    monkeypatch.setattr(ImageProcessor, "pixels", readable)
    capsys.readouterr()
    train.main(evaluated + ["--resume"])
    metrics = read_jsonl(tmp_path / "q" / "stage3" / "metrics.jsonl")
    assert [m["step"] for m in metrics if "mc_mean" in m] == [1, 2, 3]
    assert "stage 3, step 1" in capsys.readouterr().out  # the resume's: the evaluation made again


def test_an_unreadable_image_in_another_process_stops_every_process_and_keeps_the_steps_done(data, start_weights,
                                                                                              tmp_path):
    # The second of two processes cannot read an image of step 2. Alone it would exit, torchrun would kill the
    # first one (which writes the checkpoints) in its all-reduce, and step 1 would be lost.
    breaks = tmp_path / "breaks_in_rank_1.py"
    breaks.write_text(f"""import os, sys
sys.path.insert(0, {ROOT!r})
import train
from nanovl.image import ImageProcessor
readable, calls = ImageProcessor.pixels, []

def breaks_later(self, image, *args):  # in the second process, each image after its first two
    calls.append(image)
    if os.environ["RANK"] == "1" and len(calls) > 2:
        raise ValueError(f"cannot read image {{image}}: broken")
    return readable(self, image, *args)

ImageProcessor.pixels = breaks_later
train.main(sys.argv[1:])
""")
    args = ["--data", data, "--stage", "3", "--init_from", start_weights, "--out", str(tmp_path / "o"), "--steps", "3",
            "--batch_size", "4", "--short_chat_share", "0", "--text_sft_share", "0", "--ckpt_every", "3"] + FAST
    printed = run(args, module=str(breaks), torchrun=2, fails=True)
    assert re.search(r"stage 3, step 2: .*sft.jsonl, line \d+: cannot read image .*: broken\. Training up to step 1 "
                     r"is saved in .*ckpt.pt\. Fix or remove that row, then run again with --resume", printed)
    # the first process saved, then said why (torchrun may still stop the other one as it exits: it has saved nothing)
    assert torch.load(tmp_path / "o" / "stage3" / "ckpt.pt", weights_only=False)["step"] == 1
    run(args + ["--resume"], torchrun=2)  # the row fixed: the run goes on from step 1 and finishes
    assert torch.load(tmp_path / "o" / "stage3" / "ckpt.pt", weights_only=False)["step"] == 3
    # A held-out image the first process cannot read, in a run of one stage (read as it begins): it says so for all,
    # and the other, waiting for the questions it was to be sent, stops with it (it was a gloo traceback)
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (bad / json.loads((bad / "eval_mc.jsonl").read_text().splitlines()[0])["images"][0]).write_bytes(b"no image")
    printed = run(["--data", str(bad)] + args[2:7] + [str(tmp_path / "b")] + args[8:], torchrun=2, fails=True)
    assert printed.count("the held-out data: ") == 1 and "cannot read image" in printed
    assert "broadcast_object_list" not in printed and "[rank1]" not in printed and not (tmp_path / "b").exists()


def test_eval_split_val_evaluates_the_second_set_of_questions(data, start_weights, tmp_path, capsys):
    """prepare_data.py's val_mc.jsonl: questions like eval_mc's, on images of their own, to choose settings by (and
    the test set's figures stay unchosen); --eval_split val evaluates them wherever eval_mc.jsonl would be."""
    from nanovl.evaluate import held_out
    test, val = held_out(data)[0], held_out(data, split="val")[0]
    assert Counter(r["category"] for r in val) == Counter(r["category"] for r in test)
    pixels = lambda rows: {Image.open(os.path.join(data, i)).tobytes() for r in rows for i in r["images"]}
    assert not pixels(val) & pixels(test)  # no image of one set is in the other
    trained = {Image.open(p).tobytes() for p in glob.glob(os.path.join(data, "images", "*", "train_*.png"))}
    assert trained and not pixels(val) & trained
    out = tmp_path / "o"
    train.main(["--data", data, "--stage", "3", "--init_from", start_weights, "--steps", "2", "--batch_size", "2",
                "--micro_batch", "2", "--out", str(out), "--eval_split", "val", "--eval_limit", "5"] + FAST[:2])
    assert "stage 3 evaluation (val_mc.jsonl; text: eval_text.jsonl)" in capsys.readouterr().out
    result = json.loads((out / "stage3" / "eval.json").read_text())
    model, cfg = DeepSeekVL(get_config("tiny")).eval(), get_config("tiny")
    model.load_state_dict(load_model(out / "stage3"))
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    assert result["questions"] == "val_mc.jsonl" and result["mc"] == multiple_choice(
        model, held_out(data, 5, "val")[0], tok, ImageProcessor.for_config(cfg), cfg.n_image_tokens, root=data)
    train.main(["--eval-only", "--ckpt", str(out / "stage3"), "--data", data, "--eval_split", "val", "--eval_limit",
                "5"])
    assert f"evaluation of {out / 'stage3'} on {data} (val_mc.jsonl; text: eval_text.jsonl)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--eval_split must be test or val, got 'dev'"):
        train.main(["--data", data, "--stage", "3", "--eval_split", "dev"])
    mine = tmp_path / "mine"  # a folder of one's own questions has no second set
    mine.mkdir()
    shutil.copy(os.path.join(data, "eval_mc.jsonl"), mine)
    with pytest.raises(SystemExit, match=r"no multiple-choice questions at .*mine.val_mc.jsonl: --data must be a "
                                         r"folder holding val_mc.jsonl \(prepare_data.py's since corpus version 10: "
                                         r"run prepare_data.py again; or one of your own\)"):
        train.main(["--eval-only", "--ckpt", str(out / "stage3"), "--data", str(mine), "--eval_split", "val"])


def test_a_second_run_into_the_same_out_folder_is_refused_while_the_first_holds_it(data, start_weights, tmp_path,
                                                                                   monkeypatch):
    """Two runs into one --out each saw no checkpoint of the other's until the first was saved, then wrote over each
    other's stages (a chain of stages from two runs, found by nobody)."""
    out = tmp_path / "o"
    out.mkdir()
    held = open(out / ".lock", "a+")  # as a run in another process holds it (flock: per open file, not process)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.write("elsewhere 4242\n")
    held.flush()
    common = ["--data", data, "--stage", "3", "--init_from", start_weights, "--steps", "2", "--batch_size", "2",
              "--micro_batch", "2", "--out", str(out)] + FAST
    with pytest.raises(SystemExit, match=rf"another run \(process 4242 on elsewhere\) is writing to "
                                         rf"{re.escape(str(out))}: wait for it to end, or choose another --out$"):
        train.main(common)
    assert os.listdir(out) == [".lock"]  # nothing else made
    (out / "stage3").mkdir()  # once the live run has saved: said as a live run, not as an earlier one to --resume
    (out / "stage3" / "ckpt.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"another run \(process 4242 on elsewhere\) is writing to"):
        train.main(common + ["--resume"])
    shutil.rmtree(out / "stage3")
    held.close()  # the first run ended (killed or not, the system lets go of its lock)
    os.rename(out / ".lock", tmp_path / "lock")  # a folder where the lock goes: passed over, two runs both went on
    (out / ".lock").mkdir()
    with pytest.raises(SystemExit, match=r"o.\.lock is a folder, where runs into .*o keep their lock file: remove it$"):
        train.main(common)
    assert os.listdir(out) == [".lock"]  # nothing else made
    (out / ".lock").rmdir()
    os.rename(tmp_path / "lock", out / ".lock")
    train.main(common)
    assert (out / "stage3" / "model.pt").exists() and not runs.OUT_LOCKS  # let go when the run ended
    assert open(out / ".lock").read() == f"{socket.gethostname()} {os.getpid()}\n"
    with pytest.raises(SystemExit, match="already holds ckpt.pt and model.pt from an earlier run"):
        train.main(common)
    assert not runs.OUT_LOCKS  # the look before the checks holds nothing: a run refused by them keeps no lock
    # Another run's look holds the lock for an instant: a run taking it then waits that out instead of stopping.
    held = open(out / ".lock", "a+")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    threading.Timer(0.03, held.close).start()
    assert runs.lock_out_folder(str(out)) == "" and str(out) in runs.OUT_LOCKS
    runs.unlock_out_folders()
    # Under torchrun the first process holds the lock for all: when it is refused, every process stops with it, and
    # none makes a stage folder in the other run's --out.
    other = tmp_path / "other"
    other.mkdir()
    held = open(other / ".lock", "a+")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    printed = run(common[:-len(FAST) - 2] + ["--out", str(other), "--workers", "0"], torchrun=2, fails=True)
    assert printed.count("is writing to") == 2 and os.listdir(other) == [".lock"]  # (each process says it,
    # on a line of its own, the second one named)
    said = [line for line in printed.splitlines() if "is writing to" in line]
    first = [line for line in said if not line.startswith("(process")]  # (the two write in either order)
    assert len(first) == 1 and sorted(said) == sorted(first + ["(process 1) " + first[0]])
    held.close()
    # Another run that wrote the stage and ended while this one got ready (after its look at the folder, before its
    # lock): refused all the same, nothing written over.
    finished = tmp_path / "finished"
    shutil.move(out / "stage3", finished)
    lock = runs.lock_out_folder

    def lock_after_the_other_run_ended(folder, hold=True):
        if hold:  # (not the look before the run's checks)
            shutil.copytree(finished, out / "stage3")
        lock(folder, hold)

    monkeypatch.setattr(runs, "lock_out_folder", lock_after_the_other_run_ended)
    with pytest.raises(SystemExit, match="stage3 already holds ckpt.pt and model.pt from an earlier run"):
        train.main(common)
    assert all((out / "stage3" / f.name).read_bytes() == f.read_bytes() for f in finished.iterdir())


@pytest.mark.skipif(torch.multiprocessing.get_start_method() != "fork", reason="a spawned worker inherits no files")
def test_data_workers_let_go_of_the_lock_they_inherit_and_the_run_keeps_it(tmp_path):
    """A run killed with kill -9 kept its --out locked while its forked workers lived on (seconds): a --resume at once
    was refused as "another run is writing", naming the dead process."""
    out = str(tmp_path / "o")
    assert runs.lock_out_folder(out) == ""
    fd = runs.OUT_LOCKS[out].fileno()

    class Inherited(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):  # in the worker: is its copy of the lock file still open?
            try:
                os.fstat(fd)
                return True
            except OSError:
                return False

    try:
        loader = torch.utils.data.DataLoader(Inherited(), batch_size=None, num_workers=1,
                                             worker_init_fn=runs.close_inherited_locks)
        assert list(loader) == [False]
        # the run's own lock is held still (asked under another spelling of the folder, as another run would)
        assert "is writing to" in runs.lock_out_folder(out + "/", hold=False)
    finally:
        runs.unlock_out_folders()


def test_resuming_into_a_folder_that_cannot_be_written_stops_before_training(data, start_weights, tmp_path,
                                                                            monkeypatch):
    out, folder = tmp_path / "o", tmp_path / "o" / "stage3"
    common = ["--data", data, "--stage", "3", "--init_from", start_weights, "--steps", "4", "--ckpt_every", "2",
              "--batch_size", "2", "--micro_batch", "2", "--out", str(out)] + FAST
    run(common + ["--stop_after", "2"])  # (in a process of its own, which --stop_after ends)
    (folder / "ckpt.pt.tmp1073741824").write_bytes(b"")  # a save killed mid-way (no such process)
    removed = []

    def read_only(path):
        removed.append(path)
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(os, "remove", read_only)  # the stale file cannot go: no traceback for that
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK)  # (as root, only a read-only mount says so)
    with pytest.raises(SystemExit, match=r"--out .*: cannot write to .*stage3 \(read-only\?\)$"):
        train.main(common + ["--resume"])  # said now, not at the first save, ckpt_every steps on
    assert removed == [str(folder / "ckpt.pt.tmp1073741824")]


def test_an_older_checkpoint_resumes_when_its_metrics_file_cannot_be_read(tmp_path):
    # Checkpoints before 2026-12 kept no metrics: a resume read them from metrics.jsonl, and a damaged one ended the
    # resume in a traceback. The metrics are a log, not the training state: the run goes on without them, and says so.
    said = []
    assert resume.saved_metrics({"metrics": [{"step": 1}]}, str(tmp_path), 3, 2, said.append) == [{"step": 1}]
    (tmp_path / "metrics.jsonl").write_text('{"stage": 3, "step": 1, "loss": 2.0}\n{"stage": 3, "step": 3}\n')
    assert resume.saved_metrics({}, str(tmp_path), 3, 2, said.append) == [{"stage": 3, "step": 1, "loss": 2.0}]
    assert said == []
    (tmp_path / "metrics.jsonl").write_text('{"stage": 3, "step": 1, "loss": 2.0}\n{"stage": 3, "ste\n')
    assert resume.saved_metrics({}, str(tmp_path), 3, 2, said.append) == []
    os.remove(tmp_path / "metrics.jsonl")
    assert resume.saved_metrics({}, str(tmp_path), 3, 2, said.append) == []
    assert len(said) == 2 and all(re.match(r"stage 3: the metrics before step 2 are not carried on: .*metrics.jsonl "
                                           r"cannot be read \(", line) for line in said)
    assert "line 2: not valid JSON" in said[0] and "No such file" in said[1]


def test_a_later_stage_is_not_resumed_on_top_of_an_earlier_stage_trained_again(data, start_weights, tmp_path):
    out = tmp_path / "o"
    common = ["--data", data, "--out", str(out), "--steps", "2", "--batch_size", "4", "--micro_batch", "2"] + FAST
    stage2 = common + ["--stage", "2", "--init_from", start_weights]
    train.main(stage2)
    train.main(common + ["--stage", "3"])  # from o/stage2/model.pt
    train.main(common + ["--stage", "3", "--resume"])  # nothing changed: finished
    shutil.rmtree(out / "stage2")
    # Resumed from the start, the run would train stages 0-2 again, and only then refuse stage 3: said first
    with pytest.raises(SystemExit, match=r"stage3 holds an earlier run's ckpt.pt and model.pt, which began from stage "
                                         r"2's weights, but .*stage2 holds neither its checkpoint nor its weights: "
                                         "this run would train stage 2 again, then refuse"):
        train.main(common + ["--stage", "all", "--resume"])
    assert sorted(os.listdir(out)) == [".lock", "stage3"]  # nothing trained, nothing made
    train.main(stage2)  # stage 2 again: the same settings, a new model.pt
    with pytest.raises(SystemExit, match=r"stage3.ckpt.pt continues a stage that began from other weights than "
                                         r".*stage2.model.pt holds now \(trained again since, or another --init_from "
                                         r"than its run's\?\): resume with the weights it began from, or remove "
                                         ".*stage3 to train stage 3 from these"):
        train.main(common + ["--stage", "3", "--resume"])


def test_a_new_stage_trains_with_the_tokenizer_of_the_weights_it_starts_from(data, start_weights, tmp_path,
                                                                           capsys):
    start = tmp_path / "start"  # a stage folder: weights and the tokenizer they were trained with
    start.mkdir()
    shutil.copy(start_weights, start / "model.pt")
    common = ["--data", data, "--stage", "3", "--steps", "1", "--batch_size", "2", "--micro_batch", "2"] + FAST
    train.main(common + ["--init_from", start_weights, "--out", str(tmp_path / "a")])  # a bare model.pt: said
    assert f"no tokenizer.json beside {start_weights}, so it trains with {data}/tokenizer.json" in \
        capsys.readouterr().out
    shutil.copy(os.path.join(data, "tokenizer.json"), start / "tokenizer.json")
    write_swapped_tokenizer((start / "tokenizer.json").read_text(encoding="utf-8"), tmp_path / "other.json")
    with pytest.raises(SystemExit, match=r"--tokenizer .*other.json differs from .*start.tokenizer.json, the "
                                         r"tokenizer the weights this stage starts from were trained with: .* Run "
                                         r"without --tokenizer"):
        train.main(common + ["--init_from", str(start / "model.pt"), "--out", str(tmp_path / "b"),
                             "--tokenizer", str(tmp_path / "other.json")])
    assert not os.path.exists(tmp_path / "b" / "stage3" / "ckpt.pt")
    train.main(common + ["--init_from", str(start / "model.pt"), "--out", str(tmp_path / "c"),  # the same one: fine
                         "--tokenizer", os.path.join(data, "tokenizer.json")])
    assert "no tokenizer.json beside" not in capsys.readouterr().out
    # Without --tokenizer, the one beside the weights is taken, not the data's (here another of the same size)
    shutil.copy(tmp_path / "other.json", start / "tokenizer.json")
    train.main(common + ["--init_from", str(start / "model.pt"), "--out", str(tmp_path / "d")])
    trained_with = Tokenizer.load(tmp_path / "d" / "stage3" / "tokenizer.json")
    assert trained_with.same_ids(Tokenizer.load(start / "tokenizer.json"))
    assert not trained_with.same_ids(Tokenizer.load(os.path.join(data, "tokenizer.json")))


def test_weights_that_travel_without_their_tokenizer_refuse_another_by_its_fingerprint(data, start_weights, tmp_path,
                                                                                    capsys):
    # model.pt and ckpt.pt keep the fingerprint of the tokenizer the stage trained with. Weights copied alone, or a
    # stage folder that lost its tokenizer.json, then refuse another tokenizer of the same size (two ids swapped),
    # which would turn the same text into other ids without a word.
    first, folder = tmp_path / "first", tmp_path / "first" / "stage3"
    common = ["--data", data, "--stage", "3", "--steps", "4", "--ckpt_every", "2", "--batch_size", "2",
              "--micro_batch", "2"] + FAST
    run(common + ["--init_from", start_weights, "--out", str(first), "--stop_after", "2"])
    ours = Tokenizer.load(os.path.join(data, "tokenizer.json")).fingerprint()
    assert torch.load(folder / "ckpt.pt", weights_only=True)["tokenizer"] == ours
    other = write_swapped_tokenizer((folder / "tokenizer.json").read_text(encoding="utf-8"), tmp_path / "other.json")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(SystemExit, match=r"other.json is not the tokenizer .*stage3.ckpt.pt was trained with .* Use "
                                         r"the tokenizer.json the run wrote in their stage folder \(or pass it as "
                                         r"--tokenizer\)$"):
        train.main(common + ["--out", str(first), "--resume", "--tokenizer", str(other)])
    train.main(common + ["--out", str(first), "--resume", "--tokenizer", os.path.join(data, "tokenizer.json")])
    assert torch.load(folder / "model.pt", weights_only=True)["tokenizer"] == ours
    bare = tmp_path / "bare"  # the final weights, copied without their folder
    bare.mkdir()
    shutil.copy(folder / "model.pt", bare / "model.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"other.json is not the tokenizer .*bare.model.pt was trained with"):
        train.main(common + ["--init_from", str(bare / "model.pt"), "--out", str(tmp_path / "b"), "--tokenizer",
                             str(other)])
    assert not os.path.exists(tmp_path / "b" / "stage3")
    with pytest.raises(SystemExit, match=r"other.json is not the tokenizer .*bare.model.pt was trained with"):
        train.main(common + ["--init_from", f"{start_weights},{bare / 'model.pt'}", "--out", str(tmp_path / "b"),
                             "--tokenizer", str(other)])  # (one of several parts: each is looked at)
    with pytest.raises(SystemExit, match=r"other.json is not the tokenizer .*bare.model.pt was trained with"):
        train.main(["--eval-only", "--ckpt", str(bare / "model.pt"), "--data", data, "--tokenizer", str(other),
                    "--eval_limit", "5"])
    # The data's own tokenizer is theirs: it trains, without the note for weights that cannot tell (start_weights).
    train.main(common + ["--init_from", str(bare / "model.pt"), "--out", str(tmp_path / "c")])
    assert "no tokenizer.json beside" not in capsys.readouterr().out
    train.main(["--eval-only", "--ckpt", start_weights, "--data", data, "--eval_limit", "5"])
    assert f"(no tokenizer.json beside {start_weights}, so it is evaluated with {data}/tokenizer.json, which must " \
           "be the one those weights were trained with" in capsys.readouterr().out


def test_only_an_atomic_writes_own_leftovers_are_removed_and_a_lock_names_its_holder(tmp_path):
    import io
    for name in ("notes.tmp", "ckpt.pt.tmp", "ckpt.pt.tmpx1", "ckpt.pt.tmp999999999"):  # (the last: no such process)
        (tmp_path / name).write_text("")
    runs.remove_stale_temporaries(str(tmp_path))  # ("notes.tmp" has no process number: int("") failed)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt.tmp", "ckpt.pt.tmpx1", "notes.tmp"]
    assert runs.lock_holder(io.StringIO("host7 4242\n")) == " (process 4242 on host7)"
    assert runs.lock_holder(io.StringIO("4242\n")) == " (process 4242)" and runs.lock_holder(io.StringIO("")) == ""


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    # The bytes reach the disk (fsync) before the rename makes them the checkpoint: after a power cut the file holds
    # the old checkpoint or the whole new one, never an empty one.
    calls, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or replace(a, b))
    runs.atomic_save({"step": 1}, path)
    assert calls == ["fsync", "replace"]

    def dies_midway(obj, f, *a, **k):
        f.write(b"half a checkpo")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        runs.atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}  # the last good checkpoint is intact

    def fills_the_disk(obj, f, *a, **k):  # what torch.save says when the disk fills up: no word of space
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4190016 vs 4189904")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(runs.WriteFailed, match=r"cannot write .*ckpt.pt: .*unexpected pos 4190016 vs 4189904 "
                                                r"\(\d+ MB free there\)"):
        runs.atomic_save({"step": 3}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"] and torch.load(path, weights_only=True) == {"step": 1}
    # Ctrl-C or a SIGTERM while torch.save writes the file itself: its writer catches the interrupt and raises the
    # disk-full error above in its place, which was said as a failed write (with the free space); it is the stop.
    monkeypatch.undo()
    stopped = iter([None, runs.Terminated()])

    class Stops(io.FileIO):
        def write(self, b):  # (the SIGTERM handler raises between bytecodes: here, in the write torch.save calls)
            if (stop := next(stopped, None)) is not None:
                raise stop
            return super().write(b)

    monkeypatch.setattr("builtins.open", lambda name, mode="r", *a, **k: Stops(name, mode.replace("b", "")))
    with pytest.raises(runs.Terminated):
        runs.atomic_save({"step": 4, "w": torch.zeros(100)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"] and torch.load(path, weights_only=True) == {"step": 1}


def test_a_signal_held_during_a_swap_comes_after_it_and_every_handler_comes_back(monkeypatch):
    got = []
    record = lambda signum, frame: got.append(signum)
    before = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with runs.uninterrupted():  # both come: SIGTERM is delivered (either means stop), after the block
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []
        assert got == [signal.SIGTERM]
        got.clear()
        with pytest.raises(OSError, match="the swap failed"):  # a swap that fails says so, not the held signal
            with runs.uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                raise OSError("the swap failed")
        assert got == []
        # A signal that lands while the handlers are put back (signal.signal runs pending ones: a Ctrl-C just after
        # SIGINT's handler is back raises there) no longer leaves the other handler holding signals for good.
        put_back, landed = signal.signal, []

        def lands_once(s, handler):
            if not landed and handler is record:
                landed.append(s)
                raise KeyboardInterrupt
            return put_back(s, handler)

        with pytest.raises(KeyboardInterrupt):
            with runs.uninterrupted():
                monkeypatch.setattr(signal, "signal", lands_once)
        monkeypatch.undo()
        assert all(signal.getsignal(s) is record for s in (signal.SIGINT, signal.SIGTERM))
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_the_loss_plot_is_written_whole(tmp_path, monkeypatch):
    # It was saved in place: a run killed (or a disk full) while PIL wrote it left half a PNG as the stage's loss.png.
    path, metrics = str(tmp_path / "loss.png"), [{"step": s, "loss": 3.0 / s} for s in (1, 2, 3)]
    train.plot_losses(metrics, path, "a stage")
    before = open(path, "rb").read()
    assert Image.open(path).size == (640, 360)

    def fills_the_disk(self, f, *a, **k):
        f.write(b"\x89PNG half a pict")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", fills_the_disk)
    with pytest.raises(runs.WriteFailed, match=r"cannot write .*loss.png: No space left on device$"):
        train.plot_losses(metrics + [{"step": 4, "loss": 0.5}], path, "a stage")
    assert os.listdir(tmp_path) == ["loss.png"] and open(path, "rb").read() == before


def test_resume_checks_what_the_checkpoint_holds_and_how_its_run_was_split(tmp_path):
    # resumable_state on checkpoints written here: one without its RNG state, one of an older run that kept its
    # settings as given (no resolved hparams), and runs of another number of processes at the same micro-batch.
    cfg, path, said = get_config("tiny"), str(tmp_path / "ckpt.pt"), []
    tc = recipe.TrainConfig(steps=10)
    hp = {s: recipe.stage_hparams(s, tc, cfg)[0] for s in (0, 1)}
    state = lambda stage, **kw: dict({"model": {}, "optimizer": {}, "step": 3, "rng": {}, "stage": stage,
                                      "config": cfg.to_dict()}, **kw)
    resumed = lambda stage: resume.resumable_state(path, stage, cfg, tc, hp[stage], 1, said.append)
    torch.save({k: v for k, v in state(1).items() if k != "rng"}, path)
    with pytest.raises(SystemExit, match="is not a training checkpoint"):
        resumed(1)
    torch.save(state(1, train=dataclasses.asdict(dataclasses.replace(tc, steps=20))), path)
    with pytest.raises(SystemExit, match="--steps: checkpoint 20 vs now 10"):
        resumed(1)
    micro = {s: recipe.split_batch(s, hp[s], 1)[0] for s in (0, 1)}
    torch.save(state(1, train=dataclasses.asdict(tc), hparams=hp[1], split=[2, micro[1]]), path)
    assert resumed(1)["step"] == 3
    # A NaN in the weights or in AdamW's moments: a run saves only finite ones, so the file is damaged. Resumed, it
    # stopped a few steps on as "the loss became nan", with the advice of a lower --lr.
    nan, ok = torch.tensor([1.0, float("nan")]), torch.ones(2)
    for model, moments, named in [({"llm.norm.weight": nan}, {}, "llm.norm.weight"),
                                  ({"llm.norm.weight": ok}, {0: {"step": torch.tensor(3.0), "exp_avg_sq": nan}},
                                   "optimizer state 0 exp_avg_sq")]:
        torch.save(state(1, model=model, optimizer={"state": moments, "param_groups": []}), path)
        with pytest.raises(SystemExit, match=rf"ckpt.pt: 1 tensor holds NaN or infinite values: {named} \(1 of 2\); "
                                             r"the file is damaged .*; it cannot be resumed: restore it, or remove the "
                                             r"stage folder, .*, to train stage 1 again$"):
            resumed(1)
    assert said == [f"stage 1: resuming with 1 process(es) x micro_batch {micro[1]} where the checkpoint's run had 2 x "
                    f"{micro[1]}: each step takes the same samples, split another way, so its sums round in another "
                    "order (the run goes on, but not bit for bit)"]
    torch.save(state(0, train=dataclasses.asdict(tc), hparams=hp[0], split=[2, micro[0]]), path)
    with pytest.raises(SystemExit, match=rf"a run of 2 process\(es\) x micro_batch {micro[0]}; this one would be 1 x"):
        resumed(0)


def test_a_nan_loss_stops_the_run_and_names_the_step(data, start_weights, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = DeepSeekVL.forward

    def poisoned(self, *args, **kw):
        logits, loss = forward(self, *args, **kw)
        calls["n"] += 1
        return logits, loss * float("nan") if calls["n"] > 4 else loss  # steps 1-4 fine, step 5 NaN

    monkeypatch.setattr(DeepSeekVL, "forward", poisoned)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="loss became nan at step 5"):
        train.main(["--data", data, "--stage", "3", "--init_from", start_weights, "--out", str(out), "--steps", "8",
                    "--batch_size", "2", "--micro_batch", "2", "--ckpt_every", "4", "--log_every", "3",
                    "--workers", "0"])
    assert torch.load(out / "stage3" / "ckpt.pt", weights_only=True)["step"] == 4  # last good checkpoint kept


def test_weights_broken_by_an_update_are_never_saved_and_a_lower_lr_resumes(data, start_weights, tmp_path,
                                                                          monkeypatch, capsys):
    """The update of a checkpoint step can make the weights NaN while that step's loss was fine: the checkpoint is
    not written, and the advice given (a lower --lr from the last good one) is one a resume accepts."""
    calls = {"n": 0}
    adamw_step = torch.optim.AdamW.step

    def breaking(self, *a, **k):
        result = adamw_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 6:  # the update of step 6, a checkpoint step
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", breaking)
    out = tmp_path / "out"
    args = ["--data", data, "--stage", "3", "--init_from", start_weights, "--out", str(out), "--steps", "8",
            "--batch_size", "2", "--ckpt_every", "3"] + FAST
    with pytest.raises(SystemExit, match=r"stage 3: after step 6, 1 weights are not finite .*; stopping. The last good "
                                         r"checkpoint, .*ckpt.pt \(step 3\), is kept: --resume it with a lower --lr$"):
        train.main(args)
    assert torch.load(out / "stage3" / "ckpt.pt", weights_only=True)["step"] == 3
    # Resumed with a lower --lr, it breaks again before its next checkpoint (weights can be finite and past saving):
    # the same advice would go round in a circle.
    calls["n"] = 3
    with pytest.raises(SystemExit, match=r"after step 6, .* This run resumed from .*ckpt.pt \(step 3\) with --lr "
                                         r"1e-05 \(its run had 0.002\) and failed again before its next checkpoint: "
                                         r"those weights may be past saving. Start the stage again with a lower --lr "
                                         r"\(remove .*stage3, or choose another --out\)$"):
        train.main(args + ["--resume", "--lr=1e-5"])
    calls["n"] = 3  # resumed with the checkpoint's own lr: a lower one is still the way on
    with pytest.raises(SystemExit, match=r"after step 6, .* The last good checkpoint, .*ckpt.pt \(step 3\), is kept: "
                                         r"--resume it with a lower --lr$"):
        train.main(args + ["--resume"])
    monkeypatch.setattr(torch.optim.AdamW, "step", adamw_step)
    capsys.readouterr()
    train.main(args + ["--resume", "--lr=1e-5"])
    assert "stage 3: resuming with lr 1e-05 where the checkpoint's run had 0.002" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in load_model(out / "stage3").values())
    # Resumed with a lower --lr, a checkpoint written since (step 6), then broken (step 7's update, found at step 8's
    # checkpoint): that newer checkpoint is the way on.
    monkeypatch.setattr(torch.optim.AdamW, "step", breaking)
    calls["n"] = 0
    other = args[:7] + [str(tmp_path / "other")] + args[8:]
    with pytest.raises(SystemExit, match=r"after step 6, "):
        train.main(other)
    calls["n"] = 2
    with pytest.raises(SystemExit, match=r"after step 8, .* The last good checkpoint, .*ckpt.pt \(step 6\), is kept: "
                                         r"--resume it with a lower --lr$"):
        train.main(other + ["--resume", "--lr=1e-5"])


def test_eval_only_takes_the_config_from_the_checkpoint(data, start_weights, tmp_path, capsys, monkeypatch):
    # start_weights is a tiny model.pt with no tokenizer beside it: the data folder's is used; --config is not
    decoded, decode = [], ImageProcessor.pixels
    monkeypatch.setattr(ImageProcessor, "pixels", lambda self, image, *a: decoded.append(str(image)) or
                        decode(self, image, *a))
    train.main(["--eval-only", "--ckpt", start_weights, "--data", data, "--config", "small", "--eval_limit", "5"])
    printed = capsys.readouterr().out
    # each question's image decoded once, though read twice (MCPPL, then asked open)
    held = [os.path.join(data, image) for row in evaluate.held_out(data, 5)[0] for image in row["images"]]
    assert sorted(decoded) == sorted(set(held))
    assert f"evaluation of {start_weights} on {data}" in printed and "(chance 25.0%)" in printed
    assert "text bits per byte" in printed
    # --eval_limit 5: one question of each category, which the table says (a 100% could be one question of one)
    assert re.search(r"^category +questions +MCPPL accuracy +asked open$", printed, re.M)
    assert [line.split()[:2] for line in printed.splitlines() if re.match(r"(caption|chart|code|ocr|scene_text|mean) ",
                                                                          line)] == \
        [["caption", "1"], ["chart", "1"], ["code", "1"], ["ocr", "1"], ["scene_text", "1"], ["mean", "5"]]
    # under torchrun each process scores its share of the questions, and the first prints what one process prints
    shared = run(["--eval-only", "--ckpt", start_weights, "--data", data, "--config", "small", "--eval_limit", "5"],
                 module=noting_scored_rows(tmp_path), torchrun=2)
    assert shared == printed and scored_rows(tmp_path, 2) == [evaluation_share(data, 5, rank, 2) for rank in (0, 1)]
    assert f"(--config small chose the questions' folder {data} only: the model is the checkpoint's 'tiny')" in printed
    with pytest.raises(SystemExit, match=r"--eval-only evaluates --ckpt on --data; --steps, --seed would change "
                                         r"nothing: drop them \(it reads --ckpt, --data, --config, --tokenizer, "
                                         r"--eval_limit, --eval_split, --device, --image_cache\)"):
        train.main(["--eval-only", "--ckpt", start_weights, "--data", data, "--steps", "5", "--seed", "3"])
    with pytest.raises(SystemExit, match=r"model config overrides \(--llm.n_layers\) would change nothing: drop"):
        train.main(["--eval-only", "--ckpt", start_weights, "--data", data, "--llm.n_layers=6"])
    with pytest.raises(SystemExit, match="no multiple-choice questions at .*eval_mc.jsonl: --data must be a folder"):
        train.main(["--eval-only", "--ckpt", start_weights, "--data", str(tmp_path)])
    with pytest.raises(SystemExit, match="no checkpoint at .*model.pt"):
        train.main(["--eval-only", "--ckpt", str(tmp_path), "--data", data])
    (tmp_path / "ckpt.pt").mkdir()  # a folder where --resume reads a file: said, not a traceback
    with pytest.raises(SystemExit, match="no checkpoint at .*ckpt.pt; remove the stage folder"):
        resume.resumable_state(str(tmp_path / "ckpt.pt"), 3, None, None, None, 1, print)
    with pytest.raises(SystemExit, match="--eval_only needs --ckpt"):
        train.main(["--eval-only", "--data", data])
    monkeypatch.setattr(train, "evaluate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl-C midway
    with pytest.raises(SystemExit, match=r"^\n\(evaluation interrupted: nothing was written\)$"):
        train.main(["--eval-only", "--ckpt", start_weights, "--data", data, "--eval_limit", "5"])


def test_a_released_preset_gets_data_without_a_tokenizer_and_asks_for_the_released_one(data, tmp_path, capsys):
    # 102,400 tokens cannot be learnt from the synthetic corpus, and the released weights need their own tokenizer
    assert [train.parse_args(["--config", p])[0].data for p in ("tiny", "1.3b")] == ["data", "data-1.3b"]
    mine, weights = tmp_path / "data", tmp_path / "released"
    prepare_data.main(["--out", str(mine), "--config", "1.3b", "--n", "2"])
    assert "the '1.3b' preset reads DeepSeek-LLM's" in capsys.readouterr().out
    assert (mine / "meta.json").exists() and not (mine / "tokenizer.json").exists()
    assert prepare_data.data_to_prepare(str(mine), "1.3b") is None  # no tokenizer of its own is not one missing
    prepare_data.main(["--out", str(mine), "--config", "1.3b", "--n", "2"])
    assert "already prepared" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare_data.main(["--out", str(mine), "--show", "1"])
    assert "no tokenizer at " in (err := capsys.readouterr().err) and "pass --tokenizer" in err
    argv = ["--stage", "1", "--config", "1.3b", "--data", str(mine), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=f"--init_from {weights}: no such file or folder"):
        train.main(argv + ["--init_from", str(weights)])
    with pytest.raises(SystemExit, match="was prepared for the 'tiny' preset .images at 256 px.; the '1.3b' model"):
        train.main(argv[:4] + ["--data", data, "--out", str(tmp_path / "out")])  # tiny's data: refused, not rebuilt
    weights.mkdir()  # a folder without a tokenizer.json
    with pytest.raises(SystemExit, match="no tokenizer at .*reads DeepSeek-LLM's tokenizer: pass --init_from a "
                                         "released"):
        train.main(argv + ["--init_from", str(weights)])


def test_a_llava_import_alone_trains_stages_1_and_3(data, start_weights, tmp_path, capsys):
    from nanovl.llava import import_llava
    images = sorted(os.listdir(os.path.join(data, "images", "code")))[:3]
    ask = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    rows = [{"image": f"code/{images[0]}", "conversations": ask("<image>\nWhat colour is the button?", "Blue.")},
            {"image": f"code/{images[1]}", "conversations": ask("<image>\nWhat is this?", "A web page.") +
             ask("And the button?", "It is red.")},
            {"image": f"code/{images[2]}", "caption": "A small web page with a button."}]
    (tmp_path / "mine.json").write_text(json.dumps(rows))
    mine = str(tmp_path / "mine")
    import_llava(str(tmp_path / "mine.json"), os.path.join(data, "images"), mine)
    tokenizer = os.path.join(data, "tokenizer.json")  # an import has none: --init_from's folder or --tokenizer
    argv = ["--data", mine, "--init_from", start_weights, "--tokenizer", tokenizer, "--steps", "2", "--batch_size", "2",
            "--micro_batch", "2", "--workers", "0"]
    with pytest.raises(SystemExit, match="trains on text_chat rows .text chats.* holds none; without them, pass "
                                         "--text_sft_share 0"):
        train.main(argv + ["--stage", "3", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"stage 1 trains on multimodal rows .* holds none that fit: all 1 are longer "
                                         r"than 40 tokens; a longer --seq_len \(up to the model's context, 512\) keeps "
                                         r"them$"):  # (and no word of --captions, which this import needs not)
        train.main(argv + ["--stage", "1", "--out", str(tmp_path / "o1"), "--seq_len", "40"])
    (tmp_path / "long.json").write_text(json.dumps([dict(rows[2], caption="A page. " * 400)]))  # past the context
    import_llava(str(tmp_path / "long.json"), os.path.join(data, "images"), str(tmp_path / "long"))
    with pytest.raises(SystemExit, match=r"holds none that fit: all 1 are longer than 512 tokens, the model's "
                                         r"context: shorten or split them$"):  # (no longer --seq_len to ask for)
        train.main(argv[:1] + [str(tmp_path / "long")] + argv[2:] + ["--stage", "1", "--out", str(tmp_path / "o1")])
    for stage in ("1", "3"):
        train.main(argv + ["--stage", stage, "--out", str(tmp_path / f"out{stage}"), "--text_sft_share", "0"])
        printed = capsys.readouterr().out
        assert f"stage {stage}: {mine} has no held-out questions" in printed and "MCPPL" not in printed
        if stage == "1":  # one caption for batches of two
            assert ("data: multimodal has 1 sample, fewer than a batch of 2: each of its steps repeats samples"
                    in printed)
        folder = tmp_path / f"out{stage}" / f"stage{stage}"
        assert json.loads((folder / "eval.json").read_text()) == {"stage": int(stage), "mc": None, "open": None,
                                                                   "bpb": None, "questions": None}  # none asked
        assert (folder / "model.pt").exists()
    with pytest.raises(SystemExit, match="stage 0 trains on prepare_data.py's corpus .* is a LLaVA import"):
        train.main(["--data", mine, "--out", str(tmp_path / "o0")])
    # The advice of the other refusals can be followed with an import as --data: prepare_data.py makes no tokenizer
    # in an import, and stage 0 refuses one.
    (tmp_path / "lone").mkdir()
    shutil.copy(start_weights, tmp_path / "lone" / "model.pt")  # (no tokenizer.json beside it)
    with pytest.raises(SystemExit, match=rf"no tokenizer at {mine}/tokenizer.json; {mine} is a LLaVA import, which "
                                         r"has none: pass --tokenizer PATH, .* e.g. data/tokenizer.json\)$"):
        train.main(argv[:2] + ["--init_from", str(tmp_path / "lone" / "model.pt")] + argv[6:] +
                   ["--stage", "3", "--text_sft_share", "0", "--out", str(tmp_path / "o3")])
    # A --tokenizer that is missing gets the preset's advice: the import's is for its own folder's tokenizer.
    with pytest.raises(SystemExit, match=r"no tokenizer at \S*nope.json; prepare_data.py --config tiny makes one, "
                                         r"or pass --tokenizer PATH$"):
        train.main(argv[:4] + ["--tokenizer", str(tmp_path / "nope.json")] + argv[6:] +
                   ["--stage", "3", "--text_sft_share", "0", "--out", str(tmp_path / "o3")])
    # A model of another vocabulary size than its preset's: prepare_data.py makes no tokenizer that fits it
    with pytest.raises(SystemExit, match=r"tokenizer.json has 2048 tokens .* vocabulary of 4096 and expects 3; "
                                         r"prepare_data.py makes the 'tiny' preset's tokenizers with its 2048 tokens: "
                                         r"leave --llm.vocab_size out, or pass --tokenizer PATH, one of 4096$"):
        resume.stage_tokenizer(recipe.TrainConfig(data=data), get_config("tiny", **{"llm.vocab_size": 4096}), [])
    with pytest.raises(SystemExit, match=r"stage 1 starts from stage 0's final weights, but .* does not exist: stage 0 "
                                         r"trains on prepare_data.py's synthetic corpus, so run --stage 0 with --out "
                                         rf".*fresh and without --data {mine} first, or pass --init_from PATH$"):
        train.main(["--data", mine, "--stage", "1", "--out", str(tmp_path / "fresh")])
    # One-question chats only (LLaVA's usual kind): tiny's split of short chats from long ones has nothing to split,
    # and the stage trains on them as one group without being told.
    (tmp_path / "short.json").write_text(json.dumps(rows[:1] * 3))
    import_llava(str(tmp_path / "short.json"), os.path.join(data, "images"), str(tmp_path / "short"))
    train.main(argv[:1] + [str(tmp_path / "short")] + argv[2:] + ["--stage", "3", "--out", str(tmp_path / "o3"),
                                                                  "--text_sft_share", "0"])
    assert (tmp_path / "o3" / "stage3" / "model.pt").exists()
    with pytest.raises(SystemExit, match=r"stage 1 trains on multimodal rows .* holds none; an import of one-question "
                                         r"chats about an image holds captions when made with prepare_data.py --llava "
                                         r"FILE --captions$"):  # (LLaVA-Pretrain's captions are written as chats)
        train.main(argv[:1] + [str(tmp_path / "short")] + argv[2:] + ["--stage", "1", "--out", str(tmp_path / "o1")])


def test_bad_starts_get_clear_errors(data, start_weights, tmp_path):
    state = torch.load(start_weights, weights_only=True)  # weights saved from a diverged run: named, not trained on
    state["model"]["llm.norm.weight"][:3] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(SystemExit, match=r"nan.pt: 1 tensor holds NaN or infinite values: llm.norm.weight \(3 of "):
        train.main(["--data", data, "--stage", "3", "--out", str(tmp_path / "o"), "--init_from",
                    str(tmp_path / "nan.pt")])
    state["model"]["llm.norm.weight"] = state["model"]["llm.norm.weight"].int()  # (a relabelled tensor)
    torch.save(state, tmp_path / "int.pt")
    with pytest.raises(SystemExit, match=r"int.pt: 1 not floating-point: llm.norm.weight: int32$"):
        train.main(["--data", data, "--stage", "3", "--out", str(tmp_path / "o"), "--init_from",
                    str(tmp_path / "int.pt")])
    with pytest.raises(SystemExit, match="stage 2 starts from stage 1's final weights, but .* does not exist"):
        train.main(["--data", data, "--stage", "2", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--init_from .*nothing.pt: no such file or folder"):
        train.main(["--data", data, "--stage", "2", "--out", str(tmp_path / "o"), "--init_from",
                    str(tmp_path / "nothing.pt")])
    # A released size's stage 1 needs pretrained parts: said before its data (minutes at 1024 px) is made.
    with pytest.raises(SystemExit, match="stage 1 of '7b' starts from pretrained parts: pass --init_from"):
        train.main(["--config", "7b", "--stage", "1", "--data", str(tmp_path / "none7b"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "none7b").exists()
    with pytest.raises(SystemExit, match="another model config:\n  llm.n_layers: checkpoint 4 vs now 2\n"):
        train.main(["--data", data, "--stage", "3", "--init_from", start_weights, "--out", str(tmp_path / "o"),
                    "--llm.n_layers=2"])
    with pytest.raises(SystemExit, match="tokenizer.json has 2048 tokens .* vocabulary of 4096"):
        train.main(["--data", data, "--stage", "1", "--init_from", start_weights, "--out", str(tmp_path / "o"),
                    "--llm.vocab_size=4096"])
    with pytest.raises(SystemExit, match="stage 0 .* is for the presets trained from scratch"):
        train.main(["--data", data, "--stage", "0", "--config", "1.3b", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no field 'layers'"):
        train.main(["--data", data, "--llm.layers=2"])
    stage = tmp_path / "stage2"  # a tiny stage folder given to a small run: named before any data is made
    stage.mkdir()
    (stage / "model.pt").write_bytes(open(start_weights, "rb").read())  # (the config inside it names the preset)
    with pytest.raises(SystemExit, match="stage2 holds a 'tiny' model .*, but this run builds 'small': pass --config "
                                         "tiny"):
        train.main(["--config", "small", "--stage", "3", "--init_from", str(stage), "--data", str(tmp_path / "none"),
                    "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="stage2.model.pt, where stage 3 starts, holds a 'tiny' model .*, but this run "
                                         r"builds 'small': pass --config tiny, or start from a 'small' checkpoint \("):
        train.main(["--config", "small", "--stage", "3", "--data", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert not (tmp_path / "none").exists()
    for argv, message in [(["--steps", "-5"], "--steps must be 0 or more .0: the default., got -5"),
                          (["--resume=maybe"], "--resume expects true or false, got 'maybe'"),
                          (["--warmup", "-5"], "--warmup must be 0 or more .* got -5"),
                          (["--workers", "-1"], r"--workers must be 0 or more \(0: no worker processes\), got -1"),
                          (["--clip_batch", "1"], "--clip_batch must be 2 or more, got 1"),
                          (["--setps", "5"], r"unknown setting --setps \(did you mean --steps\?\); python train.py "
                                             "--help lists the training settings"),
                          (["--resum"], r"unknown setting --resum \(did you mean --resume\?\)"),  # last, no value
                          (["--image_token_idd=5"], r"did you mean --image_token_id\?"),
                          (["--device", "tpu"], "'tpu' is not a device torch knows"),
                          (["--grad_clip=-1"], r"--grad_clip must be above 0 \(the largest gradient norm of each "
                                               r"clipping group\), got -1.0"),
                          (["--lang_share=2"], r"--lang_share must be in \[0, 1\], got 2.0"),
                          (["--text_sft_share=-0.5"], r"--text_sft_share must be in \[0, 1\] \(-1: the default\)"),
                          (["--beta1=1"], r"--beta1 must be in \[0, 1\), got 1.0"),
                          (["--lr=nan"], "--lr must be a finite number"),
                          (["--schedule=linear"], "--schedule must be cosine or step .*, got 'linear'"),
                          (["--pack=2"], r"--pack must be 0 or 1 \(-1: the default, stage 2 only\), got 2"),
                          (["--seed", str(2 ** 64 - 1)], r"--seed must be from 0 to 2\*\*62 - 1"),
                          (["--seq_len", "2048"], "--seq_len 2048 is longer than the model's context of 512 tokens"),
                          (["--init_from", ","], "--init_from ',' names nothing: give one or more, separated by "
                                                 "commas"),  # (it fell back to the stage before's weights)
                          (["--extra_data", ",,"], "--extra_data ',,' names nothing"),
                          (["--extra_data", data], f"--extra_data {data} is the folder --data names already: name "
                                                   "each folder once"),  # (its rows read twice, silently)
                          ]:
        with pytest.raises(SystemExit, match=message):
            train.main(["--data", data, "--out", str(tmp_path / "o")] + argv)
    extra = tmp_path / "extra"  # a malformed row: named by file and line before any step is taken
    extra.mkdir()
    (extra / "sft.jsonl").write_text(json.dumps({"conversation": [{"role": "assistant", "content": "Hi"}]}) + "\n")
    with pytest.raises(SystemExit, match=f"{extra / 'sft.jsonl'}, line 1: message 0 has role 'assistant'"):
        train.main(["--data", data, "--stage", "3", "--init_from", start_weights, "--out", str(tmp_path / "x"),
                    "--extra_data", str(extra)])
    (extra / "sft.jsonl").unlink()
    (extra / "pretrain.jsonl").write_text(json.dumps({"text": "<image_placeholder> hi", "images": ["a.png"]}) + "\n")
    with pytest.raises(SystemExit, match=f"{extra / 'pretrain.jsonl'}, line 1: no 'category'"):  # stage 1 picks by it
        train.main(["--data", data, "--stage", "1", "--init_from", start_weights, "--out", str(tmp_path / "x"),
                    "--extra_data", str(extra)])
    (tmp_path / "a_file").write_text("notes")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "stage3").write_text("notes")  # (said before the data is made and the model built)
    for out, message in ((tmp_path / "a_file", "a_file: .*a_file is a file; expected a folder, or a path where"),
                         (tmp_path / "a_file" / "sub", "sub: .*a_file is a file; expected a folder, or a path where"),
                         (tmp_path / "p", "p: .*p.stage3 is a file; expected stage 3's folder, or nothing there")):
        with pytest.raises(SystemExit, match=f"--out .*{message}"):
            train.main(["--data", data, "--stage", "3", "--init_from", start_weights, "--out", str(out)])
    with pytest.raises(SystemExit, match="--data .*a_file is a file: expected a folder made by prepare_data.py"):
        train.main(["--data", str(tmp_path / "a_file"), "--stage", "3", "--init_from", start_weights, "--out",
                    str(tmp_path / "y")])
    for extras, message in ((str(tmp_path / "a_file"), "a_file: a file; expected a folder of rows"),
                            (f"{extra},{tmp_path}/./extra", f"--extra_data {tmp_path}/./extra is the folder "
                                                            f"--extra_data {extra} names already")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            train.main(["--data", data, "--stage", "1", "--init_from", start_weights, "--out", str(tmp_path / "x"),
                        "--extra_data", extras])
    with pytest.raises(SystemExit, match=r"--stop_after 3 is not a checkpoint step of stage 3 \(every 2, and the last, "
                                         r"8\)"):
        train.main(["--data", data, "--stage", "3", "--init_from", start_weights, "--out", str(tmp_path / "s"),
                    "--steps", "8", "--ckpt_every", "2", "--stop_after", "3"])
    with pytest.raises(SystemExit, match="stage 3: --trainable lm names no parameter of the model; its modules: sig"):
        train.main(["--data", data, "--stage", "3", "--init_from", start_weights, "--out", str(tmp_path / "o"),
                    "--trainable", "lm"])
    evil = tmp_path / "evil.pt"  # a pickle holding a class, not only tensors: weights_only refuses it, with the reason
    torch.save({"model": {}, "config": None, "hook": DeepSeekVL}, evil)
    with pytest.raises(SystemExit, match="only tensors and plain containers are accepted"):
        train.main(["--data", data, "--stage", "3", "--init_from", str(evil), "--out", str(tmp_path / "o")])
    assert not any((tmp_path / d).exists() for d in "oxs")  # a refused run leaves no stage folder


def test_help_lists_every_training_setting(capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--help"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(train.__doc__.strip()[:60])
    for f in dataclasses.fields(recipe.TrainConfig):
        assert f"\n{f.name}: " in printed


def test_a_flag_takes_a_true_or_false_after_it_and_an_empty_out_is_refused():
    # --help says "--key value" for every setting: a flag's true or false was "unexpected argument 'true'"
    for argv, resumed, compiled in [(["--resume", "true", "--compile", "No"], True, False),
                                    (["--resume", "--compile"], True, True),
                                    (["--resume=0", "--compile", "1"], False, True)]:
        tc, _ = train.parse_args(argv + ["--steps", "3"])
        assert (tc.resume, tc.compile, tc.steps) == (resumed, compiled, 3)
    with pytest.raises(SystemExit, match="^unexpected argument 'maybe'"):
        train.parse_args(["--resume", "maybe"])
    # An unset shell variable as --out wrote every stage into the current folder
    with pytest.raises(SystemExit, match=r"^--out is empty: expected the folder the stages are written to"):
        train.parse_args(["--out", ""])


def test_contrastive_batches_hold_distinct_captions():
    from nanovl.stage0 import plan_distinct
    captions = ["red", "blue", "green", "red", "red", "blue", "title A", "title B", "title A", "sign"]
    plan = plan_distinct(captions, batch=4, steps=30, seed=0)
    assert plan == plan_distinct(captions, 4, 30, seed=0) and plan != plan_distinct(captions, 4, 30, seed=1)
    for _, rows in plan:
        assert len(rows) == 4 and len({captions[i] for i in rows}) == 4  # never a repeated caption
    assert {i for _, rows in plan for i in rows} == set(range(len(captions)))  # every row gets its turn
    with pytest.raises(ValueError, match="only 6 different captions"):
        plan_distinct(captions, batch=7, steps=1, seed=0)


def test_stage1_reads_captions_and_documents(data):
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    sources, share = recipe.stage_data(1, recipe.TrainConfig(data=data), tok, get_config("tiny"), 512, [data])
    rows = [json.loads(line) for line in open(os.path.join(data, "pretrain.jsonl"))]
    picked = [r for r in rows if r["category"] in ("caption", "ocr")]  # paper section 3.2.1
    assert {r["category"] for r in picked} == {"caption", "ocr"} and len(picked) < len(rows)
    assert list(sources) == ["multimodal"] and share(0) == {"multimodal": 1.0}
    src = sources["multimodal"]
    assert len(src) + src.dropped == len(picked) and src.dropped < len(picked)
    assert {s.images[0] for s in src.samples} <= {os.path.join(data, r["images"][0]) for r in picked}


def test_stage3_groups_one_question_chats_apart(data, tmp_path):
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    cfg = get_config("tiny")
    tc = recipe.TrainConfig(data=data, steps=10, text_sft_share=0.25, short_chat_share=0.5)
    sources, share = recipe.stage_data(3, tc, tok, cfg, 512, [data])
    assert share(0) == {"chat": 0.25, "short_chat": 0.5, "text_chat": 0.25}
    rows = [json.loads(line) for line in open(os.path.join(data, "sft.jsonl"))]
    expect = {"short_chat": [r for r in rows if r["images"] and len(r["conversation"]) == 2],
              "chat": [r for r in rows if r["images"] and len(r["conversation"]) > 2],
              "text_chat": [r for r in rows if not r["images"]]}
    assert expect["short_chat"] and expect["chat"]
    for name, src in sources.items():
        assert len(src) + src.dropped == len(expect[name]), name
    assert all(sum(s.mask) and len(s.images) for s in sources["short_chat"].samples)
    merged, share = recipe.stage_data(3, dataclasses.replace(tc, short_chat_share=0.0), tok, cfg, 512, [data])
    assert set(merged) == {"chat", "text_chat"} and share(0) == {"chat": 0.75, "text_chat": 0.25}
    assert len(merged["chat"]) == len(sources["chat"]) + len(sources["short_chat"])
    # Shares that add up to 1 in decimals (not in binary: 1 - 0.33 - 0.67 is -1e-16) leave the long chats none.
    _, share = recipe.stage_data(3, dataclasses.replace(tc, text_sft_share=0.33, short_chat_share=0.67), tok, cfg, 512,
                                [data])
    assert share(0) == {"short_chat": 0.67, "text_chat": 0.33}
    # Image chats that all ask several questions (or all one) leave nothing to split: one group, with both shares.
    with open(tmp_path / "sft.jsonl", "w") as f:
        for r in rows:
            if not r["images"] or len(r["conversation"]) > 2:
                f.write(json.dumps(dict(r, images=[os.path.join(data, p) for p in r["images"]])) + "\n")
    sources, share = recipe.stage_data(3, tc, tok, cfg, 512, [str(tmp_path)])
    assert set(sources) == {"chat", "text_chat"} and share(0) == {"chat": 0.75, "text_chat": 0.25}
    assert len(sources["chat"]) + sources["chat"].dropped == len(expect["chat"])
    # The long chats' share is what the others leave, to the decimals the user wrote (rounded only to hide binary)
    _, share = recipe.stage_data(3, dataclasses.replace(tc, text_sft_share=0.125), tok, cfg, 512, [data])
    assert share(0) == {"chat": 0.375, "short_chat": 0.5, "text_chat": 0.125}


def test_old_synthetic_data_is_rebuilt_with_its_own_arguments(tmp_path):
    import prepare_data
    assert prepare_data.data_to_prepare(str(tmp_path), "tiny")[1] == ["--out", str(tmp_path), "--config", "tiny"]
    ident = {"version": prepare_data.VERSION, "config": "tiny", "n": 50, "seed": 3, "image_size": 0, "text": {}}
    (tmp_path / "meta.json").write_text(json.dumps({"identity": ident}))
    own = ["--out", str(tmp_path), "--config", "tiny", "--n", "50", "--seed", "3", "--image-size", "0"]
    built = sorted(prepare_data.TRAINED_ON)
    assert prepare_data.data_to_prepare(str(tmp_path), "tiny") == (f"{', '.join(built)} missing", own)
    for name in built:
        (tmp_path / name).mkdir() if name == "images" else (tmp_path / name).write_text("")
    assert prepare_data.data_to_prepare(str(tmp_path), "tiny") is None
    (tmp_path / "text.jsonl").unlink()  # removed since: rebuilt (stage 0 said "no rows for modality ['language']")
    assert prepare_data.data_to_prepare(str(tmp_path), "tiny") == ("text.jsonl missing", own)
    (tmp_path / "text.jsonl").write_text("")
    (tmp_path / "meta.json").write_text(json.dumps({"identity": dict(ident, version=prepare_data.VERSION - 1)}))
    why, args = prepare_data.data_to_prepare(str(tmp_path), "tiny")
    assert "older prepare_data.py" in why and args == own
    (tmp_path / "meta.json").write_text(json.dumps({"llava": {}}))  # an import: used as it is, never rebuilt
    assert prepare_data.data_to_prepare(str(tmp_path), "tiny") is None
    (tmp_path / "meta.json").unlink()
    (tmp_path / "thesis.txt").write_text("not made by prepare_data.py")  # never built over
    with pytest.raises(SystemExit, match=r"holds files but no meta.json of prepare_data.py's; .* \(its pretrain.jsonl "
                                         r"and sft.jsonl, rows of your own, are read with --extra_data .*\)$"):
        prepare_data.data_to_prepare(str(tmp_path), "tiny")
    assert (tmp_path / "thesis.txt").read_text() == "not made by prepare_data.py"
    for name in ("pretrain.jsonl", "sft.jsonl"):
        (tmp_path / name).unlink()
    with pytest.raises(SystemExit, match=r"holds files but no meta.json of prepare_data.py's; .* to make one there$"):
        prepare_data.data_to_prepare(str(tmp_path), "tiny")


def test_stage_all_checks_every_stage_settings_before_the_first_trains(data, tmp_path, monkeypatch):
    # A setting only stage 3 cannot run with stops `--stage all` at once, not after stages 0-2 have trained.
    ran = []
    monkeypatch.setattr(train, "run_stage", lambda stage, *a: ran.append(stage))
    monkeypatch.setattr(train, "data_to_prepare", lambda *a: None)
    base = ["--out", str(tmp_path / "o"), "--data", data]
    with pytest.raises(SystemExit, match=r"--text_sft_share 0.6 and --short_chat_share 0.6 add up to more than 1"):
        train.main(base + ["--text_sft_share", "0.6", "--short_chat_share", "0.6"])
    with pytest.raises(SystemExit, match=r"stage 0: batch_size 4 is not divisible by 1 processes x micro_batch 3: "
                                         r"pass a --micro_batch that divides 4 \(stage 0 keeps its micro-batch as "
                                         r"given: .*; stages 1-3 take the largest up to it that splits theirs\)"):
        train.main(base + ["--micro_batch", "3"])
    # One of the two given, the other the preset's (0.65 for one-question chats): the sum is the same problem
    with pytest.raises(SystemExit, match=r"--text_sft_share 0.6 and --short_chat_share 0.65 \(the preset's\) add up"):
        train.main(base + ["--text_sft_share", "0.6"])
    assert ran == []
    train.main(base + ["--text_sft_share", "0.33", "--short_chat_share", "0.67"])  # 1 in decimals, not in binary
    assert ran == [0, 1, 2, 3]
    # A --micro_batch for the whole run that splits stage 0's batch of 4 but not stage 2's 6 packed rows (as the
    # advice for 2 processes would have it): stages 1-3 take the largest micro-batch up to it that splits theirs.
    train.main(base + ["--micro_batch", "4"])
    assert ran == [0, 1, 2, 3] * 2
    tc = recipe.TrainConfig(micro_batch=4)
    assert recipe.split_batch(2, recipe.stage_hparams(2, tc, get_config("tiny"))[0], 1) == (3, 2)
    assert recipe.split_batch(2, recipe.stage_hparams(2, tc, get_config("tiny"))[0], 2) == (3, 1)
    # A batch the processes cannot share: said as that (the micro-batch, which stages 1-3 would fit, aside)
    with pytest.raises(SystemExit, match=r"^stage 3: batch_size 5 is not divisible by 2 processes: pass a --batch_size "
                                         "that 2 processes divide$"):
        recipe.split_batch(3, dict(recipe.stage_hparams(3, tc, get_config("tiny"))[0], batch_size=5), 2)


def test_stage_all_checks_every_stages_rows_and_questions_before_the_first_trains(data, start_weights, tmp_path,
                                                                                 monkeypatch, capsys):
    # A malformed row that only a later stage reads, a question of the later stages' evaluation, or a modality group
    # a later stage draws from with no rows stopped `--stage all` only when that stage began, after the ones before
    # it had trained (at the released sizes, days).
    import shutil
    ran = []
    monkeypatch.setattr(train, "run_stage", lambda stage, *a: ran.append(stage))
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    monkeypatch.setattr(train, "data_to_prepare", lambda *a: None)  # (the copy is edited on purpose)
    args = ["--data", str(copy), "--out", str(tmp_path / "o")]
    sft = (copy / "sft.jsonl").read_text()
    n = len(sft.splitlines())
    bad = {"images": [], "conversation": [{"role": "assistant", "content": "Hi"}]}  # stages 2 and 3 read it
    (copy / "sft.jsonl").write_text(sft + json.dumps(bad) + "\n")
    with pytest.raises(SystemExit, match=rf"sft.jsonl, line {n + 1}: message 0 has role 'assistant', expected 'user'"):
        train.main(args)
    (copy / "sft.jsonl").write_text(sft)
    mc = (copy / "eval_mc.jsonl").read_text().splitlines()
    (copy / "eval_mc.jsonl").write_text("\n".join(mc[:3] + [json.dumps(dict(json.loads(mc[3]), options=["a"]))] +
                                                 mc[4:]) + "\n")
    with pytest.raises(SystemExit, match=r"the held-out data: .*eval_mc.jsonl, line 4: 'options' must be a list"):
        train.main(args)
    (copy / "eval_mc.jsonl").write_text("\n".join(mc) + "\n")
    # A context too small for the questions, with the tokenizer the stages train with: said before stage 0 trains
    with pytest.raises(SystemExit, match=r"the held-out data: .*eval_mc.jsonl, line 1: with its 1 image \(36 tokens "
                                         r"each\), the question and its longest option make \d+ input tokens, but the "
                                         r"model's context is 64$"):
        train.main(args + ["--llm.max_seq_len=64"])
    # Chats with images only, and every step of stage 2 a chat: its first step, before the warm-up lets the chats
    # with images in, has nothing to draw from
    (copy / "sft.jsonl").write_text("".join(line + "\n" for line in sft.splitlines() if json.loads(line)["images"]))
    with pytest.raises(SystemExit, match="--sft_share 1 leaves stage 2's first step nothing to train on"):
        train.main(args + ["--sft_share", "1"])
    (copy / "text.jsonl").write_text("")  # no text: stage 2's language steps have nothing to read
    with pytest.raises(SystemExit, match=rf"stage 2 trains on language rows \(text\), but {copy} holds none$"):
        train.main(args)
    assert ran == []
    (copy / "sft.jsonl").write_text(sft)
    train.main(args + ["--stage", "3", "--init_from", start_weights])  # (what a stage does not read is not asked of it)
    assert ran == [3]
    # Stage 1 reads captions and OCR pages alone: rows of one's own with another category were left out unsaid
    own = tmp_path / "own"
    own.mkdir()
    (own / "pretrain.jsonl").write_text(json.dumps({"category": "photo", "text": "A cat.", "images": []}) + "\n")
    with pytest.raises(SystemExit, match=r"^stage 1 trains on multimodal rows \(captions\+ocr; the image-text rows of "
                                         r"other categories left out: 1 photo \(category 'caption' or 'ocr' brings "
                                         rf"a row in\)\), but {own} holds none"):
        train.check_stage_rows(1, recipe.TrainConfig(data=str(own)), get_config("tiny"))
    # The images of rows written by hand are looked for before anything trains (a missing one stopped the run only when
    # a step drew its row); those of prepare_data.py's corpus, which it checked as it made them, are not looked for
    chat = lambda image: json.dumps({"category": "mine", "images": [image], "conversation": [
        {"role": "user", "content": "<image_placeholder>What is it?"}, {"role": "assistant", "content": "A cat."}]})
    (own / "cat.png").write_bytes(b"")  # (whether it is there is what is asked here)
    (own / "sft.jsonl").write_text("\n".join([chat("cat.png"), chat("nope.png"), chat("gone.png")]) + "\n")
    with pytest.raises(SystemExit, match=rf"^{own}.sft.jsonl, line 2: image {own}.nope.png does not exist \(and 1 "
                                         r"more image of stage 3's rows\); fix or remove the rows that name them$"):
        train.check_stage_rows(3, recipe.TrainConfig(data=data, extra_data=str(own)), get_config("tiny"))
    (own / "sft.jsonl").write_text("\n".join([chat("nope.png")] * 3) + "\n")  # one image, named by three rows
    with pytest.raises(SystemExit, match=rf"^{own}.sft.jsonl, line 1: image {own}.nope.png does not exist \(named by 3 "
                                         r"of stage 3's rows\); fix or remove"):
        train.check_stage_rows(3, recipe.TrainConfig(data=data, extra_data=str(own)), get_config("tiny"))
    (own / "dir.png").mkdir()
    (own / "sft.jsonl").write_text(chat("dir.png") + "\n" + chat("cat.png ") + "\n")
    with pytest.raises(SystemExit, match=rf"^{own}.sft.jsonl, line 1: image {own}.dir.png is a folder \(and 1 more "
                                         r"image"):
        train.check_stage_rows(3, recipe.TrainConfig(data=data, extra_data=str(own)), get_config("tiny"))
    (own / "sft.jsonl").write_text(chat("cat.png ") + "\n")  # a stray space: the file that is there is named
    with pytest.raises(SystemExit, match=r"line 1: image .*cat.png  does not exist .*cat.png"):
        train.check_stage_rows(3, recipe.TrainConfig(data=data, extra_data=str(own)), get_config("tiny"))
    (own / "dir.png").rmdir()
    (own / "sft.jsonl").write_text(chat("cat.png") + "\n")
    train.check_stage_rows(3, recipe.TrainConfig(data=data, extra_data=str(own)), get_config("tiny"))
    (own / "sft.jsonl").unlink()
    # Nor were those of a LLaVA import, which names them where they were when it was made: a folder of images moved
    # since stopped the run at the first step that drew one of its rows, with the advice to fix that row
    (tmp_path / "pictures").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "pictures" / "red.png")
    (tmp_path / "llava.json").write_text(json.dumps([{"id": 1, "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]}]))
    imported = tmp_path / "imported"
    prepare_data.main(["--llava", str(tmp_path / "llava.json"), "--images", str(tmp_path / "pictures"),
                       "--out", str(imported)])
    train.check_stage_rows(3, recipe.TrainConfig(data=data, extra_data=str(imported)), get_config("tiny"))
    (tmp_path / "pictures").rename(tmp_path / "moved")
    with pytest.raises(SystemExit, match=rf"^{imported}.sft.jsonl, line 1: image {tmp_path}.pictures.red.png does not "
                                         rf"exist; the import in {imported} was made from the images in "
                                         rf"{tmp_path}.pictures, which have moved or gone since: import again with "
                                         rf"--images where they are now \(python prepare_data.py --llava "
                                         rf"{tmp_path}.llava.json --images FOLDER --out {imported}\)$"):
        train.check_stage_rows(3, recipe.TrainConfig(data=data, extra_data=str(imported)), get_config("tiny"))
    captions = tmp_path / "captions"  # an import of chats as captions is made again as one
    prepare_data.main(["--llava", str(tmp_path / "llava.json"), "--images", str(tmp_path / "moved"), "--out",
                       str(captions), "--captions"])
    (tmp_path / "moved").rename(tmp_path / "again")
    with pytest.raises(SystemExit, match=rf"--images FOLDER --out {captions} --captions\)$"):
        train.check_stage_rows(1, recipe.TrainConfig(data=data, extra_data=str(captions)), get_config("tiny"))
    # Two imports of one file read its rows twice: a run is told as it reads its folders (here stopped right after,
    # by a --stage that does not exist). Once as captions, its one-question chats are captions in one and chats in the
    # other: its other chats are what is read twice.
    twice = tmp_path / "twice"
    shutil.copytree(imported, twice)
    source = os.path.realpath(tmp_path / "llava.json")
    for folders, what in [((imported, twice), "its rows are read twice"),
                          ((imported, captions), "its chats of more than one question or image are read twice (its "
                                                 "one-question chats are captions in one and chats in the other)")]:
        capsys.readouterr()
        with pytest.raises(SystemExit, match="--stage must be 0, 1, 2, 3 or all, got '9'"):
            train.main(["--data", data, "--extra_data", ",".join(map(str, folders)), "--stage", "9"])
        assert f"({folders[1]} and {folders[0]} are both imports of {source}: {what}, and weigh double in the mix)" \
            in capsys.readouterr().out
    (captions / "meta.json").write_text(json.dumps({"llava": "edited"}))  # (what it says cannot be read: not said)
    with pytest.raises(SystemExit, match=r"made from the images in \(not said\), .*\(python prepare_data.py --llava "
                                         rf"FILE --images FOLDER --out {captions}\)$"):
        train.check_stage_rows(1, recipe.TrainConfig(data=data, extra_data=str(captions)), get_config("tiny"))
    # Stage 2's text is read from --data alone: the folders of --extra_data are not named for it
    with pytest.raises(SystemExit, match=rf"^stage 2 trains on language rows \(text\), but {own} holds none$"):
        train.check_stage_rows(2, recipe.TrainConfig(data=str(own), extra_data=str(copy)), get_config("tiny"))


def test_a_run_says_how_many_samples_each_data_folder_gives(data, start_weights, tmp_path, capsys):
    own = tmp_path / "own"  # rows written by hand: one chat about one picture, beside the corpus
    own.mkdir()
    Image.new("RGB", (40, 30), "red").save(own / "red.png")
    (own / "sft.jsonl").write_text(json.dumps({"category": "mine", "images": ["red.png"], "conversation": [
        {"role": "user", "content": "<image_placeholder>What colour is it?"},
        {"role": "assistant", "content": "Red."}]}) + "\n")
    args = ["--data", data, "--stage", "3", "--init_from", start_weights, "--steps", "1", "--batch_size", "2",
            "--micro_batch", "2"] + FAST
    train.main(args + ["--out", str(tmp_path / "a")])
    alone = capsys.readouterr().out
    n = int(re.search(r"data: short_chat: (\d+) samples from one-question image chats\n", alone).group(1))
    train.main(args + ["--out", str(tmp_path / "b"), "--extra_data", str(own)])
    out = capsys.readouterr().out
    assert f"data: short_chat: {n + 1} samples from one-question image chats ({n} from {data}, 1 from {own})\n" in out
    assert "which this run does not read" not in out
    # Questions of one's own in that folder are not the held-out set (--data's): said, with the way to use them
    (own / "eval_mc.jsonl").write_text(json.dumps({"category": "mine", "images": ["red.png"], "question": "Colour?",
                                                   "options": ["red", "blue"], "answer": 0}) + "\n")
    train.main(args + ["--out", str(tmp_path / "c"), "--extra_data", str(own)])
    assert (f"(--extra_data {own} holds eval_mc.jsonl, which this run does not read: the held-out set is --data's; "
            f"evaluate on its questions with --eval-only --ckpt {tmp_path / 'c' / 'stageN'} --data {own})"
            ) in capsys.readouterr().out
    (own / "eval_mc.jsonl").rename(own / "val_mc.jsonl")  # validation questions alone: their split named
    (own / "eval_text.jsonl").write_text(json.dumps({"text": "Held out."}) + "\n")
    train.main(args + ["--out", str(tmp_path / "d"), "--extra_data", str(own)])
    assert ("holds val_mc.jsonl and eval_text.jsonl, which this run does not read: the held-out set is --data's; "
            f"evaluate on its questions with --eval-only --ckpt {tmp_path / 'd' / 'stageN'} --data {own} "
            "--eval_split val)") in capsys.readouterr().out
    (own / "val_mc.jsonl").unlink()  # text alone: no questions to evaluate on (--eval-only asks for some)
    train.main(args + ["--out", str(tmp_path / "e"), "--extra_data", str(own)])
    assert "holds eval_text.jsonl, which this run does not read: the held-out set is --data's)" in \
        capsys.readouterr().out


def test_a_micro_batch_that_does_not_split_a_stage_batch_is_said_with_the_one_taken(data, start_weights, tmp_path,
                                                                                   capsys, monkeypatch):
    made, loader = [], train.DataLoader  # (and the run's loader: its workers close the --out lock they inherit)
    monkeypatch.setattr(train, "DataLoader", lambda *a, **k: made.append(k) or loader(*a, **k))
    train.main(["--data", data, "--stage", "3", "--init_from", start_weights, "--out", str(tmp_path / "o"), "--steps",
                "1", "--batch_size", "6", "--micro_batch", "4"] + FAST)
    assert "stage 3: micro-batches of 3: --micro_batch 4 does not split the 6 samples of each process's step" in \
        capsys.readouterr().out
    assert [k["worker_init_fn"] for k in made] == [runs.close_inherited_locks]


def resume_check(tmp_path, stage, now, finished=False, saved_changes=None, **hp_changes):
    """resume.resumable_state on a checkpoint saved with the default settings (and saved_changes to its hparams),
    resumed with `now` (and hp_changes). Returns the hparams the resumed run goes on with."""
    cfg, path = get_config("tiny"), str(tmp_path / "ckpt.pt")
    tc = recipe.TrainConfig(steps=10)
    hp = recipe.stage_hparams(stage, tc, cfg)[0]
    micro = recipe.split_batch(stage, hp, 1)[0]
    saved = {k: v for k, v in dict(hp, **(saved_changes or {})).items() if v is not None}  # (None: not saved)
    torch.save({"model": {}, "optimizer": {}, "step": 3, "rng": {}, "stage": stage, "config": cfg.to_dict(),
                "train": dataclasses.asdict(tc), "hparams": saved, "split": [1, micro]}, path)
    hp = dict(hp, **hp_changes)
    resume.resumable_state(path, stage, cfg, now, hp, 1, lambda *a: None, finished)
    return hp


@pytest.mark.parametrize("stage, change", [(0, {"lr": 1e-4}), (1, {"grad_ckpt": True}), (1, {"device": "cpu"}),
                                           (1, {"image_cache": 7})])
def test_what_a_resume_is_told_it_may_change_it_may(tmp_path, stage, change):
    # A NaN stops every stage with "--resume it with a lower --lr", stage 0's too; a run killed for want of memory is
    # told --grad_ckpt; a run moves from a GPU to the CPU; the image cache is a matter of memory, not of the run.
    resume_check(tmp_path, stage, dataclasses.replace(recipe.TrainConfig(steps=10), **change),
                 **{k: v for k, v in change.items() if k == "lr"})


def test_a_finished_stage_0_and_a_checkpoint_older_than_start_weights_resume(tmp_path):
    # --resume over a finished stage 0 checks its settings only: how its steps were split no longer matters
    resume_check(tmp_path, 0, recipe.TrainConfig(steps=10, micro_batch=2), finished=True, micro_batch=2)
    with pytest.raises(SystemExit, match="was written by a run with other training settings"):  # (unfinished: it does)
        resume_check(tmp_path, 0, recipe.TrainConfig(steps=10, micro_batch=2), micro_batch=2)
    # A checkpoint from before the start weights were recorded (no "start") resumes; another start is refused
    resume_check(tmp_path, 2, recipe.TrainConfig(steps=10), saved_changes={"start": None}, start="stage1 run 7")
    with pytest.raises(SystemExit, match="continues a stage that began from other weights"):
        resume_check(tmp_path, 2, recipe.TrainConfig(steps=10), saved_changes={"start": "stage1 run 6"},
                     start="stage1 run 7")
    # Resumed where its start weights cannot be found (another --out, no --init_from): their record goes on into the
    # run's checkpoints, so that a later resume from other weights is still refused
    assert resume_check(tmp_path, 2, recipe.TrainConfig(steps=10), saved_changes={"start": "stage1 run 6"},
                        start=None)["start"] == "stage1 run 6"


def test_the_full_context_is_a_sequence_length_and_stage_0_keeps_its_split():
    assert recipe.stage_hparams(1, recipe.TrainConfig(seq_len=512), get_config("tiny"))[1] == 512  # the context itself
    tc = recipe.TrainConfig()
    hp = recipe.stage_hparams(0, tc, get_config("tiny"))[0]  # stage 0 counts its pairs per micro-batch: no other split
    with pytest.raises(SystemExit, match="not divisible"):
        recipe.split_batch(0, hp, 2)


def test_a_data_worker_killed_during_a_write_is_said_as_such(tmp_path):
    with pytest.raises(RuntimeError, match="DataLoader worker"):  # not "cannot write": the advice is --workers
        with runs.writing(str(tmp_path / "x")):
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed. ")


def test_the_last_steps_weights_are_checked_and_a_stage_killed_in_its_evaluation_finishes_it(data, start_weights,
                                                                                              tmp_path, monkeypatch,
                                                                                              capsys):
    # The last step is checkpointed (and its weights checked) even when it is no multiple of --ckpt_every: broken
    # there, no model.pt is written.
    steps, adamw_step = [], torch.optim.AdamW.step

    def breaking(self, *a, **k):
        result = adamw_step(self, *a, **k)
        steps.append(1)
        if len(steps) == 8:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", breaking)
    out = tmp_path / "out"
    common = ["--data", data, "--stage", "3", "--init_from", start_weights, "--batch_size", "2", "--eval_limit", "3",
              "--workers", "0"]
    with pytest.raises(SystemExit, match="after step 8, 1 weights are not finite"):
        train.main(common + ["--out", str(out), "--steps", "8", "--ckpt_every", "3"])
    assert not (out / "stage3" / "model.pt").exists()
    monkeypatch.undo()
    # Killed in the final evaluation (model.pt written, eval.json not): not finished, so --resume evaluates it.
    out = tmp_path / "o"
    train.main(common + ["--out", str(out), "--steps", "2"])
    (out / "stage3" / "eval.json").unlink()
    capsys.readouterr()
    train.main(common + ["--out", str(out), "--steps", "2", "--resume"])
    assert "already finished" not in capsys.readouterr().out and (out / "stage3" / "eval.json").exists()
    # Killed in a mid-stage evaluation at a step that is no checkpoint step (--eval_every 2, --ckpt_every 3): that
    # step was checkpointed first, so no step is lost.
    evaluations = []
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: evaluations.append(1) or (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(SystemExit, match=r"stage 3: interrupted. Its last checkpoint, .*ckpt.pt \(step 2\), is kept"):
        train.main(common + ["--out", str(tmp_path / "e"), "--steps", "6", "--ckpt_every", "3", "--eval_every", "2"])
    assert evaluations == [1] and torch.load(tmp_path / "e" / "stage3" / "ckpt.pt", weights_only=False)["step"] == 2
    # Stopped before its first checkpoint: the same command again trains the stage from its start, as the line says.
    monkeypatch.setattr(train, "learning_rate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit, match=r"stage 3: interrupted. No checkpoint of it was written yet: run the same "
                                         r"command again to train it from its start$"):
        train.main(common + ["--out", str(tmp_path / "n"), "--steps", "2"])
    monkeypatch.undo()
    train.main(common + ["--out", str(tmp_path / "n"), "--steps", "2"])
    assert (tmp_path / "n" / "stage3" / "eval.json").exists()
    # A later stage of the run stopped so: the same command again would be refused by the stages before it, done
    monkeypatch.setattr(train, "run_stage", lambda stage, *a: (_ for _ in ()).throw(KeyboardInterrupt) if stage == 2
                        else None)
    with pytest.raises(SystemExit, match=r"stage 2: interrupted. No checkpoint of it was written yet: run the same "
                                         r"command again with --resume \(the stages before it are done, and skipped\) "
                                         r"to train it from its start$"):
        train.main(["--data", data, "--out", str(tmp_path / "m")])


def test_a_data_folder_prepared_again_stops_the_run_reading_it_and_its_resume_says_how_the_data_differ(
        data, start_weights, tmp_path, monkeypatch, capsys):
    from nanovl.image import ImageProcessor
    folder = str(tmp_path / "data")
    shutil.copytree(data, folder)
    args = ["--data", folder, "--stage", "3", "--init_from", start_weights, "--out", str(tmp_path / "o"), "--steps",
            "3", "--batch_size", "4", "--micro_batch", "4", "--short_chat_share", "0", "--text_sft_share", "0",
            "--ckpt_every", "3"] + FAST + ["--log_every", "3"]
    readable, calls = ImageProcessor.pixels, []

    def prepared_again(self, image):  # as step 2 is read, a new meta.json (prepare_data's swap)
        calls.append(image)
        if len(calls) == 5:
            meta = os.path.join(folder, "meta.json")
            shutil.copy(meta, meta + ".new")
            os.replace(meta + ".new", meta)
        return readable(self, image)

    monkeypatch.setattr(ImageProcessor, "pixels", prepared_again)
    with pytest.raises(SystemExit, match=rf"stage 3, step 2: {re.escape(folder)} was prepared again while this run "
                                         r"read it .*other pictures\. Training up to step 1 is saved in .*ckpt.pt\. "
                                         r"To go on with the data as they are now .* run again with --resume$"):
        train.main(args)
    assert torch.load(tmp_path / "o" / "stage3" / "ckpt.pt", weights_only=False)["step"] == 1  # step 2: not trained
    monkeypatch.setattr(ImageProcessor, "pixels", readable)

    # Prepared again with other rows (here: two chats fewer), the resume goes on, saying how its data differ, and
    # here, as the folder has another name now, which folders that run read.
    rows = read_jsonl(os.path.join(folder, "sft.jsonl"))
    dropped = [i for i, r in enumerate(rows) if r["images"]][:2]  # (image chats: stage 3's one group here)
    write_jsonl(os.path.join(folder, "sft.jsonl"), [r for i, r in enumerate(rows) if i not in dropped])
    os.rename(folder, folder + "-moved")
    capsys.readouterr()
    train.main(["--data", folder + "-moved"] + args[2:] + ["--resume"])
    said = re.search(r"stage 3: resuming on other data than the checkpoint's run trained on \(chat: (\d+) samples, "
                     r"(\d+) in that run\): from here the steps read other rows than that run planned \(to go on with "
                     rf"that run, resume with its data\); that run read --data {re.escape(folder)}\n",
                     capsys.readouterr().out)
    assert said and int(said[2]) - int(said[1]) == 2
    assert torch.load(tmp_path / "o" / "stage3" / "ckpt.pt", weights_only=False)["step"] == 3


def test_data_change_names_the_sources_that_differ_or_else_the_plan():
    was = {"sources": {"sft": [10, "a"], "text_sft": [4, "b"]}, "plan": "p"}
    assert resume.data_change(was, json.loads(json.dumps(was))) == ""
    assert "(sft: 10 samples, as many as in that run but not all the same; text_sft: 0 samples, 4 in that run)" in \
        resume.data_change(was, {"sources": {"sft": [10, "c"]}, "plan": "p"})
    assert "on the checkpoint's data, but its steps are planned otherwise here" in \
        resume.data_change(was, {**was, "plan": "q"})
    assert "(sft: 12 samples, 10 in that run)" in resume.data_change(was, {**was, "sources": {**was["sources"],
                                                                                              "sft": [12, "c"]}})


def test_a_resume_on_another_kind_of_device_says_it_does_not_go_on_bit_for_bit(data, start_weights, tmp_path, capsys):
    args = ["--data", data, "--stage", "3", "--init_from", start_weights, "--out", str(tmp_path / "o"), "--steps", "2",
            "--batch_size", "2", "--ckpt_every", "1"] + FAST
    run(args + ["--stop_after", "1"])
    ckpt = tmp_path / "o" / "stage3" / "ckpt.pt"
    state = torch.load(ckpt, weights_only=False)
    assert state["device"] == "cpu"
    torch.save({**state, "device": "cuda"}, ckpt)  # as if it had trained on a GPU
    capsys.readouterr()
    train.main(args + ["--resume"])
    assert "stage 3: resuming on cpu (fp32) a run that trained on cuda (bf16 autocast): the run goes on, but not bit " \
           "for bit" in capsys.readouterr().out


def test_a_config_mismatch_names_the_flags_that_build_the_checkpoints_model():
    # A student who trained with overrides and forgot them later gets the flags to paste, checked by building the
    # config from them: the preset, each changed field, a part switched off, a tuple.
    flags = lambda preset, **o: resume.config_flags(get_config(preset, **o).to_dict())
    assert flags("tiny") == ["--config tiny"]
    assert flags("tiny", **{"llm.dim": "96", "llm.n_layers": "3"}) == ["--config tiny", "--llm.dim=96",
                                                                       "--llm.n_layers=3"]
    assert flags("tiny", **{"sam": "none", "aligner.projector_type": "mlp_gelu"}) == [
        "--config tiny", "--aligner.projector_type=mlp_gelu", "--sam=none"]
    assert flags("small", **{"sam.global_blocks": "1,3", "llm.norm_eps": "1e-5"}) == [
        "--config small", "--llm.norm_eps=1e-05", "--sam.global_blocks=1,3"]
    for o in ({"llm.dim": "96"}, {"sam": "none", "aligner.projector_type": "mlp_gelu"}, {"sam.global_blocks": "1"}):
        args = resume.config_flags(get_config("tiny", **o).to_dict())
        cfg = train.get_config(args[0].split()[1], **dict(a[2:].split("=", 1) for a in args[1:]))
        assert cfg.to_dict() == get_config("tiny", **o).to_dict()
    # What flags cannot build: a preset this version lacks, a part the preset has not (the 1.3B is SigLIP-only)
    assert resume.config_flags(dict(get_config("tiny").to_dict(), name="tiny-v0")) is None
    assert resume.config_flags(dict(get_config("1.3b").to_dict(), sam=get_config("7b").to_dict()["sam"])) is None
    with pytest.raises(SystemExit, match=r"was trained with another model config:\n  llm.dim: checkpoint 96 vs now "
                                         r"128\npass the same --config and overrides it was trained with: --config "
                                         r"tiny --llm.dim=96$"):
        resume.check_same_config(get_config("tiny", **{"llm.dim": "96"}).to_dict(), get_config("tiny"), "x/model.pt")
    # A part one side lacks is one line, not one per field of the other side's
    siglip_only = get_config("tiny", **{"sam": "none", "aligner.projector_type": "mlp_gelu"}).to_dict()
    with pytest.raises(SystemExit, match=r"another model config:\n  sam: checkpoint none vs now present\n  "
                                         r"aligner.projector_type: checkpoint mlp_gelu vs now low_high_hybrid_split_"
                                         r"mlp_gelu\npass .*: --config tiny --aligner.projector_type=mlp_gelu "
                                         r"--sam=none$"):
        resume.check_same_config(siglip_only, get_config("tiny"), "x/model.pt")
    assert resume.config_flags(dict(get_config("tiny").to_dict(), name=["tiny"])) is None  # (a name of another type)
    with pytest.raises(SystemExit, match=r"config:\n  sam: checkpoint present vs now none\n  aligner.projector_type"):
        resume.check_same_config(get_config("tiny").to_dict(), get_config("tiny", **{
            "sam": "none", "aligner.projector_type": "mlp_gelu"}), "x/model.pt")
