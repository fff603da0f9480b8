"""Searching a library by its words and its sound: full-text + dense fusion, one hit per file,
duplicates, every sound extension, excluded folders, descriptions worth searching."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
from conftest import tone

from diffgap.index.duplicates import near_groups
from diffgap.index.layout import FTS_TABLE
from diffgap.index.store import IndexStore
from diffgap.media import tags
from diffgap.media.audio import write_audio
from diffgap.media.tags import describe, describe_name, split_joined
from diffgap.pipeline import build, update
from diffgap.retrieval.search import Query, match_expression, open_searcher, tied_ranks
from indexer.cli import main

NAMED = {  # file -> (tone Hz, seconds)
    "animals/horse_neigh.wav": (300, 1.0),
    "animals/dog_bark.wav": (500, 1.0),
    "weapons/explosion_big.wav": (700, 1.0),
    "weapons/sword_hit_metal.wav": (900, 1.0),
    "ui/door_creak.flac": (1100, 1.0),
    "ui/bellchime.ogg": (1300, 1.0),
    "long/rain_ambience.wav": (1500, 7.0),
}


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_clap):
    root = tmp_path_factory.mktemp("library")
    corpus = root / "corpus"
    for rel, (freq, seconds) in NAMED.items():
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        write_audio(corpus / rel, tone(freq, seconds, 16000), 16000)
    shutil.copy(corpus / "animals/dog_bark.wav", corpus / "animals/dog_bark_copy.wav")  # the same bytes
    write_audio(corpus / "ui/login.oga", tone(1700, 1.0, 16000), 16000)
    (corpus / "ui/theme.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x00\x60")
    (corpus / "ui/readme.txt").write_text("not a sound")
    assert build(root / "index", f"clap:{tiny_clap}", corpus=corpus).total_items > 0
    return root


def search(root, text, **options):
    searcher = open_searcher(root / "index")
    try:
        return searcher.search(Query("text", options.pop("k", 5), text=text, **options)).hits
    finally:
        searcher.store.close()


def test_words_find_what_the_names_say(library):
    cases = [
        ("horse", "animals/horse_neigh.wav"),
        ("explosion", "weapons/explosion_big.wav"),
        ("swords hitting metal", "weapons/sword_hit_metal.wav"),
    ]
    if tags.word_list():  # "bellchime" splits into "bell chime" only with a word list (.ci/run installs one)
        cases.append(("a bell chime", "ui/bellchime.ogg"))
    for text, want in cases:
        hits = search(library, text, lexical=True)
        assert hits[0].item.path == want and hits[0].lexical_rank == 1, (text, [h.item.path for h in hits])
    dense = search(library, "horse", lexical=False)
    assert all(h.lexical_rank is None for h in dense)


def test_a_library_whose_names_say_nothing_ranks_as_dense_search_does(tmp_path, tiny_clap):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, freq in enumerate((300, 600, 900, 1200, 1500, 1800)):
        write_audio(corpus / f"sound{i:03d}.wav", tone(freq, 1.0, 16000), 16000)
    assert build(tmp_path / "index", f"clap:{tiny_clap}", corpus=corpus).total_items == 6
    for text in ("a dog barking", "sound", "001"):
        hybrid = search(tmp_path, text, lexical=True, k=6)
        dense = search(tmp_path, text, lexical=False, k=6)
        assert [(h.item.id, h.score) for h in hybrid] == [(h.item.id, h.score) for h in dense]


def test_one_hit_per_file_unless_windows_are_asked_for(library):
    hits = search(library, "rain", lexical=False, k=20)
    paths = [h.item.path for h in hits]
    assert len(paths) == len(set(paths))
    rain = next(h for h in hits if h.item.path == "long/rain_ambience.wav")
    assert rain.windows >= 3
    windows = search(library, "rain", lexical=False, k=20, collapse=False)
    assert sum(h.item.path == "long/rain_ambience.wav" for h in windows) >= 3


def test_byte_identical_files_are_one_hit_that_lists_the_other(library, capsys):
    hits = search(library, "dog", lexical=True, k=10)
    dog = [h for h in hits if h.item.path.startswith("animals/dog_bark")]
    assert len(dog) == 1 and len(dog[0].duplicates) == 1
    assert {dog[0].item.path, *dog[0].duplicates} == {"animals/dog_bark.wav", "animals/dog_bark_copy.wav"}
    assert main(["duplicates", str(library / "index"), "--near", "0.999", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["exact"] == [["animals/dog_bark.wav", "animals/dog_bark_copy.wav"]]
    assert any({"animals/dog_bark.wav", "animals/dog_bark_copy.wav"} <= set(g) for g in found["near"])
    with IndexStore.open(library / "index", readonly=True) as store:
        assert all(len(g) >= 2 for g in near_groups(store, 0.5))


def test_every_sound_extension_is_indexed_or_skipped_with_a_reason(library):
    with IndexStore.open(library / "index", readonly=True) as store:
        state = store.file_state()
        skipped = dict(store.skipped())
    assert state["ui/login.oga"][1] == "indexed"
    assert "MIDI" in skipped["ui/theme.mid"]
    assert "ui/readme.txt" not in state  # not a sound file: not scanned


def test_excluded_folders_stay_out_through_updates(library, tiny_clap, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(library / "corpus", corpus)
    index = tmp_path / "index"
    assert build(index, f"clap:{tiny_clap}", corpus=corpus, exclude=["weapons", "*_copy.wav"]).total_items > 0
    write_audio(corpus / "weapons/new_gun.wav", tone(400, 1.0, 16000), 16000)
    update(index)
    with IndexStore.open(index, readonly=True) as store:
        paths = set(store.file_state())
        assert store.manifest.exclude == ["weapons", "*_copy.wav"]
    assert not any(p.startswith("weapons/") or p.endswith("_copy.wav") for p in paths)
    assert "animals/horse_neigh.wav" in paths


def test_words_are_kept_in_step_by_key(library, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(library / "index", index)
    with IndexStore.open(index) as store:
        assert store.remove_files(["animals/horse_neigh.wav"]) == 1
        assert store.lexical_search('"horse"') == []
        assert [p for p, _ in store.lexical_search('"dog"')] != []
        words = store.db.execute(f"SELECT COUNT(*) FROM {FTS_TABLE}").fetchone()[0]
        files = store.db.execute("SELECT COUNT(*) FROM files WHERE status = 'indexed'").fetchone()[0]
        assert words == files
        orphans = store.db.execute(f"SELECT COUNT(*) FROM {FTS_TABLE} WHERE rowid NOT IN (SELECT rowid FROM files)")
        assert orphans.fetchone()[0] == 0


def test_an_index_from_before_full_text_search_gets_its_words_on_the_next_write(library, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(library / "index", index)
    with sqlite3.connect(index / "meta.sqlite") as db:
        db.execute(f"DROP TABLE {FTS_TABLE}")
    with IndexStore.open(index, readonly=True) as store:
        assert not store.has_lexical and store.lexical_search('"horse"') == []
    IndexStore.open(index).close()  # a writer migrates
    with IndexStore.open(index, readonly=True) as store:
        assert [p for p, _ in store.lexical_search('"horse"')] == ["animals/horse_neigh.wav"]


def test_descriptions_split_joined_words_and_drop_placeholders(tmp_path, monkeypatch):
    words = tmp_path / "words"
    words.write_text("\n".join(["mine", "impact", "just", "you", "wait", "tree", "hit", "door", "open"]))
    known = frozenset(words.read_text().split())
    assert split_joined("mineimpact", known) == ["mine", "impact"]
    assert split_joined("justyouwait", known) == ["just", "you", "wait"]
    assert split_joined("zzqxwvyy", known) == ["zzqxwvyy"]
    assert split_joined("tree", known) == ["tree"]
    monkeypatch.setenv("DIFFGAP_WORDS", str(words))
    tags.word_list.cache_clear()
    try:
        assert describe_name("sounds/treehit.ogg") == "tree hit"
        assert describe_name("dooropen.wav") == "door open"
    finally:
        tags.word_list.cache_clear()
    assert describe_name("hedgewars/5G.ogg").endswith("5g")  # a name with no words keeps its tokens
    assert describe("a/untitled.ogg", {"title": "Untitled", "comment": "wind gust"}) == "wind gust"


def test_match_expressions_and_tied_ranks():
    assert match_expression('the "horse" OR* (neigh) horse') == '"horse" OR "neigh"'
    assert match_expression("  ") == ""
    assert tied_ranks([("a", 2.0), ("b", 5.0), ("c", 2.0), ("d", 1.0)]) == {"b": 1, "a": 2, "c": 2, "d": 4}


def test_the_api_fuses_words_and_says_which_signal_found_a_hit(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/readyz").json()["meaning"] == "minilm-l6"
        fused = c.post("/v1/search", json={"text": "demo", "k": 3}).json()["results"]
        assert all(h["lexical_rank"] is not None and h["meaning_rank"] and h["dense_rank"] for h in fused)
        exact = c.post("/v1/search", json={"text": "demo", "k": 3, "meaning": False}).json()["results"]
        assert all(h["lexical_rank"] is not None and h["meaning_rank"] is None for h in exact)
        plain = c.post("/v1/search", json={"text": "demo", "k": 3, "lexical": False}).json()["results"]
        assert all(h["lexical_rank"] is None and h["meaning_rank"] is None for h in plain)
        windows = c.post("/v1/search", json={"text": "a beep", "k": 3, "collapse": False}).json()["results"]
        assert len(windows) == 3 and all(h["windows"] == 1 for h in windows)
    assert np.isfinite([h["score"] for h in fused]).all()
