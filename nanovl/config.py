"""
Configuration: one dataclass per component, a VLConfig that holds them, and the named presets.

DeepSeek-VL (arXiv 2403.05525, section 3.1) is three parts glued together:

    image (B, 3, S, S) --> vision encoder(s) --> adaptor ("aligner") --> LLaMA-style decoder
                            SigLIP-L @ 384                                  reads image tokens in
                            (+ SAM-B @ 1024 for the hybrid)                 place of <image_placeholder>

The numbers of the released models are the official code's and configs' (deepseek-ai/DeepSeek-VL), as the project's
facts sheet collects them (our notes, not part of this repository, each fact traced to a public source, as the README's
paragraph "The facts sheet" says; comments cite its sections as "facts section N"). The presets:

    tiny         the hybrid architecture, shrunk so a forward+backward pass takes well under a second on a laptop CPU
    small        a scaled-down hybrid that one GPU trains in minutes
    1.3b         the released DeepSeek-VL-1.3B: SigLIP-L only, `mlp_gelu` aligner, 24-layer 2048-wide decoder
    1.3b-hybrid  the paper's hybrid encoder (SAM-B + SigLIP-L) and hybrid adaptor on the 1.3B decoder
    7b           the released DeepSeek-VL-7B: hybrid encoder, 30-layer 4096-wide decoder

Scaled-down presets keep the official geometry. In the released hybrid, SAM sees a 1024 canvas: 64x64 patches,
upsampled by 1.5 to 96x96, then two stride-2 convs give 24x24, which is exactly SigLIP's 384/16 grid. So both
branches give the same number of tokens, and the hybrid adaptor can concatenate them feature-wise. A preset is a
starting point: `get_config("tiny", **{"llm.n_layers": 2})` overrides any field.

The scaled-down presets have no pretrained parts to start from, so nanovl trains them from scratch with a "stage 0" of
its own before the paper's three stages: the decoder on text, SigLIP with a contrastive loss, SAM with a dense one
(train.py, nanovl/stage0.py). Comments that mention stage 0 mean that.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

# Pixel statistics. SigLIP was trained on [-1, 1] inputs (mean = std = 0.5). DeepSeek's SAM branch normalises with
# the CLIP statistics, not SAM's ImageNet ones (facts sheet section 1, last bullets).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class SigLIPConfig:
    """SigLIP-L/16 at 384 (facts section 2): a plain ViT of pre-LN blocks (no extra norm before the first block, timm's
    norm_pre), no class token, exact GELU, final LayerNorm."""
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    n_heads: int = 16
    mlp_ratio: float = 4.0
    # In-tower normalisation (the hybrid tower normalises each branch itself). None means the image processor has
    # already normalised, as for the released 1.3B model.
    pixel_mean: Optional[Tuple[float, float, float]] = SIGLIP_MEAN
    pixel_std: Optional[Tuple[float, float, float]] = SIGLIP_STD

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class SAMConfig:
    """SAM-B (ViTDet) at 1024 plus DeepSeek's upsample, downsample convs and neck_hd side path (facts section 1)."""
    image_size: int = 1024
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    n_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_blocks: Tuple[int, ...] = (2, 5, 8, 11)  # blocks with global attention; the rest are windowed
    neck_dim: int = 256
    downsample_dims: Tuple[int, ...] = (512, 1024)  # two bias-free stride-2 convs; the last is the output width
    pixel_mean: Optional[Tuple[float, float, float]] = CLIP_MEAN
    pixel_std: Optional[Tuple[float, float, float]] = CLIP_STD

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def upsample_size(self) -> int:
        # The official code hard-codes 96 for the 64x64 grid: a factor of 1.5. We keep the factor for smaller grids.
        return self.grid * 3 // 2

    @property
    def out_grid(self) -> int:
        return self.upsample_size // 2 ** len(self.downsample_dims)

    @property
    def out_dim(self) -> int:
        return self.downsample_dims[-1]


