"""Vision towers and adaptors against their references: timm's ViT (SigLIP settings), segment-anything's
ImageEncoderViT (SAM-B), torchvision's Resize and Normalize (the hybrid tower's preprocessing), and a direct
transcription of the facts sheet for DeepSeek's SAM additions and for both adaptors."""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

# The references, built as bench.py --compare builds them (one constructor each): timm's ViT with DeepSeek's SigLIP
# settings (no class token, map pooling built but unused, exact GELU, eps 1e-6) and segment-anything's ImageEncoderViT
from bench import sam_encoder as segment_anything_encoder, timm_siglip
from conftest import ATOL, max_diff, randomize_
from nanovl.aligner import Aligner
from nanovl.config import CLIP_MEAN, CLIP_STD, AlignerConfig, SAMConfig, SigLIPConfig
from nanovl.sam import SAM
from nanovl.siglip import SigLIP


def same_epsilons(ours: nn.Module, ref: nn.Module):
    """Every normalisation layer of ours has the epsilon of the reference's layer of the same name (parity tests on
    random weights see no difference between 1e-5 and 1e-6; features of a real image with little variance do)."""
    eps = {name: m.eps for name, m in ours.named_modules() if hasattr(m, "eps")}
    theirs = {name: m.eps for name, m in ref.named_modules() if hasattr(m, "eps") and "attn_pool" not in name}
    assert theirs and set(theirs) <= set(eps) and {n: eps[n] for n in theirs} == theirs


def test_siglip_matches_timm():
    cfg = SigLIPConfig(image_size=64, patch_size=16, width=64, depth=3, n_heads=4, pixel_mean=None, pixel_std=None)
    ref = randomize_(timm_siglip(cfg), std=0.3).eval()  # large enough that tanh-GELU would show
    ours = SigLIP(cfg).eval()
    # The checkpoint's unused attention-pooling head is the only thing we do not build.
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("attn_pool.")}
    assert any(k.startswith("attn_pool.") for k in ref.state_dict())
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref.forward_features(x)
        got = ours(x)
    assert got.shape == (2, 16, 64)
    assert max_diff(got, expected) < ATOL
    same_epsilons(ours, ref)


def test_siglip_normalises_inside_the_tower_like_torchvision():
    # Statistics that differ per channel and from each other (SigLIP's own are all 0.5, which hides a swap).
    cfg = SigLIPConfig(image_size=32, patch_size=16, width=32, depth=1, n_heads=2, pixel_mean=(0.1, 0.4, 0.7),
                       pixel_std=(0.2, 0.3, 0.9))
    plain = dict(cfg.__dict__, pixel_mean=None, pixel_std=None)
    ours, bare = SigLIP(cfg), SigLIP(SigLIPConfig(**plain))
    bare.load_state_dict(randomize_(ours).state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours(x), bare(T.Normalize(cfg.pixel_mean, cfg.pixel_std)(x))) < ATOL


SAM_TEST = SAMConfig(image_size=128, patch_size=16, width=64, depth=4, n_heads=4, window_size=3, global_blocks=(1, 3),
                     neck_dim=32, downsample_dims=(32, 48), pixel_mean=None, pixel_std=None)


def test_sam_matches_segment_anything():
    # 8x8 grid in windows of 3: padded to 9x9, so the unmasked zero padding is exercised; blocks 1 and 3 are global.
    ref = randomize_(segment_anything_encoder(SAM_TEST), std=0.3).eval()
    ours = randomize_(SAM(SAM_TEST), seed=1).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected
    assert sorted({k.split(".")[0] for k in missing}) == ["downsamples", "hd_alpha_downsamples", "neck_hd"]
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = ref(x)  # (B, neck_dim, 8, 8)
        last, _ = ours.trunk(x)
        got = ours.neck(last.permute(0, 3, 1, 2))
    assert got.shape == expected.shape == (2, 32, 8, 8)
    assert max_diff(got, expected) < ATOL
    same_epsilons(ours, ref)


