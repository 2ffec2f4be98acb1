"""GenEval's detector: Mask2Former instance segmentation run as mmdet runs it at test time.

GenEval runs mmdet 2.x's Mask2Former Swin-S COCO model (`mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`).
mmdet does not install beside this torch, so the network is transformers'
`Mask2FormerForUniversalSegmentation`: by default with GenEval's own checkpoint converted
(`evaluation.mmdet_convert`), or facebook/mask2former-swin-small-coco-instance (the Mask2Former
authors' detectron2-trained Swin-S: the same architecture, other weights) -- wrapped in mmdet's
test-time steps:

    preprocess    resize keeping the aspect ratio to fit (1333, 800) (bilinear, rounded to uint8 as
                  cv2 does), pad right and bottom to a multiple of 32 with grey 128, then normalise
                  with ImageNet's mean and std (0-255) -- mmdet pads before it normalises
    postprocess   (MaskFormerFusionHead.instance_postprocess) class softmax without the no-object
                  class; the 100 best (query, class) pairs; each query's mask logits upsampled to the
                  padded input, cropped to the resized image, resized to the original (bilinear);
                  mask = logit > 0; score = class probability x mean sigmoid inside the mask;
                  box = the mask's tight box (x2 = last column + 1, mmdet's mask2bbox)

Out come per-class boxes (n, 5) [x1, y1, x2, y2, score] float32 and bool masks, mmdet's
`inference_detector` format, for `geneval.keep_confident`. A detector directory may carry
`geneval_detector.json` with another `test_scale` (the tiny offline detector runs at its native size).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stitchvm_rl.evaluation.geneval import CLASSNAMES

TEST_SCALE = (1333, 800)  # mmdet's (long edge, short edge) bound
SIZE_DIVISOR = 32
PAD_VALUE = 128.0
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MAX_PER_IMAGE = 100
SETTINGS_FILE = "geneval_detector.json"
# transformers' COCO label names where GenEval's object_names.txt renames a class (same index)
COCO_RENAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


def check_labels(id2label: dict[int, str]) -> None:
    """Refuse a detector whose classes are not COCO's 80 in COCO's order (GenEval's classes by index)."""
    names = [COCO_RENAMES.get(id2label[i], id2label[i]).replace("-", " ").lower() for i in range(len(id2label))]
    if len(names) != len(CLASSNAMES) or names != list(CLASSNAMES):
        wrong = [(i, a, b) for i, (a, b) in enumerate(zip(names, CLASSNAMES)) if a != b][:3]
        raise ValueError(f"the detector's {len(names)} classes are not COCO's 80 in order (first differences: {wrong}); GenEval needs a COCO instance model")


def rescaled_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.imrescale's (new h, new w): the largest factor fitting (long, short) into `scale`."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def preprocess(images: np.ndarray, scale: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, 3) uint8 -> (padded normalised pixels (B, 3, Hp, Wp), the resized (h, w) before padding)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    size = rescaled_size(*images.shape[1:3], scale)
    if size != tuple(images.shape[1:3]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
    pad_h, pad_w = (-size[0]) % SIZE_DIVISOR, (-size[1]) % SIZE_DIVISOR
    x = F.pad(x, (0, pad_w, 0, pad_h), value=PAD_VALUE)
    return (x - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1), size


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) tight boxes [x1, y1, x2 + 1, y2 + 1]; zeros for an empty mask (mmdet's mask2bbox)."""
    boxes = torch.zeros(len(masks), 4)
    cols, rows = masks.any(1), masks.any(2)
    for i in range(len(masks)):
        x, y = torch.where(cols[i])[0], torch.where(rows[i])[0]
        if len(x) and len(y):
            boxes[i] = torch.tensor([x[0], y[0], x[-1] + 1, y[-1] + 1], dtype=torch.float32)
    return boxes


def instance_results(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int], resized: tuple[int, int], original: tuple[int, int], max_per_image: int = MAX_PER_IMAGE) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """One image's (Q, C + 1) class and (Q, h, w) mask logits -> per-class boxes and masks, as mmdet's
    Mask2Former returns them. `padded` is the network input's size, `resized` the image's inside it."""
    num_classes = class_logits.shape[-1] - 1
    masks = F.interpolate(mask_logits[None].float(), size=padded, mode="bilinear", align_corners=False)[0]
    masks = F.interpolate(masks[None, :, : resized[0], : resized[1]], size=original, mode="bilinear", align_corners=False)[0]
    scores = F.softmax(class_logits.float(), dim=-1)[:, :-1]
    top_scores, top = scores.flatten().topk(min(max_per_image, scores.numel()), sorted=False)
    labels, queries = top % num_classes, top // num_classes
    masks = masks[queries]
    binary = (masks > 0).float()
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    boxes = torch.cat([mask_boxes(binary.bool()), (top_scores * mask_scores)[:, None]], dim=1).numpy()
    labels, binary = labels.numpy(), binary.bool().numpy()
    return [boxes[labels == c] for c in range(num_classes)], [list(binary[labels == c]) for c in range(num_classes)]


def published_config():
    """facebook/mask2former-swin-small-coco-instance's architecture: Swin-S (96, [2, 2, 18, 2], window
    7), 100 queries, 9 decoder layers (transformers counts 10), 6 deformable encoder layers, COCO's 80."""
    from transformers import Mask2FormerConfig, SwinConfig

    swin = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=swin, num_labels=len(CLASSNAMES), id2label=dict(enumerate(CLASSNAMES)), label2id={n: i for i, n in enumerate(CLASSNAMES)})


