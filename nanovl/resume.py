"""
A stage's folder and the weights in it: what train.py reads back to resume a stage, skip a finished one or start the
next one from it, and the checks that it may. None of it is the paper's; it is what lets a run of days be stopped and
continued without ever training on top of the wrong weights.

A stage folder (out/stage<k>/, written by train.py) holds:
    ckpt.pt          the latest resumable state: weights, AdamW moments, step, random number generators' state, the
                     model config, the training settings and hyperparameters, the metrics so far, the run's id, the
                     fingerprints of its data and tokenizer (written whole, nanovl/runs.py atomic_save)
    model.pt         the final weights, the model config, the run's id and its tokenizer's fingerprint
    eval.json        the final evaluation, written last: with model.pt, it marks the stage finished (is_finished)
    tokenizer.json, config.json, metrics.jsonl, loss.png

What is checked here, each refusal saying what differs and how to go on:
    an earlier run's results are never written over unasked          refuse_earlier_run (open_stage_folder,
                                                                     make_stage_folder)
    the weights were made for this model config (preset, overrides)  check_same_config, config_flags, check_init_preset
    the weights a stage starts from exist                            check_start (start_weights)
    a checkpoint is a whole, finite training state of this stage     read_checkpoint
    ... written by a run with the same training settings             resumable_state (FREE_ON_RESUME: what may change)
    the tokenizer is the one the weights were trained with           checked_tokenizer: check_same_tokenizer, and
                                                                     checkpoint.py's check_trained_with (by fingerprint)
    the data a resumed run reads is the data its checkpoint planned  data_change (said, not refused)
train.py's run_stage calls open_stage_folder, checked_tokenizer and make_stage_folder, in that order, so that a run
refused by any check has written nothing.
"""

import dataclasses
import os
import shlex

import torch

from nanovl.checkpoint import (check_finite, check_keys, check_tokenizer_fits, check_trained_with, check_weights,
                               is_released_folder, load_plain, nanovl_state, read_tokenizer)
from nanovl.config import FROM_SCRATCH, PRESETS, VLConfig, get_config
from nanovl.data import default_folder, folder_kind, read_jsonl
from nanovl.model import DeepSeekVL
from nanovl.recipe import HPARAM_FIELDS, TrainConfig, listed, split_batch
from nanovl.runs import atomic_save, claim_out_folder, remove_stale_temporaries
from nanovl.tokenizer import Tokenizer


def is_finished(out_dir: str) -> bool:
    """A stage folder whose run ended: its final weights and eval.json, which finish() writes last."""
    return all(os.path.exists(os.path.join(out_dir, f)) for f in ("model.pt", "eval.json"))


def held_weights(out_dir: str) -> list:
    """Which of a run's weight files a stage folder holds: ["ckpt.pt", "model.pt"], either, or neither."""
    return [f for f in ("ckpt.pt", "model.pt") if os.path.exists(os.path.join(out_dir, f))]


def refuse_earlier_run(stage: int, out_dir: str, resume: bool):
    """Stop if the stage folder holds an earlier run's checkpoint or final weights that this run would write over:
    without --resume, or with it but no ckpt.pt to go on from (a stage finished is not asked: it is skipped)."""
    earlier = held_weights(out_dir)
    if earlier and (not resume or earlier == ["model.pt"]):
        raise SystemExit(f"{out_dir} already holds {' and '.join(earlier)} from an earlier run: " +
                         ("pass --resume to continue it (a finished stage is skipped)" if not resume else
                          "there is no ckpt.pt to resume from") +
                         f", or remove {out_dir} (or choose another --out) to train stage {stage} again")


def model_file(path: str) -> str:
    """A stage folder's model.pt (its final weights), or the .pt file given."""
    return os.path.join(path, "model.pt") if os.path.isdir(path) else path


def is_nanovl_checkpoint(path: str) -> bool:
    """A stage folder or a .pt file written by train.py (rather than a pretrained part for init_from_parts)."""
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "model.pt")) and not is_released_folder(path)
    return path.endswith(".pt")  # (SAM's own checkpoint is a .pth: a pretrained part)


def weights_entry(paths: list, key: str):
    """What finish() writes beside the weights into a stage's model.pt, for the one stage folder or model.pt in paths:
    "id" (a random hex string, new with every training of the stage, kept through its resumes) or "tokenizer" (the
    fingerprint of the tokenizer they were trained with); None for anything else (pretrained parts, weights of older
    runs)."""
    if len(paths) != 1 or not is_nanovl_checkpoint(paths[0]):
        return None
    return saved_entry(model_file(paths[0]), key)


