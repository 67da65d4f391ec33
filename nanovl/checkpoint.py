"""
Weights in and out: nanovl's own checkpoints, the released DeepSeek-VL model folders, and pretrained parts.

    load_model(path)                 a nanovl stage folder (or its model.pt) or a released model folder (or one in
                                     transformers' own layout: HF_PORT_NAMES)
                                     -> (model, tokenizer, image processor), ready for sample.py
    load_released(folder)            the released layout (facts sheet sections 6-8):
                                        config.json                  vision_config / aligner_config / language_config
                                        model.safetensors            or model-0000k-of-0000n.safetensors + index.json
                                        tokenizer.json, tokenizer_config.json, preprocessor_config.json
    export_released(model, tok, dir) a nanovl model -> that same layout; load_released reads it back exactly
    init_from_parts(model, paths)    pretrained parts for training, as the paper did: the towers (SigLIP; SAM too,
                                     from a hybrid one) and the language model of a released folder, SAM-B's original
                                     checkpoint, a timm SigLIP, an HF Llama

How the released keys map onto ours is the six-line RELEASED_PREFIXES table in model.py. Dimensions come from the
folder's config.json, never from a preset, so scaled-down checkpoints in the released layout load too.

Nothing is ever half-loaded. The model is first built on the "meta" device (shapes only, no memory, no random
init), every key and shape is checked against the file's, and only then are the tensors attached. A missing,
unexpected or misshapen key is an error that lists them all, and so is a tensor that is not floating point or that
holds NaN or infinite values; keys the official model builds but never reads are skipped by name (RELEASED_UNUSED in
model.py).
"""

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from nanovl.config import (CLIP_MEAN, CLIP_STD, FROM_SCRATCH, SIGLIP_MEAN, SIGLIP_STD, AlignerConfig, LlamaConfig,
                           SAMConfig, SigLIPConfig, VLConfig)
from nanovl.image import ImageProcessor
from nanovl.model import DeepSeekVL, nanovl_to_released, released_to_nanovl
from nanovl.runs import denied, uninterrupted
from nanovl.safetensors import INDEX_NAME, SINGLE_NAME, load_file, load_sharded, save_sharded
from nanovl.tokenizer import BOS, EOS, IMAGE, Tokenizer

# The towers the released configs name by `model_name` (official clip_encoder.py / sam.py), in nanovl's fields.
SIGLIP_MODELS = {"siglip_large_patch16_384": dict(patch_size=16, width=1024, depth=24, n_heads=16, mlp_ratio=4.0)}
SAM_MODELS = {"sam_b_downsample": dict(patch_size=16, width=768, depth=12, n_heads=12, mlp_ratio=4.0, window_size=14,
                                       global_blocks=(2, 5, 8, 11), neck_dim=256, downsample_dims=(512, 1024))}
# What transformers' LlamaConfig assumes for a field the released `language_config` leaves out (facts section 6: the
# 7B's language_config gives only the layer count, the vocabulary and max_position_embeddings 16384; the rest are
# these defaults).
HF_LLAMA_DEFAULTS = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6)
TRAINED_CONTEXT = 4096  # the released models were trained on 4096-token sequences (official README)
EXPORTED_BY = {"exported_by": "nanovl"}  # in an export's config.json: what tells an earlier export from a look-alike


def _shorten(items, n: int = 12) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------------------------------
# config.json <-> VLConfig

