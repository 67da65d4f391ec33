"""The whole vision-language model: presets and parameter counts, splicing, gradients, bad input, the released key
table, and the config system."""

import json
import math
import os

import pytest
import torch
import torchvision.transforms as T

from conftest import ATOL, max_diff, randomize_
from nanovl import DeepSeekVL, VLConfig, count_params, get_config
from nanovl.config import SAMConfig, SigLIPConfig
from nanovl.model import nanovl_to_released, released_to_nanovl
from nanovl.sam import SAM
from nanovl.siglip import SigLIP


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    model = randomize_(DeepSeekVL(cfg), std=0.05).eval()
    return cfg, model


def with_images(cfg, rows):
    """Token ids for rows given as lists of ints and 'I' (one image span each); returns (ids, n_images)."""
    T = max(sum(cfg.n_image_tokens if t == "I" else 1 for t in row) for row in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    n = 0
    for b, row in enumerate(rows):
        seq = []
        for t in row:
            seq += [cfg.image_token_id] * cfg.n_image_tokens if t == "I" else [t]
            n += t == "I"
        ids[b, :len(seq)] = torch.tensor(seq)
    return ids, n


# ---------------------------------------------------------------------------------------------------------------------
# Parameter counts of the released shapes (facts sheet section 12), counted on the meta device: nothing is allocated.

M, B = 1e6, 1e9
EXPECTED = {
    "1.3b": {"siglip": (303.69, M), "aligner": (6.30, M), "llm": (1.653, B)},
    "1.3b-hybrid": {"siglip": (303.69, M), "sam": (96.36, M), "llm": (1.653, B)},
    "7b": {"siglip": (303.69, M), "sam": (96.36, M), "aligner": (20.98, M), "llm": (6.910, B)},
}


@pytest.mark.parametrize("preset", EXPECTED)
def test_released_parameter_counts_match_the_facts_sheet(preset):
    with torch.device("meta"):
        model = DeepSeekVL(get_config(preset))
    assert all(p.is_meta for p in model.parameters())
    counts = count_params(model)
    for part, (figure, unit) in EXPECTED[preset].items():
        decimals = 2 if unit == M else 3
        assert round(counts[part] / unit, decimals) == figure, (part, counts[part])
    # The whole model, frozen parts included (the facts sheet's 7.33-7.34B and 1.96-1.98B count the unused heads too)
    model.siglip.requires_grad_(False)
    assert count_params(model)["total"] == counts["total"] == sum(counts[part] for part in counts if part != "total")
    assert count_params(get_config(preset)) == counts  # (a config: its model built on the meta device)
    if preset in ("1.3b", "7b"):
        assert round(counts["total"] / B, 2) == {"1.3b": 1.96, "7b": 7.33}[preset]
    if preset == "7b":  # SAM-B's trunk alone is the original 88.88M; the first neck brings it to SAM's 89.67M
        sam = model.sam
        trunk = sum(p.numel() for n, p in sam.named_parameters() if n.split(".")[0] in ("patch_embed", "pos_embed",
                                                                                      "blocks"))
        assert round(trunk / M, 2) == 88.88
        assert round((trunk + sum(p.numel() for p in sam.neck.parameters())) / M, 2) == 89.67


def test_every_preset_builds_with_equal_token_counts_from_both_branches():
    # Each preset's towers, run on the "meta" device (shapes only: the released sizes cost no memory or time), give
    # the token count its config says, from both branches of a hybrid, in the decoder's width.
    for name in ("tiny", "small", "1.3b", "1.3b-hybrid", "7b"):
        cfg = get_config(name)
        with torch.device("meta"):
            model = DeepSeekVL(cfg).to("meta")  # (the pixel statistics are made on the CPU)
            towers = {}
            for tower in ("siglip", "sam"):
                if getattr(model, tower) is not None:
                    getattr(model, tower).register_forward_hook(
                        lambda module, args, out, tower=tower: towers.update({tower: tuple(out.shape)}))
            embeds = model.encode_images(torch.empty(1, 3, cfg.image_size, cfg.image_size), check=False)
        assert tuple(embeds.shape) == (1, cfg.n_image_tokens, cfg.llm.dim), name
        assert towers == {"siglip": (1, cfg.n_image_tokens, cfg.siglip.width)} | (
            {"sam": (1, cfg.n_image_tokens, cfg.sam.downsample_dims[-1])} if cfg.hybrid else {}), name
        if cfg.hybrid:
            assert cfg.sam.upsample_size * 2 == cfg.sam.grid * 3  # upsampled by 1.5, as 64 -> 96
    assert get_config("7b").n_image_tokens == 576 and get_config("1.3b").n_image_tokens == 576


def test_a_model_keeps_a_config_of_its_own():
    # The caller's config, edited to build a second model, changed the first one's as well: its new_cache made the
    # second one's layers ("list index out of range" in generate), and an export wrote a config its weights are not.
    cfg = get_config("tiny")
    first = DeepSeekVL(cfg)
    cfg.llm.n_layers = 2
    second = DeepSeekVL(cfg)
    assert first.cfg.llm.n_layers == len(first.llm.layers) == 4 and len(second.llm.layers) == 2
    assert len(first.llm.new_cache(1, 8).k) == 4
    with pytest.raises(ValueError, match=r"expected a VLConfig \(get_config\('tiny'\), say\), got str"):
        DeepSeekVL("tiny")  # (an AttributeError: 'str' object has no attribute 'validate')


# ---------------------------------------------------------------------------------------------------------------------
# Forward, splicing, gradients

def test_images_replace_placeholder_spans_in_order(tiny):
    cfg, model = tiny
    # Row 0 holds two adjacent images then text; row 1 one image in the middle.
    ids, n = with_images(cfg, [["I", "I", 9, 10, 11], [5, 6, "I", 7]])
    images = torch.rand(n, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        logits, _ = model(ids, images)
        image_embeds = model.encode_images(images)  # (3, n_tok, C)
        x = model.llm.embed_tokens(ids.masked_fill(ids == cfg.image_token_id, 0))
        k = 0
        for b in range(ids.shape[0]):  # the slow, obvious way: walk the spans
            t = 0
            while t < ids.shape[1]:
                if ids[b, t] == cfg.image_token_id:
                    x[b, t:t + cfg.n_image_tokens] = image_embeds[k]
                    k, t = k + 1, t + cfg.n_image_tokens
                else:
                    t += 1
        expected, _ = model.llm(embeds=x)
        swapped, _ = model(ids, images[[1, 0, 2]])
    assert k == 3
    assert max_diff(logits, expected) < ATOL
    assert max_diff(swapped, logits) > 1e-4  # the order of the images matters


def test_precomputed_image_embeddings_stand_in_for_images(tiny):
    """image_embeds (what encode_images gives) take the place of images, so rows that share an image encode it once;
    the multiple-choice evaluation gives its four answer rows one encoding of the question's image."""
    cfg, model = tiny
    ids, n = with_images(cfg, [["I", 9, 10], ["I", 7, 8]])
    images = torch.rand(1, 3, cfg.image_size, cfg.image_size).expand(n, -1, -1, -1)
    with torch.no_grad():
        logits, _ = model(ids, images)
        shared, _ = model(ids, image_embeds=model.encode_images(images[:1])[[0, 0]])
        # (embeddings of another dtype, from a bf16 tower say, are cast to the decoder's: exactly the bf16 values)
        emb = model.encode_images(images[:1])[[0, 0]]
        half, _ = model(ids, image_embeds=emb.bfloat16())
        rounded, _ = model(ids, image_embeds=emb.bfloat16().float())
    assert max_diff(shared, logits) < ATOL and torch.equal(half, rounded) and max_diff(half, logits) < 0.01
    with pytest.raises(ValueError, match="images or image_embeds, not both"):
        model(ids, images, image_embeds=torch.zeros(n, cfg.n_image_tokens, cfg.llm.dim))
    with pytest.raises(ValueError, match=r"image_embeds of shape \(N, 36, 128\), got \(2, 36, 64\)"):
        model(ids, image_embeds=torch.zeros(n, cfg.n_image_tokens, 64))
    with pytest.raises(ValueError, match=r"image_embeds of shape \(N, 36, 128\), got \(2, 64, 128\)"):  # whole images
        model(ids, image_embeds=torch.zeros(n, 64, cfg.llm.dim))
    with pytest.raises(ValueError, match="expected 2 images .* got 1"):
        model(ids, image_embeds=torch.zeros(1, cfg.n_image_tokens, cfg.llm.dim))


def test_hybrid_tower_preprocesses_like_the_official_tower(tiny):
    """SigLIP reads torchvision's Resize(antialias=True) of the same canvas that SAM reads, and each branch
    normalises with its own statistics: 0.5 for SigLIP, CLIP's for SAM (official HybridVisionTower)."""
    cfg, model = tiny
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    s, m = cfg.siglip, cfg.sam
    bare_siglip = SigLIP(SigLIPConfig(**dict(s.__dict__, pixel_mean=None, pixel_std=None)))
    bare_sam = SAM(SAMConfig(**dict(m.__dict__, pixel_mean=None, pixel_std=None)))
    bare_siglip.load_state_dict(model.siglip.state_dict())
    bare_sam.load_state_dict(model.sam.state_dict())
    low = T.Normalize(s.pixel_mean, s.pixel_std)(T.Resize(s.image_size, antialias=True)(images))
    high = T.Normalize(m.pixel_mean, m.pixel_std)(images)
    with torch.no_grad():
        expected = model.aligner(bare_siglip(low), bare_sam(high))
        assert max_diff(model.encode_images(images), expected) < ATOL


def test_a_fresh_model_starts_as_gpt2_does():
    # N(0, 0.02) for linear layers, embeddings and learned positions, and linear biases at 0; the projections into the
    # decoder's residual stream scaled down by sqrt(2 * n_layers), so the stream's variance does not grow with depth.
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = DeepSeekVL(cfg)
    std = lambda t: t.float().std().item()
    assert std(model.llm.layers[0].mlp.up_proj.weight) == pytest.approx(0.02, rel=0.05)
    deep = 0.02 / (2 * cfg.llm.n_layers) ** 0.5
    for layer in model.llm.layers:
        assert std(layer.self_attn.o_proj.weight) == pytest.approx(deep, rel=0.05)
        assert std(layer.mlp.down_proj.weight) == pytest.approx(deep, rel=0.05)
    for tower in (model.siglip, model.sam):
        assert std(tower.pos_embed) == pytest.approx(0.02, rel=0.05)
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert len(biases) > 20 and all((b == 0).all() for b in biases)  # the towers' and the aligner's


def test_tiny_forward_backward_reaches_every_parameter():
    cfg = get_config("tiny")
    model = DeepSeekVL(cfg)
    with torch.no_grad():  # the official init of alpha is 0, which would leave neck_hd without gradient
        model.sam.hd_alpha_downsamples.fill_(0.5)
    ids, n = with_images(cfg, [[1, "I", 7, 8, 9] + [10] * 20, [4, 5, "I", 6, "I"]])
    targets = ids.roll(-1, dims=1).masked_fill(ids == cfg.image_token_id, -100)
    images = torch.rand(n, 3, cfg.image_size, cfg.image_size)
    _, loss = model(ids, images, targets=targets)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_a_training_step_unchecked_reads_nothing_back_from_the_device(tiny, monkeypatch):
    # train.py passes check_inputs=False: its steps then queue their kernels without waiting for the device.
    # Read-backs (tolist, item, a tensor's truth value) are made to fail; the loss is the checked forward's.
    cfg, model = tiny
    ids, n = with_images(cfg, [[1, "I", 7, 8, 9] + [10] * 20, [4, 5, "I", 6, "I"]])
    targets = ids.roll(-1, dims=1).masked_fill(ids == cfg.image_token_id, -100)
    doc_ids = (torch.arange(ids.shape[1]) >= 30).long().expand_as(ids)  # packed: two samples a row
    images = torch.rand(n, 3, cfg.image_size, cfg.image_size)
    _, checked = model(ids, images, targets=targets, doc_ids=doc_ids, reduction="sum")
    for read_back in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, read_back, lambda *a, what=read_back: pytest.fail(f"{what} in the step"))
    _, loss = model(ids, images, targets=targets, doc_ids=doc_ids, reduction="sum", check_inputs=False)
    loss.backward()
    monkeypatch.undo()
    assert torch.equal(loss, checked)
    model.zero_grad()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_hybrid_runs_on_the_cpu(tiny, dtype):
    # model.to(dtype) on a machine without a GPU (sample.py --dtype): the hybrid's resize for SigLIP has no CPU kernel
    # for half types, so it runs in fp32 and rounds back; the rest computes in the model's dtype.
    cfg, model = tiny
    half = DeepSeekVL(cfg).to(dtype)
    half.load_state_dict(model.state_dict())  # the fixture's weights, rounded to the half type
    ids, n = with_images(cfg, [[1, "I", 7, 8, 9]])
    images = torch.rand(n, 3, cfg.image_size, cfg.image_size)
    assert torch.equal(half.siglip_input(images.to(dtype)), model.siglip_input(images.to(dtype).float()).to(dtype))
    with torch.no_grad():
        logits, _ = half(ids, images)
        expected, _ = model(ids, images)
    assert logits.dtype == dtype and max_diff(logits.float(), expected) < 0.05 * expected.abs().max()
    _, loss = half.train()(ids, images, targets=ids.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss) and half.llm.embed_tokens.weight.grad.dtype == dtype


def test_kv_cache_with_images_and_left_padding_matches_full_forward(tiny):
    cfg, model = tiny
    ids, n = with_images(cfg, [[1, "I", 7, 8, 9, 10], [1, 2, 4]])
    lengths = (ids != 0).sum(1)
    T = ids.shape[1]
    padded = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(2):  # left-pad each row
        padded[b, T - lengths[b]:], mask[b, T - lengths[b]:] = ids[b, :lengths[b]], True
    images = torch.rand(n, 3, cfg.image_size, cfg.image_size)
    nxt = torch.tensor([[11, 12], [13, 14]])
    with torch.no_grad():
        cache = model.llm.new_cache(batch_size=2, max_len=T + 2)
        prefill, _ = model(padded, images, cache=cache, pad_mask=mask)
        step1, _ = model(nxt[:, :1], cache=cache)
        step2, _ = model(nxt[:, 1:], cache=cache)
        full0, _ = model(torch.cat([ids[0, :lengths[0]], nxt[0]])[None], images)
        full1, _ = model(torch.cat([ids[1, :lengths[1]], nxt[1]])[None])
    for b, full in ((0, full0), (1, full1)):
        n_b = int(lengths[b])
        assert max_diff(prefill[b, T - n_b:], full[0, :n_b]) < ATOL
        assert max_diff(torch.cat([step1[b], step2[b]]), full[0, n_b:]) < ATOL


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError that says what was expected and what was given

def test_wrong_image_shape_is_refused(tiny):
    cfg, model = tiny
    ids, _ = with_images(cfg, [[1, "I", 2]])
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 256, 256\).*got \(1, 3, 128, 128\)"):
        model(ids, torch.rand(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r"got \(1, 1, 256, 256\)"):
        model(ids, torch.rand(1, 1, 256, 256))


def test_image_count_must_match_placeholder_spans(tiny):
    cfg, model = tiny
    ids, _ = with_images(cfg, [[1, "I", 2, "I"]])
    with pytest.raises(ValueError, match="expected 2 images for 72 <image_placeholder> tokens .* got 1"):
        model(ids, torch.rand(1, 3, 256, 256))
    with pytest.raises(ValueError, match="expected 0 images .* got 1"):
        model(torch.ones(1, 5, dtype=torch.long), torch.rand(1, 3, 256, 256))
    with pytest.raises(ValueError, match="1 span\\(s\\) of <image_placeholder> tokens are not whole images of 36 "
                                         "each: an image span was cut"):
        model(ids[:, :19], None)
    # The right total is not enough: each span must hold whole images, or embeddings land on the wrong tokens.
    n = cfg.n_image_tokens
    for rows, n_images in (([[1] + [3] * (n - 6) + [5] + [3] * (n + 6)], 2),  # 2 images, spans of 30 and 42
                           ([[1] + [3] * (n // 2) + [5, 6] + [3] * (n // 2)], 1),  # one image split by text
                           ([[1] * 3 + [3] * (n // 2), [3] * (n // 2) + [1] * 3], 1)):  # one image across two rows
        with pytest.raises(ValueError, match="2 span\\(s\\) of <image_placeholder> tokens are not whole images"):
            model(torch.tensor(rows), torch.rand(n_images, 3, 256, 256))
    for rows, n_images in (([[1, 3, 5]], 0),  # one stray placeholder, and no image
                           ([[1] + [3] * (n + 1) + [5]], 1)):  # one image's span and one more
        with pytest.raises(ValueError, match="1 span\\(s\\) of <image_placeholder> tokens are not whole images"):
            model(torch.tensor(rows), torch.rand(n_images, 3, 256, 256) if n_images else None)
    logits, _ = model(torch.tensor([[3] * 2 * n + [5]]), torch.rand(2, 3, 256, 256))  # back to back, at the start
    assert logits.shape == (1, 2 * n + 1, cfg.llm.vocab_size)


def test_pixels_ids_and_targets_of_the_wrong_kind_or_range_are_refused(tiny):
    cfg, model = tiny
    ids, _ = with_images(cfg, [[1, "I", 2]])
    image = torch.rand(1, 3, 256, 256)
    with pytest.raises(ValueError, match="expected float pixels in \\[0, 1\\].* got torch.uint8 \\(divide uint8"):
        model(ids, (image * 255).byte())  # what torchvision.io.read_image gives: not 0-1 floats
    with pytest.raises(ValueError, match=r"shape \(N, 3, S, S\), got shape \(3, 256, 256\) \(one image needs a batch"):
        model(ids, image[0])
    with pytest.raises(ValueError, match="expected images as one tensor of shape .*, got list"):
        model(ids, [image[0]])
    broken = image.clone()
    broken[0, 1, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"images hold 1 values that are NaN or infinite, of 196608; expected finite"):
        model(ids, broken)
    # Floats of 0-255 (np.array(pil) made float) would give a wrong answer, silently. Normalised pixels (the released
    # 1.3B's processor makes them; others' statistics reach about [-2.2, 2.7]) and a resize that overshoots pass.
    with pytest.raises(ValueError, match=r"expected pixels as the image processor makes them \(in \[0, 1\], or "
                                         r"normalised by its mean and std\), got values from 0\.0.* to 255 \(pixels "
                                         r"of 0-255\? use nanovl.image.ImageProcessor.for_config\(model.cfg\)\)"):
        model(ids, image * 255)
    with pytest.raises(ValueError, match=r"expected pixels as the image processor makes them .*, got values from -25"):
        model(ids, -image * 255)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    model(ids, (image - mean) / std)
    embeds = model.encode_images(image)
    embeds[0, 0, :2] = float("inf")
    with pytest.raises(ValueError, match="image_embeds hold 2 values that are NaN or infinite"):
        model(ids, image_embeds=embeds)
    V = cfg.llm.vocab_size
    for bad in (V, -1):  # out of the vocabulary: otherwise an IndexError deep in torch (on a GPU, a device assert)
        with pytest.raises(ValueError, match=rf"token ids must be in \[0, {V}\), the model's vocabulary; got ids from"):
            model(torch.tensor([[1, bad]]))
        with pytest.raises(ValueError, match=rf"targets must be ids in \[0, {V}\) or -100 .*got \[{bad}\]"):
            model(torch.tensor([[1, 5]]), targets=torch.tensor([[-100, bad]]))
        with pytest.raises(ValueError, match=rf"token ids must be in \[0, {V}\)"):
            model.llm(torch.tensor([[1, bad]]))  # the decoder alone checks its ids too
    with pytest.raises(ValueError, match=r"expected targets of the ids' shape \(1, 3\), got shape \(1, 2\)"):
        model(torch.tensor([[1, 5, 6]]), targets=torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match="expected int64 or int32 targets .* got torch.float32"):
        model(torch.tensor([[1, 5]]), targets=torch.tensor([[5.0, 6.0]]))
    with pytest.raises(ValueError, match=r"expected token ids as an int64 or int32 tensor of shape \(B, T\), got "):
        model(torch.tensor([[1.0, 5.0]]))


def test_a_dark_picture_of_0_255_pixels_is_refused_too(tiny):
    # A dark photo read as 0-255 floats never reaches 255, nor 40: its pixels are still far past what any processor
    # makes (at most about [-2.2, 2.7]), and would give a confident-looking answer about a white image.
    cfg, model = tiny
    ids, _ = with_images(cfg, [[1, "I", 2]])
    dark = torch.rand(1, 3, 256, 256) * 20
    with pytest.raises(ValueError, match=r"expected pixels as the image processor makes them .*got values from 0"):
        model(ids, dark)
    # encode_images, called alone, checks them as forward does (what it made of them then passed forward's
    # image_embeds check, which asks only for finite numbers); an empty batch is no image, and a list is named
    with pytest.raises(ValueError, match=r"expected pixels as the image processor makes them .*got values from 0"):
        model.encode_images(dark)
    with pytest.raises(ValueError, match=r"images hold 1 values that are NaN or infinite, of 196608"):
        model.encode_images(torch.where(torch.arange(3 * 256 * 256).view(1, 3, 256, 256) == 7, torch.nan, 0.5))
    with pytest.raises(ValueError, match=r"images as one tensor of shape \(N, 3, 256, 256\), got list \(torch.stack"):
        model.encode_images([dark[0]])
    assert model.encode_images(torch.rand(0, 3, 256, 256)).shape == (0, cfg.n_image_tokens, cfg.llm.dim)


def test_an_empty_batch_of_images_is_a_text_only_batch(tiny):
    # Rows without image spans may come with an (0, 3, S, S) tensor (the images of none of them, stacked or sliced):
    # it means no image, as None does; the towers, which cannot take an empty batch, are not run.
    cfg, model = tiny
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        expected, _ = model(ids)
        got, _ = model(ids, torch.zeros(0, 3, cfg.image_size, cfg.image_size))
        embedded, _ = model(ids, image_embeds=torch.zeros(0, cfg.n_image_tokens, cfg.llm.dim))
    assert torch.equal(got, expected) and torch.equal(embedded, expected)

def test_sequence_longer_than_context_is_refused(tiny, monkeypatch):
    cfg, model = tiny
    with pytest.raises(ValueError, match="513 tokens .* context of 512"):
        model(torch.ones(1, 513, dtype=torch.long))
    # Refused before the images go through the towers (a 7B's hybrid towers take a while for nothing).
    ids = torch.ones(1, 513, dtype=torch.long)
    ids[0, 1:1 + cfg.n_image_tokens] = cfg.image_token_id
    encoded = []
    monkeypatch.setattr(model, "encode_images", lambda x: encoded.append(x) or 1 / 0)
    with pytest.raises(ValueError, match="513 tokens .* context of 512"):
        model(ids, torch.rand(1, 3, cfg.image_size, cfg.image_size))
    assert encoded == []
    monkeypatch.undo()
    with torch.no_grad():  # exactly the context fits, in one pass or after a cache
        assert model(torch.ones(1, 512, dtype=torch.long), last_only=True)[0].shape == (1, 1, cfg.llm.vocab_size)
        cache = model.llm.new_cache(1, 512)
        model(torch.ones(1, 500, dtype=torch.long), cache=cache, last_only=True)
        with pytest.raises(ValueError, match=r"513 tokens \(500 cached \+ 13 new\)"):
            model(torch.ones(1, 13, dtype=torch.long), cache=cache)
        model(torch.ones(1, 12, dtype=torch.long), cache=cache, last_only=True)
        assert cache.length == 512


# ---------------------------------------------------------------------------------------------------------------------
# The released checkpoint layout (facts sheet section 7), written out independently of the model code

def released_keys(cfg: VLConfig) -> dict:
    """Every key of a released-layout checkpoint for this config, with its shape; unused keys included."""
    keys = {}

    def vit(prefix, width, depth, heads, grid, patch, mlp, names, rel=None):
        hs = width // heads
        keys[prefix + "pos_embed"] = (1, grid, grid, width) if rel else (1, grid * grid, width)
        keys[prefix + "patch_embed.proj.weight"] = (width, 3, patch, patch)
        keys[prefix + "patch_embed.proj.bias"] = (width,)
        for n in range(depth):
            b = f"{prefix}blocks.{n}."
            for norm in ("norm1", "norm2"):
                keys[b + norm + ".weight"] = keys[b + norm + ".bias"] = (width,)
            keys[b + "attn.qkv.weight"], keys[b + "attn.qkv.bias"] = (3 * width, width), (3 * width,)
            keys[b + "attn.proj.weight"], keys[b + "attn.proj.bias"] = (width, width), (width,)
            keys[f"{b}mlp.{names[0]}.weight"], keys[f"{b}mlp.{names[0]}.bias"] = (mlp, width), (mlp,)
            keys[f"{b}mlp.{names[1]}.weight"], keys[f"{b}mlp.{names[1]}.bias"] = (width, mlp), (width,)
            if rel:
                size = rel(n)
                keys[b + "attn.rel_pos_h"] = keys[b + "attn.rel_pos_w"] = (2 * size - 1, hs)

    s = cfg.siglip
    low = "vision_model.vision_tower_low.vision_tower." if cfg.hybrid else "vision_model.vision_tower."
    vit(low, s.width, s.depth, s.n_heads, s.grid, s.patch_size, int(s.width * s.mlp_ratio), ("fc1", "fc2"))
    keys[low + "norm.weight"] = keys[low + "norm.bias"] = (s.width,)
    keys[low + "attn_pool.latent"] = (1, 1, s.width)  # unused
    keys[low + "attn_pool.kv.weight"] = (2 * s.width, s.width)  # unused
    d = cfg.llm.dim
    if cfg.hybrid:
        m = cfg.sam
        high = "vision_model.vision_tower_high.vision_tower."
        vit(high, m.width, m.depth, m.n_heads, m.grid, m.patch_size, int(m.width * m.mlp_ratio), ("lin1", "lin2"),
            rel=lambda n: m.grid if n in m.global_blocks else m.window_size)
        for neck in ("neck", "neck_hd"):
            keys[f"{high}{neck}.0.weight"] = (m.neck_dim, m.width, 1, 1)
            keys[f"{high}{neck}.2.weight"] = (m.neck_dim, m.neck_dim, 3, 3)
            for i in (1, 3):
                keys[f"{high}{neck}.{i}.weight"] = keys[f"{high}{neck}.{i}.bias"] = (m.neck_dim,)
        keys[high + "downsamples.0.weight"] = (m.downsample_dims[0], m.neck_dim, 3, 3)
        keys[high + "downsamples.1.weight"] = (m.downsample_dims[1], m.downsample_dims[0], 3, 3)
        keys[high + "hd_alpha_downsamples"] = (1,)
        keys["vision_model.high_layer_norm.weight"] = keys["vision_model.low_layer_norm.bias"] = (1024,)  # unused
        keys["aligner.high_up_proj.weight"] = (d // 2, m.out_dim)
        keys["aligner.low_up_proj.weight"] = (d // 2, s.width)
        keys["aligner.high_up_proj.bias"] = keys["aligner.low_up_proj.bias"] = (d // 2,)
        keys["aligner.layers.1.weight"], keys["aligner.layers.1.bias"] = (d, d), (d,)
    else:
        keys["aligner.layers.0.weight"], keys["aligner.layers.0.bias"] = (d, s.width), (d,)
        keys["aligner.layers.2.weight"], keys["aligner.layers.2.bias"] = (d, d), (d,)
    l = cfg.llm
    keys["language_model.model.embed_tokens.weight"] = (l.vocab_size, d)
    for n in range(l.n_layers):
        b = f"language_model.model.layers.{n}."
        keys[b + "self_attn.q_proj.weight"] = keys[b + "self_attn.o_proj.weight"] = (d, d)
        keys[b + "self_attn.k_proj.weight"] = keys[b + "self_attn.v_proj.weight"] = (l.n_kv_heads * l.head_dim, d)
        keys[b + "mlp.gate_proj.weight"] = keys[b + "mlp.up_proj.weight"] = (l.ffn_dim, d)
        keys[b + "mlp.down_proj.weight"] = (d, l.ffn_dim)
        keys[b + "input_layernorm.weight"] = keys[b + "post_attention_layernorm.weight"] = (d,)
        keys[b + "self_attn.rotary_emb.inv_freq"] = (l.head_dim // 2,)  # unused, older HF exports hold it
    keys["language_model.model.norm.weight"] = (d,)
    keys["language_model.lm_head.weight"] = (l.vocab_size, d)
    return keys


SMALL_13B = {"siglip.image_size": 32, "siglip.width": 32, "siglip.depth": 2, "siglip.n_heads": 2, "llm.dim": 64,
             "llm.n_layers": 2, "llm.n_heads": 4, "llm.n_kv_heads": 4, "llm.ffn_dim": 96, "llm.vocab_size": 128,
             "image_token_id": 100}


@pytest.mark.parametrize("cfg", [get_config("tiny"), get_config("1.3b", **SMALL_13B)], ids=["7b-layout", "1.3b-layout"])
def test_released_keys_map_onto_ours_by_the_table(cfg):
    ours = DeepSeekVL(cfg).state_dict()
    mapped = {}
    for key, shape in released_keys(cfg).items():
        name = released_to_nanovl(key)
        if name is None:
            assert "attn_pool" in key or "layer_norm" in key or "inv_freq" in key, key
            continue
        assert name in ours, f"{key} -> {name}"
        assert tuple(ours[name].shape) == shape, key
        assert nanovl_to_released(name, cfg.hybrid) == key
        mapped[name] = key
    assert set(mapped) == set(ours)  # nothing of ours is left without a released key
    with pytest.raises(ValueError, match="unknown key"):
        released_to_nanovl("vision_model.something_else.weight")


# ---------------------------------------------------------------------------------------------------------------------
# Configs

def test_presets_take_overrides_and_round_trip_through_json():
    cfg = get_config("tiny", **{"llm.n_layers": "2", "sam.global_blocks": "0,3", "llm.rope_theta": "5e5"})
    assert cfg.llm.n_layers == 2 and cfg.sam.global_blocks == (0, 3) and cfg.llm.rope_theta == 5e5
    assert VLConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert VLConfig.from_dict(get_config("1.3b").to_dict()).sam is None
    # Two configs' differences, field by field: none between a config and its JSON (tuples read back as lists), nor for
    # another name alone; a field one of them lacks (an older checkpoint's) is one.
    a = cfg.to_dict()
    assert VLConfig.differences(a, json.loads(cfg.to_json())) == [] == VLConfig.differences(a, dict(a, name="other"))
    b = json.loads(cfg.to_json())
    del b["llm"]["rope_theta"]
    assert VLConfig.differences(a, b) == [("llm.rope_theta", 5e5, None)]
    assert VLConfig.differences(a, dict(a, llm=dict(a["llm"], n_layers=3))) == [("llm.n_layers", 2, 3)]
    # A field the preset leaves at None takes its class default's type: SigLIP normalising inside the 1.3B's tower.
    own = get_config("1.3b", **{"siglip.pixel_mean": "0.5,0.5,0.5", "siglip.pixel_std": "(0.25, 0.25, 0.25)"})
    assert own.siglip.pixel_mean == (0.5, 0.5, 0.5) and own.siglip.pixel_std == (0.25, 0.25, 0.25)


def test_bad_configs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_config("huge")
    with pytest.raises(ValueError, match="no field 'layers'"):
        get_config("tiny", **{"llm.layers": 3})
    with pytest.raises(ValueError, match="cannot override 'name': it names the preset, 'tiny'"):
        get_config("tiny", name="mine")  # the preset's recipe and data folder go by it
    with pytest.raises(ValueError, match="llm.dim expects a value like 128, got 'wide'"):
        get_config("tiny", **{"llm.dim": "wide"})
    with pytest.raises(ValueError, match="SAM gives a 12x12 grid but SigLIP gives 6x6"):
        get_config("tiny", **{"sam.image_size": 512})
    with pytest.raises(ValueError, match=r"does not fit a SigLIP-only encoder: its adaptor is 'mlp_gelu' \(aligner"):
        get_config("1.3b", **{"aligner.projector_type": "low_high_hybrid_split_mlp_gelu"})
    # Switching SAM off takes both settings, and either alone names the other (a tiny SigLIP-only model, as the 1.3B)
    with pytest.raises(ValueError, match=r"does not fit a SigLIP-only encoder: .*with sam=none"):
        get_config("tiny", sam="none")
    with pytest.raises(ValueError, match=r"does not fit a hybrid \(SAM \+ SigLIP\) encoder: .*SAM off: sam=none"):
        get_config("tiny", **{"aligner.projector_type": "mlp_gelu"})
    assert get_config("tiny", **{"sam": "none", "aligner.projector_type": "mlp_gelu"}).hybrid is False
    with pytest.raises(ValueError, match="n_heads 4, n_kv_heads 3: need dim % n_heads == 0 and n_heads % n_kv_heads"):
        get_config("tiny", **{"llm.n_heads": 4, "llm.n_kv_heads": 3})
    depth = get_config("tiny").sam.depth
    with pytest.raises(ValueError, match=rf"sam.global_blocks \({depth},\) must be non-empty indices below"):
        get_config("tiny", **{"sam.global_blocks": str(depth)})
    with pytest.raises(ValueError, match=r"siglip.pixel_mean \(0.5, 0.5\) and pixel_std .* three numbers each"):
        get_config("tiny", **{"siglip.pixel_mean": "0.5,0.5"})
    with pytest.raises(ValueError, match=r"sam.pixel_mean None and pixel_std \(0.26.*the tower normalises\)$"):
        get_config("tiny", **{"sam.pixel_mean": "none"})  # a hybrid is not offered "both none", which it refuses
    with pytest.raises(ValueError, match="sam.pixel_mean is none, but a hybrid model normalises inside both towers"):
        get_config("tiny", **{"sam.pixel_mean": "none", "sam.pixel_std": "none"})
    with pytest.raises(ValueError, match="unknown config fields"):
        VLConfig.from_dict({"name": "x", "colour": "blue"})
    with pytest.raises(ValueError, match="expected a model config as a dict of its fields, got list"):
        VLConfig.from_dict([1])  # (a TypeError from dict())
    # Sizes, rates and constants must be positive and finite: a depth of -1 built an empty decoder, a zero std or
    # a NaN eps gave NaN logits, a zero head count a ZeroDivisionError.
    for key, value, message in (("llm.n_layers", -1, "llm.n_layers is -1, expected an integer above 0"),
                                ("llm.n_heads", 0, "llm.n_heads is 0, expected an integer above 0"),
                                ("llm.norm_eps", "nan", "llm.norm_eps is nan, expected a finite number above 0"),
                                ("llm.rope_theta", 0, "llm.rope_theta is 0, expected a finite number above 0"),
                                ("siglip.pixel_std", "0,0,0", r"siglip.pixel_std is \(0.0, 0.0, 0.0\), expected "
                                                              "finite numbers above 0"),
                                ("sam.downsample_dims", (1.5, 2), r"sam.downsample_dims is \(1.5, 2\), expected "
                                                                  "integers above 0"),
                                ("sam.global_blocks", [-1], r"sam.global_blocks is \(-1,\), expected integers "
                                                           "of 0 or more")):
        with pytest.raises(ValueError, match=rf"invalid config 'tiny':\n  {message}$"):
            get_config("tiny", **{key: value})
    assert get_config("tiny", **{"sam.global_blocks": [0, 1]}).sam.global_blocks == (0, 1)  # a list, from Python
    # How the parts must fit together, each named.
    tiny = get_config("tiny")
    for overrides, message in [({"siglip.image_size": 100}, "siglip.image_size 100 is not a multiple of "
                                                             "siglip.patch_size 16"),
                               ({"llm.dim": tiny.llm.n_heads * 5}, "llm head size 5 .* must be even for "
                                                                   "rotary embeddings: give a dim divisible by 2 x "
                                                                   f"n_heads \\({2 * tiny.llm.n_heads}\\)"),
                               ({"image_token_id": tiny.llm.vocab_size}, f"image_token_id {tiny.llm.vocab_size} is "
                                                                         "outside the vocabulary"),
                               ({"aligner.depth": 1}, "aligner.depth 1 is too small .at least 1, or 2 for the hybrid"),
                               ({"sam.global_blocks": ""}, r"sam.global_blocks \(\) must be non-empty indices"),
                               ({"llm.rope_theta": "inf"}, "llm.rope_theta is inf, expected a finite number above 0"),
                               ({"sam.pixel_mean": "null"}, r"sam.pixel_mean None and pixel_std"),
                               ({"siglip.n_heads": 3}, f"siglip.width {tiny.siglip.width} is not divisible by "
                                                       "siglip.n_heads 3"),
                               ({"sam.n_heads": 3}, f"sam.image_size {tiny.sam.image_size} / patch_size "
                                                    f"{tiny.sam.patch_size} / width {tiny.sam.width} / n_heads 3 do "
                                                    "not divide evenly"),
                               ({"sam.image_size": 176, "siglip.image_size": 64}, "sam grid 11 upsampled to 16 is"),
                               ({"aligner.projector_type": "mlp"}, "aligner.projector_type 'mlp' is not 'mlp_gelu'"),
                               ({"llm.max_seq_len": 10 ** 8}, "llm.max_seq_len 100000000 is above 1,048,576, the "
                                                              "largest context nanovl builds"),
                               ({"llm.dim.x": 1}, "cannot override 'llm.dim.x': 'dim' is not a config section of "
                                                  "'tiny'")]:
        with pytest.raises(ValueError, match=message):
            get_config("tiny", **overrides)
    assert get_config("tiny", **{"sam.global_blocks": "(0, 3,)"}).sam.global_blocks == (0, 3)  # a trailing comma
    assert get_config("1.3b", **{"aligner.depth": 1}).aligner.depth == 1  # SigLIP alone: one layer will do
    # A config read from a file (a checkpoint's, edited by hand) can hold anything: each wrong type is named.
    good = get_config("tiny").to_dict()
    for edit, message in [({"llm": dict(good["llm"], dim="abc", rope_theta=10000)}, r"llm.dim is 'abc', expected an "
                                                                                     r"integer$"),
                          ({"llm": "abc"}, "config field llm is 'abc', expected an object of its fields"),
                          ({"sam": dict(good["sam"], depth=2.5)}, "sam.depth is 2.5, expected an integer"),
                          ({"image_token_id": True}, "image_token_id is True, expected an integer$"),
                          ({"llm": dict(good["llm"], colour=1)}, r"unknown llm config fields \['colour'\]")]:
        with pytest.raises(ValueError, match=message):
            VLConfig.from_dict({**good, **edit})


def test_the_readmes_forward_pass_by_hand_runs_as_written(capsys):
    # The README's first snippet is what a newcomer runs first: it runs, and prints the shapes and loss it says.
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme.split("### A forward pass by hand", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    shape, loss = capsys.readouterr().out.split(") tensor(")
    assert shape == "torch.Size([1, 40, 2048]" and abs(float(loss.split(",")[0]) - math.log(2048)) < 0.5