def saved_entry(path: str, key: str):
    """One entry of what a model.pt or ckpt.pt holds beside its tensors ("config", "step", "id", ...), read
    memory-mapped: the tensors are not read, so this takes a moment at any size. None when the file has no such entry
    or cannot be read so (whatever is wrong with it, loading it in full says, with the checks made for that)."""
    try:
        state = load_plain(path)
    except Exception:
        return None
    return state.get(key) if isinstance(state, dict) else None


def config_inside(path: str):
    """The model config held in a model.pt or ckpt.pt (not the config.json beside it, a copy for reading, which an
    edit would make say what the weights are not); None when there is none, or it cannot be read."""
    saved = saved_entry(path, "config")
    return saved if isinstance(saved, dict) else None


def saved_config(folder: str):
    """The model config a stage folder was trained with: its model.pt's once finished, else its ckpt.pt's."""
    return config_inside(os.path.join(folder, "model.pt" if is_finished(folder) else "ckpt.pt"))


def load_weights(path: str, cfg: VLConfig) -> dict:
    """A model state dict from a stage folder or .pt file, after checking it was made for this model config."""
    path = model_file(path)
    try:
        # weights_only: a pickle holding more than tensors is refused, with the reason; a missing file is said with
        # what the folder holds instead (a stage not trained to its end, an --out folder)
        weights, config = nanovl_state(load_plain(path), path)
        check_weights(weights, path)  # as load_model checks them (load_state_dict would convert an integer tensor)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    check_same_config(config, cfg, path)
    with torch.device("meta"):  # (nothing allocated: only the names and shapes are wanted)
        shapes = {k: v.shape for k, v in DeepSeekVL(cfg).state_dict().items()}
    try:  # the config matches, but the weights may still not (an edited file): each key named, not load_state_dict's
        check_keys(shapes, weights, path)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return weights


def check_same_config(saved: dict, cfg: VLConfig, path: str):
    """Stop, naming each differing field, when a checkpoint was made for another model config."""
    now = cfg.to_dict()
    # A part one side has not (a SigLIP-only model's SAM) is one line, not one per field of the other side's.
    absent = {k for k in ("siglip", "sam", "aligner", "llm")
              if isinstance(saved, dict) and (saved.get(k, "") is None) != (now[k] is None)}
    diff = [f"{k}: checkpoint {'none' if saved.get(k) is None else 'present'} vs now "
            f"{'none' if now[k] is None else 'present'}" for k in sorted(absent)]
    diff += [f"{k}: checkpoint {a} vs now {b}" for k, a, b in VLConfig.differences(saved, now)
             if k.split(".")[0] not in absent]
    if diff:
        flags = config_flags(saved)
        raise SystemExit(f"{path} was trained with another model config:\n  " + "\n  ".join(diff) +
                         "\npass the same --config and overrides it was trained with" +
                         (f": {' '.join(flags)}" if flags is not None else ""))


def config_flags(saved: dict):
    """The command-line flags that build the model config a checkpoint holds (saved, to_dict's layout): its preset
    and the overrides of it, as ["--config tiny", "--llm.dim=96"]; None where flags cannot (a preset this version
    does not know, a section the preset lacks). Checked by building the config from them, as main would."""
    name = saved.get("name") if isinstance(saved, dict) else None
    if not isinstance(name, str) or name not in PRESETS:
        return None
    flags, off = [f"--config {name}"], set()
    for key, was, _ in VLConfig.differences(saved, get_config(name).to_dict()):
        section = key.split(".")[0]
        if saved.get(section, "") is None:  # a part the checkpoint's model has not (SigLIP-only: no SAM)
            if section not in off:
                off.add(section)
                flags.append(f"--{section}=none")
            continue
        value = ",".join(map(str, was)) if isinstance(was, list) else "none" if was is None else was
        flags.append(f"--{key}={value}")
    try:
        overrides = dict(f[2:].split("=", 1) for f in flags[1:])
        if VLConfig.differences(get_config(name, **overrides).to_dict(), saved):
            return None
    except (ValueError, TypeError):
        return None
    return flags


