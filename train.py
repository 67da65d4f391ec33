"""
Train DeepSeek-VL with the paper's recipe (sections 3.2 and 3.3, Table 4; facts sheet section 11). The official
repository has no training code: nanovl/recipe.py is the recipe, written out, and this file runs it.

    stage 0  unimodal pretraining (scaled-down presets only: the real model starts from pretrained parts)
             language model on text, SigLIP with a sigmoid contrastive loss, SAM with a dense loss
    stage 1  adaptor warm-up: only the adaptor trains (for the hybrid also SAM's upsample-and-downsample tail, which
             the paper counts as adaptor, section 3.1, and its necks, as the official freeze_high=False
             unfreezes them); captions and document OCR
    stage 2  joint vision-language pretraining: language model and adaptor; language:multimodal = 7:3 (of the steps
             that are not chats) with modality warm-up, one modality per optimizer step, a small share of SFT data
             (10% of the steps once the warm-up is over, fewer during it), samples packed into full rows
    stage 3  supervised fine-tuning: language model, adaptor and SigLIP (SAM's trunk stays frozen); chats, loss on
             answers

What each stage trains, on which data, in what mix and at what rate is nanovl/recipe.py: the recipe as settings
(TrainConfig, each stage's defaults) and plain functions (freeze maps, data mix, optimizer, learning rate). This file
runs it:
    a stage, part by part                its model (stage_model: the freeze map applied), batches (stage_batches) and
                                         held-out rows; train_step, one optimizer step (the loss normalised by the
                                         step's supervised tokens: answers only, in chats)
    a stage, start to finish             run_stage: the training loop, its checkpoints, logs and evaluations
    the run as a whole                   train_or_evaluate: every stage's settings, folder and rows checked before the
                                         first one trains, then the stages in turn (run_stage)
    a stage's folder, resuming           nanovl/resume.py: the weights and tokenizer a stage starts from, its folder,
                                         the checks before a checkpoint is continued; nanovl/runs.py: files written
                                         whole, locks, signals

    python train.py                                  # the embedded default: prepare data if needed, stages 0-3, tiny
    python train.py --config small --out out-small --lr=5e-4 --llm.n_layers=6   # every stage, small, changed
    python train.py --stage 3 --resume               # continue a killed run exactly where its checkpoint left it
    python train.py --eval-only --ckpt out/stage3    # multiple-choice and text evaluation of a checkpoint
    torchrun --nproc_per_node=2 train.py --stage 3   # several processes, one global batch

Any training field (TrainConfig, in nanovl/recipe.py: --help lists them below), and any model config field (dotted, as
--llm.dim=256), can be set with --key=value. Each stage writes out/stage<k>/: model.pt (final weights), config.json and
tokenizer.json, ckpt.pt (the latest resumable state), metrics.jsonl, loss.png and eval.json. Stage k+1 starts from
out/stage<k>/model.pt unless --init_from says otherwise. A stage folder that holds an earlier run's ckpt.pt or model.pt
is never written over: --resume continues it (after checking that the settings are the same), and without --resume the
run stops before writing anything.
"""

import collections
import contextlib
import dataclasses
import difflib
import inspect
import json
import math
import os
import secrets
import shlex
import sys
import time

try:  # Ctrl-C while torch loads (a second or more): a line, not the import machinery's traceback
    import torch
    import torch.distributed as dist
    from PIL import Image, ImageDraw
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, Dataset
    from tqdm import tqdm

    from nanovl import DeepSeekVL, VLConfig, get_config
    from nanovl.checkpoint import check_device, init_from_parts, is_released_folder, load_model
    from nanovl.config import FROM_SCRATCH
    from nanovl.data import (PackedBatches, PlannedBatches, Source, check_rows, default_folder, folder_kind,
                             folder_stamp, image_paths, plan_batches, write_jsonl)
    from nanovl.evaluate import MC_FILES, check_fits, evaluate, format_table, held_out, held_out_text
    from nanovl.image import CachedProcessor, ImageProcessor, missing_hint
    from nanovl.llava import import_record
    from nanovl.recipe import (TrainConfig, apply_freeze_map, check_stage, clipping_groups, data_folders,
                               learning_rate, listed, load_rows, stage_data, stage_groups, stage_hparams,
                               stage_optimizer, trainable_prefixes, under)
    from nanovl.resume import (check_init_preset, check_same_config, check_start, checked_tokenizer, data_change,
                               held_weights, is_finished, is_nanovl_checkpoint, load_weights, make_stage_folder,
                               open_stage_folder, refuse_earlier_run, saved_config, saved_entry, saved_metrics, stage_tokenizer,
                               start_weights, tokenizer_path, tokenizer_sources, weights_entry)
    from nanovl.runs import (Terminated, WriteFailed, atomic_save, atomic_write, claim_out_folder,
                             close_inherited_locks, dead_worker, denied, end_process_group, first_failure,
                             let_go_of_workers, rng_state, set_rng_state, setup_distributed, sigterm_stops,
                             unlock_out_folders, writing)
    from nanovl.stage0 import N_SEG_CLASSES, STAGE0_ROW, Stage0Batches, Stage0Heads, Stage0Model, plan_distinct
    from nanovl.tokenizer import Tokenizer
    from prepare_data import data_to_prepare
except KeyboardInterrupt:
    if __name__ != "__main__":  # imported (by a test, or as a spawned data worker's __mp_main__): as any import
        raise
    # torchrun's later processes stop without a word: the first says it for all, as a stage's stop does.
    raise SystemExit("\ninterrupted while starting: nothing was written" if os.environ.get("RANK", "0") == "0"
                     else 1) from None


# What --eval-only reads; every other TrainConfig field is for training, and refused with it.
EVAL_ONLY_FIELDS = ("eval_only", "ckpt", "data", "config", "tokenizer", "eval_limit", "eval_split", "device",
                    "image_cache")


def usage() -> str:
    """--help: this file's docstring, then TrainConfig as written in nanovl/recipe.py (every setting, its default
    and comment)."""
    settings = inspect.getsource(TrainConfig).split("\n", 2)[2]  # the body, below "@dataclass" and "class ..."
    return (__doc__.strip() + "\n\nTraining settings (--key=value or --key value; a bare --flag for true):\n\n" +
            "\n".join(line.removeprefix("    ") for line in settings.rstrip().splitlines()) +
            "\n\nModel config fields (nanovl/config.py), dotted: --llm.n_layers=6, --siglip.depth=4, "
            "--sam.window_size=7,\n--aligner.depth=2; the preset (--config) gives the rest.")


