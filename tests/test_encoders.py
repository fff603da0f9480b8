from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tone, train_tiny_towers
from safetensors.torch import load_file

from diffgap.encoders import EncoderLoadError, load_encoders, parse_spec
from diffgap.encoders.compact import CompactModel, train_tokenizer
from diffgap.encoders.wordpiece import learn_wordpiece_vocab
from diffgap.models.audio_net import AudioNetConfig
from diffgap.models.text_net import TextNetConfig
from diffgap.models.video_net import VideoNetConfig


def _unit(x: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5))


def test_clap_text_and_audio_run_the_real_model(tiny_clap):
    enc = load_encoders(f"clap:{tiny_clap}")
    assert enc.audio.sample_rate == 16000 and enc.audio.dim == 16
    xa = enc.audio.encode([tone(300, 1.0, 16000), tone(900, 2.0, 16000)])
    xt = enc.text.encode(["a dog barks", "rain falls on a tin roof"])
    assert xa.shape == (2, 16) and xt.shape == (2, 16) and xa.dtype == np.float32
    assert _unit(xa) and _unit(xt)
    assert not np.allclose(xa[0], xa[1]) and not np.allclose(xt[0], xt[1])
    np.testing.assert_allclose(enc.audio.encode([tone(300, 1.0, 16000)])[0], xa[0], atol=1e-5)  # deterministic
    assert enc.audio.fingerprint.space == enc.text.fingerprint.space


def test_clap_fingerprint_survives_a_copy_and_changes_with_weights(tiny_clap, tmp_path):
    shutil.copytree(tiny_clap, tmp_path / "copy")
    a = load_encoders(f"clap:{tiny_clap}").audio.fingerprint
    b = load_encoders(f"clap:{tmp_path / 'copy'}").audio.fingerprint
    assert a.digest == b.digest  # location does not matter, weights do
    from tiny_models import make_tiny_clap

    other = load_encoders(f"clap:{make_tiny_clap(tmp_path / 'other', seed=1)}").audio.fingerprint
    assert other.digest != a.digest


def test_missing_weights_offline_give_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderLoadError, match="huggingface-cli download"):
        load_encoders("clap:laion/clap-htsat-unfused")
    with pytest.raises(EncoderLoadError, match="does not exist"):
        load_encoders("clap:/nonexistent/dir")


def test_bad_specs():
    with pytest.raises(EncoderLoadError, match="unknown encoder family"):
        parse_spec("wav2vec:x")
    with pytest.raises(EncoderLoadError, match="need a directory"):
        parse_spec("compact")


def test_clip_video_encoder(tiny_clap, tiny_clip):
    enc = load_encoders(f"clap:{tiny_clap}", video_spec=f"clip:{tiny_clip}")
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (5, 40, 40, 3), dtype=np.uint8), rng.integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)]
    per_frame = enc.video.encode_frames(clips)
    assert [f.shape for f in per_frame] == [(5, 16), (3, 16)]
    pooled = enc.video.encode(clips)
    assert pooled.shape == (2, 16) and _unit(pooled)


def _tiny_compact(tmp_path, with_video=True):
    tok = train_tokenizer(["a dog barks", "a bell rings twice", "rain on a roof"] * 5, 60)
    model = CompactModel(
        AudioNetConfig(channels=(8, 8, 16, 16), d_model=16, n_layers=1, n_heads=2, dim=8),
        TextNetConfig(vocab_size=tok.get_vocab_size(), d_model=16, n_layers=1, n_heads=2, dim=8),
        VideoNetConfig(channels=(8, 16), d_model=16, n_layers=1, n_heads=2, dim=8, size=32) if with_video else None,
        tok,
    )
    model.save(tmp_path / "compact")
    return tmp_path / "compact"


def test_compact_round_trip(tmp_path):
    path = _tiny_compact(tmp_path)
    enc = load_encoders(f"compact:{path}")
    enc2 = load_encoders(f"compact:{path}")
    wave = tone(500, 1.5, 16000)
    xa = enc.audio.encode([wave, wave[:8000]])
    assert xa.shape == (2, 8) and _unit(xa)
    np.testing.assert_allclose(enc2.audio.encode([wave]), xa[:1], atol=1e-5)
    np.testing.assert_allclose(enc.text.encode(["a dog barks"]), enc2.text.encode(["a dog barks"]), atol=1e-6)
    frames = np.zeros((6, 32, 32, 3), np.uint8)
    assert enc.video.encode([frames]).shape == (1, 8)
    assert enc.audio.fingerprint.digest == enc2.audio.fingerprint.digest
    assert not list(path.glob("*.pt")) and not list(path.glob("*.bin"))  # safetensors only


