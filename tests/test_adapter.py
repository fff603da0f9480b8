"""A refiner's text adapter: a head over the real sentence model's token states (read offline from its
wheel), fitted to audio vectors, saved beside the refiner and served as one part of its score mix."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from diffgap.diffusion.adapter import TextAdapter
from diffgap.diffusion.refiner import ADAPTER_FILE, Refiner, RefinerConfig, RefinerError
from diffgap.encoders.sentence import load_sentence_encoder
from diffgap.models.mapper_net import Mapper
from diffgap.models.refiner_net import RefinerNetConfig
from diffgap.training.adapter import AdapterTrainConfig, fit_adapter, held_out_score
from diffgap.training.embeddings import PairEmbeddings
from diffgap.training.encoders import HeadFit, SentenceStates, fit_head
from diffgap.training.metrics import metrics, ranks_query_to_audio

# six sounds, three captions each: the first two are trained on, the third is a paraphrase held out
CAPTIONS = [
    ("a dog barks", "a dog barking loudly", "the hound yaps"),
    ("rain falls on a roof", "heavy rain pouring", "a downpour drums on the tiles"),
    ("a car engine starts", "an engine revving", "a motor turns over and roars"),
    ("birds sing in the morning", "chirping birds", "songbirds twitter at dawn"),
    ("a door slams shut", "a door banging closed", "someone slams the door"),
    ("a baby cries", "an infant crying", "a newborn wails"),
]
DIM = 16


def _pairs(which: slice, seed: int = 0) -> PairEmbeddings:
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((len(CAPTIONS), DIM)).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    texts = [t for group in CAPTIONS for t in group[which]]
    groups = np.repeat(np.arange(len(CAPTIONS)), len(CAPTIONS[0][which]))
    query = audio[groups] + 0.0  # a query vector the mix's other parts read; the adapter reads the texts
    return PairEmbeddings(audio, query, groups, [str(i) for i in range(len(CAPTIONS))], "text", texts)


@pytest.fixture(scope="module")
def fitted() -> TextAdapter:
    return fit_adapter(_pairs(slice(0, 2)), "minilm-l6", AdapterTrainConfig(steps=60, lr=3e-3))[0]


def _r_at_1(adapter: TextAdapter, data: PairEmbeddings) -> float:
    return metrics(ranks_query_to_audio(adapter.encode(data.texts), data.audio, data.query_group))["R@1"]


def test_an_adapter_places_captions_on_their_audio_after_a_few_steps(fitted):
    train, held_out = _pairs(slice(0, 2)), _pairs(slice(2, 3))
    untrained = TextAdapter.new(load_sentence_encoder("minilm-l6"), DIM, seed=0)
    assert _r_at_1(untrained, train) <= 0.5  # random 16-d targets: chance is 1/6
    assert _r_at_1(fitted, train) == 1.0
    # the sentence model's reading carries over to paraphrases of the training captions it never saw
    assert _r_at_1(fitted, held_out) >= 0.5
    vectors = fitted.encode(train.texts)
    assert vectors.shape == (12, DIM) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(fitted.encode(train.texts[:1]), vectors[:1], atol=1e-5)  # batch-independent
    assert 0 < fitted.num_bytes < 2_000_000  # ~1.2 MB at 256-d targets


def _served(fitted: TextAdapter, mix: dict[str, float]) -> Refiner:
    config = RefinerConfig(net=RefinerNetConfig(audio_dim=DIM, query_dim=DIM, hidden=32, n_blocks=1), mix=mix)
    config.mapper_hidden = 8
    return Refiner(config, mapper=Mapper(DIM, DIM, hidden=8), adapter=fitted)


def test_the_adapted_score_is_saved_served_and_optional(fitted, tmp_path):
    data = _pairs(slice(0, 2))
    served = _served(fitted, {"refined": 0.25, "mapped": 0.0, "direct": 0.25, "adapted": 0.5})
    served.save(tmp_path / "r")
    assert (tmp_path / "r" / ADAPTER_FILE).exists()
    loaded = Refiner.load(tmp_path / "r")
    assert loaded.reads_text and loaded.mapper is None  # the mapper has no weight: not saved, not loaded
    adapted = loaded.adapt(data.texts)
    np.testing.assert_allclose(adapted, fitted.encode(data.texts), atol=1e-6)
    refined = loaded.refine(data.query, blend=0.0)
    by_hand = 0.25 * refined + 0.25 * data.query + 0.5 * adapted
    by_hand /= np.linalg.norm(by_hand, axis=1, keepdims=True)
    np.testing.assert_allclose(loaded.refine(data.query, adapted=adapted), by_hand, atol=1e-5)
    # a query given as a vector has no words: the other parts keep their weights
    without = 0.25 * refined + 0.25 * data.query
    without /= np.linalg.norm(without, axis=1, keepdims=True)
    np.testing.assert_allclose(loaded.refine(data.query), without, atol=1e-5)
    with pytest.raises(RefinerError, match="adapted vectors of shape"):
        loaded.refine(data.query, adapted=adapted[:2])
    # the adapter alone: without words the refined score serves
    alone = _served(fitted, {"refined": 0.0, "mapped": 0.0, "direct": 0.0, "adapted": 1.0})
    np.testing.assert_allclose(alone.refine(data.query), alone.refine(data.query, blend=0.0), atol=1e-6)
    np.testing.assert_allclose(alone.refine(data.query, adapted=adapted), adapted, atol=1e-6)


def test_a_refiner_without_an_adapted_weight_keeps_no_adapter(fitted, tmp_path):
    served = _served(fitted, {"refined": 0.5, "mapped": 0.5, "direct": 0.0, "adapted": 0.0})
    served.save(tmp_path / "r")
    assert not (tmp_path / "r" / ADAPTER_FILE).exists()
    loaded = Refiner.load(tmp_path / "r")
    assert not loaded.reads_text and loaded.adapter is None and loaded.adapt(["a dog barks"]) is None
    assert json.loads((tmp_path / "r" / "refiner.json").read_text())["adapter"] is None


def test_a_broken_or_foreign_adapter_is_a_clear_error(fitted, tmp_path):
    _served(fitted, {"refined": 0.5, "mapped": 0.0, "direct": 0.0, "adapted": 0.5}).save(tmp_path / "r")
    config_file = tmp_path / "r" / "refiner.json"
    cfg = json.loads(config_file.read_text())
    other = {**cfg, "adapter": {**cfg["adapter"], "sentence": {**cfg["adapter"]["sentence"], "sha256": "0" * 64}}}
    config_file.write_text(json.dumps(other))
    with pytest.raises(RefinerError, match="fitted on sentence model 'minilm-l6' with weights 0000"):
        Refiner.load(tmp_path / "r")
    config_file.write_text(json.dumps({**cfg, "adapter": {**cfg["adapter"], "head": {"heads": 3}}}))
    with pytest.raises(RefinerError, match="does not describe a head this version can build"):
        Refiner.load(tmp_path / "r")
    config_file.write_text(json.dumps({**cfg, "adapter": None}))
    with pytest.raises(RefinerError, match="describes no adapter"):
        Refiner.load(tmp_path / "r")
    config_file.write_text(json.dumps(cfg))
    (tmp_path / "r" / ADAPTER_FILE).unlink()
    with pytest.raises(RefinerError, match=ADAPTER_FILE):
        Refiner.load(tmp_path / "r")


def test_a_text_search_weighs_the_adapters_reading_of_its_words(tiny_clap, tmp_path):
    from conftest import tone

    from diffgap.media.audio import write_audio
    from diffgap.pipeline import build
    from diffgap.retrieval.search import Query, RefineSpec, open_searcher

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for freq in (300, 700, 1500, 3000):
        write_audio(corpus / f"{freq}.wav", tone(freq, 1.0, 16000), 16000)
    build(tmp_path / "idx", f"clap:{tiny_clap}", corpus=corpus)
    searcher = open_searcher(tmp_path / "idx")
    dim = searcher.store.manifest.dim
    adapter = TextAdapter.new(load_sentence_encoder("minilm-l6"), dim, seed=3)
    config = RefinerConfig(
        net=RefinerNetConfig(audio_dim=dim, query_dim=searcher.query_dim("text"), hidden=32, n_blocks=1),
        mix={"refined": 0.0, "mapped": 0.0, "direct": 0.0, "adapted": 1.0},
    )
    searcher.refiners["text"] = Refiner(config, adapter=adapter)
    text = "a high whistle"

    def scores_by_hand(hits: list, xq: np.ndarray) -> list[float]:
        ids, xb = searcher.store.vectors(np.asarray([h.item.id for h in hits], dtype=np.int64))
        by_id = dict(zip(ids.tolist(), xb @ xq, strict=True))
        return [float(by_id[h.item.id]) for h in hits]

    hits = searcher.search(Query("text", k=4, text=text, refine=RefineSpec())).hits
    np.testing.assert_allclose([h.score for h in hits], scores_by_hand(hits, adapter.encode([text])[0]), atol=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # a vector query has no words to read: the refined vector serves it
    vector = searcher.encoders.for_modality("text").encode([text])[0]
    hits = searcher.search(Query("text", k=4, vector=vector, refine=RefineSpec())).hits
    refined = searcher.refiners["text"].refine(vector[None], blend=0.0)[0]
    np.testing.assert_allclose([h.score for h in hits], scores_by_hand(hits, refined), atol=1e-4)
    searcher.store.close()


def test_one_query_batch_runs_the_sentence_model_once_for_all_its_readers():
    from diffgap.encoders.sentence import RECENT_BATCHES, RECENT_MAX_TEXTS

    model = load_sentence_encoder("minilm-l6")
    calls = []
    forward = model.model.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    model.model.forward = counted
    try:
        first = model.token_states(["a dog barks loudly"])
        again = model.token_states(["a dog barks loudly"])  # the adapter reading what the text tower read
        assert len(calls) == 1 and all(a is b for a, b in zip(first, again, strict=True))
        for i in range(RECENT_BATCHES):  # older batches make way
            model.token_states([f"query {i}"])
        model.token_states(["a dog barks loudly"])
        assert len(calls) == RECENT_BATCHES + 2
        big = [f"caption {i}" for i in range(RECENT_MAX_TEXTS + 1)]  # a training-sized batch is not kept
        model.token_states(big)
        model.token_states(big)
        assert len(calls) == RECENT_BATCHES + 4
    finally:
        del model.model.forward
    np.testing.assert_allclose(model.token_states(["a dog barks loudly"])[0], first[0])


def test_pairs_keep_their_texts_row_aligned_through_a_split():
    data = _pairs(slice(0, 3))
    fit, held_out = data.split(0.34, seed=0)
    for part in (fit, held_out):
        assert part.texts is not None and len(part.texts) == len(part.query)
        for text, group in zip(part.texts, part.query_group, strict=True):
            original = next(g for g, captions in enumerate(CAPTIONS) if text in captions)
            assert part.audio_keys[group] == str(original)


def test_by_default_an_adapter_is_fitted_only_where_it_shares_the_towers_sentence_pass(tmp_path, tiny_clap):
    from conftest import train_tiny_towers

    from diffgap.encoders import load_encoders
    from diffgap.training.adapter import sentence_model_for, wanted

    train_tiny_towers(tmp_path, d_model=32, prior="minilm-l6", prior_mode="beside", sentence_head="linear")
    beside, clap = load_encoders(f"compact:{tmp_path / 'enc'}"), load_encoders(f"clap:{tiny_clap}")
    default = AdapterTrainConfig(only_shared=True)  # what refiner train does unless told
    assert sentence_model_for(beside, default) == "minilm-l6" and wanted(beside, default)
    assert sentence_model_for(clap, default) == "minilm-l6" and not wanted(clap, default)
    assert wanted(clap, AdapterTrainConfig()) and not wanted(clap, None)  # --adapter; --no-adapter


def test_fitting_keeps_the_weights_of_the_best_held_out_score_and_stops_when_it_stops_improving():
    sentence = load_sentence_encoder("minilm-l6")
    data = _pairs(slice(0, 2))
    adapter = TextAdapter.new(sentence, DIM, seed=0)
    reading = SentenceStates(sentence, data.texts, adapter.head.cfg.max_tokens)
    scripted = iter([0.2, 0.6, 0.5, 0.4, 0.6, 0.3] + [0.0] * 20)  # best at the 2nd check; a tie is not better
    seen: list[dict[str, torch.Tensor]] = []

    def held_out() -> float:
        assert not adapter.head.training and not torch.is_grad_enabled()  # scored as served
        seen.append(copy.deepcopy(adapter.head.state_dict()))
        return next(scripted)

    fit = HeadFit(steps=200, lr=3e-3, weight_decay=0.01, seed=0, one_cycle=True, check_every=5, patience=4)
    xa = torch.from_numpy(data.audio[data.query_group])
    fitted = fit_head(adapter.head, adapter.read, reading, data.texts, xa, fit, held_out)
    # checks at steps 5, 10, ..., 30: the 2nd is best, the 3rd-6th are no better, so it stops at step 30
    assert (fitted.steps, fitted.best_step, fitted.best_score, len(seen)) == (30, 10, 0.6, 6)
    for name, value in adapter.head.state_dict().items():
        torch.testing.assert_close(value, seen[1][name])  # the kept weights are those scored at step 10
    assert any(not torch.equal(seen[5][k], seen[1][k]) for k in seen[1])  # and training had moved on since


def test_an_adapter_fitted_with_held_out_pairs_is_the_best_it_scored_on_them():
    # four clips train the head, two are held out: their captions rank among all six clips
    data = _pairs(slice(0, 3))
    train, val = data.subset_groups(np.arange(4)), data.subset_groups(np.arange(4, 6))
    cfg = AdapterTrainConfig(steps=120, lr=3e-3, check_every=10, patience=3)
    adapter, fitted = fit_adapter(train, "minilm-l6", cfg, val)
    assert fitted.best_step is not None and fitted.best_step % 10 == 0 and fitted.steps <= 120
    reading = SentenceStates(adapter.sentence, val.texts, adapter.head.cfg.max_tokens)
    assert held_out_score(adapter, reading, train, val)() == pytest.approx(fitted.best_score)
    assert fit_adapter(train, "minilm-l6", cfg)[1].best_step is None  # no held-out pairs: no checks
