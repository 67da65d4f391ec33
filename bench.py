"""
Benchmarks, one function per part of the system:

    python bench.py --what train --config small                      # a full training step (stage 3's freeze map)
    python bench.py --what train --config 1.3b --llm-only --compare  # the decoder alone, against transformers
    python bench.py --what prefill --config 7b --seq 4096            # a prompt with an image into the KV cache
    python bench.py --what decode --config 7b --compare              # greedy decoding, one token at a time
    python bench.py --what vision --config 7b --compare              # SigLIP, SAM and encode_images, against timm / SAM
    python bench.py --what tokenizer                                 # byte-level BPE encode throughput
    python bench.py --what suite --out bench-suite                   # all of the README's GPU figures (SUITE below)

Options: --config PRESET [--llm.n_layers=2 ...] (model config overrides, dotted, as get_config) [--device cpu|cuda]
[--dtype bf16|fp32] [--batch N] [--seq N] [--steps N] [--warmup N] [--compare] [--inductor NAME=VALUE] (with --compile:
train, decode, vision); train: [--stage 1|2|3] [--llm-only] [--compile] [--grad_ckpt]; decode: [--prompt-len N] [--new
N] [--compile] [--separate-projections]; vision: [--compile]; tokenizer: [--tokenizer FILE] [--vocab-size N]
[--small-vocab N] [--small-corpus-mb MB] [--mb MB]; suite: [--out DIR] [--runs NAME,...] [--budget SECONDS] [--small]
[--tables suite.jsonl ...]. Defaults depend on the preset (DEFAULTS below). Each run prints its tables and, as its last
line, the same figures as one line of JSON (the suite: each run's name, seconds and error; its figures are in
suite.jsonl).

What is measured. Work per second (tokens or images); the model FLOPs of that work (the FLOP model below) per second,
and on a GPU whose name is in DEVICES the model FLOPs utilisation (MFU) against its dense bf16 peak; peak memory
(torch.cuda.max_memory_allocated on a GPU; on CPU the whole process's peak resident set size), and on a GPU each run's
working memory (its peak above what was allocated before it); and where the time goes. Steps are timed after warm-up
steps that are not counted, with CUDA events on a GPU (no synchronisation inside a step, but for the model's input
checks in the prefill's one call, as sample.py runs it: one read-back, which the part-by-part prefill leaves out) and
perf_counter on CPU. On a GPU the training step runs in bf16 autocast with fp32 weights and fused AdamW, as train.py
does; the inference benchmarks cast the weights to --dtype. Decoding is timed two ways: a bare greedy loop over the
model and its KV cache (forward with one token, the simple path), and nanovl.generate (what sample.py runs: the
DecodeStep, fixed-shape and replayed as a CUDA graph on a GPU; with --compile, also compiled); then where a step of the
latter goes (decode_breakdown: the step alone against generate's loop, and the step's kernels under torch.profiler). The
prefill is timed as one forward, then written out part by part (forward_by_part) for where its time goes. On a CPU
shared with other work, OMP_NUM_THREADS=1 gives steadier figures.

The FLOP model counts the multiply-adds of matrix products and convolutions, two FLOPs each, and nothing else
(norms, softmax, activations, the optimizer and the embedding lookup are left out, as in PaLM's MFU, appendix B of
arXiv 2204.02311, and nanoGPT's estimate_mfu). Per token of a sequence of T, a decoder of L layers and width d with
N matmul weights (lm_head in, the input embedding out) does 2N + 4*L*d*T forward: the weights, then q k^T and attn v
(counted over the whole T x T score matrix, as PaLM counts it, although causal attention needs only half). The
backward pass costs twice the forward: once for the input gradient, once for the weight gradient. How much of that
a part pays depends on the freeze map:

    trained                                   forward + input grad + weight grad   6N   (attention 3x its forward)
    frozen, but something below it trains    forward + input grad                 4N   (attention 3x: dq, dk, dv)
    frozen, nothing below it trains           forward only                         2N   (attention 1x)

So the training FLOPs per token of a trained decoder are 6N + 12*L*d*T. Stage 1 trains the adaptor under a frozen
decoder, whose backward must still carry the gradient down to the adaptor: 4N + 12*L*d*T. The vision towers sit at
the bottom: frozen, they cost their forward only. A ViT with n patches does 2N*n + 4*L*d*n^2 per image forward;
SAM's windowed blocks attend inside windows (the window's token count in place of n, padding included) and add
decomposed relative-position terms (q against a learned table: 2*d*n*(h + w) per block, 0.5% of SAM-B);
convolutions (patch embeddings, SAM's neck, neck_hd and downsample convs) are counted directly. Autograd computes
no gradient for the input of a trained layer with nothing trained below it (SigLIP's patch embedding in stage 3,
SAM's 1x1 neck convs on the frozen trunk, the adaptor's first layer while SigLIP is frozen: low_up_proj, or the
SigLIP-only adaptor's layers.0); we charge 6N anyway, for one formula per part: the over-charge, the patch
embedding's input gradient, is 0.08% of SigLIP-L's training FLOPs.
MFU counts model FLOPs, not hardware FLOPs: recomputation under --grad_ckpt is not credited (PaLM's definition), nor
the flash kernels' recomputed scores in backward. (To check these counts with torch.utils.flop_counter's
FlopCounterMode, as tests/test_bench.py does, run attention with the math kernel: on the CPU, the default
attention kernel is not counted at all.)

Decoding one token at a time does too little arithmetic per weight for FLOPs to matter (2 FLOPs a row for each weight
read): its ceiling is memory bandwidth, every weight and every cached key and value read once per step. We print
tokens/s and that bound, and beside them the model FLOPs of a step, 2N + 4*L*d*S a row for S positions attended to,
and their MFU.

The tokenizer benchmark trains its tokenizers on the Python standard library's own source (the .py files next to
this interpreter), encodes a held-out tenth of those files, and caches the 100k tokenizer under ~/.cache/nanovl/ so
that reruns start at once (delete the file to retrain it after changing the trainer).
"""

import argparse
import contextlib
import difflib
import json
import math
import os
import platform
import sys
import sysconfig
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch

from nanovl import DeepSeekVL, get_config
from nanovl.checkpoint import check_device
from nanovl.config import LlamaConfig, SAMConfig, SigLIPConfig, VLConfig
from nanovl.recipe import TrainConfig, apply_freeze_map, clipping_groups, stage_optimizer, trainable_prefixes, under

CACHE = Path.home() / ".cache" / "nanovl"

# Per preset: train batch, train and prefill --seq (prefill runs batch 1), decode prompt and new tokens, images per
# vision batch. The scaled-down presets are sized for a CPU; the released ones for one GPU (the paper's 4096-token
# context, a 600-token prompt for decoding: one image of 576 tokens and a question).
DEFAULTS = {
    "tiny": dict(batch=4, seq=128, prompt_len=64, new=32, images=8),
    "small": dict(batch=8, seq=512, prompt_len=200, new=64, images=8),
    "1.3b": dict(batch=4, seq=4096, prompt_len=600, new=256, images=32),
    "1.3b-hybrid": dict(batch=4, seq=4096, prompt_len=600, new=256, images=32),
    "7b": dict(batch=1, seq=4096, prompt_len=600, new=256, images=32),
}
STEPS = {"train": 10, "prefill": 10, "decode": 3, "vision": 10}  # timed steps, after --warmup untimed ones

# ---------------------------------------------------------------------------------------------------------------------
# Devices: dense bf16 tensor-core peak (FLOP/s) and memory bandwidth (bytes/s), by words of the CUDA device name.
# Vendors quote the bf16 peak "with sparsity" (2:4 structured); dense matmuls get half of that.
#   H100 SXM, H200 SXM: 1,979 TFLOP/s with sparsity -> 989 dense; 3.35 and 4.8 TB/s (NVIDIA H100 and H200 datasheets,
#       nvidia.com/en-us/data-center/h100/ and /h200/; the H200 has the H100's compute and faster memory)
#   H100 NVL, H200 NVL: 1,671 -> 835; 3.9 and 4.8 TB/s (the same pages)
#   H100 PCIe: 1,513 -> 756; 2.0 TB/s (H100 PCIe product brief)
#   A100: 312 dense (624 with sparsity); 2,039 GB/s for the 80GB SXM, 1,935 for the 80GB PCIe, 1,555 for the 40GB
#       (NVIDIA A100 datasheet)
#   L4: 242 with sparsity -> 121; 300 GB/s (NVIDIA L4 datasheet)
#   GeForce RTX 4090: 165.2 dense bf16 with fp32 accumulation (330.4 with sparsity); 1,008 GB/s (NVIDIA Ada Lovelace
#       architecture whitepaper, table of the RTX 4090's specifications)
# The first row whose words all appear in the name wins, so the specific variants come first.
DEVICES = [
    (("H200", "NVL"), "H200 NVL", 835e12, 4.8e12),
    (("H200",), "H200 SXM", 989e12, 4.8e12),
    (("H100", "NVL"), "H100 NVL", 835e12, 3.9e12),
    (("H100", "PCIE"), "H100 PCIe", 756e12, 2.0e12),
    (("H100",), "H100 SXM", 989e12, 3.35e12),
    (("A100", "80GB", "PCIE"), "A100 80GB PCIe", 312e12, 1.935e12),
    (("A100", "80GB"), "A100 80GB SXM", 312e12, 2.039e12),
    (("A100",), "A100 40GB", 312e12, 1.555e12),
    (("L4",), "L4", 121e12, 0.3e12),
    (("RTX", "4090"), "RTX 4090", 165.2e12, 1.008e12),
]


class DeviceSpec(NamedTuple):
    label: str
    peak_flops: float  # dense bf16, FLOP/s
    bandwidth: float  # bytes/s


def device_spec(name: str):
    """The DEVICES row for a CUDA device name such as 'NVIDIA H100 80GB HBM3'; None for an unknown device or CPU."""
    words = set(name.upper().replace("-", " ").split())  # 'NVIDIA A100-SXM4-80GB' -> {NVIDIA, A100, SXM4, 80GB}
    for needed, label, peak, bandwidth in DEVICES:
        if all(w in words for w in needed):
            return DeviceSpec(label, peak, bandwidth)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The FLOP model. Each part reports its forward FLOPs in two buckets, because they scale differently in backward:
# `weights` are products with a learned matrix (they need a weight gradient when trained), `attention` the products
# of activations with activations (q k^T and attn v: no weights, but a backward whenever a gradient passes through).

class Forward(NamedTuple):
    weights: int
    attention: int


# How many forwards' worth of FLOPs each bucket costs in a training step, per mode of a part (see the docstring).
BACKWARD = {"train": (3, 3), "pass": (2, 3), "frozen": (1, 1)}  # mode: (weights, attention)


def step_flops(fwd: Forward, mode: str) -> int:
    """FLOPs of forward + backward for one part: 6N / 4N / 2N on its weights for train / pass / frozen."""
    w, a = BACKWARD[mode]
    return w * fwd.weights + a * fwd.attention


def llm_matmul_params(c: LlamaConfig) -> int:
    """N of the decoder: the weights of every matrix product. Per layer q, k, v, o (k and v narrower under grouped-
    query attention) and SwiGLU's gate, up and down; then lm_head. The input embedding is a table lookup, not a
    product, so it is left out; lm_head is a real product over the vocabulary and is kept (as nanoGPT and PaLM do).
    Norm weights scale elementwise: left out."""
    kv = c.n_kv_heads * c.head_dim
    per_layer = 2 * c.dim * c.dim + 2 * c.dim * kv + 3 * c.dim * c.ffn_dim
    return c.n_layers * per_layer + c.dim * c.vocab_size


def llm_forward_flops(c: LlamaConfig, T: int) -> Forward:
    """Forward FLOPs per token at sequence length T: 2N, and 4*L*d*T for q k^T and attn v over T keys (PaLM's count:
    the whole T x T matrix, with d = n_heads * head_dim also under grouped-query attention)."""
    return Forward(2 * llm_matmul_params(c), 4 * c.n_layers * c.dim * T)


def siglip_forward_flops(c: SigLIPConfig) -> Forward:
    """Forward FLOPs per image: 2*N*n + 4*L*d*n^2 with n = grid^2 patches, N the patch embedding's conv weights (one
    application per patch, so it counts like a linear layer) plus each block's qkv, proj, fc1 and fc2."""
    n, d, hidden = c.grid ** 2, c.width, int(c.width * c.mlp_ratio)
    n_params = 3 * c.patch_size ** 2 * d + c.depth * (4 * d * d + 2 * d * hidden)
    return Forward(2 * n_params * n, 4 * c.depth * d * n * n)