def _number(value, where: str, kind=int):
    """A positive integer (or, kind=float, number) field of config.json, or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or (kind is int and not float(value).is_integer()):
        raise ValueError(f"{where} = {value!r}, expected a positive " +
                         ("integer" if kind is int else "number"))
    return kind(value)


def _tower_config(params: dict, known: dict, cls, where: str):
    """One `vision_config` tower entry -> SigLIPConfig or SAMConfig. Dimensions come from `model_name` for the
    released towers, or from the explicit "nanovl" entry that export_released writes for scaled-down ones."""
    if not isinstance(params, dict):
        raise ValueError(f"{where} = {params!r}, expected an object")
    name = params.get("model_name")
    dims = params.get("nanovl") or (known.get(name) if isinstance(name, str) else None)
    if dims is not None and (not isinstance(dims, dict) or set(dims) != set(next(iter(known.values())))):
        raise ValueError(f"{where}.nanovl = {dims!r}, expected an object of "
                         f"{sorted(next(iter(known.values())))}")
    if dims is None:
        raise ValueError(f"{where}: unknown vision tower model_name {name!r}; nanovl knows {sorted(known)} (or give "
                         f"the dimensions in a 'nanovl' entry, as export_released writes)")
    # SigLIP's select_layer cuts the tower at build time (-1 keeps all its blocks); left out of the file, it takes
    # CLIPVisionTower's default, -2, one block fewer. Its select_feature the official build_vision_tower sets to
    # "same" whatever the file says; we refuse another value rather than ignore it (stricter than the official code,
    # and no released file has one). SAM's tower ignores select_layer (facts section 1); its select_feature is
    # applied by the official feature_select to SAM's (B, C, H, W) output, where "same" (every released file's) and
    # "cls_patch" change nothing. The facts sheet calls both fields ignored for SAM; we accept any value there, as it
    # says (the official code's "patch", its default when the field is absent, would cut a channel off).
    if cls is SigLIPConfig and (params.get("select_layer", -2) != -1 or params.get("select_feature", "same") != "same"):
        raise ValueError(f"{where}: select_layer {params.get('select_layer', '(absent: -2)')} / select_feature "
                         f"{params.get('select_feature')!r} are not supported (the released models use -1 / 'same')")
    stats = {k: params.get(k) for k in ("pixel_mean", "pixel_std")}
    for k, v in stats.items():
        if v is not None and not (isinstance(v, list) and len(v) == 3):
            raise ValueError(f"{where}.{k} = {v!r}, expected 3 numbers (or null: no normalising)")
    stats = {k: None if v is None else tuple(v) for k, v in stats.items()}
    dims = {k: tuple(v) if isinstance(v, list) else v for k, v in dims.items()}
    return cls(image_size=_number(params.get("image_size"), f"{where}.image_size"), **dims, **stats)


def released_config(d: dict, image_token_id: int, name: str = "released") -> VLConfig:
    """A released config.json (as a dict) -> VLConfig. Raises ValueError on anything nanovl does not implement."""
    try:
        vision, aligner, lang = d["vision_config"], d["aligner_config"]["params"], dict(d["language_config"])
        cls, params = vision.get("cls"), vision.get("params", {})
        if not (isinstance(aligner, dict) and isinstance(params, dict)):
            raise TypeError
    except (KeyError, TypeError, ValueError, AttributeError):
        has = {k: type(v).__name__ for k, v in d.items()} if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"a DeepSeek-VL config needs vision_config (with params), "
                         f"aligner_config.params and language_config, each an object; it has {has}") from None
    if cls == "CLIPVisionTower":  # 1.3B: SigLIP only
        siglip, sam = _tower_config(params, SIGLIP_MODELS, SigLIPConfig, "vision_config"), None
    elif cls == "HybridVisionTower":  # 7B: SAM-B (high) + SigLIP-L (low), fused by the aligner
        if params.get("concat_type", "tuple") != "tuple":
            raise ValueError(f"vision_config: concat_type {params['concat_type']!r} is not supported; the released "
                             "7B uses 'tuple' (the aligner fuses the two branches)")
        siglip = _tower_config(params.get("low_res_cfg"), SIGLIP_MODELS, SigLIPConfig, "vision_config.low_res_cfg")
        sam = _tower_config(params.get("high_res_cfg"), SAM_MODELS, SAMConfig, "vision_config.high_res_cfg")
    else:
        raise ValueError(f"vision_config.cls {cls!r} is not supported: expected CLIPVisionTower (1.3B) or "
                         "HybridVisionTower (7B)")

    rope = lang.get("rope_parameters")
    if isinstance(rope, dict):  # transformers 5 nests RoPE's settings (a port, or a released config saved again by it),
        kind = rope.get("rope_type", rope.get("type", "default"))  # and reads them as it does: they win over a
        if kind != "default":  # top-level rope_theta, "type" is the older name of "rope_type"
            raise ValueError(f"language_config (a port's text_config): rope_parameters.rope_type {kind!r} is not "
                             "supported (DeepSeek-VL's decoder uses plain RoPE, 'default')")
        if "rope_theta" in rope:
            lang["rope_theta"] = rope["rope_theta"]
    for key, want in (("model_type", "llama"), ("hidden_act", "silu"), ("tie_word_embeddings", False),
                      ("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False)):
        if key in lang and lang[key] != want:
            raise ValueError(f"language_config: {key} = {lang[key]!r} is not supported (DeepSeek-VL's decoder has "
                             f"{want!r})")
    get = lambda key, kind=int: _number(lang.get(key, HF_LLAMA_DEFAULTS.get(key)), f"language_config.{key}", kind)
    n_heads = get("num_attention_heads")
    dim = get("hidden_size")
    if lang.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"language_config: head_dim {lang['head_dim']} is not hidden_size / num_attention_heads")
    llm = LlamaConfig(vocab_size=get("vocab_size"), dim=dim, n_layers=get("num_hidden_layers"), n_heads=n_heads,
                      n_kv_heads=_number(lang.get("num_key_value_heads") or n_heads,
                                         "language_config.num_key_value_heads"),
                      ffn_dim=get("intermediate_size"),
                      # RoPE would run to max_position_embeddings (16384 released), but the models were trained at
                      # 4096, so that is the context we allow unless the file says less. A nanovl export writes the
                      # context its model was trained with, which is taken as it is.
                      max_seq_len=get("max_position_embeddings") if EXPORTED_BY.items() <= d.items() else
                      min(get("max_position_embeddings"), TRAINED_CONTEXT),
                      rope_theta=get("rope_theta", float), norm_eps=get("rms_norm_eps", float))
    cfg = VLConfig(name=name, siglip=siglip, sam=sam, llm=llm, image_token_id=image_token_id,
                   aligner=AlignerConfig(aligner.get("projector_type", "mlp_gelu"),
                                         _number(aligner.get("depth", 1), "aligner_config.params.depth")))
    cfg.validate()
    # The official MlpProjector has one input_dim, which its hybrid type gives both up-projections (SAM's and SigLIP's).
    for key, want, whose in (("input_dim", siglip.width, "SigLIP's width"),
                             ("n_embed", llm.dim, "language_config.hidden_size")
                             ) + ((("input_dim", sam.out_dim, "SAM's output width"),) if sam is not None else ()):
        if key in aligner and aligner[key] != want:
            raise ValueError(f"aligner_config: {key} = {aligner[key]} but {whose} is {want}")
    return cfg


def _tower_params(tower, known: dict) -> dict:
    """A vision tower's params block of the released config.json: its official model_name when its dimensions are a
    released tower's (known: {model_name: dimensions}), else a nanovl name and the dimensions themselves."""
    dims = {k: getattr(tower, k) for k in next(iter(known.values()))}
    name = next((n for n, d in known.items() if d == dims), None)
    params = {"model_name": name or f"nanovl_{type(tower).__name__.lower()}", "image_size": tower.image_size,
              "select_feature": "same", "select_layer": -1, "ckpt_path": "",
              "pixel_mean": tower.pixel_mean and list(tower.pixel_mean),
              "pixel_std": tower.pixel_std and list(tower.pixel_std)}
    if name is None:  # not a released tower: say its dimensions, which the official model_name cannot
        params["nanovl"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dims.items()}
    return params


def released_config_dict(cfg: VLConfig) -> dict:
    """VLConfig -> the released config.json layout (facts section 6)."""
    if cfg.hybrid and cfg.sam.out_dim != cfg.siglip.width:
        raise ValueError(f"SAM's output width {cfg.sam.out_dim} differs from SigLIP's {cfg.siglip.width}: the released "
                         "layout's aligner has one input_dim for both branches, so it cannot hold this model")
    if cfg.hybrid:
        low, high = _tower_params(cfg.siglip, SIGLIP_MODELS), _tower_params(cfg.sam, SAM_MODELS)
        low["output_dim"], high["output_dim"] = cfg.siglip.width, cfg.sam.out_dim
        vision = {"cls": "HybridVisionTower", "model_type": "vision",
                  "params": {"concat_type": "tuple", "freeze_high": True, "freeze_low": True,
                             "high_res_cfg": high, "low_res_cfg": low}}
    else:
        vision = {"cls": "CLIPVisionTower", "model_type": "vision", "params": _tower_params(cfg.siglip, SIGLIP_MODELS)}
    l = cfg.llm
    return {
        "model_type": "multi_modality", "architectures": ["MultiModalityCausalLM"],
        "vision_config": vision,
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"projector_type": cfg.aligner.projector_type, "depth": cfg.aligner.depth,
                                      "input_dim": cfg.siglip.width, "n_embed": l.dim}},
        "language_config": {"model_type": "llama", "hidden_size": l.dim, "intermediate_size": l.ffn_dim,
                            "num_hidden_layers": l.n_layers, "num_attention_heads": l.n_heads,
                            "num_key_value_heads": l.n_kv_heads, "vocab_size": l.vocab_size,
                            "max_position_embeddings": l.max_seq_len, "rope_theta": l.rope_theta,
                            "rms_norm_eps": l.norm_eps, "hidden_act": "silu", "tie_word_embeddings": False},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Attaching a checked state dict to a model built on "meta"

def not_float(state: dict) -> list:
    """"key: dtype" for each tensor that is not floating point (quantised weights, say, or a safetensors header
    relabelled to int32): every weight here is a float, and copying an integer into one would silently convert it."""
    return [f"{k}: {str(v.dtype).replace('torch.', '')}" for k, v in sorted(state.items()) if not v.is_floating_point()]


def check_weights(state: dict, source: str):
    """A ValueError unless every tensor is floating point (not_float) and finite (check_finite): for a state dict
    loaded whole, where no key check folds the dtypes into its own list of problems."""
    ints = not_float(state)
    if ints:
        raise ValueError(f"{source}: {len(ints)} not floating-point: {_shorten(ints, 6)}")
    check_finite(state, source)