@dataclass
class AlignerConfig:
    """The vision-language adaptor, `MlpProjector` in the official code (facts section 4)."""
    # mlp_gelu: `depth` Linear layers with a GELU between each two. The hybrid type ("low_high_hybrid_split_mlp_gelu")
    # splits the first layer into two up-projections, SAM's (high) and SigLIP's (low), whose outputs are
    # concatenated, and needs a depth of at least 2 (the official class's layers.1 is its first Linear after them).
    projector_type: str = "mlp_gelu"
    depth: int = 2


# The largest llm.max_seq_len a config may ask for: the rotary tables are built for the whole context (2 x 2**20 x head
# size floats, 1 GiB at the released head size of 128), so a mistyped one is refused rather than allocated.
MAX_CONTEXT = 2 ** 20


@dataclass
class LlamaConfig:
    """The LLaMA-style decoder (facts section 5): RMSNorm pre-norm, RoPE, SwiGLU, untied lm_head."""
    vocab_size: int = 102400
    dim: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    n_kv_heads: int = 16  # fewer than n_heads gives grouped-query attention; the released models use full MHA
    ffn_dim: int = 5632
    # The released models were trained on 4096-token sequences (README of the official repo); their config says
    # max_position_embeddings 16384, which only bounds RoPE. We refuse sequences longer than max_seq_len.
    max_seq_len: int = 4096  # at most MAX_CONTEXT (above)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class VLConfig:
    """The whole model. `sam` is None for SigLIP-only models such as the released 1.3B."""
    name: str = "custom"
    siglip: SigLIPConfig = field(default_factory=SigLIPConfig)
    sam: Optional[SAMConfig] = None
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    llm: LlamaConfig = field(default_factory=LlamaConfig)
    image_token_id: int = 100015  # id of <image_placeholder> in the DeepSeek-LLM tokenizer (facts section 9)

    @property
    def hybrid(self) -> bool:
        return self.sam is not None

    @property
    def image_size(self) -> int:
        """Side of the square canvas the image processor makes: SAM's input for the hybrid, else SigLIP's."""
        return self.sam.image_size if self.hybrid else self.siglip.image_size

    @property
    def n_image_tokens(self) -> int:
        """How many language-model positions one image fills (576 for the released models)."""
        return self.siglip.grid ** 2

    def validate(self) -> "VLConfig":
        """Check that the parts fit together; raise ValueError saying what does not."""
        s, a, l = self.siglip, self.aligner, self.llm
        problems = self.type_problems()
        if problems:  # the checks below do arithmetic on the fields
            raise ValueError(f"invalid config {self.name!r}:\n  " + "\n  ".join(problems))
        if s.image_size % s.patch_size:
            problems.append(f"siglip.image_size {s.image_size} is not a multiple of siglip.patch_size {s.patch_size}")
        if s.width % s.n_heads:
            problems.append(f"siglip.width {s.width} is not divisible by siglip.n_heads {s.n_heads}")
        if l.dim % l.n_heads or l.n_heads % l.n_kv_heads:
            problems.append(f"llm.dim {l.dim}, n_heads {l.n_heads}, n_kv_heads {l.n_kv_heads}: need dim % n_heads == 0"
                            " and n_heads % n_kv_heads == 0")
        if l.head_dim % 2:
            problems.append(f"llm head size {l.head_dim} (dim {l.dim} / n_heads {l.n_heads}) must be even for rotary "
                            f"embeddings: give a dim divisible by 2 x n_heads ({2 * l.n_heads})")
        if l.max_seq_len > MAX_CONTEXT:  # (a typo would otherwise end in an allocation failure, or the OOM killer)
            problems.append(f"llm.max_seq_len {l.max_seq_len} is above {MAX_CONTEXT:,}, the largest context nanovl "
                            "builds: the rotary tables are made for the whole context at once (DeepSeek-VL trains with "
                            "4096)")
        if not 0 <= self.image_token_id < l.vocab_size:
            problems.append(f"image_token_id {self.image_token_id} is outside the vocabulary (size {l.vocab_size})")
        if a.projector_type not in ("mlp_gelu", "low_high_hybrid_split_mlp_gelu"):
            problems.append(f"aligner.projector_type {a.projector_type!r} is not 'mlp_gelu' or "
                            "'low_high_hybrid_split_mlp_gelu'")
        if (a.projector_type == "low_high_hybrid_split_mlp_gelu") != self.hybrid:
            problems.append(f"aligner.projector_type {a.projector_type!r} does not fit " + (
                "a hybrid (SAM + SigLIP) encoder: the hybrid's is 'low_high_hybrid_split_mlp_gelu' (for a SigLIP-only "
                "model, as the 1.3B, also switch SAM off: sam=none)" if self.hybrid else
                "a SigLIP-only encoder: its adaptor is 'mlp_gelu' (aligner.projector_type=mlp_gelu, with sam=none)"))
        if a.depth < 1 or (self.hybrid and a.depth < 2):
            problems.append(f"aligner.depth {a.depth} is too small (at least 1, or 2 for the hybrid adaptor)")
        if self.hybrid:
            m = self.sam
            if m.image_size % m.patch_size or m.width % m.n_heads:
                problems.append(f"sam.image_size {m.image_size} / patch_size {m.patch_size} / width {m.width} / "
                                f"n_heads {m.n_heads} do not divide evenly")
            if m.grid % 2 or m.upsample_size % 2 ** len(m.downsample_dims):
                problems.append(f"sam grid {m.grid} upsampled to {m.upsample_size} is not divisible by "
                                f"{2 ** len(m.downsample_dims)} (one halving per downsample conv)")
            elif m.out_grid != s.grid:
                problems.append(f"SAM gives a {m.out_grid}x{m.out_grid} grid but SigLIP gives {s.grid}x{s.grid}; the "
                                "hybrid adaptor needs the same number of tokens from both (keep sam.image_size / "
                                "siglip.image_size = 8/3 at equal patch sizes, as 1024/384)")
            if any(not 0 <= i < m.depth for i in m.global_blocks) or not m.global_blocks:
                problems.append(f"sam.global_blocks {m.global_blocks} must be non-empty indices below sam.depth "
                                f"{m.depth} (the neck_hd side path reads the first global block)")
        for part, c in (("siglip", s), ("sam", self.sam)):
            if c is None:
                continue
            if (c.pixel_mean is None) != (c.pixel_std is None) or \
                    any(v is not None and len(v) != 3 for v in (c.pixel_mean, c.pixel_std)):
                problems.append(f"{part}.pixel_mean {c.pixel_mean} and pixel_std {c.pixel_std} must be three numbers "
                                "each (the tower normalises)" +
                                ("" if self.hybrid else " or both none (the image processor does)"))
            elif self.hybrid and c.pixel_mean is None:
                problems.append(f"{part}.pixel_mean is none, but a hybrid model normalises inside both towers (each "
                                "branch with its own statistics; the image processor only resizes and pads)")
        if problems:
            raise ValueError(f"invalid config {self.name!r}:\n  " + "\n  ".join(problems))
        return self

    def type_problems(self) -> list:
        """Each field whose value is not of its default's type (an int where a float is wanted will do), or is a size,
        rate or constant that is not a positive finite number, named: a config read from a hand-edited file or given
        on the command line can hold anything (a depth of -1 built an empty decoder; a zero std, NaN logits)."""
        problems = []
        for prefix, part, cls in (("", self, VLConfig), ("siglip.", self.siglip, SigLIPConfig),
                                  ("sam.", self.sam, SAMConfig), ("aligner.", self.aligner, AlignerConfig),
                                  ("llm.", self.llm, LlamaConfig)):
            if not isinstance(part, cls):
                if not (prefix == "sam." and part is None):
                    problems.append(f"{prefix[:-1]} is {part!r}, expected a {cls.__name__}")
                continue
            for f in dataclasses.fields(cls):
                value, want = getattr(part, f.name), type(f.default)
                is_part = f.default is dataclasses.MISSING or f.default is None  # checked above
                if is_part or (value is None and "Optional" in str(f.type)):  # pixel statistics may be None
                    continue
                number = isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON's true is no number
                if want is float:
                    ok = number  # an int will do where a float is wanted
                elif want is int:
                    ok = number and isinstance(value, int)
                else:
                    ok = isinstance(value, want)
                if not ok:
                    problems.append(f"{prefix}{f.name} is {value!r}, expected " +
                                    {"int": "an integer", "float": "a number", "str": "a string", "tuple": "a list"}
                                    .get(want.__name__, want.__name__))
                    continue
                # Every number of a config is a size, a count, a rate or a constant: finite and above 0 (an id, a
                # block index or a pixel mean may also be 0).
                zero = f.name in ("image_token_id", "global_blocks", "pixel_mean")
                whole = f.name in ("global_blocks", "downsample_dims")
                items = value if isinstance(value, tuple) else (value,) if number else ()
                if not all((isinstance(v, int) if whole else isinstance(v, (int, float))) and not isinstance(v, bool)
                           and math.isfinite(v) and (v >= 0 if zero else v > 0) for v in items):
                    many = isinstance(value, tuple)
                    problems.append(f"{prefix}{f.name} is {value!r}, expected " +
                                    ("integers" if whole else "finite numbers" if many else "an integer" if want is int
                                     else "a finite number") +
                                    (" of 0 or more" if zero else " above 0"))
        return problems

    # JSON round trip, so a checkpoint carries the exact config it was trained with.
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @staticmethod
    def differences(a: dict, b: dict) -> list:
        """[(field, a's value, b's value)] for each field on which two config dicts (to_dict's layout, or as JSON
        read them back) differ, by dotted name ("llm.n_layers"); [] when they describe the same model."""
        def fields(d, prefix=""):  # {"llm.n_layers": 4, ...}: the parts' fields one by one; the name is a label
            return {k: v for key, value in d.items() if key != "name"
                    for k, v in (fields(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
                                 ).items()}

        same_types = lambda d: json.loads(json.dumps(d))  # tuples as lists, as a config.json holds them
        a, b = fields(same_types(a)), fields(same_types(b))
        return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    @staticmethod
    def from_dict(d: dict) -> "VLConfig":
        if not isinstance(d, dict):
            raise ValueError(f"expected a model config as a dict of its fields, got {type(d).__name__}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(VLConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; expected some of {sorted(known)}")
        parts = {"siglip": SigLIPConfig, "sam": SAMConfig, "aligner": AlignerConfig, "llm": LlamaConfig}
        for key, cls in parts.items():
            if d.get(key) is not None:
                if not isinstance(d[key], dict):
                    raise ValueError(f"config field {key} is {d[key]!r}, expected an object of its fields")
                sub = dict(d[key])
                names = {f.name for f in dataclasses.fields(cls)}
                if set(sub) - names:
                    raise ValueError(f"unknown {key} config fields {sorted(set(sub) - names)}")
                for f in dataclasses.fields(cls):  # JSON turns tuples into lists
                    if isinstance(sub.get(f.name), list):
                        sub[f.name] = tuple(sub[f.name])
                d[key] = cls(**sub)
        return VLConfig(**d).validate()


# ---------------------------------------------------------------------------------------------------------------------
# Presets

def _tiny() -> VLConfig:
    # SigLIP: 96 px / 16 = 6x6 = 36 image tokens. SAM: 256 px / 16 = 16x16 grid -> 24x24 -> 12 -> 6: the same 36.
    # A 16x16 grid in windows of 6 needs padding to 18, so the tiny model exercises the official zero-padding too.
    return VLConfig(
        name="tiny",
        siglip=SigLIPConfig(image_size=96, patch_size=16, width=64, depth=2, n_heads=2),
        sam=SAMConfig(image_size=256, patch_size=16, width=64, depth=4, n_heads=2, window_size=6,
                      global_blocks=(1, 3), neck_dim=32, downsample_dims=(64, 64)),
        aligner=AlignerConfig("low_high_hybrid_split_mlp_gelu"),
        llm=LlamaConfig(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=352, max_seq_len=512),
        image_token_id=3,  # the scaled-down tokenizers put their special tokens at the start of the vocabulary
    )


def _small() -> VLConfig:
    # SigLIP: 192 px -> 12x12 = 144 image tokens. SAM: 512 px -> 32x32 -> 48x48 -> 24 -> 12.
    return VLConfig(
        name="small",
        siglip=SigLIPConfig(image_size=192, patch_size=16, width=384, depth=6, n_heads=6),
        sam=SAMConfig(image_size=512, patch_size=16, width=256, depth=6, n_heads=4, window_size=7,
                      global_blocks=(2, 5), neck_dim=128, downsample_dims=(256, 384)),
        aligner=AlignerConfig("low_high_hybrid_split_mlp_gelu"),
        llm=LlamaConfig(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1408,
                        max_seq_len=1024),
        image_token_id=3,
    )


def _released_13b() -> VLConfig:
    # The released 1.3B has no in-tower normalisation: its image processor normalises with mean = std = 0.5.
    return VLConfig(
        name="1.3b",
        siglip=SigLIPConfig(pixel_mean=None, pixel_std=None),
        sam=None,
        aligner=AlignerConfig("mlp_gelu"),
        llm=LlamaConfig(dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5632),
    )


def _hybrid_13b() -> VLConfig:
    return VLConfig(
        name="1.3b-hybrid",
        siglip=SigLIPConfig(),
        sam=SAMConfig(),
        aligner=AlignerConfig("low_high_hybrid_split_mlp_gelu"),
        llm=LlamaConfig(dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5632),
    )


def _released_7b() -> VLConfig:
    return VLConfig(
        name="7b",
        siglip=SigLIPConfig(),
        sam=SAMConfig(),
        aligner=AlignerConfig("low_high_hybrid_split_mlp_gelu"),
        llm=LlamaConfig(dim=4096, n_layers=30, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    )


PRESETS = {"tiny": _tiny, "small": _small, "1.3b": _released_13b, "1.3b-hybrid": _hybrid_13b, "7b": _released_7b}
# The presets trained from scratch on the synthetic corpus (stage 0 included), with a tokenizer prepare_data.py trains
# at their vocabulary size. The others have the released shapes: they start from pretrained parts and read
# DeepSeek-LLM's tokenizer, which comes with a released model folder.
FROM_SCRATCH = ("tiny", "small")


def _parse(value, current, name: str):
    """Turn a command-line string into the type of the field it overrides (int, float, str, tuple, None)."""
    if isinstance(value, list) and isinstance(current, tuple):
        return tuple(value)  # from Python: a list where the field holds a tuple, as JSON gives them too
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null"):
        return None
    try:
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            items = [v for v in value.strip("()[] ").split(",") if v.strip()]
            kind = type(current[0]) if current else int
            return tuple(kind(v) for v in items)
    except ValueError:
        raise ValueError(f"{name} expects a value like {current!r}, got {value!r}") from None
    return value


def get_config(name: str, /, **overrides) -> VLConfig:
    """A preset by name, with overrides given as dotted keys: get_config("tiny", **{"llm.dim": 256})."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if "name" in overrides:  # what the rest of nanovl knows the preset by (its data folder, its training recipe)
        raise ValueError(f"cannot override 'name': it names the preset, {name!r}; choose another preset instead")
    cfg = PRESETS[name]()
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part, None)
            if obj is None or not dataclasses.is_dataclass(obj):
                raise ValueError(f"cannot override {key!r}: {part!r} is not a config section of {name!r}")
        spec = {f.name: f for f in dataclasses.fields(obj)}.get(leaf)
        if spec is None:
            fields = ", ".join(f.name for f in dataclasses.fields(obj))
            raise ValueError(f"cannot override {key!r}: no field {leaf!r} (fields here: {fields})")
        # A field the preset leaves at None (the 1.3B's siglip.pixel_mean) is parsed as its class default's type.
        current = getattr(obj, leaf)
        like = spec.default if current is None and spec.default is not dataclasses.MISSING else current
        setattr(obj, leaf, _parse(value, like, key))
    return cfg.validate()
