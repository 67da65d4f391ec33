"""bench.py: the FLOP model against hand counts and against PyTorch's FLOP counter, the freeze-map modes, the cut
training step against the plain one, every --what on the tiny preset, --compare with and without the references,
and the JSON line."""

import argparse
import builtins
import json
import os
import re

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from nanovl import DeepSeekVL, get_config, recipe
from nanovl.config import LlamaConfig, SAMConfig, SigLIPConfig
from nanovl.llama import Llama
from nanovl.sam import SAM
from nanovl.siglip import SigLIP


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Nothing here depends on speed; one thread keeps the file fast when another process shares the two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(capsys, *argv):
    """bench.main on the tiny preset with tiny sizes; checks that the last printed line is the result as JSON."""
    what = argv[list(argv).index("--what") + 1]
    sizes = ["--config", "tiny", "--steps", "1", "--warmup", "1"] if what not in ("suite", "tokenizer") else []
    result = bench.main([*sizes, *argv])  # (the suite and the tokenizer bench have sizes of their own)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(result))
    return result, "\n".join(lines[:-1])


def matmul_weights(module: nn.Module) -> int:
    """Weights of every nn.Linear and nn.Conv2d: what N counts, read off the module instead of the config."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def counted(fn) -> int:
    """FLOPs of fn by torch's FlopCounterMode, with the math attention kernel (the CPU fused kernels are not
    counted) whose q k^T and attn v are ordinary counted matmuls."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------------
# The FLOP model

def test_decoder_flops_match_a_hand_count():
    c = LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=176, max_seq_len=64)
    # Per layer: q, k, v, o are 64 x 64 (4 * 4096 = 16384); gate, up, down are 64 x 176 (3 * 11264 = 33792).
    # Two layers: 2 * 50176 = 100352; lm_head 64 x 97 = 6208; the input embedding is not counted.
    assert bench.llm_matmul_params(c) == 106560 == matmul_weights(Llama(c))
    T = 32
    # 6N + 12 L d T per trained token: 639360 + 12 * 2 * 64 * 32 = 639360 + 49152
    assert bench.step_flops(bench.llm_forward_flops(c, T), "train") == 688512
    # frozen with a trained part below: 4N + 12 L d T; frozen at the bottom: 2N + 4 L d T
    assert bench.step_flops(bench.llm_forward_flops(c, T), "pass") == 426240 + 49152
    assert bench.step_flops(bench.llm_forward_flops(c, T), "frozen") == 213120 + 16384
    # grouped-query attention: k and v are 64 x 32, so each layer has 2 * 4096 + 2 * 2048 + 33792 = 46080
    gqa = LlamaConfig(**dict(c.__dict__, n_kv_heads=2))
    assert bench.llm_matmul_params(gqa) == 2 * 46080 + 6208 == matmul_weights(Llama(gqa))


def test_vision_flops_match_a_hand_count():
    s = SigLIPConfig(image_size=64, patch_size=16, width=32, depth=2, n_heads=2)
    # n = 4 x 4 = 16 patches. N: patch conv 3 * 16 * 16 * 32 = 24576, each block 4 * 32^2 + 2 * 32 * 128 = 12288.
    assert 24576 + 2 * 12288 == matmul_weights(SigLIP(s))
    assert bench.siglip_forward_flops(s) == (2 * 49152 * 16, 4 * 2 * 32 * 16 * 16)  # 2 N n, 4 L d n^2

    m = SAMConfig(image_size=128, patch_size=16, width=32, depth=2, n_heads=2, window_size=3, global_blocks=(1,),
                  neck_dim=16, downsample_dims=(16, 24))
    # An 8 x 8 grid. Block 0 attends in 3 x 3 windows, padded to 9 x 9 = 81 tokens; block 1 globally over 64.
    patch = 2 * 3 * 16 * 16 * 32 * 64
    block0 = 2 * 4 * 32 * 32 * 81 + 2 * 32 * 81 * (3 + 3) + 2 * 2 * 32 * 128 * 64  # qkv+proj, rel-pos, MLP
    block1 = 2 * 4 * 32 * 32 * 64 + 2 * 32 * 64 * (8 + 8) + 2 * 2 * 32 * 128 * 64
    attention = 4 * 32 * 9 * 81 + 4 * 32 * 64 * 64  # 9 keys per query in a window, 64 in the global block
    f = bench.sam_forward_flops(m)
    assert f["trunk"] == (patch + block0 + block1, attention) == (6527360, 617600)
    assert f["neck"] == 2 * 32 * 16 * 64 + 2 * 9 * 16 * 16 * 64  # 1x1 conv, 3x3 conv on the 8 x 8 grid
    # upsampled to 12 x 12, then 3x3 stride-2 convs to 6 x 6 (16 -> 16 channels) and 3 x 3 (16 -> 24)
    assert f["downsamples"] == 2 * 9 * 16 * 16 * 36 + 2 * 9 * 16 * 24 * 9
    # and torch's own count of the modules agrees (the whole tower: two necks, the downsample convs after each)
    with torch.no_grad():
        assert counted(lambda: SigLIP(s)(torch.rand(1, 3, 64, 64))) == sum(bench.siglip_forward_flops(s))
        assert counted(lambda: SAM(m)(torch.rand(1, 3, 128, 128))) == sum(f["trunk"]) + 2 * (f["neck"] +
                                                                                           f["downsamples"])