def check_finite(state: dict, source: str):
    """A ValueError naming the floating-point tensors that hold NaN or infinite values, with how many each holds:
    loaded, they would only show later as NaN logits or a NaN loss, with no word of where they came from. One tensor
    at a time, and first by its sum, which one NaN or inf makes NaN or inf: one pass and no mask, 0.09 s for 50M
    bf16 values on 2 cores against 0.26 s for isfinite, so about 13 s for the 7B's 6.9B there (finite values whose
    fp32 sum overflows are counted exactly, and pass)."""
    bad = []
    for k, v in state.items():
        if not v.is_floating_point() or torch.isfinite(v.sum(dtype=torch.float32)):
            continue
        if v.element_size() == 1:
            v = v.half()  # torch has no isfinite for float8_e4m3fn; float16 holds every float8 value exactly
        n_bad = v.numel() - int(torch.isfinite(v).sum())
        if n_bad:
            bad.append(f"{k} ({n_bad:,} of {v.numel():,})")
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensor{'s hold' if len(bad) > 1 else ' holds'} NaN or infinite "
                         f"values: {_shorten(bad, 4)}; the file is damaged or was saved from a diverged run")


def check_keys(expected: dict, state: dict, source: str):
    """Raise one ValueError listing every missing, unexpected and misshapen key."""
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k])}"
              for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k])]
    ints = not_float({k: state[k] for k in set(state) & set(expected)})
    problems = [f"{len(ints)} not floating-point: {_shorten(ints, 6)}"] if ints else []
    if missing:
        problems.append(f"{len(missing)} missing: {_shorten(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_shorten(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} with the wrong shape: {_shorten(shapes, 6)}")
    if problems:
        raise ValueError(f"{source} does not match the model it describes (keys in nanovl's names):\n  " +
                         "\n  ".join(problems))


def build_loaded(cfg: VLConfig, state: dict, source: str, device="cpu", dtype=None) -> DeepSeekVL:
    """A model holding exactly `state` (nanovl names). Built on "meta" first: nothing is allocated or randomly
    initialised for weights that are about to be replaced, and a mismatch fails before anything is attached."""
    with torch.device("meta"):
        model = DeepSeekVL(cfg)
    check_keys({k: v.shape for k, v in model.state_dict().items()}, state, source)
    check_finite(state, source)
    if dtype is None:  # the file's dtype; where it mixes several, one that holds each exactly (fp32, or fp64)
        dtypes = {v.dtype for v in state.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64 if torch.float64 in dtypes else torch.float32
    # Read memory-mapped, a tensor already of this dtype would stay a view of the file's pages: a file written over in
    # place (torch.save to the same path, after fine-tuning) then changed the weights under the model, or crashed the
    # process (a bus error) and left the file cut short. On the CPU each is copied; a move to a GPU copies anyway.
    on_cpu = torch.device(device).type == "cpu"
    state = {k: v.to(dtype, copy=on_cpu) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)  # (assign: a model on "meta" has no memory to copy into;
    # the file's tensors become its parameters)
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------------------------------
# What both kinds of checkpoint (released folders, nanovl's) are checked with: the tokenizer that drives the
# model, the device and dtype asked for

def read_tokenizer(path) -> Tokenizer:
    """Tokenizer.load(path) (a tokenizer.json, or a folder holding one) as a model reads it: with <image_placeholder>
    added as a special token where it lacks one, as the official VLChatProcessor adds it (facts section 9), at the
    next id (100015, after DeepSeek-LLM's added tokens 100000-100014). Every tokenizer that drives a model is read so
    (load_model, train.py's stages, the checks that compare two), so a released tokenizer.json without it reads as the
    same tokenizer everywhere. (Ours all have it: for them this is Tokenizer.load.)"""
    return Tokenizer.load(path).with_special_token(IMAGE)


def pick_tokenizer(folder: Path, given=None) -> tuple:
    """(Tokenizer, its path): the tokenizer.json saved beside the weights in folder, or the one given (a file, or a
    folder holding one) for weights without one. Where both exist they must be the same tokenizer: another, even
    of the same size, turns the same text into other ids, and the model reads them as nonsense without a word."""
    saved = folder / "tokenizer.json"
    if not given:
        if not saved.is_file():
            raise FileNotFoundError(f"no tokenizer at {saved}: pass --tokenizer (load_model's tokenizer=; e.g. "
                                    "data/tokenizer.json)")
        return read_tokenizer(saved), saved
    given = Path(given) / "tokenizer.json" if Path(given).is_dir() else Path(given)
    if not given.is_file():
        raise FileNotFoundError(f"no tokenizer at {given}, the --tokenizer given")
    tok = read_tokenizer(given)
    if saved.is_file() and given.resolve() != saved.resolve() and not tok.same_ids(read_tokenizer(saved)):
        raise ValueError(f"--tokenizer {given} differs from {saved}, the tokenizer saved with the weights: the same "
                         "text would become other ids. Leave --tokenizer out to use the saved one")
    return tok, given


def check_trained_with(tok: Tokenizer, tok_path, fingerprint, weights):
    """A ValueError unless tok is the tokenizer the weights were trained with, by the fingerprint train.py keeps in
    model.pt and ckpt.pt (since 2026-12-03; None for older files and other sources: nothing to compare). A
    tokenizer.json beside the weights is compared whole (pick_tokenizer); this catches another one given for weights
    that travel alone, such as the data folder's after prepare_data.py made it anew."""
    if fingerprint is not None and tok.fingerprint() != fingerprint:
        raise ValueError(f"{tok_path} is not the tokenizer {weights} was trained with (fingerprints "
                         f"{tok.fingerprint()} and {fingerprint}), though it fits the model: the same text would "
                         "become other ids, which the model reads as nonsense. Use the tokenizer.json the run wrote in "
                         "their stage folder")


def check_tokenizer_fits(tok: Tokenizer, cfg: VLConfig, where, exact: bool = False):
    """A ValueError unless the tokenizer (read from `where`) can drive the model: every id it makes needs an embedding
    row, and its <image_placeholder> must be the id the model replaces with image features. A released tokenizer may
    be smaller than the padded embedding (100016 ids for 102400 rows); `exact` asks for the same size, as a tokenizer
    that prepare_data.py made for a scratch preset has."""
    if tok.vocab_size > cfg.llm.vocab_size or (exact and tok.vocab_size != cfg.llm.vocab_size) \
            or tok.image_id != cfg.image_token_id:
        raise ValueError(f"{where} has {tok.vocab_size} tokens and <image_placeholder> = {tok.image_id}; the "
                         f"{cfg.name!r} model has a vocabulary of {cfg.llm.vocab_size} "
                         f"and expects {cfg.image_token_id}")


def check_device(device: str):
    """A ValueError for a device torch does not know or cannot see, before anything is read. (The scripts' --device
    comes here, as does load_model's device=: the messages name the value, which reads right after either.)"""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"device {str(device)!r} is not a device torch knows: cpu, cuda, cuda:1, ...") from None
    if kind == "meta":
        raise ValueError("device 'meta' holds shapes but no values: nothing could run on it; use cpu or cuda")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}, but torch sees no CUDA device")
    try:
        torch.empty(0, device=device)  # a known device may still be absent here (mps off a Mac, cuda:3 of 1 GPU)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).splitlines()[0].split(". ")[0]
        raise ValueError(f"device {str(device)!r} cannot be used here: {reason}") from None


def check_dtype(dtype, allowed=(torch.float32, torch.bfloat16, torch.float16, torch.float64)):
    """A ValueError unless dtype is None (keep the weights' own) or one of the floating-point torch dtypes allowed:
    a string ("bf16") would otherwise be read as a device, and an integer dtype would round every weight."""
    if dtype is not None and dtype not in allowed:
        raise ValueError(f"dtype {dtype!r}: expected None (the weights' own) or one of " +
                         ", ".join(map(str, allowed)))


