"""What only a GPU can check: the CUDA-graph decoding path, and the bf16 kernels (SDPA's flash / cuDNN / memory-
efficient attention, with causal, boolean and additive masks) against the references. Skipped without CUDA; on the
device, `python -m pytest -q tests/test_gpu.py`. NANOVL_TEST_DEVICE=cpu runs the same checks on the CPU (no graph is
recorded there), to try the test code itself on a machine without a GPU.

bf16 keeps 8 bits of mantissa, so the bf16 checks compare with a norm-relative error (|a - b| / |b| over the whole
tensor) of about 1%; the fp32 checks, where the same kernels run on both sides, keep the suite's 1e-5.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import ATOL, max_diff, randomize_
from nanovl import DeepSeekVL, get_config
from nanovl.config import SAMConfig, SigLIPConfig
from nanovl.generate import DecodeStep, Sampling, generate
from nanovl.sam import SAM
from nanovl.siglip import SigLIP

DEVICE = os.environ.get("NANOVL_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_error(got, expected) -> float:
    got, expected = got.float().cpu(), expected.float().cpu()
    return ((got - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_(DeepSeekVL(get_config("tiny")), std=0.3).to(DEVICE).eval()  # fp32


def test_graph_replay_gives_the_eager_step_logits(tiny):
    llm, V = tiny.llm, tiny.cfg.llm.vocab_size
    prompt = torch.randint(4, V, (2, 20), device=DEVICE)
    mask = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    mask[1, :7] = False  # a left-padded row
    caches = [llm.new_cache(2, 40) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            llm(prompt, cache=cache, pad_mask=mask)
        step = DecodeStep(llm, caches[0])
        tok = torch.randint(4, V, (2, 1), device=DEVICE)
        for _ in range(6):
            got = step(tok).clone()  # the graph's output is rewritten by the next replay
            expected = llm.decode_step(tok, caches[1], torch.tensor([caches[1].length], device=DEVICE))
            caches[1].length += 1
            assert max_diff(got, expected) < ATOL
            tok = got.argmax(-1, keepdim=True)
    assert (step.graph is not None) == (DEVICE == "cuda")


def test_generate_on_the_device_equals_recomputing_every_step(tiny):
    prompts = [[5, 9, 14, 200, 31, 7], [40, 41]]  # a left-padded batch
    got = generate(tiny, prompts, sampling=Sampling(max_new_tokens=8))
    for prompt, answer in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                logits, _ = tiny(torch.tensor([ids], device=DEVICE))
                ids.append(int(logits[0, -1].argmax()))
        assert answer == ids[len(prompt):]
    assert generate(tiny, prompts, sampling=Sampling(max_new_tokens=8), compile=True) == got


def test_a_stop_on_the_device_cuts_the_answer_and_gives_back_the_queued_step(tiny):
    """On a GPU, _decode queues the next step before it learns that every row has stopped: the answer must still end
    at the stop token, and the cache must hold exactly the tokens fed (all but the last), as ChatSession expects."""
    from nanovl.generate import _decode

    prompt = [5, 9, 14, 200, 31, 7]
    full = generate(tiny, [prompt], sampling=Sampling(max_new_tokens=8))[0]
    stop = full[3]
    assert generate(tiny, [prompt], sampling=Sampling(max_new_tokens=8), stop_ids={stop})[0] == \
        full[:full.index(stop) + 1]
    cache = tiny.llm.new_cache(1, 20)
    with torch.no_grad():
        logits, _ = tiny.llm(torch.tensor([prompt], device=DEVICE), cache=cache, last_only=True)
        out = _decode(tiny, DecodeStep(tiny.llm, cache), logits[:, -1], Sampling(max_new_tokens=8), {stop}, 0,
                      tiny.cfg.llm.vocab_size)
    assert out[0].tolist() == full[:full.index(stop) + 1]
    assert cache.length == len(prompt) + out.shape[1] - 1
    # An answer that stops at its first token runs no step: the first records the graph, not worth it in vain
    cache = tiny.llm.new_cache(1, 20)
    with torch.no_grad():
        logits, _ = tiny.llm(torch.tensor([prompt], device=DEVICE), cache=cache, last_only=True)
        step = DecodeStep(tiny.llm, cache)
        out = _decode(tiny, step, logits[:, -1], Sampling(max_new_tokens=8), {full[0]}, 0, tiny.cfg.llm.vocab_size)
    assert out[0].tolist() == full[:1] and cache.length == len(prompt) and step.graph is None


def test_the_decode_breakdown_reads_the_steps_kernels(tiny):
    """bench.py's "where a step goes": on a GPU its rows must be the step's kernels as the profiler saw them (a
    profiler that records no kernel on the device would leave the table empty), on CPU its ops."""
    import bench

    prompt = torch.tensor([[5, 9, 14, 200, 31, 7, 40, 41]], device=DEVICE)  # text: no image placeholder
    b = bench.decode_breakdown(tiny, prompt, None, 6, False, DEVICE, per_step_s=1.0)
    assert b["step_s"] > 0 and b["kernels_s"] > 0 and b["kernels"] and b["device"] == DEVICE
    assert all(k["name"].startswith("aten::") == (DEVICE != "cuda") for k in b["kernels"])


def test_bench_counts_peak_memory_from_the_model_as_it_runs():
    """bench.build initialises in fp32 and casts to bf16: the peak memory it leaves is the bf16 model's (the 7B
    prefill's peak was once its fp32 initialisation, twice its weights)."""
    if DEVICE != "cuda":
        pytest.skip("the CUDA allocator's statistics")
    import bench

    model = bench.build(get_config("tiny"), DEVICE, torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated() >= weights


def test_prefill_through_the_causal_kernel_equals_the_masked_path():
    torch.manual_seed(0)
    llm = randomize_(DeepSeekVL(get_config("tiny")), std=0.1).llm.to(DEVICE, torch.bfloat16).eval()
    ids = torch.randint(4, 2048, (2, 300), device=DEVICE)
    with torch.no_grad():
        causal, _ = llm(ids, cache=llm.new_cache(2, 300))  # empty cache, no padding: is_causal
        masked, _ = llm(ids, cache=llm.new_cache(2, 300), pad_mask=torch.ones_like(ids, dtype=torch.bool))
        full, _ = llm(ids)  # the training path
    assert rel_error(causal, masked) < 1e-2 and rel_error(causal, full) < 1e-2


@pytest.mark.skipif(DEVICE != "cuda", reason="which of SDPA's CUDA kernels serve attention")
def test_attention_is_served_by_a_fused_kernel_at_the_released_sizes():
    # Each attention call of the towers and the decoder in bf16, at the released models' head sizes, with the
    # unfused MATH kernel (matmul, softmax, matmul) switched off: it must still run, so some fused kernel serves it.
    # SAM's relative positions come as an additive bias, which flash attention does not take; the decoder's padded
    # batches and chat turns come with a boolean mask. Prints which kernels can serve each call (pytest -s shows it).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nanovl.config import LlamaConfig
    from nanovl.llama import Llama
    from nanovl.sam import Attention as SAMAttention
    from nanovl.siglip import Attention as SigLIPAttention

    torch.manual_seed(0)
    bf16 = dict(device=DEVICE, dtype=torch.bfloat16)
    llm = Llama(LlamaConfig(vocab_size=64, dim=2048, n_layers=1, n_heads=16, n_kv_heads=16, ffn_dim=64,
                            max_seq_len=1024)).to(**bf16)  # 1.3B's heads: 16 of 128
    ids, pad = torch.randint(0, 64, (2, 1024), device=DEVICE), torch.ones(2, 1024, dtype=torch.bool, device=DEVICE)
    pad[1, :100] = False
    calls = {  # SAM-B: 12 heads of 64, windows of 14 x 14 tokens and global blocks of 64 x 64; SigLIP-L: 16 of 64
        "SAM window (bias)": lambda: SAMAttention(768, 12, 14).to(**bf16)(torch.randn(8, 14, 14, 768, **bf16)),
        "SAM global (bias)": lambda: SAMAttention(768, 12, 64).to(**bf16)(torch.randn(1, 64, 64, 768, **bf16)),
        "SigLIP (none)": lambda: SigLIPAttention(1024, 16).to(**bf16)(torch.randn(4, 576, 1024, **bf16)),
        "decoder causal": lambda: llm(ids),
        "decoder padded (boolean mask)": lambda: llm(ids, pad_mask=pad),
    }
    fused = [b for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION") if hasattr(SDPBackend, b)]
    served = {}
    with torch.no_grad():
        for name, call in calls.items():
            served[name] = []
            for backend in fused:
                try:
                    with sdpa_kernel(getattr(SDPBackend, backend)):
                        call()
                    served[name].append(backend)
                except RuntimeError:  # "No available kernel": this one cannot take the call
                    pass
    print("\nSDPA kernels that can serve each call: " + "; ".join(f"{n}: {', '.join(b) or 'none'}"
                                                              for n, b in served.items()))
    assert all(served.values()), served


def test_llama_in_bf16_matches_transformers_in_fp32():
    from test_llama import CFG, hf_pair

    hf, ours = hf_pair(CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got, _ = ours.to(DEVICE, torch.bfloat16)(ids.to(DEVICE))
    assert rel_error(got, expected) < 2e-2


def test_official_rope_matches_transformers_cast_to_bf16_on_the_device():
    # sample.py --official_rope: the official scripts' .to(torch.bfloat16) rounds transformers' inv_freq; HF then
    # computes its cos and sin on the device, ours are made on the CPU and moved (tests/test_llama.py: in fp32)
    from nanovl.config import LlamaConfig
    from test_llama import CFG, hf_pair

    cfg = LlamaConfig(**dict(CFG.__dict__, dim=256, n_heads=2, n_kv_heads=2, n_layers=2, max_seq_len=700))
    hf, ours = hf_pair(cfg)
    hf, ours = hf.to(DEVICE, torch.bfloat16), ours.to(DEVICE, torch.bfloat16)
    ours.round_rope_freqs(torch.bfloat16)
    positions = torch.arange(700, device=DEVICE)[None]
    ids = torch.randint(0, cfg.vocab_size, (1, 700), device=DEVICE)
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(torch.zeros(1, device=DEVICE, dtype=torch.bfloat16), positions)
        tables = ours.rope(positions, torch.bfloat16)
        expected, (got, _) = hf(input_ids=ids).logits, ours(ids)
    assert all(max_diff(a[:, 0], b) <= 2 ** -8 for a, b in zip(tables, (cos, sin)))  # a bf16 step near 1, at most
    assert rel_error(got, expected) < 2e-2


def test_training_loss_in_bf16_autocast_matches_full_logits():
    torch.manual_seed(0)
    llm = randomize_(DeepSeekVL(get_config("tiny")), std=0.1).llm.to(DEVICE).train()
    ids = torch.randint(4, 2048, (4, 128), device=DEVICE)
    targets = ids.roll(-1, dims=1)
    targets[:, :10] = -100
    grads = []
    for chunked in (True, False):
        llm.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            if chunked:  # LinearCrossEntropy
                _, loss = llm(ids, targets=targets)
            else:  # the plain path: all the logits, then cross-entropy in fp32
                logits, _ = llm(ids)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        grads.append((loss.detach(), llm.lm_head.weight.grad.clone(), llm.embed_tokens.weight.grad.clone()))
    (loss_a, head_a, embed_a), (loss_b, head_b, embed_b) = grads
    assert abs(loss_a.item() - loss_b.item()) < 1e-3 * loss_b.item()
    assert rel_error(head_a, head_b) < 2e-2 and rel_error(embed_a, embed_b) < 2e-2


def test_an_unchecked_training_step_never_waits_for_the_device():
    # train.py's steps pass check_inputs=False so that the CPU queues a step's kernels while the GPU runs the ones
    # before: no op of the step may wait for the device (the sync debug mode makes one that does an error). Packed
    # rows with images, as stage 2's, in bf16 autocast, forward and backward. (On the CPU: the step runs, unwatched.)
    cfg = get_config("tiny")
    model = DeepSeekVL(cfg).to(DEVICE).train()
    n = cfg.n_image_tokens
    row = [1, 7] + [cfg.image_token_id] * n + [9, 10, 11, 2, 1, 12, 13, 14, 2]  # two samples, the first with an image
    ids = torch.tensor([row, row], device=DEVICE)
    targets = ids.roll(-1, dims=1).masked_fill(ids == cfg.image_token_id, -100)
    doc_ids = torch.tensor([[0] * (n + 6) + [1] * 5] * 2, device=DEVICE)
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size, device=DEVICE)
    watched = DEVICE == "cuda"
    if watched:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            _, loss = model(ids, images, targets=targets, doc_ids=doc_ids, reduction="sum", check_inputs=False)
        loss.backward()
    finally:
        if watched:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


def test_siglip_in_bf16_matches_timm_in_fp32():
    pytest.importorskip("torchvision")  # (timm imports it)
    from bench import timm_siglip

    # head size 64 and 576 tokens, as SigLIP-L/16 at 384, for the attention kernels to see the released shapes
    cfg = SigLIPConfig(image_size=384, patch_size=16, width=256, depth=2, n_heads=4, pixel_mean=None, pixel_std=None)
    ref = randomize_(timm_siglip(cfg), std=0.05).eval()
    ours = SigLIP(cfg).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("attn_pool.")})
    x = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        expected = ref.forward_features(x)
        got = ours.to(DEVICE, torch.bfloat16)(x.to(DEVICE, torch.bfloat16))
    assert rel_error(got, expected) < 2e-2