def test_forward_flops_match_torch_flop_counter():
    cfg = get_config("tiny")  # its SAM pads a 16 x 16 grid to windows of 6, and has global blocks
    model = DeepSeekVL(cfg)
    B, T = 2, 48
    ids, _, images = bench.synthetic_batch(cfg, B, T, "cpu")
    low = model.siglip_input(images)
    with torch.no_grad():
        assert counted(lambda: model.siglip(low)) == B * sum(bench.siglip_forward_flops(cfg.siglip))
        assert counted(lambda: model.sam(images)) == B * sum(bench.sam_total_flops(cfg.sam))
        assert counted(lambda: model.llm(ids)) == B * T * sum(bench.llm_forward_flops(cfg.llm, T))
        frozen = {p: "frozen" for p in bench.PARTS}
        assert counted(lambda: model(ids, images)) == sum(bench.vlm_step_flops(cfg, frozen, B, T).values())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_training_flops_match_the_counter_but_for_first_layer_input_gradients(stage):
    cfg = get_config("tiny")
    model = DeepSeekVL(cfg)
    recipe.apply_freeze_map(model, recipe.trainable_prefixes(stage, cfg))
    B, T = 2, 48
    ids, targets, images = bench.synthetic_batch(cfg, B, T, "cpu")
    got = counted(lambda: model(ids, images, targets=targets)[1].backward())
    modelled = sum(bench.vlm_step_flops(cfg, bench.part_modes(model), B, T).values())
    # The model charges 6N to a trained part, but autograd computes no gradient for the input of a trained layer
    # when nothing below it trains: SAM's two 1x1 neck convs (on the frozen trunk), the adaptor's low_up_proj while
    # SigLIP is frozen, SigLIP's patch embedding (on pixels) when it trains. Each costs one forward's FLOPs.
    s, m = cfg.siglip, cfg.sam
    neck_in = 2 * (2 * m.width * m.neck_dim * m.grid ** 2)
    low_up_proj_in = 2 * cfg.n_image_tokens * s.width * (cfg.llm.dim // 2)
    patch_in = 2 * 3 * s.patch_size ** 2 * s.width * s.grid ** 2
    overcount = B * (neck_in + (patch_in if stage == 3 else low_up_proj_in))
    assert modelled - got == overcount
    assert overcount / got < 0.01  # and it is small


def test_part_modes_follow_train_py_freeze_maps():
    cfg = get_config("tiny")
    model = DeepSeekVL(cfg)
    modes = {}
    for stage in (1, 2, 3):
        recipe.apply_freeze_map(model, recipe.trainable_prefixes(stage, cfg))
        modes[stage] = bench.part_modes(model)
    vision = {"siglip": "frozen", "sam_trunk": "frozen", "sam_tail": "train", "aligner": "train"}
    assert modes[1] == dict(vision, llm="pass")  # the frozen decoder carries the gradient down to the adaptor
    assert modes[2] == dict(vision, llm="train")
    assert modes[3] == dict(vision, siglip="train", llm="train")


def test_the_training_step_updates_with_train_pys_two_learning_rate_groups(monkeypatch):
    # bench.py times train.py's optimizer, not a copy of it: the vision side moves at vision_lr_mult (0.1) times the
    # rate of the rest. (Adam's first step moves every weight by about the learning rate, whatever its gradient, so
    # the clipping, which would not show in the weights, is watched: stage 3's one clipping group, at grad_clip.)
    model = DeepSeekVL(get_config("tiny"))
    recipe.apply_freeze_map(model, recipe.trainable_prefixes(3, model.cfg))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    clip, clipped = torch.nn.utils.clip_grad_norm_, []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: clipped.append(({id(p) for p in params}, max_norm)) or
                        clip(params, max_norm))
    bench.optimizer_for(model, "cpu", 3)()
    groups = recipe.clipping_groups(model, 3).values()
    assert clipped == [({id(p) for p in group}, recipe.TrainConfig().grad_clip) for group in groups]
    moved = {n: (p.detach() - before[n]).abs().mean().item() for n, p in model.named_parameters() if n in before}
    vision = [m for n, m in moved.items() if n.startswith(("siglip.", "sam."))]
    rest = [m for n, m in moved.items() if not n.startswith(("siglip.", "sam."))]
    assert vision and rest and all(p.grad is None for p in model.parameters())
    assert min(vision) == pytest.approx(1e-5, rel=1e-2) and max(vision) == pytest.approx(1e-5, rel=1e-2)
    assert min(rest) == pytest.approx(1e-4, rel=1e-2) and max(rest) == pytest.approx(1e-4, rel=1e-2)


def test_decode_bytes():
    c = LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64)
    weights = (98368 + 5 * 64) * 2  # matmul weights and 2 * 2 + 1 RMSNorm weights, bf16
    kv = 2 * 2 * 3 * 2 * 16 * 2  # k and v, 2 layers, batch 3, 2 kv heads of 16, bf16: bytes per cached position
    # 4 new tokens: the prefill makes the first, then steps 1..3 attend over 10 + 1, 10 + 2, 10 + 3 positions
    assert bench.decode_bytes(c, B=3, prompt_len=10, new=4, bytes_per=2) == 3 * weights + kv * (11 + 12 + 13)


def test_decode_flops_match_torch_flop_counter():
    # One step after a 20-token prompt (new=2: the prefill's token, then this step's): each row's new token runs
    # through every product and attends over 21 positions.
    c = get_config("tiny", **{"llm.n_kv_heads": 2}).llm
    llm = Llama(c)
    cache = llm.new_cache(2, 32)
    with torch.no_grad():
        llm(torch.randint(0, c.vocab_size, (2, 20)), cache=cache)
        got = counted(lambda: llm(torch.tensor([[5], [6]]), cache=cache, last_only=True))
    assert got == bench.decode_flops(c, B=2, prompt_len=20, new=2) == 2 * (2 * matmul_weights(llm) +
                                                                          4 * c.n_layers * c.dim * 21)


