"""Annotation reader over every shipped GRAM annotation file, malformed inputs, exact media resolution."""

import json
import pickle
from pathlib import Path

import pytest

from gram.data.annotations import (
    AnnotationError,
    AnnotationRecord,
    read_annotations,
    read_id_list,
    resolve_media,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ANNOTATIONS = SHARED / "data" / "annotations"

# file -> (records, captions per record (None: one string each), records with a subtitle field,
#          records with an empty subtitle, records with an extra field, the extra field's name)
SHIPPED = {
    "msrvtt/descs_ret_test.json": (1000, None, 1000, 238, 0, None),
    "msrvtt/unique_descs_ret_train.json": (9000, None, 9000, 2109, 0, None),
    "msrvtt/descs_ret_test_audcap_with_audio_captions.json": (1000, None, 1000, 238, 884, "audio_caption"),
    "didemo/descs_ret_test.json": (1003, None, 0, 0, 0, None),
    "didemo/descs_ret_train.json": (8363, None, 0, 0, 0, None),
    "activitynet/descs_ret_test.json": (4917, None, 0, 0, 0, None),
    "activitynet/descs_ret_train.json": (10009, None, 0, 0, 0, None),
    "vatex/descs_ret_test.json": (1500, 10, 1500, 759, 0, None),
    "audiocaps/descs_ret_test.json": (729, 5, 0, 0, 0, None),
    "youcook/descs_cap_test.json": (3216, None, 3216, 216, 0, None),
}


def _shipped(name: str) -> Path:
    path = ANNOTATIONS / name
    if not path.is_file():
        pytest.skip(f"shared annotation file {path} is absent")
    return path


def test_every_shipped_file_is_covered():
    if not ANNOTATIONS.is_dir():
        pytest.skip("shared annotations are absent")
    on_disk = {p.relative_to(ANNOTATIONS).as_posix() for p in ANNOTATIONS.rglob("*.json")}
    assert on_disk == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_file_counts(name):
    path = _shipped(name)
    count, per_record, with_subtitle, empty_subtitle, with_extra, extra_key = SHIPPED[name]
    records = read_annotations(path)
    raw = json.loads(path.read_text())
    assert len(records) == count == len(raw)
    assert all(isinstance(r, AnnotationRecord) for r in records)
    assert len({r.video_id for r in records}) == count
    assert [r.video_id for r in records] == [str(x["video_id"]) for x in raw]
    expected_captions = [per_record or 1] * count
    assert [len(r.captions) for r in records] == expected_captions
    assert sum(r.subtitle is not None for r in records) == with_subtitle
    assert sum(r.subtitle == "" for r in records) == empty_subtitle
    assert sum(bool(r.extra) for r in records) == with_extra
    if extra_key:
        assert all(set(r.extra) <= {extra_key} for r in records)
    assert records.num_dropped == 0 and records.source == path


def test_captions_keep_every_caption_in_order():
    path = _shipped("vatex/descs_ret_test.json")
    raw = json.loads(path.read_text())
    records = read_annotations(path)
    assert records[7].captions == [c.strip() for c in raw[7]["desc"]]
    assert records[7].subtitle == raw[7]["subtitle"].strip()


def test_audiocaps_ids_keep_their_dots():
    records = read_annotations(_shipped("audiocaps/descs_ret_test.json"))
    assert sum(len(r.captions) for r in records) == 729 * 5
    assert all(r.video_id.count(".") == 2 for r in records)  # e.g. GOD8Bt5LfDE_100.000_110.000


def test_didemo_corrupted_ids_are_dropped_and_counted():
    train = _shipped("didemo/descs_ret_train.json")
    corrupted = _shipped("didemo/corrupted")
    ids = read_id_list(corrupted)
    assert len(ids) == 3
    records = read_annotations(train, corrupted=corrupted)
    assert len(records) == 8363 - 3
    assert sorted(records.dropped_ids) == sorted(ids) and records.num_dropped == 3
    assert not {r.video_id for r in records} & set(ids)
    test = read_annotations(_shipped("didemo/descs_ret_test.json"), corrupted=ids)
    assert len(test) == 1003 and test.num_dropped == 0


def _write(tmp_path: Path, content, name="anno.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_vast_record_fields(tmp_path):
    path = _write(tmp_path, [{
        "clip_id": "c1", "vast_cap": "a dog barks", "vision_cap": ["a dog", "a brown dog"],
        "audio_cap": "barking", "subtitle": "", "label": 3,
    }])
    (record,) = read_annotations(path)
    assert record.video_id == "c1" and record.captions == ["a dog barks"] and record.subtitle == ""
    assert record.extra == {"vision_cap": ["a dog", "a brown dog"], "audio_cap": "barking", "label": 3}


def test_caption_key_precedence_and_integer_ids(tmp_path):
    path = _write(tmp_path, [{"video_id": 7, "desc": ["x", " y "], "caption": "z"}])
    (record,) = read_annotations(path)
    assert record.video_id == "7" and record.captions == ["x", "y"] and record.extra == {"caption": "z"}


def test_coco_style_file_is_grouped_by_video(tmp_path):
    path = _write(tmp_path, {"annotations": [
        {"video_id": "v2", "caption": "first of v2", "id": 0},
        {"video_id": "v1", "caption": "only v1", "id": 1},
        {"video_id": "v2", "caption": "second of v2", "id": 2},
    ]})
    records = read_annotations(path)
    assert [r.video_id for r in records] == ["v2", "v1"]
    assert records[0].captions == ["first of v2", "second of v2"] and records[0].extra == {"id": [0, 2]}
    assert records[1].captions == ["only v1"]


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not a valid JSON"),
    ({"videos": []}, "expected a JSON list"),
    ('"a string"', "expected a JSON list"),
    ([{"video_id": "a", "desc": "ok"}, ["not", "a", "dict"]], "record 1 is a list"),
    ([{"desc": "no id"}], "record 0 has no id"),
    ([{"video_id": "", "desc": "empty id"}], "record 0 has no id"),
    ([{"video_id": "a", "desc": "ok"}, {"video_id": "b", "subtitle": "s"}], "record 1 (id 'b') has no caption"),
    ([{"video_id": "a", "desc": ["", "  "]}], "record 0 (id 'a') has only empty captions"),
    ([{"video_id": "a", "desc": 5}], "must be a string or a list of strings"),
    ([{"video_id": "a", "desc": "ok", "subtitle": 3}], "non-string subtitle"),
    ({"annotations": {"video_id": "a"}}, "'annotations' must be a list"),
])
def test_malformed_files_raise_naming_the_file(tmp_path, content, fragment):
    path = _write(tmp_path, content)
    with pytest.raises(AnnotationError) as info:
        read_annotations(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        read_annotations(tmp_path / "nope.json")
    with pytest.raises(AnnotationError, match="id list not found"):
        read_annotations(_write(tmp_path, [{"video_id": "a", "desc": "x"}]), corrupted=tmp_path / "nope.txt")
    assert issubclass(AnnotationError, ValueError)


def test_empty_captions_can_be_kept_for_checks(tmp_path):
    path = _write(tmp_path, [{"video_id": "a", "desc": ""}, {"video_id": "b", "desc": "fine"}])
    records = read_annotations(path, allow_empty_captions=True)
    assert [r.captions for r in records] == [[], ["fine"]]


def test_resolve_media_is_exact_not_a_prefix_match(tmp_path):
    for name in ("video10.mp4", "video1.webm", "video1x.mp4", "clip.000_1.000.mp3"):
        (tmp_path / name).write_bytes(b"")
    assert resolve_media(tmp_path, "video1", ["mp4"]) is None  # the reference would pick video10.mp4
    assert resolve_media(tmp_path, "video1", ["mp4", "webm"]) == tmp_path / "video1.webm"
    assert resolve_media(tmp_path, "video10", [".mp4", "webm"]) == tmp_path / "video10.mp4"
    assert resolve_media(tmp_path, "clip.000_1.000", ["wav", "mp3"]) == tmp_path / "clip.000_1.000.mp3"
    assert resolve_media(tmp_path / "absent", "video10", ["mp4"]) is None


def test_resolve_media_follows_extension_order(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "a.mkv").write_bytes(b"")
    assert resolve_media(tmp_path, "a", ["mkv", "mp4"]).name == "a.mkv"
    assert resolve_media(tmp_path, "a", ["mp4", "mkv"]).name == "a.mp4"


def test_resolve_media_rejects_ids_that_name_no_file(tmp_path):
    for bad in ("", "..", "a/.."):
        with pytest.raises(AnnotationError, match="invalid media id"):
            resolve_media(tmp_path, bad, ["mp4"])


def test_records_survive_pickling_for_loader_workers(tmp_path):
    path = _write(tmp_path, [{"video_id": "a", "desc": "x"}, {"video_id": "b", "desc": "y"}])
    records = read_annotations(path, corrupted=["b"])
    copy = pickle.loads(pickle.dumps(records))
    assert list(copy) == list(records) and copy.dropped_ids == ["b"] and copy.source == path