def test_sam_in_bf16_matches_segment_anything_in_fp32():
    pytest.importorskip("torchvision")  # (segment-anything's package imports it)
    from bench import sam_encoder as segment_anything_encoder

    # SAM-B's head size (64) and windows (14, padded 16 -> 28 tokens a side: 196-token windows, 256 global tokens),
    # so the additive relative-position bias meets the kernels at the released model's awkward sizes
    cfg = SAMConfig(image_size=256, patch_size=16, width=256, depth=4, n_heads=4, window_size=14, global_blocks=(1, 3),
                    neck_dim=64, downsample_dims=(64, 64), pixel_mean=None, pixel_std=None)
    ref = randomize_(segment_anything_encoder(cfg), std=0.05).eval()
    ours = SAM(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=False)  # DeepSeek's additions are not compared here
    x = torch.randn(2, 3, 256, 256)
    ours = ours.to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        expected = ref(x)
        got = ours.neck(ours.trunk(x.to(DEVICE, torch.bfloat16))[0].permute(0, 3, 1, 2))
    assert rel_error(got, expected) < 2e-2


def test_the_hybrids_low_resolution_input_in_bf16_is_torchvisions():
    T = pytest.importorskip("torchvision.transforms")  # (a test oracle only; run beside the other GPU tests without it)

    from nanovl.image import low_resolution

    # torchvision resizes a bf16 tensor in fp32 and rounds back; the device's own bf16 kernel would not give the same
    # pixels (a fifth of them off by up to a grey level), so ours must do as torchvision does, bit for bit.
    x = torch.rand(2, 3, 1024, 1024, device=DEVICE).to(torch.bfloat16)
    expected = T.Resize(384, antialias=True)(x)
    assert expected.dtype == torch.bfloat16 and torch.equal(low_resolution(x, 384), expected)


