"""
The paper's training recipe, written out (sections 3.2 and 3.3, Table 4; facts sheet section 11): what each stage
trains, on which data, in what mix and at what rate. The official repository has no training code. train.py runs the
recipe (the training loop; nanovl/resume.py: the stage folders and resuming); this file is what it runs, as settings
and plain functions.

    stage 0  unimodal pretraining (scaled-down presets only: the real model starts from pretrained parts)
    stage 1  adaptor warm-up: the adaptor alone (for the hybrid, with SAM's necks and downsampling tail)
    stage 2  joint vision-language pretraining: language model and adaptor, language:multimodal 7:3 with modality
             warm-up, one modality per optimizer step, a little SFT data, samples packed into full rows
    stage 3  supervised fine-tuning: language model, adaptor and SigLIP; chats, loss on answers

Where each part of the recipe is written:
    each stage's defaults (Table 4)      STAGE_DEFAULTS, resolved with the flags by stage_hparams
    the freeze map of each stage         trainable_prefixes (applied by apply_freeze_map)
    AdamW, two rates, clipping           stage_optimizer (vision_lr_mult), clipping_groups
    the learning rate                    learning_rate (train.py sets it at the top of each step)
    each stage's data                    stage_groups; stage 2's 7:3 mix, modality warm-up and SFT share: stage2_share
    one modality per step                nanovl/data.py plan_batches: every step draws one group, by those shares
    packing (stage 2)                    plan_batches given lengths; data.PackedBatches (doc_ids keep samples apart)
    the loss on answers only             nanovl/chat.py render_chat (a mask bit per token) -> data.collate (targets
                                         -100 where nothing is learnt) -> train.py's train_step (normalised by the
                                         step's supervised tokens)
    a step's batch over micro-batches    check_stage, split_batch (gradients accumulate over the micro-batches; the
    and processes                        loss is normalised over the whole step, so the split changes no step)
    stage 0                              nanovl/stage0.py (its heads, batches and losses)
Stage 2's 7:3 is a share of the steps. It packs its samples into rows, so its steps hold comparable numbers of tokens,
but not equal ones: next-fit packing leaves each row's tail unused, and text pieces fill less of a row than captions do
(tiny: 80% against 89%), so in tokens the tiny data's mix of language and multimodal comes to about 2:1 (README, note
4 of the stages).
"""

import collections
import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from nanovl.config import FROM_SCRATCH, VLConfig
from nanovl.data import Source, read_jsonl


# ---------------------------------------------------------------------------------------------------------------------
# The settings: what a run can be told, and each stage's defaults (Table 4)