def check_init_preset(init_from: str, cfg: VLConfig, stage: int = 0):
    """Stop before any data is made when --init_from is a nanovl checkpoint of another preset: the config inside it
    names it (the weights themselves are checked field by field when they load, minutes later). stage: given for the
    stage before's weights in --out, which a stage starts from without --init_from."""
    if not init_from or "," in init_from or not is_nanovl_checkpoint(init_from):
        return  # nothing to start from, or pretrained parts
    path = model_file(init_from)
    theirs = (config_inside(path) or {}).get("name")  # (none, or unreadable: loading the weights says what is wrong)
    if theirs and theirs != cfg.name:
        raise SystemExit((f"{init_from}, where stage {stage} starts," if stage else f"--init_from {init_from}") +
                         f" holds a {theirs!r} model ({path}), but this run builds "
                         f"{cfg.name!r}: pass --config {theirs}, or start from a {cfg.name!r} checkpoint" +
                         (" (--init_from, or another --out)" if stage else ""))


def check_same_tokenizer(tok: Tokenizer, given: str, path: str, resume: bool):
    """A stage trains with the tokenizer its weights so far were trained with: a resumed one, the one in its folder
    (which sample.py reads too); a new one, the one beside the weights it starts from. Another, even of the same
    size, turns the same text into other ids. given: where tok came from (--tokenizer)."""
    if not os.path.isfile(path):
        return  # (nothing to compare with)
    try:
        theirs = read_tokenizer(path)  # (as stage_tokenizer read tok)
    except ValueError as e:
        raise SystemExit(f"{e}; the tokenizer {'of the stage folder' if resume else 'beside the starting weights'} "
                         "cannot be read to compare with --tokenizer") from None
    if not tok.same_ids(theirs):
        raise SystemExit(f"--tokenizer {given} differs from {path}, the tokenizer " +
                         ("this stage was trained with" if resume else "the weights this stage starts from were "
                          "trained with") + ": the same text would become other ids. " +
                         ("Resume" if resume else "Run") + " without --tokenizer (or with that one)")


def training_tensors(state: dict) -> dict:
    """A training checkpoint's weights and AdamW moments, by name (what is not a tensor left out: its shape is for
    load_state_dict to check)."""
    named = dict(state["model"]) if isinstance(state["model"], dict) else {}
    moments = state["optimizer"].get("state", {}) if isinstance(state["optimizer"], dict) else {}
    for i, slots in moments.items() if isinstance(moments, dict) else ():
        named.update({f"optimizer state {i} {k}": t for k, t in slots.items()} if isinstance(slots, dict) else {})
    return {k: t for k, t in named.items() if torch.is_tensor(t)}


def read_checkpoint(path: str, stage: int, cfg: VLConfig, finished: bool = False) -> dict:
    """A stage's ckpt.pt, checked as a file: a training checkpoint (a dict with model, optimizer, step and rng) with
    finite weights, of this stage and for this model config. Whether the run that wrote it trained with this run's
    settings is resumable_state's to check (below). finished: the stage is done, and only its settings will be
    checked (its weights are not read)."""
    try:
        state = load_plain(path)
    except (ValueError, FileNotFoundError) as e:  # (FileNotFoundError: a ckpt.pt that is a folder)
        raise SystemExit(f"{e}; remove the stage folder, {os.path.dirname(path)}, to train stage {stage} again"
                         ) from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "rng"} <= set(state):
        raise SystemExit(f"{path} is not a training checkpoint (a dict with model, optimizer, step and rng)")
    # A run saves only finite weights (a NaN loss stops it first), so NaN here is damage to the file. Resumed, it
    # would stop the run a few steps on with "the loss became nan", blamed on the learning rate.
    if not finished:
        try:
            check_finite(training_tensors(state), path)
        except ValueError as e:
            raise SystemExit(f"{e}; it cannot be resumed: restore it, or remove the stage folder, "
                             f"{os.path.dirname(path)}, to train stage {stage} again") from None
    if state.get("stage", stage) != stage:
        raise SystemExit(f"{path} holds stage {state['stage']}'s training state, not stage {stage}'s")
    if isinstance(state.get("config"), dict):
        check_same_config(state["config"], cfg, path)
    return state


