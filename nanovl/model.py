"""
The DeepSeek-VL vision-language model: vision tower(s) -> aligner -> LLaMA decoder (paper section 3.1, Figure 3;
official modeling_vlm.py and clip_encoder.py, facts sheet sections 3 and 9).

    images (N, 3, S, S), the padded square canvases from the image processor, all images of the batch in order
      hybrid:   high = images                       -> SAM    -> (N, n, c_high)
                low  = bilinear antialiased resize  -> SigLIP -> (N, n, c_low)     (S -> SigLIP's size)
                aligner(low, high)                                -> (N, n, d_model)
      SigLIP-only (1.3B): aligner(SigLIP(images))                 -> (N, n, d_model)
    ids (B, T) with each image written as n consecutive <image_placeholder> ids (n = 576 for the released models)
      -> token embeddings, with the image-token positions overwritten by the image embeddings, in order
      -> Llama -> logits (B, T, vocab); given targets, the loss instead (the full logits are never made)

The low-resolution input is made from the *same* padded canvas as the high one, by torchvision's Resize(384,
antialias=True) in the official tower, which is F.interpolate(bilinear, antialias=True). Each branch then normalises
with its own mean and std inside its tower.

Parameter names: ours are `sam.*`, `siglip.*`, `aligner.*`, `llm.*`; below those prefixes every name is the released
checkpoint's. RELEASED_PREFIXES, at the end of this file, is the whole mapping.
"""

import copy
import math
from typing import Optional

import torch
import torch.nn as nn

from nanovl.aligner import Aligner
from nanovl.config import VLConfig
from nanovl.image import low_resolution
from nanovl.llama import KVCache, Llama, bad_token_count, check_token_ids
from nanovl.sam import SAM
from nanovl.siglip import SigLIP


