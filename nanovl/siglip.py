"""
SigLIP-L/16 at 384: the low-resolution, semantic half of DeepSeek-VL's vision encoder (paper section 3.1).

It is a plain Vision Transformer in timm's layout (`vit_large_patch16_siglip_384`), used the way DeepSeek's
`siglip_vit.py` builds it (facts sheet section 2):

    pixels (B, 3, 384, 384)
      -> [optional in-tower normalisation to [-1, 1]]
      -> patch embedding: a 16x16 stride-16 conv          (B, 1024, 24, 24), flattened to (B, 576, 1024)
      -> + learned absolute position embedding            (no class token, no interpolation)
      -> 24 pre-norm blocks: x + attn(norm1(x)); x + mlp(norm2(x))
      -> final LayerNorm                                   (B, 576, 1024)

Two details differ from the SigLIP you may know, and both matter for the released weights:
- the MLP uses exact (erf) GELU, where SigLIP was trained with the tanh approximation; DeepSeek hard-codes nn.GELU;
- the tower returns the normalised patch tokens (timm's forward_features). The official model builds the
  attention-pooling head (`attn_pool.*`, its keys probably in the released files) but never runs it, so we do not
  build it (loading skips its keys: model.RELEASED_UNUSED).
Parameter names are timm's, which are also the checkpoint's (`blocks.N.attn.qkv`, `blocks.N.mlp.fc1`, ...).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovl.config import SigLIPConfig


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to `width` channels (one strided conv)."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x)  # (B, C, H, W) with H = W = image_size / patch_size


class Attention(nn.Module):
    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)  # rows laid out [q | k | v], heads contiguous in each
        self.proj = nn.Linear(width, width, bias=True)

    def forward(self, x):
        B, T, C = x.shape  # T: the image's patch tokens
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        x = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(hs), bidirectional
        x = x.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU, as DeepSeek's siglip_vit.py hard-codes


class Block(nn.Module):
    def __init__(self, width: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, n_heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class SigLIP(nn.Module):
    """(B, 3, S, S) pixels -> (B, (S/p)^2, width) patch features, row-major over the grid."""

    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2, cfg.width))
        self.blocks = nn.ModuleList([Block(cfg.width, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        # The hybrid tower normalises each branch inside the tower (torchvision Normalize in clip_encoder.py). These
        # are constants, not weights, so they stay out of the state dict; device="cpu" makes them for real even when
        # the weights are built on "meta" to be loaded from a checkpoint (checkpoint.py).
        if cfg.pixel_mean is not None:
            self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean, device="cpu").view(1, 3, 1, 1),
                                 persistent=False)
            self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std, device="cpu").view(1, 3, 1, 1),
                                 persistent=False)
        else:
            self.pixel_mean = self.pixel_std = None

    def forward(self, x):
        if self.pixel_mean is not None:
            x = (x - self.pixel_mean) / self.pixel_std
        x = self.patch_embed(x)  # (B, C, H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, T, C), T = H*W patch tokens in row-major order
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, T, C); DeepSeek keeps the final norm (timm's forward_features)