def test_device_table():
    assert bench.device_spec("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989e12, 3.35e12)
    assert bench.device_spec("NVIDIA H200") == ("H200 SXM", 989e12, 4.8e12)
    assert bench.device_spec("NVIDIA H100 PCIe").peak_flops == 756e12
    assert bench.device_spec("NVIDIA A100-SXM4-40GB").bandwidth == 1.555e12
    assert bench.device_spec("NVIDIA A100 80GB PCIe").bandwidth == 1.935e12
    assert bench.device_spec("NVIDIA L4").peak_flops == 121e12
    assert bench.device_spec("NVIDIA L40S") is None  # not an L4
    assert bench.device_spec("NVIDIA GeForce RTX 4090").peak_flops == 165.2e12
    assert bench.device_spec("NVIDIA H100 NVL") == ("H100 NVL", 835e12, 3.9e12)  # not the SXM part
    assert bench.device_spec("NVIDIA H200 NVL") == ("H200 NVL", 835e12, 4.8e12)
    assert bench.device_spec("NVIDIA A100-SXM4-80GB") == ("A100 80GB SXM", 312e12, 2.039e12)


# ---------------------------------------------------------------------------------------------------------------------
# The benchmarks

def test_prefill_written_out_by_part_gives_the_forwards_logits_and_cache():
    cfg = get_config("tiny")
    model = DeepSeekVL(cfg).eval()
    ids, _, images = bench.synthetic_batch(cfg, 2, 48, "cpu")
    caches, marked = [model.llm.new_cache(2, 48) for _ in range(2)], []
    with torch.no_grad():
        expected, _ = model(ids, images, cache=caches[0], last_only=True)
        got = bench.forward_by_part(model, ids, images, caches[1], marked.append)
    assert marked == ["siglip", "sam", "aligner", "llm"] and torch.equal(got, expected)
    assert caches[1].length == 48 and all(torch.equal(a, b) for a, b in zip(caches[0].k, caches[1].k))
    # and each part's model FLOPs, as the prefill bench prints them, are torch's count of that part
    counts = []
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        bench.forward_by_part(model, ids, images, model.llm.new_cache(2, 48),
                              lambda name: counts.append((name, counter.get_total_flops())))
    by_part = {name: total - before for (name, total), (_, before) in zip(counts, [("", 0)] + counts)}
    modelled = bench.vlm_step_flops(cfg, {p: "frozen" for p in bench.PARTS}, 2, 48)
    modelled["llm"] -= 2 * 47 * 2 * cfg.llm.dim * cfg.llm.vocab_size  # lm_head on each row's last position only
    assert by_part == modelled


def test_cut_step_gives_the_plain_step_gradients():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = DeepSeekVL(cfg)
    recipe.apply_freeze_map(model, recipe.trainable_prefixes(3, cfg))
    ids, targets, images = bench.synthetic_batch(cfg, 2, 48, "cpu")
    _, loss = model(ids, images, targets=targets)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    marked = []
    # Each mark closes its part's time, so each part's work must be done by its mark and the next part's not begun:
    # which parts have their gradients at each mark (the decoder, the adaptor, SAM's tail, SigLIP).
    firsts = [model.llm.lm_head.weight, model.aligner.high_up_proj.weight, model.sam.downsamples[0].weight,
              model.siglip.patch_embed.proj.weight]
    cut_loss = bench.backward_by_part(model, ids, targets, images, bench.autocast_for("cpu", torch.float32),
                                      lambda name: marked.append((name, [p.grad is not None for p in firsts])))
    assert cut_loss.item() == loss.item()
    no, llm, aligner, sam, siglip = [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]
    assert [(name, [int(g) for g in grads]) for name, grads in marked] == [
        ("siglip", no), ("sam", no), ("aligner", no), ("llm", llm), ("aligner", aligner), ("sam", sam),
        ("siglip", siglip)]
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(plain)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_train_on_tiny(capsys):
    out, printed = run(capsys, "--what", "train", "--batch", "2", "--seq", "48", "--llm.n_layers=2")
    cfg = get_config("tiny", **{"llm.n_layers": 2})
    assert out["overrides"] == {"llm.n_layers": "2"} and out["modes"]["llm"] == "train"
    assert out["flops_by_part"] == bench.vlm_step_flops(cfg, out["modes"], 2, 48)
    assert out["flops"] == sum(out["flops_by_part"].values())
    assert out["tokens_per_s"] == pytest.approx(2 * 48 / out["step_s"])
    assert out["flops_per_s"] == pytest.approx(out["flops"] / out["step_s"]) and out["mfu"] is None
    assert set(out["parts_s"]) == {"data", "siglip", "sam", "aligner", "llm", "optimizer"}
    assert out["memory"] == "process peak RSS" and out["peak_memory_bytes"] > 2 ** 20
    assert "where the time goes" in printed and re.search(r"^SAM +trunk frozen, tail train +\d+\.\d\d ", printed, re.M)


def test_prefill_decode_and_vision_on_tiny(capsys):
    cfg = get_config("tiny")
    out, _ = run(capsys, "--what", "prefill", "--seq", "48")
    unused_head = 47 * 2 * cfg.llm.dim * cfg.llm.vocab_size  # lm_head runs on the last of the 48 positions only
    assert out["flops"] == sum(bench.vlm_step_flops(cfg, {p: "frozen" for p in bench.PARTS}, 1, 48).values()) \
        - unused_head
    model = DeepSeekVL(cfg)  # and torch counts the same for the prefill itself
    ids, _, images = bench.synthetic_batch(cfg, 1, 48, "cpu")
    with torch.no_grad():
        assert counted(lambda: model(ids, images, cache=model.llm.new_cache(1, 48), last_only=True)) == out["flops"]
    assert out["tokens_per_s"] == pytest.approx(48 / out["step_s"])
    parts = bench.vlm_step_flops(cfg, {p: "frozen" for p in bench.PARTS}, 1, 48)
    assert out["flops_by_part"] == dict(parts, llm=parts["llm"] - unused_head) and set(out["parts_s"]) == set(parts)

    out, printed = run(capsys, "--what", "decode", "--prompt-len", "40", "--new", "4", "--batch", "2")
    assert "one image, then text" in printed
    # the steady steps: 4 new tokens are the prefill's, the first step's (timed apart), and 2 more
    assert out["bytes_per_step"] == bench.decode_bytes(cfg.llm, 2, 41, 3, 4) / 2  # fp32 on CPU
    assert out["flops_per_step"] == bench.decode_flops(cfg.llm, 2, 41, 3) / 2 and out["mfu"] is None
    assert out["flops_per_s"] == pytest.approx(out["flops_per_step"] * 2 / out["decode_s"])
    assert out["tokens_per_s"] == pytest.approx(2 * 2 / out["decode_s"]) and out["bound_tokens_per_s"] is None
    assert out["first_step_s"] > 0
    assert out["tokens_per_s"] == out["runs"]["nanovl.generate"]["tokens_per_s"]  # the headline: what sample.py runs
    loop = out["runs"]["nanovl loop (model + KVCache)"]
    assert loop["tokens_per_s"] == pytest.approx(2 * 2 / loop["decode_s"])
    assert out["same_tokens_as_loop"] == {"nanovl.generate": 4}  # fp32: DecodeStep gives the loop's tokens
    b = out["breakdown"]  # where a step goes: the step alone, generate's loop, the step's ops (on CPU)
    assert b["step_s"] > 0 and b["loop_s"] == pytest.approx(out["decode_s"] / 2 - b["step_s"])
    assert b["batch"] == 2 and b["device"] == "cpu" and 0 < len(b["kernels"]) <= 12 < b["n_kinds"]
    # q, k, v, o, gate, up, down in each layer, and lm_head
    assert any(k["name"] == "aten::mm" and k["calls"] == 7 * cfg.llm.n_layers + 1 for k in b["kernels"])
    assert sum(k["s"] for k in b["kernels"]) <= b["kernels_s"] and "where a step of nanovl.generate goes" in printed

    out, _ = run(capsys, "--what", "vision", "--batch", "2")
    assert set(out["runs"]) == {"nanovl SigLIP", "nanovl SAM", "nanovl SAM trunk + neck", "nanovl encode_images"}
    assert out["runs"]["nanovl SAM"]["flops"] == 2 * sum(bench.sam_total_flops(cfg.sam))
    assert out["images_per_s"] == out["runs"]["nanovl encode_images"]["images_per_s"]


def test_vision_bench_keeps_no_decoder_weights(capsys, monkeypatch):
    # The towers and the adaptor are the work: the decoder's weights would only swell its peak memory.
    plain, built = bench.build, []
    monkeypatch.setattr(bench, "build", lambda *a, **k: built.append(plain(*a, **k)) or built[-1])
    run(capsys, "--what", "vision", "--batch", "1")
    assert all(p.is_meta for p in built[0].llm.parameters())
    assert not any(p.is_meta for name, p in built[0].named_parameters() if not name.startswith("llm."))


def test_compare_runs_the_references(capsys, monkeypatch):
    import nanovl.llama
    checks, plain = [], nanovl.llama.check_token_ids
    monkeypatch.setattr(nanovl.llama, "check_token_ids", lambda *a, **k: checks.append(k) or plain(*a, **k))
    out, printed = run(capsys, "--what", "train", "--llm-only", "--compare", "--batch", "2", "--seq", "32")
    ref = out["reference"]
    assert ref["name"] == "transformers LlamaForCausalLM" and ref["flops"] == ref["nanovl"]["flops"]
    assert ref["ratio"] == pytest.approx(ref["nanovl"]["tokens_per_s"] / ref["tokens_per_s"])
    _, printed = run(capsys, "--what", "prefill", "--compare", "--batch", "1", "--seq", "48")
    assert "--compare: the decoder's prefill" in printed
    # nanovl's timed steps read no count back from the device (a sync transformers' steps do not make either)
    assert checks and all(k.get("check_range") is False for k in checks)

    out, printed = run(capsys, "--what", "decode", "--compare", "--prompt-len", "20", "--new", "6")
    # the same weights in fp32 on CPU: transformers' greedy tokens are ours
    assert out["reference"]["same_tokens_as_loop"] == {"nanovl.generate": 6, "transformers generate": 6}
    assert "transformers generate 6 of 6" in printed
    assert set(out["reference"]["nanovl"]) == {"nanovl loop (model + KVCache)", "nanovl.generate"}
    assert out["reference"]["ratio"] == pytest.approx(out["reference"]["nanovl"]["nanovl.generate"]["tokens_per_s"]
                                                      / out["reference"]["tokens_per_s"])

    out, printed = run(capsys, "--what", "vision", "--compare", "--batch", "1")
    assert [r["name"] for r in out["reference"]] == ["timm VisionTransformer", "segment-anything ImageEncoderViT"]
    assert "nanovl SigLIP / timm VisionTransformer" in printed


def test_compare_builds_each_reference_at_nanovls_sizes_and_feeds_it_the_same_batches(capsys, monkeypatch):
    # A reference built smaller (fewer blocks, no global attention) or given fewer rows would flatter the ratio: each
    # has nanovl's parameter count, and each of its calls gets the rows nanovl's calls get.
    fed = []  # (reference, batch size) of every call

    def watched(maker):
        def make(*args, **kwargs):
            module = maker(*args, **kwargs)
            # the towers' first layer (timm's forward_features is called, not its forward); the decoder's forward
            first = getattr(module, "patch_embed", module)
            first.register_forward_pre_hook(lambda m, a, k: fed.append((maker.__name__, len(a[0] if a else
                                                                                             k["input_ids"]))),
                                            with_kwargs=True)
            built[maker.__name__] = module
            return module
        return make

    built = {}
    for maker in (bench.hf_llama, bench.timm_siglip, bench.sam_encoder):
        monkeypatch.setattr(bench, maker.__name__, watched(maker))
    cfg = get_config("tiny")
    ours = DeepSeekVL(cfg)
    count = lambda m, skip=(): sum(p.numel() for n, p in m.named_parameters() if not n.startswith(skip))  # noqa: E731

    run(capsys, "--what", "train", "--llm-only", "--compare", "--batch", "3", "--seq", "32")
    assert count(built["hf_llama"]) == count(ours.llm) and fed and set(fed) == {("hf_llama", 3)}
    fed.clear()
    run(capsys, "--what", "vision", "--compare", "--batch", "3")
    assert count(built["timm_siglip"], "attn_pool") == count(ours.siglip)  # (the pooling head: never run)
    assert count(built["sam_encoder"]) == count(ours.sam, ("neck_hd", "downsamples", "hd_alpha_downsamples"))
    assert {name for name, _ in fed} == {"timm_siglip", "sam_encoder"} and {n for _, n in fed} == {3}


def test_compare_without_the_references_says_what_is_missing(capsys, monkeypatch):
    real_import = builtins.__import__

    def no_references(name, *args, **kwargs):
        if name.split(".")[0] in ("transformers", "timm", "segment_anything"):
            raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_references)
    out, printed = run(capsys, "--what", "vision", "--compare", "--batch", "1")
    assert "timm is not installed" in printed and "segment-anything is not installed" in printed
    assert out["reference"] is None and out["images_per_s"] > 0  # nanovl's own figures are still there
    out, printed = run(capsys, "--what", "decode", "--compare", "--prompt-len", "20", "--new", "3")
    assert "transformers is not installed" in printed and out["reference"] is None and out["tokens_per_s"] > 0