def saved_metrics(state: dict, out_dir: str, stage: int, step: int, say) -> list:
    """The metrics of a resumed stage up to its checkpoint's step, which travel inside the checkpoint. Older checkpoints
    kept none: they come from the stage's metrics.jsonl then, which the next save writes anew from them; one that cannot
    be read (damaged, gone) costs the log of those steps, not the resume (said)."""
    if "metrics" in state:
        return state["metrics"]
    path = os.path.join(out_dir, "metrics.jsonl")
    try:
        return [m for m in read_jsonl(path) if m["step"] <= step]
    except (ValueError, OSError, KeyError, TypeError) as e:
        say(f"stage {stage}: the metrics before step {step} are not carried on: {path} cannot be read ({e})")
        return []


def data_change(was: dict, now: dict) -> str:
    """How this run's data and plan (the batches' fingerprint) differ from the ones a checkpoint's run had, in words;
    "" if they do not. --data and --extra_data may change on resume (folders move), so what they hold is compared
    here: a folder prepared again with other arguments (or by a newer prepare_data.py), or other rows of one's own,
    and the resumed steps read other rows than the checkpoint's run planned. Said, not refused, as a new --lr is."""
    if was == now:
        return ""
    before, after = was.get("sources", {}), now["sources"]
    count = lambda fingerprint, m: fingerprint.get(m, [0])[0]
    changed = [f"{m}: {count(after, m)} samples, as many as in that run but not all the same"
               if count(after, m) == count(before, m)
               else f"{m}: {count(after, m)} samples, {count(before, m)} in that run"
               for m in sorted(set(before) | set(after)) if before.get(m) != after.get(m)]
    if changed:
        return ("resuming on other data than the checkpoint's run trained on (" + "; ".join(changed) + "): from here "
                "the steps read other rows than that run planned (to go on with that run, resume with its data)")
    return ("resuming on the checkpoint's data, but its steps are planned otherwise here (a checkpoint of another "
            "version of train.py?): from here the steps read other rows than that run planned")


# ---------------------------------------------------------------------------------------------------------------------
# Where a stage starts: the weights it starts from, and the tokenizer it trains with

def start_weights(stage: int, tc: TrainConfig) -> list:
    """Where a stage starts: the --init_from paths, or else the stage before's final weights in --out."""
    return listed(tc.init_from) or [os.path.join(tc.out, f"stage{stage - 1}", "model.pt")]


def check_start(stage: int, tc: TrainConfig, cfg: VLConfig):
    """Stop unless the weights a stage (1-3, not resumed) starts from exist, with a way on that can be followed."""
    missing = [p for p in start_weights(stage, tc) if not os.path.exists(p)]
    if not missing:
        if not tc.init_from:  # the stage before's, in --out: for this preset? (--init_from: train.py checks it)
            check_init_preset(start_weights(stage, tc)[0], cfg, stage)
        return
    if tc.init_from:
        raise SystemExit(f"--init_from {', '.join(missing)}: no such file or folder")
    if stage == 1 and cfg.name not in FROM_SCRATCH:
        raise SystemExit(f"stage 1 of {cfg.name!r} starts from pretrained parts: pass --init_from, e.g. a released "
                         "DeepSeek-VL folder (see the README's 'Pretrained parts for training')")
    if stage == 1 and folder_kind(tc.data) == "llava":  # (stage 0 refuses an import as --data: say what it reads)
        raise SystemExit(f"stage 1 starts from stage 0's final weights, but {missing[0]} does not exist: stage 0 "
                         f"trains on prepare_data.py's synthetic corpus, so run --stage 0 with --out {tc.out} and "
                         f"without --data {tc.data} first, or pass --init_from PATH")
    raise SystemExit(f"stage {stage} starts from stage {stage - 1}'s final weights, but {missing[0]} does not exist: "
                     f"run --stage {stage - 1} first, or pass --init_from PATH")


def tokenizer_path(tc: TrainConfig, sources) -> str:
    """--tokenizer, else the tokenizer.json beside the weights a stage starts from (a stage folder, or a released
    model's), else the data's."""
    if tc.tokenizer:
        return tc.tokenizer
    for src in sources:
        folder = src if os.path.isdir(src) else os.path.dirname(src)
        if os.path.exists(os.path.join(folder, "tokenizer.json")):
            return os.path.join(folder, "tokenizer.json")
    return os.path.join(tc.data, "tokenizer.json")


