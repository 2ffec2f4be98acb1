"""The GenEval scorer: the detector, the CLIP colour classifier and GenEval's decisions on saved images.

    image --Mask2FormerDetector--> per-class boxes and masks --keep_confident--> objects
          --evaluate (colours of masked crops: ColourClassifier)--> correct (1.0 / 0.0) and the reason

GenEval's colour classifier is open_clip's ViT-L-14 "openai" (= openai/clip-vit-large-patch14 in
transformers), its own eval transform (the torchvision pipeline of `scorers.torchvision_pixels`) on each
crop, and the three templates' normalised text embeddings averaged per colour (clip_benchmark's
zero-shot classifier). The official run classifies under CUDA fp16 autocast; here it is float32.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from stitchvm_rl import rewards, zoo
from stitchvm_rl.evaluation import geneval
from stitchvm_rl.evaluation.detector import Mask2FormerDetector
from stitchvm_rl.evaluation.scorers import torchvision_pixels


class ColourClassifier:
    """`colours(image, objects, classname)` -> a colour name per object (GenEval's color_classification)."""

    def __init__(self, clip: rewards.CLIPScore):
        self.clip = clip
        self._classifiers: dict[str, torch.Tensor] = {}

    def classifier(self, classname: str) -> torch.Tensor:
        """(10, D): per colour, the three templates' unit text embeddings averaged and renormalised."""
        if classname not in self._classifiers:
            rows = [self.clip.text_embeds([t.format(c=c, cls=classname) for t in geneval.COLOR_TEMPLATES]).mean(0) for c in geneval.COLORS]
            self._classifiers[classname] = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
        return self._classifiers[classname]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, objects: list, classname: str) -> list[str]:
        crops = [np.asarray(c) for c in geneval.colour_crops(image, objects)]
        b = self.clip.bundle
        pixels = torchvision_pixels(crops, b.image_size, b.image_mean.tolist(), b.image_std.tolist())
        logits = self.clip.pixel_embeds(pixels) @ self.classifier(classname).T
        return [geneval.COLORS[i] for i in logits.argmax(1).tolist()]


class GenEvalScorer:
    """`scorer(images uint8 (B, H, W, 3), prompts, metadata) -> (1.0 / 0.0 per image, reasons)`."""

    name = "geneval"

    def __init__(self, detector: Mask2FormerDetector, colours: ColourClassifier):
        self.detector, self.colours = detector, colours

    @classmethod
    def load(cls, detector_source: str, clip_source: str, device: str = "cpu") -> GenEvalScorer:
        detector = Mask2FormerDetector.from_pretrained(detector_source, device=device)
        clip = rewards.CLIPScore(zoo.load_clip(clip_source, device=device))
        return cls(detector, ColourClassifier(clip))

    def detections(self, images: np.ndarray, metadata: list[str | dict]):
        """Yields (image, its prompt's metadata, its kept detections) per image."""
        for image, meta, (boxes, masks) in zip(images, metadata, self.detector(images)):
            meta = json.loads(meta) if isinstance(meta, str) else meta
            if "include" not in meta:
                raise ValueError("the geneval scorer needs GenEval metadata (tag, include) with every prompt; evaluate suite=geneval or a .jsonl in its format")
            yield image, meta, geneval.keep_confident(boxes, masks, meta["tag"])

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[str | dict]) -> tuple[np.ndarray, list[str]]:
        scores, reasons = [], []
        for image, meta, kept in self.detections(images, metadata):
            correct, reason = geneval.evaluate(kept, meta, lambda found, cls, im=image: self.colours(im, found, cls))
            scores.append(float(correct))
            reasons.append(reason)
        return np.array(scores), reasons

    def partial_scores(self, images: np.ndarray, metadata: list[str | dict]) -> np.ndarray:
        """The training reward of Flow-GRPO and DiffusionNFT (`geneval.partial_score`) per image."""
        return np.array([geneval.partial_score(kept, meta, lambda found, cls, im=image: self.colours(im, found, cls)) for image, meta, kept in self.detections(images, metadata)])