def test_training_steps_with_an_evaluation_on_the_device(tmp_path):
    """train.py as it runs on a GPU: bf16 autocast, fused AdamW on the device, and the evaluations mid-stage and at
    the end, in bf16 autocast too (without its weight cache), whose open questions decode through a recorded graph
    with the fp32 training weights; their figures are near those of the same weights evaluated in fp32 on the CPU."""
    import json

    import prepare_data
    import train
    from nanovl.data import read_jsonl

    prepare_data.main(["--out", str(tmp_path / "data"), "--n", "2", "--workers", "4"])
    torch.manual_seed(0)
    cfg = get_config("tiny")
    torch.save({"model": DeepSeekVL(cfg).state_dict(), "config": cfg.to_dict()}, tmp_path / "init.pt")
    train.main(["--data", str(tmp_path / "data"), "--stage", "3", "--init_from", str(tmp_path / "init.pt"),
                "--out", str(tmp_path / "out"), "--steps", "4", "--batch_size", "4", "--eval_every", "2",
                "--eval_limit", "10", "--workers", "0", "--log_every", "1", "--device", DEVICE])
    metrics = read_jsonl(tmp_path / "out" / "stage3" / "metrics.jsonl")
    assert [m["step"] for m in metrics if "mc_mean" in m] == [2, 4]
    assert all(0 <= m["mc_mean"] <= 1 and 0 <= m["open_mean"] <= 1 and m["bpb"] > 0 for m in metrics if "bpb" in m)
    assert all(m["loss"] > 0 for m in metrics if "loss" in m)  # finite: a NaN would have stopped the run
    result = json.loads((tmp_path / "out" / "stage3" / "eval.json").read_text())
    assert set(result["mc"]) >= {"mean", "chance"} and set(result["open"]) >= {"mean"}
    from nanovl.evaluate import evaluate, held_out
    from nanovl.image import ImageProcessor
    from nanovl.tokenizer import Tokenizer
    trained = DeepSeekVL(cfg)
    trained.load_state_dict(torch.load(tmp_path / "out" / "stage3" / "model.pt", weights_only=True)["model"])
    tok = Tokenizer.load(str(tmp_path / "out" / "stage3" / "tokenizer.json"))
    rows = held_out(str(tmp_path / "data"), 10)
    _, _, bpb = evaluate(trained, rows, tok, ImageProcessor.for_config(cfg), str(tmp_path / "data"))
    assert result["bpb"] == pytest.approx(bpb, rel=2e-2)
    assert (result["bpb"] != bpb) == DEVICE.startswith("cuda")  # on the CPU, no autocast: the very same figure
