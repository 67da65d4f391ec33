"""The whole model, end to end, against transformers' own port of DeepSeek-VL: `DeepseekVLForConditionalGeneration`
(the released 1.3B's layout: SigLIP only, `mlp_gelu` aligner) and `DeepseekVLHybridForConditionalGeneration` (the
7B's: SAM-B and SigLIP, the hybrid aligner).

The other parity tests hold each module against its own reference; this one holds the assembled model (towers, aligner,
image embeddings spliced into the token sequence, decoder) against an implementation written by other people from the
same official code. Both are built on small random configs of the released structure, every weight is copied across by
an explicit name table that must use each parameter of both sides exactly once, and both get the same ids and pixels.
The image processors are not compared: HF's get the pixels nanovl's towers see. Last, a folder that HF's save_pretrained
writes loads into nanovl as the release it stands for (nanovl.checkpoint.HF_PORT_NAMES).

Where the HF port differs on purpose, the test feeds it what the official model computes (facts sheet section 13):
- HF normalises in its image processor, never in the model. The official hybrid tower (and nanovl) normalises each
  branch inside its tower: SAM with the CLIP statistics, SigLIP with 0.5. The released 1.3B normalises in the
  processor, as HF does, so both sides get the same normalised tensor there.
- HF's hybrid processor (transformers 5.23) makes SigLIP's input with its own resize of the padded SAM canvas, with the
  resampling its config names. The official tower (and nanovl) shrinks that canvas with torchvision's
  Resize(antialias=True), bilinear; HF gets that.
"""

import dataclasses
import json
import math
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from transformers import (DeepseekVLConfig, DeepseekVLForConditionalGeneration, DeepseekVLHybridConfig,
                          DeepseekVLHybridForConditionalGeneration, DeepseekVLHybridImageProcessor,
                          DeepseekVLImageProcessor)

from conftest import ATOL, max_diff
from nanovl import DeepSeekVL, VLConfig, get_config
from nanovl.config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, AlignerConfig, LlamaConfig, SigLIPConfig