def stage_tokenizer(tc: TrainConfig, cfg: VLConfig, sources) -> Tokenizer:
    """The tokenizer a stage trains with (tokenizer_path's choice among sources), checked against the model."""
    tok_path = tokenizer_path(tc, sources)
    where = (f"prepare_data.py --config {cfg.name} makes one, or pass --tokenizer PATH" if cfg.name in FROM_SCRATCH
             else f"the {cfg.name!r} preset reads DeepSeek-LLM's tokenizer: pass --init_from a released DeepSeek-VL "
                  "folder (its tokenizer.json is used) or --tokenizer PATH")
    preset_vocab = get_config(cfg.name).llm.vocab_size if cfg.name in FROM_SCRATCH else None
    if preset_vocab and cfg.llm.vocab_size != preset_vocab:  # (--llm.vocab_size: no tokenizer made has that size)
        where = (f"prepare_data.py makes the {cfg.name!r} preset's tokenizers with its {preset_vocab} tokens: leave "
                 f"--llm.vocab_size out, or pass --tokenizer PATH, one of {cfg.llm.vocab_size}")
    # The import's own advice only where the data's tokenizer was the one looked for (not --tokenizer's, nor the one
    # beside the starting weights). (prepare_data.py refuses to build a corpus over an import.)
    if (cfg.name in FROM_SCRATCH and tok_path == os.path.join(tc.data, "tokenizer.json")
            and folder_kind(tc.data) == "llava"):
        where = (f"{tc.data} is a LLaVA import, which has none: pass --tokenizer PATH, the one the weights were "
                 f"trained with (the synthetic corpus's, e.g. {default_folder(cfg.name)}/tokenizer.json)")
    if not os.path.isfile(tok_path):
        raise SystemExit(f"no tokenizer at {tok_path}; {where}")
    try:
        tok = read_tokenizer(tok_path)  # (as sample.py reads it: <image_placeholder> added to a released one without)
        check_tokenizer_fits(tok, cfg, tok_path, exact=cfg.name in FROM_SCRATCH)
    except ValueError as e:
        raise SystemExit(f"{e}; {where}") from None
    return tok


def tokenizer_sources(stage: int, tc: TrainConfig, out_dir: str, resumed: bool):
    """Where stage_tokenizer looks for the stage's tokenizer: a resumed stage's own folder, else the weights it starts
    from (stage 0: none). None when a resumed stage's tokenizer.json, written as it began, is gone and no --tokenizer
    is given (the data's may be another)."""
    if resumed and not tc.tokenizer and not os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        return None
    return [out_dir] if resumed else start_weights(stage, tc) if stage > 0 else []


def checked_tokenizer(stage: int, tc: TrainConfig, cfg: VLConfig, out_dir: str, state, init: list, say) -> Tokenizer:
    """The tokenizer the stage trains with (stage_tokenizer), after checking that it is the one the weights it
    continues were trained with: a resumed stage's (state: its checkpoint), or those it starts from (init). Another of
    the same size would turn the same text into other ids, which the weights read as nonsense without a word."""
    resume = state is not None
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    sources = tokenizer_sources(stage, tc, out_dir, resume)
    if sources is None:
        raise SystemExit(f"{os.path.join(out_dir, 'tokenizer.json')}, written when stage {stage} began, is gone: pass "
                         "--tokenizer PATH, the one the stage trained with, to resume it (it is written back there)")
    tok = stage_tokenizer(tc, cfg, sources)
    # beside: the tokenizer the stage would read without --tokenizer (beside its weights, else the data's). Beside a
    # nanovl stage or a released model it is the one those weights were trained with; beside a vision part it says
    # nothing.
    beside = tokenizer_path(dataclasses.replace(tc, tokenizer=""), sources)
    data_tok = os.path.join(tc.data, "tokenizer.json")
    trained = sources and (resume or is_nanovl_checkpoint(sources[0]) or is_released_folder(sources[0]))
    if tc.tokenizer and trained and beside != data_tok:
        check_same_tokenizer(tok, tc.tokenizer, beside, resume)
    # The fingerprint of the tokenizer the weights were trained with, which this script's checkpoints keep (older
    # ones: None): a tokenizer.json lost or left behind is not replaced by another of the same size unseen.
    # (--init_from may name several parts: each of this script's checkpoints among them is checked)
    marked = [(ckpt_path, state.get("tokenizer"))] if resume else \
        [(path, weights_entry([path], "tokenizer")) for path in init] if stage > 0 else []
    for weights, trained_with in marked:
        try:
            check_trained_with(tok, tokenizer_path(tc, sources), trained_with, weights)
        except ValueError as e:
            raise SystemExit(f"{e} (or pass it as --tokenizer)") from None
    if (not tc.tokenizer and trained and not resume and beside == data_tok
            and not any(trained_with for _, trained_with in marked)):
        say(f"stage {stage}: no tokenizer.json beside {sources[0]}, so it trains with {data_tok}, which must be the "
            "one those weights were trained with (else pass that one as --tokenizer)")
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# A stage's folder: opened (finished, resumed or new), a checkpoint's settings checked, made