# ---------------------------------------------------------------------------------------------------------------------
# Released folders

def check_prompt_settings(folder: Path, cfg: VLConfig):
    """The settings of a released folder that shape the prompt, where it has their files, checked against what nanovl
    does (nanovl.chat renders prompts as the official processor does with the released values): processor_config.json
    (VLChatProcessor's) and tokenizer_config.json. A value that would give other token ids is refused, by name; the
    released files hold the values nanovl follows (facts section 6), so this only ever meets an edited folder."""
    path = folder / "processor_config.json"
    settings = _read_json(path, "") if path.is_file() else {}
    want = {"image_tag": IMAGE, "num_image_tokens": cfg.n_image_tokens, "add_special_token": False,
            "sft_format": "deepseek"}
    wrong = [f"{k} {settings[k]!r}, where nanovl uses {v!r}" for k, v in want.items() if k in settings and
             settings[k] != v]
    if wrong:
        raise ValueError(f"{path}: {'; '.join(wrong)}: nanovl renders prompts as the released processor does, with "
                         "these values only")
    path = folder / "tokenizer_config.json"
    settings = _read_json(path, "") if path.is_file() else {}
    if settings.get("add_bos_token") is False:  # (nanovl.chat begins every prompt with BOS, as the released one does)
        raise ValueError(f"{path}: add_bos_token false, but nanovl begins every prompt with {BOS}, as the released "
                         "tokenizer's add_bos_token true has the official processor do")
    if settings.get("clean_up_tokenization_spaces") is True:  # (display only: the ids are the same)
        warnings.warn(f"{path} asks for clean_up_tokenization_spaces, which nanovl does not apply: its answers may "
                      "show a space before punctuation where transformers' decode would remove it (the ids are the same)")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a released DeepSeek-VL folder holds {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):  # (its fields are read with .get)
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected an object of settings")
    return data


# transformers' own port of DeepSeek-VL (its DeepseekVLForConditionalGeneration and
# DeepseekVLHybridForConditionalGeneration; the conversions on the Hub that its documentation loads) holds the release's
# weights under other names, SigLIP's q, k and v apart, and another config.json. Translated back to the release's
# layout, such a folder loads as a released one: the same model, the same outputs.
HF_PORT_KINDS = ("deepseek_vl", "deepseek_vl_hybrid")
SAM_ENC = r"model\.high_res_vision_model\.vision_encoder\."
NECK = (("conv1", 0), ("layer_norm1", 1), ("conv2", 2), ("layer_norm2", 3))  # HF's SamVisionNeck: the release's neck.i
HF_PORT_NAMES = (  # (a name in the port, ours), tried in order; None: a tensor the model never uses
    (r"model\.vision_model\.embeddings\.patch_embedding\.", "siglip.patch_embed.proj."),
    (r"model\.vision_model\.embeddings\.position_embedding\.weight$", "siglip.pos_embed"),  # (N, C): ours (1, N, C)
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.", r"siglip.blocks.\1.norm\2."),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"siglip.blocks.\1.attn.qkv.\2."),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"siglip.blocks.\1.attn.proj."),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"siglip.blocks.\1.mlp."),  # fc1, fc2
    (r"model\.vision_model\.post_layernorm\.", "siglip.norm."),
    (r"model\.vision_model\.head\.", None),  # SigLIP's attention-pooling head (the release's attn_pool)
    (SAM_ENC + r"patch_embed\.projection\.", "sam.patch_embed.proj."),
    (SAM_ENC + r"pos_embed$", "sam.pos_embed"),
    (SAM_ENC + r"layers\.(\d+)\.layer_norm([12])\.", r"sam.blocks.\1.norm\2."),
    (SAM_ENC + r"layers\.(\d+)\.", r"sam.blocks.\1."),  # attn.qkv, attn.proj, attn.rel_pos_h/w, mlp.lin1/2
    *((SAM_ENC + rf"neck\.{part}\.", f"sam.neck.{i}.") for part, i in NECK),
    *((rf"model\.high_res_vision_neck\.{part}\.", f"sam.neck_hd.{i}.") for part, i in NECK),
    (r"model\.high_res_vision_proj\.conv1\.", "sam.downsamples.0."),
    (r"model\.high_res_vision_proj\.conv2\.", "sam.downsamples.1."),
    (r"model\.high_res_vision_alpha$", "sam.hd_alpha_downsamples"),
    (r"model\.aligner\.linear1\.", "aligner.layers.0."),  # mlp_gelu (1.3B): Linear, GELU, Linear
    (r"model\.aligner\.linear2\.", "aligner.layers.2."),
    (r"model\.aligner\.high_res_vision_proj\.", "aligner.high_up_proj."),  # the hybrid aligner (7B)
    (r"model\.aligner\.vision_proj\.", "aligner.low_up_proj."),
    (r"model\.aligner\.proj\.", "aligner.layers.1."),
    (r"lm_head\.", "llm.lm_head."),
    (r"model\.language_model\.", "llm."),
)


def is_hf_port(config: dict) -> bool:
    return config.get("model_type") in HF_PORT_KINDS


def hf_port_config(config: dict, where) -> dict:
    """A port's config.json -> the release's (what released_config reads). The port's holds the decoder's settings
    (text_config) and the towers' sizes; what the release's says beside them is the same for every DeepSeek-VL:
    SigLIP's and SAM's in-tower statistics for the hybrid (the 1.3B normalises in its processor), and the aligners."""
    hybrid = config["model_type"] == "deepseek_vl_hybrid"
    text, vision, high = (config.get(k) for k in ("text_config", "vision_config", "high_res_vision_config"))
    if not (isinstance(text, dict) and isinstance(vision, dict) and (isinstance(high, dict) or not hybrid)):
        raise ValueError(f"{where}: config.json of model_type {config['model_type']!r} needs text_config and "
                         f"vision_config{' and high_res_vision_config' if hybrid else ''}, each an object")
    try:
        siglip = {"model_name": "siglip (transformers' port)", "image_size": vision["image_size"],
                  "select_layer": -1, "select_feature": "same",
                  "nanovl": dict(patch_size=vision["patch_size"], width=vision["hidden_size"],
                                 depth=vision["num_hidden_layers"], n_heads=vision["num_attention_heads"],
                                 mlp_ratio=vision["intermediate_size"] / vision["hidden_size"]),
                  "pixel_mean": list(SIGLIP_MEAN) if hybrid else None,
                  "pixel_std": list(SIGLIP_STD) if hybrid else None}
        if hybrid:  # HF's SAM projection: two convs to 2x and 4x the neck's width (the release: 512, 1024)
            sam = {"model_name": "sam (transformers' port)", "image_size": high["image_size"],
                   "nanovl": dict(patch_size=high["patch_size"], width=high["hidden_size"],
                                  depth=high["num_hidden_layers"], n_heads=high["num_attention_heads"],
                                  mlp_ratio=high["mlp_ratio"], window_size=high["window_size"],
                                  global_blocks=list(high["global_attn_indexes"]), neck_dim=high["output_channels"],
                                  downsample_dims=[2 * high["output_channels"], 4 * high["output_channels"]]),
                   "pixel_mean": list(CLIP_MEAN), "pixel_std": list(CLIP_STD)}
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{where}: config.json's vision_config{' or high_res_vision_config' if hybrid else ''} "
                         f"lacks a usable {e}") from None
    lang = dict(text)  # (its rope_parameters, which transformers 5 writes, are read by released_config)
    return {"vision_config": {"cls": "HybridVisionTower", "params": {"high_res_cfg": sam, "low_res_cfg": siglip}}
            if hybrid else {"cls": "CLIPVisionTower", "params": siglip},
            "aligner_config": {"params": {"projector_type": "low_high_hybrid_split_mlp_gelu" if hybrid else "mlp_gelu",
                                          "depth": 2}},
            "language_config": lang, "image_token_id": config.get("image_token_id")}


