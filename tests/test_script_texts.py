"""Smaller user-facing fixes: script help texts, make_shards on empty captions (as check_dataset.py counts them),
and the `# @package _global_` header of configs/local files (the documented example is composed for real)."""

from __future__ import annotations

import json
import logging
import re

import pytest

from gram.data.sample import generate_sample_dataset
from gram.main import to_dataclass
from tests.conftest import ROOT, compose_config, load_script


def help_text(module, capsys, call) -> str:
    with pytest.raises(SystemExit):
        call(module)
    return capsys.readouterr().out


def test_convert_checkpoint_description_is_a_whole_sentence(capsys):
    text = help_text(load_script("convert_checkpoint"), capsys, lambda m: m.parse_args(["--help"]))
    description = " ".join(text.split("\n\n")[1].split())  # the paragraph after the usage lines
    assert description.endswith(".") and description.startswith("Convert a released GRAM checkpoint")


def test_make_depth_usage_example_keeps_its_line_break(capsys):
    pytest.importorskip("matplotlib")
    script = load_script("make_depth")
    text = help_text(script, capsys, lambda m: m.main(["--help"]))
    assert "--out data/msrvtt/depth \\\n        --model depth-anything/" in text
    assert "depth         --model" not in text  # the joined line of the broken help


# ------------------------------------------------------------------------------ empty captions in make_shards
@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory) -> dict:
    return generate_sample_dataset(tmp_path_factory.mktemp("texts_sample"), num_train=4, num_test=4, seed=5)


def test_empty_caption_is_skipped_with_one_warning_as_check_dataset_counts_it(tiny_sample, tmp_path, capsys,
                                                                               caplog):
    records = json.loads(tiny_sample["annotations"]["test"].read_text())
    blank = records[1]
    caption_key = next(k for k in ("desc", "caption", "captions") if k in blank)
    blank[caption_key] = "  " if isinstance(blank[caption_key], str) else ["", " "]
    blank_id = str(blank.get("video_id", blank.get("clip_id")))
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(records))

    check = load_script("check_dataset")
    from gram.config import DatasetConfig

    split = DatasetConfig(annotations=str(annotations), video_dir=str(tiny_sample["videos"]),
                          audio_dir=str(tiny_sample["audios"]))
    checked = check.check_split(split, decode="none")
    assert [(i, p) for i, p, _ in checked["problems"] if p == "empty caption"] == [(blank_id, "empty caption")]

    shards = load_script("make_shards")
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING, logger="gram.data.shards"):
        code = shards.main(["--annotations", str(annotations), "--video-dir", str(tiny_sample["videos"]),
                            "--audio-dir", str(tiny_sample["audios"]), "--out", str(out)])
    assert code == 0
    index = json.loads((out / "index.json").read_text())
    assert index["empty_caption_ids"] == [blank_id] and index["total"] == len(records) - 1
    warnings = [r.getMessage() for r in caplog.records if "empty" in r.getMessage()]
    assert len(warnings) == 1 and repr(blank_id) in warnings[0]
    assert "empty captions: 1 (skipped" in capsys.readouterr().out


def test_all_captions_empty_is_one_clear_error(tiny_sample, tmp_path):
    from gram.data.shards import ShardError

    records = json.loads(tiny_sample["annotations"]["test"].read_text())
    for record in records:
        for key in ("desc", "caption", "captions"):
            if key in record:
                record[key] = ""
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(records))
    with pytest.raises(ShardError, match=f"{len(records)} with only empty captions"):
        load_script("make_shards").main(["--annotations", str(annotations), "--video-dir",
                                         str(tiny_sample["videos"]), "--out", str(tmp_path / "shards")])


# ------------------------------------------------------------------------------------- configs/local header
def readme_example() -> str:
    text = (ROOT / "configs" / "local" / "README.md").read_text()
    return re.search(r"```yaml\n(.*?)```", text, re.S).group(1)


def compose_with_local(tmp_path, content: str):
    (tmp_path / "local").mkdir(exist_ok=True)
    (tmp_path / "local" / "machine.yaml").write_text(content)
    return compose_config(f"hydra.searchpath=[file://{tmp_path}]", "local=machine")


def test_documented_local_file_applies_at_the_top(tmp_path):
    example = readme_example()
    assert example.startswith("# @package _global_\n")
    cfg = to_dataclass(compose_with_local(tmp_path, example))
    assert cfg.paths.data_dir == "/scratch/datasets" and cfg.paths.weights_dir == "/scratch/pretrained"
    assert cfg.data.num_workers == 8 and cfg.logger.wandb.mode == "online"


def test_local_file_without_the_header_is_refused_naming_local(tmp_path):
    from hydra.errors import ConfigCompositionException

    content = readme_example().replace("# @package _global_\n", "")
    with pytest.raises(ConfigCompositionException, match="Key 'local' not in 'GramConfig'"):
        compose_with_local(tmp_path, content)