@dataclass
class TrainConfig:
    stage: str = "all"  # 0, 1, 2, 3 or all
    config: str = "tiny"  # model preset
    # data: a folder made by prepare_data.py (default: data for tiny, data-<preset> for the other presets), or a
    # LLaVA import to train on alone (stages 1 and 3)
    data: str = ""
    extra_data: str = ""  # more folders of rows (e.g. a LLaVA import), comma-separated: their pretrain.jsonl and
    # sft.jsonl are added to stages 1-3 (stage 2's text and the held-out set come from --data alone)
    out: str = "out"

    # weights to start from: default the previous stage's model.pt. Or pretrained parts, comma-separated (a released
    # DeepSeek-VL folder, SAM's checkpoint, a timm SigLIP, an HF Llama): see nanovl/checkpoint.py, init_from_parts
    init_from: str = ""

    tokenizer: str = ""  # default: the tokenizer.json beside the weights the stage starts from (--init_from, or the
    # stage before's folder; resumed: its own folder), else the data's
    resume: bool = False  # continue from out/stage<k>/ckpt.pt
    eval_only: bool = False
    ckpt: str = ""  # with --eval_only: a stage folder, a model.pt file or a released model folder

    # optimisation; steps, batch_size, micro_batch, lr and seq_len at 0, and every -1 and "", take the stage's
    # default (STAGE_DEFAULTS)
    steps: int = 0
    batch_size: int = 0  # global batch, in samples; packed (stage 2), in rows of seq_len tokens; stage 0: in text
    # pieces (its contrastive pairs and scenes are clip_batch and seg_batch per micro-batch)
    micro_batch: int = 0  # samples (packed: rows) per forward pass per process (accumulation makes up the rest;
    # stages 1-3 take the largest micro-batch up to it that splits their batch evenly)
    lr: float = 0.0
    min_lr_ratio: float = 0.1  # the cosine schedule's floor, a share of lr (not given in the paper; the step
    # schedule of stage 2 has its own factors)
    warmup: int = -1
    schedule: str = ""  # cosine or step
    weight_decay: float = 0.0  # Table 4: no weight decay in any stage
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seq_len: int = 0  # default: the stage's (the model's context where the stage sets none)
    lang_share: float = 0.7  # stage 2: language share of the steps that are not chats, after the warm-up (Table 1)
    modality_warmup: float = 0.3  # stage 2: part of the run over which the language share decays from 1.0
    sft_share: float = 0.1  # stage 2: share of steps drawn from the SFT chats (the paper mixes in "a minimal
    # proportion" for the 1.3B, section 3.2.2, without a figure: 0.1 is ours)
    text_sft_share: float = -1  # stage 3: text-only share of the chats (default: Table 2's 47.9%; 25% from scratch)
    short_chat_share: float = -1  # stage 3: share of steps from one-question image chats, grouped apart from the
    # multi-turn ones (default: 0, no split; 65% from scratch, see stage_groups)
    vision_lr_mult: float = -1  # learning rate of the towers, SigLIP and SAM (SAM's neck and tail too) / the stage's
    # (default: 1; 0.1 in stages 1-3 from scratch, see stage_optimizer)
    pack: int = -1  # pack samples into full rows (default: stage 2 only, as Table 4)
    trainable: str = ""  # comma-separated module prefixes to train instead of the stage's freeze map

    # evaluation, checkpoints and the run itself
    eval_every: int = 0  # evaluate every this many steps, in stages 1-3 (0, and stage 0: at the end only)
    eval_limit: int = 0  # evaluate on about this many multiple-choice questions (this many / categories, rounded up,
    # from each category) and at most this many held-out text rows (0: all)
    eval_split: str = "test"  # the questions evaluated: test (eval_mc.jsonl, the figures to report) or val
    # (val_mc.jsonl, prepare_data.py's second set: the figures to choose settings by, leaving test's unchosen)
    ckpt_every: int = 0  # write ckpt.pt every this many steps (0: a tenth of the stage)
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"
    compile: bool = False
    grad_ckpt: bool = False  # activation checkpointing in the decoder
    workers: int = 1  # DataLoader worker processes (on a 2-core laptop, more would take cores from training)
    image_cache: int = 1024  # MB of decoded images each worker keeps to reuse in later epochs (0: decode every time;
    # stage 0 keeps its scenes and its SigLIP-sized pair images in two caches of this size), and the evaluations keep
    # the held-out images in one more (each is read for MCPPL, then asked open, at every evaluation of the stage)
    clip_batch: int = 48  # stage 0: (image, caption) pairs per micro-batch for SigLIP's contrastive loss
    seg_batch: int = 3  # stage 0: segmented scenes per micro-batch for SAM's dense loss
    stop_after: int = 0  # exit right after the checkpoint at this step, as if killed (for testing resume)