def test_scale_of(path: str | Path) -> tuple[int, int]:
    """The (long, short) bound a detector directory runs at: its geneval_detector.json's, else mmdet's."""
    settings = Path(path) / SETTINGS_FILE
    return tuple(json.loads(settings.read_text())["test_scale"]) if settings.is_file() else TEST_SCALE


class Mask2FormerDetector:
    """`detector(images uint8 (B, H, W, 3))` -> per image (per-class boxes, per-class masks)."""

    def __init__(self, model, test_scale: tuple[int, int] = TEST_SCALE):
        check_labels(model.config.id2label)
        self.model, self.test_scale = model.eval().requires_grad_(False), tuple(test_scale)

    @classmethod
    def from_pretrained(cls, source: str, device: str = "cpu") -> Mask2FormerDetector:
        from transformers import Mask2FormerForUniversalSegmentation

        from stitchvm_rl import zoo

        path = zoo.resolve(source)
        return cls(Mask2FormerForUniversalSegmentation.from_pretrained(path).to(device), test_scale_of(path))

    @torch.no_grad()
    def __call__(self, images: np.ndarray):
        """Yields each image's (per-class boxes, per-class masks); one image's 100 full-size masks at a time."""
        pixels, resized = preprocess(images, self.test_scale)
        out = self.model(pixel_values=pixels.to(self.model.device))
        padded, original = tuple(pixels.shape[-2:]), tuple(images.shape[1:3])
        for c, m in zip(out.class_queries_logits, out.masks_queries_logits):
            yield instance_results(c.cpu(), m.cpu(), padded, resized, original)


def save_tiny_detector(path: str | Path, image_size: int = 64) -> None:
    """A tiny random Mask2Former (Swin backbone) with COCO's 80 classes, run at `image_size` (its 32-group
    norms need a 2 x 2 map at stride 32): for tests and the toy world."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(0)
    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=swin, num_queries=20, hidden_dim=32, feature_size=32, mask_feature_size=32, encoder_layers=1, decoder_layers=2,
        num_attention_heads=2, dim_feedforward=64, encoder_feedforward_dim=64, num_labels=len(CLASSNAMES),
        id2label=dict(enumerate(CLASSNAMES)), label2id={n: i for i, n in enumerate(CLASSNAMES)},
    )
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    (Path(path) / SETTINGS_FILE).write_text(json.dumps({"test_scale": [image_size, image_size]}))