def hf_port_tensors(tensors: dict, hybrid: bool, where) -> dict:
    """A port's tensors -> the same tensors by the release's names (SigLIP's q, k, v stacked back into qkv)."""
    out, parts, unknown = {}, {}, []
    for key, tensor in tensors.items():
        pattern, ours = next(((p, o) for p, o in HF_PORT_NAMES if re.match(p, key)), (None, "?"))
        if pattern is None:
            unknown.append(key)
            continue
        if ours is None:
            continue
        ours = re.sub(pattern, ours, key, count=1)
        if ours.startswith("siglip.") and ".attn.qkv." in ours:  # siglip.blocks.N.attn.qkv.{q,k,v}.weight
            head, which, leaf = ours.rsplit(".", 2)
            parts.setdefault(f"{head}.{leaf}", {})[which] = tensor
            continue
        out[nanovl_to_released(ours, hybrid)] = tensor[None] if ours == "siglip.pos_embed" else tensor
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} tensors that transformers' DeepSeek-VL does not name so: "
                         f"{_shorten(unknown)}")
    if "lm_head.weight" not in tensors and "model.language_model.embed_tokens.weight" in tensors:
        # transformers ties the output head to the input embedding unless config.json says tie_word_embeddings
        # false (its DeepSeek-VL config defaults to true), and then saves no head: the released models have one of
        # their own, so such a folder cannot give their outputs.
        raise ValueError(f"{where}: no lm_head.weight: its config.json ties the output head to the input embedding "
                         "(tie_word_embeddings true, transformers' default for DeepSeek-VL), where the released models "
                         f"have a head of their own; fetch deepseek-ai/deepseek-vl-{'7b' if hybrid else '1.3b'}-chat "
                         "instead")
    for name, qkv in parts.items():
        if set(qkv) != set("qkv"):
            raise ValueError(f"{where}: {name} has only {sorted(qkv)} of q, k and v")
        out[nanovl_to_released(name, hybrid)] = torch.cat([qkv[c] for c in "qkv"])
    return out


def is_released_folder(path) -> bool:
    """A folder of safetensors weights (nanovl's own checkpoints are model.pt files)."""
    path = Path(path)
    return (path / SINGLE_NAME).is_file() or (path / INDEX_NAME).is_file()


def load_released(folder, device="cpu", dtype=None, tokenizer=None, before_weights=None):
    """A released DeepSeek-VL folder -> (model, tokenizer, processor), without transformers or safetensors; or one
    in transformers' layout (its port: HF_PORT_NAMES), read as the release it was converted from. tokenizer: a
    tokenizer.json for a folder without one (see pick_tokenizer). before_weights: as load_model's."""
    folder = Path(folder)
    config = _read_json(folder / "config.json", "config.json with vision_config, aligner_config and language_config")
    port = is_hf_port(config)
    if port:
        config = hf_port_config(config, folder)
    tok, tok_path = pick_tokenizer(folder, tokenizer)  # (with <image_placeholder>, as the official processor adds it)
    if port and config["image_token_id"] not in (None, tok.image_id):
        raise ValueError(f"{folder}/config.json: image_token_id {config['image_token_id']}, but {tok_path} puts "
                         f"<image_placeholder> at {tok.image_id}")
    try:
        cfg = released_config(config, tok.image_id, name=folder.name)  # (pick_tokenizer saw that it has one)
    except ValueError as e:  # (released_config reads a dict: the file is named here)
        raise ValueError(f"{folder / 'config.json'}: {e}") from None
    check_tokenizer_fits(tok, cfg, tok_path)
    check_prompt_settings(folder, cfg)
    if before_weights is not None:
        before_weights(cfg, tok)
    tensors = load_sharded(folder)
    if port:
        tensors = hf_port_tensors(tensors, cfg.hybrid, folder)
    state, unknown = {}, []
    for key, tensor in tensors.items():
        try:
            ours = released_to_nanovl(key)  # (None: a key the official model builds but never reads, RELEASED_UNUSED)
        except ValueError:
            unknown.append(key)
            continue
        if ours is not None:
            state[ours] = tensor
    if unknown:
        raise ValueError(f"{folder}: {len(unknown)} keys that are not DeepSeek-VL's: {_shorten(unknown)}")
    model = build_loaded(cfg, state, f"{folder}", device, dtype)
    pre = folder / "preprocessor_config.json"
    # (a port's preprocessor_config.json is transformers' processor, which makes the low-resolution input its own
    # way (facts sheet section 13): the official processor stands in for it)
    proc = ImageProcessor.from_dict(_read_json(pre, "the image processor")) if pre.exists() and not port \
        else ImageProcessor.for_config(cfg)
    if proc.image_size != cfg.image_size:
        raise ValueError(f"{pre}: image_size {proc.image_size} but the vision tower reads {cfg.image_size}")
    # Either the processor normalises the pixels (the 1.3B) or the towers do, each its own way (the hybrid 7B).
    # Both, or neither, is what the official code would do with such a file too: kept, but said.
    in_tower = cfg.siglip.pixel_mean is not None
    if proc.normalize == in_tower:
        tower, result = ("normalises", "the pixels are normalised twice") if in_tower else \
            ("does not normalise", "nothing normalises the pixels")
        warnings.warn(f"{pre} gives do_normalize {str(proc.normalize).lower()} (leaving it out gives true, "
                      f"VLMImageProcessor's default), and the vision tower {tower} its input itself: {result}, as "
                      f"the official code would do with this file. A released "
                      f"{'hybrid' if cfg.hybrid else 'SigLIP-only'} model expects do_normalize "
                      f"{str(not in_tower).lower()}", stacklevel=2)
    return model, tok, proc


EXPORT_FILES = re.compile(r"(config|tokenizer|tokenizer_config|preprocessor_config)\.json|model\.safetensors"
                          r"(\.index\.json)?|model-\d+-of-\d+\.safetensors")  # the names an export writes
# What a killed export leaves in its .partial beside them: the file it was writing, FILE.tmpPID (runs.atomic_write),
# or .FILE.XXXXXXXX.tmp, as nanovl named its safetensors temporaries before 2026-12-02.
EXPORT_LEFTOVER = re.compile(rf"(?:{EXPORT_FILES.pattern})\.tmp\d+|\.(?:{EXPORT_FILES.pattern})\.[0-9a-f]{{8}}\.tmp")


