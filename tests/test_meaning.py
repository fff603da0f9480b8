"""Words matched by meaning: the sentence model read offline from its wheel (and a tiny random BERT
from a directory), each file's description embedded at build and update and kept in step with the
files, text queries that find files whose names share no word with them, the compact text tower
trained over the sentence model's token states."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import captioned_tones, tone, train_tiny_towers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel

from diffgap.encoders import EncoderLoadError, load_encoders
from diffgap.encoders import sentence as sentence_module
from diffgap.encoders.compact import CompactModel, train_tokenizer
from diffgap.encoders.sentence import DEFAULT_SENTENCE_MODEL, SentenceEncoder, load_sentence_encoder
from diffgap.encoders.vocabulary import CorpusWordRewriter, read_words, unknown_share
from diffgap.index.layout import MEANING_TABLE
from diffgap.index.store import IndexStore
from diffgap.media.audio import decode_audio, write_audio
from diffgap.models.audio_net import AudioNetConfig
from diffgap.models.text_net import TextNet, TextNetConfig, mix_sides
from diffgap.pipeline import build, update
from diffgap.retrieval.search import Query, open_searcher
from diffgap.training.encoders import HEAD_WEIGHTS, EncoderTrainConfig, sentence_reading, train_compact_encoders
from diffgap.training.pairs import Pair
from indexer.cli import main

NAMED = {  # file -> tone Hz: names a query can reach by meaning, not by a shared word
    "animals/horse_neigh.wav": 300,
    "animals/dog_bark.wav": 500,
    "weapons/musket_fire.wav": 700,
    "weapons/sword_hit_metal.wav": 900,
    "ui/door_creak.flac": 1100,
    "weather/rain_ambience.wav": 1500,
}


def tiny_bert_dir(path, vocab=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "dog", "cat", "rain", "bell", "a", "the")):
    """A random 2-layer BERT of the real class, saved as a sentence model directory."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)  # fmt: skip
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(path / "tokenizer.json"))
    return path


def test_the_sentence_model_loads_offline_from_its_wheel_and_knows_what_words_mean(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_sentence_encoder(DEFAULT_SENTENCE_MODEL)
    assert model.dim == 384 and model.ref.sha256 == sentence_module.SENTENCE_MODELS[DEFAULT_SENTENCE_MODEL][2]
    v = model.encode(["gunshot", "a rifle firing", "a bird singing", "", "gunshot"])
    assert v.shape == (5, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1
    np.testing.assert_allclose(v[0], v[4], atol=1e-5)  # batched with others or not, the same vector
    states, mask, ids = model.token_states(["a dog", "a dog barks twice"])
    assert ids.shape == mask.shape and int(ids.max()) < model.vocab_size
    assert states.shape[:2] == mask.shape and mask.sum(1)[0] == 4 and mask.sum(1)[1] > 4  # [CLS] a dog [SEP]


def test_a_missing_or_different_sentence_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sentence_module.SENTENCE_MODELS, "absent", ("no_such_sentence_package", "model", "0" * 64))
    with pytest.raises(EncoderLoadError, match="no_such_sentence_package.*pip install"):
        load_sentence_encoder("absent")
    with pytest.raises(EncoderLoadError, match="unknown sentence model"):
        load_sentence_encoder("nope")
    bert = tiny_bert_dir(tmp_path / "bert")
    with pytest.raises(EncoderLoadError, match="sha256"):
        SentenceEncoder("pretender", bert, expected_sha256="f" * 64)  # another file under a known name
    (bert / "tokenizer.json").unlink()
    with pytest.raises(EncoderLoadError, match="tokenizer.json"):
        SentenceEncoder("broken", bert)


def test_a_sentence_model_directory_of_the_real_class_works(tmp_path):
    model = load_sentence_encoder(str(tiny_bert_dir(tmp_path / "bert")))
    v = model.encode(["a dog", "the rain", "a dog"])
    assert v.shape == (3, 16) and np.allclose(v[0], v[2], atol=1e-6)
    assert len(model.ref.sha256) == 64


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_clap):
    root = tmp_path_factory.mktemp("meaning")
    for rel, freq in NAMED.items():
        (root / "corpus" / rel).parent.mkdir(parents=True, exist_ok=True)
        write_audio(root / "corpus" / rel, tone(freq, 1.0, 16000), 16000)
    assert build(root / "index", f"clap:{tiny_clap}", corpus=root / "corpus").total_items == len(NAMED)
    return root