class DeepSeekVL(nn.Module):
    def __init__(self, cfg: VLConfig):
        super().__init__()
        if not isinstance(cfg, VLConfig):
            raise ValueError(f"expected a VLConfig (get_config('tiny'), say), got {type(cfg).__name__}")
        # A copy of its own: the caller's, edited for a second model, changed this one's too (its cache had the
        # other's layers, and an export wrote a config its weights do not match)
        cfg = copy.deepcopy(cfg)
        self.cfg = cfg.validate()
        self.siglip = SigLIP(cfg.siglip)
        self.sam = SAM(cfg.sam) if cfg.hybrid else None
        self.aligner = Aligner(cfg.aligner, low_dim=cfg.siglip.width, d_model=cfg.llm.dim,
                               high_dim=cfg.sam.out_dim if cfg.hybrid else 0)
        self.llm = Llama(cfg.llm)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # For training from scratch (the scaled-down presets); released weights overwrite all of this.
        # GPT-2 style: N(0, 0.02) for linear layers and embeddings; convolutions and norms keep PyTorch's defaults.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, (SigLIP, SAM)):
            nn.init.trunc_normal_(module.pos_embed, std=0.02)
        # The projections that write into the decoder's residual stream are scaled down by sqrt(2 * n_layers), so
        # the stream's variance does not grow with depth (GPT-2, section 2.3). (Module.apply visits the children
        # before their parent, so this comes after, and overrides, these Linears' init above.)
        elif isinstance(module, Llama):
            for layer in module.layers:
                for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
                    nn.init.normal_(w, std=0.02 / math.sqrt(2 * len(module.layers)))

    @property
    def dtype(self):
        return self.llm.embed_tokens.weight.dtype

    def encode_images(self, images, check: bool = True):
        """(N, 3, S, S) canvases -> (N, n_image_tokens, d_model) embeddings in the language model's space. check: refuse
        pixels that are NaN or infinite, or outside what the image processor makes (as forward does), at the cost of
        one device sync; forward, which has checked them already (or was asked not to), passes False."""
        S = self.cfg.image_size
        if not torch.is_tensor(images):
            raise ValueError(f"expected images as one tensor of shape (N, 3, {S}, {S}), got {type(images).__name__} "
                             "(torch.stack a list of processed images)")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != S or images.shape[3] != S:
            raise ValueError(f"expected images of shape (N, 3, {S}, {S}) for the {self.cfg.name!r} model, got "
                             f"{tuple(images.shape)}; the image processor pads and resizes to {S}x{S} RGB")
        if not images.is_floating_point():  # uint8 pixels (read_image, np.array(pil)) would pass as 0-255 "floats"
            raise ValueError(f"expected float pixels in [0, 1], as the image processor makes them, got {images.dtype}"
                             " (divide uint8 pixels by 255, or use nanovl.image.ImageProcessor)")
        if check:
            refuse_pixels(images, "images", *torch.stack(pixel_counts(images)).tolist())
        if not images.shape[0]:  # (no image: the towers would fail on an empty batch)
            return images.new_zeros(0, self.cfg.n_image_tokens, self.cfg.llm.dim, dtype=self.dtype)
        images = images.to(self.dtype)
        if self.sam is None:
            return self.aligner(self.siglip(images))  # (N, n, d_model)
        # SigLIP reads the canvas resized to its 384 x 384, SAM the canvas itself (1024 x 1024): the aligner takes
        # (low, high) and puts SAM's half first
        return self.aligner(self.siglip(self.siglip_input(images)), self.sam(images))  # (N, n, d_model)

    def siglip_input(self, images):
        """SigLIP's input: the canvas itself, or for the hybrid its bilinear antialiased resize to SigLIP's size."""
        return images if self.sam is None else low_resolution(images, self.cfg.siglip.image_size)

    def forward(self, ids, images=None, targets=None, cache: Optional[KVCache] = None, pad_mask=None, doc_ids=None,
                reduction: str = "mean", last_only: bool = False, image_embeds=None, check_inputs: bool = True):
        """
        ids (B, T): token ids, each image written as cfg.n_image_tokens copies of cfg.image_token_id.
        images (N, 3, S, S) or None: the images of all rows, in the order their spans appear (row by row).
        image_embeds (N, n, d_model) or None: instead of images, what encode_images made of them, so that rows sharing
            an image encode it once (the multiple-choice evaluation asks one question with four answers).
        targets, cache, pad_mask, doc_ids, reduction, last_only: as Llama.forward.
        check_inputs: check the ids, spans and pixels against each other and the vocabulary (below), which reads a few
            counts back from the device; train.py, whose batches its own data code made and checked, passes False to
            keep its steps free of device syncs (no read-back in the training hot path).
        Returns (logits (B, T, vocab), None) without targets ((B, 1, vocab) with last_only), and (None, loss) with
        them: the mean cross-entropy over the supervised tokens, their sum with reduction="sum", each position's (B, T)
        with reduction="none" (0 where the target is -100). Training never makes the full logits (Llama.forward).
        """
        check_token_ids(ids, targets, pad_mask, self.cfg.llm.vocab_size, check_range=False, doc_ids=doc_ids)
        if images is not None and image_embeds is not None:
            raise ValueError("give images or image_embeds, not both")
        given = images if images is not None else image_embeds  # whichever of the two came, or None
        what = lambda v: f"shape {tuple(v.shape)}" if torch.is_tensor(v) else type(v).__name__
        if images is not None and not (torch.is_tensor(images) and images.ndim == 4):
            one = torch.is_tensor(images) and images.ndim == 3
            raise ValueError(f"expected images as one tensor of shape (N, 3, S, S), got {what(images)}" +
                             (" (one image needs a batch dimension: x[None])" if one else ""))
        if image_embeds is not None and not (torch.is_tensor(image_embeds) and image_embeds.ndim == 3):
            raise ValueError(f"expected image_embeds as one tensor of shape (N, n, C), got {what(image_embeds)}")
        self.llm.check_length(ids.shape[1], cache, ids.shape[0])  # fail before spending time on the images
        is_image = ids == self.cfg.image_token_id  # (B, T)
        if check_inputs:
            self.check_inputs(ids, targets, pad_mask, images, given, is_image)
        x = self.llm.embed_tokens(ids)  # (B, T, C); the image positions are overwritten below
        if given is not None and given.shape[0]:
            if image_embeds is None:
                image_embeds = self.encode_images(images, check=False)  # (N, n, d_model); checked above, or not asked
            elif image_embeds.shape[1:] != (self.cfg.n_image_tokens, self.cfg.llm.dim):
                raise ValueError(f"expected image_embeds of shape (N, {self.cfg.n_image_tokens}, {self.cfg.llm.dim}), "
                                 f"got {tuple(image_embeds.shape)}")
            # Ordered scatter, as the official prepare_inputs_embeds: the k-th image token gets the k-th embedding.
            # (Unchecked, a wrong count may raise or silently use the first embeddings: check_inputs=False is for
            # batches made right by construction.)
            x = x.masked_scatter(is_image[..., None], image_embeds.to(x.dtype))  # (B, T, C)
        return self.llm(embeds=x, targets=targets, cache=cache, pad_mask=pad_mask, doc_ids=doc_ids, reduction=reduction,
                        last_only=last_only)

    def check_inputs(self, ids, targets, pad_mask, images, given, is_image):
        """What must hold before anything runs: ids and targets in the vocabulary, image spans whole, one image per
        n_image_tokens placeholder tokens, pixels finite and in the processor's range. A ValueError saying what was
        expected and given."""
        per_image = self.cfg.n_image_tokens
        # Each span of image tokens must hold whole images (back-to-back images make one longer span). edge[j] is +1
        # where a span starts (position j is its first image token) and -1 where one has just ended (j is one past its
        # last); the length of the span that ends before j is j minus the latest span start at or before j.
        t = torch.arange(ids.shape[1] + 1, device=ids.device)
        zero = torch.zeros_like(is_image[:, :1], dtype=torch.int)  # (B, 1): no image token before or after the row
        edge = torch.diff(is_image.int(), dim=1, prepend=zero, append=zero)  # (B, T+1)
        span_start = torch.where(edge == 1, t, 0).cummax(dim=1).values  # (B, T+1)
        cut = (edge == -1) & ((t - span_start) % per_image != 0)  # (B, T+1): True where a cut span ends
        # Every count read back in one go: one device sync per forward, not one per check.
        # (Pixels that are NaN or inf would run through every layer and come out as a confident-looking answer. So
        # would pixels of 0-255. The processor makes them in [0, 1] where the towers normalise them (the hybrid's, or
        # a SigLIP given pixel_mean), else normalised by its mean and std: [-1, 1] for the released 1.3B (mean = std
        # = 0.5), about [-1.8, 2.2] with CLIP's statistics (the official processor class's default). The bounds take
        # any of those, and a resize that overshoots a little, as bicubic ones do.)
        none = torch.zeros((), dtype=torch.long, device=ids.device)
        floats = given is not None and given.is_floating_point()
        not_finite, out_of_range = pixel_counts(given) if floats else (none, none)
        if images is None:  # (image_embeds: only their finiteness is asked)
            out_of_range = none
        n_tok, n_cut, n_bad, n_nan, n_out = torch.stack([is_image.sum(), cut.sum(), bad_token_count(
            ids, targets, self.cfg.llm.vocab_size), not_finite.to(ids.device), out_of_range.to(ids.device)]).tolist()
        if n_bad:
            check_token_ids(ids, targets, pad_mask, self.cfg.llm.vocab_size)  # raises, naming what is out of range
        refuse_pixels(given, "images" if images is not None else "image_embeds", n_nan, n_out)
        n_given = 0 if given is None else given.shape[0]
        if n_cut:
            raise ValueError(f"{n_cut} span(s) of <image_placeholder> tokens are not whole images of {per_image} "
                             f"each: an image span was cut or split (expand each placeholder to {per_image} tokens "
                             "in one run, and keep spans whole)")
        if n_tok // per_image != n_given:
            raise ValueError(f"expected {n_tok // per_image} images for {n_tok} <image_placeholder> tokens (each "
                             f"image fills {per_image}), got {n_given}; give one image per {per_image} placeholder "
                             "tokens, in order")


