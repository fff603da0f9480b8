from __future__ import annotations

import pytest

from diffgap.training.pairs import PairsError, read_pairs


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_generic_csv_with_split_and_video(tmp_path):
    _touch(tmp_path / "audio/a.wav")
    _touch(tmp_path / "audio/b.wav")
    (tmp_path / "p.csv").write_text(
        "id,split,audio,video,caption\n"
        "a,train,audio/a.wav,video/a.mp4,a dog barks\n"
        "a,train,audio/a.wav,video/a.mp4,barking dog\n"
        "b,test,audio/b.wav,,rain\n"
    )
    train = read_pairs(tmp_path / "p.csv", split="train")
    assert [p.text for p in train] == ["a dog barks", "barking dog"]
    assert train[0].audio == tmp_path / "audio/a.wav" and train[0].video == tmp_path / "video/a.mp4"
    assert train[0].key == train[1].key  # two captions, one target
    assert read_pairs(tmp_path / "p.csv", split="test")[0].video is None
    with pytest.raises(PairsError, match="no usable rows"):
        read_pairs(tmp_path / "p.csv", split="nope")


def test_generic_csv_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("file,words\nx.wav,hi\n")
    with pytest.raises(PairsError, match="'audio' column"):
        read_pairs(tmp_path / "bad.csv")
    (tmp_path / "nosplit.csv").write_text("audio,text\nx.wav,hi\n")
    with pytest.raises(PairsError, match="no 'split' column"):
        read_pairs(tmp_path / "nosplit.csv", split="train")
    with pytest.raises(PairsError, match="does not exist"):
        read_pairs(tmp_path / "missing.csv")


def test_audiocaps_layouts(tmp_path):
    _touch(tmp_path / "wav/91139.wav")
    _touch(tmp_path / "wav/abcDEF_30.flac")
    (tmp_path / "train.csv").write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        "91139,r1nicOVtvkQ,130,A woman talks\n"
        "11111,abcDEF,30,Rain falls\n"
        "22222,missing,0,Not downloaded\n"
    )
    pairs = read_pairs(tmp_path / "train.csv", audio_dir=tmp_path / "wav")
    assert [(p.audio.name, p.text) for p in pairs] == [("91139.wav", "A woman talks"), ("abcDEF_30.flac", "Rain falls")]


def test_clotho_layout(tmp_path):
    _touch(tmp_path / "development/birds.wav")
    (tmp_path / "clotho_captions_development.csv").write_text(
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
        "birds.wav,Birds sing,Chirping,Many birds,Song birds,Birds at dawn\n"
        "gone.wav,a,b,c,d,e\n"
    )
    pairs = read_pairs(tmp_path / "clotho_captions_development.csv", audio_dir=tmp_path / "development")
    assert len(pairs) == 5 and {p.key for p in pairs} == {"birds.wav"}


def test_several_splits_at_once(tmp_path):
    (tmp_path / "p.csv").write_text("split,audio,text\na,1.wav,x\nb,2.wav,y\nc,3.wav,z\n")
    assert [p.text for p in read_pairs(tmp_path / "p.csv", split="a,c")] == ["x", "z"]