def hits_for(index, text, **options):
    searcher = open_searcher(index)
    try:
        return searcher.search(Query("text", options.pop("k", 3), text=text, lexical=True, **options)).hits
    finally:
        searcher.store.close()


def test_text_finds_files_whose_words_mean_the_same(library):
    with IndexStore.open(library / "index", readonly=True) as store:
        assert store.manifest.meaning["name"] == DEFAULT_SENTENCE_MODEL and store.has_meaning
        assert store.db.execute(f"SELECT COUNT(*) FROM {MEANING_TABLE}").fetchone()[0] == len(NAMED)
    for text, want in (
        ("puppy", "animals/dog_bark.wav"),
        ("a pistol shot", "weapons/musket_fire.wav"),
        ("thunderstorm", "weather/rain_ambience.wav"),
        ("stallion", "animals/horse_neigh.wav"),
    ):
        hits = hits_for(library / "index", text)
        assert hits[0].item.path == want and hits[0].meaning_rank == 1, (text, [h.item.path for h in hits])
        assert hits[0].lexical_rank is None  # no word in common: meaning alone found it
        exact_only = hits_for(library / "index", text, meaning=False)
        assert all(h.meaning_rank is None for h in exact_only)


def test_meaning_vectors_follow_the_files_through_updates(library, tiny_clap, tmp_path):
    corpus, index = tmp_path / "corpus", tmp_path / "index"
    shutil.copytree(library / "corpus", corpus)
    build(index, f"clap:{tiny_clap}", corpus=corpus, meaning="off")
    with IndexStore.open(index, readonly=True) as store:
        assert store.manifest.meaning is None and not store.has_meaning
    assert hits_for(index, "puppy")[0].meaning_rank is None  # an index without them: exact words only
    (corpus / "animals/horse_neigh.wav").unlink()
    write_audio(corpus / "animals/cat_meow.wav", tone(2000, 1.0, 16000), 16000)
    update(index)  # an index that had none gets them (the model is installed), the new file too
    with IndexStore.open(index, readonly=True) as store:
        paths, xb = store.meaning_vectors()
        assert sorted(paths) == sorted({*NAMED, "animals/cat_meow.wav"} - {"animals/horse_neigh.wav"})
        orphans = f"SELECT COUNT(*) FROM {MEANING_TABLE} WHERE file_rowid NOT IN (SELECT rowid FROM files)"
        assert store.db.execute(orphans).fetchone()[0] == 0
    assert hits_for(index, "kitten")[0].item.path == "animals/cat_meow.wav"
    assert main(["update", str(index), "--meaning", "off", "-q"]) == 0
    with IndexStore.open(index, readonly=True) as store:
        assert store.manifest.meaning is None and store.meaning_vectors()[0] == []


@pytest.mark.parametrize("mode", ["tokens", "residual", "pooled", "dual", "beside"])
def test_a_tiny_tower_over_the_sentence_model_trains_and_round_trips(tmp_path, mode):
    stats = train_tiny_towers(tmp_path, d_model=32, prior=DEFAULT_SENTENCE_MODEL, prior_mode=mode)
    assert stats["steps"] == 3 and np.isfinite(stats["loss"])
    text = load_encoders(f"compact:{tmp_path / 'enc'}").text
    fp = text.fingerprint.preprocessing
    assert fp["prior"] == DEFAULT_SENTENCE_MODEL and fp["prior_mode"] == mode
    assert fp["prior_sha256"] == load_sentence_encoder().ref.sha256
    saved = text.model.state_dict()
    assert not any(k.startswith("text.sentence") or "embeddings.word" in k for k in saved)  # the frozen model stays out
    assert ("text.tok.weight" in saved) == (mode in ("residual", "dual", "beside"))  # its own embeddings only
    if mode in ("dual", "beside"):  # the corpus tokenizer travels with the towers, the sentence side reads 384-d
        branch = "text.sent.weight" if mode == "dual" else "text.head.inp.weight"  # beside: a states head
        width = 32 if mode == "dual" else text.model.text.cfg.head_d_model
        assert (tmp_path / "enc" / "tokenizer.json").is_file() and saved[branch].shape == (width, 384)
        assert saved["text.tok.weight"].shape[0] == text.model.tokenizer.get_vocab_size()
    assert ("prior_weight" in fp) == (mode == "beside")
    vectors = text.encode(["a dog barks", "an unseen word: xylophonic"])
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    again = load_encoders(f"compact:{tmp_path / 'enc'}").text
    assert again.fingerprint.digest == text.fingerprint.digest
    np.testing.assert_allclose(again.encode(["a dog barks"]), vectors[:1], atol=1e-5)