def parse_args(argv):
    """--key=value or --key value. TrainConfig fields go to the TrainConfig; anything else is a model config
    override (get_config checks it). Dashes and underscores are the same: --eval-only == --eval_only,
    --llm.n-layers == --llm.n_layers."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model_fields = [f.name for f in dataclasses.fields(VLConfig)]  # the top level; the parts' are dotted
    tc, overrides, i = TrainConfig(), {}, 0
    if "--help" in argv or "-h" in argv:
        print(usage())
        raise SystemExit(0)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: options look like --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields and "." not in key and key not in model_fields:
            close = difflib.get_close_matches(key, list(fields) + model_fields, n=1)
            raise SystemExit(f"unknown setting --{key}" + (f" (did you mean --{close[0]}?)" if close else "") +
                             "; python train.py --help lists the training settings, and the model's parts' fields "
                             "are dotted, as --llm.n_layers=6")
        if key in fields and fields[key].type is bool and not eq:
            # a bare flag, or the flag and a true or false after it (--key value, as for the other settings)
            taken = i + 1 < len(argv) and argv[i + 1].lower() in ("1", "true", "yes", "0", "false", "no")
            i += taken
            value = argv[i] if taken else "true"
        elif not eq:
            i += 1
            if i == len(argv):
                raise SystemExit(f"--{key} needs a value")
            value = argv[i]
        if key in fields:
            kind = fields[key].type  # int, float, bool or str (TrainConfig's annotations)
            if kind is bool and value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise SystemExit(f"--{key} expects true or false, got {value!r}")
            try:
                value = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
            except ValueError:
                raise SystemExit(f"--{key} expects {kind.__name__}, got {value!r}") from None
            setattr(tc, key, value)
        else:
            overrides[key] = value
        i += 1
    tc.data = tc.data or default_folder(tc.config)
    if not tc.out.strip():  # (an unset shell variable, say: "" would write the stages into the current folder)
        raise SystemExit("--out is empty: expected the folder the stages are written to (out, if not given)")
    # Counts and sizes: nothing is negative but the -1 defaults; what 0 means, each says (TrainConfig's comments).
    # SigLIP's contrastive loss in stage 0 needs two pairs at least: with one, there is nothing to contrast.
    zero_means = {"steps": "the default", "batch_size": "the default", "micro_batch": "the default",
                  "lr": "the default", "seq_len": "the default", "eval_every": "at the end of the stage only",
                  "eval_limit": "all", "ckpt_every": "a tenth of the stage", "workers": "no worker processes",
                  "image_cache": "no cache", "stop_after": "off"}
    for key, least in [*((k, 0) for k in zero_means), ("log_every", 1), ("clip_batch", 2), ("seg_batch", 1)]:
        if getattr(tc, key) < least:
            raise SystemExit(f"--{key} must be {least} or more" + (f" (0: {zero_means[key]})" if not least else "") +
                             f", got {getattr(tc, key)}")
    if tc.warmup < -1:
        raise SystemExit(f"--warmup must be 0 or more (steps of linear warm-up; -1: the stage's default), got "
                         f"{tc.warmup}")
    # Shares, factors and names: out of its range, each would change the run without a word (a negative clip turns
    # the gradients round, a share above 1 takes steps from the other sources, a typo'd schedule ran cosine).
    share = "in [0, 1]"
    for key, ok, need in [
            ("lr", math.isfinite(tc.lr), "a finite number (0: the stage's default)"),
            ("grad_clip", 0 < tc.grad_clip < math.inf, "above 0 (the largest gradient norm of each clipping group)"),
            ("min_lr_ratio", 0 <= tc.min_lr_ratio <= 1, share), ("lang_share", 0 <= tc.lang_share <= 1, share),
            ("modality_warmup", 0 <= tc.modality_warmup <= 1, share), ("sft_share", 0 <= tc.sft_share <= 1, share),
            ("text_sft_share", tc.text_sft_share == -1 or 0 <= tc.text_sft_share <= 1, share + " (-1: the default)"),
            ("short_chat_share", tc.short_chat_share == -1 or 0 <= tc.short_chat_share <= 1,
             share + " (-1: the default)"),
            ("vision_lr_mult", tc.vision_lr_mult == -1 or 0 <= tc.vision_lr_mult < math.inf, ">= 0 (-1: the default)"),
            ("weight_decay", 0 <= tc.weight_decay < math.inf, ">= 0"),
            ("beta1", 0 <= tc.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= tc.beta2 < 1, "in [0, 1)"),
            ("schedule", tc.schedule in ("", "cosine", "step"), "cosine or step (empty: the stage's default)"),
            ("eval_split", tc.eval_split in MC_FILES, " or ".join(MC_FILES)),
            ("pack", tc.pack in (-1, 0, 1), "0 or 1 (-1: the default, stage 2 only)"),
            ("seed", 0 <= tc.seed < 2 ** 62, "from 0 to 2**62 - 1 (torch seeds with seed + stage, in 64 bits)")]:
        if not ok:
            raise SystemExit(f"--{key} must be {need}, got {getattr(tc, key)!r}")
    for key in ("init_from", "extra_data", "trainable"):  # comma-separated lists: "," would read as none given
        if getattr(tc, key) and not listed(getattr(tc, key)):
            raise SystemExit(f"--{key} {getattr(tc, key)!r} names nothing: give one or more, separated by commas")
    return tc, overrides


# ---------------------------------------------------------------------------------------------------------------------
# The loss curve

def plot_losses(metrics: list, path: str, title: str):
    """A loss curve as a PNG, drawn with PIL (no plotting library needed), written whole (atomic_write)."""
    points = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if len(points) < 2:
        return
    W, H, pad = 640, 360, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: pad + (W - 2 * pad) * (x - x0) / max(1e-9, x1 - x0)
    sy = lambda y: H - pad - (H - 2 * pad) * (y - y0) / max(1e-9, y1 - y0)
    d.rectangle((pad, pad, W - pad, H - pad), outline="black")
    d.line([(sx(x), sy(y)) for x, y in points], fill=(31, 90, 220), width=2)
    d.text((pad, 15), title, fill="black")
    d.text((pad, H - pad + 8), f"step {x0}", fill="black")
    d.text((W - pad - 60, H - pad + 8), f"step {x1}", fill="black")
    d.text((5, pad - 12), f"{y1:.3f}", fill="black")
    d.text((5, H - pad), f"{y0:.3f}", fill="black")
    with writing(path):
        atomic_write(path, lambda f: img.save(f, format="PNG"))


# ---------------------------------------------------------------------------------------------------------------------
# A stage, part by part: its model, its batches, its held-out rows, one optimizer step; run_stage below puts them
# together (with its folder and tokenizer, nanovl/resume.py) and runs the training loop.

def split_named(tc: TrainConfig) -> str:
    """A table's title ends with the questions' file when they are not the test set's, which the figures to report are
    measured on (the held-out text, eval_text.jsonl, is one set for both: its bits per byte are the test set's)."""
    return "" if tc.eval_split == "test" else f" ({MC_FILES[tc.eval_split]}; text: eval_text.jsonl)"


def stage_model(stage: int, tc: TrainConfig, cfg: VLConfig, init: list, resume: bool, say):
    """(model, net): the VLM, started from init (a nanovl checkpoint, or pretrained parts) unless the stage starts
    from scratch or resumes, and what trains: the VLM itself, or in stage 0 the VLM with the stage-0 heads. The
    stage's freeze map is applied, and what it leaves trainable is printed."""
    torch.manual_seed(tc.seed + stage)
    model = DeepSeekVL(cfg)
    if stage > 0 and not resume:
        if len(init) == 1 and is_nanovl_checkpoint(init[0]):
            model.load_state_dict(load_weights(init[0], cfg))
            say(f"stage {stage}: starting from {init[0]}")
        else:  # pretrained parts (paper section 3.2): say which tensors came from where
            try:
                report = init_from_parts(model, init)
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(str(e)) from None
            say(f"stage {stage}: starting from pretrained parts\n  " + "\n  ".join(report))
    heads = Stage0Heads(cfg, N_SEG_CLASSES) if stage == 0 else None
    net = Stage0Model(model, heads) if stage == 0 else model
    given = listed(tc.trainable) if tc.trainable else trainable_prefixes(stage, cfg)
    # (In stage 0 the VLM sits inside Stage0Model as "model", beside the heads.)
    prefixes = [p if stage != 0 or p.split(".")[0] == "heads" else "model." + p for p in given]
    names = [n for n, _ in net.named_parameters()]
    unknown = [g for g, p in zip(given, prefixes) if not any(under(n, [p]) for n in names)]
    if tc.trainable and (unknown or not given):  # a typo would train less than asked, without a word
        modules = dict.fromkeys(n.removeprefix("model.").split(".")[0] for n in names)
        raise SystemExit(f"stage {stage}: --trainable {','.join(unknown) or repr(tc.trainable)} names no parameter "
                         f"of the model; its modules: {', '.join(modules)} (or deeper prefixes, as llm.layers.0)")
    counts = apply_freeze_map(net, prefixes)
    say(f"stage {stage}: trainable parameters per module (trainable / total)")
    for name, (t, n) in counts.items():
        say(f"  {name:<8}{t:>14,} / {n:>14,}")
    return model, net


def by_folder(src: Source) -> str:
    """" (N from FOLDER, M from FOLDER2)" when a source's samples come from more than one data folder (--extra_data
    beside --data), so that a run says how much of each it reads; "" when they come from one. (Each sample knows its
    row as "FILE, line N"; text pieces, read from --data alone, carry none.)"""
    folders = collections.Counter(os.path.dirname(s.where.rsplit(", line ", 1)[0]) for s in src.samples if s.where)
    return " (" + ", ".join(f"{n} from {folder}" for folder, n in folders.items()) + ")" if len(folders) > 1 else ""


def stage_batches(stage: int, tc: TrainConfig, hp: dict, cfg: VLConfig, tok, proc, seq_len: int, micro: int,
                  accum: int, rank: int, world: int, say) -> Dataset:
    """The stage's micro-batches, item k the k-th of the whole run on this process: one plan, fixed up front, that
    gives every step one modality group and its rows (data.plan_batches: the paper's modality grouping; exact
    resume, the same global batch on every process count). Stage 0 reads its own rows (text,
    caption pairs, scenes); stages 1-3 read stage_data's sources, packed into full rows in stage 2. tc: the run's
    settings with the stage's filled in (stage_hparams' stc)."""
    folders = data_folders(stage, tc.data, tc.extra_data)
    reader = CachedProcessor(proc, tc.image_cache << 20)  # what the training batches read their images with
    if stage == 0:
        try:  # a malformed row stops the run now, named by its file and line
            text = Source(load_rows([tc.data], "text"), "text", tok, cfg.n_image_tokens, seq_len, name="text")
            rows0 = check_stage0_rows(load_rows([tc.data], "stage0"))
            scenes = [r for r in rows0 if r.get("seg")] if cfg.hybrid else []
            # The contrastive pairs and SAM's scenes are planned as one-stream plans (the stream's name, "language",
            # is only plan_batches' label for it), and Stage0Batches slices them per process and micro-batch as it
            # slices the text batches.
            plans = [plan_batches({"language": n}, b * world * accum, hp["steps"], lambda s: {"language": 1.0},
                                  tc.seed + k)
                     for k, (n, b) in enumerate(((len(text), micro), (max(1, len(scenes)), tc.seg_batch)))]
        except ValueError as e:
            raise SystemExit(str(e)) from None
        captions = [r["caption"] for r in rows0]
        per = min(tc.clip_batch, len(set(captions)) // (world * accum))  # a batch holds distinct captions only
        if per < 2:
            raise SystemExit(f"stage 0 needs at least {2 * world * accum} different captions in {tc.data}/stage0.jsonl"
                             f" for a contrastive batch of 2 per micro-batch, found {len(set(captions))}")
        if per < tc.clip_batch:
            say(f"stage 0: contrastive batches of {per} pairs (clip_batch {tc.clip_batch}), as the data has only "
                f"{len(set(captions))} different captions")
        plan_pairs = plan_distinct(captions, per * world * accum, hp["steps"], tc.seed + 2)
        text_batches = PlannedBatches(plans[0], {"language": text}, tok.pad_id, reader, accum, rank, world)
        low = CachedProcessor(proc, tc.image_cache << 20, size=cfg.siglip.image_size if cfg.hybrid else None)
        say(f"data: {len(text)} text pieces, {len(rows0)} image-caption pairs, {len(scenes)} segmented scenes")
        return Stage0Batches(text_batches, rows0, scenes, plan_pairs, plans[1], tok, reader, low, cfg)

    try:
        sources, share = stage_data(stage, tc, tok, cfg, seq_len, folders)
    except ValueError as e:  # a malformed row, named by its file and line; a mix with nothing to draw (stage2_share)
        raise SystemExit(str(e)) from None
    for name, src in sources.items():
        say(f"data: {name}: {len(src)} samples from {src.name}" + by_folder(src) +
            (f" ({src.dropped} longer than {seq_len} tokens dropped)" if src.dropped else ""))
    sizes = {m: len(s) for m, s in sources.items() if drawn(m, share, hp["steps"])}
    for m in [m for m, n in sizes.items() if n == 0]:
        raise SystemExit(no_rows(stage, m, sources[m].name, folders, sources[m].dropped, seq_len, cfg))
    pack = hp["pack"]
    global_batch = hp["batch_size"]
    for m, n in sizes.items():
        if not pack and n < global_batch:  # legal (the plan walks through epochs), but worth knowing
            say(f"data: {m} has {n} sample{'s' * (n != 1)}, fewer than a batch of {global_batch}: each of its "
                "steps repeats samples")
    # Packed, the batch counts rows of seq_len tokens (Table 4: stage 2 takes 1024 sequences of 4096); else samples.
    lengths = {m: [len(s.ids) - 1 for s in sources[m].samples] for m in sizes} if pack else None
    plan = plan_batches(sizes, global_batch, hp["steps"], share, tc.seed + stage, lengths, seq_len)
    return (PackedBatches if pack else PlannedBatches)(plan, sources, tok.pad_id, reader, accum, rank, world)


def check_stage0_rows(rows: list) -> list:
    """rows, or a ValueError naming the first that is not a stage-0 row (STAGE0_ROW) by its file and line."""
    for row in rows:
        if not (isinstance(row.get("image"), str) and isinstance(row.get("caption"), str)
                and row["caption"].strip() and isinstance(row.get("seg") or "", str)):
            given = {k: v for k, v in row.items() if not k.startswith("_")}  # (not where it was read)
            raise ValueError(f"{row['_where']}: a stage-0 row is {STAGE0_ROW}; got "
                             f"{json.dumps(given, ensure_ascii=False)[:200]}")
    return rows


def drawn(group: str, share, steps: int) -> bool:
    """Whether the stage's steps draw from the group: its share at the first step or the last (the shares move
    linearly over the warm-up in between, stage2_share)."""
    return any(share(t).get(group, 0) > 0 for t in (0, steps - 1))


# The modality groups a run can do without, and the setting that leaves each out (one's own data may have no
# text-only chats, say); the others are what the stage is for.
SHARE_FLAGS = {"sft": "--sft_share", "text_chat": "--text_sft_share", "short_chat": "--short_chat_share"}


def no_rows(stage: int, group: str, name: str, folders: list, dropped: int, seq_len: int, cfg: VLConfig) -> str:
    """Why a stage cannot draw from a modality group with no samples, and what to do. folders: --data, then the
    --extra_data folders; dropped: the rows that were there but did not fit the stage's sequence length."""
    flag = SHARE_FLAGS.get(group)
    folders = folders[:1] if group == "language" else folders  # (text rows are read from --data alone)
    llava = any(folder_kind(f) == "llava" for f in folders)
    return (f"stage {stage} trains on {group} rows ({name}), but {', '.join(folders)} "
            f"{'holds' if len(folders) == 1 else 'hold'} none" +
            (f" that fit: all {dropped} are longer than {seq_len} tokens" if dropped else "") +
            ((f"; a longer --seq_len (up to the model's context, {cfg.llm.max_seq_len}) keeps them"
              if seq_len < cfg.llm.max_seq_len else ", the model's context: shorten or split them")
             if dropped else "") +
            (f"; without them, pass {flag} 0" if flag and not dropped else "") +
            ("; an import of one-question chats about an image holds captions when made with "
             "prepare_data.py --llava FILE --captions" if group == "multimodal" and not dropped and llava else "") +
            ("; a LLaVA import holds no text: pass prepare_data.py's corpus as --data and the import as --extra_data "
             "(or begin with --stage 3, which trains on chats alone)" if group == "language" and llava else ""))


def stage_eval_rows(stage: int, tc: TrainConfig, cfg: VLConfig, tok: Tokenizer, out_dir: str, master: bool,
                    world: int, say):
    """What the stage's evaluations read, as evaluate takes it: (questions, text rows), or None: nothing to evaluate.
    Read and checked now, so that a bad row or image stops the run before it trains, not after. Stage 0 trains no
    image-text pairs to ask questions of: its evaluation is the language model's bits per byte alone. Under torchrun
    the first process reads them and every process gets them, to score its share."""
    eval_rows, failed = None, ""
    if master:
        try:
            if stage > 0:
                eval_rows = held_out(tc.data, tc.eval_limit, tc.eval_split)
                if eval_rows:
                    check_fits(eval_rows[0], tok, cfg.n_image_tokens, cfg.llm.max_seq_len)
            else:
                text_rows = held_out_text(tc.data, tc.eval_limit)
                eval_rows = text_rows and (None, text_rows)
        except (ValueError, OSError) as e:
            failed = f"the held-out data: {e}"
        if eval_rows is None and not failed:
            later = f"--eval-only --ckpt {out_dir} --data DIR" + ("" if tc.eval_split == "test" else
                                                                  f" --eval_split {tc.eval_split}")
            say(f"stage {stage}: {tc.data} has no held-out " + (
                f"questions ({MC_FILES[tc.eval_split]}), so the stage is not evaluated; evaluate it afterwards with "
                f"{later}" if stage > 0 else "text (eval_text.jsonl), so stage 0 is not evaluated"))
    if world > 1:  # (a failure too: the others, waiting here, stop with the first, which says why for all)
        shared = [eval_rows, failed]
        dist.broadcast_object_list(shared)
        eval_rows, failed = shared
    if failed:
        raise SystemExit(failed if master else 1)
    return eval_rows


def train_step(train_net, micros: list, opt, clip_groups: dict, grad_clip: float, stage: int, pad_id: int,
               device: str, world: int, autocast):
    """One optimizer step on one process: forward and backward over the step's micro-batches (gradients accumulate),
    the loss normalised over the whole step, each clipping group clipped on its own, then the update.
    Returns (the step's mean loss as a device tensor, read only at log steps; the non-padding tokens read; stage 0's
    last contrastive and dense losses, else {})."""
    # Each micro-batch: ids and targets (B, T), B its samples (packed: rows); targets -100 where nothing is learnt:
    # padding, image tokens, and in chats everything but the assistant's answers and their end of sentence
    # (render_chat's mask, made targets by data.collate: stage 3's loss on answers). Also images (N, 3, S, S) or None,
    # and for packed rows (stage 2) doc_ids (B, T), which sample of the row each token belongs to, so that attention
    # and positions stay inside it. Stage 0's is a dict of its own.
    micros = [m if isinstance(m, dict) else dict(zip(("ids", "targets", "images", "doc_ids"), m)) for m in micros]
    # Normalise by the supervised tokens of the whole step (all micro-batches, all processes), so a step's gradient
    # does not depend on how its batch was split; a step with none gives a zero loss, never NaN.
    n_sup = sum((m["targets"] != -100).sum() for m in micros).to(device)
    if world > 1:
        dist.all_reduce(n_sup)
    n_sup = n_sup.clamp(min=1).float()
    step_loss, tokens, parts = torch.zeros((), device=device), 0, {}
    for j, m in enumerate(micros):
        tokens += int((m["ids"] != pad_id).sum())  # counted on the CPU copy: no device sync
        m = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in m.items()}
        # With DDP, gradients are all-reduced only after the last micro-batch of the step.
        last = j == len(micros) - 1
        ctx = train_net.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
        with ctx, autocast():
            if stage == 0:
                lm_sum, aux, parts = train_net(m)
                # aux (the contrastive and dense losses) is already normalised within this micro-batch (per image,
                # per patch): / len(micros) averages it over the micro-batches, DDP's over processes does the rest.
                loss = lm_sum * world / n_sup + aux / len(micros)
            else:
                # (its batches' spans and images match by construction: data.Source checks each row's tags against
                # its images, so the model's own check, a device sync each call, is left out)
                _, lm_sum = train_net(m["ids"], m.get("images"), targets=m["targets"], doc_ids=m.get("doc_ids"),
                                      reduction="sum", check_inputs=False)
                loss = lm_sum * world / n_sup  # DDP averages over processes, hence the x world
        loss.backward()
        step_loss += loss.detach() / world
    if world > 1:
        dist.all_reduce(step_loss)
    for group in clip_groups.values():
        torch.nn.utils.clip_grad_norm_(group, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return step_loss, tokens, parts


def run_stage(stage: int, tc: TrainConfig, cfg: VLConfig, rank: int, world: int, device: str):
    """One stage, start to finish: check its folder (or the checkpoint it resumes), build the tokenizer, the model
    (with the stage's freeze map), the batches and the optimizer, then train, checkpointing every ckpt_every steps,
    and write the final weights and evaluation (finish). rank, world: this process among torchrun's. The training
    step itself is train_step, called by the loop `for step in bar:` at the end, which reads each step's batches and
    logs, checkpoints and evaluates between steps."""
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    hp, seq_len, stc = stage_hparams(stage, tc, cfg)
    began_from = weights_entry(start_weights(stage, tc), "id") if stage > 0 else None
    if began_from:  # the weights the stage begins from, as their model.pt names them: a resume checks them
        hp["start"] = began_from
    out_dir = os.path.join(tc.out, f"stage{stage}")
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    finished, state = open_stage_folder(stage, tc, cfg, hp, out_dir, ckpt_path, world, say)
    if finished:
        return
    micro, accum = check_stage(stage, tc, hp, world)
    if tc.micro_batch and micro != tc.micro_batch:  # (split_batch: the largest micro-batch up to it that splits)
        say(f"stage {stage}: micro-batches of {micro}: --micro_batch {tc.micro_batch} does not split the "
            f"{hp['batch_size'] // world} {'rows' if hp['pack'] else 'samples'} of each process's step")
    ckpt_every = tc.ckpt_every or max(1, hp["steps"] // 10)
    if tc.stop_after and tc.stop_after % ckpt_every and tc.stop_after != hp["steps"]:
        raise SystemExit(f"--stop_after {tc.stop_after} is not a checkpoint step of stage {stage} (every {ckpt_every}, "
                         f"and the last, {hp['steps']}): the run stops right after a checkpoint")
    resume = state is not None
    init = start_weights(stage, tc)
    if stage > 0 and not resume:
        check_start(stage, tc, cfg)
    tok = checked_tokenizer(stage, tc, cfg, out_dir, state, init, say)  # the one the weights were trained with
    proc = ImageProcessor.for_config(cfg)
    model, net = stage_model(stage, tc, cfg, init, resume, say)
    net.to(device)
    model.llm.grad_checkpointing = tc.grad_ckpt

    eval_rows = stage_eval_rows(stage, tc, cfg, tok, out_dir, master, world, say)  # read and checked before training

    # Which build of each synthetic folder the rows come from (taken before they are read): checked every step,
    # as a folder made anew meanwhile holds other pictures under the names the rows give (data.folder_stamp).
    read = data_folders(stage, stc.data, stc.extra_data)
    stamps = {f: folder_stamp(f) for f in dict.fromkeys(read) if folder_kind(f) == "synthetic"}
    dataset = stage_batches(stage, stc, hp, cfg, tok, proc, seq_len, micro, accum, rank, world, say)
    fingerprint = dataset.fingerprint() if master else None  # what the steps read: kept in every checkpoint
    if master and resume and isinstance(state.get("data"), dict):  # (older checkpoints: not kept)
        change = data_change(state["data"], fingerprint)
        # The folders that run read, where other ones are read now (a forgotten --extra_data, say): its settings keep
        # them as given, though folders may have moved since. (Stage 0 reads --data alone.)
        given = state.get("train") if isinstance(state.get("train"), dict) else {}  # (its settings, as given)
        was = data_folders(stage, given.get("data") or "", given.get("extra_data") or "")
        if change and was[0] and [os.path.realpath(f) for f in was] != [os.path.realpath(f) for f in read]:
            change += f"; that run read --data {was[0]}" + (f" --extra_data {','.join(was[1:])}" if was[1:] else "")
        if change:
            say(f"stage {stage}: {change}")
    clip_groups = clipping_groups(net, stage)  # each clipped to grad_clip on its own
    opt = stage_optimizer(net, tc, hp, device)
    # Every check has passed: only now is the stage folder made, so a run refused above leaves nothing behind.
    make_stage_folder(stage, tc, out_dir, tok, resume, master, world)
    if hp["steps"] < hp["warmup"]:  # (a quick run's --steps leave the stage's warm-up as it is)
        steps = f"{hp['steps']} steps end" if hp["steps"] > 1 else "one step ends"
        say(f"stage {stage}: its {steps} inside the learning rate's warm-up of {hp['warmup']} steps, "
            f"so the rate never reaches its peak, {hp['lr']:g} (a smaller --warmup reaches it)")
    tok_print = tok.fingerprint()  # (kept in model.pt and every ckpt.pt: a third of a second for a 100k vocabulary)
    # This training of the stage, named at its start and kept through resumes: its model.pt carries the name, and the
    # stages after it record which one they began from (weights_entry).
    start, metrics, run_id, lr_was = 0, [], secrets.token_hex(8), None
    if resume:
        run_id = state.get("id", run_id)  # (older checkpoints: none)
        try:  # (a whole file of this stage and config, read_checkpoint found, but another version's, or edited)
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            start = state["step"]
            if not (type(start) is int and 0 < start <= hp["steps"]):
                raise ValueError(f"its step is {start!r}, where one of 1 to {hp['steps']} was expected")
        except torch.cuda.OutOfMemoryError:  # (a RuntimeError, but no fault of the file: AdamW's moments move to
            raise  # the GPU here, the first large allocation of a resume, and torch's own message says so)
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
            why = "; ".join(line.strip() for line in str(e).strip().splitlines()[:4])
            raise SystemExit(f"{ckpt_path} does not fit this stage's model, optimizer or steps (written by another "
                             f"version of train.py, or changed since?): {why}. Restore it, or move the stage folder, "
                             f"{out_dir}, aside to train stage {stage} again") from None
        lr_was = state.get("hparams", {}).get("lr")
        # --device may change on resume (a run moved to another machine), but not silently: on a GPU the steps run in
        # bf16 autocast, on the CPU in fp32 (older checkpoints: not said)
        was_on, now_on = state.get("device"), device.split(":")[0]
        if was_on and was_on != now_on:
            precision = lambda kind: "bf16 autocast" if kind == "cuda" else "fp32"
            say(f"stage {stage}: resuming on {now_on} ({precision(now_on)}) a run that trained on {was_on} "
                f"({precision(was_on)}): the run goes on, but not bit for bit")
        if master:
            metrics = saved_metrics(state, out_dir, stage, start, say)
        say(f"stage {stage}: resuming from {ckpt_path} at step {start}")
        del state

    # GPU: bf16 autocast (the weights and the optimizer stay fp32); CPU: plain fp32. The evaluations use autocast
    # with cache_enabled=False: answering open records a CUDA graph, and torch.cuda.make_graphed_callables refuses
    # autocast's cache of bf16 copies of the weights. So each decoded token casts the weights again (more bytes moved
    # than in fp32), while scoring the options and the text, most of an evaluation's FLOPs, still runs as bf16
    # matmuls (not yet timed on a GPU).
    cuda = device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    eval_autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if cuda else \
        contextlib.nullcontext
    eval_proc = CachedProcessor(proc, tc.image_cache << 20)  # each held-out image decoded once for the whole stage

    def save_metrics():
        """metrics.jsonl, written anew (whole) with every entry so far: at each checkpoint and evaluation."""
        with writing(os.path.join(out_dir, "metrics.jsonl")):
            write_jsonl(os.path.join(out_dir, "metrics.jsonl"), metrics)

    def finish():
        """The stage's final weights, loss plot and evaluation; eval.json, written last, marks the stage done."""
        if master:
            atomic_save({"model": model.state_dict(), "config": cfg.to_dict(), "id": run_id,
                         "tokenizer": tok_print}, os.path.join(out_dir, "model.pt"))
            atomic_save(cfg.to_json(), os.path.join(out_dir, "config.json"))
            plot_losses(metrics, os.path.join(out_dir, "loss.png"), f"stage {stage} training loss ({cfg.name})")
        acc, asked_open, bpb = (evaluate(model, eval_rows, tok, eval_proc, tc.data, rank, world, eval_autocast)
                                if eval_rows else (None, None, None))
        if master:
            result = {"stage": stage, "mc": acc, "open": asked_open, "bpb": bpb,
                      "questions": MC_FILES[tc.eval_split] if acc else None}
            metrics.append({"stage": stage, "step": hp["steps"], "mc_mean": acc and acc["mean"],
                            "open_mean": asked_open and asked_open["mean"], "bpb": bpb})
            save_metrics()
            atomic_save(json.dumps(result, indent=2), os.path.join(out_dir, "eval.json"))  # last: the stage is done
            if acc:
                say(format_table(acc, bpb, f"stage {stage} evaluation{split_named(tc)}", asked_open, eval_rows[0]))
            elif bpb is not None:
                say(f"stage 0: text bits per byte {bpb:.3f}")
        if world > 1:
            dist.barrier()

    if start >= hp["steps"]:
        # Killed after the last checkpoint but before the end of finish() (had it ended, the stage would have been
        # found finished above): the weights are all in the checkpoint.
        say(f"stage {stage}: trained to step {start}, but its final weights or evaluation were never written; "
            "writing them now")
        return finish()
    # The model's buffers are constants (pixel statistics, SAM's relative-position indices, the rotary tables, 4 MB
    # at 1.3B), the same on every rank from the start: broadcasting them from rank 0 before every forward, DDP's
    # default, would only cost communication. (torch 2.13 renamed the switch, and warns at the old name.)
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}
    # find_unused_parameters: a text-only batch (stages 2 and 3 give each modality steps of its own; one's own stage-1
    # rows may lack images) leaves the vision towers and the adaptor without gradients, which DDP must be told to
    # expect. When the first steps' batches all have images, DDP warns that it found no unused parameters: expected.
    train_net = DDP(net, find_unused_parameters=True, **no_buffer_sync) if world > 1 else net
    if tc.compile:
        train_net = torch.compile(train_net)
    # Each item of the dataset is one whole micro-batch, planned up front (hence batch_size None); the sampler starts
    # at the resumed step's first micro-batch, so a resumed run reads exactly the batches the plan gives from there.
    loader = DataLoader(dataset, batch_size=None, num_workers=tc.workers, worker_init_fn=close_inherited_locks,
                        sampler=range(start * accum, hp["steps"] * accum), pin_memory=device.startswith("cuda"),
                        persistent_workers=False, prefetch_factor=4 if tc.workers else None)
    batches = iter(loader)

    saved = start  # the step of the newest checkpoint

    def kept_advice() -> str:
        # A resume with the same settings would repeat the same steps, so the way on is a lower learning rate.
        if saved and saved == start and lr_was not in (None, hp["lr"]):
            # Already resumed from it with another --lr, and failed again before the next checkpoint: weights can be
            # finite and still past saving (a loss of thousands; each gradient then overflows, whatever the lr).
            return (f"This run resumed from {ckpt_path} (step {saved}) with --lr {hp['lr']} (its run had {lr_was}) "
                    "and failed again before its next checkpoint: those weights may be past saving. Start the stage "
                    f"again with a lower --lr (remove {out_dir}, or choose another --out)")
        return (f"The last good checkpoint, {ckpt_path} (step {saved}), is kept: --resume it with a lower --lr"
                if saved else "Start again with a lower --lr")

    def save_checkpoint(step):
        nonlocal saved
        bad = [n for n, p in net.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:  # the update of a step can break the weights before any loss shows it: never save those
            raise SystemExit(f"stage {stage}: after step {step}, {len(bad)} weights are not finite ({bad[0]}, ...); "
                             "stopping. " + kept_advice())
        saved = step
        if master:
            atomic_save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": rng_state(),
                         "config": cfg.to_dict(), "train": dataclasses.asdict(tc), "hparams": hp, "stage": stage,
                         "split": [world, micro], "metrics": metrics, "id": run_id,
                         "data": fingerprint, "device": device.split(":")[0], "tokenizer": tok_print},
                        ckpt_path)
            save_metrics()

    net.train()
    bar = tqdm(range(start, hp["steps"]), desc=f"stage {stage}", initial=start, total=hp["steps"], disable=not master)
    # What is said while the bar is drawn goes through tqdm.write, which takes the bar off the terminal's line, prints
    # and draws it again below: a plain print would start on the bar's line.
    say_under_bar = tqdm.write if master else (lambda text: None)
    losses, t_last, tokens, parts = [], time.time(), 0, {}

    def log(done, lr):
        """The mean loss of the steps since the last log into the metrics (in stage 0 with the last micro-batch's
        contrastive and dense losses beside it, as this process computed them; in stages 1-3 with how many of those
        steps each modality group had, which shows stage 2's mix moving through its warm-up); a NaN or inf among the
        losses stops the run before anything is saved over the last good checkpoint."""
        nonlocal losses, t_last, tokens
        window = torch.stack(losses).cpu()
        bad = (~torch.isfinite(window)).nonzero()
        if len(bad):
            raise SystemExit(f"stage {stage}: the loss became {window[bad[0, 0]].item()} at step "
                             f"{done - len(window) + int(bad[0, 0]) + 1}; stopping. " + kept_advice())
        elapsed = time.time() - t_last
        entry = {"stage": stage, "step": done, "loss": round(float(window.mean()), 5), "lr": lr,
                 "tok_per_s": round(tokens * world / max(elapsed, 1e-9))}
        if stage == 0:
            entry.update({k: round(float(v), 4) for k, v in parts.items()})
        else:  # (each step's group is the plan's: dataset.plan[step] is (group, rows))
            entry["groups"] = dict(collections.Counter(dataset.plan[s][0] for s in range(done - len(window), done)))
        metrics.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{lr:.2e}", tok_s=entry["tok_per_s"])
        losses, t_last, tokens = [], time.time(), 0

    def evaluate_mid_stage(done):
        """The held-out evaluation every --eval_every steps, into the metrics (and metrics.jsonl) and the log."""
        acc, asked_open, bpb = evaluate(model, eval_rows, tok, eval_proc, tc.data, rank, world, eval_autocast)
        metrics.append({"stage": stage, "step": done, "mc_mean": acc["mean"], "open_mean": asked_open["mean"],
                        "bpb": bpb})
        if master:
            save_metrics()
        say_under_bar(format_table(acc, bpb, f"stage {stage}, step {done}{split_named(tc)}", asked_open,
                                   eval_rows[0]))

    def evaluation_due(done):
        return bool(tc.eval_every) and done % tc.eval_every == 0 and 0 < done < hp["steps"] and eval_rows and stage > 0

    # A step's checkpoint is written before its evaluation (below), so the checkpoint a resume starts from never holds
    # that evaluation (the run may not have lived to make it): it is made again now. (Only a checkpoint step is
    # evaluated, and a checkpoint written on failure comes at a later step than any evaluation.)
    if evaluation_due(start):
        evaluate_mid_stage(start)
    for step in bar:
        lr = learning_rate(step, hp, tc.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        try:
            micros, reason = [next(batches) for _ in range(accum)], ""
        except ValueError as e:  # an unreadable image; from a worker, the message ends with the original error
            reason = str(e).strip().splitlines()[-1].removeprefix("ValueError: ")
            reason += "\nFix or remove that row, then run "  # (the advice after a line break: see below)
        # Asked after the step's batches are read: a batch read from a folder made anew is never trained on (and an
        # image missing in the middle of the swap is said as what it is, not as a row to fix).
        remade = [f for f, s in stamps.items() if folder_stamp(f) != s]
        if remade:
            reason = (f"{remade[0]} was prepared again while this run read it (its meta.json is new), so the images "
                      "of the rows the run read at its start may now be other pictures\nTo go on with the data as "
                      "they are now (a resume says whether its rows differ; pictures are not compared), or with the "
                      "ones it began with once restored, run ")
        reason = first_failure(reason, world)  # every process stops at the same step, whichever failed
        if reason:
            reason, advice = reason.split("\n", 1)  # (why, and the advice, which the ending below completes)
            if step > saved:  # keep the steps done since the last checkpoint: nothing is lost
                if losses:
                    log(step, learning_rate(step - 1, hp, tc.min_lr_ratio))
                save_checkpoint(step)  # (written by the first process)
            # The first process says why, once, and exits with the failure; the others exit quietly, as torchrun
            # would stop them (with SIGTERM, even mid-save) as soon as one process exits with a failure.
            if not master:
                raise SystemExit(0)
            kept = f"Training up to step {saved} is saved in {ckpt_path}. " if saved else ""
            raise SystemExit(f"stage {stage}, step {step + 1}: {reason}. {kept}{advice}"
                             f"again{' with --resume' if saved else ''}") from None
        step_loss, step_tokens, parts = train_step(train_net, micros, opt, clip_groups, tc.grad_clip, stage,
                                                   tok.pad_id, device, world, autocast)
        losses.append(step_loss)
        tokens += step_tokens

        done = step + 1
        # A checkpoint at every ckpt_every steps, the last, and each step with an evaluation: the checkpoint first,
        # then the evaluation, so a run killed (or out of memory) while it evaluates loses no steps, and its resume
        # evaluates that step's weights again (above).
        checkpoint_due = done % ckpt_every == 0 or done == hp["steps"] or evaluation_due(done)
        if done % tc.log_every == 0 or checkpoint_due:  # (the losses since the last log go into the checkpoint)
            log(done, lr)
        if checkpoint_due:
            save_checkpoint(done)
            if tc.stop_after and done == tc.stop_after:
                bar.close()  # (its line ended, where the process stops)
                say(f"stopping after step {done} (--stop_after)")
                sys.stdout.flush()
                os._exit(0)  # as if the process were killed right after this checkpoint
        if evaluation_due(done):
            evaluate_mid_stage(done)
    bar.close()
    del batches, loader  # their worker processes, and the images these cache, have nothing more to do
    finish()


# ---------------------------------------------------------------------------------------------------------------------
# The run: main; --eval_only; train_or_evaluate, which checks every stage's settings, folder and rows before the
# first one trains (the checks below), then runs the stages in turn.

def check_out_path(out: str, stages: list):
    """--out and its stage folders must be folders, or paths where folders can be made: said before the data is made
    and the model built (minutes at the released sizes), where making the stage folder would find out."""
    there = os.path.abspath(out)
    while not os.path.exists(there) and os.path.dirname(there) != there:  # the nearest part of the path that exists
        there = os.path.dirname(there)
    if not os.path.isdir(there):
        raise SystemExit(f"--out {out}: {there} is a file; expected a folder, or a path where one can be made")
    for stage in stages:
        folder = os.path.join(out, f"stage{stage}")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise SystemExit(f"--out {out}: {folder} is a file; expected stage {stage}'s folder, or nothing there")


def check_stage_rows(stage: int, tc: TrainConfig, cfg: VLConfig):
    """SystemExit for what in the stage's rows would stop it as it begins: a malformed row (named by its file and line)
    or a modality group it draws from with no rows. train_or_evaluate asks it of every stage of the run before the first
    one trains, so that `--stage all` is not stopped at stage 2 after stage 1 has trained (for days, at the released
    sizes). What needs the tokenizer, a row too long for the context, is found as the stage begins."""
    hp, seq_len, stc = stage_hparams(stage, tc, cfg)
    folders = data_folders(stage, tc.data, tc.extra_data)
    try:
        if stage == 0:
            check_rows(load_rows(folders, "text"), "text")
            check_stage0_rows(load_rows(folders, "stage0"))
            return
        groups, share_for = stage_groups(stage, stc, folders)
        for rows, kind, name in groups.values():
            check_rows(rows, kind, name)
        share = share_for({group: len(rows) for group, (rows, _, _) in groups.items()})  # (may refuse the mix)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    # The images of rows written by hand (a folder neither prepare_data.py nor its LLaVA import made), and of an
    # import, which checked them as it wrote its rows but names them where they were then (a folder moved since):
    # a missing one would stop the run only when a step drew its row, hours in maybe. (One stat per image.)
    kinds = {f: folder_kind(f) for f in folders}
    missing = list(dict.fromkeys(  # (row, path, its folder), each once
        (r["_where"], path, r["_root"]) for rows, _, _ in groups.values() for r in rows
        if kinds.get(r["_root"]) in ("other", "llava") for path in image_paths(r.get("images") or (), r["_root"])
        if not os.path.isfile(path)))
    if missing:
        where, path, root = missing[0]
        if kinds[root] == "llava":
            made = import_record(root)  # (the file, the images' folder, whether chats became captions; {}: edited)
            command = ["python", "prepare_data.py", "--llava", made.get("file", "FILE"), "--images", "FOLDER",
                       "--out", root] + ["--captions"] * bool(made.get("as_captions"))
            advice = (f"; the import in {root} was made from the images in {made.get('images', '(not said)')}, which "
                      f"have moved or gone since: import again with --images where they are now "
                      f"({shlex.join(map(str, command))})")
        else:
            advice = "; fix or remove the rows that name them"
        others = len({p for _, p, _ in missing}) - 1  # (an image named by many rows is one image)
        raise SystemExit(f"{where}: image {path} " + ("is a folder" if os.path.isdir(path) else
                                                      f"does not exist{missing_hint(path)}") + (
            f" (and {others} more image{'s' * (others > 1)} of stage {stage}'s rows)" if others else
            f" (named by {len(missing)} of stage {stage}'s rows)" if len(missing) > 1 else "") + advice)
    for group, (rows, _, name) in groups.items():
        if not rows and drawn(group, share, hp["steps"]):
            raise SystemExit(no_rows(stage, group, name, folders, 0, seq_len, cfg))


def run_tokenizer(tc: TrainConfig, cfg: VLConfig, first: int):
    """The tokenizer every stage of a run trains with: the first stage's (each later one reads the tokenizer.json the
    stage before wrote, a copy of it), from the places checked_tokenizer takes it from, without its checks against the
    weights (the stage makes them as it begins). None where that stage would stop for want of one: it says why itself,
    in its own words."""
    folder = os.path.join(tc.out, f"stage{first}")
    sources = tokenizer_sources(first, tc, folder, tc.resume and os.path.exists(os.path.join(folder, "ckpt.pt")))
    try:
        return None if sources is None else stage_tokenizer(tc, cfg, sources)
    except SystemExit:
        return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    tc, overrides = parse_args(argv)
    try:
        cfg = get_config(tc.config, **overrides)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    rank, world = setup_distributed()
    try:
        try:
            train_or_evaluate(argv, tc, overrides, cfg, rank, world)
        except PermissionError as e:  # a file this user may not read (another user's checkpoint or tokenizer), or a
            raise SystemExit(denied(e, "read or write")) from None  # folder it may not write: named, no traceback
    except SystemExit as e:
        if world > 1 and isinstance(e.code, str):
            # torchrun's processes share one terminal, and Python prints an exit message and its newline in two
            # writes, between which another process's message landed (two on one line): each is written here in one
            # write, the later processes' named as such (a refusal most processes meet alike is said by each).
            os.write(2, ((f"(process {rank}) " if rank else "") + e.code + "\n").encode())
            raise SystemExit(1) from None
        raise
    finally:
        # Stopped (a refused setting, a failure), torchrun's processes leave a gloo group here, without a barrier:
        # left to the exit, gloo's threads aborted 1 run in 4 ("terminate called without an active exception"). Not
        # one with NCCL, whose teardown waits for collectives in flight, which a process stopped by Ctrl-C may have
        # left for good (the exit aborts them instead).
        if world > 1 and dist.is_initialized() and "nccl" not in str(dist.get_backend()):
            dist.destroy_process_group()


def evaluate_only(argv, tc: TrainConfig, overrides: dict, device: str, rank: int, world: int):
    """--eval-only: the held-out evaluation of --ckpt (a stage folder, a model.pt or a released model folder) on
    --data's questions and text, printed as the table a stage prints; nothing is written. The model config is the
    checkpoint's (--config only names the default --data); bf16 on a GPU."""
    if not tc.ckpt:
        raise SystemExit("--eval_only needs --ckpt: a stage folder, a model.pt file or a released model folder")
    if overrides:
        raise SystemExit(f"--eval-only evaluates the model as --ckpt holds it; model config overrides "
                         f"({', '.join('--' + k for k in overrides)}) would change nothing: drop them")
    unused = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in EVAL_ONLY_FIELDS and
              getattr(tc, f.name) != f.default]  # (a training flag left in a command copied from training)
    if unused:
        raise SystemExit(f"--eval-only evaluates --ckpt on --data; {', '.join('--' + k for k in unused)} would "
                         f"change nothing: drop {'it' if len(unused) == 1 else 'them'} (it reads "
                         f"{', '.join('--' + k for k in EVAL_ONLY_FIELDS[1:])})")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        rows = held_out(tc.data, tc.eval_limit, tc.eval_split)  # before loading a model that may take minutes
        if rows is None:
            name = MC_FILES[tc.eval_split]
            raise ValueError(f"no multiple-choice questions at {os.path.join(tc.data, name)}: --data must be a "
                             f"folder holding {name} (prepare_data.py's" +
                             (", or one of your own)" if tc.eval_split == "test" else
                              " since corpus version 10: run prepare_data.py again; or one of your own)"))
        tokenizer = tc.tokenizer if is_released_folder(tc.ckpt) else tokenizer_path(tc, [tc.ckpt])
        if (rank == 0 and tokenizer == os.path.join(tc.data, "tokenizer.json") and not tc.tokenizer
                and weights_entry([tc.ckpt], "tokenizer") is None):  # (older weights: no fingerprint kept)
            print(f"(no tokenizer.json beside {tc.ckpt}, so it is evaluated with {tokenizer}, which must be the "
                  "one those weights were trained with: else pass that one as --tokenizer)")
        # (load_model checks the tokenizer by its fingerprint; the questions are checked against the model's context
        # and the tokenizer before the weights are loaded, which may take minutes)
        model, tok, proc = load_model(tc.ckpt, device, dtype, tokenizer, before_weights=lambda cfg, tok: check_fits(
            rows[0], tok, cfg.n_image_tokens, cfg.llm.max_seq_len))
        # (each question's images are read twice, for MCPPL and asked open: kept, up to --image_cache MB)
        acc, asked_open, bpb = evaluate(model, rows, tok, CachedProcessor(proc, tc.image_cache << 20), tc.data,
                                        rank, world)
    except (ValueError, FileNotFoundError) as e:  # a bad checkpoint or row (named by file and line), a bad image
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:  # Ctrl-C: a line, as a training run gives, not the model's traceback
        raise SystemExit("\n(evaluation interrupted: nothing was written)") from None
    if world > 1:
        end_process_group()
    if rank > 0:  # under torchrun, each process scored its share; the first says the figures
        return
    if any(a.split("=")[0] == "--config" for a in argv) and model.cfg.name != tc.config:
        print(f"(--config {tc.config} chose the questions' folder {tc.data} only: the model is the checkpoint's "
              f"{model.cfg.name!r})")
    print(format_table(acc, bpb, f"evaluation of {tc.ckpt} on {tc.data}{split_named(tc)}", asked_open, rows[0]))


def train_or_evaluate(argv, tc: TrainConfig, overrides: dict, cfg: VLConfig, rank: int, world: int):
    """main, once the process group is set up: --eval_only (evaluate_only), or the stages of the run, each checked
    before the first one trains, then run one after another (run_stage)."""
    device = tc.device if tc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device(device)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"

    if tc.eval_only:
        return evaluate_only(argv, tc, overrides, device, rank, world)

    seen = {os.path.realpath(tc.data): "--data"}
    for folder in listed(tc.extra_data):
        if not any(os.path.exists(os.path.join(folder, f"{name}.jsonl")) for name in ("pretrain", "sft")):
            raise SystemExit(f"--extra_data {folder}: " + (
                "a file" if os.path.isfile(folder) else "no such folder" if not os.path.isdir(folder) else
                "holds neither pretrain.jsonl nor sft.jsonl") +
                "; expected a folder of rows, such as prepare_data.py --llava writes")
        if os.path.realpath(folder) in seen:  # its rows would be read twice, and weigh double in the mix
            raise SystemExit(f"--extra_data {folder} is the folder {seen[os.path.realpath(folder)]} names already: "
                             "name each folder once")
        seen[os.path.realpath(folder)] = f"--extra_data {folder}"
        # The held-out set is --data's alone (one set, so that stages compare): one's own there is said to be unread.
        questions = [split for split, name in MC_FILES.items() if os.path.isfile(os.path.join(folder, name))]
        held = [MC_FILES[split] for split in questions] + \
            ["eval_text.jsonl"] * os.path.isfile(os.path.join(folder, "eval_text.jsonl"))
        if held and rank == 0:
            how = f"--eval-only --ckpt {os.path.join(tc.out, 'stageN')} --data {folder}" + \
                ("" if "test" in questions else " --eval_split val")
            print(f"(--extra_data {folder} holds {' and '.join(held)}, which this run does not read: the held-out set "
                  f"is --data's" + (f"; evaluate on its questions with {how})" if questions else ")"))
    # Two imports of one LLaVA file read its rows twice: said. (Once with --captions, its one-question chats are
    # captions in one and chats in the other, which may be the point: its other chats are still read twice.)
    imported = {}
    for folder in [tc.data] + listed(tc.extra_data):
        made = import_record(folder)
        if "file" not in made:  # (not an import)
            continue
        file, captions = os.path.realpath(str(made["file"])), bool(made.get("as_captions"))
        if file in imported and rank == 0:
            other, other_captions = imported[file]
            what = "its rows are read twice" if captions == other_captions else \
                "its chats of more than one question or image are read twice (its one-question chats are captions in " \
                "one and chats in the other)"
            print(f"({folder} and {other} are both imports of {file}: {what}, and weigh double in the mix)")
        imported.setdefault(file, (folder, captions))
    if tc.stage == "all":
        stages = [0, 1, 2, 3] if cfg.name in FROM_SCRATCH else [1, 2, 3]
    elif tc.stage in ("0", "1", "2", "3"):
        stages = [int(tc.stage)]
    else:
        raise SystemExit(f"--stage must be 0, 1, 2, 3 or all, got {tc.stage!r}")
    if stages[0] == 0 and cfg.name not in FROM_SCRATCH:
        raise SystemExit(f"stage 0 (unimodal pretraining) is for the presets trained from scratch {FROM_SCRATCH}; "
                         f"{cfg.name!r} starts from pretrained parts (--init_from)")
    if tc.init_from and stages[0] == 0:
        raise SystemExit("--init_from sets where stage 1, 2 or 3 starts, but this run begins with stage 0, which "
                         "trains from scratch: drop --init_from, or begin with --stage 1")
    check_init_preset(tc.init_from, cfg)
    if stages[0] == 0 and folder_kind(tc.data) == "llava":
        raise SystemExit(f"stage 0 trains on prepare_data.py's corpus (text, caption pairs, label maps), and --data "
                         f"{tc.data} is a LLaVA import: begin with --stage 1, or pass the import as --extra_data")
    check_out_path(tc.out, stages)
    claim_out_folder(tc.out, rank == 0, world, hold=False)  # another run writing to it now?
    # The stages that will train (with --resume, a finished one is skipped)
    pending = [s for s in stages if not (tc.resume and is_finished(os.path.join(tc.out, f"stage{s}")))]
    for stage in stages:  # every stage's settings and folder, before any trains (and before data is made)
        folder = os.path.join(tc.out, f"stage{stage}")
        if stage in pending:
            check_stage(stage, tc, stage_hparams(stage, tc, cfg)[0], world)
            refuse_earlier_run(stage, folder, tc.resume)
        # A folder trained for another model is said now, not after making this model's data (minutes at the
        # released sizes).
        saved = saved_config(folder) if tc.resume else None
        if saved is not None:
            check_same_config(saved, cfg, folder)
    # A resumed stage goes on only from the weights it began from (resumable_state): one whose stage before has lost
    # its files (the folder removed) would be refused only after that stage had trained again. Said now instead.
    for before, stage in zip(stages, stages[1:]):
        held = {s: held_weights(os.path.join(tc.out, f"stage{s}")) for s in (before, stage)}
        if tc.resume and held[stage] and not held[before]:
            raise SystemExit(f"{os.path.join(tc.out, f'stage{stage}')} holds an earlier run's "
                             f"{' and '.join(held[stage])}, which began from stage {before}'s weights, but "
                             f"{os.path.join(tc.out, f'stage{before}')} holds neither its checkpoint nor its weights: "
                             f"this run would train stage {before} again, then refuse to go on from the new weights. "
                             f"Put stage {before}'s files back, or remove stage {stage}'s folder (and those after it) "
                             "to train them again")
    rebuild = data_to_prepare(tc.data, cfg.name)
    first = os.path.join(tc.out, f"stage{stages[0]}")
    if stages[0] > 0 and not (tc.resume and (os.path.exists(os.path.join(first, "ckpt.pt")) or is_finished(first))):
        check_start(stages[0], tc, cfg)  # before any data is made, which takes minutes at the released sizes
    # SIGTERM ends the run as Ctrl-C does (Terminated), from here on: while data is made too.
    with sigterm_stops():
        if rebuild:
            if rank == 0:
                import prepare_data
                print(f"{tc.data}: {rebuild[0]}: running prepare_data.py {' '.join(rebuild[1])} first")
                prepare_data.main(rebuild[1])
            if world > 1:
                dist.barrier()
        # Every stage's rows, and the questions the later stages are evaluated on, before the first stage trains (the
        # first one's questions are read as it begins, with their images).
        for stage in pending:
            check_stage_rows(stage, tc, cfg)
        if any(stage > 0 for stage in pending[1:]):
            try:
                questions = held_out(tc.data, tc.eval_limit, tc.eval_split)
            except (ValueError, OSError) as e:
                raise SystemExit(f"the held-out data: {e}") from None
            # A context too small for them, say, is found out now, not once the stages before have trained. (A
            # stage after the run's first starts from the one before it: --init_from is the first's alone.)
            tok = questions and run_tokenizer(tc if pending[0] == stages[0] else dataclasses.replace(tc, init_from=""),
                                              cfg, pending[0])
            if tok:
                try:
                    check_fits(questions[0], tok, cfg.n_image_tokens, cfg.llm.max_seq_len)
                except ValueError as e:
                    raise SystemExit(f"the held-out data: {e}") from None
        t0 = time.time()
        try:
            for k, stage in enumerate(stages):
                # --init_from is where the run's first stage starts; each later one starts from the stage before it.
                try:
                    run_stage(stage, tc if k == 0 else dataclasses.replace(tc, init_from=""), cfg, rank, world, device)
                except (KeyboardInterrupt, WriteFailed, RuntimeError) as e:  # a line instead of a traceback:
                    if isinstance(e, RuntimeError) and not dead_worker(e):  # (a bug: its traceback)
                        raise
                    let_go_of_workers(e)
                    # Ctrl-C reaches every process under torchrun: the first says it, for all (a dead worker, each
                    # process says for itself).
                    if rank > 0 and isinstance(e, KeyboardInterrupt):
                        raise SystemExit(1) from None
                    ckpt = os.path.join(tc.out, f"stage{stage}", "ckpt.pt")  # (whole: atomic_save)
                    step = saved_entry(ckpt, "step")  # (None if unreadable: a stop is no time for a traceback)
                    step = f" (step {step})" if isinstance(step, int) else ""
                    raise SystemExit(f"\nstage {stage}: {stopped_why(e)}. " + (
                        f"Its last checkpoint, {ckpt}{step}, is kept: run "
                        "the same command with --resume to go on from it" if os.path.isfile(ckpt) else
                        "No checkpoint of it was written yet: run the same command again" + (
                            " with --resume (the stages before it are done, and skipped)" if k and not tc.resume
                            else "") + " to train it from its start")) from None
        finally:
            unlock_out_folders()
    if rank == 0:
        print(f"done: stages {stages} in {time.time() - t0:.0f}s")
    if world > 1:
        end_process_group()


def stopped_why(e: BaseException) -> str:
    """What ended a stage, for train_or_evaluate's one line: Ctrl-C, SIGTERM, a failed write, or a data worker killed
    (for memory, most often: the kernel kills the largest process, and each worker holds up to --image_cache MB)."""
    if isinstance(e, Terminated) or (dead_worker(e) and "signal: Terminated" in str(e)):  # (a spawned worker's)
        return "stopped by SIGTERM"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if dead_worker(e):
        return (f"{str(e).strip().rstrip('.')} (a data-loading process killed for memory, most often: run again "
                "with fewer --workers or a smaller --image_cache)")
    return str(e)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside a stage's training (a stage, and --eval_only, say their own line):
        # before the first began, or after the last ended; torchrun's later processes stop without a word.
        raise SystemExit("\ninterrupted while no stage was training" if os.environ.get("RANK", "0") == "0"
                         else 1) from None