def export_target(folder) -> Path:
    """The folder an export may write, resolved ("." has no name to put ".partial" after); ValueError for one that
    is not an earlier export (by its config.json: the same file names are not enough, a released model has them)."""
    folder = Path(folder).resolve()
    here = Path.cwd().resolve()
    if folder == here or folder in here.parents:  # (an empty "." would pass every check below)
        raise ValueError(f"{folder} is the current folder{'' if folder == here else ' or holds it'}: an export "
                         "replaces its folder whole, which would take the shell's folder away from under it. Choose "
                         "a new folder to export to")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file: an export writes a folder (a released model's layout). Choose a new "
                         "folder to export to")
    if folder.exists():
        others = sorted(f.name for f in folder.iterdir() if not EXPORT_FILES.fullmatch(f.name))
        if others:
            raise ValueError(f"{folder} exists and holds {', '.join(others[:5])}" + (", ..." if len(others) > 5 else "")
                             + ", which an export does not write: an export only replaces an earlier export. Choose a "
                             "new folder to export to")
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            config = None
        if any(folder.iterdir()) and not (isinstance(config, dict) and config.get("exported_by") == "nanovl"):
            raise ValueError(f"{folder} exists, and its config.json is not one a nanovl export wrote (with "
                             f"{json.dumps(EXPORTED_BY)}): an export only replaces an earlier export. Choose a new "
                             "folder to export to")
    partial = folder.with_name(folder.name + ".partial")
    ours = lambda name: EXPORT_FILES.fullmatch(name) or EXPORT_LEFTOVER.fullmatch(name)
    if partial.exists() and not (partial.is_dir() and all(ours(f.name) for f in partial.iterdir())):
        raise ValueError(f"{partial}, where an export is written before it is moved to {folder}, holds files an export "
                         "does not write; move it out of the way")
    return folder


def export_released(model: DeepSeekVL, tok: Tokenizer, folder, dtype=None, max_shard_bytes: Optional[int] = None):
    """Write `model` in the released layout. The folder is written as folder.partial and then renamed, so an
    interrupted export never leaves a folder that looks complete. An existing folder is replaced only when it is
    empty or an earlier export (export_target): a stage folder, a data folder, the current folder or anything else
    is refused, never deleted."""
    check_dtype(dtype, (torch.float32, torch.bfloat16, torch.float16))  # what the released format holds
    for value, kind in ((model, DeepSeekVL), (tok, Tokenizer)):
        if not isinstance(value, kind):
            raise ValueError(f"expected a {kind.__name__} to export, got {type(value).__name__}")
    # (what load_model refuses, refused before anything is written: a folder that cannot be loaded back)
    check_tokenizer_fits(tok, model.cfg, "the tokenizer given")
    cfg, folder = model.cfg, export_target(folder)
    config = {**released_config_dict(cfg), **EXPORTED_BY}  # (a model the layout cannot hold: refused before writing)
    tmp = folder.with_name(folder.name + ".partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {nanovl_to_released(k, cfg.hybrid): v.detach().to("cpu", dtype or v.dtype).contiguous()
                   for k, v in model.state_dict().items()}
        save_sharded(tensors, tmp, max_shard_bytes or 5 * 10 ** 9)  # huggingface_hub's default: "5GB", 10^9 each
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save(tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": None,
             "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
             "model_max_length": cfg.llm.max_seq_len}, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(ImageProcessor.for_config(cfg).to_dict(), indent=2))
    except BaseException as e:  # a full disk, Ctrl-C (a 7B takes minutes to write), a bug: the shards written so far
        shutil.rmtree(tmp, ignore_errors=True)  # go too, rather than hold the space they took
        if isinstance(e, OSError):
            raise OSError(f"cannot write {tmp}, where the export is written before it is moved to {folder}: "
                          f"{e.strerror or e}; nothing of it is left, and {folder} is as it was") from e
        raise
    # The swap: an earlier export goes and the new one takes its place. Ctrl-C and SIGTERM wait for that moment (the
    # export is written: the swap completes), so that it never leaves the old folder gone and the new one named
    # .partial.
    with uninterrupted():
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# nanovl checkpoints, and whichever of the two a path is

def stage_folders(folder: Path) -> str:
    """For a train.py --out folder given where one of its stage folders was meant: "holds the stage folders stage0,
    ...: pass one of them, as FOLDER/stage3", or "" for any other folder."""
    stages = sorted(p.parent.name for p in folder.glob("stage*/model.pt"))
    return f"holds the stage folders {', '.join(stages)}: pass one of them, as {folder / stages[-1]}" if stages else ""


def load_plain(path) -> dict:
    """torch.load with weights_only=True: a pickle that holds anything but tensors and plain containers is refused.
    What is wrong with a file that does not load is said in so many words: missing, not a torch file at all (empty,
    or some other format), cut short, or holding objects."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except (FileNotFoundError, IsADirectoryError):
        path = Path(path)
        stages = stage_folders(path.parent)
        if path.name == "model.pt" and (path.parent / "ckpt.pt").is_file():  # a stage not trained to its end
            why = (f" (the stage has not finished: its training state {path.parent / 'ckpt.pt'} loads too, or "
                   "--resume it to its end)")
        elif stages:
            why = f" ({path.parent} {stages})"
        elif not path.exists() and not path.suffix:  # not even a folder: a released model's name, not downloaded?
            why = (" (nothing there: nanovl reads local folders; a released model is downloaded first, see the "
                   "README's Released weights)")
        else:
            why = ""
        raise FileNotFoundError(f"no checkpoint at {path}{why}") from None
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise ValueError(f"{path} is not a torch checkpoint ({os.path.getsize(path):,} bytes that are not the zip "
                         "archive torch.save writes): an empty, corrupt or wrong file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unpickler error" in line), "").split(". ")[0]
        raise ValueError(f"{path} holds more than tensors and plain containers ({why}); only tensors and plain "
                         "containers are accepted (torch.load(weights_only=True))") from None
    except Exception as e:  # RuntimeError from the zip reader
        raise ValueError(f"cannot read {path} ({type(e).__name__}: {str(e).split('. ')[0]}): the file is truncated "
                         "or corrupt") from None


def nanovl_state(state, path) -> tuple:
    """(model state dict, config dict) of what load_plain read from a nanovl model.pt, or a ValueError that says
    what the file is instead. A stage's ckpt.pt (the training state) also holds the model and its config, except
    stage 0's, whose keys carry the stage-0 heads and a `model.` prefix."""
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path} is not a nanovl model file (a dict with 'model' and 'config')")
    odd = [k for k, v in state["model"].items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if odd:  # (the key checks below would fail on them with an AttributeError)
        v = state["model"][odd[0]]
        raise ValueError(f"{path} is not a nanovl model file: its 'model' should map parameter names to tensors, and "
                         f"holds {len(odd)} other entries, such as {odd[0]!r}: {type(v).__name__}")
    if any(k.startswith("heads.") for k in state["model"]):
        raise ValueError(f"{path} is stage 0's training state (the model beside stage 0's heads, and the optimizer); "
                         f"pass the stage folder's model.pt, which holds the model alone")
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"{path} holds no model config (a dict under 'config'), got "
                         f"{type(state.get('config')).__name__}")
    return state["model"], state["config"]


def load_nanovl(path, device="cpu", dtype=None, tokenizer=None, before_weights=None):
    """A nanovl stage folder (model.pt, tokenizer.json) or model.pt file -> (model, tokenizer, processor).
    before_weights: as load_model's."""
    path = Path(path)
    file = path / "model.pt" if path.is_dir() else path
    state = load_plain(file)
    weights, config = nanovl_state(state, file)
    warn_if_edited(file.parent / "config.json", config)
    try:
        cfg = VLConfig.from_dict(config)
    except ValueError as e:
        raise ValueError(f"{file}: the model config it holds: {e}") from None
    tok, tok_path = pick_tokenizer(file.parent, tokenizer)  # (before the weights, which may take minutes to build)
    check_tokenizer_fits(tok, cfg, tok_path, exact=cfg.name in FROM_SCRATCH)  # as train.py checked it
    check_trained_with(tok, tok_path, state.get("tokenizer"), file)
    if before_weights is not None:
        before_weights(cfg, tok)
    model = build_loaded(cfg, weights, str(file), device, dtype)
    return model, tok, ImageProcessor.for_config(cfg)