# Defaults per stage. Scaled-down presets train from scratch on the synthetic data; the released sizes take Table 4.
STAGE_DEFAULTS = {
    "scratch": {
        # Stage 0 runs many small steps: SigLIP's contrastive loss learns the facts late, and by steps more than by
        # pairs, and what SigLIP knows is what the decoder learns to read (800 steps instead of 400 lifted the tiny
        # default's final accuracy from 46% to 65% and 71%, seeds 1337 and 7: README, "What the experiments say"). The
        # decoder and SAM see as much text and as many scenes as with 400 steps, in batches half as big.
        0: dict(steps=800, batch_size=4, micro_batch=4, lr=3e-3, warmup=20, schedule="cosine", seq_len=128),
        1: dict(steps=30, batch_size=16, micro_batch=16, lr=3e-3, warmup=6, schedule="cosine", vision_lr_mult=0.1),
        # Stage 2's batch counts packed rows of the model's context (tiny: 512 tokens; 6 hold about what 16 samples
        # did, unpacked).
        2: dict(steps=100, batch_size=6, micro_batch=6, lr=2e-3, warmup=10, schedule="step", vision_lr_mult=0.1),
        # Stage 3 was still learning at 700 steps (README, History); 1300 go through the one-question
        # chats, each asked twice (with its options, and open), about as often as 700 went through them asked once.
        3: dict(steps=1300, batch_size=8, micro_batch=8, lr=2e-3, warmup=30, schedule="cosine",
                text_sft_share=0.25, short_chat_share=0.65, vision_lr_mult=0.1),
    },
    "paper": {  # Table 4, the 1B column (the 7B's, below, differs in stage 2)
        # Stage 1's sequence length is Table 4's 512 read as text tokens, plus one image's 576: an image alone is 576
        # tokens, so 512 in all would hold no caption pair at all.
        1: dict(steps=15000, batch_size=256, micro_batch=8, lr=1e-3, warmup=128, schedule="cosine", seq_len=512 + 576),
        2: dict(steps=96000, batch_size=1024, micro_batch=4, lr=3e-5, warmup=2000, schedule="step", seq_len=4096),
        3: dict(steps=10000, batch_size=256, micro_batch=4, lr=2e-5, warmup=256, schedule="cosine", seq_len=4096,
                text_sft_share=0.479),
    },
}
# Table 4's 7B column: the 1B's, but for stage 2.
STAGE_DEFAULTS["paper-7b"] = {**STAGE_DEFAULTS["paper"],
                              2: dict(STAGE_DEFAULTS["paper"][2], lr=4.2e-5, steps=42000, batch_size=2304)}


def stage_defaults(preset: str, stage: int) -> dict:
    """A stage's default hyperparameters for a preset: scaled-down ones train from scratch, the 7B takes Table 4's
    7B column, the released 1.3b and the paper's hybrid recipe at that size (1.3b-hybrid) its 1B column."""
    table = "scratch" if preset in FROM_SCRATCH else "paper-7b" if preset == "7b" else "paper"
    return dict(STAGE_DEFAULTS[table][stage])


# The TrainConfig fields that override a stage's defaults (STAGE_DEFAULTS); stage_hparams resolves them into hp.
HPARAM_FIELDS = ("steps", "batch_size", "micro_batch", "lr", "warmup", "schedule", "seq_len", "text_sft_share",
                 "short_chat_share", "vision_lr_mult", "pack")


def stage_hparams(stage: int, tc: TrainConfig, cfg: VLConfig):
    """(hp, seq_len, stc): the stage's hyperparameters (its defaults, with each setting given on the command line
    over them), the sequence length it trains at, and tc with the stage's step count and stage-3 shares filled in."""
    hp = stage_defaults(cfg.name, stage)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key in HPARAM_FIELDS:  # a value other than the field's default is a choice (--warmup 0, a share of 0)
        if getattr(tc, key) != defaults[key]:
            hp[key] = getattr(tc, key)
    if tc.seq_len > cfg.llm.max_seq_len:  # (a default above a smaller --llm.max_seq_len is cut to it, below)
        raise SystemExit(f"--seq_len {tc.seq_len} is longer than the model's context of {cfg.llm.max_seq_len} tokens; "
                         "pass at most that, or raise --llm.max_seq_len")
    hp.setdefault("seq_len", cfg.llm.max_seq_len)
    hp.setdefault("vision_lr_mult", 1.0)
    hp.setdefault("pack", int(stage == 2))  # stage 2 packs its samples into full rows (Table 4 counts sequences)
    seq_len = min(hp["seq_len"], cfg.llm.max_seq_len)
    # (The shares are stage 3's; every preset sets its stage-3 text share.)
    stc = dataclasses.replace(tc, steps=hp["steps"], text_sft_share=hp.get("text_sft_share", 0.0),
                              short_chat_share=hp.get("short_chat_share", 0.0))
    return hp, seq_len, stc