def test_compact_without_video_and_bad_dir(tmp_path):
    enc = load_encoders(f"compact:{_tiny_compact(tmp_path, with_video=False)}")
    assert enc.video is None
    with pytest.raises(EncoderLoadError, match="encoders train"):
        load_encoders(f"compact:{tmp_path / 'missing'}")


def test_compact_audio_is_the_same_alone_or_padded_in_a_batch(tmp_path):
    enc = load_encoders(f"compact:{_tiny_compact(tmp_path)}")
    short, long = tone(500, 1.0, 16000), tone(900, 2.3, 16000)
    alone = enc.audio.encode([short])[0]
    batched = enc.audio.encode([short, long])[0]
    assert float(alone @ batched) > 0.99999


def test_compact_saved_before_strided_stem_loads_its_own_architecture(tmp_path):
    """A config.json without the `strided_stem` fields (older checkpoints) keeps pooling blocks."""
    tok = train_tokenizer(["a dog barks"] * 3, 60)
    old = CompactModel(
        AudioNetConfig(channels=(8, 8, 16, 16), d_model=16, n_layers=1, n_heads=2, dim=8, strided_stem=False),
        None,
        VideoNetConfig(channels=(8, 16), d_model=16, n_layers=1, n_heads=2, dim=8, size=32, strided_stem=False),
        tok,
    )
    old.save(tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    for tower in ("audio", "video"):
        del config[tower]["strided_stem"]
    config_path.write_text(json.dumps(config))
    loaded = CompactModel.load(tmp_path / "old")
    assert not loaded.audio.cfg.strided_stem and not loaded.video.cfg.strided_stem
    wave = torch.from_numpy(tone(500, 1.0, 16000)).float()[None]
    with torch.no_grad():
        want = old.eval().audio(wave, torch.tensor([wave.shape[1]]))[0]
        got = loaded.audio(wave, torch.tensor([wave.shape[1]]))[0]
    torch.testing.assert_close(got, want)
    # today's default is the strided stem, and its first block has no pooling layer
    assert isinstance(CompactModel(AudioNetConfig(), None, None, None).audio.blocks[0].pool, torch.nn.Identity)


def test_tokenizer_spells_words_it_never_saw():
    tok = train_tokenizer(["loud high beep twice", "faint low buzz at end"], 500)
    tokens = tok.encode("A quiet, low-pitched bleep (x2) - whoosh!").tokens
    assert "[UNK]" not in tokens
    assert "low" in tokens and "beep" not in tokens  # a known word stays whole; an unseen one is spelled


def test_wordpiece_merges_the_most_frequent_pair_and_breaks_ties_by_text():
    words = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
    vocab = learn_wordpiece_vocab(words, vocab_size=100, specials=["[PAD]"])
    letters = sorted("hugpnbs")
    assert vocab[: 1 + 2 * len(letters)] == ["[PAD]", *letters, *("##" + c for c in letters)]
    # "##u ##g" (20 uses), "##u ##n" (16), "h ##ug" (15), "p ##un" (12); then "hug ##s" and "p ##ug" tie at 5
    # and "hug" sorts before "p"; "b ##un" (4) comes last
    assert vocab[15:] == ["##ug", "##un", "hug", "pun", "hugs", "pug", "bun"]
    assert learn_wordpiece_vocab(reversed(words), 100, ["[PAD]"]) == vocab  # the order words come in is no matter
    assert len(learn_wordpiece_vocab(words, 16, ["[PAD]"])) == 16  # stops at the size asked


def test_trained_tokenizer_is_the_same_every_time():
    """tokenizers' own trainer broke ties by hash order: the same six captions gave a new vocabulary on
    each run, and a compact encoder trained with a fixed seed did not reproduce (huggingface/tokenizers#1794)."""
    captions = ["a low hum", "a dog barks", "a bird chirps", "a high whistle", "an engine idles", "rain falls"]
    vocabs = [train_tokenizer(captions, 1000).get_vocab() for _ in range(4)]
    assert all(v == vocabs[0] for v in vocabs[1:])
    script = f"from diffgap.encoders.compact import train_tokenizer as t; print(t({captions!r}, 1000).to_str())"
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}  # fmt: skip
    assert len(runs) == 1 and json.loads(runs.pop())["model"]["vocab"] == vocabs[0]  # in a new process too


def test_compact_towers_trained_twice_with_one_seed_are_the_same(tmp_path):
    """What the tokenizer's hash-order ties broke: a fixed seed reproduces the vocabulary and every weight."""
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        train_tiny_towers(tmp_path / run)
    a, b = tmp_path / "a" / "enc", tmp_path / "b" / "enc"
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
