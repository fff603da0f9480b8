"""LAION CLAP text and audio towers through transformers' ClapModel (same weights as laion-clap)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import ClapModel, ClapProcessor

from diffgap.encoders.base import AudioEncoder, EncoderFingerprint, TextEncoder, l2_normalize, state_dict_sha256
from diffgap.encoders.hub import load_pretrained

DEFAULT_CLAP = "laion/clap-htsat-unfused"


class ClapBundle:
    """One loaded CLAP checkpoint shared by its text and audio encoders."""

    def __init__(self, model_id: str = DEFAULT_CLAP) -> None:
        self.model_id = model_id
        self.model: ClapModel = load_pretrained(ClapModel.from_pretrained, model_id, "CLAP model").eval()
        self.processor: ClapProcessor = load_pretrained(ClapProcessor.from_pretrained, model_id, "CLAP processor")
        self.weights_sha256 = state_dict_sha256(self.model)
        self.dim = int(self.model.config.projection_dim)


class ClapAudioEncoder(AudioEncoder):
    def __init__(self, bundle: ClapBundle) -> None:
        self.bundle = bundle
        fe = bundle.processor.feature_extractor
        self.dim = bundle.dim
        self.sample_rate = int(fe.sampling_rate)
        self.max_seconds = float(fe.max_length_s)
        self.fingerprint = EncoderFingerprint(
            family="clap",
            model_id=bundle.model_id,
            weights_sha256=bundle.weights_sha256,
            modality="audio",
            preprocessing={
                "sample_rate": self.sample_rate,
                "max_seconds": self.max_seconds,
                "feature_size": int(fe.feature_size),
                "hop_length": int(fe.hop_length),
            },
        )

    @torch.inference_mode()
    def encode(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        assert len(batch) > 0, "empty batch"
        max_len = int(self.max_seconds * self.sample_rate)
        # Windows never exceed max_seconds, so the extractor's random crop never fires: encoding is deterministic.
        waves = [np.asarray(w, dtype=np.float32)[:max_len] for w in batch]
        features = self.bundle.processor.feature_extractor(waves, sampling_rate=self.sample_rate, return_tensors="pt")
        out = self.bundle.model.get_audio_features(**features)
        return l2_normalize(out.pooler_output.float().numpy())  # (N, dim)


class ClapTextEncoder(TextEncoder):
    def __init__(self, bundle: ClapBundle, max_tokens: int = 77) -> None:
        self.bundle = bundle
        self.dim = bundle.dim
        self.max_tokens = max_tokens
        self.fingerprint = EncoderFingerprint(
            family="clap",
            model_id=bundle.model_id,
            weights_sha256=bundle.weights_sha256,
            modality="text",
            preprocessing={"max_tokens": max_tokens},
        )

    @torch.inference_mode()
    def encode(self, batch: Sequence[str]) -> np.ndarray:
        assert len(batch) > 0, "empty batch"
        tokens = self.bundle.processor.tokenizer(
            list(batch), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        out = self.bundle.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return l2_normalize(out.pooler_output.float().numpy())  # (N, dim)
