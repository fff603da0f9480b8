"""The language prior: read offline from the installed wordllama wheel, unseen words in known pieces,
a tiny tower that starts from it trains, saves and loads with the prior in its fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import train_tiny_towers

from diffgap.encoders import EncoderLoadError, load_encoders
from diffgap.encoders import prior as prior_module
from diffgap.encoders.prior import DEFAULT_PRIOR, load_prior


def test_the_prior_loads_offline_from_the_installed_wheel(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prior = load_prior(DEFAULT_PRIOR)
    assert prior.table.shape == (32000, 256) and prior.table.dtype == np.float32
    assert len(prior.sha256) == 64 and np.isfinite(prior.table).all()
    tok = prior.tokenizer()
    for text in ("a dog barks", "mineimpactzz", "Meow MEOW"):  # unseen and odd words: known pieces, no <unk>
        ids = tok.encode(text).ids
        assert ids and 0 not in ids, (text, ids)
    assert tok.encode("Dog").ids == tok.encode("dog").ids  # captions vary in case

    def mean(text: str) -> np.ndarray:
        v = prior.table[tok.encode(text).ids[1:]].mean(0)
        return v / np.linalg.norm(v)

    assert mean("dog barking") @ mean("a dog barks") > mean("dog barking") @ mean("an engine idles")


def test_a_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(prior_module.PRIORS, "absent", ("no_such_prior_package", "w.safetensors", "t.json"))
    with pytest.raises(EncoderLoadError, match="no_such_prior_package.*pip install"):
        load_prior("absent")
    with pytest.raises(EncoderLoadError, match="unknown language prior"):
        load_prior("nope")


@pytest.mark.parametrize("mode", ["frozen", "pooled"])
def test_a_tiny_tower_with_the_prior_trains_and_round_trips(tmp_path, mode):
    stats = train_tiny_towers(tmp_path, prior=DEFAULT_PRIOR, prior_mode=mode)
    assert stats["steps"] == 3 and np.isfinite(stats["loss"])
    encoders = load_encoders(f"compact:{tmp_path / 'enc'}")
    fp = encoders.text.fingerprint
    assert fp.preprocessing["prior"] == DEFAULT_PRIOR and fp.preprocessing["prior_mode"] == mode
    assert fp.preprocessing["prior_sha256"] == load_prior().sha256
    vectors = encoders.text.encode(["a dog barks", "an unseen word: xylophonic"])
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    if mode == "frozen":  # the table did not move
        table = encoders.text.model.text.tok.weight.detach().numpy()
        np.testing.assert_array_equal(table, load_prior().table)
    again = load_encoders(f"compact:{tmp_path / 'enc'}").text
    assert again.fingerprint.digest == fp.digest
    np.testing.assert_allclose(again.encode(["a dog barks"]), vectors[:1], atol=1e-6)
