"""Descriptions from tags and names, pairs built from an index, and an end-to-end adapt run."""

from __future__ import annotations

import json

import pytest
from conftest import tone

from diffgap.encoders import load_encoders
from diffgap.index.build import read_tags
from diffgap.index.store import IndexStore
from diffgap.media.audio import write_audio
from diffgap.media.synthetic import generate_demo_corpus, generate_named_library
from diffgap.media.tags import describe, describe_name, describe_tags, words_of
from diffgap.training.embeddings import embed_index_pairs
from indexer.cli import main


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("DOORWood_Creak_Slow_01.wav", "door wood creak slow"),
        ("Weather/Rain/RainOnTinRoof_take2_48k.flac", "weather rain on tin roof"),
        ("sfx/UI_Beep_High-03_final.mp3", "ui beep high"),
        ("BellsChurch Distant ALT 2.wav", "bells church distant"),
        ("library/Vehicles/CAR_Pass_By_Fast_Stereo_24bit_96kHz.wav", "library vehicles car pass by fast"),
        ("BEEPHigh_ThreeTimes_End_07.m4a", "beep high three times end"),
        ("0001.wav", ""),
    ],
)
def test_names_become_words(name, words):
    assert describe_name(name) == words


def test_words_of_splits_camel_case_and_numbers():
    assert words_of("HTTPServerNoise v2 Take03") == ["http", "server", "noise"]


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a"])
def test_tags_are_read_from_every_container(tmp_path, ext):
    path = tmp_path / f"GLASS_Break_01{ext}"
    write_audio(
        path, tone(700, 1.0, 16000), 16000, metadata={"title": "Glass shatter", "comment": "bottle dropped on concrete"}
    )
    tags = read_tags(path)
    assert tags["title"] == "Glass shatter" and tags["comment"] == "bottle dropped on concrete"
    assert "major_brand" not in tags and "encoder" not in tags  # muxer bookkeeping is dropped
    text = describe(path.name, tags)
    assert "bottle dropped on concrete" in text and "Glass shatter" in text
    assert text.endswith("break")  # the name adds what the tags do not say


def test_describe_tags_dedupes_and_orders():
    assert (
        describe_tags({"title": "Rain", "description": "rain on a roof", "comment": "Rain"}) == "rain on a roof; Rain"
    )
    assert describe("a/b.wav", {}) == ""


@pytest.fixture(scope="module")
def adapt_setup(tmp_path_factory):
    """Compact encoders trained on captions of one corpus; a library described only by its names."""
    from diffgap.models.audio_net import AudioNetConfig
    from diffgap.models.text_net import TextNetConfig
    from diffgap.training.encoders import EncoderTrainConfig, train_compact_encoders
    from diffgap.training.pairs import read_pairs

    work = tmp_path_factory.mktemp("adapt")
    captions = generate_demo_corpus(work / "captioned", 120, seed=3)
    cfg = EncoderTrainConfig(
        epochs=6,
        batch_size=24,
        warmup_steps=5,
        audio=AudioNetConfig(channels=(8, 16, 16, 32), d_model=32, n_layers=1, n_heads=2, dim=32),
        text=TextNetConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, dim=32),
    )
    train_compact_encoders(read_pairs(captions / "captions.csv"), work / "enc", cfg, use_video=False)
    library = generate_named_library(work / "library", 100, seed=4)
    index = work / "index"
    assert main(["build", str(library), "-o", str(index), "--encoder", f"compact:{work / 'enc'}", "-q"]) == 0
    return work, index


def test_index_stores_descriptions_and_builds_pairs(adapt_setup):
    work, index = adapt_setup
    with IndexStore.open(index, readonly=True) as store:
        described = store.described_items()
        assert len(described) == 100
        path, text = described[0][1], described[0][2]
        assert text == describe_name(path) and len(text.split()) >= 4
        data = embed_index_pairs(store, load_encoders(f"compact:{work / 'enc'}"))
    assert data.audio.shape == (100, 32) and data.query.shape == (100, 32)
    train, val = data.split(0.25, seed=0)
    assert len(val.audio) == 25 and len(train.audio) == 75
    assert not set(train.audio_keys) & set(val.audio_keys)  # held-out files never train


