"""
Stage 0: unimodal pretraining, for presets trained from scratch. DeepSeek-VL starts from a pretrained SigLIP, SAM and
DeepSeek-LLM (paper section 3.1); a scaled-down preset has none of those, so it first trains each part on its own:

    language model   next-token prediction on text (the ordinary LM loss, which Stage0Model computes with the others)
    SigLIP           the sigmoid image-text contrastive loss of SigLIP (Zhai et al. 2023), against a small text tower
                     that exists only for this stage: matching (image, caption) pairs are pushed to a positive logit,
                     every other pair in the batch to a negative one, each pair an independent binary decision.
                     Every batch holds distinct captions (plan_distinct), so no other pair repeats a pair's caption;
                     a caption can still be true of another image ("Three shapes."): about 1% of the other pairs in
                     the tiny data's batches of 48 (counting counts and colours; over a third of the rows meet one).
                     The loss calls those negatives too, as SigLIP's does on its web pairs
    SAM              a dense objective, as SAM itself is trained on masks: a 1x1 conv on the neck's feature map predicts
                     each patch's label (background, or which coloured shape covers it) in the synthetic scenes

The heads and the text tower are thrown away after this stage; only the encoders and the language model go on.
Stage0Batches gives each micro-batch all three kinds of data, and Stage0Model computes the three losses in one
forward, so that train.py trains stage 0 with the loop of the other stages.
"""

import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from nanovl.config import LlamaConfig, VLConfig
from nanovl.data import PlannedBatches, epochs, hash_chunks, plan_digest
from nanovl.image import upright_size
from nanovl.llama import Llama
from nanovl.model import DeepSeekVL
from nanovl.synth import SEG_LABELS

N_SEG_CLASSES = 1 + len(SEG_LABELS)  # the label maps: 0 is the background, then one class per coloured shape
# A row of stage0.jsonl (train.py's check_stage0_rows quotes this when it refuses one).
STAGE0_ROW = '{"image": path, "caption": "...", "seg": path of its label map, or null}'