SIGLIP, SAM_ENC = "model.vision_model.", "model.high_res_vision_model.vision_encoder."
# Our parameter name -> HF's, as (pattern, replacement) tried in order; the first that matches wins. A replacement
# holding {qkv} names three HF tensors (HF's SigLIP splits timm's fused qkv), stacked in the order q, k, v.
NAME_TABLE = (
    # SigLIP (both kinds)
    (r"siglip\.patch_embed\.proj\.", SIGLIP + "embeddings.patch_embedding."),
    (r"siglip\.pos_embed$", SIGLIP + "embeddings.position_embedding.weight"),  # (1, N, C) -> (N, C)
    (r"siglip\.blocks\.(\d+)\.norm([12])\.", SIGLIP + r"encoder.layers.\1.layer_norm\2."),
    (r"siglip\.blocks\.(\d+)\.attn\.qkv\.", SIGLIP + r"encoder.layers.\1.self_attn.{qkv}_proj."),
    (r"siglip\.blocks\.(\d+)\.attn\.proj\.", SIGLIP + r"encoder.layers.\1.self_attn.out_proj."),
    (r"siglip\.blocks\.(\d+)\.mlp\.", SIGLIP + r"encoder.layers.\1.mlp."),  # fc1, fc2
    (r"siglip\.norm\.", SIGLIP + "post_layernorm."),
    # SAM (hybrid): the trunk and its own neck sit in HF's SamVisionModel; DeepSeek's additions beside it
    (r"sam\.patch_embed\.proj\.", SAM_ENC + "patch_embed.projection."),
    (r"sam\.pos_embed$", SAM_ENC + "pos_embed"),
    (r"sam\.blocks\.(\d+)\.norm([12])\.", SAM_ENC + r"layers.\1.layer_norm\2."),
    (r"sam\.blocks\.(\d+)\.", SAM_ENC + r"layers.\1."),  # attn.qkv, attn.proj, attn.rel_pos_h/w, mlp.lin1/2
    (r"sam\.neck\.0\.", SAM_ENC + "neck.conv1."),
    (r"sam\.neck\.1\.", SAM_ENC + "neck.layer_norm1."),
    (r"sam\.neck\.2\.", SAM_ENC + "neck.conv2."),
    (r"sam\.neck\.3\.", SAM_ENC + "neck.layer_norm2."),
    (r"sam\.neck_hd\.0\.", "model.high_res_vision_neck.conv1."),
    (r"sam\.neck_hd\.1\.", "model.high_res_vision_neck.layer_norm1."),
    (r"sam\.neck_hd\.2\.", "model.high_res_vision_neck.conv2."),
    (r"sam\.neck_hd\.3\.", "model.high_res_vision_neck.layer_norm2."),
    (r"sam\.downsamples\.0\.", "model.high_res_vision_proj.conv1."),
    (r"sam\.downsamples\.1\.", "model.high_res_vision_proj.conv2."),
    (r"sam\.hd_alpha_downsamples$", "model.high_res_vision_alpha"),
    # Aligners
    (r"aligner\.layers\.0\.", "model.aligner.linear1."),  # mlp_gelu: Linear, GELU, Linear
    (r"aligner\.layers\.2\.", "model.aligner.linear2."),
    (r"aligner\.high_up_proj\.", "model.aligner.high_res_vision_proj."),  # hybrid
    (r"aligner\.low_up_proj\.", "model.aligner.vision_proj."),
    (r"aligner\.layers\.1\.", "model.aligner.proj."),
    # Decoder: HF's LlamaModel under model.language_model, the head outside it
    (r"llm\.lm_head\.", "lm_head."),
    (r"llm\.", "model.language_model."),
)
# HF parameters that nothing of ours feeds: SigLIP's attention-pooling head, built and never called in DeepSeek-VL
# (the released checkpoints' attn_pool.*, which nanovl does not build).
HF_UNUSED = SIGLIP + "head."


def hf_names(name: str) -> list:
    for pattern, replacement in NAME_TABLE:
        if re.match(pattern, name):
            hf = re.sub(pattern, replacement, name, count=1)
            return [hf.replace("{qkv}", part) for part in "qkv"] if "{qkv}" in hf else [hf]
    raise KeyError(f"no HF name for our parameter {name!r}")


def copy_to_hf(ours, hf):
    """Write every parameter of ours into hf through NAME_TABLE; each of hf's (but the unused head) written once."""
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    written = Counter()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            names = hf_names(name)
            for part, hf_name in zip(p.chunk(len(names)), names):
                target = theirs[hf_name]
                assert part.shape in (target.shape, (1, *target.shape)), (name, hf_name, part.shape, target.shape)
                target.copy_(part.reshape(target.shape))
                written[hf_name] += 1
    unused = {n for n in theirs if n.startswith(HF_UNUSED)}
    assert unused, "the SigLIP head was expected on HF's side (vision_use_head)"
    assert set(written) == set(theirs) - unused and set(written.values()) == {1}, \
        (sorted(set(theirs) - unused - set(written)), [n for n, k in written.items() if k > 1])
    # An untied head, as the released models have (HF's configs default to tying it to the embedding).
    assert hf.lm_head.weight.data_ptr() != hf.model.language_model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------------------------------------------------------------
# Configs: small, with the released structure

LLM = LlamaConfig(vocab_size=2048, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=352, max_seq_len=512)


def siglip_only_config() -> VLConfig:
    # The released 1.3B's layout: no in-tower normalisation, the processor gives SigLIP [-1, 1] pixels.
    return VLConfig(name="hf-1.3b", siglip=SigLIPConfig(image_size=96, patch_size=16, width=64, depth=2, n_heads=2,
                                                        pixel_mean=None, pixel_std=None),
                    sam=None, aligner=AlignerConfig("mlp_gelu"), llm=LLM, image_token_id=3).validate()