def warn_if_edited(copy: Path, config: dict):
    """train.py writes the model config twice: inside model.pt, which is what loads, and as config.json beside it,
    for people to read. An edit to config.json would change nothing, silently; say so instead."""
    try:
        written = json.loads(copy.read_text(encoding="utf-8"))
        what = "" if isinstance(written, dict) else "is not a JSON object"
    except OSError:  # none (a bare model.pt), or unreadable: there is nothing to compare
        return
    except (ValueError, RecursionError) as e:  # (an edit that broke it: said, as an edit that kept it valid is)
        what = f"is not valid JSON ({e})"
    if not what:
        diff = VLConfig.differences(config, written)
        if not diff:
            return
        shown = "; ".join(f"{k}: {b!r} there, {a!r} in model.pt" for k, a, b in diff[:3])
        what = f"differs from the config inside {copy.parent / 'model.pt'} ({shown}" + (
            f"; and {len(diff) - 3} more)" if len(diff) > 3 else ")")
    warnings.warn(f"{copy} {what}. model.pt's config is the one its weights were trained with, and the one used: "
                  "config.json is a copy written for reading, and editing it changes nothing", stacklevel=3)


def load_model(path, device="cpu", dtype=None, tokenizer=None, before_weights=None):
    """Either kind of checkpoint -> (model, tokenizer, processor), in eval mode. device None: the CPU.
    before_weights(cfg, tokenizer), if given, is called once the model config and the tokenizer are read and checked,
    before the weights (which may take minutes): a caller's own checks of its inputs against them fail at once."""
    paths = {"path": path} if tokenizer is None else {"path": path, "tokenizer": tokenizer}
    for name, value in paths.items():
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"expected {name} as a path (a str or a pathlib.Path), got {type(value).__name__}")
    if before_weights is not None and not callable(before_weights):  # (else a TypeError once the config is read)
        raise ValueError(f"expected before_weights as a function of (cfg, tokenizer), got "
                         f"{type(before_weights).__name__}")
    device = "cpu" if device is None else device
    check_device(device)
    check_dtype(dtype)
    if is_released_folder(path):
        return load_released(path, device, dtype, tokenizer, before_weights)
    if Path(path).is_file() and Path(path).suffix != ".pt" and is_released_folder(Path(path).parent):
        raise ValueError(f"{path} is one file of the released model folder {Path(path).parent}: pass the folder")
    if Path(path).is_dir() and any(Path(path).glob("model-*-of-*.safetensors")):
        raise ValueError(f"{path} holds safetensors shards but no model.safetensors.index.json, which says which "
                         "tensor is in which shard; copy it from where the shards came from")
    if Path(path).is_dir() and (Path(path) / "config.json").is_file() and not (Path(path) / "model.pt").is_file():
        # the released layout, less its weights (a nanovl stage folder has a config.json too, beside model.pt)
        raise FileNotFoundError(f"{path} holds config.json but no weights: a released DeepSeek-VL folder holds "
                                "model.safetensors (or shards and model.safetensors.index.json), a nanovl stage "
                                "folder model.pt")
    return load_nanovl(path, device, dtype, tokenizer, before_weights)


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained parts for training (paper section 3.1: SigLIP-L, SAM-B and DeepSeek-LLM start from their own training)

def _read_tensors(path: Path) -> dict:
    if path.is_dir() and not is_released_folder(path) and (path / "model.pt").is_file():
        path = path / "model.pt"  # a nanovl stage folder
    if path.is_dir():
        stages = stage_folders(path)
        if stages:
            raise ValueError(f"--init_from {path}: a train.py --out folder, which {stages}")
        if not is_released_folder(path):
            raise ValueError(f"--init_from {path}: a folder, but not one of weights: expected a nanovl stage folder "
                             "(model.pt), a released DeepSeek-VL or HF Llama folder (model.safetensors, or shards "
                             "and model.safetensors.index.json), or a file (.safetensors, .pt, .pth)")
        return load_sharded(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    state = load_plain(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "config" in state:
        state = state["model"]  # a nanovl model.pt
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path} is not a plain state dict of tensors")
    return state


def part_state(path) -> tuple:
    """Read one pretrained part and name its tensors as ours: (what it is, {our name: tensor}, skipped keys, and for
    a released DeepSeek-VL folder its projector type, else None)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    tensors = _read_tensors(path)
    port = is_hf_port(config)
    if port:  # transformers' layout: read as the release it was converted from
        hybrid = config["model_type"] == "deepseek_vl_hybrid"
        config = hf_port_config(config, f"--init_from {path}")
        tensors = hf_port_tensors(tensors, hybrid, f"--init_from {path}")
    keys, skipped, state = list(tensors), [], {}

    def take(key, ours):
        if ours is None:
            skipped.append(key)
        else:
            state[ours] = tensors[key]

    if "language_config" in config or any(k.startswith("language_model.") for k in keys):
        kind = "a released DeepSeek-VL model" + (" (in transformers' layout)" if port else "")
        projector_type = config.get("aligner_config", {}).get("params", {}).get("projector_type")
        for k in keys:
            take(k, released_to_nanovl(k))
        return kind, state, skipped, projector_type
    if any(k.startswith("image_encoder.") for k in keys):  # the original SAM checkpoint: the whole of SAM
        kind = "SAM's image encoder"
        for k in keys:
            take(k, "sam." + k[len("image_encoder."):] if k.startswith("image_encoder.") else None)
    elif any(k.startswith("model.layers.") for k in keys):  # HF LlamaForCausalLM
        kind = "an HF Llama language model"
        for k in keys:  # model.X -> llm.X, lm_head.weight -> llm.lm_head.weight; anything else fails the checks
            if "rotary_emb.inv_freq" in k:
                take(k, None)
            else:
                take(k, "llm." + (k[len("model."):] if k.startswith("model.") else k))
    elif "pos_embed" in keys and any(k.startswith("blocks.") and ".mlp.fc1." in k for k in keys):  # timm ViT
        kind = "a timm SigLIP"
        for k in keys:  # the pooling head and classifier are not part of the tower DeepSeek-VL uses
            take(k, None if k.startswith(("attn_pool.", "head.", "fc_norm.")) else "siglip." + k)
    elif all(k.split(".")[0] in ("siglip", "sam", "aligner", "llm") for k in keys):
        kind = "a nanovl model"
        state = dict(tensors)
    else:
        raise ValueError(f"cannot tell what {path} holds (keys like {_shorten(keys, 4)}); expected a released "
                         "DeepSeek-VL folder, SAM's checkpoint (image_encoder.*), a timm SigLIP (blocks.*, pos_embed), "
                         "an HF Llama (model.layers.*) or a nanovl model.pt")
    return kind, state, skipped, None


# What a part's tensors do not show: a decoder of 32 heads of 64 has the tensors of one of 16 heads of 128, and RoPE's
# base and the norms' epsilon are no tensors at all. Loaded into a model built otherwise, the weights would compute
# something else without a word, so these are compared where the part's config.json says them.
UNSEEN_SETTINGS = {"llm": ("n_heads", "n_kv_heads", "rope_theta", "norm_eps"), "siglip": ("n_heads",),
                   "sam": ("n_heads",)}


def unseen_differences(path, kind: str, cfg: VLConfig) -> list:
    """UNSEEN_SETTINGS where the model a part comes from differs from cfg, as "llm.n_heads 32 there, 16 here": read
    from a released folder's config.json (or transformers' port of one), or an HF Llama's. A part without one (SAM's
    or timm's checkpoint), or a released config this code cannot read, has its tensors' shapes checked alone."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return []
    config = json.loads(file.read_text())
    if kind.startswith("a released DeepSeek-VL model"):
        try:
            theirs = released_config(hf_port_config(config, str(path)) if is_hf_port(config) else config,
                                     cfg.image_token_id)
        except ValueError:
            return []
        sections = {name: getattr(theirs, name) for name in UNSEEN_SETTINGS}
    elif kind == "an HF Llama language model":
        # (transformers 5 writes RoPE's settings inside rope_parameters; 4 wrote rope_theta and rope_scaling)
        rope = config["rope_parameters"] if isinstance(config.get("rope_parameters"), dict) else {}
        scaling = config.get("rope_scaling") or rope.get("rope_type", "default") != "default" and rope
        if scaling:  # (our decoder's RoPE has no scaling: a released folder's config.json with one is refused too)
            return [f"RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} there, none here"]
        n_heads = config.get("num_attention_heads", HF_LLAMA_DEFAULTS["num_attention_heads"])
        theta = config.get("rope_theta", rope.get("rope_theta", HF_LLAMA_DEFAULTS["rope_theta"]))
        sections = {"llm": LlamaConfig(n_heads=n_heads, n_kv_heads=config.get("num_key_value_heads") or n_heads,
                                       rope_theta=theta,
                                       norm_eps=config.get("rms_norm_eps", HF_LLAMA_DEFAULTS["rms_norm_eps"]))}
    else:
        return []
    return [f"{name}.{key} {getattr(there, key)} there, {getattr(getattr(cfg, name), key)} here"
            for name, there in sections.items() if there is not None and getattr(cfg, name) is not None
            for key in UNSEEN_SETTINGS[name] if getattr(there, key) != getattr(getattr(cfg, name), key)]