def test_sam_deepseek_additions_match_the_facts_sheet():
    """F = D(Interp(Neck(h_last))) + alpha * D(Interp(NeckHD(h_first_global))), with D the two shared bias-free
    stride-2 convs and Interp bilinear (align_corners False) to 1.5x the grid, written out from facts section 1."""
    ref = randomize_(segment_anything_encoder(SAM_TEST), std=0.3).eval()
    ours = SAM(SAM_TEST).eval()
    randomize_(ours, seed=2)
    ours.load_state_dict(ref.state_dict(), strict=False)  # same trunk and neck; neck_hd, convs, alpha stay random
    with torch.no_grad():
        ours.hd_alpha_downsamples.fill_(0.7)
    neck_hd = copy.deepcopy(ref.neck)
    neck_hd.load_state_dict(ours.neck_hd.state_dict())
    w0, w1 = ours.downsamples[0].weight, ours.downsamples[1].weight
    assert ours.downsamples[0].bias is None and ours.downsamples[1].bias is None

    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        h = ref.patch_embed(x) + ref.pos_embed
        global_outputs = []
        for i, blk in enumerate(ref.blocks):
            h = blk(h)
            if blk.window_size == 0:
                global_outputs.append(h)

        def tail(neck, feats):
            y = neck(feats.permute(0, 3, 1, 2))
            y = F.interpolate(y.float(), size=(12, 12), mode="bilinear", align_corners=False)  # 8 * 1.5
            y = F.conv2d(y, w0, stride=2, padding=1)
            return F.conv2d(y, w1, stride=2, padding=1)  # (B, 48, 3, 3)

        expected = tail(ref.neck, h) + 0.7 * tail(neck_hd, global_outputs[0])
        expected = expected.flatten(2).transpose(1, 2)  # row-major tokens (B, 9, 48)
        got = ours(x)
    assert got.shape == (2, 9, 48)
    assert max_diff(got, expected) < ATOL


def test_sams_channel_norm_matches_segment_anything_on_a_map_with_little_variance():
    # Random features cannot tell where epsilon sits (their variance dwarfs it); a nearly flat map, as a plain region
    # of a real image gives, can: segment-anything adds it inside the square root.
    from segment_anything.modeling.common import LayerNorm2d as SegmentAnythingLayerNorm2d
    from nanovl.sam import LayerNorm2d
    ref, ours = randomize_(SegmentAnythingLayerNorm2d(8), std=0.3), LayerNorm2d(8)
    ours.load_state_dict(ref.state_dict())
    assert ours.eps == ref.eps
    flat = 1.0 + 1e-4 * torch.randn(2, 8, 5, 5)  # variance 1e-8, under epsilon (1e-6)
    with torch.no_grad():
        assert max_diff(ours(flat), ref(flat)) < ATOL


def test_sam_upsamples_in_fp32_and_rounds_once_in_half_precision():
    # The official tower interpolates the neck's map in fp32 and casts back (facts section 1): in bf16 throughout,
    # 45% of the upsampled values come out otherwise.
    sam = SAM(SAM_TEST).to(torch.bfloat16)
    size = SAM_TEST.upsample_size
    x = torch.randn(2, SAM_TEST.neck_dim, 8, 8).to(torch.bfloat16)
    expected = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(sam.upsample_downsample(x), sam.downsamples(expected))


def test_sam_windows_of_a_grid_that_is_not_square_match_segment_anything():
    # The towers' grids are square, where swapping height and width changes nothing; the window functions take any
    # (B, H, W, C) map, as segment-anything's do: padded at the bottom and right, windows row by row, and back.
    from segment_anything.modeling.image_encoder import window_partition as sa_partition
    from segment_anything.modeling.image_encoder import window_unpartition as sa_unpartition

    from nanovl.sam import window_partition, window_unpartition

    x = torch.randn(2, 5, 7, 3)
    windows, padded = window_partition(x, 4)
    expected, expected_padded = sa_partition(x, 4)
    assert padded == expected_padded == (8, 8) and windows.shape == (8, 4, 4, 3)
    assert torch.equal(windows, expected)
    assert torch.equal(window_unpartition(windows, 4, padded, (5, 7)), sa_unpartition(expected, 4, padded, (5, 7)))
    assert torch.equal(window_unpartition(windows, 4, padded, (5, 7)), x)


