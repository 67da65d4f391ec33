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
    an earlier run's results are never written over unasked          refuse_earlier_run
    the weights were made for this model config (preset, overrides)  check_same_config, config_flags, check_init_preset
    a checkpoint is a whole, finite training state of this stage     read_checkpoint
    the tokenizer is the one the weights were trained with           check_same_tokenizer (and checkpoint.py's
                                                                     check_trained_with, by fingerprint)
    the data a resumed run reads is the data its checkpoint planned  data_change (said, not refused)
Whether a checkpoint's training settings are this run's is train.py's resumable_state, which knows the settings.
"""

import os

import torch

from nanovl.checkpoint import (check_finite, check_keys, check_weights, is_released_folder, load_plain, nanovl_state,
                               read_tokenizer)
from nanovl.config import PRESETS, VLConfig, get_config
from nanovl.model import DeepSeekVL
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
    settings is train.py's to check (resumable_state). finished: the stage is done, and only its settings will be
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
