"""
The vision-language adaptor ("aligner", `MlpProjector` in the official projector.py; paper section 3.1, facts
section 4). It maps vision features into the language model's embedding space, one vector per image token.
Shapes: N images, n tokens each (576 in the released models), as in model.py.

mlp_gelu (released 1.3B, SigLIP only):
    low (N, n, c_low) -> Linear -> GELU -> Linear -> (N, n, d_model)           keys layers.0, layers.2

low_high_hybrid_split_mlp_gelu (released 7B and our hybrid presets):
    high (N, n, c_high) -> high_up_proj -> (N, n, d_model/2)  \
                                                                cat, high first -> (N, n, d_model)
    low  (N, n, c_low)  -> low_up_proj  -> (N, n, d_model/2)  /
    -> GELU -> Linear -> (N, n, d_model)                                       keys layers.1

This is the code's order, which the paper's "Vision-Language Adaptor" paragraph describes (two single-layer MLPs,
concatenation, one more MLP); an earlier sentence of the same section, concatenating the raw features into 576 x 2048
before any MLP, matches neither the code nor the weights. The paper also counts SAM's upsample and its two stride-2
convs as part of the adaptor: they live in sam.py, at the end of the tower, and train with this module in stage 1
(train.py). GELU is exact, every Linear has a bias, and there is no normalisation. A `depth` above
2 adds more (GELU, Linear) pairs, as the official class does.
"""

import torch
import torch.nn as nn

from nanovl.config import AlignerConfig


class Aligner(nn.Module):
    def __init__(self, cfg: AlignerConfig, low_dim: int, d_model: int, high_dim: int = 0):
        super().__init__()
        self.hybrid = cfg.projector_type == "low_high_hybrid_split_mlp_gelu"
        if self.hybrid:
            self.high_up_proj = nn.Linear(high_dim, d_model // 2)
            self.low_up_proj = nn.Linear(low_dim, d_model // 2)
            layers = []  # index 0 of the official Sequential is the GELU, so the Linear is layers.1
        else:
            layers = [nn.Linear(low_dim, d_model)]
        for _ in range(1, cfg.depth):
            layers += [nn.GELU(), nn.Linear(d_model, d_model)]
        self.layers = nn.Sequential(*layers)

    def forward(self, low, high=None):
        """low: SigLIP features (N, n, c_low); high: SAM features (N, n, c_high), hybrid only."""
        if self.hybrid:
            x = torch.cat([self.high_up_proj(high), self.low_up_proj(low)], dim=-1)  # (N, n, d_model), high first
        else:
            x = low
        return self.layers(x)  # (N, n, d_model)
