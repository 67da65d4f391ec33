"""The decoder against transformers' LlamaForCausalLM, and the KV cache against the full forward pass."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from conftest import ATOL, max_diff, randomize_
from nanovl import DeepSeekVL, get_config
from nanovl.config import LlamaConfig
from nanovl.llama import KVCache, LinearCrossEntropy, Llama

CFG = LlamaConfig(vocab_size=97, dim=64, n_layers=3, n_heads=4, n_kv_heads=4, ffn_dim=176, max_seq_len=64)
GQA = LlamaConfig(**dict(CFG.__dict__, n_kv_heads=2))
# Other rotary base and norm epsilon than the defaults (released: 10000 and 1e-6), so that a hard-coded constant shows.
ODD = LlamaConfig(**dict(CFG.__dict__, rope_theta=50.0, norm_eps=0.05))


def hf_pair(cfg: LlamaConfig):
    """A transformers Llama and a nanovl Llama holding the same random weights."""
    hf_cfg = HFLlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                           num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                           num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                           rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                           attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "eager"
    hf = randomize_(LlamaForCausalLM(hf_cfg)).eval()
    ours = Llama(cfg).eval()
    # HF's names are ours with a `model.` prefix on everything but lm_head: the loader's table is just that.
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=True)
    return hf, ours


@pytest.mark.parametrize("cfg", [CFG, GQA, ODD], ids=["mha", "gqa", "theta-eps"])
def test_llama_matches_transformers(cfg):
    hf, ours = hf_pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got, _ = ours(ids)
    assert got.shape == (2, 40, cfg.vocab_size)
    assert max_diff(got, expected) < ATOL


def test_rmsnorm_rounds_like_transformers_in_bf16():
    # Normalised in fp32, cast back, then scaled in bf16: the order of the casts decides the last bit.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from nanovl.llama import RMSNorm
    theirs, ours = randomize_(LlamaRMSNorm(64, eps=1e-6), std=1.0), RMSNorm(64, 1e-6)
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.bfloat16(), ours.bfloat16()
    x = (torch.randn(16, 64) * 3).bfloat16()
    assert torch.equal(ours(x), theirs(x))


def test_the_rotary_tables_stay_fp32_through_dtype_casts():
    # rope casts the rows it looks up to the compute dtype; the tables stay fp32, so a model cast to bf16 and back
    # computes as one built with its (now rounded) weights. Cast with the weights, the tables stayed bf16-rounded.
    model = Llama(ODD).eval().bfloat16()
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    model.float()
    fresh = Llama(ODD).eval()
    fresh.load_state_dict(model.state_dict())
    ids = torch.randint(0, ODD.vocab_size, (1, 40))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], fresh(ids)[0])


def test_rounded_rope_freqs_reproduce_transformers_after_the_official_bf16_cast():
    # The official scripts cast the whole model with .to(torch.bfloat16), transformers' inv_freq buffer with it.
    # Cast back to fp32, the HF model keeps the rounded frequencies (and weights), so fp32 precision can tell them.
    cfg = LlamaConfig(**dict(CFG.__dict__, dim=256, n_heads=2, n_kv_heads=2, n_layers=2, max_seq_len=700))
    hf, ours = hf_pair(cfg)
    hf = hf.to(torch.bfloat16).float()
    assert hf.model.rotary_emb.inv_freq.dtype == torch.float32  # (the values stay rounded)
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    ids = torch.randint(0, cfg.vocab_size, (1, 700))
    positions = torch.arange(700)[None]
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        exact, _ = ours(ids)
        ours.round_rope_freqs(torch.bfloat16)
        got, _ = ours(ids)
        cos, sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), positions)
    assert max_diff(got, expected) < ATOL
    assert max_diff(exact, expected) > 10 * ATOL  # the exact frequencies give other logits (random weights: little)
    assert all(torch.equal(a[:, 0], b) for a, b in zip(ours.rope(positions, torch.bfloat16), (cos, sin)))
    ours.bfloat16().float()  # a later cast keeps the rounded tables, as HF keeps its rounded buffer
    with torch.no_grad():
        assert torch.equal(ours(ids)[0], got)


def left_padded_batch(lengths, vocab, T):
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    seqs = []
    for b, n in enumerate(lengths):
        seq = torch.randint(1, vocab, (n,))
        ids[b, T - n:], mask[b, T - n:] = seq, True
        seqs.append(seq)
    return ids, mask, seqs


def test_left_padded_batch_matches_transformers():
    hf, ours = hf_pair(CFG)
    ids, mask, _ = left_padded_batch([20, 13, 7], CFG.vocab_size, 20)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # what HF's generate passes for left padding
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits
        got, _ = ours(ids, pad_mask=mask)
    assert max_diff(got[mask], expected[mask]) < ATOL


@pytest.mark.parametrize("cfg", [CFG, GQA], ids=["mha", "gqa"])
def test_kv_cache_decoding_matches_full_forward(cfg):
    ours = randomize_(Llama(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        full, _ = ours(ids)
        cache = ours.new_cache(batch_size=2, max_len=32)
        prefill, _ = ours(ids[:, :22], cache=cache)  # the prompt in one pass
        steps = [ours(ids[:, t:t + 1], cache=cache)[0] for t in range(22, 30)]  # then one token at a time
    assert cache.length == 30
    assert max_diff(torch.cat([prefill] + steps, dim=1), full) < ATOL
    with torch.no_grad():  # generation asks for the last position's logits only
        last, _ = ours(ids[:, :22], cache=ours.new_cache(batch_size=2, max_len=32), last_only=True)
    assert last.shape == (2, 1, cfg.vocab_size) and max_diff(last, prefill[:, -1:]) < ATOL


def test_kv_cache_with_left_padded_batch_matches_each_sequence_alone():
    ours = randomize_(Llama(CFG)).eval()
    lengths, prompt_T, new = [18, 11, 4], 18, 6
    ids, mask, seqs = left_padded_batch(lengths, CFG.vocab_size, prompt_T)
    continuation = torch.randint(1, CFG.vocab_size, (3, new))  # tokens "generated" after each prompt
    with torch.no_grad():
        cache = ours.new_cache(batch_size=3, max_len=prompt_T + new)
        prefill, _ = ours(ids, cache=cache, pad_mask=mask)
        steps = [ours(continuation[:, t:t + 1], cache=cache)[0] for t in range(new)]
        for b, seq in enumerate(seqs):
            alone, _ = ours(torch.cat([seq, continuation[b]])[None])  # unpadded, no cache
            n = len(seq)
            assert max_diff(prefill[b, prompt_T - n:], alone[0, :n]) < ATOL
            assert max_diff(torch.cat([s[b] for s in steps]), alone[0, n:]) < ATOL


def test_every_query_sees_at_least_one_key(monkeypatch):
    # A padding query whose every key were masked would get a softmax over nothing: zeros from this CPU kernel,
    # NaN from others (and NaN in one row of a batched matmul can spread). Each sees itself at least.
    sdpa, masks = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask=None, **kw: masks.append(attn_mask) or sdpa(q, k, v, attn_mask, **kw))
    ours = randomize_(Llama(CFG)).eval()
    ids, pad, _ = left_padded_batch([10, 3], CFG.vocab_size, 10)
    with torch.no_grad():
        cache = ours.new_cache(2, max_len=16)
        ours(ids, cache=cache, pad_mask=pad)  # prefill: row 1 has 7 padding queries
        ours(ids[:, :2], cache=cache)  # a chat turn of two tokens
        pos = torch.tensor([cache.length])
        ours.decode_step(ids[:, :1], cache, pos)  # the fixed-shape step
    assert len(masks) == 3 * CFG.n_layers and not masks[0].all()
    assert all(bool(m.any(-1).all()) for m in masks)


def test_decode_step_matches_the_cache_path_of_forward():
    # decode_step is forward's T = 1 cache path with fixed shapes (what a CUDA graph replays): same logits, on a
    # left-padded batch, with a stale slot past the end (a chat turn that was undone) that it must not read. The same
    # with q, k, v's weights read as one block and gate, up's as another (stacked_projections, the compiled step's),
    # and reading only the slots up to the new token (span, the CPU's step).
    ours = randomize_(Llama(GQA)).eval()
    ids, mask, _ = left_padded_batch([9, 4, 7], GQA.vocab_size, 9)
    continuation = torch.randint(1, GQA.vocab_size, (3, 5))
    with torch.no_grad():
        caches = [ours.new_cache(3, max_len=20) for _ in range(4)]
        for cache in caches:
            ours(ids, cache=cache, pad_mask=mask)
        for cache in caches[1:]:
            cache.real[:, -1] = True
            for k in cache.k:
                k[:, :, -1] = 1e4
        steps = [(caches[1], None, False), (caches[2], ours.stacked_projections(), False), (caches[3], None, True)]
        for t in range(5):
            expected, _ = ours(continuation[:, t:t + 1], cache=caches[0])
            for cache, stacked, span in steps:
                got = ours.decode_step(continuation[:, t:t + 1], cache, torch.tensor([cache.length]), stacked,
                                       cache.length + 1 if span else None)
                cache.length += 1
                assert max_diff(got, expected[:, 0]) < ATOL
        for cache in caches[1:]:
            for a, b in zip(caches[0].k + caches[0].v, cache.k + cache.v):
                assert max_diff(a[:, :, :14], b[:, :, :14]) < ATOL  # the same slots written


def test_stacked_projections_live_in_the_parameters_own_memory():
    # The compiled decoding step reads q, k, v's weights as one tensor and gate, up's as another
    # (Llama.stacked_projections): made by moving each group into one block and pointing the parameters at its rows.
    # The parameters stay the same objects with the same values, no memory is added, the model still trains and
    # loads weights in place, and a cast (new memory for each parameter) is stacked again by the next call.
    ours = randomize_(Llama(GQA))
    params = list(ours.parameters())
    before = [p.detach().clone() for p in params]
    nbytes = lambda m: sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()  # noqa: E731
                            for p in m.parameters()}.values())
    plain = nbytes(ours)
    with torch.inference_mode():  # as generate runs it
        stacked = ours.stacked_projections()
    assert all(a is b and torch.equal(a, b_) for a, b, b_ in zip(ours.parameters(), params, before))
    assert nbytes(ours) == plain == sum(p.numel() * 4 for p in params)  # one storage per group now, none added
    for layer, (qkv, gate_up) in zip(ours.layers, stacked):
        a, m = layer.self_attn, layer.mlp
        assert qkv.shape == (64 + 32 + 32, 64) and gate_up.shape == (2 * 176, 64)
        starts = [qkv[0].data_ptr(), qkv[64].data_ptr(), qkv[96].data_ptr(), gate_up[0].data_ptr(),
                  gate_up[176].data_ptr()]
        assert [p.weight.data_ptr() for p in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)] == starts
        assert torch.equal(qkv, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
    again = ours.stacked_projections()  # already in place: views only
    assert [t.data_ptr() for pair in again for t in pair] == [t.data_ptr() for pair in stacked for t in pair]
    # Not one block, so stacked again: the rows in another order in one block, each weight at the offset it would
    # have in one block but in a block of its own, or one weight transposed in place.
    a = ours.layers[2].self_attn
    qkv = [p.weight for p in (a.q_proj, a.k_proj, a.v_proj)]
    values = [w.detach().clone() for w in qkv]
    block = torch.cat([values[1], values[0], values[2]])  # k, q, v
    a.k_proj.weight.data, a.q_proj.weight.data, a.v_proj.weight.data = block[:32], block[32:96], block[96:]
    assert torch.equal(ours.stacked_projections()[2][0], torch.cat(values))
    for w, start, value in zip(qkv, (0, 64, 96), values):
        w.data = torch.cat([torch.zeros(start, 64), value])[start:]
    assert torch.equal(ours.stacked_projections()[2][0], torch.cat(values))
    a.q_proj.weight.data = a.q_proj.weight.data.t()  # (64, 64): the shape is q's still
    assert torch.equal(ours.stacked_projections()[2][0], torch.cat([values[0].t(), *values[1:]]))

    # Training (made under inference mode, the block is an ordinary tensor) and loading weights, both in place.
    ids, q = torch.randint(0, GQA.vocab_size, (2, 10)), ours.layers[0].self_attn.q_proj.weight
    q_before = q.detach().clone()
    ours(ids, targets=ids)[1].backward()
    torch.optim.SGD(ours.parameters(), lr=0.1).step()
    assert not torch.equal(q, q_before) and torch.equal(stacked[0][0][:64], q)
    other = randomize_(Llama(GQA), seed=1)
    ours.load_state_dict(other.state_dict())
    assert torch.equal(stacked[2][1][176:], other.layers[2].mlp.up_proj.weight)

    # A cast gives each parameter memory of its own; the next call stacks them again, in the new dtype.
    ours.double()
    v = ours.layers[1].self_attn.v_proj.weight
    assert v.untyped_storage().nbytes() == v.numel() * 8
    qkv = ours.stacked_projections()[1][0]
    assert qkv.dtype == torch.float64 and qkv[96].data_ptr() == v.data_ptr()
    assert torch.equal(qkv[96:], other.layers[1].self_attn.v_proj.weight.double())


def test_training_loss_and_gradients_match_transformers():
    # HF shifts labels inside its loss; ours takes targets already shifted (nanoGPT's convention): the same
    # predictions. The loss never makes the full logits (LinearCrossEntropy), so this is its end-to-end check.
    hf, ours = hf_pair(CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 40))
    labels = ids.clone()
    labels[0, :9] = -100  # a prompt without loss, as in SFT
    targets = labels.roll(-1, dims=1)
    targets[:, -1] = -100
    hf(input_ids=ids, labels=labels).loss.backward()
    logits, loss = ours(ids, targets=targets)
    assert logits is None  # the training path returns no logits: it never holds them
    loss.backward()
    assert torch.allclose(loss, hf(input_ids=ids, labels=labels).loss, atol=1e-6)
    hf_grads = {k.removeprefix("model."): p.grad for k, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        assert max_diff(p.grad, hf_grads[name]) < 1e-5, name


def test_linear_cross_entropy_in_chunks_matches_full_logits():
    torch.manual_seed(0)
    h = torch.randn(23, 16, requires_grad=True)  # 23 rows in chunks of 5: the last chunk is short
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (23,))
    t[::4] = -100
    loss = LinearCrossEntropy.apply(h, w, t, 5, True)
    (0.3 * loss).backward()  # the incoming gradient scales what forward worked out
    expected = F.cross_entropy(h @ w.T, t, ignore_index=-100, reduction="sum")
    got_h, got_w, h.grad, w.grad = h.grad, w.grad, None, None
    (0.3 * expected).backward()
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert max_diff(got_h, h.grad) < 1e-5 and max_diff(got_w, w.grad) < 1e-5
    frozen = w.detach()  # a frozen lm_head (stage 1): only the hidden states get a gradient
    h.grad = None
    LinearCrossEntropy.apply(h, frozen, t, 5, True).backward()
    assert max_diff(h.grad, torch.autograd.grad(F.cross_entropy(h @ frozen.T, t, reduction="sum"), h)[0]) < 1e-5
    with torch.no_grad():  # evaluation: the loss alone
        assert torch.allclose(LinearCrossEntropy.apply(h, w, t, 5, False), expected, rtol=1e-6)


def test_a_bf16_model_trains_without_autocast():
    # model.to(torch.bfloat16) and a training step, no autocast: the chunked loss must take bf16 weights as the plain
    # path does (its gradients came out of an fp32 softmax, and met bf16 weights in a matmul).
    model = randomize_(Llama(CFG)).to(torch.bfloat16)
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    targets = torch.randint(0, CFG.vocab_size, (2, 12))
    _, loss = model(ids, targets=targets)
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(ids)  # the plain path: full bf16 logits, the loss in fp32
    expected = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    expected.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) < 1e-3
    for n, p in model.named_parameters():
        assert got[n].dtype == torch.bfloat16
        assert max_diff(got[n].float(), p.grad.float()) <= 0.02 * p.grad.float().abs().max() + 1e-6, n


def test_loss_ignores_minus_100_and_never_gives_nan():
    ours = randomize_(Llama(CFG))
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    targets = torch.randint(0, CFG.vocab_size, (2, 12))
    targets[0, :5] = -100
    _, loss = ours(ids, targets=targets)
    logits, _ = ours(ids)
    keep = targets != -100
    assert torch.allclose(loss, F.cross_entropy(logits[keep], targets[keep]), atol=1e-6)
    _, summed = ours(ids, targets=targets, reduction="sum")
    assert torch.allclose(summed, loss * keep.sum(), rtol=1e-5)
    _, each = ours(ids, targets=targets, reduction="none")  # scoring: each position's loss, 0 where ignored
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    assert each.shape == (2, 12) and max_diff(each, expected.view(2, 12)) < 1e-5 and (each[0, :5] == 0).all()
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'summ'"):
        ours(ids, targets=targets, reduction="summ")
    _, none_supervised = ours(ids, targets=torch.full_like(targets, -100))
    assert none_supervised.item() == 0.0
    none_supervised.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)



def test_a_bf16_model_scores_each_position_in_fp32():
    # Scoring (reduction="none", the multiple-choice evaluation) of a model cast to bf16 without autocast, as
    # sample.py and --eval-only load one: each position's cross-entropy comes from its logits taken to fp32, as the
    # plain path's would (bf16 logits fed to the loss as they are do not even fit the fp32 result).
    model = randomize_(Llama(CFG)).to(torch.bfloat16).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    targets = torch.randint(0, CFG.vocab_size, (2, 12))
    targets[0, :4] = -100
    with torch.no_grad():
        _, each = model(ids, targets=targets, reduction="none")
        logits, _ = model(ids)
    expected = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    assert each.dtype == torch.float32 and max_diff(each, expected.view(2, 12)) < 1e-5


def test_a_pad_mask_or_ids_of_the_wrong_kind_are_refused_not_broadcast():
    # A pad_mask of one row for a batch of two would broadcast: every row would silently get the first one's padding.
    # Boolean ids would pass for 0 and 1. Both get the ValueError that says what was expected.
    model = Llama(CFG).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    one_row = torch.ones(1, 12, dtype=torch.bool)
    one_row[0, :3] = False
    with pytest.raises(ValueError, match=r"expected pad_mask of the ids' shape \(2, 12\), got shape \(1, 12\)"):
        model(ids, pad_mask=one_row)
    with pytest.raises(ValueError, match=r"expected token ids as an int64 or int32 tensor .* of torch.bool$"):
        model(ids.bool())
    with pytest.raises(ValueError, match="expected int64 or int32 targets .* got torch.bool$"):
        model(ids, targets=ids.bool())
    # Ids as a token stream is often stored (nanoGPT's uint16 files): the lookup or the loss's gather failed in torch
    # ('"lt_cpu" not implemented for UInt16'); int32 ids give the int64 ids' logits.
    for dtype in (torch.uint16, torch.int16, torch.uint8):
        with pytest.raises(ValueError, match=rf"int64 or int32 tensor .* of {dtype} \(ids.long\(\) converts them\)$"):
            model((ids % 200).to(dtype))
        with pytest.raises(ValueError, match=rf"int64 or int32 targets .* got {dtype} \(targets.long\(\) converts"):
            model(ids, targets=(ids % 200).to(dtype))
    with torch.no_grad():
        assert torch.equal(model(ids.int())[0], model(ids)[0])
    # doc_ids of another shape failed inside the mask's broadcast ("The size of tensor a (2) must match ...").
    with pytest.raises(ValueError, match=r"expected doc_ids of the ids' shape \(2, 12\), got shape \(2, 11\)"):
        model(ids, doc_ids=torch.zeros(2, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected doc_ids of the ids' shape \(2, 12\), got shape \(2, 11\)"):
        DeepSeekVL(get_config("tiny"))(ids % 200, doc_ids=torch.zeros(2, 11, dtype=torch.long))  # (through the VLM)
    # Neither ids nor embeddings (or both) was a TypeError from the embedding lookup.
    for kwargs, given in (({}, "neither"), ({"idx": ids, "embeds": torch.zeros(2, 12, CFG.dim)}, "both")):
        with pytest.raises(ValueError, match=f"expected token ids \\(idx\\) or input embeddings .* got {given}$"):
            model(**kwargs)
    # Embeddings of the wrong kind failed inside torch ("'list' object has no attribute 'shape'", a matmul's shapes)
    wide = CFG.dim
    for embeds, given in (([[0.0]], "got list"), (torch.zeros(2, 12, wide - 1), rf"got shape \(2, 12, {wide - 1}\)"),
                          (torch.zeros(2, 12, wide, dtype=torch.long), "got .* of torch.int64")):
        with pytest.raises(ValueError, match=rf"expected embeds as a float tensor of shape \(B, T, {wide}\), {given}"):
            model(embeds=embeds)


def test_too_long_sequences_are_refused():
    ours = Llama(CFG)
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    cache = ours.new_cache(batch_size=1, max_len=16)
    ours(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="do not fit a KV cache of 16 holding 10"):
        ours(torch.zeros(1, 7, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        ours.new_cache(batch_size=1, max_len=65)
    assert ours.new_cache(batch_size=1, max_len=64).max_len == 64  # the whole context
    for size, length in ((1, 0), (0, 4), (1, 2.0)):
        with pytest.raises(ValueError, match=rf"a cache needs a batch size and a length of at least 1, got {size} and "
                                             rf"{length}$"):
            ours.new_cache(batch_size=size, max_len=length)


def test_a_cache_of_another_batch_model_or_kind_is_refused_before_it_is_written():
    # Each failed inside the attention: "shape '[1, 4, 128]' is invalid", "The expanded size of the tensor (1) must
    # match", "Expected query, key, and value to have the same dtype", "list index out of range".
    ours, ids = Llama(CFG).eval(), torch.zeros(1, 4, dtype=torch.long)
    fewer = dataclasses.replace(CFG, n_layers=CFG.n_layers - 1)
    for cache, message in ((ours.new_cache(2, 16), "the KV cache holds 2 rows, but 1 came: a cache serves one batch"),
                           (Llama(fewer).new_cache(1, 16), rf"made for a model of {fewer.n_layers} layers, .*; this "
                                                           rf"one has {CFG.n_layers} layers"),
                           (KVCache(CFG, 1, 16, dtype=torch.bfloat16), "the KV cache holds torch.bfloat16, the "
                                                                        "model's weights are torch.float32: make it"),
                           ("cache", "expected cache as a KVCache .Llama.new_cache., got str")):
        with pytest.raises(ValueError, match=message):
            ours(ids, cache=cache)
        assert isinstance(cache, str) or cache.length == 0
    with pytest.raises(ValueError, match="the KV cache holds 2 rows, but 1 came"):  # (through the VLM too)
        vlm = DeepSeekVL(get_config("tiny"))
        vlm(ids, cache=vlm.llm.new_cache(2, 16))
    cache = ours.new_cache(1, 16)
    ours(ids, cache=cache)
    with pytest.raises(ValueError, match="the KV cache holds 1 rows, but 2 came"):  # (a cache reused for a batch)
        ours(ids.repeat(2, 1), cache=cache)
    assert cache.length == 4


def test_packed_rows_match_samples_run_alone():
    """doc_ids keep attention and positions inside each packed sample (stage 2's sequence packing)."""
    ours = randomize_(Llama(CFG)).eval()
    a, b, c = (torch.randint(0, CFG.vocab_size, (n,)) for n in (7, 12, 5))
    packed = torch.cat([a, b, c, torch.zeros(4, dtype=torch.long)])[None]  # three samples, then padding
    doc_ids = torch.tensor([0] * 7 + [1] * 12 + [2] * 5 + [-1] * 4)[None]
    with torch.no_grad():
        got, _ = ours(packed, doc_ids=doc_ids)
        alone = torch.cat([ours(x[None])[0][0] for x in (a, b, c)])
    assert max_diff(got[0, :24], alone) < ATOL
    # The same with activation checkpointing (train.py --grad_ckpt), which runs each layer through
    # torch.utils.checkpoint: the outputs, and the gradients of the packed loss, are those of the plain path.
    ours.train()
    targets, grads = packed.roll(-1, 1), []
    for ckpt in (True, False):
        ours.grad_checkpointing = ckpt
        ours.zero_grad()
        if ckpt:
            with torch.no_grad():
                assert max_diff(ours(packed, doc_ids=doc_ids)[0][0, :24], alone) < ATOL
        ours(packed, doc_ids=doc_ids, targets=targets)[1].backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    assert all(max_diff(a, b) < ATOL for a, b in zip(*grads))
    ours.eval()
    with pytest.raises(ValueError, match="cannot be combined"):
        ours(packed, doc_ids=doc_ids, pad_mask=torch.ones_like(packed, dtype=torch.bool))


def test_ids_are_range_checked_unless_the_caller_vouches_for_them():
    # The check reads a count back from the device (a sync, and a graph break under torch.compile); training loops
    # that made their ids with their own tokenizer skip it, and their step then compiles whole.
    import torch._dynamo as dynamo

    llm = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, max_seq_len=32))
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
        llm(ids + 64)
    assert dynamo.explain(llm)(ids, targets=ids, check_ids=False).graph_break_count == 0
    assert dynamo.explain(llm)(ids, targets=ids).graph_break_count == 1