def listed(value: str) -> list:
    """A comma-separated setting (--init_from, --extra_data, --trainable) as its items, stripped, empty ones left
    out. (Unstripped, "llm, aligner" would give " aligner", which names no module.)"""
    return [item.strip() for item in value.split(",") if item.strip()]


def data_folders(stage: int, data: str, extra_data: str) -> list:
    """The folders a stage reads its rows from: --data, and from stage 1 on the --extra_data folders too (stage 0's
    text, caption pairs and scenes are prepare_data.py's, in --data alone)."""
    return [data] + (listed(extra_data) if stage > 0 else [])


# ---------------------------------------------------------------------------------------------------------------------
# What each stage trains: its freeze map, its optimizer and its learning rate

def trainable_prefixes(stage: int, cfg: VLConfig) -> list:
    """The module prefixes a stage trains (its freeze map); everything else is frozen. Stage 0 trains what its three
    objectives reach: the decoder, SigLIP, SAM up to its main neck (the dense head reads that neck), and the heads."""
    # For the hybrid, the paper's "VL adaptor" also holds SAM's upsample-and-downsample tail (section 3.1); the
    # official tower's freeze_high=False unfreezes exactly the neck, neck_hd, downsamples and alpha. (They train at
    # the vision side's rate, vision_lr_mult, with the towers: stage_optimizer.)
    adaptor = ["aligner"] + (["sam.neck", "sam.neck_hd", "sam.downsamples", "sam.hd_alpha_downsamples"]
                             if cfg.hybrid else [])
    return {0: ["llm", "siglip", "sam.patch_embed", "sam.pos_embed", "sam.blocks", "sam.neck", "heads"],
            1: adaptor, 2: adaptor + ["llm"], 3: adaptor + ["llm", "siglip"]}[stage]


def under(name: str, prefixes) -> bool:
    """Whether a parameter's name is one of the module prefixes or lies below one ("llm" holds "llm.norm.weight",
    not "llm_head.weight")."""
    return any(name == q or name.startswith(q + ".") for q in prefixes)


def apply_freeze_map(model, prefixes) -> dict:
    """requires_grad from a list of module prefixes; returns {top-level module: (trainable, total)} parameters (in
    stage 0, the VLM's modules inside its wrapper, Stage0Model's "model", each on its own, beside the heads)."""
    counts = {}
    for name, p in model.named_parameters():
        p.requires_grad = under(name, prefixes)
        top = name.removeprefix("model.").split(".")[0]
        t, n = counts.get(top, (0, 0))
        counts[top] = (t + p.numel() * p.requires_grad, n + p.numel())
    return counts


def clipping_groups(net, stage: int) -> dict:
    """The trainable parameters, grouped by what is clipped together (at grad_clip, Table 4): the whole model in
    stages 1-3. Stage 0 trains three separate models side by side (the decoder; SigLIP with its text tower; SAM with
    its dense head), so each is clipped on its own: clipped as one, a large contrastive or dense gradient would
    scale down the decoder's step too, by an amount that depends on the seed (README, "What the experiments say")."""
    def part(name):
        if stage != 0:
            return "model"
        name = name.removeprefix("model.")
        return "llm" if name.startswith("llm.") else "sam" if name.startswith(("sam.", "heads.seg_head.")) else "siglip"

    groups = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            groups.setdefault(part(name), []).append(p)
    return groups