class Stage0Heads(nn.Module):
    def __init__(self, cfg: VLConfig, n_seg_classes: int, embed_dim: int = 128):
        super().__init__()
        # The text tower: a small causal transformer over the caption, averaged over its tokens (see below).
        # (Our decoder with lm_head replaced by a projection into the shared embedding space.) The heads keep
        # PyTorch's default initialisation: DeepSeekVL's GPT-2 init covers the model, and these are not part of it.
        width = max(64, cfg.siglip.width // 2)
        text = LlamaConfig(vocab_size=cfg.llm.vocab_size, dim=width, n_layers=2, n_heads=max(1, width // 32),
                           n_kv_heads=max(1, width // 32), ffn_dim=width * 8 // 3, max_seq_len=cfg.llm.max_seq_len)
        self.text_tower = Llama(text)
        self.text_tower.lm_head = nn.Linear(width, embed_dim, bias=False)
        self.image_proj = nn.Linear(cfg.siglip.width, embed_dim, bias=False)  # on the mean of SigLIP's tokens
        # SigLIP's learned temperature and bias. The SigLIP paper (Zhai et al. 2023, arXiv 2303.15343) starts at t = 10,
        # b = -10, tuned for batches of 32k pairs where negatives outnumber positives 32k to 1. With our batches of tens
        # of pairs, b = -10 would hold every logit below zero until t had grown, stalling a short run. b = -5 is of the
        # order of -log(batch) (-3.9 for the default 48 pairs), the log-odds that a pair drawn from the batch is a
        # match.
        self.log_t = nn.Parameter(torch.tensor(float(np.log(10.0))))
        self.bias = nn.Parameter(torch.tensor(-5.0))
        self.seg_head = nn.Conv2d(cfg.sam.neck_dim, n_seg_classes, kernel_size=1) if cfg.hybrid else None

    def contrastive_loss(self, model, images, caption_ids, caption_len):
        """SigLIP's sigmoid loss on a batch of (image, caption) pairs with distinct captions: images (B, 3, s, s) at
        SigLIP's resolution (the data worker makes them as the model would, image.low_resolution of the canvas);
        caption_ids right-padded (B, L). Both sides are pooled by averaging (big_vision's pool_type="gap"; the
        released SigLIP pools its image tokens with an attention head, attn_pool, which DeepSeek-VL never calls and
        nanovl does not build): a caption here differs from the others in one or two words (the colour, the
        title), and a mean over its tokens carries those words from the first step, where the last token of a fresh
        causal tower would first have to learn to gather them (it did: the tower learned the facts far more slowly
        that way)."""
        features = model.siglip(images)  # (B, T, C)
        img = F.normalize(self.image_proj(features.mean(dim=1)), dim=-1)  # (B, E)
        hidden, _ = self.text_tower(caption_ids, check_ids=False)  # (B, L, E): the projection of every position
        # (B, L): 1 on each caption's tokens, 0 on its padding
        real = (torch.arange(caption_ids.shape[1], device=caption_ids.device) < caption_len[:, None]).to(hidden.dtype)
        txt = F.normalize((hidden * real[..., None]).sum(dim=1) / caption_len[:, None], dim=-1)  # (B, E)
        logits = img @ txt.T * self.log_t.exp() + self.bias  # (B, B)
        # +1 on the diagonal (matching pairs), -1 everywhere else (plan_distinct keeps a batch's captions distinct).
        labels = 2 * torch.eye(len(logits), device=logits.device) - 1
        return -F.logsigmoid(labels * logits).sum() / len(logits)

    def segmentation_loss(self, sam, images, labels):
        """Per-patch cross-entropy of a 1x1 conv on SAM's neck output; labels (B, g, g) class ids."""
        last, _ = sam.trunk(images)  # (B, g, g, width)
        logits = self.seg_head(sam.neck(last.permute(0, 3, 1, 2)))  # (B, classes, g, g)
        return F.cross_entropy(logits, labels)


def seg_labels(path: str, processor, grid: int, n_classes: int, image_path: str = "") -> torch.Tensor:
    """A label map through the same resize-and-pad as its image (nearest, never blending labels), then down to the
    patch grid: (grid, grid) long tensor, 0 (background) in the padding. It must be a greyscale image whose pixels are
    class ids below n_classes (the segmentation head's outputs), of the size of its image (at image_path, when given)
    as the model sees it, upright (a photo's EXIF orientation applied): another picture given as a label map is
    refused here, by name, not deep in the loss or shifted against its image."""
    try:
        with Image.open(path) as img:
            if img.mode != "L":  # (a palette or colour image converted to grey would give luminances, not ids)
                raise ValueError(f"label map {path} is a {img.mode} image; expected greyscale (mode L) class ids")
            if image_path:
                with Image.open(image_path) as image:  # (the header only: its size, upright)
                    size = upright_size(image)
                if img.size != size:
                    raise ValueError(f"label map {path} is {img.size[0]}x{img.size[1]} but its image is {size[0]}x"
                                     f"{size[1]}: padded to a square, its labels would be shifted against it")
            canvas = processor.canvas(img, Image.Resampling.NEAREST, fill=0)
    except FileNotFoundError:
        raise ValueError(f"label map {path} does not exist") from None
    except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read label map {path}: {e}") from None
    top = int(np.asarray(canvas).max())
    if top >= n_classes:
        raise ValueError(f"label map {path} holds label {top}, but the labels are 0 to {n_classes - 1} (a greyscale "
                         "image whose pixels are class ids)")
    small = canvas.resize((grid, grid), Image.Resampling.NEAREST)  # the label at each patch's centre
    return torch.from_numpy(np.asarray(small, dtype=np.int64).copy())


def plan_distinct(captions, batch: int, steps: int, seed: int):
    """For each step: ("pairs", batch row indices whose captions are all different), in the format of
    data.plan_batches. Rows come from a new seeded permutation each epoch (data.epochs); a row whose caption is
    already in the batch is skipped for this epoch. Our captions state one fact each and repeat a lot ("A web page
    with a blue button." on a fifth of the pages); in a batch of random rows, most negatives would then be other
    categories, told apart by layout alone, and repeats would be no signal at all. A batch of distinct captions puts
    the colours, titles and sign words side by side, which is what the tower has to learn to tell apart."""
    n_distinct = len(set(captions))
    if batch > n_distinct:
        raise ValueError(f"a contrastive batch of {batch} distinct captions, but the data has only {n_distinct} "
                         "different captions; lower --clip_batch")
    stream, plan = epochs(len(captions), f"{seed}-pairs"), []
    for _ in range(steps):
        picked, seen = [], set()
        while len(picked) < batch:
            i = next(stream)
            if captions[i] not in seen:
                seen.add(captions[i])
                picked.append(i)
        plan.append(("pairs", picked))
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# What train.py runs: the stage's micro-batches, and the model with its heads as one module (one DDP module).

class Stage0Batches(Dataset):
    """Stage 0 micro-batches: text for the language model, (image, caption) pairs for SigLIP, scenes and their label
    maps for SAM, each from its own deterministic plan. Images are cheap next to text at this size, so the pair and
    scene streams have their own micro-batch sizes (a contrastive loss also wants many negatives per batch).

    The pairs only feed SigLIP, so their images come at SigLIP's resolution from pair_processor (a CachedProcessor
    with size=SigLIP's); the captions, a few dozen distinct sentences read thousands of times, are tokenized once."""

    def __init__(self, text: PlannedBatches, pairs, scenes, plan_pairs, plan_scenes, tok, processor, pair_processor,
                 cfg):
        self.text, self.pairs, self.scenes, self.proc, self.pair_proc = text, pairs, scenes, processor, pair_processor
        self.plan_pairs, self.plan_scenes, self.pad_id, self.cfg = plan_pairs, plan_scenes, tok.pad_id, cfg
        self.caption_ids = {c: [tok.bos_id] + tok.encode(c) + [tok.eos_id] for c in {r["caption"] for r in pairs}}

    def __len__(self):
        return len(self.text)

    def __getitem__(self, k):
        ids, targets, _ = self.text[k]
        # The pairs' and scenes' plans are one-stream plans, sliced per process and micro-batch as the text's is
        # (PlannedBatches.rows with another plan): each item gets its own share of the step's pairs and scenes.
        pairs = [self.pairs[i] for i in self.text.rows(k, self.plan_pairs)]
        caps = [self.caption_ids[r["caption"]] for r in pairs]
        cap_ids = torch.full((len(caps), max(map(len, caps))), self.pad_id, dtype=torch.long)
        for b, c in enumerate(caps):
            cap_ids[b, :len(c)] = torch.tensor(c)
        batch = {"ids": ids, "targets": targets, "cap_ids": cap_ids, "cap_len": torch.tensor([len(c) for c in caps]),
                 "pair_images": torch.stack([self.read(r, "image", self.pair_proc) for r in pairs])}
        if self.scenes:
            scenes = [self.scenes[i] for i in self.text.rows(k, self.plan_scenes)]
            batch["seg_images"] = torch.stack([self.read(r, "image", self.proc) for r in scenes])
            labels = lambda r: self.read(r, "seg", lambda path: seg_labels(  # checked against the size of its image
                path, self.proc, self.cfg.sam.grid, N_SEG_CLASSES, os.path.join(r["_root"], r["image"])))
            batch["seg_labels"] = torch.stack([labels(r) for r in scenes])
        return batch

    def fingerprint(self) -> dict:
        """As PlannedBatches.fingerprint, with the image-caption pairs and the scenes as two more sources (their
        rows' files and captions) and their plans in the plan's digest."""
        rows = lambda rs: [len(rs), hash_chunks(json.dumps([r["image"], r["caption"], r.get("seg")]).encode()
                                                for r in rs)]
        text = self.text.fingerprint()
        return {"sources": {**text["sources"], "pairs": rows(self.pairs), "scenes": rows(self.scenes)},
                "plan": plan_digest(self.text.plan + self.plan_pairs + self.plan_scenes)}

    @staticmethod
    def read(row, key, reader):
        """reader(the row's file under key); a file that cannot be read is an error naming the row, as in stages 1-3."""
        try:
            return reader(os.path.join(row["_root"], row[key]))
        except ValueError as e:
            raise ValueError(f"{row['_where']}: {e}") from None


class Stage0Model(nn.Module):
    """The VLM's parts plus the stage-0 heads, with one forward that returns the three losses, so DDP sees a single
    module: the language model's (summed over the batch's supervised tokens with reduction="sum": train_step divides
    by the step's count), then SigLIP's contrastive and SAM's segmentation losses added together (each already a mean
    within the micro-batch), and those two apart for the log."""

    def __init__(self, model: DeepSeekVL, heads: Stage0Heads):
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, batch, reduction="sum"):
        _, lm = self.model.llm(batch["ids"], targets=batch["targets"], reduction=reduction, check_ids=False)
        clip = self.heads.contrastive_loss(self.model, batch["pair_images"], batch["cap_ids"], batch["cap_len"])
        seg = self.heads.segmentation_loss(self.model.sam, batch["seg_images"], batch["seg_labels"]) \
            if "seg_images" in batch else torch.zeros((), device=lm.device)
        return lm, clip + seg, {"clip": clip.detach(), "seg": seg.detach()}