def test_a_sentence_prior_takes_its_own_modes(tmp_path):
    pairs = []
    for i in range(4):
        write_audio(tmp_path / f"{i}.wav", tone(300 + 200 * i, 1.0, 16000), 16000)
        pairs.append(Pair(tmp_path / f"{i}.wav", text=f"hum {i}"))
    cfg = EncoderTrainConfig(epochs=1, text=TextNetConfig(prior=DEFAULT_SENTENCE_MODEL, prior_mode="finetune"))
    with pytest.raises(ValueError, match="modes are beside, tokens, residual, pooled, dual"):
        train_compact_encoders(pairs, tmp_path / "enc", cfg, use_video=False)


def test_a_dual_tower_reads_its_corpus_branch_except_when_training_drops_it():
    cfg = TextNetConfig(vocab_size=50, max_tokens=8, d_model=16, n_layers=1, n_heads=2, dim=8, prior="any",
                        prior_mode="dual", prior_dim=12, corpus_drop=1.0)  # fmt: skip
    net = TextNet(cfg)
    ids_a, ids_b = torch.tensor([[5, 6, 7]]), torch.tensor([[9, 3, 4]])
    sentence = torch.nn.functional.normalize(torch.randn(1, 12), dim=-1)  # (1, 12)
    net.train()  # every caption's corpus branch dropped: the sentence vector alone places it
    torch.testing.assert_close(net(ids_a, sentence=sentence), net(ids_b, sentence=sentence))
    net.eval()  # at search time both branches count
    assert not torch.allclose(net(ids_a, sentence=sentence), net(ids_b, sentence=sentence))


def test_the_unknown_word_share_counts_words_the_corpus_vocabulary_must_spell():
    tok = train_tokenizer(["a dog barks", "a bird chirps twice", "rain falls"] * 5, vocab_size=200)
    shares = unknown_share(read_words(tok, ["A dog barks!", "a xylophone barks", "", "..."])).tolist()
    assert shares == pytest.approx([0.0, 1 / 3, 0.0, 0.0])  # case and punctuation are not words


def test_words_the_corpus_lacks_are_read_as_their_nearest_corpus_words():
    tok = train_tokenizer(["a dog barks", "a bell rings twice", "rain falls softly"] * 5, vocab_size=200)
    rewriter = CorpusWordRewriter(tok, load_sentence_encoder(), min_similarity=0.4)
    assert {"barks", "bell", "rings", "twice", "rain", "falls", "softly"} <= set(rewriter.vocabulary)
    assert "##s" not in rewriter.vocabulary and "a" not in rewriter.vocabulary  # pieces and short words
    out = rewriter(["A dog barking!", "a bell rings twice", "", "zzqx rain"])
    # an inflection the corpus lacks becomes the corpus's own form (the WordPiece trainer may keep "bark"
    # as a word-initial piece of "barks": both are readings the corpus tower knows)
    assert out[0] in ("a dog barks !", "a dog bark !")
    assert out[1] == "a bell rings twice"  # known words are never touched
    assert out[2] == "" and out[3] == "zzqx rain"  # nothing alike enough: the word stays as written
    strict = CorpusWordRewriter(tok, load_sentence_encoder(), min_similarity=0.99)
    assert strict(["A dog barking!"]) == ["a dog barking !"]
    assert rewriter(["a dog barking"]) == [out[0][:-2]]  # remembered: the same answer again


def test_a_beside_tower_reads_its_rewritten_words_and_older_towers_do_not_rewrite(tmp_path):
    train_tiny_towers(tmp_path, d_model=32, prior=DEFAULT_SENTENCE_MODEL, prior_mode="beside", sentence_head="linear")
    encoders = load_encoders(f"compact:{tmp_path / 'enc'}")
    model = encoders.text.model
    assert model.rewriter is not None and encoders.text.fingerprint.preprocessing["rewrite_similarity"] == 0.4
    assert encoders.text.fingerprint.preprocessing["sentence_head"] == "linear"
    vectors = encoders.text.encode(["a dog barks"])
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    del config["text"]["rewrite_similarity"], config["text"]["sentence_head"]  # as saved before the fields existed
    (tmp_path / "enc" / "config.json").write_text(json.dumps(config))
    older = CompactModel.load(tmp_path / "enc")
    assert older.rewriter is None and older.text.cfg.sentence_head == "linear"  # the head it was saved with
    again = load_encoders(f"compact:{tmp_path / 'enc'}").text.encode(["a dog barks"])
    np.testing.assert_allclose(again, vectors, atol=1e-5)  # no word to rewrite here: the same reading
    for bad, named in (({"sentence_head": "mlp"}, "'mlp'"), ({"sentence_heads": "states"}, "'sentence_heads'")):
        (tmp_path / "enc" / "config.json").write_text(json.dumps({**config, "text": {**config["text"], **bad}}))
        with pytest.raises(EncoderLoadError, match=f"does not describe towers .*{named}"):  # a value or a field
            load_encoders(f"compact:{tmp_path / 'enc'}")