def stage_optimizer(net, tc: TrainConfig, hp: dict, device: str):
    """AdamW (Table 4: betas 0.9, 0.95, no weight decay) over two parameter groups: the language model and the
    aligner (and stage 0's heads) at the stage's learning rate; the vision side (the towers, SAM's neck and its
    downsampling tail) at vision_lr_mult times it. Each group's lr_mult scales the schedule's rate at every step."""
    # A from-scratch decoder learns to read the image tokens only if what they carry holds still while it does: at
    # the full rate, stages 1-3 wiped out much of what stage 0 had taught the vision side, and the final accuracy
    # stayed near chance (README, "What the experiments say"). The aligner, which has to learn the map into the
    # decoder, does best at the full rate.
    # Each group starts at its own rate too (the schedule sets it again at every step), so that an optimizer built
    # here and stepped without the schedule (bench.py's) updates as training does.
    vision = lambda n: n.removeprefix("model.").startswith(("siglip.", "sam."))
    mult = hp["vision_lr_mult"]
    groups = [{"params": [p for n, p in net.named_parameters() if p.requires_grad and not vision(n)], "lr_mult": 1.0,
               "lr": hp["lr"]},
              {"params": [p for n, p in net.named_parameters() if p.requires_grad and vision(n)], "lr_mult": mult,
               "lr": hp["lr"] * mult}]
    # fused: one kernel for the whole update, on a GPU and on the CPU alike (on the CPU, for the tiny model, about
    # four times as fast as the loop over parameters that is the default there).
    fused = device.split(":")[0] in ("cuda", "cpu") or None
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=hp["lr"], betas=(tc.beta1, tc.beta2),
                             weight_decay=tc.weight_decay, fused=fused)


def learning_rate(step: int, hp: dict, min_ratio: float) -> float:
    """Linear warm-up, then cosine to min_ratio x lr (stages 0, 1, 3) or DeepSeek-LLM's steps: x0.316 after 80% of
    the run, x0.1 after 90% (stage 2; the paper names the step schedule but not its milestones, facts section 11)."""
    lr, warm, total = hp["lr"], hp["warmup"], hp["steps"]
    if step < warm:
        return lr * (step + 1) / warm
    if hp["schedule"] == "step":
        return lr * (1.0 if step < 0.8 * total else 0.316 if step < 0.9 * total else 0.1)
    progress = (step - warm) / max(1, total - warm)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------------------------
# What each stage reads: its rows by modality group and each group's share of the steps

def load_rows(folders, name):
    """The rows of NAME.jsonl in each of folders (one without that file adds none), each with two private keys: _root,
    its folder, under which its image paths are read (data.Source), and _where, "FILE, line N" for its errors."""
    rows = []
    for folder in folders:
        path = os.path.join(folder, f"{name}.jsonl")
        if os.path.exists(path):
            rows += [dict(r, _root=folder) for r in read_jsonl(path, origin=True)]
    return rows


def stage2_share(tc: TrainConfig, n_chats: int, n_text_chats: int):
    """Stage 2's mix as a function of the step. The modality warm-up (paper section 4.4, Figure 9): the language share
    of the steps starts at 1.0 and decays linearly to lang_share (0.7, Table 1) over the first modality_warmup of the
    run, so the language model is not shocked by a sudden flood of image tokens. sft_share of the steps are chats
    (the paper mixed a little SFT data into stage 2, to watch the 1.3B's progress on questions: facts section 11),
    split by modality as the rest, each step one modality (paper section 4.4, modality grouping): chats with an image
    (sft) in proportion to their rows, phased in over the same warm-up as the multimodal steps; text-only chats
    (text_sft) from the start. The shares need not sum to 1 (plan_batches). (These groups' names are stage 2's:
    --sft_share sets both; --text_sft_share is stage 3's flag, for its group text_chat.)"""
    warm = int(tc.modality_warmup * tc.steps)  # steps; 0 (--modality_warmup 0, or under a step): no warm-up
    # With no chats at all, with_image is 1: the whole chat share goes to "sft", and train.py's no_rows then says the
    # chats are missing and names the setting that does without them, --sft_share 0.
    with_image = n_chats / (n_chats + n_text_chats) if n_chats + n_text_chats else 1.0
    if warm and tc.sft_share == 1 and n_chats and not n_text_chats:  # (step 0's shares would all be 0)
        raise ValueError(f"--sft_share 1 leaves stage 2's first step nothing to train on: every step is a chat, the "
                         f"data holds no text-only chats, and the chats with an image come in over the modality "
                         f"warm-up ({warm} step{'s' * (warm != 1)}): pass an --sft_share below 1, or "
                         "--modality_warmup 0")

    def share(step):
        ramp = min(1.0, step / warm) if warm else 1.0
        lang = 1.0 - (1.0 - tc.lang_share) * ramp
        return {"language": lang * (1 - tc.sft_share), "multimodal": (1 - lang) * (1 - tc.sft_share),
                "sft": tc.sft_share * with_image * ramp, "text_sft": tc.sft_share * (1 - with_image)}

    return share