def test_sams_side_path_starts_switched_off():
    # The official init of hd_alpha_downsamples is 0: a SAM trained from scratch starts from the last block's
    # features alone, and the first global block's path opens as alpha learns (a checkpoint brings its own value).
    sam = SAM(SAM_TEST)
    assert sam.hd_alpha_downsamples.shape == (1,) and sam.hd_alpha_downsamples.item() == 0.0


def test_the_hybrids_low_resolution_input_is_torchvisions_resize():
    # SigLIP's input in the hybrid: SAM's canvas through torchvision's Resize(384, antialias=True), as the official
    # tower makes it; in fp32, and in bf16, which torchvision resizes in fp32 and rounds back (on a GPU:
    # tests/test_gpu.py).
    from nanovl.image import low_resolution

    x = torch.rand(2, 3, 128, 128)
    assert max_diff(low_resolution(x, 48), T.Resize(48, antialias=True)(x)) < ATOL
    x = x.to(torch.bfloat16)
    assert torch.equal(low_resolution(x, 48), T.Resize(48, antialias=True)(x))


def test_sam_uses_clip_statistics_inside_the_tower():
    cfg = SAMConfig(**dict(SAM_TEST.__dict__, pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD))
    ours, bare = randomize_(SAM(cfg)), SAM(SAM_TEST)
    bare.load_state_dict(ours.state_dict())
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert max_diff(ours(x), bare(T.Normalize(CLIP_MEAN, CLIP_STD)(x))) < ATOL


def test_mlp_gelu_aligner_matches_the_facts_sheet():
    aligner = randomize_(Aligner(AlignerConfig("mlp_gelu"), low_dim=24, d_model=40))
    assert sorted(aligner.state_dict()) == ["layers.0.bias", "layers.0.weight", "layers.2.bias", "layers.2.weight"]
    low = torch.randn(2, 5, 24)
    l0, l2 = aligner.layers[0], aligner.layers[2]
    expected = F.linear(F.gelu(F.linear(low, l0.weight, l0.bias)), l2.weight, l2.bias)
    assert max_diff(aligner(low), expected) < ATOL


def test_hybrid_aligner_projects_high_first_then_low():
    aligner = randomize_(Aligner(AlignerConfig("low_high_hybrid_split_mlp_gelu"), low_dim=24, d_model=40, high_dim=16))
    assert sorted(aligner.state_dict()) == ["high_up_proj.bias", "high_up_proj.weight", "layers.1.bias",
                                            "layers.1.weight", "low_up_proj.bias", "low_up_proj.weight"]
    assert aligner.high_up_proj.weight.shape == (20, 16) and aligner.low_up_proj.weight.shape == (20, 24)
    low, high = torch.randn(2, 5, 24), torch.randn(2, 5, 16)
    hp, lp, l1 = aligner.high_up_proj, aligner.low_up_proj, aligner.layers[1]
    fused = torch.cat([F.linear(high, hp.weight, hp.bias), F.linear(low, lp.weight, lp.bias)], dim=-1)
    expected = F.linear(F.gelu(fused), l1.weight, l1.bias)
    assert max_diff(aligner(low, high), expected) < ATOL
    # Swapping the branches must change the answer, or this test could not catch a wrong concatenation order.
    swapped = torch.cat([F.linear(low, lp.weight, lp.bias), F.linear(high, hp.weight, hp.bias)], dim=-1)
    assert max_diff(aligner(low, high), F.linear(F.gelu(swapped), l1.weight, l1.bias)) > 1e-3