def sam_forward_flops(c: SAMConfig) -> dict:
    """Forward FLOPs per image of SAM's parts: 'trunk' (patch embedding and blocks, a Forward), 'neck' (one of the
    two necks: 1x1 then 3x3 conv) and 'downsamples' (the two stride-2 convs, once). The whole tower runs the trunk,
    neck and neck_hd, and the downsample convs twice (once per neck): sam_total_flops.

    Windowed blocks run qkv, proj and attention on the zero-padded grid (16x16 in windows of 6 is padded to 18x18),
    the MLP on the unpadded one, exactly as sam.Block does. The relative-position terms are q against a learned
    table, q . R_h over the window's h rows and q . R_w over its w columns: 2*d*(h + w) per token, counted as weights.
    """
    g, d, hidden = c.grid, c.width, int(c.width * c.mlp_ratio)
    weights = 2 * 3 * c.patch_size ** 2 * d * g * g  # patch embedding
    attention = 0
    for i in range(c.depth):
        s = g if i in c.global_blocks else c.window_size  # side of the square each attention call sees
        n_attn = (-(-g // s) * s) ** 2  # tokens through attention, padding included: ceil(g / s) windows a side
        weights += 2 * 4 * d * d * n_attn  # qkv (3 d^2) and proj (d^2)
        weights += 2 * d * n_attn * 2 * s  # relative positions: s rows + s columns per query
        weights += 2 * 2 * d * hidden * g * g  # MLP: lin1 and lin2
        attention += 4 * d * s * s * n_attn  # q k^T and attn v over the s*s keys of each query's window
    neck = 2 * d * c.neck_dim * g * g + 2 * 9 * c.neck_dim ** 2 * g * g  # 1x1 conv, 3x3 conv
    downsamples, side, c_in = 0, c.upsample_size, c.neck_dim
    for c_out in c.downsample_dims:
        side = (side + 1) // 2  # 3x3, stride 2, padding 1
        downsamples += 2 * 9 * c_in * c_out * side * side
        c_in = c_out
    return {"trunk": Forward(weights, attention), "neck": neck, "downsamples": downsamples}


def sam_total_flops(c: SAMConfig) -> Forward:
    """Forward FLOPs per image of the whole SAM tower: trunk, two necks, and the downsample convs on each."""
    f = sam_forward_flops(c)
    return Forward(f["trunk"].weights + 2 * f["neck"] + 2 * f["downsamples"], f["trunk"].attention)


def aligner_forward_flops(cfg: VLConfig) -> int:
    """Forward FLOPs per image of the adaptor: its linear layers on each of the image's tokens."""
    d, low = cfg.llm.dim, cfg.siglip.width
    if cfg.hybrid:  # high_up_proj and low_up_proj to d/2 each, then (depth - 1) d x d layers
        first = cfg.sam.out_dim * (d // 2) + low * (d // 2)
    else:
        first = low * d
    return 2 * cfg.n_image_tokens * (first + (cfg.aligner.depth - 1) * d * d)


# A part of the VLM, by parameter prefixes, and the parts below it in the data flow (whose training makes gradients
# pass through it). SAM is two parts, because stages 1-3 train its neck and downsample convs on a frozen trunk.
PARTS = {
    "siglip": (("siglip",), ()),
    "sam_trunk": (("sam.patch_embed", "sam.pos_embed", "sam.blocks"), ()),
    "sam_tail": (("sam.neck", "sam.neck_hd", "sam.downsamples", "sam.hd_alpha_downsamples"), ("sam_trunk",)),
    "aligner": (("aligner",), ("siglip", "sam_trunk", "sam_tail")),
    "llm": (("llm",), ("siglip", "sam_trunk", "sam_tail", "aligner")),
}


def part_modes(model: DeepSeekVL) -> dict:
    """'train', 'pass' or 'frozen' for each part the model has, read off its parameters' requires_grad."""
    trains = {}
    for part, (prefixes, _) in PARTS.items():
        flags = [p.requires_grad for n, p in model.named_parameters() if under(n, prefixes)]
        if flags:  # a SigLIP-only model has no SAM parts
            trains[part] = any(flags)
    return {part: "train" if trains[part] else "pass" if any(trains.get(u) for u in PARTS[part][1]) else "frozen"
            for part in trains}


def vlm_step_flops(cfg: VLConfig, modes: dict, B: int, T: int) -> dict:
    """FLOPs of one step over B rows of T tokens with one image each, per timed part (siglip, sam, aligner, llm).
    With every mode 'frozen' this is a forward pass (prefill)."""
    flops = {"siglip": B * step_flops(siglip_forward_flops(cfg.siglip), modes["siglip"])}
    if cfg.hybrid:
        f = sam_forward_flops(cfg.sam)
        tail = Forward(2 * f["neck"] + 2 * f["downsamples"], 0)
        flops["sam"] = B * (step_flops(f["trunk"], modes["sam_trunk"]) + step_flops(tail, modes["sam_tail"]))
    flops["aligner"] = B * step_flops(Forward(aligner_forward_flops(cfg), 0), modes["aligner"])
    flops["llm"] = B * T * step_flops(llm_forward_flops(cfg.llm, T), modes["llm"])
    return flops


def attended_positions(prompt_len: int, new: int) -> int:
    """The positions the new - 1 decoding steps after the prefill attend to, summed: prompt_len + i at step i."""
    steps = new - 1
    return steps * prompt_len + steps * (steps + 1) // 2  # sum over i = 1..steps of (prompt_len + i)


def decode_bytes(c: LlamaConfig, B: int, prompt_len: int, new: int, bytes_per: int) -> int:
    """Bytes the decoder must read from memory for the new - 1 steps after the prefill (which made the first token):
    every weight once per step (lm_head in; of the embedding only B rows, left out), plus the cached keys and values
    of every layer, over prompt_len + i positions at step i. The bound it gives is the least a step must read: the
    fixed-shape step (a CUDA graph, or compiled) reads the empty slots after them too, masked (for the 1.3B with
    a 600-token prompt and 256 new tokens, 0.8% more bytes a step), which the "of bound" figure does not credit."""
    weights = (llm_matmul_params(c) + (2 * c.n_layers + 1) * c.dim) * bytes_per  # matmuls and RMSNorm weights
    kv_per_position = 2 * c.n_layers * B * c.n_kv_heads * c.head_dim * bytes_per  # k and v, all layers
    return (new - 1) * weights + kv_per_position * attended_positions(prompt_len, new)


def decode_flops(c: LlamaConfig, B: int, prompt_len: int, new: int) -> int:
    """Model FLOPs of the same new - 1 steps as decode_bytes: per row and step 2N, and 4*L*d*S for the new token's
    query against the S = prompt_len + i positions it attends to (the fixed-shape step also reads the empty slots
    after them, masked: not model FLOPs)."""
    return B * ((new - 1) * 2 * llm_matmul_params(c) + 4 * c.n_layers * c.dim * attended_positions(prompt_len, new))


# ---------------------------------------------------------------------------------------------------------------------
# Timing and memory

class Clock:
    """Splits each timed step into named parts: mark(name) closes the part that ran since the previous mark. On CUDA
    it records events and reads them once at the end, so nothing synchronises inside a step; on CPU, where every op
    finishes before the next Python line, perf_counter is exact."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks = []  # (name closing here, or None at a step's start; an event or a time)

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self):
        self.marks.append((None, self._now()))

    def mark(self, name: str):
        self.marks.append((name, self._now()))

    def totals(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            if name is not None:
                out[name] = out.get(name, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        return out


def measure(step, steps: int, warmup: int, device: str) -> dict:
    """Run step(mark, i) warmup + steps times. Returns the seconds per timed step spent in each part the step
    marked, and their sum as 'total'. Warm-up steps (allocation, autotuning, compilation) are not timed."""
    for i in range(warmup):
        step(lambda name: None, i)
    if device == "cuda":
        torch.cuda.synchronize()
    clock = Clock(device)
    for i in range(warmup, warmup + steps):
        clock.start()
        step(clock.mark, i)
    parts = {name: t / steps for name, t in clock.totals().items()}
    parts["total"] = sum(parts.values())
    return parts


# Each timed run resets CUDA's peak statistics to measure its own working memory; the process's peak so far is kept
# here first, so that peak_memory() is the peak of every run of the process, not of the last one alone.
_cuda_peak_before_reset = 0


def reset_peak_memory():
    global _cuda_peak_before_reset
    _cuda_peak_before_reset = max(_cuda_peak_before_reset, torch.cuda.max_memory_allocated())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str):
    """(bytes, what they are): the most allocated at once since the model was built, over every run since (build()
    and the vision bench reset the count first: the fp32 initialisation and the freed decoder are not in it). On CPU
    there is no allocator to ask: the process's peak resident set size since it started, which includes Python,
    torch and anything run earlier."""
    if device == "cuda":
        return max(_cuda_peak_before_reset, torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"


def timed_run(step, args, device: str):
    """measure(), and the memory the run itself needed: on CUDA the peak allocated above what was allocated before
    it (its activations, gradients and optimizer state; not the weights, nor anything resident before it, such as a
    reference model); None on CPU, where the process's peak RSS cannot be split between runs."""
    before = None
    if device == "cuda":
        torch.cuda.synchronize()
        reset_peak_memory()
        before = torch.cuda.memory_allocated()
    parts = measure(step, args.steps, args.warmup, device)
    return parts, None if before is None else torch.cuda.max_memory_allocated() - before


def autocast_for(device: str, dtype):
    """Training precision: fp32 weights and optimizer, with the forward in bf16 autocast when --dtype bf16."""
    if dtype == torch.bfloat16:
        return lambda: torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext


def optimizer_for(net, device: str, stage: int = 3):
    """train.py's optimizer step for a stage, as one function: the gradient clipping (each of clipping_groups at
    grad_clip), then its AdamW (stage_optimizer: betas, weight decay, the vision side's learning-rate group, fused on
    CUDA and CPU) over net's trainable parameters."""
    tc = TrainConfig()
    opt = stage_optimizer(net, tc, {"lr": 1e-4, "vision_lr_mult": 0.1}, device)
    groups = clipping_groups(net, stage)

    def step():
        for group in groups.values():
            torch.nn.utils.clip_grad_norm_(group, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def build(cfg: VLConfig, device: str, dtype=None) -> DeepSeekVL:
    """The model, initialised on the device itself (a 7B model takes minutes to initialise on a CPU), then cast."""
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepSeekVL(cfg)
    model = model.to(device, dtype)  # and the constant buffers the towers make on the CPU
    if device == "cuda":
        # The fp32 weights before a cast to bf16 are no part of what the work needs (released bf16 weights load as
        # bf16): the process's peak memory starts from the model as it will run. (The 2026-11-29 H200 run reported
        # the 7B prefill's peak as 27.3 GiB, its fp32 initialisation, before this.)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return model


def synthetic_batch(cfg: VLConfig, B: int, T: int, device: str, image: bool = True, seed: int = 0):
    """B rows of T random ids, each (when image) with one image span after its first token; targets shifted by one
    as the collator makes them, -100 where the next token is an image placeholder or there is none; random pixels.
    Returns (ids (B, T), targets (B, T), images (B, 3, S, S) or None) on the device."""
    n = cfg.n_image_tokens
    if image and T < n + 2:
        raise ValueError(f"--seq {T} is too short for one image of {n} tokens plus text in the {cfg.name!r} model; "
                         f"use --seq {n + 2} or more")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.llm.vocab_size, (B, T), generator=g)
    ids[ids == cfg.image_token_id] = (cfg.image_token_id + 1) % cfg.llm.vocab_size  # no stray placeholders
    images = None
    if image:
        ids[:, 1:1 + n] = cfg.image_token_id
        images = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    targets[targets == cfg.image_token_id] = -100
    return ids.to(device), targets.to(device), images


# ---------------------------------------------------------------------------------------------------------------------
# Reference implementations, imported only for --compare. A missing one is reported and skipped, never fatal.

def reference(package: str, make):
    """make() under a guard: None, with a line saying which package is missing or what failed, instead of a crash."""
    try:
        return make()
    except ImportError as e:
        print(f"--compare: {package} is not installed ({e}); pip install {package} for this comparison. "
              "Showing nanovl's figures only.")
    except Exception as e:  # a reference that fails on this machine should not take nanovl's figures with it
        print(f"--compare: the {package} reference failed ({type(e).__name__}: {e}); showing nanovl's figures only.")
    return None


def hf_llama(c: LlamaConfig, device: str, dtype, weights=None):
    """transformers' LlamaForCausalLM with our dimensions, SDPA attention as ours, and our weights when given (a
    nanovl Llama state dict: HF's names are ours under `model.`, but for lm_head)."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    hf_cfg = HFLlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                           num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                           num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
                           rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False,
                           attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        hf = LlamaForCausalLM(hf_cfg)
    if weights is not None:
        hf.load_state_dict({(k if k.startswith("lm_head.") else "model." + k): v for k, v in weights.items()})
    hf.generation_config.eos_token_id = None  # random weights: never stop early, always make --new tokens
    return hf.to(dtype)


def timm_siglip(c: SigLIPConfig):
    """timm's ViT with DeepSeek's SigLIP settings: no class token, map pooling (built, never run), exact GELU, eps
    1e-6 (tests/test_vision.py's parity tests build it here too)."""
    from functools import partial

    import torch.nn as nn
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.width, depth=c.depth,
                             num_heads=c.n_heads, mlp_ratio=c.mlp_ratio, qkv_bias=True, class_token=False,
                             global_pool="map", num_classes=0, act_layer=nn.GELU,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6))


def sam_encoder(c: SAMConfig):
    """segment-anything's ImageEncoderViT: SAM's trunk and neck, without DeepSeek's neck_hd and downsample convs
    (tests/test_vision.py's parity tests build it here too)."""
    from functools import partial

    import torch.nn as nn
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    return ImageEncoderViT(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.width, depth=c.depth,
                           num_heads=c.n_heads, mlp_ratio=c.mlp_ratio, out_chans=c.neck_dim, qkv_bias=True,
                           norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU, use_abs_pos=True,
                           use_rel_pos=True, window_size=c.window_size, global_attn_indexes=c.global_blocks)


# ---------------------------------------------------------------------------------------------------------------------
# Printing

def si(x: float, unit: str) -> str:
    """1.234e12, 'FLOP/s' -> '1.23 TFLOP/s'."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def timed(args, what: str) -> str:
    """'3 steps timed after 2 warm-up', with the plural right."""
    plural = {"batch": "batches"}.get(what, what + "s")
    return f"{args.steps} {what if args.steps == 1 else plural} timed after {args.warmup} warm-up"


def mib(n: int) -> str:
    return f"{n / 2 ** 20:,.0f} MiB"


def table(header, rows, left: int = 1):
    """Print rows under a header: the first `left` columns (names) left-aligned, the others (figures) right-aligned.
    A column that is '-' in every row is left out."""
    keep = [i for i in range(len(header)) if any(str(r[i]) != "-" for r in rows)]
    rows = [[str(r[i]) for i in keep] for r in [header] + rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keep))]
    for r in rows:
        print("  ".join(x.ljust(w) if keep[i] < left else x.rjust(w)
                        for i, (x, w) in enumerate(zip(r, widths))).rstrip())
    print()


def figure(work: int, seconds: float, flops: int, memory, spec, unit: str) -> dict:
    """One run's figures: work (tokens or images) per second, model FLOPs and FLOP/s, MFU when the device's peak is
    known, and the memory it needed (timed_run's; None on CPU)."""
    achieved = flops / seconds
    return {unit.replace("/", "_per_"): work / seconds, "step_s": seconds, "flops": flops, "flops_per_s": achieved,
            "mfu": achieved / spec.peak_flops if spec else None, "memory_bytes": memory}


def time_runs(runs: dict, work: int, unit: str, args, device: str, spec, optional=(), partial=None) -> dict:
    """Time each of runs, {name: (fn(i), model FLOPs of one call)}, doing `work` tokens or images a call. A run named
    in `optional` (a reference, a compiled variant) that fails is reported and left out, so that it cannot take the
    other runs' figures with it; partial(figures so far) is called after each run."""
    figures = {}
    for name, (fn, flops) in runs.items():
        def step(mark, i, fn=fn):
            fn(i)
            mark("run")

        try:
            parts, memory = timed_run(step, args, device)
        except Exception as e:
            if name not in optional:
                raise
            report_failure(name, e, device)
            continue
        figures[name] = figure(work, parts["total"], flops, memory, spec, unit)
        if partial:
            partial(figures)
    return figures


def report_failure(name: str, e: Exception, device: str):
    """Say that an optional run failed, and free what it left on the device for the runs after it."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    print(f"{name}: failed ({type(e).__name__}: {first}); left out")
    if device == "cuda":
        traceback.clear_frames(e.__traceback__)  # the failed run's tensors are held by its frames' locals
        torch.cuda.empty_cache()


def print_runs(figures: dict, unit: str):
    """One row per run; the MFU and working-memory columns only where there are figures (a GPU)."""
    key = unit.replace("/", "_per_")
    rows = [[name, f"{f[key]:,.1f}", f"{f['step_s'] * 1e3:.2f}", si(f["flops"], "FLOP"), si(f["flops_per_s"], "FLOP/s"),
             "-" if f["mfu"] is None else f"{f['mfu']:.1%}",
             "-" if f["memory_bytes"] is None else mib(f["memory_bytes"])] for name, f in figures.items()]
    table(["", unit, "ms", "model FLOP", "achieved", "MFU", "working memory"], rows)


def ratio(figures: dict, ours: str, theirs: str, unit: str):
    """Print nanovl's throughput over the reference's (above 1: nanovl is faster), and return the reference's figures
    with nanovl's under "nanovl" and that ratio under "ratio"; None when either run failed."""
    if ours not in figures or theirs not in figures:
        return None
    key = unit.replace("/", "_per_")
    r = figures[ours][key] / figures[theirs][key]
    print(f"{ours} / {theirs}: {r:.2f}x {unit}")
    return {"name": theirs, **figures[theirs], "nanovl": figures[ours], "ratio": r}


def print_peak(device: str):
    memory, kind = peak_memory(device)
    print(f"peak memory: {mib(memory)} ({kind})"
          + ("; working memory above: the peak allocated during a run, above what was resident before it" if
             device == "cuda" else "") + "\n")
    return {"peak_memory_bytes": memory, "memory": kind}


# ---------------------------------------------------------------------------------------------------------------------
# The benchmarks. Each takes (args, cfg, device, dtype, spec), prints its tables, and returns its figures.

def cut(t):
    """A leaf copy of t: backward stops here, and t.backward(copy.grad) carries it on as a separate call. It asks for
    a gradient only if t had one (a frozen tower's output has none): else the cut step would compute gradients the
    plain step never does, and its times would not describe that step."""
    return None if t is None else t.detach().requires_grad_(t.requires_grad)


def towers_by_part(model: DeepSeekVL, images, mark):
    """The towers' features of the images, mark(part) closing each tower's time: (SigLIP's (B, n, c_low), SAM's
    (B, n, c_high) or None)."""
    low = model.siglip(model.siglip_input(images))  # (B, n, c_low)
    mark("siglip")
    high = None
    if model.sam is not None:
        high = model.sam(images)  # (B, n, c_high)
        mark("sam")
    return low, high


def backward_by_part(model: DeepSeekVL, ids, targets, images, autocast, mark):
    """DeepSeekVL.forward and the loss's backward, written out with a cut between the parts, so that each part's
    backward is a call of its own and mark(part) closes the part's forward and backward time. The gradients are
    those of model(ids, images, targets=targets)[1].backward() (tests/test_bench.py checks)."""
    is_image = ids == model.cfg.image_token_id  # (B, T)
    with autocast():
        low, high = towers_by_part(model, images, mark)
        low_in, high_in = cut(low), cut(high)
        emb = model.aligner(low_in, high_in)  # (B, n, C); high is None unless hybrid
        mark("aligner")
        emb_in = cut(emb)
        x = model.llm.embed_tokens(ids)  # (B, T, C)
        x = x.masked_scatter(is_image[..., None], emb_in.to(x.dtype))
        _, loss = model.llm(embeds=x, targets=targets)
    loss.backward()
    mark("llm")
    if emb.requires_grad:
        emb.backward(emb_in.grad)
    mark("aligner")
    if high is not None:
        if high.requires_grad:
            high.backward(high_in.grad)
        mark("sam")
    if low.requires_grad:
        low.backward(low_in.grad)
    mark("siglip")
    return loss


def forward_by_part(model: DeepSeekVL, ids, images, cache, mark):
    """DeepSeekVL.forward of a prompt into the cache (the last position's logits only), written out part by part so
    that mark(part) closes each part's time: the logits of model(ids, images, cache=cache, last_only=True)
    (tests/test_bench.py checks). Without the forward's input checks, whose one device sync would fall in a part."""
    low, high = towers_by_part(model, images.to(model.dtype), mark)
    emb = model.aligner(low, high)  # (B, n, C); high is None unless hybrid
    mark("aligner")
    x = model.llm.embed_tokens(ids)  # (B, T, C)
    x = x.masked_scatter((ids == model.cfg.image_token_id)[..., None], emb.to(x.dtype))
    logits, _ = model.llm(embeds=x, cache=cache, last_only=True)  # (B, 1, vocab)
    mark("llm")
    return logits


def print_parts(parts: dict, flops: dict, labels: dict, note: str, modes=None):
    """Where the time goes: a row per part (seconds a step, share, model FLOPs, FLOP/s), with its mode when given."""
    rows = [[labels[name], "-" if modes is None else modes.get(name, "-"), f"{t * 1e3:.2f}",
             f"{t / sum(parts.values()):.1%}", si(flops[name], "FLOP") if name in flops else "-",
             si(flops[name] / t, "FLOP/s") if name in flops and t > 0 else "-"] for name, t in parts.items()]
    print(f"where the time goes ({note})")
    table(["part", "mode", "ms/step", "share", "model FLOP", "achieved"], rows, left=2)


def bench_train(args, cfg, device, dtype, spec):
    """One optimizer step on synthetic batches made up front: the VLM under a stage's freeze map, or (--llm-only)
    the decoder on text. Timed twice: as train.py runs it (the headline), then cut at each part's boundary, where a
    detached copy of the part's output lets each part's backward run as its own timed call (where the time goes);
    with --llm-only once, the plain step's own marks saying where its time goes."""
    model = build(cfg, device)
    B, T = args.batch, args.seq
    if args.llm_only:
        model.requires_grad_(False)
        model.llm.requires_grad_(True)
        modes = {"llm": "train"}
        flops = {"llm": B * T * step_flops(llm_forward_flops(cfg.llm, T), "train")}
    else:
        apply_freeze_map(model, trainable_prefixes(args.stage, cfg))
        modes = part_modes(model)
        flops = vlm_step_flops(cfg, modes, B, T)
    batches = [synthetic_batch(cfg, B, T, device, image=not args.llm_only, seed=s) for s in range(2)]
    model.llm.grad_checkpointing = args.grad_ckpt
    if args.compile:
        for part in (model.siglip, model.sam, model.aligner, model.llm):
            if part is not None:
                part.compile()  # in place: model.forward and the cut step both call the compiled parts
    optimizer_step = optimizer_for(model, device, args.stage)
    autocast = autocast_for(device, dtype)
    model.train()

    def plain_step(mark, i):
        ids, targets, images = batches[i % len(batches)]
        mark("data")
        with autocast():
            _, loss = model.llm(ids, targets=targets, check_ids=False) if args.llm_only else \
                model(ids, images, targets=targets, check_inputs=False)  # (as train.py: no read-back in a step)
        loss.backward()
        mark("llm" if args.llm_only else "forward+backward")
        optimizer_step()
        mark("optimizer")

    def cut_step(mark, i):
        ids, targets, images = batches[i % len(batches)]
        mark("data")
        backward_by_part(model, ids, targets, images, autocast, mark)
        optimizer_step()
        mark("optimizer")

    plain, memory = timed_run(plain_step, args, device)
    figures = {"nanovl": figure(B * T, plain["total"], sum(flops.values()), memory, spec, "tokens/s")}
    what = "the decoder alone, on text" if args.llm_only else f"stage {args.stage}, one image a row, its " \
        f"{cfg.n_image_tokens} tokens counted in tokens/s"
    print(f"training step: batch {B} x {T} tokens ({what})")
    print(f"train.py's AdamW and clipping; {timed(args, 'step')}" +
          (", compiled" if args.compile else "") + (", decoder activation checkpointing" if args.grad_ckpt else ""))
    print("modes: " + ", ".join(f"{p} {m}" for p, m in modes.items()) +
          f"; {sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters trained\n")
    print_runs(figures, "tokens/s")
    result = {**figures["nanovl"], **print_peak(device), "modes": modes, "flops_by_part": flops}
    args.partial(result)

    # Where the time goes.
    if args.llm_only:
        parts, note = {k: v for k, v in plain.items() if k != "total"}, "marks in the plain step"
    else:
        parts = measure(cut_step, args.steps, args.warmup, device)
        note = f"the step cut at each part's boundary: {parts.pop('total') * 1e3:.1f} ms a step, against " \
               f"{plain['total'] * 1e3:.1f} ms uncut"
    # (each part forward, and backward too unless its mode, in the next column, says frozen)
    labels = {"data": "data (synthetic, made up front)", "siglip": "SigLIP", "sam": "SAM", "aligner": "adaptor",
              "llm": "language model", "optimizer": "optimizer (clip, AdamW)"}
    print_parts(parts, flops, labels, note, dict(modes, sam=f"trunk {modes.get('sam_trunk')}, tail "
                                                          f"{modes.get('sam_tail')}"))
    result["parts_s"] = parts
    args.partial(result)

    if args.compare:
        del plain_step, cut_step, optimizer_step, batches  # free our optimizer state and batches first
        result["reference"] = compare_train(args, cfg, model, device, dtype, spec)
    return result


def compare_train(args, cfg, model, device, dtype, spec):
    """Our decoder's training step, then transformers' LlamaForCausalLM's (its own random init), on the same text
    batches with the same AdamW, autocast and checkpointing. Ours is freed before the reference is built, so each runs
    alone on the device (a 7B decoder in fp32 with AdamW would not fit twice) and its working memory is its own. The
    reference runs eager, as it ships (the ratio the targets are set against); with --compile, also compiled."""
    if reference("transformers", lambda: __import__("transformers")) is None:  # say so before spending any time
        return None
    B, T = args.batch, args.seq
    autocast = autocast_for(device, dtype)
    batches = [synthetic_batch(cfg, B, T, device, image=False, seed=s) for s in range(2)]
    flops = B * T * step_flops(llm_forward_flops(cfg.llm, T), "train")

    reference_runs = ("transformers LlamaForCausalLM", "transformers LlamaForCausalLM, compiled")

    def time_training(name, net, loss_fn):
        net.train().requires_grad_(True)
        optimizer_step = optimizer_for(net, device)

        def step(i):
            ids, targets, _ = batches[i % len(batches)]
            with autocast():
                loss = loss_fn(net, ids, targets)
            loss.backward()
            optimizer_step()

        return time_runs({name: (step, flops)}, B * T, "tokens/s", args, device, spec, optional=reference_runs)

    llm, model.llm = model.llm, None
    model.siglip = model.sam = model.aligner = None  # only the decoder takes part
    # (check_ids=False: the range check reads a count back from the device, a sync the plain step skips too)
    figures = time_training("nanovl Llama", llm,
                            lambda net, ids, targets: net(ids, targets=targets, check_ids=False)[1])
    del llm  # with its gradients and optimizer state, before the reference is built
    if device == "cuda":
        torch.cuda.empty_cache()
    hf = reference("transformers", lambda: hf_llama(cfg.llm, device, torch.float32))
    if hf is None:
        return None
    if args.grad_ckpt:
        hf.gradient_checkpointing_enable()

    def hf_loss(net, ids, targets):
        # HF shifts the labels inside its loss; ours take targets already shifted: the same T - 1 predictions a row.
        return net(input_ids=ids, labels=ids).loss

    # The reference as it ships (eager), which the targets are set against; with --compile, compiled as well.
    figures.update(time_training("transformers LlamaForCausalLM", hf, hf_loss))
    if args.compile:
        hf.compile()
        figures.update(time_training("transformers LlamaForCausalLM, compiled", hf, hf_loss))
    print(f"--compare: the decoder's training step, batch {B} x {T} text tokens, the same AdamW, each model alone" +
          ("; nanovl compiled" if args.compile else ""))
    print_runs(figures, "tokens/s")
    out = ratio(figures, "nanovl Llama", "transformers LlamaForCausalLM", "tokens/s")
    if out is not None and args.compile:
        out["compiled"] = ratio(figures, "nanovl Llama", "transformers LlamaForCausalLM, compiled", "tokens/s")
    print()
    return out


def bench_prefill(args, cfg, device, dtype, spec):
    """A forward pass over a prompt of --seq tokens (one image, then text) into a KV cache."""
    model = build(cfg, device, dtype).eval()
    B, T = args.batch, args.seq
    ids, _, images = synthetic_batch(cfg, B, T, device)
    cache = model.llm.new_cache(B, max_len=T)  # allocated once; each run writes every slot it reads again

    def prefill(i):
        cache.length = 0
        # a prompt's forward for generation: only the last position's logits are needed (and computed)
        model(ids, images, cache=cache, last_only=True)

    def prefill_by_part(mark, i):
        cache.length = 0
        forward_by_part(model, ids, images, cache, mark)

    # lm_head runs on the last position only (last_only): the other T - 1 positions' logits are not model FLOPs.
    unused_head = B * (T - 1) * 2 * cfg.llm.dim * cfg.llm.vocab_size
    flops = vlm_step_flops(cfg, {p: "frozen" for p in PARTS}, B, T)
    flops["llm"] -= unused_head
    runs = {"nanovl": (prefill, sum(flops.values()))}
    print(f"prefill: batch {B} x {T} tokens (one image of {cfg.n_image_tokens} tokens, then text) into a KV cache; "
          f"{timed(args, 'run')}\n")
    with torch.inference_mode():
        figures = time_runs(runs, B * T, "tokens/s", args, device, spec)
        print_runs(figures, "tokens/s")
        parts = measure(prefill_by_part, args.steps, args.warmup, device)
    total = parts.pop("total")
    print_parts(parts, flops, {"siglip": "SigLIP" + (" (and its input's resize)" if cfg.hybrid else ""),
                               "sam": "SAM", "aligner": "adaptor", "llm": "language model (embedding, decoder, head)"},
                f"the forward written out part by part: {total * 1e3:.1f} ms, against "
                f"{figures['nanovl']['step_s'] * 1e3:.1f} ms as one call")
    result = {**figures["nanovl"], "flops_by_part": flops, "parts_s": parts, **print_peak(device)}
    args.partial(result)
    if args.compare:  # the decoder alone on a text prompt of the same length, against transformers
        hf = reference("transformers", lambda: hf_llama(cfg.llm, device, dtype, model.llm.state_dict()))
        if hf is not None:
            text, _, _ = synthetic_batch(cfg, B, T, device, image=False)

            def prefill_text(i):
                cache.length = 0
                model.llm(text, cache=cache, last_only=True, check_ids=False)

            flops = B * T * step_flops(llm_forward_flops(cfg.llm, T), "frozen") - unused_head
            runs = {"nanovl Llama": (prefill_text, flops),
                    "transformers LlamaForCausalLM": (lambda i: hf(input_ids=text, use_cache=True, logits_to_keep=1),
                                                      flops)}
            with torch.inference_mode():
                figures = time_runs(runs, B * T, "tokens/s", args, device, spec,
                                    optional=("transformers LlamaForCausalLM",))
            print(f"--compare: the decoder's prefill, batch {B} x {T} text tokens, same weights")
            print_runs(figures, "tokens/s")
            result["reference"] = ratio(figures, "nanovl Llama", "transformers LlamaForCausalLM", "tokens/s")
    return result


def greedy(prefill, cache, llm, new: int, mark):
    """Greedy decoding: the prompt in one pass (its last logits give the first new token), then one token per call
    through the cache. Returns the new tokens (B, new). Marks 'prefill', 'first step' and 'decode' (the rest)."""
    cache.length = 0
    logits, _ = prefill(cache)  # (B, 1, vocab): the last position only
    tok = logits[:, -1:].argmax(-1)  # (B, 1), left on the device: no sync
    mark("prefill")
    out = [tok]
    for i in range(new - 1):
        logits, _ = llm(tok, cache=cache, last_only=True, check_ids=False)  # (B, 1, vocab); argmax ids: no check
        tok = logits[:, -1:].argmax(-1)
        out.append(tok)
        if i == 0:
            mark("first step")
    mark("decode")
    return torch.cat(out, dim=1)  # (B, new)


def bench_decode(args, cfg, device, dtype, spec):
    """Greedy decoding of --new tokens after a --prompt-len prompt (one image and text when it fits), batch --batch.
    Two ways: the bare loop over the model and its KV cache (greedy above: forward with T = 1, the simple path), and
    nanovl.generate, which sample.py runs (its DecodeStep: fixed shapes and a CUDA graph on a GPU; with --compile also
    compiled, as a third run). The prefill is timed up to the first new token, then the first decoding step on its
    own (nanovl.generate records its CUDA graph there, once a generation), and tokens/s counts the new - 2 tokens
    made one at a time after that: the steady state. The headline is nanovl.generate's (compiled, with --compile)."""
    from nanovl.generate import DecodeStep, Sampling, generate

    B, P, new = args.batch, args.prompt_len, args.new  # (main: new >= 3, the first two timed apart)
    model = build(cfg, device, dtype).eval()
    with_image = P >= cfg.n_image_tokens + 2
    ids, _, images = synthetic_batch(cfg, B, P, device, image=with_image)
    cache = model.llm.new_cache(B, max_len=P + new)

    def timed_generation(run):
        """{prefill_s, first_step_s, decode_s, tokens_per_s} of run(mark) -> new ids (B, new), which marks 'prefill'
        when the first new token is made, 'first step' at the second, and 'decode' at the end; and the ids of the
        last run."""
        made = []

        @torch.inference_mode()
        def step(mark, i):
            made[:] = [run(mark)]

        parts = timed_run(step, args, device)[0]
        return {"prefill_s": parts["prefill"], "first_step_s": parts["first step"], "decode_s": parts["decode"],
                "tokens_per_s": B * (new - 2) / parts["decode"]}, made[0]

    def library(prompt, images, compile=False, stack=True):
        def run(mark):
            first = []

            def on_step(nxt):  # nanovl.generate calls this after each new token
                if len(first) < 2:
                    mark(("prefill", "first step")[len(first)])
                    first.append(True)

            DecodeStep.stack = stack
            try:
                out = generate(model, prompt.tolist(), images, Sampling(max_new_tokens=new), on_step=on_step,
                               compile=compile)
            finally:
                DecodeStep.stack = True
            mark("decode")
            return torch.tensor(out, device=device)

        return timed_generation(run)

    def all_runs(prompt, images):
        """The loop, nanovl.generate, and with --compile nanovl.generate compiled (and with --separate-projections
        compiled again, each projection its own product): {name: figures}, and how many leading tokens each gives as
        the loop does in every row."""
        loop, loop_ids = timed_generation(lambda mark: greedy(
            lambda cache: model(prompt, images, cache=cache, last_only=True), cache, model.llm, new, mark))
        runs, same = {"nanovl loop (model + KVCache)": loop}, {}
        variants = [("nanovl.generate", False, True)]
        if args.compile:
            variants.append(("nanovl.generate, compiled", True, True))
        if args.separate_projections:  # an A/B of stacked_weights in one process (separate compilations vary)
            variants.append(("nanovl.generate, compiled, projections one by one", True, False))
        for name, compile, stack in variants:
            try:
                runs[name], their_ids = library(prompt, images, compile, stack)
            except Exception as e:  # a compiler that fails on this machine leaves the other figures standing
                if not compile:
                    raise
                report_failure(name, e, device)
                continue
            same[name] = leading_agreement(loop_ids, their_ids)
        return runs, same, loop_ids

    # the new - 2 steady steps, at cache lengths P + 2 .. P + new - 1: as if the prompt were one token longer
    need = decode_bytes(cfg.llm, B, P + 1, new - 1, torch.finfo(dtype).bits // 8)
    flops = decode_flops(cfg.llm, B, P + 1, new - 1)
    bound = spec and B * (new - 2) / (need / spec.bandwidth)
    print(f"decode: batch {B}, prompt {P} tokens ({'one image, then text' if with_image else 'text'}), {new} new "
          f"tokens, greedy; {timed(args, 'generation')}" + (", nanovl.generate also compiled" if args.compile else ""))
    print(f"each decode step must read {si(need / (new - 2), 'B')} (weights + KV cache)" +
          (f": at {spec.label}'s {si(spec.bandwidth, 'B/s')}, at most {bound:,.0f} tokens/s" if spec else "") +
          f"; its model FLOPs are {si(flops / (new - 2), 'FLOP')}, {2 * B} for each weight read (bandwidth, not "
          "FLOP/s, bounds decoding)\n")
    def headline_of(runs):  # nanovl.generate compiled, unless that was not asked for or failed
        return "nanovl.generate, compiled" if "nanovl.generate, compiled" in runs else "nanovl.generate"

    runs, same, _ = all_runs(ids, images)
    print_decoding(runs, need, bound, new, flops, spec)
    print_agreement(same, new)
    headline = headline_of(runs)
    result = {**runs[headline], "runs": runs, "same_tokens_as_loop": same, "bytes_per_step": need / (new - 2),
              "bytes_per_s": need / runs[headline]["decode_s"], "bound_tokens_per_s": bound,
              "flops_per_step": flops / (new - 2), "flops_per_s": flops / runs[headline]["decode_s"],
              "mfu": spec and flops / runs[headline]["decode_s"] / spec.peak_flops, **print_peak(device),
              "prompt_len": P, "new": new}
    args.partial(result)

    def compare():
        """The decoder on a text prompt, against transformers' generate with the same weights."""
        hf = reference("transformers", lambda: hf_llama(cfg.llm, device, dtype, model.llm.state_dict()))
        if hf is None:
            return
        from transformers import StoppingCriteria, StoppingCriteriaList

        class MarkFirstToken(StoppingCriteria):
            """Called by generate after each new token: marks the first two, and never stops (it returns no sync)."""

            def __init__(self, mark):
                self.mark, self.seen = mark, 0

            def __call__(self, input_ids, scores, **kwargs):
                if self.seen < 2:
                    self.mark(("prefill", "first step")[self.seen])
                    self.seen += 1
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        def hf_run(mark):
            out = hf.generate(text, attention_mask=torch.ones_like(text), max_new_tokens=new, do_sample=False,
                              use_cache=True, pad_token_id=0,
                              stopping_criteria=StoppingCriteriaList([MarkFirstToken(mark)]))
            mark("decode")
            return out[:, P:]

        text, _, _ = synthetic_batch(cfg, B, P, device, image=False)
        runs, same, loop_ids = all_runs(text, None)
        try:
            runs["transformers generate"], their_ids = timed_generation(hf_run)
        except Exception as e:
            report_failure("transformers generate", e, device)
            return
        if their_ids.shape != (B, new):
            raise RuntimeError(f"transformers generated {tuple(their_ids.shape)} tokens, expected {(B, new)}")
        same["transformers generate"] = leading_agreement(loop_ids, their_ids)
        print(f"--compare: greedy decoding, batch {B}, a text prompt of {P}, {new} new tokens, the same weights")
        print_decoding(runs, need, bound, new, flops, spec)
        print_agreement(same, new)
        theirs = runs.pop("transformers generate")
        headline = headline_of(runs)
        result["reference"] = {"name": "transformers generate", **theirs, "nanovl": runs, "same_tokens_as_loop": same,
                               "ratio": runs[headline]["tokens_per_s"] / theirs["tokens_per_s"]}
        print(f"decode tokens/s of {headline} over transformers': {result['reference']['ratio']:.2f}x\n")

    if args.compare:
        compare()
    # Last, where a step of the headline goes: the profiler is the last thing the process does (a profiler that
    # breaks on this machine then takes none of the figures above with it).
    try:
        per_step_s = runs[headline]["decode_s"] / (new - 2)  # a step makes a token in every row
        result["breakdown"] = decode_breakdown(model, ids, images, new, headline.endswith("compiled"), device,
                                               per_step_s)
        print_decode_breakdown(result["breakdown"], headline, per_step_s, bound)
        args.partial(result)
    except Exception as e:
        report_failure("where a token goes", e, device)
    return result


def leading_agreement(a, b) -> int:
    """How many leading tokens two (B, n) greedy generations share in every row."""
    n = min(a.shape[1], b.shape[1])
    return int((a[:, :n] == b[:, :n]).all(dim=0).long().cumprod(0).sum())


def print_agreement(same: dict, new: int):
    """Random weights in bf16 make near-ties between logits, where two correct implementations may pick differently
    and then go their own ways; the leading tokens show they agree up to the first such tie."""
    print("greedy tokens equal to the loop's, in every row, from the start: " +
          ", ".join(f"{name} {n} of {new}" for name, n in same.items()) + "\n")


def print_decoding(runs: dict, need: int, bound, new: int, flops: int, spec):
    """need, flops: the bytes read and the model FLOPs of the steady new - 2 steps; bound: tokens/s, or None."""
    table(["", "prefill ms", "first step ms", "decode tokens/s", "ms/step", "achieved B/s", "of bound", "achieved",
           "MFU"],
          [[name, f"{f['prefill_s'] * 1e3:.2f}", f"{f['first_step_s'] * 1e3:.2f}", f"{f['tokens_per_s']:,.1f}",
            f"{f['decode_s'] / (new - 2) * 1e3:.2f}", si(need / f["decode_s"], "B/s"),
            "-" if bound is None else f"{f['tokens_per_s'] / bound:.1%}", si(flops / f["decode_s"], "FLOP/s"),
            "-" if spec is None else f"{flops / f['decode_s'] / spec.peak_flops:.2%}"]
           for name, f in runs.items()])


def decode_breakdown(model, prompt, images, new: int, compile: bool, device: str, per_step_s: float,
                     top: int = 12) -> dict:
    """Where nanovl.generate's time per token goes, in two measurements after the same prompt.

    1. Its step alone (DecodeStep: on a GPU the replayed CUDA graph), called back to back with nothing between, new - 2
       times. What generate spends beyond that per step (per_step_s, a token in every row) is its own loop: the
       kernels that pick the token and the bookkeeping between steps, and whatever of the host's work (the question
       whether every row has stopped, asked once a token) the GPU still waits for.
    2. The step's own work: run 5 times without the graph (step.run, the plain or compiled decode_step) under
       torch.profiler, its GPU kernels (on CPU, its ops) summed by name. Their sum against the replay's time in 1
       shows what the graph still spends between kernels.
    Returns {step_s, loop_s, kernels_s, kernels: the top ones [{name, calls, s}] per step, n_kinds: how many kinds
    there were, device, batch}."""
    from torch.profiler import ProfilerActivity, profile

    from nanovl.generate import DecodeStep

    B, P = prompt.shape

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        # Made in inference mode, as generate's cache was in the timed runs: a cache of ordinary tensors would not
        # match the compiled step's guards, and torch.compile would compile it again.
        cache = model.llm.new_cache(B, max_len=P + new)
        logits, _ = model(prompt, images, cache=cache, last_only=True)
        tok = logits[:, -1:].argmax(-1)  # (B, 1): fed again at every step; the step's cost does not depend on it
        step = DecodeStep(model.llm, cache, compile)
        step(tok)  # records the graph on a GPU (and compiles, with compile)
        step(tok)
        n = new - 2  # the cache's P + new slots: P for the prompt, 2 for the warm-up, n timed
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step(tok)
        sync()
        step_s = (time.perf_counter() - t0) / n
        runs = 5  # each rewrites the last slot written (step.pos), inside the cache
        if device != "cuda":  # the profiler's log then says only that it found no GPU (level 5 hides its errors)
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=kinds) as prof:
            for _ in range(runs):
                step.run(step.tok, cache, step.pos, None if step.fixed else cache.length)  # (the slots up to pos)
            sync()

    def self_us(e):  # a kernel's own time on the GPU, or an op's on the CPU
        return e.self_device_time_total if device == "cuda" else e.self_cpu_time_total

    from torch.autograd import DeviceType

    # A user annotation's time on the GPU spans the kernels inside it, which are counted already: left out.
    wanted = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
    rows = sorted(((e.key, e.count / runs, self_us(e) / 1e6 / runs) for e in prof.key_averages()
                   if e.device_type == wanted and not getattr(e, "is_user_annotation", False) and self_us(e) > 0),
                  key=lambda r: -r[2])
    if not rows:  # on a GPU, a profiler that could not trace the device (CUPTI) says nothing: say it here
        raise RuntimeError("the profiler recorded no " + ("kernel on the GPU" if device == "cuda" else "op"))
    return {"step_s": step_s, "loop_s": per_step_s - step_s, "kernels_s": sum(r[2] for r in rows),
            "kernels": [{"name": name, "calls": calls, "s": s} for name, calls, s in rows[:top]],
            "n_kinds": len(rows), "device": device, "batch": B}


def print_decode_breakdown(b: dict, headline: str, per_step_s: float, bound):
    """decode_breakdown's figures; bound: the bandwidth bound in tokens/s (all rows), or None."""
    tokens_per_s = b["batch"] / b["step_s"]
    print(f"where a step of {headline} goes (batch {b['batch']}, a token a row): {per_step_s * 1e3:.3f} ms; the "
          f"step alone, called back to back, {b['step_s'] * 1e3:.3f} ms ({tokens_per_s:,.0f} tokens/s" +
          (f", {tokens_per_s / bound:.1%} of the bound" if bound else "") +
          f"); generate's own loop (picking, bookkeeping, the stop check) the other {b['loop_s'] * 1e3:.3f} ms" +
          (" (below 0: within the timings' noise; time more steps)" if b["loop_s"] < 0 else ""))
    what, unit = ("kernel", "GPU") if b["device"] == "cuda" else ("op", "self CPU")
    print(f"the step run without a graph under torch.profiler: its {what}s' {unit} time, {b['kernels_s'] * 1e3:.3f} "
          "ms a step in all")
    rows = [[k["name"][:70], f"{k['calls']:g}", f"{k['s'] * 1e6:,.1f}", f"{k['s'] / b['kernels_s']:.1%}"]
            for k in b["kernels"]]
    shown = sum(k["s"] for k in b["kernels"])
    if b["n_kinds"] > len(b["kernels"]):
        rows.append([f"the other {b['n_kinds'] - len(b['kernels'])}", "", f"{(b['kernels_s'] - shown) * 1e6:,.1f}",
                     f"{(b['kernels_s'] - shown) / b['kernels_s']:.1%}"])
    table([what, "calls/step", "us/step", "share"], rows)
    print()


def bench_vision(args, cfg, device, dtype, spec):
    """Images per second through SigLIP (on its low-resolution input), SAM (whole, and the trunk + neck that
    segment-anything also has) and the whole encode_images (both towers, the resize and the adaptor). --compile also
    times SigLIP and SAM's trunk + neck through torch.compile, the two that are compared with the references."""
    model = build(cfg, device, dtype).eval()
    # Of the decoder, encode_images reads only the dtype: its weights (12.9 GiB of the 7B's, in bf16) would only swell
    # the peak memory. Made shapes without storage, they leave it (on a GPU, whose peak is reset below; the CPU's
    # peak RSS has held them already).
    model.llm.to("meta")
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    N = args.batch
    images = torch.rand(N, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    images = images.to(device, dtype)
    low = model.siglip_input(images)  # (N, 3, s, s): SigLIP's input
    f_siglip = sum(siglip_forward_flops(cfg.siglip))
    work = {"nanovl SigLIP": (lambda: model.siglip(low), N * f_siglip)}  # {name: (fn(), model FLOPs)}
    if cfg.hybrid:
        f_sam = sam_forward_flops(cfg.sam)
        f_trunk_neck = sum(f_sam["trunk"]) + f_sam["neck"]
        work["nanovl SAM"] = (lambda: model.sam(images), N * sum(sam_total_flops(cfg.sam)))
        # (the trunk's last block's output, channels-last (B, H, W, C), into the neck's convs as (B, C, H, W))
        work["nanovl SAM trunk + neck"] = (lambda: model.sam.neck(model.sam.trunk(images)[0].permute(0, 3, 1, 2)),
                                           N * f_trunk_neck)
    whole = sum(vlm_step_flops(cfg, {p: "frozen" for p in PARTS}, N, 0).values())  # T = 0: no decoder
    # (check=False: the towers' work, without the pixel check's read-back from the device, as forward calls it)
    work["nanovl encode_images"] = (lambda: model.encode_images(images, check=False), whole)
    compared = {"nanovl SigLIP": "timm VisionTransformer",  # {ours: the reference it is compared with}
                "nanovl SAM trunk + neck": "segment-anything ImageEncoderViT"}
    if args.compile:
        for name in [n for n in compared if n in work]:
            fn, flops = work[name]
            work[name + ", compiled"] = (torch.compile(fn), flops)
            compared[name + ", compiled"] = compared[name]
    if args.compare:
        timm_vit = reference("timm", lambda: timm_siglip(cfg.siglip).to(device, dtype).eval())
        if timm_vit is not None:
            work["timm VisionTransformer"] = (lambda: timm_vit.forward_features(low), N * f_siglip)
        if cfg.hybrid:
            sam_vit = reference("segment-anything", lambda: sam_encoder(cfg.sam).to(device, dtype).eval())
            if sam_vit is not None:
                work["segment-anything ImageEncoderViT"] = (lambda: sam_vit(images), N * f_trunk_neck)
    print(f"vision: batches of {N} at {cfg.image_size} px" + (f" (SigLIP's input resized to "
          f"{cfg.siglip.image_size})" if cfg.hybrid else "") + f"; {timed(args, 'batch')}" +
          (", compiled ones compiled in the warm-up" if args.compile else "") + "\n")
    optional = [name for name in work if name.endswith(", compiled") or not name.startswith("nanovl")]
    with torch.inference_mode():
        figures = time_runs({name: (lambda i, fn=fn: fn(), flops) for name, (fn, flops) in work.items()}, N,
                            "images/s", args, device, spec, optional, lambda done: args.partial({"runs": done}))
    print_runs(figures, "images/s")
    result = {"images_per_s": figures["nanovl encode_images"]["images_per_s"], "runs": figures}
    if args.compare:
        result["reference"] = [ratio(figures, ours, theirs, "images/s") for ours, theirs in compared.items()
                               if ours in figures and theirs in figures] or None
        print()
    result.update(print_peak(device))
    return result


def stdlib_texts():
    """The standard library's .py files as text, split 9:1 into (training texts, held-out texts)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts)
    train, held_out = [], []
    for i, f in enumerate(files):
        (held_out if i % 10 == 1 else train).append(f.read_text(encoding="utf-8", errors="replace"))
    return train, held_out


def bench_tokenizer(args):
    from nanovl.tokenizer import Tokenizer

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
    if affinity:  # one core: the tokenizer is plain single-threaded Python anyway
        os.sched_setaffinity(0, {min(affinity)})
    try:
        return _bench_tokenizer(args, Tokenizer)
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)


def _bench_tokenizer(args, Tokenizer):
    for name in ("mb", "small_corpus_mb"):
        if not 0 < getattr(args, name) < math.inf:
            raise SystemExit(f"--{name.replace('_', '-')} must be a finite number above 0, got {getattr(args, name)}")
    # Every setting is checked before the small tokenizer trains (seconds): a bad one is said at once.
    from nanovl.tokenizer import SPECIAL_TOKENS
    first = len(SPECIAL_TOKENS) + 256  # the special tokens and the 256 bytes come before any merge
    for flag, size in (("--small-vocab", args.small_vocab), ("--vocab-size", args.vocab_size)):
        if size < first:
            raise SystemExit(f"{flag} {size} is too small: {len(SPECIAL_TOKENS)} special tokens + 256 byte tokens "
                             f"come first, so at least {first}")
    big = None  # the big one, when given: loaded (and timed) now
    if args.tokenizer:
        if not Path(args.tokenizer).exists():
            raise SystemExit(f"--tokenizer {args.tokenizer}: no such file or folder")
        t0 = time.perf_counter()
        try:
            big = Tokenizer.load(args.tokenizer)  # a fresh instance: its caches start empty
        except (ValueError, FileNotFoundError) as e:  # not a tokenizer.json, or a folder without one (load says)
            raise SystemExit(f"--tokenizer: {e}") from None
        loaded = f"loaded {args.tokenizer} ({big.vocab_size:,} ids) in {time.perf_counter() - t0:.1f} s"
    train, held_out = stdlib_texts()
    text = "".join(held_out)[: int(args.mb * 1e6)]
    n_bytes = len(text.encode("utf-8"))
    print(f"encoding {n_bytes / 1e6:.2f} MB of held-out Python stdlib source on one core")

    # A small tokenizer, trained here: this also times the trainer on a few MB, as the scaled-down presets need.
    corpus, size = [], 0
    for t in train:
        if size >= args.small_corpus_mb * 1e6:
            break
        corpus.append(t)
        size += len(t.encode("utf-8"))
    t0 = time.perf_counter()
    try:
        small = Tokenizer.train(corpus, args.small_vocab)
    except ValueError as e:  # a corpus too small for that many merges (too small a vocabulary is refused above)
        raise SystemExit(f"--small-vocab {args.small_vocab}: {e}") from None
    print(f"trained a {small.vocab_size:,}-id tokenizer on {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
    runs = [("small", small)]

    # The big one: a given tokenizer.json (loaded above), or a 100k one trained once on the whole training split and
    # cached, then loaded afresh so that its caches start empty.
    if big is None:
        path = CACHE / f"stdlib-bpe-{args.vocab_size}.json"
        if not path.exists():
            size = sum(len(t.encode("utf-8")) for t in train)
            print(f"training a {args.vocab_size:,}-id tokenizer on {size / 1e6:.1f} MB (once; cached afterwards)")
            t0 = time.perf_counter()
            try:
                big = Tokenizer.train(train, args.vocab_size, progress=True)
            except ValueError as e:  # as the small one, above
                raise SystemExit(f"--vocab-size {args.vocab_size}: {e}") from None
            print(f"trained in {time.perf_counter() - t0:.1f} s")
            CACHE.mkdir(parents=True, exist_ok=True)
            os.replace(big.save(path.with_name(f"{path.name}.tmp{os.getpid()}")), path)  # whole, or not there
        t0 = time.perf_counter()
        try:
            big = Tokenizer.load(path)
        except (ValueError, FileNotFoundError) as e:  # a damaged cache
            raise SystemExit(f"{e} ({path} is bench.py's cache of the tokenizer it trains: delete it, and the next "
                             "run trains it again)") from None
        loaded = f"loaded {path} ({big.vocab_size:,} ids) in {time.perf_counter() - t0:.1f} s"
    print(loaded + "\n")
    runs.append(("big", big))

    rows, figures = [], []
    for name, tok in runs:
        # cold: the first pass, every distinct word is pre-tokenized and merged; warm: the same text again, when
        # every word is a cache hit and only the line-level regex splits and lookups remain.
        t0 = time.perf_counter()
        ids = tok.encode(text)
        t1 = time.perf_counter()
        tok.encode(text)
        t2 = time.perf_counter()
        if tok.decode(ids) != text:
            raise RuntimeError(f"the {name} tokenizer does not round-trip the benchmark text")
        mb = n_bytes / 1e6
        figures.append({"name": name, "vocab": tok.vocab_size, "mb": mb, "cold_mb_per_s": mb / (t1 - t0),
                        "warm_mb_per_s": mb / (t2 - t1), "tokens_per_byte": len(ids) / n_bytes})
        rows.append([name, f"{tok.vocab_size:,}", f"{mb:.2f}", f"{t1 - t0:.2f}", f"{mb / (t1 - t0):.2f}",
                     f"{t2 - t1:.2f}", f"{mb / (t2 - t1):.2f}", f"{len(ids) / n_bytes:.3f}"])
    table(["tokenizer", "vocab", "MB", "cold s", "cold MB/s", "warm s", "warm MB/s", "tokens/byte"], rows)
    return {"runs": figures}


# ---------------------------------------------------------------------------------------------------------------------
# The suite: every figure of the README's GPU tables from one command, each run in a process of its own (its peak
# memory is its own, and a run that fails or runs out of memory does not take the others with it). Runs go in order
# of importance; none starts after --budget seconds, and each run's figures are appended to --out/suite.jsonl as it
# ends (its printed tables and errors to --out/suite.log), so a suite cut short still leaves what it measured. Within
# a run too: each bench prints its figures so far as it goes (--emit-partial), and a run stopped at the budget or
# failing after its headline keeps the last of them, marked partial. A compiled run that fails (a compiler that does
# not work on the machine) fails alone: its eager figures, and the references', come from runs of their own.
# --small runs the same list on the tiny preset (a test).

# The speed targets nanovl set itself (the README's "On one H200" tables them against the figures): (suite run, what
# nanovl part, the reference, work, the reference's figure as measured on one H200 when the target was set, what
# nanovl must reach).
TARGETS = [
    ("train-1.3b", None, "transformers LlamaForCausalLM", "1.3B decoder training step, bf16, 4 x 2048 tokens",
     "35.8k tokens/s, 35% MFU", "50% MFU, 1.4x the reference"),
    ("train-1.3b-compiled", None, "transformers LlamaForCausalLM",
     "the same, nanovl compiled (against the eager run's reference)", "-", "50% MFU, 1.4x the reference"),
    ("train-1.3b-hybrid", None, None, "1.3b-hybrid VL training step, stage 3, 4 x 4096 tokens", "none",
     "40% MFU with vision FLOPs"),
    ("train-1.3b-hybrid-compiled", None, None, "the same, compiled", "none", "40% MFU with vision FLOPs"),
    ("decode-1.3b", None, "transformers generate", "1.3B decode, batch 1, after a 600-token prompt",
     "19 tokens/s (bound about 1,400)", "800 tokens/s"),
    ("decode-1.3b-compiled", None, "transformers generate", "the same, compiled", "19 tokens/s", "800 tokens/s"),
    ("decode-1.3b-autotuned", None, "transformers generate",
     "the same, compiled with max_autotune", "19 tokens/s", "800 tokens/s"),
    ("vision-7b-sam8", "nanovl SAM trunk + neck", "segment-anything ImageEncoderViT",
     "SAM-B forward, 1024x1024, bf16, batch 8", "56 images/s", "3x the reference"),
    ("vision-7b-sam8-compiled", "nanovl SAM trunk + neck", "segment-anything ImageEncoderViT",
     "the same, also compiled", "56 images/s", "3x the reference"),
    ("vision-7b", "nanovl SigLIP", "timm VisionTransformer", "SigLIP-L/384 forward, bf16, batch 32", "784 images/s",
     "at least equal"),
    ("vision-7b-compiled", "nanovl SigLIP", "timm VisionTransformer", "the same, also compiled", "784 images/s",
     "at least equal"),
    ("decode-7b", None, None, "7B decode, batch 1, after a 600-token prompt (no target: how fast the 7B runs)", "none",
     "-"),
]
SUITE = [  # (name, bench arguments), most important first; --small swaps the preset for tiny and shrinks the shapes
    # The targets, eager, each against its reference in the same process.
    ("train-1.3b", "--what train --config 1.3b --llm-only --seq 2048 --compare"),
    ("decode-1.3b", "--what decode --config 1.3b --compare --steps 2 --warmup 1"),  # transformers: ~13 s each
    ("vision-7b-sam8", "--what vision --config 7b --compare --batch 8"),
    ("vision-7b", "--what vision --config 7b --compare --batch 32"),
    # Compiled: nanovl alone (the reference's figure is the eager run's above, from the same suite), so a compiler
    # failure costs only its own run and no time goes to compiling the references.
    ("train-1.3b-compiled", "--what train --config 1.3b --llm-only --seq 2048 --compile"),
    ("train-1.3b-hybrid", "--what train --config 1.3b-hybrid --stage 3"),
    # (and the step without stacked_weights, in the same process: an A/B)
    ("decode-1.3b-compiled", "--what decode --config 1.3b --compile --separate-projections --steps 2 --warmup 1"),
    # The same with the compiler's autotuning of matmul kernels too (see set_inductor_options; DecodeStep already
    # turns on coordinate-descent tuning of its reductions), an experiment for the decoding target
    ("decode-1.3b-autotuned", "--what decode --config 1.3b --compile --inductor max_autotune=True --steps 2 "
                              "--warmup 1"),
    ("memory-7b-stage1", "--what train --config 7b --stage 1 --steps 1 --warmup 1"),  # the 7B fits one GPU
    ("memory-7b-prefill", "--what prefill --config 7b --steps 1 --warmup 1"),
    ("vision-7b-sam8-compiled", "--what vision --config 7b --compare --compile --batch 8"),
    ("train-1.3b-hybrid-compiled", "--what train --config 1.3b-hybrid --stage 3 --compile"),
    ("vision-7b-compiled", "--what vision --config 7b --compare --compile --batch 32"),
] + [  # the memory table: each preset's stages at the bench's default shapes, with and without checkpointing
    (f"memory-{preset}-stage{stage}" + ("-ckpt" if ckpt else ""),
     f"--what train --config {preset} --stage {stage} --steps 1 --warmup 1" + (" --grad-ckpt" if ckpt else ""))
    for preset in ("1.3b-hybrid", "1.3b") for stage in (3, 2, 1) for ckpt in (False, True)
] + [
    ("decode-7b", "--what decode --config 7b --compile"),
]


def small_args(args: str) -> str:
    """A suite run's arguments on the tiny preset, at shapes a CPU runs in seconds."""
    words = args.split()
    words[words.index("--config") + 1] = "tiny"
    for flag in ("--seq", "--batch"):
        if flag in words:
            i = words.index(flag)
            del words[i:i + 2]
    for flag in ("--steps", "--warmup"):
        if flag not in words:
            words += [flag, "1"]
    words += {"train": ["--batch", "2", "--seq", "80"], "prefill": ["--seq", "80"],
              "decode": ["--prompt-len", "20", "--new", "3"], "vision": ["--batch", "2"]}[words[1]]
    return " ".join(words)


def read_suite_records(path: str, parser) -> list:
    """An earlier suite's records from its suite.jsonl, or a parser error saying what the file is instead."""
    from nanovl.data import read_jsonl

    where = "a suite run writes suite.jsonl into its --out"
    if Path(path).is_dir():
        parser.error(f"--tables {path} is a folder; expected the suite.jsonl in it ({where})")
    if not Path(path).is_file():
        parser.error(f"--tables {path}: no such file ({where})")
    try:
        records = read_jsonl(path)
    except ValueError as e:
        parser.error(f"--tables {e}")
    for n, r in enumerate(records, 1):
        if not (isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("args"), str) and
                isinstance(r.get("seconds"), (int, float)) and isinstance(r.get("result"), (dict, type(None))) and
                isinstance(r.get("error"), (str, type(None)))):
            parser.error(f"--tables {path}, record {n}: not a suite run's record (name, args, seconds, result, error)")
    if not records:
        parser.error(f"--tables {path} holds no runs")
    return records


def run_suite(args) -> list:
    """Run the suite's runs (all, or --runs) one process each; return [{name, args, seconds, result or error}]."""
    import subprocess

    out = Path(args.out)
    wanted = args.runs.split(",") if args.runs is not None else [name for name, _ in SUITE]
    unknown = set(wanted) - {name for name, _ in SUITE}
    if unknown:
        raise SystemExit(f"unknown suite runs {sorted(unknown)}; the suite has {', '.join(n for n, _ in SUITE)}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, or a place that may not be written
        raise SystemExit(f"--out {out}: cannot make the folder ({e.strerror}); expected a folder to write into")
    start, records = time.perf_counter(), []
    for name, run_args in SUITE:
        if name not in wanted:
            continue
        left = args.budget - (time.perf_counter() - start)
        if left <= 0:
            print(f"suite: out of budget ({args.budget:.0f} s); not run: {name}")
            continue
        run_args = small_args(run_args) if args.small else run_args
        print(f"suite: {name}: python bench.py {run_args}", flush=True)
        t0 = time.perf_counter()
        with open(out / "suite.log", "a") as log:
            log.write(f"=== {name}: python bench.py {run_args}\n")
            log.flush()
            # Unbuffered, so that every line a run printed reaches the pipe at once, and is still there if it is
            # stopped at the budget.
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            try:
                proc = subprocess.run([sys.executable, __file__, *run_args.split(), "--emit-partial"],
                                      stdout=subprocess.PIPE, stderr=log, text=True, timeout=left, env=env)
                output, stopped = proc.stdout, None if proc.returncode == 0 else f"exit status {proc.returncode}"
            except subprocess.TimeoutExpired as e:
                output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
                stopped = f"stopped at the budget after {time.perf_counter() - t0:.0f} s"
            log.write(output)
            result = last_json(output)
            if stopped:
                error = stopped + ("; the figures it had are kept" if result else "") + f"; see {log.name}"
            else:
                error = None if result else f"printed no figures; see {log.name}"
        record = {"name": name, "args": run_args, "date": time.strftime("%Y-%m-%d"),
                  "seconds": round(time.perf_counter() - t0, 1), "result": result, "error": error}
        print(f"suite: {name}: " + (error or f"done in {record['seconds']} s"), flush=True)
        with open(out / "suite.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
    return records


def last_json(output: str):
    """The last line of a bench's output that is a JSON object: its result, or for a run cut short the last of its
    partial ones; None when there is none."""
    for line in reversed(output.strip().splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict):
            return found
    return None


def latest_records(records: list) -> list:
    """One record per run, in the order the runs first appear (a run stopped at one suite's budget and run again by
    the next, whose files --tables reads together): its latest with whole figures, else its latest cut short with
    the figures it had, else its latest."""
    def rank(r):  # no figures, a run's partial figures, its whole figures
        return 0 if not r["result"] else 1 if r["result"].get("partial") else 2

    latest = {}
    for r in records:
        if r["name"] not in latest or rank(r) >= rank(latest[r["name"]]):
            latest[r["name"]] = r
    return list(latest.values())


def suite_tables(records: list):
    """The README's two tables, in Markdown, from suite records (a missing run shows as 'not run')."""
    records = latest_records(records)
    by_name = {r["name"]: r["result"] for r in records if r["result"]}
    first = next((r for r in records if r["result"]), None)
    if first:
        # where and when the figures shown were measured: each machine, torch and date once (several, when --tables
        # merges suites run apart)
        sources = dict.fromkeys(f"{r['result']['device_name']}, torch {r['result']['torch']}, "
                                f"{r.get('date', 'no date')}" for r in records if r["result"])
        print(("\n" if len(sources) == 1 else "\nfigures from: ") + "; ".join(sources) + "\n")
        if first["result"].get("config") == "tiny":
            print("(--small: every run is the tiny preset's, at its small shapes; the rows name the runs they stand "
                  "in for)\n")

    rows = []
    for run, part, their_name, work, their_h200, target in TARGETS:
        res = by_name.get(run)
        if res is None:  # never run, or run without figures: then its error says why
            error = next((r["error"] for r in records if r["name"] == run), None)
            rows.append([work, their_h200, "not run" if error is None else f"no figures: {error}", "-", "-", target])
            continue
        def reference_of(res):
            refs = res.get("reference") if isinstance(res.get("reference"), list) else [res.get("reference")]
            return next((r for r in refs if r and r["name"] == their_name), None)

        ref = reference_of(res)
        # A compiled train or decode run times nanovl alone: its reference is the eager run's, from the same suite.
        eager_run = run.removesuffix("-compiled").removesuffix("-autotuned")
        borrowed = None
        if ref is None and eager_run != run and not run.startswith("vision"):
            borrowed = reference_of(by_name.get(eager_run, {}))
        if run.startswith("train"):  # with a reference, the decoder's figures from the same comparison
            def tokens(f):
                return f"{f['tokens_per_s']:,.0f} tokens/s" + ("" if f["mfu"] is None else f", {f['mfu']:.1%} MFU")

            ours = tokens(res if ref is None else ref["nanovl"])
            theirs = "-" if ref is None else tokens(ref)
            ratio_cell = "-" if ref is None else f"{ref['ratio']:.2f}x"
            if ref is not None and ref.get("compiled"):  # the reference compiled too
                theirs += f" (compiled: {tokens(ref['compiled'])})"
                ratio_cell += f" ({ref['compiled']['ratio']:.2f}x)"
            if borrowed:
                theirs = tokens(borrowed) + " (eager run's)"
                ratio_cell = f"{res['tokens_per_s'] / borrowed['tokens_per_s']:.2f}x"
        elif run.startswith("decode"):
            plain = "CUDA graph" if res["device"] == "cuda" else "eager"
            # With a reference, nanovl's figures from the same comparison (a text prompt, as transformers' gets)
            mine = res["runs"] if ref is None else ref["nanovl"]
            how = lambda name: name.removeprefix("nanovl.generate, ") if "compiled" in name else plain  # noqa: E731
            ours = ", ".join(f"{f['tokens_per_s']:,.0f} tokens/s ({how(name)})" for name, f in mine.items()
                             if name.startswith("nanovl.generate"))
            theirs = "-" if ref is None else f"{ref['tokens_per_s']:,.1f} tokens/s"
            ratio_cell = "-" if ref is None else f"{ref['ratio']:.1f}x"
            if borrowed:
                theirs = f"{borrowed['tokens_per_s']:,.1f} tokens/s (eager run's)"
                ratio_cell = f"{res['tokens_per_s'] / borrowed['tokens_per_s']:.1f}x"
            if eager_run != run and "nanovl.generate, compiled" not in res["runs"]:
                ours += " (compiling failed: see suite.log)"
        else:  # vision: eager, and compiled when the run compiled
            mine = [("compiled" if name.endswith(", compiled") else "eager", f) for name, f in res["runs"].items()
                    if name.startswith(part)]
            ours = ", ".join(f"{f['images_per_s']:,.0f} images/s ({how})" for how, f in mine)
            ref = res["runs"].get(their_name)
            theirs = "-" if ref is None else f"{ref['images_per_s']:,.0f} images/s"
            ratio_cell = "-" if ref is None else ", ".join(f"{f['images_per_s'] / ref['images_per_s']:.2f}x"
                                                      for _, f in mine)
        if res.get("partial"):
            ours += " (run cut short: the figures it had)"
        rows.append([work, their_h200, theirs, ours, ratio_cell, target])
    print("| work | reference, the H200 figure the target was set by | reference, this run | nanovl | "
          "nanovl / reference | target |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")

    print("\n| preset | work | activation checkpointing | batch x tokens | peak memory |")
    print("|---|---|---|---|---|")
    def flag(words, name, default=None):  # the value after --name in a run's arguments
        return words[words.index(name) + 1] if name in words else default

    memory_runs = []  # (preset, stage ("0": the prefill), checkpointing, record)
    for r in records:
        if r["name"].startswith("memory-"):
            words = r["args"].split()
            # (the preset from the run's name, which --small keeps where its arguments become the tiny preset's)
            preset = r["name"].removeprefix("memory-").rsplit("-stage", 1)[0].removesuffix("-prefill")
            memory_runs.append((preset, flag(words, "--stage", "0"), "--grad-ckpt" in words, r))
    # by preset, then the prefill and stages 1-3, each without checkpointing first (the suite runs them in another
    # order: the most wanted first)
    for preset, stage, ckpt, r in sorted(memory_runs, key=lambda m: m[:3]):
        res = r["result"]
        work = f"stage {stage}" if stage != "0" else "inference (prefill)"
        measured = res and res.get("peak_memory_bytes")  # a run cut short may have stopped before measuring it
        memory_cell = f"{res['peak_memory_bytes'] / 2 ** 30:.1f} GiB" if measured else r["error"]
        shape = f"{res['batch']} x {res['seq']}" if res else "-"
        print(f"| {preset} | {work} | {'yes' if ckpt else 'no'} | {shape} | {memory_cell} |")
    kinds = {res["memory"] for r in records
             if (res := r["result"]) and "memory" in res and r["name"].startswith("memory-")}
    print(f"\npeak memory: {', '.join(sorted(kinds)) or '-'}, in a process of its own for each run")


# ---------------------------------------------------------------------------------------------------------------------

def set_inductor_options(pairs, parser) -> dict:
    """--inductor NAME=VALUE (repeatable): torch._inductor.config settings for this run's compiled parts, to try a
    compiler setting without editing code. gpt-fast decodes with coordinate_descent_tuning=True (it tunes the fused
    kernels' block sizes), and so does DecodeStep, whose own compile options would win over the config: a setting
    they hold is set there too. max_autotune=True also times Triton's matrix-product templates against cuBLAS and
    keeps the faster (compiling takes longer). A value is a Python literal (True, 4, 'x'), of the setting's own
    type."""
    import ast

    import torch._inductor.config as inductor

    from nanovl.generate import DecodeStep

    chosen = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            parser.error(f"--inductor {pair}: expected NAME=VALUE, e.g. --inductor coordinate_descent_tuning=True")
        owner, *path = [inductor] + name.split(".")
        for part in path[:-1]:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, path[-1]):
            parser.error(f"--inductor {name}: torch {torch.__version__}'s torch._inductor.config has no such setting")
        current = getattr(owner, path[-1])
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string setting's value
        if current is not None and type(value) is not type(current) and \
                not (type(current) is float and type(value) is int):
            parser.error(f"--inductor {name}: expected a {type(current).__name__} (it is {current!r}), got {text!r}")
        setattr(owner, path[-1], value)
        if name in DecodeStep.compile_options:
            DecodeStep.compile_options = {**DecodeStep.compile_options, name: value}
        chosen[name] = value
    return chosen


def parse_overrides(rest, parser) -> dict:
    """Model config overrides from the arguments argparse did not know: --llm.dim=256 or --llm.dim 256."""
    overrides, i = {}, 0
    while i < len(rest):
        key, eq, value = rest[i].removeprefix("--").partition("=")
        if not rest[i].startswith("--") or "." not in key:
            flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
            close = difflib.get_close_matches(rest[i].partition("=")[0], flags, n=1)
            parser.error(f"unrecognised argument {rest[i]!r}" + (f" (did you mean {close[0]}?)" if close else "") +
                         "; model config overrides are dotted, like --llm.n_layers=2 or --sam.window_size=7")
        if not eq:
            i += 1
            if i == len(rest):
                parser.error(f"{rest[i - 1]} needs a value")
            value = rest[i]
        overrides[key] = value
        i += 1
    return overrides


# Flags whose default is filled in after parsing: they start as None, so that one given for other work can be told from
# one left out, and refused (below).
FILLED_DEFAULTS = {"config": "tiny", "out": "bench-suite", "budget": 3600.0, "vocab_size": 100_000, "small_vocab": 4096,
                   "small_corpus_mb": 3.0, "mb": 4.0, "warmup": 2}


def main(argv=None):
    d = FILLED_DEFAULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--what", choices=["train", "prefill", "decode", "vision", "tokenizer", "suite"],
                        help="the work to time (--tables alone implies suite)")
    parser.add_argument("--config", help=f"model preset (nanovl.config.PRESETS; default {d['config']})")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--batch", type=int, help="rows (train, prefill, decode) or images (vision)")
    parser.add_argument("--seq", type=int, help="train and prefill: tokens a row")
    parser.add_argument("--steps", type=int, help="timed steps (default: 10; decode: 3 generations)")
    parser.add_argument("--warmup", type=int, help=f"untimed steps first (default {d['warmup']})")
    parser.add_argument("--compare", action="store_true", help="also run the reference implementation")
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], help="train: the stage's freeze map (default 3)")
    parser.add_argument("--llm-only", "--llm_only", action="store_true", help="train: the decoder alone, on text")
    parser.add_argument("--compile", action="store_true",
                        help="train: torch.compile each part; vision: also time compiled SigLIP and SAM's trunk "
                             "and neck; decode: also time nanovl.generate compiled")
    parser.add_argument("--separate-projections", "--separate_projections", action="store_true",
                        help="decode, with --compile: also time the compiled step reading q, k, v's weights (and gate, "
                             "up's) one by one, as before nanovl.llama.stacked_weights")
    parser.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                        help="with --compile: a torch._inductor.config setting (repeatable), e.g. max_autotune=True")
    parser.add_argument("--grad-ckpt", "--grad_ckpt", action="store_true", help="train: recompute decoder layers")
    parser.add_argument("--prompt-len", "--prompt_len", type=int, help="decode: prompt tokens")
    parser.add_argument("--new", type=int, help="decode: new tokens")
    parser.add_argument("--tokenizer", help="tokenizer: a tokenizer.json (or its folder) to use as the big one")
    parser.add_argument("--vocab-size", type=int,
                        help=f"tokenizer: size of the big trained one (default {d['vocab_size']})")
    parser.add_argument("--small-vocab", type=int,
                        help=f"tokenizer: size of the small trained one (default {d['small_vocab']})")
    parser.add_argument("--small-corpus-mb", type=float,
                        help=f"tokenizer: text for the small one, MB (default {d['small_corpus_mb']})")
    parser.add_argument("--mb", type=float,
                        help=f"tokenizer: at most this many MB of text are encoded (default {d['mb']})")
    parser.add_argument("--out", help=f"suite: folder for suite.jsonl and suite.log (default {d['out']})")
    parser.add_argument("--runs", help="suite: only these runs, comma-separated (default: all, in SUITE's order)")
    parser.add_argument("--budget", type=float,
                        help=f"suite: start no run after this many seconds, and stop the one running then, keeping its "
                             f"figures so far (default {d['budget']:g})")
    parser.add_argument("--small", action="store_true", help="suite: the tiny preset at small shapes (a check)")
    parser.add_argument("--tables", nargs="+", metavar="SUITE_JSONL",
                        help="suite: print the tables of earlier runs' suite.jsonl files, run nothing (a run in "
                             "several: its latest figures)")
    parser.add_argument("--emit-partial", action="store_true", help=argparse.SUPPRESS)  # set by the suite for its runs
    args, rest = parser.parse_known_args(argv)
    if args.what is None:  # --tables reads a suite's records: there is no other work it can be for
        if not args.tables:
            parser.error("the following arguments are required: --what")
        args.what = "suite"
    overrides = parse_overrides(rest, parser)
    if args.separate_projections and not args.compile:
        parser.error("--separate-projections times a second compiled decoding step: it needs --compile")
    if args.inductor and (not args.compile or args.what in ("suite", "tokenizer", "prefill")):
        parser.error("--inductor sets the compiler: it needs --compile, and a --what that compiles (a suite's runs "
                     "carry their own settings)")
    # A flag for other work is refused, not ignored: --what decode --seq 4096 would otherwise time the default prompt.
    benches = ("train", "prefill", "decode", "vision")
    for name, whats in (("seq", ("train", "prefill")), ("prompt_len", ("decode",)), ("new", ("decode",)),
                        ("stage", ("train",)), ("llm_only", ("train",)), ("grad_ckpt", ("train",)),
                        ("batch", benches), ("steps", benches), ("warmup", benches),
                        ("compile", ("train", "decode", "vision")), ("separate_projections", ("decode",)),
                        ("compare", benches), ("config", benches), ("device", benches), ("dtype", benches),
                        ("tables", ("suite",)), ("runs", ("suite",)), ("small", ("suite",)), ("out", ("suite",)),
                        ("budget", ("suite",)), ("tokenizer", ("tokenizer",)), ("vocab_size", ("tokenizer",)),
                        ("small_vocab", ("tokenizer",)), ("small_corpus_mb", ("tokenizer",)), ("mb", ("tokenizer",))):
        if getattr(args, name) not in (None, False) and args.what not in whats:
            parser.error(f"--{name.replace('_', '-')} is for --what {', '.join(whats)}; --what {args.what} does not "
                         "use it")
    if args.tokenizer and args.vocab_size is not None:
        parser.error("--vocab-size sizes the big tokenizer bench.py trains, and --tokenizer gives that one: pass one "
                     "of them")
    if args.llm_only and args.stage:
        parser.error("--stage picks a freeze map of the whole model; --llm-only times the decoder alone, all trained")
    if overrides and args.what not in benches:
        parser.error(f"model config overrides ({', '.join(overrides)}) are for --what {', '.join(benches)}")
    for name, default in FILLED_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    result = {"what": args.what}
    if args.what == "tokenizer":
        result.update(bench_tokenizer(args))
        print(json.dumps(result))
        return result
    if args.what == "suite":
        if args.tables:
            records = [r for path in args.tables for r in read_suite_records(path, parser)]
        elif not args.budget >= 0:
            parser.error(f"--budget must be 0 seconds or more, got {args.budget}")
        else:
            records = run_suite(args)
        try:
            suite_tables(records)
        except KeyError as e:
            where = " or ".join(args.tables) if args.tables else args.out
            parser.error(f"a run's figures lack {e}: was {where} written by another bench.py?")
        # The last line stays JSON, as for every bench, but short: the whole records are in suite.jsonl, and a line
        # of every figure printed after the tables would push them out of a log's tail.
        result["runs"] = [{k: r[k] for k in ("name", "seconds", "error")} for r in records]
        print(json.dumps(result))
        return result

    try:
        cfg = get_config(args.config, **overrides)
    except ValueError as e:
        parser.error(str(e))
    inductor = set_inductor_options(args.inductor, parser)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device(device)  # the same check as train.py and sample.py
    except ValueError as e:
        parser.error(str(e))
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    args.stage = args.stage or 3
    defaults = DEFAULTS[args.config]
    for name, least in (("batch", 1), ("seq", 1), ("steps", 1), ("prompt_len", 1), ("new", 3)):
        if getattr(args, name) is not None and getattr(args, name) < least:  # decode's first 2 tokens are timed apart
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.compile and args.warmup == 0 and args.what in ("train", "vision"):  # (decode times its first step apart)
        parser.error("--compile compiles in the first call, which --warmup 0 would time as a step: use --warmup 1 or "
                     "more")
    if args.batch is None:
        args.batch = {"train": defaults["batch"], "vision": defaults["images"]}.get(args.what, 1)
    args.seq = args.seq or defaults["seq"]
    args.prompt_len = args.prompt_len or defaults["prompt_len"]
    args.new = args.new or defaults["new"]
    args.steps = args.steps or STEPS[args.what]
    ctx = cfg.llm.max_seq_len
    need = {"train": args.seq, "prefill": args.seq, "decode": args.prompt_len + args.new}.get(args.what, 0)
    if need > ctx:
        parser.error(f"{need} tokens ({'--seq' if args.what != 'decode' else '--prompt-len + --new'}) do not fit the "
                     f"{cfg.name!r} model's context of {ctx}")
    if args.what in ("train", "prefill") and not args.llm_only and args.seq < cfg.n_image_tokens + 2:
        parser.error(f"--seq {args.seq} is too short for one image of {cfg.n_image_tokens} tokens plus text in the "
                     f"{cfg.name!r} model; use --seq {cfg.n_image_tokens + 2} or more" +
                     (" (or --llm-only for text alone)" if args.what == "train" else ""))
    device_name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    spec = device_spec(device_name) if device == "cuda" else None

    n = torch.get_num_threads()
    threads = f", {n} thread{'s' if n > 1 else ''}" if device == "cpu" else ""
    print(f"nanovl bench --what {args.what}: {cfg.name}" + (f" {overrides}" if overrides else "") +
          f"; {device} ({device_name}{threads}), {dtype_name}; torch {torch.__version__}" +
          (f"; inductor {inductor}" if inductor else ""))
    if device == "cuda" and spec is None:
        print(f"no peak FLOP/s or bandwidth known for {device_name!r}: add it to DEVICES in bench.py for MFU")
    elif device == "cuda":
        print(f"{spec.label}: {si(spec.peak_flops, 'FLOP/s')} dense bf16 (MFU is against this whatever --dtype), "
              f"{si(spec.bandwidth, 'B/s')}")
    else:
        print("on CPU: achieved model FLOP/s instead of MFU; peak memory is the process's peak RSS")
    bench = {"train": bench_train, "prefill": bench_prefill, "decode": bench_decode, "vision": bench_vision}
    result.update(reference=None, config=cfg.name, overrides=overrides, inductor=inductor, device=device,
                  device_name=device_name, torch=torch.__version__, dtype=dtype_name, batch=args.batch,
                  seq=args.seq if args.what in ("train", "prefill") else None,
                  steps=args.steps, warmup=args.warmup)
    # For the suite, each bench also prints its figures so far as a JSON line as soon as it has its headline (and
    # again as it goes), so that a run stopped at the budget, or failing in a later comparison, keeps what it measured.
    args.partial = (lambda figures: print(json.dumps({**result, **figures, "partial": True}), flush=True)) \
        if args.emit_partial else (lambda figures: None)
    result.update(bench[args.what](args, cfg, device, dtype, spec))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