def test_adapt_from_index_beats_direct_on_held_out_files(adapt_setup, capsys):
    _, index = adapt_setup
    capsys.readouterr()
    assert (
        main(
            [
                "refiner",
                "train",
                "-q",
                "--from-index",
                "--index",
                str(index),
                "--val-fraction",
                "0.25",
                "--iterations",
                "1500",
                "--adapter",
                "--adapter-steps",
                "200",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["pairs_val"] == 25
    assert "adapted" in report["mix"] and report["adapter_bytes"] > 0  # the library's own names fit it too
    assert report["val_refined"]["R@1"] > report["val_direct"]["R@1"], report
    assert report["val_refined"]["MRR@10"] > report["val_direct"]["MRR@10"], report
    assert (index / "refiner-text" / "refiner.json").exists()
    capsys.readouterr()
    assert main(["search", str(index), "--text", "beep high twice start", "--refine", "--json", "-k", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_from_index_without_descriptions_is_a_clear_error(tmp_path, tiny_clap, caplog):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(3):
        write_audio(corpus / f"{i:04d}.wav", tone(300 + 100 * i, 1.0, 16000), 16000)
    assert main(["build", str(corpus), "-o", str(tmp_path / "idx"), "--encoder", f"clap:{tiny_clap}", "-q"]) == 0
    assert main(["refiner", "train", "-q", "--from-index", "--index", str(tmp_path / "idx")]) == 1
    assert "no item descriptions" in caplog.text


def test_encoders_from_an_index_own_descriptions(adapt_setup, tmp_path, caplog):
    """A library with no captions and no CLAP weights gets encoders from its own names (augmented, the
    best epoch on the held-out files kept), then a rebuild."""
    from diffgap.pipeline import build, train_encoders_from_index
    from diffgap.training.encoders import EncoderTrainConfig

    work, index = adapt_setup
    tiny = json.loads((work / "enc" / "config.json").read_text())
    caplog.set_level("INFO", logger="diffgap.training.encoders")
    cfg = EncoderTrainConfig(epochs=4, batch_size=16, warmup_steps=2, augment=True, patience=2)
    cfg.audio = type(cfg.audio)(**{k: tuple(v) if isinstance(v, list) else v for k, v in tiny["audio"].items()})
    cfg.text = type(cfg.text)(**{**tiny["text"], "vocab_size": 300})
    stats = train_encoders_from_index(index, tmp_path / "own", cfg, val_fraction=0.2, exclude=["*_0[0-4]*"])
    assert stats["held_out"]["n"] >= 10 and 0 <= stats["held_out"]["R@10"] <= 1
    assert 0 <= stats["best_epoch"] < 4 and stats["val_clips"] == stats["held_out"]["n"]
    assert caplog.text.count("validation MRR@10") >= 2  # every finished epoch is scored
    assert build(tmp_path / "own-index", f"compact:{tmp_path / 'own'}", corpus=work / "library").total_items == 100
    assert main(["encoders", "train", "-q", "--out", str(tmp_path / "x")]) == 2  # neither pairs nor an index


def test_augmentation_crops_adds_noise_and_masks_bands():
    import numpy as np
    import torch

    from diffgap.models.audio_net import mask_bands
    from diffgap.training.encoders import EncoderTrainConfig, augment_wave

    cfg = EncoderTrainConfig(crop_min=0.5, noise_snr_db=(20.0, 20.0))
    wave = tone(440, 2.0, 16000).astype(np.float16)
    rng = np.random.default_rng(0)
    outs = [augment_wave(wave, cfg, rng) for _ in range(20)]
    assert all(16000 <= len(o) <= 32000 for o in outs) and len({len(o) for o in outs}) > 1
    noisy = [o for o in outs if not np.isin(o, wave.astype(np.float32)).all()]
    assert noisy and len(noisy) < 20  # noise half of the time
    x = torch.ones(3, 64, 100)
    masked = mask_bands(x, torch.tensor([100, 50, 100]), 2)
    assert masked.shape == x.shape and (masked == 0).any() and (masked == 1).float().mean() > 0.5
