"""
Evaluation during and after training: multi-choice perplexity (MCPPL: how the paper watched its 1.3B runs), the same
questions asked open, and bits per byte of held-out text (the language side of the paper's Figure 4).

Multi-choice perplexity (MCPPL). Free generation is a noisy signal for a small model that cannot yet follow the answer
format, so DeepSeek watched its 1.3B runs this way: the model sees the image, the question and all the options, and the
option it finds most likely (per token) is its choice. The paper scores the answer letters (A, B, C, D); our synthetic
questions list their options without letters, so each option's own text (and the end-of-sentence after it) is scored as
the assistant's answer, and the lowest perplexity wins. Accuracy is reported per category of the held-out set.

Asked open. MCPPL tells whether the model can pick the answer out of a list, not whether it can say it: a model
trained only on questions with their options can score well on MCPPL and still answer "What is the title of this
document?" with the same word for every page. So each held-out question is also asked as a user of sample.py would
ask it, without its options, and answered by greedy decoding (the paper's generative benchmarks decode greedily);
the answer is right when it names the right option and no other (as whole words, in any case).

Text bits per byte, where the paper watches Pile-test perplexity (Figure 4): the summed negative log-likelihood of
held-out text in bits, divided by its length in UTF-8 bytes. Unlike perplexity per token it does not depend on the
tokenizer, and it shows whether vision-language training is eroding the language model. Each document's
end-of-sentence is predicted and counted too (it has no bytes of its own): knowing where a text ends is part of
modelling it.

The held-out set is a data folder's eval_mc.jsonl (the figures to report) or val_mc.jsonl (a second set of questions,
from seeds of their own, to choose settings by, so that the reported figures are not tuned on), with eval_text.jsonl
for both; held_out reads and checks them. evaluate gives all three figures: train.py calls it during and after each
stage (stage 0: bits per byte only), and --eval-only for any checkpoint. Each measure is split into the work per row
(mc_choices, open_answers, text_bits) and its summary (mc_accuracy, open_accuracy, text_bits over text_bytes), so that
under torchrun every process scores a share of the rows and they gather the results; multiple_choice, open_questions
and bits_per_byte do both in one process.
"""

import contextlib
import math
import numbers
import os
import re
from collections import Counter, defaultdict
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

from nanovl.chat import IMAGE_TAG, render_chat
from nanovl.data import ROW_FORMAT, Sample, Source, check_images, collate, read_jsonl
from nanovl.generate import Sampling, generate
from nanovl.synth import mc_prompt


def sequence_nll(model, ids, targets, device, image_embeds=None) -> torch.Tensor:
    """Summed negative log-likelihood (nats) of each row's supervised targets: (B,). image_embeds: the rows' images,
    already encoded (DeepSeekVL.forward's image_embeds), or None for text only. Only the supervised positions get
    logits (reduction="none"), so scoring a 7B model's answers takes no more memory than its prompts."""
    _, nll = model(ids.to(device), image_embeds=image_embeds, targets=targets.to(device), reduction="none")  # (B, T)
    return nll.sum(dim=1)


def normalised(text: str) -> str:
    """Text in lower case with its runs of whitespace as single spaces: how an answer asked open is matched, at the
    least (names_only reads it more loosely where the options stay apart)."""
    return " ".join(text.split()).lower()


def loosely(text: str) -> str:
    """normalised, and also case-folded ("Straße" as "strasse") with typographic apostrophes as plain ones."""
    return " ".join(text.replace("\u2019", "'").split()).casefold()


def read_mc_rows(path: str) -> List[dict]:
    """The held-out multiple-choice questions, each checked, so that a bad row stops a run before it trains rather
    than after. Each row is {category, images, question, options, answer (the index of the right option)}."""
    rows = read_jsonl(path, origin=True)
    if not rows:
        raise ValueError(f"{path} holds no questions; expected one JSON object a line, as the README shows")
    check_mc_rows(rows)
    return rows