def open_stage_folder(stage: int, tc: TrainConfig, cfg: VLConfig, hp: dict, out_dir: str, ckpt_path: str, world: int,
                      say):
    """(finished, state): whether the stage is already done (with --resume), and the checkpoint to continue from
    (None: start from the beginning). A run never writes over another's results unasked: without --resume, a stage
    folder that holds a checkpoint or final weights stops the run before anything is written."""
    if tc.resume and is_finished(out_dir):  # (its model config: checked by train.py, saved_config)
        # and its settings, unless its ckpt.pt was deleted to save space:
        if os.path.exists(ckpt_path):
            resumable_state(ckpt_path, stage, cfg, tc, hp, world, lambda *a: None, finished=True)
        say(f"stage {stage}: already finished")
        return True, None
    refuse_earlier_run(stage, out_dir, tc.resume)
    if tc.resume and not os.path.exists(ckpt_path):
        say(f"stage {stage}: no checkpoint at {ckpt_path}; starting from the beginning")
        return False, None
    return False, resumable_state(ckpt_path, stage, cfg, tc, hp, world, say) if tc.resume else None


# TrainConfig fields a resumed run may change: they say how the run is carried out, not what it computes. Two change
# only the rounding: --device (fp32 on the CPU, bf16 autocast on a GPU; a change of kind is said) and --compile (kernels
# may sum in another order). --data and --extra_data may change because folders move; what they hold is compared
# (data_change). Every other field shapes the batches, the schedule or the optimizer, and a run resumed with another
# value would not continue the one that wrote the checkpoint.
FREE_ON_RESUME = ("stage", "resume", "eval_only", "ckpt", "init_from", "tokenizer", "data", "extra_data", "out",
                  "eval_every", "eval_limit", "eval_split", "ckpt_every", "log_every", "device", "compile", "grad_ckpt",
                  "workers", "image_cache", "stop_after")


