"""CLIP vision tower over sampled video frames: per-frame vectors and their mean as the clip vector."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from diffgap.encoders.base import EncoderFingerprint, VideoEncoder, l2_normalize, state_dict_sha256
from diffgap.encoders.hub import load_pretrained

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


class ClipVideoEncoder(VideoEncoder):
    def __init__(self, model_id: str = DEFAULT_CLIP, fps: float = 4.0, max_frames: int = 64) -> None:
        self.model_id = model_id
        self.model = load_pretrained(
            CLIPVisionModelWithProjection.from_pretrained, model_id, "CLIP vision model"
        ).eval()
        self.processor = load_pretrained(CLIPImageProcessorPil.from_pretrained, model_id, "CLIP image processor")
        self.dim = int(self.model.config.projection_dim)
        self.fps = fps
        self.max_frames = max_frames
        self.fingerprint = EncoderFingerprint(
            family="clip",
            model_id=model_id,
            weights_sha256=state_dict_sha256(self.model),
            modality="video",
            preprocessing={"fps": fps, "max_frames": max_frames, "pooling": "mean"},
        )

    @torch.inference_mode()
    def encode_frames(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        clips = [np.asarray(c)[: self.max_frames] for c in batch]
        frames = [frame for clip in clips for frame in clip]
        assert frames, "no frames in batch"
        pixels = self.processor(images=frames, return_tensors="pt")["pixel_values"]  # (sum T, 3, S, S)
        embeds = l2_normalize(self.model(pixel_values=pixels).image_embeds.float().numpy())  # (sum T, dim)
        bounds = np.cumsum([0] + [len(c) for c in clips])
        return [embeds[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def encode(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        return l2_normalize(np.stack([f.mean(axis=0) for f in self.encode_frames(batch)]))  # (N, dim)