def stage_groups(stage: int, tc: TrainConfig, folders):
    """The stage's rows by modality group, {group: (rows, kind, name)}, and share_for: the sizes of the groups (their
    samples) -> each group's share of the steps as a function of the step. stage_data renders the rows; train.py
    checks them (check_stage_rows) before the first stage of the run trains."""
    pretrain, sft = load_rows(folders, "pretrain"), load_rows(folders, "sft")
    if stage == 1:  # captions and document OCR (paper section 3.2.1)
        for r in pretrain:
            if not isinstance(r.get("category"), str):  # what picks the rows: a row without one would go unseen
                raise ValueError(f"{r['_where']}: " + ("no 'category'" if "category" not in r else
                                                       f"'category' is {r['category']!r}") +
                                 "; expected a string, such as 'caption' or 'ocr'")
        # Image-text rows of other categories are not trained on in stage 1; the group's name counts them, so that
        # the log says so (a row of one's own with another category would otherwise go unseen).
        others = collections.Counter(r["category"] for r in pretrain if r["category"] not in ("caption", "ocr"))
        name = "captions+ocr" + ("; the image-text rows of other categories left out: " +
                                 ", ".join(f"{n} {category}" for category, n in sorted(others.items())) +
                                 " (category 'caption' or 'ocr' brings a row in)" if others else "")
        return {"multimodal": ([r for r in pretrain if r["category"] in ("caption", "ocr")], "pretrain", name)}, \
            lambda sizes: lambda step: {"multimodal": 1.0}
    if stage == 2:  # (.get: a malformed row goes on to Source, which names its file and line)
        groups = {"language": (load_rows([tc.data], "text"), "text", "text"),
                  "multimodal": (pretrain, "pretrain", "image-text"),
                  "sft": ([r for r in sft if r.get("images")], "sft", "chats with images"),
                  "text_sft": ([r for r in sft if not r.get("images")], "sft", "text-only chats")}
        return groups, lambda sizes: stage2_share(tc, sizes["sft"], sizes["text_sft"])
    if stage == 3:
        # With the loss normalised over a step's answer tokens, one long answer (a page read out, a web page's
        # markup) outweighs many one-word answers in the same step. The small models learn to answer from the image
        # on the short answers first, so they get steps of their own: one-question image chats form their own
        # modality group, with short_chat_share of the steps.
        # (.get: a malformed row goes on to Source, which names its file and line)
        chats, text = [r for r in sft if r.get("images")], [r for r in sft if not r.get("images")]
        short = tc.short_chat_share if tc.short_chat_share > 0 else 0.0
        turns = lambda r: len(r.get("conversation") or ())
        if short and (all(turns(r) <= 2 for r in chats) or all(turns(r) > 2 for r in chats)):
            short = 0.0  # all one kind (a LLaVA import of one-question chats, say): nothing to split, one group
        groups = {"chat": [r for r in chats if not short or turns(r) > 2],
                  "short_chat": [r for r in chats if short and turns(r) <= 2], "text_chat": text}
        names = {"chat": "multimodal chats", "short_chat": "one-question image chats", "text_chat": "text chats"}
        # (rounded: 1 - 0.33 - 0.67 is -1e-16 in floating point, and the shares are what the user wrote)
        # (check_stage refused shares over 1 before the first stage)
        shares = {"chat": round(1 - tc.text_sft_share - short, 9), "short_chat": short, "text_chat": tc.text_sft_share}
        return {k: (v, "sft", names[k]) for k, v in groups.items() if shares[k] > 0}, \
            lambda sizes: lambda step: {k: v for k, v in shares.items() if v > 0}
    raise ValueError(f"no data mix for stage {stage}")