def where(row: dict, i: int) -> str:
    """How an error names a question: its file and line when read from one (read_jsonl's _where), else its index in
    the rows given."""
    return row.get("_where") or f"rows[{i}]"


def check_mc_rows(rows: Sequence[dict]) -> None:
    """A ValueError naming the first malformed question: the checks read_mc_rows makes of a file's rows, made again
    by multiple_choice and open_questions for rows built in Python (a wrong answer index would otherwise be scored as
    a wrong answer, without a word)."""
    if not isinstance(rows, (list, tuple)):
        raise ValueError(f"expected the questions as a list of dicts, got {type(rows).__name__}")
    strings = lambda x: isinstance(x, list) and all(isinstance(s, str) for s in x)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"rows[{i}]: expected a dict {{category, images, question, options, answer}}, got "
                             f"{type(row).__name__}")
        options, answer = row.get("options"), row.get("answer")
        if not isinstance(row.get("category"), str):
            problem = f"'category' must be a string, got {row.get('category')!r}"
        elif not (isinstance(row.get("question"), str) and row["question"].strip()):
            problem = f"'question' must be a string of text, got {row.get('question')!r}"
        elif row["category"] in ("mean", "chance"):  # the names of the summary's two entries
            problem = f"'category' may not be {row['category']!r}, which the results use for their summary"
        elif not strings(row.get("images")):
            problem = f"'images' must be a list of paths (empty for a question without one), got {row.get('images')!r}"
        elif not (strings(options) and len(options) > 1):
            problem = f"'options' must be a list of at least 2 strings, got {options!r}"
        elif not all(o.strip() for o in options) or len({normalised(o) for o in options}) < len(options):
            # (a tie would always go to the first; and asked open, an answer is matched in any case and spacing)
            problem = f"'options' must be different in any case and spacing, and not empty, got {options}"
        elif any(IMAGE_TAG in s for s in [row["question"]] + options):
            problem = f"{IMAGE_TAG} in the question or an option: the images listed in 'images' get theirs in front"
        elif "<image>" in row["question"] and row["images"]:  # (a question converted from LLaVA's data)
            problem = ("LLaVA's <image> tag in the question: the images listed in 'images' are put in front of it "
                       "by themselves; remove the tag")
        elif not (isinstance(answer, numbers.Integral) and not isinstance(answer, bool) and 0 <= answer < len(options)):
            problem = f"'answer' must be the index of the right option, 0 to {len(options) - 1}, got {answer!r}"
        else:
            continue
        raise ValueError(f"{where(row, i)}: {problem}")


MC_FILES = {"test": "eval_mc.jsonl", "val": "val_mc.jsonl"}  # held_out's split -> the questions' file


