"""A refiner's text adapter: a small head over a frozen sentence model's token states, fitted on a
user's own (caption, audio) pairs to place each caption on its audio's vector in the index's space.

Why it sits beside the diffusion network: the refiner and the mapper see only the query encoder's
vector, in which a caption written in words the encoder never learnt has already lost what it says.
On SynthCaps (BENCHMARKS.md, issue 17, seventh pass) towers trained on terse captions find 3% of
descriptive ones at R@1, the refiner brings that to 18% at best, and a head over the sentence model's
token states fitted on descriptive captions reads them at 40% against the same frozen audio. The
adapter reads the words again through the sentence model; its score is one part of the refiner's
ensemble (`RefinerConfig.mix`, "adapted"), weighed on held-out pairs like the refined, mapped and
direct parts. The encoders and the index stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from diffgap.encoders.base import EncoderLoadError
from diffgap.encoders.sentence import SentenceEncoder, load_sentence_encoder
from diffgap.models.text_net import TextNet, TextNetConfig

HEAD_D_MODEL = 128  # as a beside tower's states head (text_net.py): it fits fixed targets
HEAD_LAYERS = 1  # the sentence model's states are already contextual: one layer regroups them
ENCODE_BATCH = 64


class AdapterError(ValueError):
    """An adapter cannot be built or loaded; the message says why."""


class TextAdapter:
    """A frozen sentence model and a trained head over its token states: texts -> (B, dim) unit vectors."""

    def __init__(self, sentence: SentenceEncoder, head: TextNet) -> None:
        assert head.from_states and head.cfg.prior_dim == sentence.dim, "the head must read this model's states"
        self.sentence = sentence
        self.head = head.eval()

    @classmethod
    def new(cls, sentence: SentenceEncoder, dim: int, seed: int = 0) -> TextAdapter:
        """An untrained head for `dim`-wide target vectors (`diffgap.training.adapter` fits it)."""
        cfg = TextNetConfig(
            prior=sentence.ref.name,
            prior_sha256=sentence.ref.sha256,
            prior_mode="tokens",
            prior_dim=sentence.dim,
            d_model=HEAD_D_MODEL,
            n_layers=HEAD_LAYERS,
            dim=dim,
        )
        torch.manual_seed(seed)
        return cls(sentence, TextNet(cfg))

    @property
    def dim(self) -> int:
        return self.head.cfg.dim

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.head.parameters())

    def read(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head on a batch of token states {"states": (B, L, P), "mask": (B, L)} -> (B, dim)."""
        return self.head(states=batch["states"], mask=batch["mask"])

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors (N, dim) float32 in the index's audio space."""
        out = []
        for start in range(0, len(texts), ENCODE_BATCH):
            states, mask, _ = self.sentence.token_states(texts[start : start + ENCODE_BATCH])  # (b, L, P), (b, L)
            out.append(self.read({"states": states, "mask": mask}).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    # ---- I/O: the config goes into refiner.json, the tensors into their own file ----------------------
    def config(self) -> dict[str, Any]:
        return {"sentence": self.sentence.ref.to_dict(), "head": asdict(self.head.cfg)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}

    @classmethod
    def load(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> TextAdapter:
        """Rebuild from `config()` and `tensors()`; the sentence model is loaded by name and must be the
        very weights the head was fitted on."""
        try:
            ref = config["sentence"]
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config["head"].items()}
            head = TextNet(TextNetConfig(**fields))
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterError(f"the adapter's config does not describe a head this version can build ({exc})") from exc
        try:
            sentence = load_sentence_encoder(ref["name"])
        except EncoderLoadError as exc:
            raise AdapterError(f"the refiner's text adapter reads the sentence model {ref['name']!r}: {exc}") from exc
        if sentence.ref.sha256 != ref["sha256"]:
            raise AdapterError(
                f"the refiner's text adapter was fitted on sentence model {ref['name']!r} with weights "
                f"{ref['sha256'][:16]}..., and the installed one has {sentence.ref.sha256[:16]}...; retrain the refiner"
            )
        try:
            head.load_state_dict(tensors)
        except RuntimeError as exc:
            raise AdapterError(f"the adapter's weights do not match its config: {exc}") from exc
        return cls(sentence, head)