def hybrid_config() -> VLConfig:
    # The tiny preset (16x16 SAM grid in windows of 6, so the unmasked zero padding runs; global blocks 1 and 3),
    # with downsample convs 2x and 4x the neck's width: the only widths HF's DeepseekVLSamVisionProj builds
    # (256 -> 512 -> 1024 in the release; the tiny preset's 32 -> 64 -> 64 has no HF equivalent).
    return get_config("tiny", **{"sam.neck_dim": 16, "sam.downsample_dims": (32, 64), "llm.n_layers": 2})


def hf_model(cfg: VLConfig):
    s, l = cfg.siglip, cfg.llm
    text = dict(model_type="llama", vocab_size=l.vocab_size, hidden_size=l.dim, intermediate_size=l.ffn_dim,
                num_hidden_layers=l.n_layers, num_attention_heads=l.n_heads, num_key_value_heads=l.n_kv_heads,
                max_position_embeddings=l.max_seq_len, rms_norm_eps=l.norm_eps, rope_theta=l.rope_theta,
                tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    # DeepSeek's SigLIP uses exact GELU (HF's SigLIP default is the tanh one) and keeps the unused pooling head.
    vision = dict(model_type="siglip_vision_model", image_size=s.image_size, patch_size=s.patch_size,
                  hidden_size=s.width, intermediate_size=int(s.width * s.mlp_ratio), num_hidden_layers=s.depth,
                  num_attention_heads=s.n_heads, hidden_act="gelu", layer_norm_eps=1e-6, vision_use_head=True)
    if cfg.hybrid:
        m = cfg.sam
        # HF derives the SAM tail's geometry: upsample to 4x SigLIP's grid (the official code hard-codes 96), convs
        # 2x and 4x the neck's width. It also upsamples in the model's dtype where the official code goes through
        # fp32, a difference in bf16 only.
        assert m.upsample_size == 4 * s.grid and m.downsample_dims == (2 * m.neck_dim, 4 * m.neck_dim)
        sam = dict(model_type="sam_vision_model", image_size=m.image_size, patch_size=m.patch_size,
                   hidden_size=m.width, output_channels=m.neck_dim, num_hidden_layers=m.depth,
                   num_attention_heads=m.n_heads, mlp_ratio=m.mlp_ratio, window_size=m.window_size,
                   global_attn_indexes=list(m.global_blocks), hidden_act="gelu", layer_norm_eps=1e-6,
                   qkv_bias=True, use_abs_pos=True, use_rel_pos=True)
        config = DeepseekVLHybridConfig(text_config=text, vision_config=vision, high_res_vision_config=sam,
                                        image_token_id=cfg.image_token_id, tie_word_embeddings=False)
        cls = DeepseekVLHybridForConditionalGeneration
    else:
        config = DeepseekVLConfig(text_config=text, vision_config=vision, image_token_id=cfg.image_token_id,
                                  tie_word_embeddings=False)
        cls = DeepseekVLForConditionalGeneration
    config._attn_implementation = "eager"  # the plain softmax(q k^T) v, a path independent of ours (SDPA)
    return cls(config).eval()


def randomize_scaled_(model: DeepSeekVL, seed: int = 0):
    """Random weights that keep the signal near unit size through every part: matrices and convolutions
    N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2), biases, position embeddings and relative-position tables random too,
    and SAM's alpha at 0.7 (its init 0 switches the side path off). conftest's randomize_ (one std for all) either
    shrinks the image features until a tanh GELU in SigLIP no longer shows in the logits (std 0.1), or blows the
    un-normalised SAM convs up to features in the hundreds (0.3). The head is scaled down to logits of about 1,
    since fp32 rounding grows with their size and the tolerance is absolute."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("pos_embed"):  # (1, N, C) or (1, H, W, C): no fan-in
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:  # Linear (out, in), Conv2d (out, in, k, k), Embedding (vocab, C), rel_pos (2S-1, hs)
                p.copy_(noise / math.sqrt(p[0].numel()) * (0.25 if name == "llm.lm_head.weight" else 1.0))
            elif name.endswith("weight"):  # LayerNorm, LayerNorm2d, RMSNorm
                p.copy_(1 + 0.1 * noise)
            else:  # biases
                p.copy_(0.1 * noise)
        if model.sam is not None:
            model.sam.hd_alpha_downsamples.fill_(0.7)
    return model


def build_pair(cfg: VLConfig):
    ours = randomize_scaled_(DeepSeekVL(cfg)).eval()
    hf = hf_model(cfg)
    copy_to_hf(ours, hf)
    return ours, hf


def inputs(cfg: VLConfig):
    """Two rows of the same length: row 0 holds two images between text, row 1 one; three images in all."""
    g = torch.Generator().manual_seed(1)
    n = cfg.n_image_tokens
    text = lambda k: torch.randint(cfg.image_token_id + 1, cfg.llm.vocab_size, (k,), generator=g)
    span = torch.full((n,), cfg.image_token_id)
    ids = torch.stack([torch.cat([text(3), span, text(2), span, text(2)]),
                       torch.cat([text(5), span, text(n + 2)])])  # (2, 2n + 7)
    canvas = torch.rand(3, 3, cfg.image_size, cfg.image_size, generator=g)  # in [0, 1], as the processor pads it
    return ids, canvas


def hf_pixels(cfg: VLConfig, canvas):
    """What HF's forward takes for the pixels nanovl gets: the tensors each of our towers computes from the canvas
    before its first layer, made here with the official tower's torchvision ops."""
    if not cfg.hybrid:
        return {"pixel_values": canvas}  # already normalised by the processor, for both
    assert (cfg.sam.pixel_mean, cfg.sam.pixel_std) == (CLIP_MEAN, CLIP_STD)  # facts sheet sections 1 and 2
    assert (cfg.siglip.pixel_mean, cfg.siglip.pixel_std) == (SIGLIP_MEAN, SIGLIP_STD)
    low = T.Resize(cfg.siglip.image_size, antialias=True)(canvas)  # the official low-res input: bilinear, antialiased
    return {"high_res_pixel_values": T.Normalize(CLIP_MEAN, CLIP_STD)(canvas),
            "pixel_values": T.Normalize(SIGLIP_MEAN, SIGLIP_STD)(low)}


def run_pair(cfg: VLConfig, ours, hf):
    """(our image embeddings, HF's, our logits, HF's) for the same ids and pixels."""
    ids, canvas = inputs(cfg)
    if not cfg.hybrid:
        canvas = T.Normalize(SIGLIP_MEAN, SIGLIP_STD)(canvas)  # the 1.3B's processor normalises (facts section 8)
    with torch.no_grad():
        embeds, expected_embeds = ours.encode_images(canvas), hf.model.get_image_features(
            **hf_pixels(cfg, canvas)).pooler_output  # (N, n, d_model) each
        logits, _ = ours(ids, canvas)
        expected_logits = hf(input_ids=ids, **hf_pixels(cfg, canvas)).logits
    return embeds, expected_embeds, logits, expected_logits


KINDS = {"siglip-only": siglip_only_config, "hybrid": hybrid_config}


@pytest.fixture(scope="module")
def pairs():
    """kind -> (config, ours, hf), each pair built once for the module."""
    built = {}

    def get(kind):
        if kind not in built:
            cfg = KINDS[kind]()
            built[kind] = (cfg, *build_pair(cfg))
        return built[kind]
    return get


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_whole_model_matches_transformers_deepseek_vl_port(pairs, kind):
    cfg, ours, hf = pairs(kind)
    embeds, expected_embeds, got, expected = run_pair(cfg, ours, hf)
    assert embeds.shape == expected_embeds.shape == (3, cfg.n_image_tokens, cfg.llm.dim)
    assert max_diff(embeds, expected_embeds) < ATOL, max_diff(embeds, expected_embeds)
    assert got.shape == expected.shape == (2, 2 * cfg.n_image_tokens + 7, cfg.llm.vocab_size)
    assert max_diff(got, expected) < ATOL, max_diff(got, expected)
    # Images matter: other pixels change the logits after the first image span, and only there.
    ids, canvas = inputs(cfg)
    with torch.no_grad():
        other, _ = ours(ids, torch.rand_like(canvas))
    assert max_diff(other[:, :3], got[:, :3]) < ATOL and max_diff(other, got) > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# The comparison must see each part: break one thing on our side and the logits must move far past the tolerance.

def swapped_aligner(self, low, high=None):  # the hybrid aligner concatenating [low, high] instead of [high, low]
    return self.layers(torch.cat([self.low_up_proj(low), self.high_up_proj(high)], dim=-1))


def sam_without_side_path(self, x):
    last, _ = self.trunk(x)
    return self.upsample_downsample(self.neck(last.permute(0, 3, 1, 2))).flatten(2).transpose(1, 2)


def sam_side_path_from_the_last_global_block(self, x):
    out = sam_without_side_path(self, x)
    blocks, self.blocks = self.blocks, self.blocks[:max(self.cfg.global_blocks) + 1]
    try:
        hd, _ = self.trunk(x)  # the output of the last global block
    finally:
        self.blocks = blocks
    hd = self.upsample_downsample(self.neck_hd(hd.permute(0, 3, 1, 2))).flatten(2).transpose(1, 2)
    return out + hd * self.hd_alpha_downsamples


def low_res_without_antialias(images, size):
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def upsample_with_align_corners(self, x):  # SAM's neck output to the upsampled grid (64 -> 96 at full size)
    size = self.cfg.upsample_size
    return self.downsamples(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True))