def held_out(data_dir: str, limit: int = 0, split: str = "test"):
    """A data folder's held-out set: (its multiple-choice questions of the split (MC_FILES), each checked; its text
    rows, or None when it has no eval_text.jsonl, as a folder of one's own questions need not), or None when it has no
    such questions (a LLaVA import). limit: limit / categories questions (rounded up) from each category, and at most
    limit text rows."""
    mc_path = os.path.join(data_dir, MC_FILES[split])
    if not os.path.isfile(mc_path):
        return None
    mc_rows = read_mc_rows(mc_path)
    if limit:
        categories = sorted({r["category"] for r in mc_rows})
        per = -(-limit // len(categories))
        mc_rows = [r for c in categories for r in [r for r in mc_rows if r["category"] == c][:per]]
    # Decoded now, each image once, so that a bad one stops the run before it trains, not at its evaluation.
    errors = check_images([os.path.join(data_dir, image) for row in mc_rows for image in row["images"]])
    for row in mc_rows:
        for image in row["images"]:
            if errors[os.path.join(data_dir, image)]:
                raise ValueError(f"{row['_where']}: {errors[os.path.join(data_dir, image)]}")
    return mc_rows, held_out_text(data_dir, limit)


def held_out_text(data_dir: str, limit: int = 0):
    """A data folder's held-out text rows (at most limit), each checked, or None when it has no eval_text.jsonl."""
    path = os.path.join(data_dir, "eval_text.jsonl")
    if not os.path.isfile(path):
        return None
    rows = read_jsonl(path, origin=True)
    for row in rows:
        if not isinstance(row.get("text"), str) or not row["text"].strip() or IMAGE_TAG in row["text"]:
            raise ValueError(f"{row['_where']}: 'text' must be a string of text, without {IMAGE_TAG} (held-out text "
                             f"is scored alone); a held-out text row is {ROW_FORMAT['text']}")
    return (rows[:limit] if limit else rows) or None  # an empty file: no text to score


def option_samples(row: dict, tokenizer, n_image_tokens: int) -> List[Sample]:
    """A question's rows to score: the image placeholders, the question and its options, then one option as the
    answer, for each option."""
    question = IMAGE_TAG * len(row["images"]) + mc_prompt(row["question"], row["options"])
    samples = []
    for option in row["options"]:
        conv = [{"role": "user", "content": question}, {"role": "assistant", "content": option}]
        samples.append(Sample(*render_chat(conv, tokenizer, n_image_tokens), []))
    return samples


def check_fits(rows: Sequence[dict], tokenizer, n_image_tokens: int, max_len: int) -> None:
    """A ValueError naming the first question whose images, question and longest option do not fit the context (the
    model cannot score it), before a run trains or loads for minutes only to fail at its evaluation."""
    for i, row in enumerate(rows):
        # (the model reads all but the last token: collate shifts the ids by one, as in training)
        longest = max(len(s.ids) for s in option_samples(row, tokenizer, n_image_tokens)) - 1
        if longest > max_len:
            n = len(row.get("images") or ())
            images = f"with its {n} image{'s' * (n > 1)} ({n_image_tokens} tokens each), " if n else ""
            raise ValueError(f"{where(row, i)}: {images}the question and its longest option make {longest} input "
                             f"tokens, but the model's context is {max_len}")


def check_questions(model, rows: Sequence[dict], tokenizer, n_image_tokens: int, batch_questions: int) -> None:
    """What multiple_choice and open_questions check before they score: each row well formed (check_mc_rows), each
    question with its options fitting the model's context (check_fits), and a batch size that is a count. (evaluate
    takes rows that held_out checked as it read them, and leaves check_fits to its caller: train.py runs it once,
    before a stage trains or --eval-only loads its model.)"""
    if not isinstance(batch_questions, numbers.Integral) or isinstance(batch_questions, bool) or batch_questions < 1:
        raise ValueError(f"batch_questions must be an integer of at least 1, got {batch_questions!r}")
    check_mc_rows(rows)
    check_fits(rows, tokenizer, n_image_tokens, model.cfg.llm.max_seq_len)


def by_category(correct: Dict[str, int], total: Dict[str, int]) -> Dict[str, float]:
    """Accuracy per category (in name order), and "mean": their mean, each category counting the same."""
    acc = {c: correct[c] / total[c] for c in sorted(total)}
    acc["mean"] = sum(acc.values()) / max(1, len(acc))
    return acc


def multiple_choice(model, rows: Sequence[dict], tokenizer, processor, n_image_tokens: int, root: str = "",
                    batch_questions: int = 8) -> Dict[str, float]:
    """Accuracy per category on rows {category, images, question, options, answer}, with "mean" (over categories) and
    "chance" (what guessing would score, averaged the same way: 25% with four options everywhere). model: a
    DeepSeekVL (its cfg's context is what each question is checked against)."""
    check_questions(model, rows, tokenizer, n_image_tokens, batch_questions)
    return mc_accuracy(rows, mc_choices(model, rows, tokenizer, processor, n_image_tokens, root, batch_questions))


@torch.no_grad()
def mc_choices(model, rows: Sequence[dict], tokenizer, processor, n_image_tokens: int, root: str = "",
               batch_questions: int = 8) -> List[int]:
    """The option the model picks for each question: the index of the one with the lowest perplexity. (Apart from
    mc_accuracy so that several processes can each score a share of the questions: evaluate, below.)"""
    device = next(model.parameters()).device
    choices = []
    for start in range(0, len(rows), batch_questions):
        chunk = rows[start:start + batch_questions]
        samples: List[Sample] = []
        paths, which = [], []  # each question's images once; which: the images of every option's row, in order
        for row in chunk:
            mine = list(range(len(paths), len(paths) + len(row["images"])))
            paths += [os.path.join(root, p) for p in row["images"]]  # absolute paths stay as they are
            samples += option_samples(row, tokenizer, n_image_tokens)
            which += mine * len(row["options"])
        ids, targets, _ = collate(samples, tokenizer.pad_id)
        # The rows of a question (one per option) share its images: encode each once, then give each row its copy
        # (which: every question's image indices, once per option row): (images of all rows, n_image_tokens, C).
        embeds = model.encode_images(torch.stack([processor(p) for p in paths]).to(device))[which] if paths else None
        nll = sequence_nll(model, ids, targets, device, image_embeds=embeds)
        n_tok = (targets != -100).sum(dim=1).to(nll.device)
        ppl = (nll / n_tok).cpu()  # mean NLL per answer token: the log of the answer's perplexity
        k = 0
        for row in chunk:
            choices.append(int(ppl[k:k + len(row["options"])].argmin()))
            k += len(row["options"])
    return choices


def mc_accuracy(rows: Sequence[dict], choices: Sequence[int]) -> Dict[str, float]:
    """multiple_choice's accuracy, from the option picked for each row (mc_choices)."""
    correct, total, guess = defaultdict(int), defaultdict(int), defaultdict(float)
    for row, choice in zip(rows, choices):
        correct[row["category"]] += choice == row["answer"]
        total[row["category"]] += 1
        guess[row["category"]] += 1 / len(row["options"])
    acc = by_category(correct, total)
    acc["chance"] = sum(guess[c] / total[c] for c in total) / max(1, len(total))
    return acc


OPTION_LABEL = re.compile(r"\s*[(\[]?([A-Za-z]|\d{1,2})[)\].:]\s+")  # "(A) ", "B. ", "[3] ", "d: "


def without_labels(options: Sequence[str]) -> list:
    """The options less their labels when every one is written with its label, in order ("(A) red", "(B) blue", ...
    or "1. red", "2. blue", ...): asked open, a model says "red", never "(A)". Otherwise the options as they are."""
    found = [OPTION_LABEL.match(o) for o in options]
    if not all(found):
        return list(options)
    labels, n = [m.group(1).upper() for m in found], len(options)
    if labels not in ([chr(ord("A") + i) for i in range(n)], [str(i + 1) for i in range(n)]):
        return list(options)
    rest = [o[m.end():] for o, m in zip(options, found)]
    return rest if all(r.strip() for r in rest) else list(options)


def names_only(answer: str, options: Sequence[str], right: int) -> bool:
    """Whether a free answer names options[right] and no other option: each as whole words, in any case and spacing
    ("The title is "Notes"." names "Notes"; "There are three." names "three" and not "one"). An option that is
    itself words of the right one ("red" in "dark red") is not held against it; "1" in "12" is not such a part.
    Options written with labels are read without them (without_labels). Where the question's options stay apart
    so, they are read loosely too: their closing punctuation not asked for ("Notes" names the option "Notes."),
    letters case-folded and typographic apostrophes as plain ones (loosely); options that would then read alike
    ("3" and "3.", "Masse" and "Maße") are each asked for as written."""
    options = without_labels(options)
    loose = [loosely(o).rstrip(".,;:!?") or loosely(o) for o in options]  # ("?" alone stays itself)
    read = loosely if len(set(loose)) == len(loose) else normalised
    keys = loose if read is loosely else [normalised(o) for o in options]

    def named(key, text):
        return re.search(r"(?<!\w)" + re.escape(key) + r"(?!\w)", text) is not None
    said = read(answer)
    return named(keys[right], said) and not any(named(k, said) for i, k in enumerate(keys)
                                                if i != right and not named(k, keys[right]))


def open_questions(model, rows: Sequence[dict], tokenizer, processor, n_image_tokens: int, root: str = "",
                   batch_questions: int = 32, max_new_tokens: int = 32) -> Dict[str, float]:
    """Accuracy per category, with "mean", on the same rows asked without their options: each question (after its
    images) in a user turn, the answer decoded greedily (at most max_new_tokens), right when it names the right
    option and no other (names_only)."""
    check_questions(model, rows, tokenizer, n_image_tokens, batch_questions)
    answers = open_answers(model, rows, tokenizer, processor, n_image_tokens, root, batch_questions, max_new_tokens)
    return open_accuracy(rows, answers)


@torch.no_grad()
def open_answers(model, rows: Sequence[dict], tokenizer, processor, n_image_tokens: int, root: str = "",
                 batch_questions: int = 32, max_new_tokens: int = 32) -> List[str]:
    """The model's answer to each question asked open (the text decoded greedily, special tokens left out)."""
    texts = [""] * len(rows)
    for start in range(0, len(rows), batch_questions):
        batch = range(start, min(start + batch_questions, len(rows)))
        prompts = {i: render_chat([{"role": "user", "content": IMAGE_TAG * len(rows[i]["images"]) +
                                    rows[i]["question"]}], tokenizer, n_image_tokens, generation_prompt=True)[0]
                   for i in batch}
        # generate ends every row of a batch where the context is full after its longest prompt, so a question too
        # long to leave room for max_new_tokens is asked alone: the others in its batch keep their whole answers.
        near = [i for i in batch if len(prompts[i]) + max_new_tokens - 1 > model.cfg.llm.max_seq_len]
        for group in [[i for i in batch if i not in near]] + [[i] for i in near]:
            if not group:
                continue
            paths = [os.path.join(root, p) for i in group for p in rows[i]["images"]]
            images = torch.stack([processor(p) for p in paths]) if paths else None
            answers = generate(model, [prompts[i] for i in group], images, Sampling(max_new_tokens=max_new_tokens),
                               stop_ids={tokenizer.eos_id}, pad_id=tokenizer.pad_id, n_words=tokenizer.vocab_size)
            for i, ids in zip(group, answers):
                texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return texts


def open_accuracy(rows: Sequence[dict], answers: Sequence[str]) -> Dict[str, float]:
    """open_questions' accuracy, from the answer given to each row (open_answers)."""
    correct, total = defaultdict(int), defaultdict(int)
    for row, text in zip(rows, answers):
        correct[row["category"]] += names_only(text, row["options"], row["answer"])
        total[row["category"]] += 1
    return by_category(correct, total)


def bits_per_byte(model, rows: Sequence[dict], tokenizer, n_image_tokens: int, max_len: int,
                  batch_size: int = 8) -> float:
    """Summed NLL of held-out text in bits over its UTF-8 bytes (texts cut into context-sized pieces)."""
    return text_bits(model, rows, tokenizer, n_image_tokens, max_len, batch_size) / max(1, text_bytes(rows))


@torch.no_grad()
def text_bits(model, rows: Sequence[dict], tokenizer, n_image_tokens: int, max_len: int, batch_size: int = 8) -> float:
    """The summed NLL of the rows' texts, in bits (bits_per_byte's numerator). Every position of a text is
    supervised, so the loss is summed chunk by chunk (reduction="sum", training's path), not scored position by
    position as sequence_nll's few answer tokens are: the fp32 logits of a whole batch would take 13 GB at 8 x 4096
    tokens and a 102,400-word vocabulary."""
    device = next(model.parameters()).device
    source = Source(rows, "text", tokenizer, n_image_tokens, max_len)
    total_nll = 0.0
    for start in range(0, len(source), batch_size):
        ids, targets, _ = collate(source.samples[start:start + batch_size], tokenizer.pad_id)
        total_nll += model(ids.to(device), targets=targets.to(device), reduction="sum")[1].item()
    return total_nll / math.log(2)


def text_bytes(rows: Sequence[dict]) -> int:
    """The rows' texts' length in UTF-8 bytes (bits_per_byte's denominator)."""
    return sum(len(r["text"].encode("utf-8")) for r in rows)


def evaluate(model, rows, tokenizer, processor, root: str = "", rank: int = 0, world: int = 1,
             autocast=contextlib.nullcontext):
    """(MCPPL accuracy, accuracy asked open, text bits per byte) of a DeepSeekVL on rows, held_out's (mc_rows,
    text_rows): the questions (their images under root; train.py's stage 0 has none, and gets None for both
    accuracies) and the held-out text (None without it, and bits per byte None). autocast: the context to run the
    model in (train.py's evaluations during training run in bf16 autocast on a GPU, as the training does).

    Text is scored in pieces of the model's whole context in every stage, so that the stages' figures compare (the
    same decoder scores differently in stage 0's 128-token training pieces than in 512-token ones).

    Under torchrun each process scores every world-th question and text (rows[rank::world]) and they share their results
    (gathered): each does a world-th of the work, and no process waits on the others for long (a process group gives up
    on a wait after 30 minutes, which a 7B model's evaluation can take). The figures are one process's but for the
    rounding of the batches' sums, which group the rows otherwise."""
    mc_rows, text_rows = rows
    n_image_tokens = model.cfg.n_image_tokens
    was_training = model.training
    model.eval()
    acc = asked_open = bpb = None
    with autocast():
        if mc_rows is not None:
            mine = mc_rows[rank::world]
            choices = mc_choices(model, mine, tokenizer, processor, n_image_tokens, root)
            acc = mc_accuracy(mc_rows, gathered(choices, world))
            answers = open_answers(model, mine, tokenizer, processor, n_image_tokens, root)
            asked_open = open_accuracy(mc_rows, gathered(answers, world))
        if text_rows is not None:
            bits = text_bits(model, text_rows[rank::world], tokenizer, n_image_tokens, model.cfg.llm.max_seq_len)
            bpb = sum(gathered([bits], world)) / max(1, text_bytes(text_rows))
    model.train(was_training)
    return acc, asked_open, bpb


def gathered(mine: list, world: int) -> list:
    """Every process's results, in the order of the rows, when process r has those of rows[r::world]."""
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)  # (over gloo, from CPU memory, where NCCL serves the GPUs too)
    return [parts[i % world][i // world] for i in range(sum(len(part) for part in parts))]


def format_table(acc: Dict[str, float], bpb: float, title: str, asked_open: Dict[str, float] = None,
                 questions: Sequence[dict] = ()) -> str:
    """The evaluation as a table: MCPPL accuracy per category, and beside it the accuracy asked open when given.
    With the questions scored, how many of each there were, so that 100% of one question does not read as 100% of
    fifty (--eval_limit)."""
    count = Counter(q["category"] for q in questions)
    n = (lambda c: f"{sum(count.values()) if c == 'mean' else count[c]:>11}") if questions else (lambda c: "")
    more = (lambda c: f"{100 * asked_open[c]:>13.1f}%") if asked_open else (lambda c: "")
    lines = [title, f"{'category':<14}" + (f"{'questions':>11}" if questions else "") + f"{'MCPPL accuracy':>16}" +
             (f"{'asked open':>14}" if asked_open else "")]
    lines += [f"{c:<14}{n(c)}{100 * a:>15.1f}%" + more(c) for c, a in acc.items() if c not in ("mean", "chance")]
    lines.append(f"{'mean':<14}{n('mean')}{100 * acc['mean']:>15.1f}%" + more("mean") +
                 f"   (chance {100 * acc['chance']:.1f}%)")
    if bpb is not None:
        lines.append(f"text bits per byte: {bpb:.3f}")
    return "\n".join(lines)
