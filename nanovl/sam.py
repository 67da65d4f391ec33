"""
SAM-B (ViTDet) at 1024: the high-resolution, fine-detail half of DeepSeek-VL's hybrid vision encoder (paper section
3.1). It is Segment Anything's ViT-B image encoder plus three DeepSeek additions (facts sheet section 1):

    pixels (B, 3, 1024, 1024)
      -> DeepSeek (1): in-tower normalisation with the CLIP mean and std (not SAM's ImageNet ones)
      -> patch embedding: 16x16 stride-16 conv, kept channels-last             (B, 64, 64, 768)
      -> + learned absolute position embedding
      -> 12 pre-norm blocks; blocks 2, 5, 8, 11 (0-based) attend globally over all 64x64 tokens, the others inside
         14x14 windows (ViTDet's design: attention over all 4,096 tokens in every block would cost too much, so most
         blocks look only inside their window, and the four global ones carry information between windows); every
         block adds decomposed relative-position terms to its attention logits (below)
      -> neck (detection's word for the layers between a backbone and its heads):
         1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d                          (B, 256, 64, 64)
      -> DeepSeek (2): bilinear upsample to 96x96 in fp32, two bias-free stride-2 convs (B, 1024, 24, 24): 96 = 24 x 4,
         so the two halvings land on SigLIP's 24x24 grid, and the aligner pairs the two towers token by token
      -> DeepSeek (3), "sam_hd": the same tail applied to the output of the *first* global block through its own
         neck (`neck_hd`), but the *shared* downsample convs, scaled by a learned scalar and added:
             F = D(up(neck(h_last))) + alpha * D(up(neck_hd(h_block2)))
      -> rearranged row-major to tokens                                        (B, 576, 1024)

Relative positions: a block's attention logit for a query and a key gains a term that depends on where the key lies
from the query (its offset), not on where either lies in the image. "Decomposed": rather than one learned vector for
each 2-D offset (dy, dx), one table of row offsets and one of column offsets, each dotted with the query and the two
added, q . R_h[dy] + q . R_w[dx] (Attention.forward).

The paper counts the upsample-and-downsample tail as part of the vision-language adaptor; nanovl trains it with the
aligner in stage 1, and both necks too, as the official freeze_high=False would (the paper does not say which of the
official flags DeepSeek trained with, facts section 11).

Parameter names are the checkpoint's: `blocks.N.attn.qkv`, `blocks.N.attn.rel_pos_h`, `blocks.N.mlp.lin1`,
`neck.0`, `neck_hd.3`, `downsamples.1`, `hd_alpha_downsamples`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovl.config import SAMConfig


def relative_index(size: int) -> torch.Tensor:
    """(size, size) table of i - j + size - 1: the row of rel_pos_* that query i uses for key j (MViTv2 / ViTDet).

    The official get_rel_pos also rescales coordinates and interpolates the table when the query and key sizes
    differ, or when the table was trained for another size. Neither happens here: the input size is fixed and the
    tables are built for exactly this size, so this is the whole of it.
    """
    coords = torch.arange(size, device="cpu")  # explicit: made for real even when the weights go on "meta"
    return coords[:, None] - coords[None, :] + (size - 1)


class Attention(nn.Module):
    """Multi-head attention over an (h, w) grid of tokens, with decomposed relative positions as an additive bias."""

    def __init__(self, width: int, n_heads: int, size: int):
        super().__init__()
        self.n_heads = n_heads
        head_dim = width // n_heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)  # [q | k | v], heads contiguous
        self.proj = nn.Linear(width, width, bias=True)
        # One row per relative offset -(size-1) .. (size-1), for rows (h) and columns (w) separately.
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.register_buffer("rel_index", relative_index(size), persistent=False)

    def forward(self, x):
        B, h, w, C = x.shape  # B counts windows too
        T, nh = h * w, self.n_heads  # T: the tokens of the window (or of the whole grid, in a global block)
        qkv = self.qkv(x).view(B, T, 3, nh, C // nh)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)

        # Decomposed relative positions: the logit of the query at cell (qy, qx) for the key at (ky, kx) gains
        # q . R_h[qy - ky] + q . R_w[qx - kx] (rel_index shifts the offsets to start at 0).
        # The official code uses the *unscaled* q here, while the content term uses q * hs^-0.5.
        r_h = self.rel_pos_h[self.rel_index]  # (h, h, hs): [query row, key row]
        r_w = self.rel_pos_w[self.rel_index]  # (w, w, hs)
        r_q = q.reshape(B, nh, h, w, -1)  # (B, nh, h, w, hs)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h)  # (B, nh, h, w, h_k)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w)  # (B, nh, h, w, w_k)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, T, T)  # (B, nh, h, w, h_k, w_k) -> T x T

        # softmax(q k^T / sqrt(hs) + bias) v: the same sum as the official (q * scale) @ k^T + rel terms. (A float
        # attn_mask is added to the logits; the decoder's boolean one instead says which keys each query sees.)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, nh, T, hs)
        x = x.transpose(1, 2).reshape(B, h, w, C)  # (B, h, w, C)
        return self.proj(x)


class MLPBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))  # exact GELU


def window_partition(x, ws: int):
    """(B, H, W, C) -> ((B * Hp/ws * Wp/ws, ws, ws, C) windows, (Hp, Wp) the padded size), zero-padding the bottom
    and right up to a multiple of ws: Hp/ws windows down, Wp/ws across.

    One reshape and permute, no loop over windows. The padded tokens are ordinary zeros *after norm1*, and the
    official code does not mask them as keys; we do the same, or the released weights would give other outputs.
    """
    B, H, W, C = x.shape
    pad_h, pad_w = (ws - H % ws) % ws, (ws - W % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, Hp/ws, Wp/ws, ws, ws, C)
    return x.reshape(-1, ws, ws, C), (Hp, Wp)


def window_unpartition(x, ws: int, padded_hw, hw):
    """Inverse of window_partition: (B * Hp/ws * Wp/ws, ws, ws, C) -> (B, H, W, C), cropping the padding off again."""
    (Hp, Wp), (H, W) = padded_hw, hw
    B = x.shape[0] // ((Hp // ws) * (Wp // ws))
    x = x.view(B, Hp // ws, Wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)  # (B, Hp/ws, ws, Wp/ws, ws, C)
    return x.reshape(B, Hp, Wp, -1)[:, :H, :W, :]


class Block(nn.Module):
    """Pre-norm ViT block; window_size 0 means global attention over the whole grid."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: float, window_size: int, grid: int):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, n_heads, size=window_size if window_size > 0 else grid)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLPBlock(width, int(width * mlp_ratio))

    def forward(self, x):  # x: (B, H, W, C)
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, padded_hw = window_partition(x, self.window_size)  # (B * windows, ws, ws, C)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded_hw, (H, W))  # (B, H, W, C)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, at each pixel separately (ConvNeXt / detectron2 style)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def make_neck(width: int, neck_dim: int) -> nn.Sequential:
    # Indices 0..3 are the checkpoint's key names (neck.0.weight, neck.1.bias, ...).
    return nn.Sequential(
        nn.Conv2d(width, neck_dim, kernel_size=1, bias=False),
        LayerNorm2d(neck_dim),
        nn.Conv2d(neck_dim, neck_dim, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(neck_dim),
    )


class SAM(nn.Module):
    """(B, 3, S, S) pixels -> (B, out_grid^2, out_dim) tokens; (B, 576, 1024) for the released SAM-B at 1024."""

    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Module()  # an empty holder, so the conv's keys are patch_embed.proj.*, as released
        self.patch_embed.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, cfg.width))
        self.blocks = nn.ModuleList([
            Block(cfg.width, cfg.n_heads, cfg.mlp_ratio, 0 if i in cfg.global_blocks else cfg.window_size, cfg.grid)
            for i in range(cfg.depth)])
        self.neck = make_neck(cfg.width, cfg.neck_dim)
        convs, c_in = [], cfg.neck_dim
        for c_out in cfg.downsample_dims:
            convs.append(nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False))
            c_in = c_out
        self.downsamples = nn.Sequential(*convs)  # no norm, no activation between or after (official)
        self.neck_hd = make_neck(cfg.width, cfg.neck_dim)  # the official deep copy of the neck: own weights
        self.hd_alpha_downsamples = nn.Parameter(torch.zeros(1))  # official init 0: the side path starts switched off
        if cfg.pixel_mean is not None:
            # device="cpu": constants are made for real even when the weights are built on "meta" (checkpoint.py)
            self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean, device="cpu").view(1, 3, 1, 1),
                                 persistent=False)
            self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std, device="cpu").view(1, 3, 1, 1),
                                 persistent=False)
        else:
            self.pixel_mean = self.pixel_std = None

    def trunk(self, x):
        """Pixels -> (output of the last block, output of the first global block), both (B, H, W, width)."""
        if self.pixel_mean is not None:
            x = (x - self.pixel_mean) / self.pixel_std
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C), channels-last as the official code
        x = x + self.pos_embed
        first_global = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if first_global is None and i in self.cfg.global_blocks:
                first_global = x
        return x, first_global

    def upsample_downsample(self, x):
        """(B, neck_dim, H, W) -> (B, out_dim, out_grid, out_grid). Upsampled in fp32, as the official code does."""
        size = self.cfg.upsample_size
        up = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)  # (B, C, size, size)
        return self.downsamples(up.to(x.dtype))  # two stride-2 convs, each halving the side: 96 -> 48 -> 24 released

    def forward(self, x):
        last, first_global = self.trunk(x)
        out = self.upsample_downsample(self.neck(last.permute(0, 3, 1, 2)))  # (B, out_dim, out_grid, out_grid)
        hd = self.upsample_downsample(self.neck_hd(first_global.permute(0, 3, 1, 2)))  # the same shape
        out = out + hd * self.hd_alpha_downsamples
        return out.flatten(2).transpose(1, 2)  # (B, out_grid^2, out_dim), row-major (h outer, w inner)