def test_bad_arguments_are_refused_with_a_reason(capsys):
    for argv, reason in ((["--what", "train", "--bogus", "1"], "model config overrides are dotted"),
                         (["--what", "train", "--stesp", "1"],
                          "unrecognised argument '--stesp' (did you mean --steps?)"),
                         (["--what", "train", "--llm.nope=1"], "no field 'nope'"),
                         (["--what", "train", "--seq", "30"], "too short for one image of 36 tokens"),
                         (["--what", "prefill", "--seq", "30"], "use --seq 38 or more\n"),  # no --llm-only hint
                         (["--what", "prefill", "--llm-only"], "--llm-only is for --what train"),
                         (["--what", "decode", "--seq", "64"], "--seq is for --what train, prefill; --what decode"),
                         (["--what", "train", "--new", "8"], "--new is for --what decode; --what train does not"),
                         (["--what", "suite", "--batch", "8"], "--batch is for --what train, prefill, decode, vision"),
                         (["--what", "train", "--batch", "0"], "--batch must be at least 1, got 0"),
                         (["--what", "decode", "--prompt-len", "600", "--new", "4"],
                          "604 tokens (--prompt-len + --new) do not fit the 'tiny' model's context of 512"),
                         (["--what", "decode", "--new", "2"], "--new must be at least 3, got 2"),
                         (["--what", "suite", "--budget", "-1"], "--budget must be 0 seconds or more, got -1.0"),
                         (["--what", "suite", "--tables", "missing.jsonl"], "--tables missing.jsonl: no such file"),
                         (["--tables", "missing.jsonl"], "--tables missing.jsonl: no such file"),  # implies suite
                         (["--config", "tiny"], "the following arguments are required: --what"),
                         (["--what", "train", "--tables", "a.jsonl"], "--tables is for --what suite"),
                         (["--what", "decode", "--runs", "decode-7b"], "--runs is for --what suite"),
                         (["--what", "suite", "--config", "7b"], "--config is for --what train, prefill, decode"),
                         (["--what", "tokenizer", "--llm.n_layers=2"], "model config overrides (llm.n_layers) are "
                                                                       "for --what train"),
                         (["--what", "vision", "--budget", "5"], "--budget is for --what suite"),
                         (["--what", "vision", "--mb", "2"], "--mb is for --what tokenizer"),
                         (["--what", "tokenizer", "--warmup", "3"], "--warmup is for --what train, prefill, decode"),
                         (["--what", "train", "--llm-only", "--stage", "2"], "--stage picks a freeze map of the whole "
                                                                           "model; --llm-only times the decoder"),
                         (["--what", "prefill", "--compile"], "--compile is for --what train, decode, vision"),
                         (["--what", "vision", "--compile", "--warmup", "0"], "which --warmup 0 would time as a step"),
                         (["--what", "train", "--compile", "--warmup", "0"], "use --warmup 1 or more"),
                         (["--what", "decode", "--separate-projections"], "it needs --compile"),
                         (["--what", "train", "--compile", "--separate-projections"],
                          "--separate-projections is for --what decode"),
                         (["--what", "decode", "--inductor", "max_autotune=True"], "it needs --compile"),
                         (["--what", "suite", "--inductor", "max_autotune=True"], "it needs --compile"),
                         (["--what", "suite", "--compile", "--inductor", "nosuch=1"], "a --what that compiles"),
                         (["--what", "decode", "--compile", "--inductor", "max_autotune"], "expected NAME=VALUE"),
                         (["--what", "decode", "--compile", "--inductor", "max_autotun=True"],
                          "torch._inductor.config has no such setting"),
                         (["--what", "decode", "--compile", "--inductor", "triton.nope=1"], "has no such setting"),
                         (["--what", "decode", "--compile", "--inductor", "max_autotune=Ture"],
                          "max_autotune: expected a bool (it is False), got 'Ture'")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert reason in capsys.readouterr().err


def test_suite_files_that_are_not_suite_records_are_refused_with_a_reason(capsys, tmp_path):
    with pytest.raises(SystemExit, match=r"unknown suite runs \[''\]"):  # an empty --runs is no run, not all of them
        bench.main(["--what", "suite", "--runs", "", "--out", str(tmp_path / "s")])
    for content, reason in [("", "holds no runs"), ('{"name": "x", "result": 1}\n', "record 1: not a suite run's"),
                            ('{"name": "x", "result": null, "error": "boom"}\n', "record 1: not a suite run's"),
                            ('{"name": "x", "res', "line 1: not valid JSON: Unterminated string starting at column 15"),
                            ('{"name": "train-1.3b", "args": "", "seconds": 1, "error": null, "date": "d", '
                             '"result": {"device_name": "cpu", "torch": "2"}}\n', "a run's figures lack")]:
        (tmp_path / "suite.jsonl").write_text(content)
        with pytest.raises(SystemExit):
            bench.main(["--what", "suite", "--tables", str(tmp_path / "suite.jsonl")])
        assert reason in capsys.readouterr().err, content
    with pytest.raises(SystemExit):
        bench.main(["--what", "suite", "--tables", str(tmp_path)])
    assert "is a folder; expected the suite.jsonl in it" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--out .*suite.jsonl: cannot make the folder"):
        bench.main(["--what", "suite", "--small", "--runs", "train-1.3b", "--out", str(tmp_path / "suite.jsonl")])


def test_tokenizer_benchmark_still_runs(capsys, tmp_path):
    from nanovl.tokenizer import Tokenizer

    path = tmp_path / "tokenizer.json"
    Tokenizer.train(["def f(x):\n    return x + 1\n" * 50, "import os\nprint(os.getcwd())\n" * 30], 280).save(path)
    (tmp_path / "cache").mkdir()  # a folder without a tokenizer.json
    result = bench.main(["--what", "tokenizer", "--tokenizer", str(path), "--small-vocab", "400",
                         "--small-corpus-mb", "0.05", "--mb", "0.05"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))
    assert [(r["name"], r["vocab"]) for r in result["runs"]] == [("small", 400), ("big", 280)]
    assert all(r["tokens_per_byte"] < 1 for r in result["runs"])  # merges happened: fewer tokens than bytes
    for argv, reason in ((["--mb", "-1"], "--mb must be a finite number above 0, got -1.0"),  # ([:-1000000]: all)
                         (["--mb", "inf"], "--mb must be a finite number above 0, got inf"),
                         (["--tokenizer", str(tmp_path / "nope.json")], "nope.json: no such file or folder"),
                         (["--tokenizer", str(tmp_path / "cache")], "no tokenizer.json at"),
                         (["--vocab-size", "100"], "--vocab-size 100 is too small: 4 special tokens .* at least 260")):
        with pytest.raises(SystemExit, match=reason):
            bench.main(["--what", "tokenizer", "--small-vocab", "400", "--small-corpus-mb", "0.05"] + argv)
        assert "trained a" not in capsys.readouterr().out  # said before the small tokenizer trains, not after
    with pytest.raises(SystemExit):
        bench.main(["--what", "tokenizer", "--tokenizer", str(path), "--vocab-size", "300"])
    assert "--tokenizer gives that one: pass one of them" in capsys.readouterr().err


def test_the_tokenizer_benchmark_caches_its_big_tokenizer_whole_and_names_a_broken_cache(capsys, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    argv = ["--what", "tokenizer", "--small-vocab", "400", "--small-corpus-mb", "0.05", "--mb", "0.05",
            "--vocab-size", "300"]
    bench.main(argv)
    cached = tmp_path / "cache" / "stdlib-bpe-300.json"
    assert os.listdir(tmp_path / "cache") == [cached.name]  # written aside, then renamed: no temporary left
    assert "training a 300-id tokenizer" in capsys.readouterr().out
    bench.main(argv)
    assert "training a" not in capsys.readouterr().out  # the second run reads the cache
    cached.write_text(cached.read_text()[:100])  # a run killed mid-write, before the writes were atomic
    with pytest.raises(SystemExit, match=rf"\({re.escape(str(cached))} is bench.py's cache of the tokenizer it "
                                         r"trains: delete it, and the next run trains it again\)"):
        bench.main(argv)


def test_suite_runs_each_bench_in_its_own_process_and_prints_the_readme_tables(capsys, tmp_path):
    runs = "train-1.3b,memory-1.3b-stage1"
    out, printed = run(capsys, "--what", "suite", "--small", "--runs", runs, "--out", str(tmp_path))
    assert [r["name"] for r in out["runs"]] == runs.split(",") and all(r["error"] is None for r in out["runs"])
    logged = [json.loads(line) for line in (tmp_path / "suite.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in ("name", "seconds", "error")} for r in logged] == out["runs"]
    assert "=== memory-1.3b-stage1" in (tmp_path / "suite.log").read_text()
    train = logged[0]["result"]
    assert train["config"] == "tiny" and train["reference"]["name"] == "transformers LlamaForCausalLM"
    pair = train["reference"]  # the table shows the decoder's figures from the same comparison as the reference's
    assert f"| {pair['tokens_per_s']:,.0f} tokens/s | {pair['nanovl']['tokens_per_s']:,.0f} tokens/s | " \
           f"{pair['ratio']:.2f}x |" in printed
    assert "| SAM-B forward, 1024x1024, bf16, batch 8 | 56 images/s | not run |" in printed
    assert "| 1.3b | stage 1 | no | 2 x 80 |" in printed  # (the run's name: --small's arguments are tiny's)
    assert "(--small: every run is the tiny preset's, at its small shapes; the rows name the runs" in printed
    again, reprinted = run(capsys, "--what", "suite", "--tables", str(tmp_path / "suite.jsonl"))
    assert reprinted == printed.split("\n\n", 1)[1]  # the tables again, from the file, without running anything
    _, skipped = run(capsys, "--what", "suite", "--small", "--runs", "train-1.3b", "--budget", "0", "--out",
                     str(tmp_path))
    assert "out of budget (0 s); not run: train-1.3b" in skipped


def test_tables_of_several_suite_files_show_each_runs_latest_figures(capsys, tmp_path):
    """A suite stopped at its budget, and a second one for the runs it missed: --tables reads both, and a run in
    both shows once, with its latest figures (a later failure, or a later run cut short, does not hide them)."""
    args = "--what train --config 1.3b --stage 1 --steps 1 --warmup 1"
    record = lambda result, error: {"name": "memory-1.3b-stage1", "args": args, "date": "d", "seconds": 1,
                                    "result": result, "error": error}
    figures = {"device_name": "NVIDIA H200", "torch": "2.11", "config": "1.3b", "batch": 4, "seq": 4096,
               "peak_memory_bytes": 3 * 2 ** 30, "memory": "torch.cuda.max_memory_allocated"}
    older = dict(figures, peak_memory_bytes=5 * 2 ** 30)
    failed = {"name": "train-1.3b", "args": "", "date": "d", "seconds": 1, "result": None, "error": "exit status 1"}
    files = [[record(older, None), record(None, "stopped at the budget after 3 s"), failed,
              dict(record(dict(figures, torch="2.4"), None), name="memory-1.3b-stage2",
                   args=args.replace("--stage 1", "--stage 2"))],
             [record(figures, None), record(None, "exit status 1"),
              record(dict(figures, peak_memory_bytes=2 ** 30, partial=True), "stopped at the budget after 9 s")]]
    for n, records in enumerate(files):
        (tmp_path / f"{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, printed = run(capsys, "--what", "suite", "--tables", str(tmp_path / "0.jsonl"), str(tmp_path / "1.jsonl"))
    assert printed.count("| 1.3b | stage 1 |") == 1 and "| 1.3b | stage 1 | no | 4 x 4096 | 3.0 GiB |" in printed
    assert "| 35.8k tokens/s, 35% MFU | no figures: exit status 1 |" in printed  # not "not run": it ran, and failed
    assert "figures from: NVIDIA H200, torch 2.11, d; NVIDIA H200, torch 2.4, d\n" in printed
    _, printed = run(capsys, "--what", "suite", "--tables", str(tmp_path / "0.jsonl"))
    assert "| 1.3b | stage 1 | no | 4 x 4096 | 5.0 GiB |" in printed
    bench.main(["--tables", str(tmp_path / "0.jsonl")])  # --tables alone: the same
    assert capsys.readouterr().out.strip().splitlines()[:-1] == printed.splitlines()


def test_a_failing_reference_or_compiled_run_is_left_out_and_the_others_stand(capsys, monkeypatch):
    import types

    def broken(i):
        raise RuntimeError("no compiler here\nmore detail")

    args = types.SimpleNamespace(steps=1, warmup=0)
    figures = bench.time_runs({"nanovl": (lambda i: None, 10), "reference": (broken, 10)}, 4, "tokens/s", args, "cpu",
                              None, optional=("reference",))
    assert list(figures) == ["nanovl"]
    assert "reference: failed (RuntimeError: no compiler here); left out" in capsys.readouterr().out
    with pytest.raises(RuntimeError):  # nanovl's own runs are not optional: their failure is the bench's
        bench.time_runs({"nanovl": (broken, 10)}, 4, "tokens/s", args, "cpu", None, optional=("reference",))
    assert bench.ratio(figures, "nanovl", "reference", "tokens/s") is None

    # decoding: a compiled nanovl.generate that fails leaves the loop's and the plain generate's figures
    import nanovl.generate
    plain = nanovl.generate.generate

    def no_compiler(*a, compile=False, **k):
        if compile:
            raise RuntimeError("inductor is not available")
        return plain(*a, **k)

    monkeypatch.setattr(nanovl.generate, "generate", no_compiler)
    import torch._inductor.config as inductor

    # inductor's own patch puts the setting back after (monkeypatch would delete it from inductor's config object)
    before = inductor.coordinate_descent_tuning
    Step = nanovl.generate.DecodeStep
    monkeypatch.setattr(Step, "compile_options", {"coordinate_descent_tuning": True})
    with inductor.patch(coordinate_descent_tuning=True):
        result, printed = run(capsys, "--what", "decode", "--compile", "--inductor", "coordinate_descent_tuning=False",
                              "--steps", "1", "--warmup", "0")
        assert result["inductor"] == {"coordinate_descent_tuning": False} and not inductor.coordinate_descent_tuning
    assert inductor.coordinate_descent_tuning == before
    # The decoding step's own compile options would win over the config: the setting is made there too, and the
    # step hands it to torch.compile.
    assert Step.compile_options == {"coordinate_descent_tuning": False}
    given = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: given.append(kw["options"]) or fn)
    llm = Llama(get_config("tiny", **{"llm.n_layers": 1}).llm)
    Step(llm, llm.new_cache(1, 8), compile=True)
    assert given == [{"coordinate_descent_tuning": False}]
    assert "nanovl.generate, compiled: failed (RuntimeError: inductor is not available); left out" in printed
    assert set(result["runs"]) == {"nanovl loop (model + KVCache)", "nanovl.generate"}
    assert result["tokens_per_s"] == result["runs"]["nanovl.generate"]["tokens_per_s"]


def test_separate_projections_times_the_compiled_step_without_stacked_weights(capsys, monkeypatch):
    # --separate-projections adds a compiled nanovl.generate run with DecodeStep.stack off, in the same process as the
    # one with it on (the headline), and puts the setting back after. (The step's graph with it off is
    # test_generate's; here generate runs uncompiled, the compiler's time spared.)
    import nanovl.generate
    plain, Step, calls = nanovl.generate.generate, nanovl.generate.DecodeStep, []

    def recorded(*a, compile=False, **k):
        calls.append((compile, Step.stack))
        return plain(*a, **k)

    monkeypatch.setattr(nanovl.generate, "generate", recorded)
    result, printed = run(capsys, "--what", "decode", "--compile", "--separate-projections", "--steps", "1",
                          "--warmup", "0", "--prompt-len", "20", "--new", "3")
    assert calls == [(False, True), (True, True), (True, False)] and Step.stack is True
    assert list(result["runs"]) == ["nanovl loop (model + KVCache)", "nanovl.generate", "nanovl.generate, compiled",
                                    "nanovl.generate, compiled, projections one by one"]
    assert result["tokens_per_s"] == result["runs"]["nanovl.generate, compiled"]["tokens_per_s"]
    assert "nanovl.generate, compiled, projections one by one 3 of 3" in printed


FAKE_BENCH = """
import json, sys, time
print("nanovl bench: a stand-in that measures its headline, then hangs or fails in its comparison")
print(json.dumps({"what": "train", "config": "tiny", "device": "cpu", "device_name": "cpu", "torch": "x",
                  "reference": None, "tokens_per_s": 1234.0, "mfu": None, "batch": 4, "seq": 4096, "partial": True}))
print("comparing...")
if "--seq" in sys.argv:  # train-1.3b has --seq 2048 in SUITE: hang past the budget
    time.sleep(60)
sys.exit(1)
"""


def test_a_suite_run_cut_short_or_failing_keeps_the_figures_it_printed(capsys, monkeypatch, tmp_path):
    fake = tmp_path / "fake_bench.py"
    fake.write_text(FAKE_BENCH)  # no flush in it: only the suite's unbuffered child keeps the lines past a kill
    monkeypatch.setattr(bench, "__file__", str(fake))
    out = tmp_path / "suite"
    (cut,) = bench.run_suite(argparse.Namespace(out=str(out), runs="train-1.3b", budget=4, small=False))
    (failed,) = bench.run_suite(argparse.Namespace(out=str(out), runs="memory-1.3b-stage1", budget=60, small=False))
    records = [cut, failed]
    assert cut["error"].startswith("stopped at the budget after") and "the figures it had are kept" in cut["error"]
    assert cut["result"]["tokens_per_s"] == 1234.0 and cut["result"]["partial"]
    assert failed["error"].startswith("exit status 1; the figures it had are kept")
    assert "comparing..." in (out / "suite.log").read_text()
    bench.suite_tables(records)
    printed = capsys.readouterr().out
    assert "| 1,234 tokens/s (run cut short: the figures it had) |" in printed
    assert "| 1.3b | stage 1 | no | 4 x 4096 | exit status 1; the figures it had are kept; see " in printed


def test_a_compiled_run_alone_is_compared_with_the_eager_runs_reference(capsys):
    def train_result(tokens, reference=None):
        return {"what": "train", "device": "cuda", "device_name": "NVIDIA H200", "torch": "2.11", "mfu": 0.5,
                "tokens_per_s": tokens, "reference": reference}

    ref = {"name": "transformers LlamaForCausalLM", "tokens_per_s": 1000.0, "mfu": 0.35, "ratio": 1.5,
           "nanovl": {"tokens_per_s": 1500.0, "mfu": 0.52}}
    records = [{"name": "train-1.3b", "args": "", "date": "d", "seconds": 1, "error": None,
                "result": train_result(1500.0, ref)},
               {"name": "train-1.3b-compiled", "args": "", "date": "d", "seconds": 1, "error": None,
                "result": train_result(2000.0)}]
    bench.suite_tables(records)
    printed = capsys.readouterr().out
    assert "| the same, nanovl compiled (against the eager run's reference) | - | 1,000 tokens/s, 35.0% MFU (eager " \
           "run's) | 2,000 tokens/s, 50.0% MFU | 2.00x |" in printed

    # Decoding and vision: the ratio is always nanovl's throughput over the reference's; with the reference in the
    # run, nanovl's figure is the one from the same comparison (a text prompt), not the run's own (with an image).
    generate_ref = {"name": "transformers generate", "tokens_per_s": 20.0, "ratio": 40.5,
                    "nanovl": {"nanovl.generate": {"tokens_per_s": 810.0}}}
    decode = lambda tokens, runs, reference=None: dict(train_result(tokens, reference), what="decode", runs=runs)
    vision = {"what": "vision", "device": "cuda", "device_name": "NVIDIA H200", "torch": "2.11", "reference": None,
              "runs": {"nanovl SAM trunk + neck": {"images_per_s": 150.0},
                       "segment-anything ImageEncoderViT": {"images_per_s": 50.0}}}
    records = [{"name": name, "args": "", "date": "d", "seconds": 1, "error": None, "result": result}
               for name, result in [
                   ("decode-1.3b", decode(800.0, {"nanovl.generate": {"tokens_per_s": 800.0}}, generate_ref)),
                   ("decode-1.3b-compiled", decode(1000.0, {"nanovl.generate, compiled": {"tokens_per_s": 1000.0},
                                                            "nanovl.generate, compiled, projections one by one":
                                                                {"tokens_per_s": 900.0}})),
                   ("vision-7b-sam8", vision),
                   ("decode-7b", decode(60.0, {"nanovl.generate": {"tokens_per_s": 40.0},
                                               "nanovl.generate, compiled": {"tokens_per_s": 60.0}}))]]
    bench.suite_tables(records)
    printed = capsys.readouterr().out
    assert "| 20.0 tokens/s | 810 tokens/s (CUDA graph) | 40.5x |" in printed
    assert "| 20.0 tokens/s (eager run's) | 1,000 tokens/s (compiled), 900 tokens/s (compiled, projections one by " \
           "one) | 50.0x |" in printed  # --separate-projections' run named
    assert "| 50 images/s | 150 images/s (eager) | 3.00x |" in printed
    assert "| none | - | 40 tokens/s (CUDA graph), 60 tokens/s (compiled) | - | - |" in printed  # the 7B: no reference


def test_mfu_is_model_flops_per_second_over_the_devices_peak():
    spec = bench.device_spec("NVIDIA H200")
    f = bench.figure(work=4096, seconds=0.5, flops=400e12, memory=None, spec=spec, unit="tokens/s")
    assert f["tokens_per_s"] == 8192 and f["flops_per_s"] == 800e12 and f["mfu"] == pytest.approx(800e12 / 989e12)
    assert bench.figure(4096, 0.5, 400e12, None, None, "tokens/s")["mfu"] is None  # CPU: no peak to compare with


def test_the_gpu_script_runs_its_steps_in_order_within_its_time(tmp_path):
    # .ci/gpu, what a session lent a GPU runs (CI cannot: it has no GPU), with a stand-in for Python that logs how it
    # is called: the first suite run, the GPU tests, the other runs, the tables; wheels in .whl/ installed first;
    # every budget at least 0, whatever the time given; the tests' exit status is the script's.
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(os.path.join(root, ".ci", "gpu"), repo / ".ci" / "gpu")
    (repo / ".whl").mkdir()
    (repo / ".whl" / "segment_anything-1.0-py3-none-any.whl").write_text("")
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\ncase \"$*\" in *pytest*) exit $TESTS_EXIT;; esac\n")
    fake.chmod(0o755)

    def gpu(total, tests_exit, *runs):
        log.write_text("")
        env = dict(os.environ, PY=str(fake), OUT=str(tmp_path / "out"), TOTAL=str(total), TESTS_EXIT=str(tests_exit))
        done = subprocess.run(["bash", str(repo / ".ci" / "gpu"), *runs], env=env, capture_output=True, text=True)
        return done.returncode, [line.split(" --out")[0] for line in log.read_text().splitlines()], log.read_text()

    status, calls, text = gpu(540, 0)
    assert status == 0 and calls == [
        "-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
        ".whl/segment_anything-1.0-py3-none-any.whl",
        calls[1],  # (torch's version and the device's name)
        "bench.py --what suite --runs decode-1.3b-compiled",
        "-m pytest -q -p no:cacheprovider tests/test_gpu.py",
        "bench.py --what suite --runs vision-7b-compiled,decode-7b",
        f"bench.py --tables {tmp_path / 'out'}/suite.jsonl"]
    first, rest = map(int, re.findall(r"--budget (\d+)", text))  # (a second may pass while it runs)
    assert 388 <= first <= 390 and 523 <= rest <= 525  # the first leaves the tests 150 s, the rest leave 15 s
    status, calls, text = gpu(100, 3, "train-1.3b")  # one run named; too little time; the tests fail
    assert status == 3 and "bench.py --what suite --runs train-1.3b" in calls and len(calls) == 5
    assert re.findall(r"--budget (\d+)", text) == ["0"]
    status, calls, text = gpu(10, 0)  # no time left for the tests: not run unbounded (timeout 0), said to be not run
    assert status == 124 and not any("-m pytest" in call for call in calls)
    assert "not run: no time left" in (tmp_path / "out" / "tests.log").read_text()