def pixel_counts(x):
    """(values of x that are NaN or infinite, values outside [-4, 4]): 0-d tensors on x's device, read back by the
    caller with its other counts in one sync. The bounds are those of DeepSeekVL.check_inputs' comment."""
    return (~torch.isfinite(x)).sum(), ((x < -4) | (x > 4)).sum()


def refuse_pixels(given, name: str, n_nan: int, n_out: int):
    """The ValueError for images (or image_embeds) holding n_nan values that are NaN or infinite, or images holding
    n_out pixels outside what the image processor makes (DeepSeekVL.check_inputs says why those bounds)."""
    if n_nan:
        raise ValueError(f"{name} hold {n_nan} values that are NaN or infinite, of {given.numel()}; expected finite "
                         "numbers")
    if n_out:
        raise ValueError(f"expected pixels as the image processor makes them (in [0, 1], or normalised by its mean "
                         f"and std), got values from {given.min().item():.3g} to {given.max().item():.3g} "
                         "(pixels of 0-255? use nanovl.image.ImageProcessor.for_config(model.cfg))")


def count_params(model) -> dict:
    """Parameters per top-level part and in total, of a model or of the one a VLConfig describes (built on the meta
    device, shapes only: the 7B is counted in a moment, with nothing allocated)."""
    if isinstance(model, VLConfig):
        with torch.device("meta"):
            model = DeepSeekVL(model)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"expected a model (nn.Module) or its VLConfig, got {type(model).__name__}")
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# The released checkpoints' key names, which checkpoint.py loads and exports with.
# Released checkpoint key prefix -> nanovl prefix (facts sheet section 7). The rest of each key is identical.
RELEASED_PREFIXES = (
    ("vision_model.vision_tower_high.vision_tower.", "sam."),  # 7B: SAM-B
    ("vision_model.vision_tower_low.vision_tower.", "siglip."),  # 7B: SigLIP-L
    ("vision_model.vision_tower.", "siglip."),  # 1.3B: SigLIP-L is the only tower
    ("aligner.", "aligner."),
    ("language_model.model.", "llm."),
    ("language_model.lm_head.", "llm.lm_head."),
)
# Keys the official model builds but never reads, skipped where a released file holds them: SigLIP's attention-pooling
# head (built, never called; its keys probably in the files), the hybrid tower's two LayerNorms (built, never used in
# forward; whether the 7B's files hold them is unconfirmed, facts section 7) and HF's cached RoPE frequencies.
RELEASED_UNUSED = (".attn_pool.", "vision_model.high_layer_norm.", "vision_model.low_layer_norm.",
                   "rotary_emb.inv_freq")


def released_to_nanovl(key: str) -> Optional[str]:
    """Name of our parameter for a released checkpoint key; None for a key known to be unused."""
    if any(u in key for u in RELEASED_UNUSED):
        return None
    for theirs, ours in RELEASED_PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    raise ValueError(f"unknown key {key!r} in a released DeepSeek-VL checkpoint; known prefixes are "
                     f"{[p for p, _ in RELEASED_PREFIXES]}")


def nanovl_to_released(name: str, hybrid: bool) -> str:
    """The inverse: the released key for one of our parameter names (SigLIP's prefix depends on the layout)."""
    for theirs, ours in RELEASED_PREFIXES:
        if name.startswith(ours) and not (ours == "siglip." and hybrid != ("_low" in theirs)):
            if ours == "llm." and name.startswith("llm.lm_head."):
                continue  # lm_head sits outside `model.` in HF's layout
            return theirs + name[len(ours):]
    raise ValueError(f"parameter {name!r} has no released name")