def init_from_parts(model: DeepSeekVL, paths) -> list:
    """Copy pretrained parts into a freshly initialised model; returns the report, one line per source and part.

    Every tensor a source gives must exist in the model with the same shape, and no tensor may come from two
    sources; otherwise nothing is copied. What no source gives keeps its fresh initialisation: for the `1.3b-hybrid`
    preset (config.py) the hybrid adaptor and SAM's downsample convs and alpha. neck_hd, which no source gives either,
    starts as a copy of the loaded neck instead, which is our choice: the official tower deep-copies its neck when it is
    built, before a checkpoint is loaded into it, so from SAM's own checkpoint its neck_hd would start random. A trained
    neck is the better start, and alpha starts at 0 either way, so the side path starts switched off.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    chosen, origin, report = {}, {}, []
    for path in paths:
        kind, state, skipped, projector = part_state(path)
        if projector and projector != model.cfg.aligner.projector_type:
            dropped = [k for k in state if k.startswith("aligner.")]
            for k in dropped:
                del state[k]
            report.append(f"{path}: aligner not taken ({projector} there, {model.cfg.aligner.projector_type} here)")
        bad = [f"{k} {tuple(v.shape)} (model: {tuple(expected[k]) if k in expected else 'no such tensor'})"
               for k, v in state.items() if k not in expected or tuple(v.shape) != tuple(expected[k])]
        twice = [f"{k} (also from {origin[k]})" for k in state if k in origin]
        ints = not_float(state)  # (copy_ would convert an integer tensor into the float weight, silently)
        unseen = unseen_differences(path, kind, model.cfg)
        problems = ([f"{len(bad)} tensors: {_shorten(bad, 8)}"] if bad else []) + \
            ([f"{len(ints)} not floating-point: {_shorten(ints, 6)}"] if ints else []) + \
            ([f"given twice: {_shorten(twice, 8)}"] if twice else []) + \
            ([f"settings its config.json gives, which its tensors' shapes do not show: {', '.join(unseen)}"]
             if unseen else [])
        if problems:
            raise ValueError(f"{path} ({kind}) does not fit the {model.cfg.name!r} model; nothing was loaded:\n  " +
                             "\n  ".join(problems))
        check_finite(state, f"{path} ({kind})")
        chosen.update(state)
        origin.update({k: str(path) for k in state})
        parts = sorted({k.split(".")[0] for k in state})
        report.append(f"{path}: {kind}: {len(state)} tensors into {', '.join(parts) or 'nothing'}"
                      + (f"; {len(skipped)} unused skipped" if skipped else ""))
    if model.sam is not None and any(k.startswith("sam.neck.") for k in chosen):
        for k in [k for k in expected if k.startswith("sam.neck_hd.") and k not in chosen]:
            chosen[k] = chosen[k.replace("neck_hd.", "neck.")]
            origin[k] = "a copy of sam.neck"
    with torch.no_grad():
        params = model.state_dict()
        for k, v in chosen.items():
            params[k].copy_(v)
    fresh = sorted({".".join(k.split(".")[:2]) for k in expected if k not in chosen})
    copied = sorted({".".join(k.split(".")[:2]) for k, o in origin.items() if o == "a copy of sam.neck"})
    if copied:
        report.append(f"{', '.join(copied)}: a copy of the loaded sam.neck")
    report.append("freshly initialised: " + (", ".join(fresh) if fresh else "nothing"))
    return report


# ---------------------------------------------------------------------------------------------------------------------
# python -m nanovl.checkpoint --ckpt out/stage3 --export out/stage3-released [--dtype bf16] [--shard_gb 5]

def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Export a nanovl checkpoint in the released DeepSeek-VL layout.")
    p.add_argument("--ckpt", required=True, help="a nanovl stage folder or model.pt (or a released folder)")
    p.add_argument("--export", required=True, help="the folder to write")
    p.add_argument("--tokenizer", default="", help="tokenizer.json, if not beside the checkpoint")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--shard_gb", type=float, default=5.0,
                   help="largest shard, in GB of 10^9 bytes (huggingface_hub's default: 5; inf: one file)")
    args = p.parse_args(argv)
    if not args.shard_gb > 0:
        p.error(f"--shard_gb must be above 0, got {args.shard_gb}")
    try:
        export_target(args.export)  # before the minutes a large model takes to load
        model, tok, _ = load_model(args.ckpt, tokenizer=args.tokenizer or None)
    except PermissionError as e:  # a checkpoint or tokenizer this user may not read
        raise SystemExit(denied(e)) from None
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:
        raise SystemExit(f"\n(interrupted while loading {args.ckpt}: nothing was written)") from None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        out = export_released(model, tok, args.export, dtype, int(min(args.shard_gb, 2 ** 32) * 10 ** 9))
    except (ValueError, OSError) as e:  # OSError: a folder that cannot be made (under a file), a full disk, ...
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:
        raise SystemExit(f"\n(interrupted: what was written is removed, and {Path(args.export).resolve()} is as "
                         "it was)") from None
    print(f"wrote {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")


if __name__ == "__main__":
    main()