@pytest.mark.parametrize("head", ["states", "linear"])
def test_a_beside_tower_mixes_its_sides_by_the_share_of_unknown_words(head):
    cfg = TextNetConfig(vocab_size=50, max_tokens=8, d_model=16, n_layers=1, n_heads=2, dim=8, prior="any",
                        prior_mode="beside", prior_dim=12, prior_weight=0.25, sentence_head=head,
                        head_d_model=16)  # fmt: skip
    net = TextNet(cfg).eval()
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])  # (2, 3)
    if head == "linear":
        reading = {"sentence": torch.randn(2, 12)}  # (2, 12) the sentence model's vectors
    else:
        mask = torch.tensor([[True, True, True, True], [True, True, False, False]])  # (2, 4)
        reading = {"states": torch.randn(2, 4, 12), "mask": mask}  # its token states
    corpus, side = net(ids), net.sentence_side(**reading)  # token ids alone: the corpus tower, as it trains
    torch.testing.assert_close(side.norm(dim=-1), torch.ones(2))
    mixed = net(ids, **reading, unknown=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(mixed[1], side[1])  # every word unknown: the sentence side alone
    torch.testing.assert_close(mixed[0], torch.nn.functional.normalize(0.75 * corpus[0] + 0.25 * side[0], dim=-1))
    torch.testing.assert_close(mix_sides(corpus, side, torch.zeros(2), 0.0), corpus)
    if head == "states":  # padding is not read
        padded = {"states": reading["states"].clone(), "mask": mask}
        padded["states"][1, 2:] = 100.0
        torch.testing.assert_close(net.sentence_side(**padded), side)


@pytest.mark.slow
def test_a_beside_head_learns_to_place_captions_and_its_weight_is_picked_on_held_out_clips(tmp_path):
    pairs = captioned_tones(tmp_path)
    # 60 one-batch epochs: after 30, the tiny audio tower's eval-mode vectors of the six tones were still
    # near-identical (cosine > 0.999) for 4 of seeds 0-5, and for 2 of them no head could place captions
    # on them; after 60 the closest two tones were below 0.95 for all six seeds (BENCHMARKS.md run 17).
    cfg = EncoderTrainConfig(epochs=60, batch_size=6, warmup_steps=1, lr=3e-3,
                             audio=AudioNetConfig(channels=(8, 8, 16, 16), d_model=32, n_layers=1, n_heads=2, dim=32),
                             text=TextNetConfig(n_layers=1, n_heads=2, dim=32, prior=DEFAULT_SENTENCE_MODEL,
                                                prior_mode="beside"))  # fmt: skip
    stats = train_compact_encoders(pairs, tmp_path / "enc", cfg, use_video=False, val_pairs=pairs[:4])
    assert stats["head_captions"] == 6 and stats["head_weight"] in HEAD_WEIGHTS
    assert stats["head_loss"] < math.log(6) - 0.5  # below chance: InfoNCE over 6 clips starts at log 6
    encoders = load_encoders(f"compact:{tmp_path / 'enc'}")
    model = encoders.text.model
    assert model.text.cfg.prior_weight == stats["head_weight"]  # what was picked is what loads
    with torch.no_grad():
        side = model.text.sentence_side(**sentence_reading(model.text_inputs([p.text for p in pairs])))
    xb = encoders.audio.encode([decode_audio(p.audio, 16000).wave for p in pairs])  # (6, 32)
    scores = side.numpy() @ xb.T  # (6 captions, 6 tones)
    ranks = (scores > np.diag(scores)[:, None]).sum(1) + 1  # each caption's own tone, among the six
    assert ranks.mean() <= 2.0, ranks  # chance is 3.5