def siglip_without_final_norm(self, x):
    if self.pixel_mean is not None:
        x = (x - self.pixel_mean) / self.pixel_std
    x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
    for block in self.blocks:
        x = block(x)
    return x


def siglip_mlp_with_tanh_gelu(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def images_in_reverse_order(self, images, check=True, encode=DeepSeekVL.encode_images):  # each span: another's image
    return encode(self, images.flip(0), check)


BREAKAGES = {  # name -> (kind, what to replace, by what)
    "aligner concatenates low before high": ("hybrid", "nanovl.aligner.Aligner.forward", swapped_aligner),
    "SAM's neck_hd side path skipped": ("hybrid", "nanovl.sam.SAM.forward", sam_without_side_path),
    "side path reads the last global block": ("hybrid", "nanovl.sam.SAM.forward",
                                              sam_side_path_from_the_last_global_block),
    "low-res input resized without antialiasing": ("hybrid", "nanovl.model.low_resolution",
                                                   low_res_without_antialias),
    "SAM's upsampling with align_corners=True": ("hybrid", "nanovl.sam.SAM.upsample_downsample",
                                                 upsample_with_align_corners),
    "images spliced in reverse order": ("hybrid", "nanovl.model.DeepSeekVL.encode_images", images_in_reverse_order),
    "SigLIP without its final LayerNorm": ("siglip-only", "nanovl.siglip.SigLIP.forward", siglip_without_final_norm),
    "SigLIP's MLP with tanh GELU": ("siglip-only", "nanovl.siglip.Mlp.forward", siglip_mlp_with_tanh_gelu),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_part_is_caught(pairs, breakage, monkeypatch):
    kind, target, replacement = BREAKAGES[breakage]
    cfg, ours, hf = pairs(kind)
    monkeypatch.setattr(target, replacement)
    _, _, got, expected = run_pair(cfg, ours, hf)
    # The subtlest of these, a tanh GELU, moves the logits by about 3e-4 (the GELUs differ by 5e-4 at most).
    assert max_diff(got, expected) > 10 * ATOL, max_diff(got, expected)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_folder_in_transformers_own_layout_loads_as_the_release_it_was_converted_from(pairs, kind, tmp_path):
    # What DeepseekVL*ForConditionalGeneration.save_pretrained writes (the layout of the Hub's conversions): the
    # release's weights under other names, SigLIP's q, k, v apart, another config. load_model (sample.py, --eval-only,
    # export) and part_state (--init_from) read it as the release: every tensor exactly ours, the same config, the
    # official processor, and so transformers' logits.
    from nanovl.checkpoint import load_model, part_state
    from nanovl.image import ImageProcessor
    from nanovl.tokenizer import Tokenizer

    cfg, ours, hf = pairs(kind)
    hf.save_pretrained(tmp_path)
    processor = DeepseekVLHybridImageProcessor if cfg.hybrid else DeepseekVLImageProcessor
    processor().save_pretrained(tmp_path)  # transformers' preprocessor_config.json: not the official processor's
    tok = Tokenizer.train(["what colour is the circle? the circle is red and the square is blue."] * 20, 280)
    assert tok.image_id == cfg.image_token_id
    tok.save(tmp_path / "tokenizer.json")
    loaded, _, proc = load_model(tmp_path)
    assert dataclasses.replace(loaded.cfg, name=cfg.name) == cfg and proc == ImageProcessor.for_config(cfg)
    expected = ours.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], v) for k, v in expected.items())
    _, _, logits, hf_logits = run_pair(cfg, loaded, hf)
    assert max_diff(logits, hf_logits) < ATOL, max_diff(logits, hf_logits)
    what, parts, skipped, projector = part_state(tmp_path)
    assert what == "a released DeepSeek-VL model (in transformers' layout)" and not skipped
    assert projector == cfg.aligner.projector_type
    assert set(parts) == set(expected) and all(torch.equal(parts[k], v) for k, v in expected.items())
    # A tensor the port does not name so, or a SigLIP block missing one of q, k and v: named, nothing loaded.
    from safetensors.torch import load_file as st_load, save_file as st_save
    tensors = st_load(str(tmp_path / "model.safetensors"))
    for change, message in ((lambda t: t.update({"model.extra.weight": torch.zeros(1)}),
                             r"1 tensors that transformers' DeepSeek-VL does not name so: model.extra.weight"),
                            (lambda t: t.pop("model.vision_model.encoder.layers.0.self_attn.k_proj.weight"),
                             r"siglip.blocks.0.attn.qkv.weight has only \['q', 'v'\] of q, k and v")):
        broken = dict(tensors)
        change(broken)
        st_save(broken, str(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path)
    st_save(tensors, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "image_token_id": 7}))
    with pytest.raises(ValueError, match=r"config.json: image_token_id 7, but .*tokenizer.json puts "
                                         r"<image_placeholder> at 3"):
        load_model(tmp_path)
    rope = {**config["text_config"], "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}
    (tmp_path / "config.json").write_text(json.dumps({**config, "text_config": rope}))
    with pytest.raises(ValueError, match=r"rope_type 'linear' is not supported"):
        load_model(tmp_path)
    # transformers' DeepSeek-VL config ties the output head to the input embedding by default, and then saves no
    # head: not the release's model, refused for the model and for --init_from alike (not a head left random).
    (tmp_path / "config.json").write_text(json.dumps(config))
    del tensors["lm_head.weight"]
    st_save(tensors, str(tmp_path / "model.safetensors"))
    tied = r"no lm_head.weight: its config.json ties the output head to the input embedding"
    with pytest.raises(ValueError, match=tied):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=tied):
        part_state(tmp_path)