def stage_data(stage: int, tc: TrainConfig, tok, cfg: VLConfig, seq_len: int, folders):
    """Sources by modality, and each modality's share of the steps as a function of the step."""
    groups, share_for = stage_groups(stage, tc, folders)
    # (each row carries its folder in "_root")
    sources = {group: Source(rows, kind, tok, cfg.n_image_tokens, seq_len, name=name)
               for group, (rows, kind, name) in groups.items()}
    return sources, share_for({group: len(source) for group, source in sources.items()})


# ---------------------------------------------------------------------------------------------------------------------
# How a step's batch splits into micro-batches and processes

def check_stage(stage: int, tc: TrainConfig, hp: dict, world: int):
    """(micro, accum), how the stage's batch splits (split_batch); SystemExit for settings (hp: stage_hparams') that
    cannot run together. train.py checks each stage of the run with it before the first one trains: a setting a later
    stage cannot work with stops `--stage all` at once, not after the earlier stages have trained."""
    text, short = hp.get("text_sft_share", 0.0), hp.get("short_chat_share", 0.0)
    if stage == 3 and round(text + short, 9) > 1:
        said = lambda key: "" if getattr(tc, key) >= 0 else " (the preset's)"  # -1: not given
        raise SystemExit(f"--text_sft_share {text}{said('text_sft_share')} and --short_chat_share {short}"
                         f"{said('short_chat_share')} add up to more than 1: they are shares of stage 3's steps, and "
                         f"the multimodal chats take the rest; pass shares that add up to 1 or less")
    return split_batch(stage, hp, world)


def split_batch(stage: int, hp: dict, world: int):
    """(micro, accum): the samples (packed: rows) per forward pass on each process, and the micro-batches each process
    accumulates per step, so that processes x micro x accum is the global batch."""
    global_batch, micro = hp["batch_size"], hp["micro_batch"]
    if global_batch % (world * micro) and global_batch % world == 0 and stage > 0:
        # The micro-batch does not split this batch (tiny's default is the whole batch, for one process; a
        # --micro_batch for every stage of the run may not split each stage's): each process takes the largest
        # micro-batch up to it that splits its share evenly. In stages 1-3 the loss is normalised over the whole
        # step, so the run is the same however the batch is split (a test checks); the settings in the checkpoint
        # are unchanged. Not in stage 0, whose contrastive pairs and scenes are counted per micro-batch.
        micro = max(m for m in range(1, micro + 1) if (global_batch // world) % m == 0)
    if global_batch % world:  # (the micro-batch aside: stages 1-3 would take one that splits the share)
        raise SystemExit(f"stage {stage}: batch_size {global_batch} is not divisible by {world} processes: pass a "
                         f"--batch_size that {world} processes divide")
    if global_batch % (world * micro):
        advice = f"pass a --micro_batch that divides {global_batch // world}" + (
            " (stage 0 keeps its micro-batch as given: its contrastive pairs are counted per micro-batch; stages "
            "1-3 take the largest up to it that splits theirs)" if stage == 0 else "")
        raise SystemExit(f"stage {stage}: batch_size {global_batch} is not divisible by {world} processes x "
                         f"micro_batch {micro}: {advice}")
    return micro, global_batch // (world * micro)
