"""The project's own trainable encoders (audio, text, video) behind the common interface.

A compact model directory holds `config.json` (the three configs), `model.safetensors` (tensors
prefixed `audio.`, `text.`, `video.`) and `tokenizer.json`. Nothing is pickled.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from diffgap.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from diffgap.encoders.base import (
    AudioEncoder,
    EncoderFingerprint,
    EncoderLoadError,
    TextEncoder,
    VideoEncoder,
    state_dict_sha256,
)
from diffgap.encoders.sentence import SentenceEncoder, load_sentence_encoder
from diffgap.encoders.vocabulary import CorpusWordRewriter, read_words, unknown_share
from diffgap.encoders.wordpiece import learn_wordpiece_vocab
from diffgap.models.audio_net import AudioNet, AudioNetConfig
from diffgap.models.segments import segment_pool
from diffgap.models.text_net import TextNet, TextNetConfig
from diffgap.models.video_net import VideoNet, VideoNetConfig

FORMAT = "diffgap-compact"
VERSION = 1
PAD, UNK = "[PAD]", "[UNK]"
# Architecture fields added after models were first saved: a config without one was trained with
# this value, whatever today's default is.
LEGACY_FIELDS: dict[str, dict[str, Any]] = {
    "audio": {"strided_stem": False},
    "text": {"rewrite_similarity": 0.0, "sentence_head": "linear"},
    "video": {"strided_stem": False},
}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """WordPiece over lower-cased, accent-stripped words; [PAD] is id 0. The vocabulary is learnt by
    `learn_wordpiece_vocab`, so the same texts always give the same tokenizer."""
    tok = Tokenizer(models.WordPiece(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    words = (w for t in texts for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(t)))
    # Every letter and digit, word-initial and as a "##" continuation, is in the vocabulary even if the
    # training captions never use it, so an unseen word is spelled out in pieces instead of becoming [UNK].
    alphabet = string.ascii_lowercase + string.digits + string.punctuation
    vocab = learn_wordpiece_vocab(words, vocab_size, specials=(PAD, UNK), alphabet=alphabet)
    tok.model = models.WordPiece({piece: i for i, piece in enumerate(vocab)}, unk_token=UNK)
    return tok


def load_text_prior_model(cfg: TextNetConfig) -> SentenceEncoder:
    """The frozen sentence model a text tower was trained over, checked to be the same weights."""
    assert cfg.prior, "a tower that reads sentence states names its sentence model"
    sentence = load_sentence_encoder(cfg.prior)
    if cfg.prior_sha256 and sentence.ref.sha256 != cfg.prior_sha256:
        raise EncoderLoadError(
            f"this text tower was trained over sentence model {cfg.prior!r} with sha256 {cfg.prior_sha256[:16]}..., "
            f"and the one installed has {sentence.ref.sha256[:16]}...: install the same model or retrain the encoders"
        )
    return sentence


class CompactModel(torch.nn.Module):
    """The three towers trained together; any of them may be absent (no video in the training pairs)."""

    def __init__(
        self,
        audio: AudioNetConfig,
        text: TextNetConfig | None,
        video: VideoNetConfig | None,
        tokenizer: Tokenizer | None,
    ) -> None:
        super().__init__()
        self.audio = AudioNet(audio)
        self.text = TextNet(text) if text else None
        self.video = VideoNet(video) if video else None
        self.tokenizer = tokenizer
        # A sentence prior is frozen and read from its package, never saved with the towers.
        self.sentence = load_text_prior_model(text) if text and text.prior_dim else None
        # A beside tower reads a query's words its corpus lacks as their nearest corpus words.
        self.rewriter = (
            CorpusWordRewriter(tokenizer, self.sentence, text.rewrite_similarity)
            if self.text is not None and self.text.beside and text.rewrite_similarity > 0
            and tokenizer is not None and self.sentence is not None
            else None
        )  # fmt: skip
        # CLIP-style learnable temperatures: log(1/0.07)
        self.logit_scale_text = torch.nn.Parameter(torch.tensor(2.659))
        self.logit_scale_video = torch.nn.Parameter(torch.tensor(2.659))

    def text_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """What the text tower reads for these texts: token ids, a sentence model's states and mask, or
        (dual) token ids and the sentence model's vectors, or (beside) token ids, what its sentence head
        reads (the vectors, or the states and mask) and each text's share of words the corpus vocabulary
        lacks."""
        if self.sentence is not None and self.text is not None and self.text.dual:
            return {"ids": self.tokenize(texts), "sentence": torch.from_numpy(self.sentence.encode(texts))}
        if self.sentence is not None and self.text is not None and self.text.beside:
            assert self.tokenizer is not None, "a beside tower keeps its corpus tokenizer"
            read = read_words(self.tokenizer, texts)  # once, for the rewrite and the share
            inputs = {
                "ids": self.tokenize(self.rewriter.rewrite(read) if self.rewriter else texts),
                "unknown": unknown_share(read),  # (B,)
            }
            if self.text.cfg.sentence_head == "linear":
                return {**inputs, "sentence": torch.from_numpy(self.sentence.encode(texts))}  # (B, P)
            states, mask, _ = self.sentence.token_states(texts)  # (B, L, P), (B, L)
            return {**inputs, "states": states, "mask": mask}
        if self.sentence is not None:
            states, mask, ids = self.sentence.token_states(texts)  # (B, L, P), (B, L), (B, L)
            return {"states": states, "mask": mask, "ids": ids}
        return {"ids": self.tokenize(texts)}

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        assert self.tokenizer is not None and self.text is not None, "this compact model has no text tower"
        max_len = self.text.cfg.max_tokens
        encoded = [e.ids[:max_len] or [1] for e in self.tokenizer.encode_batch(list(texts))]
        ids = torch.zeros(len(encoded), max(len(e) for e in encoded), dtype=torch.long)  # (B, L), 0 = [PAD]
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e)
        return ids

    def save(self, out: str | Path, extra: dict[str, Any] | None = None) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT,
            "version": VERSION,
            "audio": asdict(self.audio.cfg),
            "text": asdict(self.text.cfg) if self.text else None,
            "video": asdict(self.video.cfg) if self.video else None,
            **(extra or {}),
        }
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(out / "model.safetensors", safetensors_bytes(tensors))
        if self.tokenizer is not None:
            atomic_write_text(out / "tokenizer.json", self.tokenizer.to_str(pretty=True))
        atomic_write_json(out / "config.json", config)  # last: it names a complete set

    @classmethod
    def load(cls, path: str | Path) -> CompactModel:
        path = Path(path)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EncoderLoadError(
                f"compact encoders: cannot read {path / 'config.json'} ({exc}); train them with "
                "`diffgap-index encoders train --pairs PAIRS.csv --out DIR`"
            ) from exc
        if config.get("format") != FORMAT:
            raise EncoderLoadError(f"{path} is not a compact encoder directory (format {config.get('format')!r})")

        def tupled(tower: str) -> dict[str, Any]:
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config[tower].items()}
            return {**LEGACY_FIELDS.get(tower, {}), **fields}

        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json")) if (path / "tokenizer.json").exists() else None
        try:
            model = cls(
                AudioNetConfig(**tupled("audio")),
                TextNetConfig(**tupled("text")) if config.get("text") else None,
                VideoNetConfig(**tupled("video")) if config.get("video") else None,
                tokenizer,
            )
        except (KeyError, TypeError, ValueError) as exc:  # a field this version does not know, or a bad value
            raise EncoderLoadError(f"compact encoders: {path / 'config.json'} does not describe towers this "
                                   f"version can build ({exc}); retrain them or upgrade diffgap") from exc  # fmt: skip
        try:
            model.load_state_dict(load_file(str(path / "model.safetensors")))
        except (OSError, RuntimeError) as exc:
            raise EncoderLoadError(f"compact encoders: cannot load weights from {path}: {exc}") from exc
        return model.eval()


def _pad_waves(waves: Sequence[np.ndarray], min_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([max(len(w), 1) for w in waves])
    out = torch.zeros(len(waves), max(int(lengths.max()), min_len))  # (B, S)
    for i, w in enumerate(waves):
        out[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return out, lengths


def _pad_frames(clips: Sequence[np.ndarray], max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    clips = [np.asarray(c)[:max_frames] for c in clips]
    lengths = torch.tensor([len(c) for c in clips])
    h, w = clips[0].shape[1:3]
    out = torch.zeros(len(clips), int(lengths.max()), h, w, 3, dtype=torch.uint8)  # (B, T, H, W, 3)
    for i, c in enumerate(clips):
        assert c.shape[1:] == (h, w, 3), f"clip frames {c.shape[1:]} differ from {(h, w, 3)} in one batch"
        out[i, : len(c)] = torch.from_numpy(c)
    return out, lengths


def _with_segments(
    clip: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor, segments: int
) -> tuple[np.ndarray, np.ndarray]:
    """A tower's output (clip (B, dim), steps (B, T, dim), mask (B, T)) as clip vectors and `segments`
    span vectors per clip (B, segments, dim); (B, 0, dim) when no segments are asked for."""
    if not segments:
        return clip.numpy(), np.zeros((len(clip), 0, clip.shape[1]), np.float32)
    return clip.numpy(), segment_pool(seq, mask, segments).numpy()


class CompactBundle:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.model = CompactModel.load(path)
        self.weights_sha256 = state_dict_sha256(self.model)


class CompactAudioEncoder(AudioEncoder):
    keeps_time = True

    def __init__(self, bundle: CompactBundle) -> None:
        self.net = bundle.model.audio
        cfg = self.net.cfg
        self.dim, self.sample_rate, self.max_seconds = cfg.dim, cfg.sample_rate, cfg.max_seconds
        self.fingerprint = EncoderFingerprint(
            "compact",
            bundle.path,
            bundle.weights_sha256,
            "audio",
            {"sample_rate": cfg.sample_rate, "n_mels": cfg.n_mels},
        )

    def encode(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        return self.encode_with_segments(batch, 0)[0]  # (N, dim)

    @torch.inference_mode()
    def encode_with_segments(self, batch: Sequence[np.ndarray], segments: int) -> tuple[np.ndarray, np.ndarray]:
        assert len(batch) > 0, "empty batch"
        max_len = int(self.max_seconds * self.sample_rate)
        # at least a few time steps after the tower's pooling, however short a clip is (a 5 ms one included)
        min_len = max(self.net.cfg.n_fft, 4 * self.net.time_stride)
        wave, lengths = _pad_waves([np.asarray(w)[:max_len] for w in batch], min_len)
        return _with_segments(*self.net(wave, lengths), segments)


class CompactTextEncoder(TextEncoder):
    def __init__(self, bundle: CompactBundle) -> None:
        if bundle.model.text is None:
            raise EncoderLoadError(f"{bundle.path} has no text encoder (it was trained without captions)")
        self.model = bundle.model
        self.dim = bundle.model.text.cfg.dim
        cfg = bundle.model.text.cfg
        preprocessing: dict[str, Any] = {"max_tokens": cfg.max_tokens}
        if cfg.prior:  # the language prior the tower started from, by name and content
            preprocessing.update(prior=cfg.prior, prior_sha256=cfg.prior_sha256, prior_mode=cfg.prior_mode)
            if cfg.prior_mode == "beside":
                preprocessing.update(prior_weight=cfg.prior_weight, rewrite_similarity=cfg.rewrite_similarity,
                                     sentence_head=cfg.sentence_head)  # fmt: skip
        self.fingerprint = EncoderFingerprint("compact", bundle.path, bundle.weights_sha256, "text", preprocessing)

    @torch.inference_mode()
    def encode(self, batch: Sequence[str]) -> np.ndarray:
        assert len(batch) > 0, "empty batch"
        return self.model.text(**self.model.text_inputs(batch)).numpy()  # (N, dim)


class CompactVideoEncoder(VideoEncoder):
    keeps_time = True

    def __init__(self, bundle: CompactBundle) -> None:
        if bundle.model.video is None:
            raise EncoderLoadError(f"{bundle.path} has no video encoder (it was trained without videos)")
        self.net = bundle.model.video
        cfg = self.net.cfg
        self.dim, self.fps, self.size = cfg.dim, cfg.fps, cfg.size
        self.fingerprint = EncoderFingerprint(
            "compact", bundle.path, bundle.weights_sha256, "video", {"fps": cfg.fps, "size": cfg.size}
        )

    def encode(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        return self.encode_with_segments(batch, 0)[0]  # (N, dim)

    @torch.inference_mode()
    def encode_with_segments(self, batch: Sequence[np.ndarray], segments: int) -> tuple[np.ndarray, np.ndarray]:
        assert len(batch) > 0, "empty batch"
        frames, lengths = _pad_frames(batch, self.net.cfg.max_frames)
        return _with_segments(*self.net(frames, lengths), segments)
