"""Stage 0's losses written out from their papers (SigLIP's sigmoid loss, a per-patch cross-entropy) and its label
maps, against nanovl/stage0.py."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nanovl import DeepSeekVL, get_config
from nanovl.image import ImageProcessor, load_image
from nanovl.stage0 import Stage0Heads, seg_labels


def test_contrastive_loss_is_siglips_sigmoid_loss_over_real_caption_tokens():
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model, heads = DeepSeekVL(cfg).eval(), Stage0Heads(cfg, n_seg_classes=5).eval()
    with torch.no_grad():  # a temperature and bias other than the start, so that both must be used as written
        heads.log_t.fill_(math.log(3.0))
        heads.bias.fill_(-2.0)
    images = torch.rand(3, 3, cfg.siglip.image_size, cfg.siglip.image_size)
    captions = [[1, 40, 41, 42, 43, 2], [1, 50, 51, 52, 2], [1, 60, 2]]  # of different lengths
    ids = torch.full((3, 6), 0, dtype=torch.long)
    for b, c in enumerate(captions):
        ids[b, :len(c)] = torch.tensor(c)
        ids[b, len(c):] = 77  # padding: any id, never read
    with torch.no_grad():
        got = heads.contrastive_loss(model, images, ids, torch.tensor([len(c) for c in captions]))
        # Both towers pooled by averaging: SigLIP over its patch tokens, the text tower over each caption alone.
        img = F.normalize(heads.image_proj(model.siglip(images).mean(dim=1)), dim=-1)  # (B, E)
        txt = F.normalize(torch.cat([heads.text_tower(torch.tensor([c]))[0].mean(dim=1) for c in captions]), dim=-1)
        z = img @ txt.T * 3.0 - 2.0  # (B, B): t * cos + b
        # Zhai et al. 2023, eq. 1: -1/|B| sum_i sum_j log sigmoid(label_ij * z_ij), label +1 for a pair, -1 otherwise
        expected = -sum(F.logsigmoid(z[i, j] if i == j else -z[i, j]) for i in range(3) for j in range(3)) / 3
    assert torch.allclose(got, expected, atol=1e-6)


def test_the_contrastive_heads_start_where_the_docstring_says():
    # SigLIP's temperature starts at 10 (Zhai et al. 2023); the bias at -5, not the paper's -10, for batches of tens
    # of pairs (Stage0Heads says why); the text tower is half SigLIP's width, at least 64.
    for preset, width in (("tiny", 64), ("small", 192)):
        heads = Stage0Heads(get_config(preset), n_seg_classes=5)
        assert heads.log_t.exp().item() == pytest.approx(10.0) and heads.bias.item() == -5.0
        assert heads.text_tower.cfg.dim == width and heads.image_proj.in_features == get_config(preset).siglip.width


def test_segmentation_loss_is_a_per_patch_cross_entropy_on_the_neck():
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model, heads = DeepSeekVL(cfg).eval(), Stage0Heads(cfg, n_seg_classes=5).eval()
    g = cfg.sam.grid
    images = torch.rand(2, 3, cfg.sam.image_size, cfg.sam.image_size)
    labels = torch.zeros(2, g, g, dtype=torch.long)
    labels[:, : g // 2, : g // 4] = 3  # not symmetric: rows and columns must not be swapped
    labels[1, g - 2:, :] = 4
    with torch.no_grad():  # (trunk and neck, as written here, are checked against segment-anything in test_vision)
        last, _ = model.sam.trunk(images)  # (B, H, W, C), H the rows
        logits = heads.seg_head(model.sam.neck(last.permute(0, 3, 1, 2)))  # (B, classes, H, W)
        expected = F.cross_entropy(logits, labels)  # the mean over every patch of every image
        assert torch.allclose(heads.segmentation_loss(model.sam, images, labels), expected, atol=1e-6)
        assert not torch.allclose(F.cross_entropy(logits, labels.transpose(1, 2)), expected, atol=1e-3)


def test_label_maps_take_the_images_geometry_and_never_blend_labels(tmp_path):
    # A wide label map, its left half in stripes of 2 and 5 two pixels wide, its right half 5: the canvas pads it top
    # and bottom with 0 (background), and every step keeps whole labels (nearest), never a blend such as 3 or 4.
    labels = np.full((40, 120), 5, dtype=np.uint8)
    labels[:, :60] = np.where(np.arange(60) // 2 % 2, 5, 2)
    Image.fromarray(labels).save(tmp_path / "seg.png")
    grid = seg_labels(str(tmp_path / "seg.png"), ImageProcessor(image_size=96), grid=12, n_classes=6)
    assert grid.shape == (12, 12) and set(grid.unique().tolist()) == {0, 2, 5}
    assert grid[6, 6:].tolist() == [5] * 6 and 2 in grid[6, :6].tolist()
    assert grid[0].tolist() == [0] * 12 and grid[-1].tolist() == [0] * 12  # the padding
    with pytest.raises(ValueError, match="seg.png holds label 5, but the labels are 0 to 4"):  # not deep in the loss
        seg_labels(str(tmp_path / "seg.png"), ImageProcessor(image_size=96), grid=12, n_classes=5)
    Image.fromarray(labels).convert("RGB").save(tmp_path / "colour.png")  # made grey, it would hold luminances
    with pytest.raises(ValueError, match=r"colour.png is a RGB image; expected greyscale \(mode L\) class ids"):
        seg_labels(str(tmp_path / "colour.png"), ImageProcessor(image_size=96), grid=12, n_classes=6)


def test_a_label_map_is_drawn_over_the_picture_upright_as_the_model_sees_it(tmp_path):
    # A photo stored 64 x 32 with an EXIF orientation of 6 is seen upright, 32 x 64 (load_image turns it): its label
    # map is drawn over that, and lands on the same patches as the picture (the stored size was compared, so such a
    # map was refused and one drawn over the stored pixels taken, a quarter turn off).
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:, :32] = 255  # the left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    proc = ImageProcessor(image_size=96)
    upright = load_image(tmp_path / "photo.png")
    assert upright.size == (32, 64)
    white = (np.asarray(upright.convert("L")) > 128).astype(np.uint8)  # label 1 where the picture is white
    Image.fromarray(white).save(tmp_path / "labels.png")
    grid = seg_labels(str(tmp_path / "labels.png"), proc, grid=12, n_classes=2, image_path=str(tmp_path / "photo.png"))
    seen = np.asarray(proc.canvas(upright).convert("L").resize((12, 12), Image.Resampling.NEAREST)) > 128
    assert grid.tolist() == seen.astype(int).tolist() and 0 < grid.sum() < 144
    Image.fromarray(np.zeros((32, 64), dtype=np.uint8)).save(tmp_path / "stored.png")  # over the stored pixels
    with pytest.raises(ValueError, match="stored.png is 64x32 but its image is 32x64"):
        seg_labels(str(tmp_path / "stored.png"), proc, grid=12, n_classes=2, image_path=str(tmp_path / "photo.png"))


def test_contrastive_batches_hold_distinct_captions_planned_by_seed():
    from nanovl.stage0 import plan_distinct
    captions = ["a", "b", "a", "c", "b", "d"]  # four different captions in six rows
    plan = plan_distinct(captions, 4, 10, seed=0)
    assert all(name == "pairs" and sorted(captions[i] for i in rows) == ["a", "b", "c", "d"] for name, rows in plan)
    assert plan == plan_distinct(captions, 4, 10, seed=0) != plan_distinct(captions, 4, 10, seed=1)
    # Five distinct captions cannot be drawn from four, though there are six rows (the plan would look forever: the
    # alarm turns a return of that into a failure, not a suite that hangs).
    import signal

    def looked_forever(signum, frame):
        raise TimeoutError("plan_distinct looked for a fifth distinct caption among four")

    before = signal.signal(signal.SIGALRM, looked_forever)
    signal.alarm(10)
    try:
        with pytest.raises(ValueError, match="a contrastive batch of 5 distinct captions, but the data has only 4 "
                                             "different captions; lower --clip_batch"):
            plan_distinct(captions, 5, 1, seed=0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def test_each_stage0_micro_batch_reads_its_own_share_of_each_plan(tmp_path):
    from types import SimpleNamespace
    from nanovl.data import PlannedBatches, Sample
    from nanovl.stage0 import Stage0Batches
    cfg = get_config("tiny")
    proc = ImageProcessor.for_config(cfg)
    for i in range(6):  # image i is filled with grey 40 * i; its label map is all background
        Image.new("RGB", (8, 8), (40 * i,) * 3).save(tmp_path / f"{i}.png")
        Image.new("L", (8, 8)).save(tmp_path / f"{i}_seg.png")
    pairs = [{"image": f"{i}.png", "caption": f"caption {i % 5}" + "!" * (i % 3), "_root": str(tmp_path),
              "_where": f"line {i}"} for i in range(6)]  # (captions of different lengths: padding shows)
    scenes = [dict(pairs[i], seg=f"{i}_seg.png") for i in range(6)]
    tok = SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, encode=lambda text: [ord(c) for c in text])
    text = PlannedBatches([("language", [0, 1, 2, 3])] * 2, {"language": [Sample([5, 6, 7], [0, 1, 1], [])] * 4}, 0,
                          None, accum=2)
    plan_pairs = [("pairs", [0, 1, 2, 3]), ("pairs", [4, 5, 1, 0])]
    plan_scenes = [("scenes", [5, 4, 3, 2]), ("scenes", [1, 0, 3, 5])]
    low = lambda path: proc(path)[:, :4, :4]  # the pairs' processor (SigLIP's resolution in train.py)
    batches = Stage0Batches(text, pairs, scenes, plan_pairs, plan_scenes, tok, proc, low, cfg)
    assert len(batches) == 4  # two steps of two micro-batches
    for k in range(4):
        batch = batches[k]
        step, micro = divmod(k, 2)
        mine = slice(2 * micro, 2 * micro + 2)  # the micro-batch's half of the step's rows, in each plan
        assert torch.equal(batch["pair_images"], torch.stack([low(str(tmp_path / f"{i}.png"))
                                                               for i in plan_pairs[step][1][mine]]))
        assert torch.equal(batch["seg_images"], torch.stack([proc(str(tmp_path / f"{i}.png"))
                                                              for i in plan_scenes[step][1][mine]]))
        # Each caption as bos + its tokens + eos, right-padded; cap_len counts every one of its tokens.
        caps = [[1] + tok.encode(pairs[i]["caption"]) + [2] for i in plan_pairs[step][1][mine]]
        assert batch["cap_len"].tolist() == [len(c) for c in caps]
        for row, c in zip(batch["cap_ids"].tolist(), caps):  # (the loss averages the first cap_len positions)
            assert row == c + [tok.pad_id] * (len(row) - len(c))


def test_stage0_trains_on_the_sum_of_its_image_losses():
    from nanovl.stage0 import Stage0Model
    torch.manual_seed(0)
    cfg = get_config("tiny")
    net = Stage0Model(DeepSeekVL(cfg), Stage0Heads(cfg, n_seg_classes=5)).eval()
    g = cfg.sam.grid
    batch = {"ids": torch.tensor([[1, 5, 6]]), "targets": torch.tensor([[5, 6, -100]]),
             "pair_images": torch.rand(2, 3, cfg.siglip.image_size, cfg.siglip.image_size),
             "cap_ids": torch.tensor([[1, 7, 2], [1, 8, 2]]), "cap_len": torch.tensor([3, 3]),
             "seg_images": torch.rand(2, 3, cfg.sam.image_size, cfg.sam.image_size),
             "seg_labels": torch.randint(0, 5, (2, g, g))}
    with torch.no_grad():
        lm, images, parts = net(batch)
    assert parts["seg"] > 0 and parts["clip"] > 0 and torch.equal(images, parts["clip"] + parts["seg"])