def resumable_state(path: str, stage: int, cfg: VLConfig, tc: TrainConfig, hp: dict, world: int, say,
                    finished: bool = False) -> dict:
    """A stage's ckpt.pt, after checking that it can be continued by this run: this stage, this model config
    (read_checkpoint) and the same training settings (each difference is named). hp: the stage's hyperparameters as this
    run resolved them (the defaults filled in), compared with the checkpoint's, so that giving a default explicitly is
    no difference. world: the number of processes of this run; say: print, on the first one. finished: the stage is done
    and only its settings are checked (how its steps were split no longer matters)."""
    state = read_checkpoint(path, stage, cfg, finished)  # (a whole, finite checkpoint of this stage and model)
    if isinstance(state.get("train"), dict):
        resolved = isinstance(state.get("hparams"), dict)  # older checkpoints: the settings as given
        # The learning rate may change: a resume otherwise repeats the same steps bit for bit, so after a loss that
        # became NaN, a lower --lr is the way on from the last good checkpoint.
        if resolved and state["hparams"].get("lr") not in (None, hp["lr"]):
            say(f"stage {stage}: resuming with lr {hp['lr']} where the checkpoint's run had {state['hparams']['lr']}: "
                "from here the run is not the one the checkpoint's settings would give")
        # A stage trained on top of the one before: if that one was trained again since, this one's steps no longer
        # follow from it, however alike the settings (a --resume --stage all after stage 2 was run anew).
        if resolved and hp.get("start") and state["hparams"].get("start") not in (None, hp["start"]):
            raise SystemExit(f"{path} continues a stage that began from other weights than "
                             f"{start_weights(stage, tc)[0]} holds now (trained again since, or another --init_from "
                             "than its run's?): resume with the weights it began from, or remove "
                             f"{os.path.dirname(path)} to train stage {stage} from these")
        # Resumed where its start weights are not to be found (another --out, no --init_from): the checkpoint's
        # record of them goes on into the checkpoints this run writes, or a later resume could not check them.
        if resolved and not hp.get("start") and state["hparams"].get("start"):
            hp["start"] = state["hparams"]["start"]
        free = ("lr", "micro_batch") if stage > 0 or finished else ("lr",)  # (the split of a step: see below)
        # (A setting resolved since the checkpoint was written, absent from its hparams, is compared as given.)
        saved_hp = state["hparams"] if resolved else {}
        # Each difference as (the setting, the checkpoint's value, this run's), named as the flag that sets it.
        differ = [(f"{'--' * (k in HPARAM_FIELDS)}{k}", saved_hp[k], v) for k, v in hp.items()
                  if k in saved_hp and k not in free and saved_hp[k] != v]
        differ += [(f"--{k}", state["train"][k], v) for k, v in dataclasses.asdict(tc).items()
                   if k not in FREE_ON_RESUME and not (k in HPARAM_FIELDS and k in saved_hp) and k in state["train"]
                   and state["train"][k] != v]
        if differ:
            hint = " (to fit in less memory, --grad_ckpt may change on resume)" if resolved and stage == 0 and \
                state["hparams"].get("micro_batch") != hp.get("micro_batch") else ""
            # The checkpoint's values as flags to add to the command (a bool as true or false; an hparam no flag
            # sets, such as the weights the stage began from, is only named).
            as_flag = lambda v: shlex.quote(str(v).lower() if isinstance(v, bool) else str(v))  # (pasted in a shell)
            flags = [f"{k}={as_flag(was)}" for k, was, _ in differ if k.startswith("--")]
            raise SystemExit(f"{path} was written by a run with other training settings:\n  " + "\n  ".join(
                f"{k}: checkpoint {was!r} vs now {now!r}" for k, was, now in differ) +
                f"\npass the same settings to resume it{hint}" + (f": {' '.join(flags)}" if flags else ""))
        # In stages 1-3 a step's batch is planned whole and its loss normalised over the whole step, so the same
        # samples make the same step however they are split into micro-batches and processes (a test checks): a run
        # killed for want of memory resumes with a smaller --micro_batch, or on another number of GPUs. Stage 0
        # counts its contrastive pairs and scenes per micro-batch, so there the split is part of the run.
        was = state.get("split")  # [processes, micro-batch] of the run that wrote it (older checkpoints: none)
        now = None if finished else [world, split_batch(stage, hp, world)[0]]  # (a finished stage: not asked)
        if was and now and was != now:
            if stage == 0:
                raise SystemExit(f"{path} was written by a run of {was[0]} process(es) x micro_batch {was[1]}; this "
                                 f"one would be {now[0]} x {now[1]}. Stage 0 counts its contrastive pairs and scenes "
                                 "per micro-batch, so resume it with the same processes and --micro_batch (to fit in "
                                 "less memory, --grad_ckpt may change on resume)")
            say(f"stage {stage}: resuming with {now[0]} process(es) x micro_batch {now[1]} where the checkpoint's run "
                f"had {was[0]} x {was[1]}: each step takes the same samples, split another way, so its sums round in "
                "another order (the run goes on, but not bit for bit)")
    return state


def make_stage_folder(stage: int, tc: TrainConfig, out_dir: str, tok: Tokenizer, resume: bool, master: bool,
                      world: int):
    """Take --out (its lock, held until the run ends), make the stage folder and write the tokenizer the stage trains
    with into it. Called once every check has passed, so that a run refused before leaves nothing behind."""
    claim_out_folder(tc.out, master, world)
    if master:  # (now that this run holds the folder: a temporary of a live run's save is not stale)
        remove_stale_temporaries(out_dir)
    if not resume:  # another run may have written here since open_stage_folder looked, and ended
        refuse_earlier_run(stage, out_dir, resume=False)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # --out is a file, or holds a file named stage<k>, or may not be written
        raise SystemExit(f"--out {tc.out}: cannot make the folder {out_dir} ({e.strerror}); expected a folder"
                         ) from None
    if master and not os.access(out_dir, os.W_OK):  # (resumed, the first save would find out, steps later)
        raise SystemExit(f"--out {tc.out}: cannot write to {out_dir} (read-only?)")
    saved_tok = os.path.join(out_dir, "tokenizer.json")  # (a resumed stage's is there already)
    if master and not (resume and os.path.isfile(saved_tok)):
        atomic_save(tok.to_json(), saved_tok)  # the folder is all sample.py needs
