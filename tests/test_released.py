"""Released checkpoints and pretrained parts.

The released weights cannot be downloaded here, so each test builds a folder in the released layout with tiny
dimensions: a reference model composed from timm (SigLIP), segment-anything (SAM-B) and transformers (Llama) modules
named as the official model names them, its weights written with the `safetensors` library, a tokenizer written with
`tokenizers`. nanovl must load the folder without either library and give the reference model's logits."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, trainers
from PIL import Image
from tokenizers import pre_tokenizers as pt
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from conftest import ATOL, max_diff, randomize_
from test_image import official_canvas
from test_tokenizer import deepseek_pre_tokenizer
from test_vision import segment_anything_encoder, timm_siglip
from nanovl import DeepSeekVL, get_config
from nanovl.chat import IMAGE_TAG, render_chat
from nanovl.checkpoint import (TRAINED_CONTEXT, check_tokenizer_fits, export_released, init_from_parts, load_model,
                               SAM_MODELS, SIGLIP_MODELS, load_released, pick_tokenizer, released_config,
                               released_config_dict)
from nanovl.config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, SAMConfig, SigLIPConfig
from nanovl.model import nanovl_to_released
from nanovl.tokenizer import BOS, EOS, IMAGE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320  # the model's embedding is padded past the tokenizer, as the released 102400 is
SIGLIP_DIMS = dict(patch_size=16, width=32, depth=2, n_heads=2, mlp_ratio=4.0)
SAM_DIMS = dict(patch_size=16, width=32, depth=3, n_heads=2, mlp_ratio=4.0, window_size=3, global_blocks=(1,),
                neck_dim=16, downsample_dims=(24, 32))  # = SigLIP width: one input_dim feeds both up_projs
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=VOCAB, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0)


# ---------------------------------------------------------------------------------------------------------------------
# The reference model: the official module tree, built from the reference implementations

class OfficialSAM(nn.Module):
    """DeepSeek's sam_b_downsample: segment-anything's encoder plus neck_hd, the downsample convs and alpha."""

    def __init__(self, cfg: SAMConfig):
        super().__init__()
        enc = segment_anything_encoder(cfg)
        self.patch_embed, self.pos_embed, self.blocks, self.neck = enc.patch_embed, enc.pos_embed, enc.blocks, enc.neck
        self.neck_hd = copy.deepcopy(enc.neck)
        d0, d1 = cfg.downsample_dims
        self.downsamples = nn.Sequential(nn.Conv2d(cfg.neck_dim, d0, 3, 2, 1, bias=False),
                                         nn.Conv2d(d0, d1, 3, 2, 1, bias=False))
        self.hd_alpha_downsamples = nn.Parameter(torch.zeros(1))
        self.up = cfg.upsample_size

    def forward(self, x):  # facts sheet section 1, written out
        x = self.patch_embed(x) + self.pos_embed
        first_global = None
        for blk in self.blocks:
            x = blk(x)
            if blk.window_size == 0 and first_global is None:
                first_global = x

        def tail(neck, h):
            y = F.interpolate(neck(h.permute(0, 3, 1, 2)).float(), size=(self.up, self.up), mode="bilinear",
                              align_corners=False)
            return self.downsamples(y)

        y = tail(self.neck, x) + self.hd_alpha_downsamples * tail(self.neck_hd, first_global)
        return y.flatten(2).transpose(1, 2)  # (B, n, C) row-major


class Tower(nn.Module):  # the official CLIPVisionTower wrapper: the backbone sits at `.vision_tower`
    def __init__(self, backbone):
        super().__init__()
        self.vision_tower = backbone


class ReferenceVL(nn.Module):
    """state_dict() keys are the released checkpoint's keys, unused ones included."""

    def __init__(self, hybrid: bool, siglip_size: int, sam_size: int = 0):
        super().__init__()
        self.hybrid = hybrid
        sig_cfg = SigLIPConfig(image_size=siglip_size, **SIGLIP_DIMS)
        self.vision_model = nn.Module()
        if hybrid:
            self.vision_model.vision_tower_high = Tower(OfficialSAM(SAMConfig(image_size=sam_size, **SAM_DIMS)))
            self.vision_model.vision_tower_low = Tower(timm_siglip(sig_cfg))
            self.vision_model.high_layer_norm = nn.LayerNorm(1024)  # built, never used (facts section 3)
            self.vision_model.low_layer_norm = nn.LayerNorm(1024)
            d = LLAMA["hidden_size"]
            self.aligner = nn.Module()
            self.aligner.high_up_proj = nn.Linear(SAM_DIMS["downsample_dims"][-1], d // 2)
            self.aligner.low_up_proj = nn.Linear(SIGLIP_DIMS["width"], d // 2)
            self.aligner.layers = nn.Sequential(nn.GELU(), nn.Linear(d, d))
        else:
            self.vision_model.vision_tower = timm_siglip(sig_cfg)
            self.aligner = nn.Module()
            self.aligner.layers = nn.Sequential(nn.Linear(SIGLIP_DIMS["width"], LLAMA["hidden_size"]), nn.GELU(),
                                                nn.Linear(LLAMA["hidden_size"], LLAMA["hidden_size"]))
        self.language_model = LlamaForCausalLM(HFLlamaConfig(**LLAMA, tie_word_embeddings=False))
        self.siglip_size = siglip_size

    def image_embeds(self, pixels):
        vm, a = self.vision_model, self.aligner
        if not self.hybrid:  # 1.3B: the processor normalised already
            return a.layers(vm.vision_tower.forward_features(pixels))
        high = vm.vision_tower_high.vision_tower(T.Normalize(CLIP_MEAN, CLIP_STD)(pixels))
        low = T.Resize(self.siglip_size, antialias=True)(pixels)  # torchvision's default: bilinear
        low = vm.vision_tower_low.vision_tower.forward_features(T.Normalize(SIGLIP_MEAN, SIGLIP_STD)(low))
        return a.layers(torch.cat([a.high_up_proj(high), a.low_up_proj(low)], dim=-1))

    def forward(self, ids, pixels, image_id):  # official prepare_inputs_embeds, then the HF decoder
        embeds = self.language_model.get_input_embeddings()(ids)
        embeds[ids == image_id] = self.image_embeds(pixels).flatten(0, 1)
        return self.language_model(inputs_embeds=embeds).logits


def hf_tokenizer(path, special=(BOS, EOS, IMAGE)):
    """DeepSeek's layout: byte-level BPE, then the special tokens added after the vocabulary."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = deepseek_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    text = ["what colour is the circle? the circle is red and the square is blue. " * 20]
    hf.train_from_iterator(text, trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                                     initial_alphabet=pt.ByteLevel.alphabet()))
    hf.add_special_tokens(list(special))
    hf.save(str(path))
    return hf


def released_folder(path, hybrid: bool, shards: bool = False):
    """Write a released-layout folder by hand (independently of nanovl's exporter); return the reference model."""
    path.mkdir(parents=True)
    siglip_size, sam_size = (48, 128) if hybrid else (48, 0)
    torch.manual_seed(1)
    ref = randomize_(ReferenceVL(hybrid, siglip_size, sam_size), std=0.2).eval()
    with torch.no_grad():
        if hybrid:
            ref.vision_model.vision_tower_high.vision_tower.hd_alpha_downsamples.fill_(0.7)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    state["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)  # older HF exports hold it
    if shards:  # two shards and HF's index
        names = sorted(state)
        parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in parts.items():
            st_save_file({k: state[k] for k in keys}, str(path / file))
        weight_map = {k: f for f, keys in parts.items() for k in keys}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        st_save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf_tokenizer(path / "tokenizer.json")
    tower = lambda size, dims, mean: {"model_name": "tiny", "image_size": size, "select_feature": "same",
                                      "select_layer": -1, "pixel_mean": mean, "pixel_std": mean and 0.5,
                                      "nanovl": dims}
    if hybrid:
        vision = {"cls": "HybridVisionTower", "params": {
            "concat_type": "tuple",
            "high_res_cfg": dict(tower(sam_size, SAM_DIMS, list(CLIP_MEAN)), pixel_std=list(CLIP_STD)),
            "low_res_cfg": dict(tower(siglip_size, SIGLIP_DIMS, list(SIGLIP_MEAN)), pixel_std=list(SIGLIP_STD))}}
        aligner = {"projector_type": "low_high_hybrid_split_mlp_gelu", "depth": 2, "input_dim": 32, "n_embed": 64}
        pre = {"image_size": sam_size, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
               "do_normalize": False}
    else:
        vision = {"cls": "CLIPVisionTower", "params": dict(tower(siglip_size, SIGLIP_DIMS, None))}
        aligner = {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 32, "n_embed": 64}
        pre = {"image_size": siglip_size, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_normalize": True}
    config = {"model_type": "multi_modality", "vision_config": vision,
              "aligner_config": {"cls": "MlpProjector", "params": aligner},
              "language_config": dict(LLAMA, model_type="llama", torch_dtype="float32")}
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(json.dumps(dict(pre, image_processor_type="VLMImageProcessor",
                                                                   min_size=14, rescale_factor=1 / 255)))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    return ref


def chat_batch(tok, proc, n_tokens, seed=0, official=None):
    """A two-image chat prompt -> (ids (1, T), pixels (2, 3, S, S)) made by `proc`, or by the official processor's
    transcription for the layout `official` ("hybrid": CLIP-mean padding, no normalisation; "siglip": 0.5)."""
    g = torch.Generator().manual_seed(seed)
    images = [Image.fromarray((torch.rand(30 + 10 * i, 40, 3, generator=g) * 255).byte().numpy()) for i in range(2)]
    ids = render_chat([{"role": "user", "content": f"{IMAGE_TAG}what colour? {IMAGE_TAG} and this?"}], tok, n_tokens,
                      generation_prompt=True)[0]
    if official == "hybrid":
        pixels = [official_canvas(im, 128, CLIP_MEAN) for im in images]
    elif official == "siglip":
        pixels = [T.Normalize(SIGLIP_MEAN, SIGLIP_STD)(official_canvas(im, 48, SIGLIP_MEAN)) for im in images]
    else:
        pixels = [proc(im) for im in images]
    return torch.tensor([ids]), torch.stack(pixels)


@pytest.fixture(scope="module", params=["7b-layout-sharded", "1.3b-layout"])
def folder(request, tmp_path_factory):
    hybrid = request.param.startswith("7b")
    path = tmp_path_factory.mktemp("released") / request.param
    return path, released_folder(path, hybrid, shards=hybrid)


# ---------------------------------------------------------------------------------------------------------------------

def test_released_folder_gives_the_reference_models_logits(folder, monkeypatch):
    path, ref = folder
    with monkeypatch.context() as m:  # before_weights: called with the config and tokenizer, before any weight is read
        m.setattr("nanovl.checkpoint.load_sharded", lambda *a: pytest.fail("the weights were read first"))
        seen = []

        def refuse(cfg, tok):  # (as --eval-only's check of its questions against the context)
            seen.append((cfg.hybrid, tok.image_id))
            raise ValueError("refused")

        with pytest.raises(ValueError, match="^refused$"):
            load_model(path, before_weights=refuse)
        assert seen == [(ref.hybrid, 282)]
        with pytest.raises(ValueError, match=r"^expected before_weights as a function of \(cfg, tokenizer\), got int"):
            load_model(path, before_weights=3)
    model, tok, proc = load_released(path)
    assert tok.image_id == 282 and tok.vocab_size == 283 and model.cfg.llm.vocab_size == VOCAB
    # A tokenizer.json without <image_placeholder> gets it as the official processor adds it: a special token at the
    # next id, here 282 again (it refused, "this tokenizer has no <image_placeholder> token")
    bare = path.parent / f"{path.name}-no-image-token"
    shutil.copytree(path, bare)
    hf_tokenizer(bare / "tokenizer.json", special=(BOS, EOS))
    assert IMAGE not in (bare / "tokenizer.json").read_text(encoding="utf-8")
    again = load_released(bare, device="meta")[1]
    assert again.image_id == 282 and again.same_ids(tok) and again.special_ids == tok.special_ids
    assert model.cfg.hybrid == ref.hybrid and model.cfg.llm.max_seq_len == 512
    assert not model.training  # ready to run: no dropout in DeepSeek-VL, but a caller may rely on eval()
    meta = load_released(path, device="meta")[0]  # built where it is asked to be
    assert {t.device.type for t in (*meta.parameters(), *meta.buffers())} == {"meta"}
    # Each side makes its own pixels: nanovl from the folder's preprocessor_config.json, the reference by the
    # official processor's transcription.
    ids, pixels = chat_batch(tok, proc, model.cfg.n_image_tokens)
    _, official = chat_batch(tok, None, model.cfg.n_image_tokens, official="hybrid" if ref.hybrid else "siglip")
    with torch.no_grad():
        expected = ref(ids, official, tok.image_id)
        got, _ = model(ids, pixels)
    assert got.shape == expected.shape == (1, ids.shape[1], VOCAB)
    assert max_diff(got, expected) < ATOL
    # Pixels of 0-255 are refused, whichever range the processor makes ([0, 1] for the hybrid, [-1, 1] for the 1.3B)
    with pytest.raises(ValueError, match=r"expected pixels as the image processor makes them .*, got values from "
                                         r"0\.?[0-9]* to 25[0-9]"):
        model(ids, pixels * 255 if ref.hybrid else (pixels + 1) * 127.5)


def test_released_configs_give_the_presets():
    """The released configs as the facts sheet rebuilds them (section 6): the 7B leaves most Llama fields to HF's
    defaults, the 1.3B names its dimensions; both name their towers by model_name only."""
    siglip = {"model_name": "siglip_large_patch16_384", "image_size": 384, "select_feature": "same",
              "select_layer": -1}
    seven = {"vision_config": {"cls": "HybridVisionTower", "params": {
        "concat_type": "tuple",
        "high_res_cfg": {"model_name": "sam_b_downsample", "image_size": 1024, "output_dim": 1024,
                         "pixel_mean": list(CLIP_MEAN), "pixel_std": list(CLIP_STD)},
        "low_res_cfg": dict(siglip, output_dim=1024, pixel_mean=[0.5] * 3, pixel_std=[0.5] * 3)}},
        "aligner_config": {"cls": "MlpProjector", "params": {"projector_type": "low_high_hybrid_split_mlp_gelu",
                                                             "depth": 2, "input_dim": 1024, "n_embed": 4096}},
        "language_config": {"model_type": "llama", "num_hidden_layers": 30, "vocab_size": 102400,
                            "max_position_embeddings": 16384, "torch_dtype": "bfloat16"}}
    one = {"vision_config": {"cls": "CLIPVisionTower", "params": siglip},
           "aligner_config": {"cls": "MlpProjector", "params": {"projector_type": "mlp_gelu", "depth": 2,
                                                                "input_dim": 1024, "n_embed": 2048}},
           "language_config": {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16,
                               "num_hidden_layers": 24, "vocab_size": 102400, "max_position_embeddings": 16384}}
    for config, preset in ((seven, "7b"), (one, "1.3b")):
        got = released_config(config, 100015).to_dict()
        assert dict(got, name=None) == dict(get_config(preset).to_dict(), name=None)
    with pytest.raises(ValueError, match="unknown vision tower model_name 'siglip_so400m'"):
        released_config(dict(one, vision_config={"cls": "CLIPVisionTower", "params": dict(
            siglip, model_name="siglip_so400m")}), 100015)
    with pytest.raises(ValueError, match="tie_word_embeddings = True is not supported"):
        released_config(dict(one, language_config=dict(one["language_config"], tie_word_embeddings=True)), 100015)
    # A field left out takes the official code's default, not the released value: SigLIP's select_layer -2 (one block
    # fewer, which nanovl does not build), the aligner's depth 1. SAM's tower ignores select_layer.
    bare = {k: v for k, v in siglip.items() if k != "select_layer"}
    with pytest.raises(ValueError, match=r"select_layer \(absent: -2\) / select_feature 'same' are not supported"):
        released_config(dict(one, vision_config={"cls": "CLIPVisionTower", "params": bare}), 100015)
    shallow = {k: v for k, v in one["aligner_config"]["params"].items() if k != "depth"}
    assert released_config(dict(one, aligner_config={"params": shallow}), 100015).aligner.depth == 1
    params = seven["vision_config"]["params"]
    # One input_dim feeds both of the official hybrid aligner's up-projections: SAM's output must have it too.
    narrow = dict(params, high_res_cfg=dict(params["high_res_cfg"], nanovl=dict(SAM_MODELS["sam_b_downsample"],
                                                                                 downsample_dims=(512, 768))))
    with pytest.raises(ValueError, match="input_dim = 1024 but SAM's output width is 768"):
        released_config(dict(seven, vision_config={"cls": "HybridVisionTower", "params": narrow}), 100015)
    with pytest.raises(ValueError, match="SAM's output width 48 differs from SigLIP's 64"):
        released_config_dict(get_config("tiny", **{"sam.downsample_dims": (64, 48)}))
    for fusion in ("feature", "sequence"):  # the official tower's other ways to join the branches: not the release's
        with pytest.raises(ValueError, match=f"concat_type '{fusion}' is not supported; the released 7B uses 'tuple'"):
            released_config(dict(seven, vision_config={"cls": "HybridVisionTower", "params": dict(
                params, concat_type=fusion)}), 100015)
    ignored = dict(params, high_res_cfg=dict(params["high_res_cfg"], select_layer=-2, select_feature="patch"))
    assert released_config(dict(seven, vision_config={"cls": "HybridVisionTower", "params": ignored}), 100015) == \
        released_config(seven, 100015)
    # A Llama field left out is transformers' LlamaConfig default: 32 layers, 2048 positions
    bare_lang = {k: v for k, v in seven["language_config"].items() if k not in ("num_hidden_layers",
                                                                               "max_position_embeddings")}
    defaults = released_config(dict(seven, language_config=bare_lang), 100015).llm
    assert (defaults.n_layers, defaults.max_seq_len) == (32, 2048)
    # What nanovl's decoder does not implement is refused, each named, rather than loaded into the wrong model
    lang = one["language_config"]
    for key, value in (("hidden_act", "gelu"), ("rope_scaling", {"type": "linear", "factor": 2.0}),
                       ("attention_bias", True), ("mlp_bias", True), ("model_type", "mistral")):
        with pytest.raises(ValueError, match=f"language_config: {key} = .* is not supported"):
            released_config(dict(one, language_config=dict(lang, **{key: value})), 100015)
    with pytest.raises(ValueError, match="head_dim 64 is not hidden_size / num_attention_heads"):
        released_config(dict(one, language_config=dict(lang, head_dim=64)), 100015)
    with pytest.raises(ValueError, match=r"vision_config.pixel_mean = \[0.5, 0.5\], expected 3 numbers"):
        released_config(dict(one, vision_config={"cls": "CLIPVisionTower", "params": dict(
            siglip, pixel_mean=[0.5, 0.5], pixel_std=[0.5] * 3)}), 100015)
    partial = {k: v for k, v in SIGLIP_MODELS["siglip_large_patch16_384"].items() if k != "depth"}
    with pytest.raises(ValueError, match="vision_config.nanovl = .*, expected an object of"):
        released_config(dict(one, vision_config={"cls": "CLIPVisionTower", "params": dict(siglip, nanovl=partial)}),
                        100015)
    # ... and an export writes the released towers as the released file names them, with their output widths
    exported = released_config_dict(get_config("7b"))["vision_config"]["params"]
    for branch in ("high_res_cfg", "low_res_cfg"):
        for key, value in params[branch].items():
            assert exported[branch][key] == value, (branch, key)
        assert "nanovl" not in exported[branch]


def test_the_released_presets_hold_the_facts_sheets_constants():
    # Written out here from the facts sheet, not imported: everywhere else the tests read these from nanovl itself
    # (or from configs that spell them as nanovl does), so a wrong digit there would pass unseen.
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert SIGLIP_MEAN == SIGLIP_STD == (0.5, 0.5, 0.5)  # sections 1, 2 and 8
    for name in ("1.3b", "7b"):
        cfg = get_config(name)
        assert (cfg.llm.norm_eps, cfg.llm.rope_theta, cfg.llm.vocab_size, cfg.image_token_id) == \
            (1e-6, 10000.0, 102400, 100015)  # sections 5 and 9
        assert (cfg.siglip.image_size, cfg.siglip.patch_size, cfg.siglip.width, cfg.siglip.depth,
                cfg.n_image_tokens) == (384, 16, 1024, 24, 576)  # section 2
    sam = get_config("7b").sam  # section 1
    assert (sam.image_size, sam.patch_size, sam.width, sam.depth, sam.n_heads, sam.window_size, sam.global_blocks,
            sam.neck_dim, sam.downsample_dims, sam.upsample_size) == (1024, 16, 768, 12, 12, 14, (2, 5, 8, 11), 256,
                                                                      (512, 1024), 96)


def test_export_loads_back_to_identical_outputs(folder, tmp_path):
    path, ref = folder
    model, tok, proc = load_released(path)
    out = export_released(model, tok, tmp_path / "export", max_shard_bytes=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    again, tok2, proc2 = load_model(out)
    assert proc2 == proc and tok2.encode("the circle is red") == tok.encode("the circle is red")
    # what HF's AutoTokenizer reads beside tokenizer.json: DeepSeek-LLM's tokenizer starts every text with BOS
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["add_bos_token"]) == (BOS, EOS, True)
    assert tok_config["model_max_length"] == model.cfg.llm.max_seq_len == 512  # the model's context, not 4096
    ids, pixels = chat_batch(tok, proc, model.cfg.n_image_tokens, seed=1)
    with torch.no_grad():
        assert torch.equal(again(ids, pixels)[0], model(ids, pixels)[0])
    # Read with the safetensors library: the export holds the reference's tensors under the released names.
    exported = {}
    for shard in out.glob("model-*.safetensors"):
        exported.update(st_load_file(str(shard)))
    unused = ("attn_pool.", "_layer_norm.", "rotary_emb")
    expected = {k: v for k, v in ref.state_dict().items() if not any(u in k for u in unused)}
    assert sorted(exported) == sorted(expected)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    (out / "model.safetensors.index.json").unlink()  # shards without their index: said so, not "no model.pt"
    with pytest.raises(ValueError, match="holds safetensors shards but no model.safetensors.index.json"):
        load_model(out)
    for shard in out.glob("model-*.safetensors"):
        shard.unlink()  # config.json and the rest, no weights: said so, not "no checkpoint at .../model.pt"
    with pytest.raises(FileNotFoundError, match="holds config.json but no weights: a released DeepSeek-VL folder"):
        load_model(out)


def test_a_decoder_unlike_the_released_ones_survives_export_and_load(folder, tmp_path):
    # The released decoders have as many key/value heads as query heads, rotary base 10000 and norm epsilon 1e-6; a
    # model of one's own may have fewer heads and other constants.
    path, _ = folder
    model, tok, proc = load_released(path)
    cfg = copy.deepcopy(model.cfg)
    cfg.llm.n_kv_heads, cfg.llm.rope_theta, cfg.llm.norm_eps = cfg.llm.n_heads // 2, 5e5, 1e-5
    cfg.llm.max_seq_len = 2 * TRAINED_CONTEXT  # a released folder's context is capped at 4096; an export's is its own
    torch.manual_seed(0)
    gqa = DeepSeekVL(cfg).eval()
    assert gqa.llm.layers[0].self_attn.k_proj.weight.shape[0] < gqa.llm.layers[0].self_attn.q_proj.weight.shape[0]
    again, _, _ = load_model(export_released(gqa, tok, tmp_path / "gqa"))
    assert again.cfg.llm == cfg.llm
    (tmp_path / "gqa" / "tokenizer.json").unlink()  # a folder without its tokenizer takes the one given
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*gqa.tokenizer.json: pass --tokenizer"):
        load_model(tmp_path / "gqa")
    assert load_model(tmp_path / "gqa", tokenizer=path)[1].same_ids(tok)
    ids, pixels = chat_batch(tok, proc, cfg.n_image_tokens, seed=2)
    with torch.no_grad():
        assert torch.equal(again(ids, pixels)[0], gqa(ids, pixels)[0])


def test_export_and_load_refuse_a_dtype_that_is_not_floating_point(folder, tmp_path):
    path, _ = folder
    model, tok, _ = load_released(path)
    for dtype in (torch.int8, "bf16"):  # an int8 export wrote a folder that could not be loaded back
        with pytest.raises(ValueError, match=rf"dtype {re.escape(repr(dtype))}: expected None \(the weights' own\) or "
                                             "one of torch.float32, torch.bfloat16, torch.float16$"):
            export_released(model, tok, tmp_path / "int8", dtype=dtype)
        with pytest.raises(ValueError, match="expected None .* torch.float64$"):
            load_model(path, dtype=dtype)  # ("bf16" was read as a device)
    assert not (tmp_path / "int8").exists()


def test_export_replaces_only_an_earlier_export(folder, tmp_path, monkeypatch):
    import nanovl.checkpoint as checkpoint
    model, tok, _ = load_released(folder[0])
    sizes, save_sharded = [], checkpoint.save_sharded
    monkeypatch.setattr(checkpoint, "save_sharded", lambda t, f, size: sizes.append(size) or save_sharded(t, f, size))
    out = export_released(model, tok, tmp_path / "export")
    export_released(model, tok, out, max_shard_bytes=20_000)  # an earlier export: replaced, now in shards
    assert sizes == [5 * 10 ** 9, 20_000]  # huggingface_hub's default shard, "5GB", of 10^9 bytes
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    stage = tmp_path / "stage3"  # a training run's folder: refused, and nothing in it touched
    stage.mkdir()
    (stage / "model.pt").write_bytes(b"weights")
    (stage / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="stage3 exists and holds model.pt, which an export does not write"):
        export_released(model, tok, stage)
    assert (stage / "model.pt").read_bytes() == b"weights" and sorted(os.listdir(stage)) == ["config.json", "model.pt"]
    with pytest.raises(ValueError, match="model.pt is a file: an export writes a folder"):
        export_released(model, tok, stage / "model.pt")
    assert (stage / "model.pt").read_bytes() == b"weights"
    # A folder with only the names an export writes, but not written by one (a released model, trimmed): refused.
    (stage / "model.pt").unlink()
    with pytest.raises(ValueError, match="stage3 exists, and its config.json is not one a nanovl export wrote"):
        export_released(model, tok, stage)
    assert os.listdir(stage) == ["config.json"]
    (stage / "config.json").rename(stage / "config.json.orig")  # a name an export writes only as a prefix
    with pytest.raises(ValueError, match="holds config.json.orig, which an export does not write"):
        export_released(model, tok, stage)
    (stage / "config.json.orig").rename(stage / "config.json")
    (tmp_path / "empty").mkdir()
    assert (export_released(model, tok, tmp_path / "empty") / "config.json").exists()  # anybody's to fill
    # The folder an export is first written in is cleared only if it holds nothing but an export's files.
    (tmp_path / "export.partial").mkdir()
    (tmp_path / "export.partial" / "thesis.txt").write_text("mine")
    with pytest.raises(ValueError, match="export.partial, where an export is written before .* holds files an export"):
        export_released(model, tok, out)
    (tmp_path / "export.partial" / "thesis.txt").unlink()
    (tmp_path / "export.partial" / "model.safetensors.tmp4321").write_text("what a killed export leaves")
    (tmp_path / "export.partial" / ".model.safetensors.0123abcd.tmp").write_text("and one of nanovl before 12-02")
    export_released(model, tok, out)
    assert not [f.name for f in out.iterdir() if ".tmp" in f.name]  # cleared, not carried into the export
    from nanovl import checkpoint
    # ".", the folder it is run in, or one above it: refused even empty (replaced whole, the shell's folder would go)
    (tmp_path / "here").mkdir()
    for cwd, target in (("here", "."), ("here/below", ".."), ("here", str(tmp_path / "here"))):
        (tmp_path / cwd).mkdir(exist_ok=True)  # ("here" is empty the first time)
        monkeypatch.chdir(tmp_path / cwd)
        with pytest.raises(SystemExit, match=r"here is the current folder( or holds it)?: an export replaces its "
                                             "folder whole"):
            checkpoint.main(["--ckpt", str(out), "--export", target])
    assert os.listdir(tmp_path / "here") == ["below"] and not (tmp_path / "here.partial").exists()


def test_a_signal_during_an_exports_swap_waits_for_the_swap(folder, tmp_path, monkeypatch):
    # Ctrl-C (or SIGTERM) between removing the earlier export and renaming the new one into place left the export
    # only as export.partial, which the next export cleared: now the signal waits for the swap, then stops the run.
    import shutil
    import signal

    from nanovl import checkpoint
    model, tok, _ = load_released(folder[0])
    out = export_released(model, tok, tmp_path / "export")
    remove = shutil.rmtree

    def interrupted_midway(path, *a, **k):
        remove(path, *a, **k)
        if str(path) == str(out):  # (the earlier export gone, the new one not yet in its place)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", interrupted_midway)
    # Python's own Ctrl-C handler, whatever this process was given: a shell's `pytest &` starts it with SIGINT ignored
    # (then the signal never comes, rightly, and this would not be the test it means to be).
    was = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            export_released(model, tok, out)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (the handlers of before, back)
    finally:
        signal.signal(signal.SIGINT, was)
    monkeypatch.undo()
    assert not (tmp_path / "export.partial").exists() and load_released(out)[0].cfg.llm == model.cfg.llm
    # A SIGTERM there, in a process of its own (its default ends the process): it ends once the swap is done.
    script = (f"import os, shutil, signal; from nanovl import checkpoint; remove = shutil.rmtree\n"
              f"def midway(path, *a, **k):\n    remove(path, *a, **k)\n"
              f"    if str(path) == {str(out)!r}: os.kill(os.getpid(), signal.SIGTERM)\n"
              f"checkpoint.shutil.rmtree = midway\n"
              f"model, tok, _ = checkpoint.load_released({str(folder[0])!r})\n"
              f"checkpoint.export_released(model, tok, {str(out)!r})\nprint('not stopped')")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM and "not stopped" not in done.stdout, done.stderr
    assert not (tmp_path / "export.partial").exists() and load_released(out)[0].cfg.llm == model.cfg.llm


def test_an_export_that_cannot_be_written_leaves_no_partial_folder(folder, tmp_path, monkeypatch):
    from nanovl import checkpoint
    model, tok, _ = load_released(folder[0])
    out = export_released(model, tok, tmp_path / "export")  # an earlier export, which a failed one leaves as it was
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def full(tensors, dest, max_shard_bytes):  # the disk fills up after the first shard
        (dest / "model-00001-of-00002.safetensors").write_bytes(b"shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_sharded", full)
    with pytest.raises(OSError, match=r"^cannot write .*export.partial, where the export is written before it is moved "
                                      r"to .*export: No space left on device; nothing of it is left, and .*export is "
                                      r"as it was$"):
        export_released(model, tok, out)
    assert not (tmp_path / "export.partial").exists()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before

    def a_bug(tensors, dest, max_shard_bytes):  # any other failure: the shards went with a full disk's only
        (dest / "model-00001-of-00002.safetensors").write_bytes(b"shard")
        raise RuntimeError("a bug")

    monkeypatch.setattr(checkpoint, "save_sharded", a_bug)
    with pytest.raises(RuntimeError, match="a bug"):
        export_released(model, tok, out)
    assert not (tmp_path / "export.partial").exists() and {f.name: f.read_bytes() for f in out.iterdir()} == before
    monkeypatch.setattr(checkpoint, "save_sharded", full)
    # What load_model refuses is refused before anything is written, not found on loading the export back
    with pytest.raises(ValueError, match="expected a Tokenizer to export, got NoneType"):
        export_released(model, None, tmp_path / "none")
    other = copy.deepcopy(model.cfg)
    other.image_token_id -= 1  # (the tokenizer's <image_placeholder> would be read as text)
    with pytest.raises(ValueError, match=r"the tokenizer given has .* tokens and <image_placeholder> = (\d+); the .* "
                                         r"model has a vocabulary of .* and expects (?!\1)"):
        export_released(DeepSeekVL(other), tok, tmp_path / "other")
    with pytest.raises(SystemExit, match=r"^cannot write .*new.partial, where .* No space left on device; nothing of "
                                         r"it is left"):  # the command line says it in a line
        checkpoint.main(["--ckpt", str(out), "--export", str(tmp_path / "new")])
    assert sorted(os.listdir(tmp_path)) == ["export"]
    (tmp_path / "afile").write_text("")  # a folder that cannot be made: said the same way
    with pytest.raises(SystemExit, match=r"^cannot write .*afile/x.partial, where .*: Not a directory; nothing of it "
                                         "is left"):
        checkpoint.main(["--ckpt", str(out), "--export", str(tmp_path / "afile" / "x")])

    def interrupted(tensors, dest, max_shard_bytes):  # Ctrl-C after the first shard
        (dest / "model-00001-of-00002.safetensors").write_bytes(b"shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_sharded", interrupted)
    with pytest.raises(SystemExit, match=r"^\n\(interrupted: what was written is removed, and .*export is as it "
                                         r"was\)$"):
        checkpoint.main(["--ckpt", str(out), "--export", str(out)])
    assert not (tmp_path / "export.partial").exists() and {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_mismatched_keys_are_listed_and_nothing_is_loaded(tmp_path):
    base = tmp_path / "base"
    released_folder(base, hybrid=False)
    state = st_load_file(str(base / "model.safetensors"))
    q_proj = "language_model.model.layers.0.self_attn.q_proj.weight"
    diverged = state[q_proj].clone()
    diverged[3, :10], diverged[7, 0] = float("nan"), -float("inf")
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "language_model.model.layers.1.mlp.up_proj.weight"},
                    "1 missing: llm.layers.1.mlp.up_proj.weight"),
        "unexpected": (dict(state, **{"language_model.model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}),
                       "1 unexpected: llm.layers.2.mlp.up_proj.weight"),
        "shape": (dict(state, **{"aligner.layers.2.bias": torch.zeros(65)}),
                  r"aligner.layers.2.bias: file \(65,\), model \(64,\)"),
        "foreign": (dict(state, **{"text_encoder.proj.weight": torch.zeros(2)}),
                    "1 keys that are not DeepSeek-VL's: text_encoder.proj.weight"),
        "quantised": (dict(state, **{"aligner.layers.2.bias": torch.zeros(64, dtype=torch.int8)}),
                      "1 not floating-point: aligner.layers.2.bias: int8"),
        "int16 and bool": (dict(state, **{"aligner.layers.2.bias": torch.zeros(64, dtype=torch.int16),
                                          "aligner.layers.0.bias": torch.zeros(state["aligner.layers.0.bias"].shape,
                                                                               dtype=torch.bool)}),
                           "2 not floating-point: aligner.layers.0.bias: bool, aligner.layers.2.bias: int16"),
        # saved from a diverged run: counted tensor by tensor, float8 too (torch has no isfinite for e4m3fn)
        "diverged": (dict(state, **{q_proj: diverged, "aligner.layers.2.bias": torch.tensor(
                          [1.0, float("nan")] * 32).to(torch.float8_e4m3fn)}),
                     r"diverged: 2 tensors hold NaN or infinite values: aligner.layers.2.bias \(32 of 64\), "
                     r"llm.layers.0.self_attn.q_proj.weight \(11 of 4,096\); the file is damaged or was saved from a "
                     r"diverged run$"),
    }
    for name, (tensors, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for f in ("config.json", "tokenizer.json", "preprocessor_config.json"):
            (folder / f).write_bytes((base / f).read_bytes())
        st_save_file(tensors, str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match=message):
            load_released(folder)
    # The unused keys are skipped by name: the base folder holds attn_pool.* and rotary_emb.inv_freq and loads.
    assert any("attn_pool" in k for k in state) and load_released(base)
    model, tok, _ = load_released(base)  # a nanovl model.pt is checked alike (bf16, as train.py may save it)
    weights = {k: v.bfloat16() for k, v in model.state_dict().items()}
    weights["llm.norm.weight"][:2] = float("inf")
    (tmp_path / "stage3").mkdir()
    torch.save({"model": weights, "config": model.cfg.to_dict()}, tmp_path / "stage3" / "model.pt")
    tok.save(tmp_path / "stage3" / "tokenizer.json")
    with pytest.raises(ValueError, match=r"stage3.model.pt: 1 tensor holds NaN or infinite values: llm.norm.weight "
                                         r"\(2 of 64\); the file is damaged"):
        load_model(tmp_path / "stage3")
    # A file of mixed float types loads as one that holds each exactly: bf16 weights with fp32 norms load in fp32.
    mixed = {k: v if "norm" in k else v.bfloat16() for k, v in state.items()}
    st_save_file(mixed, str(tmp_path / "missing" / "model.safetensors"))
    loaded = load_released(tmp_path / "missing")[0].state_dict()
    assert {v.dtype for v in loaded.values()} == {torch.float32}
    norm = next(k for k in loaded if "norm" in k)
    assert torch.equal(loaded[norm], state[nanovl_to_released(norm, hybrid=False)])  # not rounded to bf16


def test_bad_files_are_refused_clearly(tmp_path):
    folder = tmp_path / "rel"
    released_folder(folder, hybrid=False)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated: tensors run past the end of the file
    with pytest.raises(ValueError, match="past the end"):
        load_model(folder)
    weights.write_bytes(data)
    for one in ("model.safetensors", "config.json"):  # a file of the folder where the folder was meant
        with pytest.raises(ValueError, match=rf"rel.{one} is one file of the released model folder .*rel: pass the "
                                             "folder$"):
            load_model(folder / one)
    config = json.loads((folder / "config.json").read_text())
    small = {**config, "language_config": {**config["language_config"], "vocab_size": 200}}
    (folder / "config.json").write_text(json.dumps(small))  # 283 token ids, but embeddings for 200: the config's own
    with pytest.raises(ValueError, match=r"image_token_id 282 is outside the vocabulary \(size 200\)"):  # check
        load_model(folder)
    lang, tower = config["language_config"], config["vision_config"]["params"]
    for edited, message in [  # a field of the wrong type or value is named, not a KeyError or ZeroDivisionError
            ({"language_config": {**lang, "num_attention_heads": 0}}, "language_config.num_attention_heads = 0, "
                                                                      "expected a positive integer"),
            ({"language_config": {**lang, "hidden_size": 64.5}}, "language_config.hidden_size = 64.5"),
            ({"language_config": {**lang, "rope_theta": "big"}}, "language_config.rope_theta = 'big', expected a "
                                                                 "positive number"),
            ({"vision_config": {**config["vision_config"], "params": {k: v for k, v in tower.items()
                                                                      if k != "image_size"}}},
             "vision_config.image_size = None"),
            ({"vision_config": {**config["vision_config"], "params": {**tower, "nanovl": [1, 2]}}},
             r"vision_config.nanovl = \[1, 2\], expected an object of"),
            ({"vision_config": {**config["vision_config"], "params": {**tower, "pixel_mean": 0.5}}},
             r"vision_config.pixel_mean = 0.5, expected 3 numbers \(or null: no normalising\)"),
            ({"vision_config": {**config["vision_config"], "params": {**{k: v for k, v in tower.items()
                                                                         if k != "nanovl"}, "model_name": ["x"]}}},
             r"unknown vision tower model_name \['x'\]"),
            ({"aligner_config": []}, "needs vision_config .with params., aligner_config.params and language_config"),
            ({"language_config": [1]}, "each an object; it has .*'language_config': 'list'"),  # (it said "has" alone)
            # transformers 5's nested RoPE settings (they were let through)
            ({"language_config": {**lang, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}},
             r"language_config \(a port's text_config\): rope_parameters.rope_type 'yarn' is not supported"),
            ({"aligner_config": {**config["aligner_config"], "params": {**config["aligner_config"]["params"],
                                                                         "n_embed": 7}}},
             f"aligner_config: n_embed = 7 but language_config.hidden_size is {lang['hidden_size']}")]:
        (folder / "config.json").write_text(json.dumps({**config, **edited}))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(folder / 'config.json'))}: .*{message}"):
            load_model(folder)  # (the file named: released_config reads a dict)
    # What shapes the prompt, in the official processor's and tokenizer's own files: another value than the released
    # one (which nanovl follows) is refused by name, not rendered otherwise without a word (neither file was read)
    (folder / "config.json").write_text(json.dumps(config))
    released = {"image_tag": IMAGE, "add_special_token": False, "sft_format": "deepseek", "mask_prompt": True}
    for edited, message in [({"num_image_tokens": 999}, r"num_image_tokens 999, where nanovl uses \d+"),
                            ({"add_special_token": True}, "add_special_token True, where nanovl uses False"),
                            ({"image_tag": "<image>"}, "image_tag '<image>', where nanovl uses '<image_placeholder>'")]:
        (folder / "processor_config.json").write_text(json.dumps({**released, **edited}))
        with pytest.raises(ValueError, match=rf"processor_config.json: {message}: nanovl renders prompts as the "
                                             "released processor does"):
            load_model(folder)
    (folder / "processor_config.json").write_text(json.dumps(released))
    tokenizer_config = (folder / "tokenizer_config.json").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    with pytest.raises(ValueError, match="tokenizer_config.json: add_bos_token false, but nanovl begins every prompt"):
        load_model(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": True}))
    with pytest.warns(UserWarning, match="asks for clean_up_tokenization_spaces, which nanovl does not apply"):
        load_model(folder)
    (folder / "tokenizer_config.json").write_text(tokenizer_config)
    # RoPE's base as transformers 5 writes it, inside rope_parameters, is followed as transformers reads it: before a
    # top-level rope_theta, and the default without one (it was read as 10000 whatever it said); its older "type" too
    seen = []

    def theta(cfg, tok):  # (what the config gives, before any weight is read)
        seen.append(cfg.llm.rope_theta)
        raise ValueError("enough")

    for rope, top in [({"rope_type": "default", "rope_theta": 5e5}, {}), ({"rope_type": "default", "rope_theta": 5e5},
                      {"rope_theta": 1e4}), ({"rope_type": "default"}, {})]:
        (folder / "config.json").write_text(json.dumps({**config, "language_config": {
            **{k: v for k, v in lang.items() if k != "rope_theta"}, **top, "rope_parameters": rope}}))
        with pytest.raises(ValueError, match="^enough$"):
            load_model(folder, before_weights=theta)
    assert seen == [5e5, 5e5, 1e4]
    (folder / "config.json").write_text(json.dumps({**config, "language_config": {
        **lang, "rope_parameters": {"type": "linear", "factor": 2.0}}}))
    with pytest.raises(ValueError, match=r"rope_parameters.rope_type 'linear' is not supported"):
        load_model(folder)
    # A SigLIP-only tower reads pixels its processor normalised: a file that turns that off is followed, and said
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(pre, do_normalize=False)))
    with pytest.warns(UserWarning, match=r"gives do_normalize false .* and the vision tower does not normalise its "
                                         r"input itself: nothing normalises the pixels, as the official code would"):
        assert not load_model(folder)[2].normalize
    # ... and one whose tower normalises too gets its pixels normalised twice, said as well
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    (folder / "config.json").write_text(json.dumps({**config, "vision_config": {**config["vision_config"], "params": {
        **tower, "pixel_mean": [0.5] * 3, "pixel_std": [0.5] * 3}}}))
    with pytest.warns(UserWarning, match="and the vision tower normalises its input itself: the pixels are "
                                         "normalised twice"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(pre, image_size=2 * pre["image_size"])))
    with pytest.raises(ValueError, match=f"image_size {2 * pre['image_size']} but the vision tower reads "
                                         f"{pre['image_size']}"):
        load_model(folder)
    (folder / "preprocessor_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="preprocessor_config.json holds a JSON list, expected an object of settings"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(folder)
    no_config = tmp_path / "bare.pt"  # a state dict under "model" with nothing to say what model it is
    torch.save({"model": {"llm.norm.weight": torch.ones(4)}}, no_config)
    with pytest.raises(ValueError, match=r"bare.pt holds no model config \(a dict under 'config'\), got NoneType"):
        load_model(no_config)
    torch.save({"model": {"llm.norm.weight": torch.ones(4)}, "config": {"zzz": 1}}, no_config)
    with pytest.raises(ValueError, match=r"^.*bare.pt: the model config it holds: unknown config fields \['zzz'\]"):
        load_model(no_config)  # (the file named: VLConfig.from_dict reads a dict)
    # A pickle holding more than tensors is refused by weights_only=True, with the reason.
    evil = tmp_path / "model.pt"
    torch.save({"model": {}, "config": {}, "hook": ReferenceVL}, evil)
    with pytest.raises(ValueError, match="holds more than tensors .*Unsupported global.*ReferenceVL"):
        load_model(evil)
    for odd, message in (({"llm.norm.weight": 3}, r"holds 1 other entries, such as 'llm.norm.weight': int"),
                         ({7: torch.ones(1)}, "holds 1 other entries, such as 7: Tensor")):  # not AttributeError
        torch.save({"model": odd, "config": {}}, evil)
        with pytest.raises(ValueError, match="is not a nanovl model file: its 'model' should map parameter names to "
                                             "tensors, and " + message):
            load_model(evil)


def test_a_tokenizer_must_fit_its_model():
    # Every id it makes needs an embedding row, and its placeholder must be the model's image id. A released
    # tokenizer may be smaller than the padded embedding; one made for a scratch preset (exact) has its size.
    cfg = get_config("tiny")
    V, image = cfg.llm.vocab_size, cfg.image_token_id
    fits = lambda n, i: SimpleNamespace(vocab_size=n, image_id=i)  # what the check reads of a tokenizer
    check_tokenizer_fits(fits(V - 10, image), cfg, "released")
    check_tokenizer_fits(fits(V, image), cfg, "scratch", exact=True)
    for tok, exact in ((fits(V + 1, image), False), (fits(V - 10, image), True), (fits(V, image + 1), False)):
        with pytest.raises(ValueError, match=rf"^t.json has {tok.vocab_size} tokens and <image_placeholder> = "
                                             rf"{tok.image_id}; the 'tiny' model has a vocabulary of {V} and expects "
                                             rf"{image}$"):
            check_tokenizer_fits(tok, cfg, "t.json", exact)


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained parts for training

TINY = get_config("tiny")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Pretrained parts with the tiny preset's shapes, each in its own format."""
    d = tmp_path_factory.mktemp("parts")
    torch.manual_seed(3)
    sam = randomize_(segment_anything_encoder(TINY.sam), std=0.1)
    sam_state = {"image_encoder." + k: v for k, v in sam.state_dict().items()}
    sam_state["prompt_encoder.point_embeddings.0.weight"] = torch.randn(1, 256)  # SAM's other parts: not ours
    sam_state["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    torch.save(sam_state, d / "sam_vit_b.pth")
    siglip = randomize_(timm_siglip(TINY.siglip), seed=4, std=0.1)
    # (with global_pool="avg" timm's ViT ends in fc_norm: a pooling part, not in DeepSeek-VL's tower)
    fc_norm = {"fc_norm.weight": torch.ones(TINY.siglip.width), "fc_norm.bias": torch.zeros(TINY.siglip.width)}
    st_save_file({**siglip.state_dict(), **fc_norm}, str(d / "siglip.safetensors"))
    l = TINY.llm
    llama = LlamaForCausalLM(HFLlamaConfig(hidden_size=l.dim, intermediate_size=l.ffn_dim, num_hidden_layers=l.n_layers,
                                           num_attention_heads=l.n_heads, num_key_value_heads=l.n_kv_heads,
                                           vocab_size=l.vocab_size, tie_word_embeddings=False))
    randomize_(llama, seed=5)
    llama.save_pretrained(d / "llama")
    # Older transformers saved each layer's rotary inv_freq buffer too; those files load the same
    saved = st_load_file(str(d / "llama" / "model.safetensors"))
    st_save_file({**saved, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(l.head_dim // 2)},
                 str(d / "llama" / "model.safetensors"), metadata={"format": "pt"})
    return d, sam_state, siglip.state_dict(), llama.state_dict()


def test_pretrained_parts_fill_the_model_and_new_parts_stay_fresh(parts):
    d, sam_state, siglip_state, llama_state = parts
    torch.manual_seed(0)
    model = DeepSeekVL(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from_parts(model, [d / "sam_vit_b.pth", d / "siglip.safetensors", d / "llama"])
    got = model.state_dict()
    for k, v in sam_state.items():
        if k.startswith("image_encoder."):
            assert torch.equal(got["sam." + k[len("image_encoder."):]], v)
    for k, v in siglip_state.items():
        if not k.startswith("attn_pool."):
            assert torch.equal(got["siglip." + k], v)
    for k, v in llama_state.items():
        assert torch.equal(got["llm." + k.removeprefix("model.")], v)
    for k in got:  # neck_hd starts as the loaded neck; the adaptor, convs and alpha keep their fresh values
        if k.startswith("sam.neck_hd."):
            assert torch.equal(got[k], got[k.replace("neck_hd", "neck")])
        if k.startswith(("aligner.", "sam.downsamples.", "sam.hd_alpha")):
            assert torch.equal(got[k], before[k])
    text = "\n".join(report)
    assert "SAM's image encoder" in text and "2 unused skipped" in text and "a timm SigLIP" in text
    assert "an HF Llama" in text and "sam.neck_hd: a copy of the loaded sam.neck" in text
    assert text.endswith("freshly initialised: aligner.high_up_proj, aligner.layers, aligner.low_up_proj, "
                         "sam.downsamples, sam.hd_alpha_downsamples")


def test_a_part_that_does_not_fit_changes_nothing(parts, tmp_path):
    d = parts[0]
    wide = timm_siglip(SigLIPConfig(**dict(TINY.siglip.__dict__, width=96, n_heads=2)))
    st_save_file(wide.state_dict(), str(tmp_path / "wide.safetensors"))
    model = DeepSeekVL(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"a timm SigLIP\) does not fit the 'tiny' model; nothing was loaded"):
        init_from_parts(model, [d / "sam_vit_b.pth", tmp_path / "wide.safetensors"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for twice in ("llama", "sam_vit_b.pth", "siglip.safetensors"):
        with pytest.raises(ValueError, match="given twice"):
            init_from_parts(model, [d / twice, d / twice])
    import shutil
    shutil.copytree(d / "llama", tmp_path / "llama")  # an HF Llama of another RoPE base: the same tensors
    config = json.loads((d / "llama" / "config.json").read_text())
    config.pop("rope_theta", None)
    for written in ({"rope_theta": 5e5},  # as transformers 4 writes it, and as 5 does
                    {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}):
        (tmp_path / "llama" / "config.json").write_text(json.dumps(dict(config, **written)))
        with pytest.raises(ValueError, match=r"llama \(an HF Llama language model\) does not fit the 'tiny' model; "
                                             r"nothing was loaded:\n  settings its config.json gives, which its "
                                             r"tensors' shapes do not show: llm.rope_theta 500000.0 there, 10000.0 "
                                             r"here$"):
            init_from_parts(model, [d / "sam_vit_b.pth", tmp_path / "llama"])
    for written in ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                    {"rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0}}):
        (tmp_path / "llama" / "config.json").write_text(json.dumps(dict(config, **written)))
        with pytest.raises(ValueError, match=r"shapes do not show: RoPE scaling 'llama3' there, none here$"):
            init_from_parts(model, [d / "sam_vit_b.pth", tmp_path / "llama"])
    stage = tmp_path / "stage1"  # a nanovl stage folder is a part too, as its model.pt is
    stage.mkdir()
    torch.save({"model": DeepSeekVL(TINY).state_dict(), "config": TINY.to_dict()}, stage / "model.pt")
    with pytest.raises(ValueError, match=r"stage1 \(a nanovl model\) does not fit the 'tiny' model; nothing was "
                                         r"loaded:\n  given twice"):
        init_from_parts(model, [stage, stage])
    with pytest.raises(ValueError, match=r"--init_from .*parts0: a folder, but not one of weights: expected a nanovl "
                                         r"stage folder \(model.pt\), a released"):
        init_from_parts(model, [d])  # the folder of parts, not a part
    with pytest.raises(ValueError, match=rf"--init_from {re.escape(str(tmp_path))}: a train.py --out folder, which "
                                         rf"holds the stage folders stage1: pass one of them, as .*stage1$"):
        init_from_parts(model, [tmp_path])  # train.py's --out, not one of its stages
    # A tensor that is not floating point (a header relabelled to int32), or that holds NaN or infinite values (a
    # diverged run), is refused by name, and nothing is copied from the parts before it either.
    siglip = parts[2]
    st_save_file(dict(siglip, pos_embed=siglip["pos_embed"].view(torch.int32)), str(tmp_path / "int.safetensors"))
    with pytest.raises(ValueError, match=r"int.safetensors \(a timm SigLIP\) does not fit the 'tiny' model; nothing "
                                         r"was loaded:\n  1 not floating-point: siglip.pos_embed: int32$"):
        init_from_parts(model, [d / "sam_vit_b.pth", tmp_path / "int.safetensors"])
    nan = siglip["blocks.1.mlp.fc1.bias"].clone()
    nan[::2] = float("nan")
    st_save_file(dict(siglip, **{"blocks.1.mlp.fc1.bias": nan}), str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=rf"nan.safetensors \(a timm SigLIP\): 1 tensor holds NaN or infinite values: "
                                         rf"siglip.blocks.1.mlp.fc1.bias \({nan.numel() // 2} of {nan.numel()}\); the "
                                         r"file is damaged or was saved from a diverged run$"):
        init_from_parts(model, [d / "sam_vit_b.pth", tmp_path / "nan.safetensors"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_released_siglip_model_starts_the_hybrid_recipe(tmp_path):
    """The 1.3B hybrid recipe: SigLIP and the decoder from a released SigLIP-only folder; its mlp_gelu aligner does
    not fit the hybrid adaptor and is left out."""
    released_folder(tmp_path / "rel", hybrid=False)
    donor, _, _ = load_released(tmp_path / "rel")
    cfg = get_config("tiny", **{f"siglip.{k}": v for k, v in SIGLIP_DIMS.items()}, **{
        "siglip.image_size": 48, "llm.dim": 64, "llm.ffn_dim": 96, "llm.n_layers": 2, "llm.vocab_size": VOCAB,
        "sam.image_size": 128, "image_token_id": 282})
    model = DeepSeekVL(cfg)
    report = init_from_parts(model, [tmp_path / "rel"])
    assert any("aligner not taken (mlp_gelu there" in line for line in report)
    for k, v in donor.state_dict().items():
        if k.startswith(("siglip.", "llm.")):
            assert torch.equal(model.state_dict()[k], v)


def test_a_released_tokenizer_without_the_image_token_trains_with_the_one_sample_reads(tmp_path):
    # load_released adds <image_placeholder> to a tokenizer that lacks it, as the official processor does; a stage
    # started from that folder trains with the same tokenizer (it refused it), and --tokenizer naming the folder's own
    # file is the same one.
    from nanovl import recipe
    from nanovl.resume import check_same_tokenizer, stage_tokenizer
    released_folder(tmp_path / "rel", hybrid=False)
    hf_tokenizer(tmp_path / "rel" / "tokenizer.json", special=(BOS, EOS))
    cfg = get_config("tiny", **{f"siglip.{k}": v for k, v in SIGLIP_DIMS.items()}, **{
        "siglip.image_size": 48, "llm.dim": 64, "llm.ffn_dim": 96, "llm.n_layers": 2, "llm.vocab_size": 283,
        "sam": None, "aligner.projector_type": "mlp_gelu", "image_token_id": 282})  # (a scratch preset's vocab: exact)
    tok = stage_tokenizer(recipe.TrainConfig(data=str(tmp_path / "data")), cfg, [str(tmp_path / "rel")])
    assert tok.image_id == 282 and tok.same_ids(load_released(tmp_path / "rel", device="meta")[1])
    check_same_tokenizer(tok, str(tmp_path / "rel" / "tokenizer.json"), str(tmp_path / "rel" / "tokenizer.json"),
                         resume=False)
    # ... a copy of it given as --tokenizer is the same one; and the stage's saved tokenizer (which holds the token)
    # is the same as the released file given beside it, to load_model as to train.py
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "rel" / "tokenizer.json", tmp_path / "copy" / "tokenizer.json")
    given = recipe.TrainConfig(data=str(tmp_path / "data"), tokenizer=str(tmp_path / "copy" / "tokenizer.json"))
    assert stage_tokenizer(given, cfg, [str(tmp_path / "rel")]).same_ids(tok)
    (tmp_path / "stage1").mkdir()
    tok.save(tmp_path / "stage1")
    for folder, other in [("stage1", "rel"), ("rel", "stage1")]:
        assert pick_tokenizer(tmp_path / folder, tmp_path / other)[0].same_ids(tok)


def test_a_released_folder_of_the_same_layout_gives_every_tensor(tmp_path):
    # Its aligner fits (the same projector type) and its own neck_hd is kept, not replaced by a copy of the neck.
    released_folder(tmp_path / "rel", hybrid=True)
    donor, _, _ = load_released(tmp_path / "rel")
    model = DeepSeekVL(donor.cfg)
    report = init_from_parts(model, [tmp_path / "rel"])
    assert report[-1] == "freshly initialised: nothing"
    theirs = donor.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    assert not torch.equal(theirs["sam.neck_hd.0.weight"], theirs["sam.neck.0.weight"])
    # What the tensors do not show, said by its config.json: twice the heads of half the size, another RoPE base. The
    # weights loaded into this model would compute something else, and were taken without a word.
    config = json.loads((tmp_path / "rel" / "config.json").read_text())
    lang = config["language_config"]
    lang["num_attention_heads"], lang["rope_theta"] = 2 * donor.cfg.llm.n_heads, 5e5
    lang.pop("num_key_value_heads", None)
    (tmp_path / "rel" / "config.json").write_text(json.dumps(config))
    l = donor.cfg.llm
    with pytest.raises(ValueError, match=re.escape(
            f"settings its config.json gives, which its tensors' shapes do not show: llm.n_heads {2 * l.n_heads} "
            f"there, {l.n_heads} here, llm.n_kv_heads {2 * l.n_heads} there, {l.n_kv_heads} here, llm.rope_theta "
            f"500000.0 there, {l.rope_theta} here")):
        init_from_parts(DeepSeekVL(donor.cfg), [tmp_path / "rel"])


def test_train_starts_stage_1_from_pretrained_parts(parts, tmp_path):
    d = parts[0]
    data = tmp_path / "data"
    import prepare_data
    prepare_data.main(["--out", str(data), "--n", "4", "--workers", "1"])
    cmd = [sys.executable, "train.py", "--stage", "1", "--data", str(data), "--out", str(tmp_path / "out"),
           "--init_from", f"{d / 'sam_vit_b.pth'},{d / 'siglip.safetensors'},{d / 'llama'}", "--steps", "2",
           "--workers", "0", "--eval_limit", "5"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "starting from pretrained parts" in result.stdout and "an HF Llama" in result.stdout
    trained = torch.load(tmp_path / "out" / "stage1" / "model.pt", weights_only=True)["model"]
    llama_state = parts[3]
    assert torch.equal(trained["llm.layers.0.mlp.up_proj.weight"], llama_state["model.layers.0.mlp.up_proj.weight"])
    assert (tmp_path / "out" / "stage1" / "tokenizer.json").exists()


def test_a_nanovl_checkpoint_exports_from_the_command_line(folder, tmp_path, capsys):
    """model.pt + tokenizer.json (what train.py writes) -> `python -m nanovl.checkpoint --export` -> the same model."""
    from nanovl import checkpoint
    path, _ = folder
    model, tok, proc = load_released(path)
    stage = tmp_path / "stage3"
    stage.mkdir()
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict()}, stage / "model.pt")
    tok.save(stage / "tokenizer.json")
    with pytest.raises(SystemExit):  # (argparse's error: 0 would otherwise read as "no limit given", 5 GiB)
        checkpoint.main(["--ckpt", str(stage), "--export", str(tmp_path / "exported"), "--shard_gb", "0"])
    assert "--shard_gb must be above 0, got 0.0" in capsys.readouterr().err
    checkpoint.main(["--ckpt", str(stage), "--export", str(tmp_path / "exported"), "--dtype", "bf16", "--shard_gb",
                     "inf"])  # one file, however large
    assert "model.safetensors" in capsys.readouterr().out
    again, _, _ = load_model(tmp_path / "exported")
    assert again.dtype == torch.bfloat16  # kept as written; sample.py picks the dtype to run in
    assert all(torch.equal(v.to(torch.bfloat16), again.state_dict()[k]) for k, v in model.state_dict().items())


def test_eval_only_scores_a_released_model_on_a_folder_of_ones_own_questions(folder, tmp_path, capsys, monkeypatch):
    """train.py --eval-only on a released folder and a folder holding only eval_mc.jsonl and its images: the choices
    are those of the perplexities computed from the model's full logits, and no text line is printed."""
    import train
    from nanovl.data import Sample, collate
    from nanovl.synth import mc_prompt
    path, _ = folder
    model, tok, proc = load_released(path)
    bench = tmp_path / "bench"
    (bench / "images").mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(12):
        image = f"images/{i}.png"
        Image.fromarray((torch.rand(40, 30 + i, 3, generator=g) * 255).byte().numpy()).save(bench / image)
        options = ["red", "the blue one", "circle", "square"][:2 + i % 3]  # 2 to 4 options
        rows.append({"category": "colours" if i % 2 else "shapes", "images": [image], "question": f"which {i}?",
                     "options": options, "answer": i % len(options)})
    (bench / "eval_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    correct, expected = {"colours": 0, "shapes": 0}, []
    for row in rows:  # each option scored alone, from the full logits
        ppl = []
        for option in row["options"]:
            conv = [{"role": "user", "content": IMAGE_TAG + mc_prompt(row["question"], row["options"])},
                    {"role": "assistant", "content": option}]
            ids, targets, _ = collate([Sample(*render_chat(conv, tok, model.cfg.n_image_tokens), [])], tok.pad_id)
            logits, _ = model(ids, proc(str(bench / row["images"][0]))[None])
            ppl.append(F.cross_entropy(logits[0], targets[0], ignore_index=-100).item())
        correct[row["category"]] += min(range(len(ppl)), key=ppl.__getitem__) == row["answer"]
        expected += ppl
    # Not the choices alone (options this different in length may not need the image to be told apart): every
    # option's score, which each question's own image moves.
    import nanovl.evaluate
    scores, plain = [], nanovl.evaluate.sequence_nll

    def spy(model, ids, targets, device, **kw):
        nll = plain(model, ids, targets, device, **kw)
        scores.append((nll / (targets != -100).sum(1)).cpu())
        return nll

    monkeypatch.setattr(nanovl.evaluate, "sequence_nll", spy)
    train.main(["--eval-only", "--ckpt", str(path), "--data", str(bench)])
    assert torch.allclose(torch.cat(scores), torch.tensor(expected), atol=1e-5)
    printed = capsys.readouterr().out
    for category, n in correct.items():
        assert f"{category:<14}{6:>11}{100 * n / 6:>15.1f}%" in printed, (correct, printed)  # six questions each
    chance = 100 * (1 / 2 + 1 / 3 + 1 / 4) / 3  # each category has two questions of each size
    assert f"(chance {chance:.1f}%)" in printed and "bits per byte" not in printed
