"""Tiny random-weight CLAP and CLIP checkpoints of the real transformers classes, built offline.

They exercise the same loading and inference code paths as the LAION/OpenAI weights; only the
sizes differ. The tokenizer is a byte-level BPE trained here on a few words.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import (
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    RobertaTokenizerFast,
)

WORDS = [
    "a",
    "dog",
    "barks",
    "loudly",
    "while",
    "rain",
    "falls",
    "on",
    "a",
    "tin",
    "roof",
    "and",
    "a",
    "bell",
    "rings",
    "twice",
    "then",
    "a",
    "car",
    "passes",
    "by",
]


def _tokenizer(tmp: Path) -> RobertaTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [" ".join(WORDS)] * 20,
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    tmp.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(tmp))
    return RobertaTokenizerFast(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"), model_max_length=64)


def make_tiny_clap(out: Path, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    tokenizer = _tokenizer(out / "_bpe")
    config = ClapConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=80,
            projection_dim=16,
        ),
        audio_config=dict(
            spec_size=128,
            num_mel_bins=32,
            patch_size=4,
            patch_stride=(4, 4),
            hidden_size=16,
            patch_embeds_hidden_size=8,
            depths=[1, 1],
            num_attention_heads=[2, 2],
            window_size=4,
            projection_dim=16,
            num_classes=4,
        ),
        projection_dim=16,
    )
    model = ClapModel(config).eval()
    extractor = ClapFeatureExtractor(
        feature_size=32,
        sampling_rate=16000,
        hop_length=160,
        max_length_s=2,
        fft_window_size=400,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    model.save_pretrained(out)
    return out


def make_tiny_clip_vision(out: Path, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).eval().save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out
