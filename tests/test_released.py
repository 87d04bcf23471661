"""Released GRAM folders (log/hps.json + ckpt/*.pt) load in one step: converted by the script into a self-contained
checkpoint that gram.load_model, mode=test and init_from accept, or opened by gram.load_model directly; hps.json
values reach the config; faults give one line; GRAM checkpoints resize their position grid bilinearly."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import gram
from gram import checkpoint_format as ckpt
from gram.cli import UserError
from gram.config import DataConfig
from gram.main import run
from gram.models.gram_model import GramModel
from gram.models.vision import load_eva_visual_state
from gram.released import convert_released, read_hps, task_modalities
from tests.conftest import CONFIGS, ROOT, compose_config, sample_overrides, shared_path
from tests.test_convert import SCRIPT, TAU, inputs, reference_layout, tiny_config, write_vocabulary

CAPTIONS = ["A dog is barking", "A dog is howling", "A red cat is meowing", "A black cat is meowing"]
TINY_YAML = str(ROOT / "configs" / "model" / "tiny.yaml")
HAS_PRESETS = "preprocessing" in {f.name for f in dataclasses.fields(DataConfig)}


def hps(**model_overrides) -> dict:
    """An hps.json as the reference's utils/args.py writes it (the real keys), for the tiny model."""
    model_cfg = {"default": "./config/gram/default_model_cfg.json", "model_type": "gram", "itm_ratio": 0.1,
                 "frozen_vision": False, "frozen_audio": False, "checkpointing": True, "max_caption_len": 40,
                 "max_omni_caption_len": 70, "max_subtitle_len": 70, "contra_dim": 64, "frame_embedding_type":
                 "adaptive", "vision_resolution": 64, "vision_encoder_type": "evaclip01_giant",
                 "audio_encoder_type": "beats", "audio_melbins": 64, "audio_target_length": 256, "beam_size": 3,
                 "captioner_mode": False, "generate_nums": 1, "ret_bidirection_evaluation": False,
                 "itm_rerank_num": 50, "evaluation_type": "evaluation_mm",
                 "inherit_keys": ["vision_encoder_type", "audio_encoder_type", "audio_melbins", "audio_target_length"],
                 "max_vision_sample_num": 4, "max_audio_sample_num": 1, **model_overrides}
    train = {"type": "annoindexed", "training": True, "name": "finetune_area", "txt": "annotations150k.json",
             "vision": "videos", "audio": "audios", "vision_transforms": "crop_flip", "vision_format":
             "video_rawvideo", "vision_sample_num": 2, "audio_sample_num": 1, "task": "ret%tv%ta", "epoch": 5,
             "n_workers": 8, "batch_size": 128}
    val = {"type": "annoindexed", "training": False, "name": "msrvtt_ret", "txt": "descs_ret_test.json",
           "vision": "videos", "audio": "audios", "vision_transforms": "crop_flip", "vision_format": "video_rawvideo",
           "vision_sample_num": 4, "audio_sample_num": 1, "task": "ret%tvas", "n_workers": 8, "batch_size": 64}
    run_cfg = {"default": "./config/gram/default_run_cfg.json", "learning_rate": 2e-5, "mode": "training",
               "output_dir": "./output/gram/pretrain_gram", "fp16": True, "seed": 50}
    return {"run_cfg": run_cfg, "model_cfg": model_cfg, "data_cfg": {"train": [train], "val": [val],
                                                                     "concatenated_nums": 1}, "local_rank": 0}


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return GramModel(tiny_config()).eval()  # every head, as the reference model has


def make_released(folder, model, **model_overrides):
    """A released folder: log/hps.json, the newest and an older step, an optimizer state and a best_ file."""
    (folder / "log").mkdir(parents=True)
    (folder / "ckpt").mkdir()
    (folder / "log" / "hps.json").write_text(json.dumps(hps(**model_overrides), indent=4))
    state = reference_layout(model, TAU)
    torch.save(state, folder / "ckpt" / "model_step_6000.pt")
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, folder / "ckpt" / "model_step_600.pt")
    torch.save({"state": {}}, folder / "ckpt" / "optimizer_step_6000.pt")
    return folder


@pytest.fixture(scope="module")
def released(tmp_path_factory, source):
    return make_released(tmp_path_factory.mktemp("released") / "GRAM_pretrained", source)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return write_vocabulary(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, released, vocab):
    out = tmp_path_factory.mktemp("converted") / "gram_tvas"
    assert SCRIPT.main([str(released), str(out), "--model-config", TINY_YAML, "--tokenizer", vocab]) == 0
    return out


# ------------------------------------------------------------------------------------------- the converted folder
def test_converted_folder_is_complete_and_self_contained(converted, vocab):
    assert {p.name for p in converted.iterdir()} == {"model.safetensors", "config.json", "tokenizer"}
    assert (converted / "tokenizer" / "vocab.txt").read_bytes() == (ckpt.Path(vocab) / "vocab.txt").read_bytes()
    config = json.loads((converted / "config.json").read_text())
    model, data, loss = config["model"], config["data"], config["loss"]
    assert model["modalities"] == ["video", "audio", "subtitle"]  # the val task ret%tvas
    assert model["vision"]["image_size"] == 64 and model["max_frames"] == 4 and model["embed_dim"] == 64
    assert data["tokenizer"] == "tokenizer"  # relative to the checkpoint folder
    assert (data["test_num_frames"], data["num_frames"], data["transform"], data["num_audio_clips"]) == \
        (4, 2, "crop_flip", 1)
    assert (data["audio_mel_bins"], data["audio_target_length"], data["max_text_len"], data["max_subtitle_len"]) == \
        (64, 256, 40, 70)
    assert data["name"] == "msrvtt_ret" and data["image_size"] == 64
    if HAS_PRESETS:
        assert data["preprocessing"] == "reference"
    assert loss["dam_weight"] == 0.1 and loss["temperature_init"] == pytest.approx(TAU)
    assert config["converted_from"]["file"].endswith("model_step_6000.pt")
    assert config["converted_from"]["rerank_k"] == 50


def test_the_newest_step_is_used_and_the_choice_is_said(tmp_path, released, vocab, capsys):
    SCRIPT.main([str(released), str(tmp_path / "out"), "--model-config", TINY_YAML, "--tokenizer", vocab])
    out = capsys.readouterr().out
    assert "using model_step_6000.pt, the newest step" in out and "model_step_600.pt" in out
    assert "optimizer_step" not in out


def test_load_model_on_the_converted_folder_from_another_directory(converted, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing relative to the conversion's working directory may be needed
    predictor = gram.load_model(converted)
    assert predictor.modalities == ("video", "audio", "subtitle")
    batch, mods = inputs(source.cfg), ["video", "audio", "subtitle"]
    with torch.no_grad():
        expected, got = source(batch)["embeddings"], predictor.model(batch)["embeddings"]
        for key in ("text", *mods):
            assert torch.equal(expected[key], got[key]), key
        conditions = [m.condition_tokens({x: m.encode_tokens(x, batch[x]) for x in mods}, mods)
                      for m in (source, predictor.model)]
    assert torch.equal(*conditions)  # the matching head's input (the depth copies are left out)


def test_load_model_opens_the_released_folder_itself(released, converted, vocab):
    with pytest.warns(UserWarning, match="newest step"):
        direct = gram.load_model(released, tokenizer=vocab, model_config=TINY_YAML)
    via_file = gram.load_model(converted)
    assert torch.equal(direct.encode_text(CAPTIONS), via_file.encode_text(CAPTIONS))
    assert direct.data == dataclasses.replace(via_file.data, tokenizer=direct.data.tokenizer)


def test_released_folder_without_a_vocabulary_says_what_to_pass(released, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pretrained_weights/bert/bert-base-uncased here
    with pytest.raises(ckpt.TokenizerNotFoundError, match="tokenizer="):
        gram.load_model(released, model_config=TINY_YAML)


@pytest.mark.slow  # a training step and an evaluation: ~20-50 s on a shared 2-core machine
def test_init_from_the_converted_checkpoint_trains_and_keeps_its_vocabulary(tmp_path, sample_root, released, vocab):
    out = tmp_path / "tva"
    assert SCRIPT.main([str(released), str(out), "--model-config", TINY_YAML, "--tokenizer", vocab,
                        "--modalities", "video", "audio"]) == 0
    run_dir = tmp_path / "finetune"
    run(compose_config(*sample_overrides(sample_root, "trainer.max_steps=1", f"init_from={out}",
                                         "model.max_frames=8", "data.audio_target_length=256"),
                       output_dir=run_dir))
    saved = ckpt.list_checkpoints(run_dir)[-1]
    assert (saved / "tokenizer" / "vocab.txt").read_bytes() == (out / "tokenizer" / "vocab.txt").read_bytes()


def test_init_from_resamples_frame_embeddings_to_the_model(converted, source):
    """The released pretrained models have 2 frames, the finetuning experiments 8: nearest resampling, as the
    reference; anything else that does not fit is refused in one line."""
    from gram.losses import LossConfig
    from gram.main import load_init_weights
    from gram.models.convert import resize_frames
    from gram.train.task import GramTask

    cfg = dataclasses.replace(tiny_config(["video", "audio", "subtitle"]), max_frames=8)
    task = GramTask(GramModel(cfg), LossConfig())
    load_init_weights(task, converted)
    expected = resize_frames(source.frame_embeddings["video"].detach(), 8)
    assert torch.equal(task.model.frame_embeddings["video"].detach(), expected)
    assert torch.equal(task.model.projections["subtitle"].weight, source.projections["subtitle"].weight)
    other = GramTask(GramModel(dataclasses.replace(cfg, embed_dim=32)), LossConfig())
    with pytest.raises(UserError, match="init_from=.*projections.text.weight: file \\(64, 64\\) vs model \\(32, 64\\)"):
        load_init_weights(other, converted)


def test_mode_test_on_a_converted_checkpoint_uses_its_vocabulary(tmp_path, sample_root, converted):
    result = run(compose_config(*sample_overrides(sample_root, "mode=test", f"checkpoint={converted}"),
                                output_dir=tmp_path / "eval"))["sample"]
    assert result["modalities"] == ["text", "video", "audio", "subtitle"] and result["n_queries"] == 24


# ------------------------------------------------------------------------------------------- faults
def expect_one_line_error(capsys, argv, *needles):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPT.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_folder_without_hps_json(tmp_path, released, vocab, capsys):
    folder = tmp_path / "no_hps"
    (folder / "ckpt").mkdir(parents=True)
    (folder / "ckpt" / "model_step_1.pt").write_bytes((released / "ckpt" / "model_step_6000.pt").read_bytes())
    expect_one_line_error(capsys, [str(folder), str(tmp_path / "o"), "--tokenizer", vocab], "log/hps.json", "--hps")


def test_folder_without_weights(tmp_path, vocab, capsys):
    folder = tmp_path / "no_ckpt"
    (folder / "log").mkdir(parents=True)
    (folder / "log" / "hps.json").write_text(json.dumps(hps()))
    expect_one_line_error(capsys, [str(folder), str(tmp_path / "o"), "--tokenizer", vocab], "ckpt/*.pt")


def test_several_best_files_without_a_step_are_refused(tmp_path, released, vocab, capsys):
    folder = tmp_path / "bests"
    (folder / "ckpt").mkdir(parents=True)
    (folder / "log").mkdir()
    (folder / "log" / "hps.json").write_text(json.dumps(hps()))
    for name in ("best_ret%tvas--msrvtt_ret_ret_area_forward.pt", "best_ret%tv--msrvtt_ret_ret_itc_tv.pt"):
        (folder / "ckpt" / name).write_bytes(b"unused")
    expect_one_line_error(capsys, [str(folder), str(tmp_path / "o"), "--tokenizer", vocab],
                          "best_ret%tv--msrvtt_ret_ret_itc_tv.pt", "pass the one you want")


@pytest.mark.parametrize("key, value", [("vision_encoder_type", "clip_vit_base_16"), ("audio_encoder_type", "ast"),
                                        ("frame_embedding_type", "none"), ("pool_video", True)])
def test_hps_values_gram_cannot_honour_are_named(tmp_path, key, value):
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(hps(**{key: value})))
    with pytest.raises(UserError, match=f"model_cfg.{key}="):
        read_hps(path)


def test_hps_of_another_run_is_refused(tmp_path, source, vocab, capsys):
    folder = make_released(tmp_path / "mismatch", source, contra_dim=512)
    expect_one_line_error(capsys, [str(folder), str(tmp_path / "o"), "--model-config", TINY_YAML,
                                   "--tokenizer", vocab], "contra_dim=512", "another run")


def test_unknown_hps_keys_are_listed_not_fatal(tmp_path):
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(hps(new_fancy_option=3)))
    assert any("new_fancy_option" in note for note in read_hps(path).notes)


def test_task_strings_give_the_modalities():
    assert task_modalities("ret%tvas") == ["video", "audio", "subtitle"]
    assert task_modalities("ret%tv%ta%tva") == ["video", "audio"]
    assert task_modalities("ret%tvasd") == ["video", "audio", "subtitle", "depth"]
    with pytest.raises(UserError, match="cap%tv"):
        task_modalities("cap%tv")


def test_mode_test_on_a_released_folder_says_convert_first(released):
    with pytest.raises(ckpt.CheckpointNotFoundError, match="convert_checkpoint.py"):
        ckpt.resolve_checkpoint(released)


# ------------------------------------------------------------------------------------------- image size
def test_position_grid_is_resized_bilinearly_for_another_image_size(tmp_path, released, source, vocab):
    converted = convert_released(released, vocab, model_config=TINY_YAML, image_size=96)
    assert converted.config["model"]["vision"]["image_size"] == 96
    old = source.encoders["vision"].trunk.pos_embed.detach()  # (1, 1 + 4*4, 64)
    grid = old[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    by_hand = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
    expected = torch.cat([old[:, :1], by_hand.permute(0, 2, 3, 1).reshape(1, 36, 64)], dim=1)
    got = converted.state["model.encoders.vision.trunk.pos_embed"]
    assert torch.allclose(got, expected, atol=1e-6)
    bicubic = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert not torch.allclose(got[:, 1:], bicubic.permute(0, 2, 3, 1).reshape(1, 36, 64), atol=1e-3)
    task = converted.build_task()
    assert task.model.encoders["vision"].trunk.pos_embed.shape == (1, 37, 64)


def test_raw_eva_clip_weights_stay_bicubic(source):
    trunk = GramModel(dataclasses.replace(tiny_config(["video"]), vision=dataclasses.replace(
        tiny_config(["video"]).vision, image_size=96))).encoders["vision"].trunk
    old = source.encoders["vision"].trunk.pos_embed.detach()
    state = {f"visual.{k}": v for k, v in source.encoders["vision"].trunk.state_dict().items()}
    resized = load_eva_visual_state(state, trunk)["pos_embed"]
    grid = old[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    bicubic = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert torch.allclose(resized[:, 1:], bicubic.permute(0, 2, 3, 1).reshape(1, 36, 64), atol=1e-6)


# ------------------------------------------------------------------------------------------- quick inference
def test_quick_inference_example_on_the_demo_media(converted):
    """The README's quick-inference example, on the real demo clips: the mechanics, not the ranking (the model is
    a random tiny one)."""
    media = shared_path("data", "media")
    model = gram.load_model(converted)
    videos = [str(media / f"video{i}.mp4") for i in range(1, 5)]
    audios = [str(media / f"audio{i}.mp3") for i in range(1, 5)]
    text = model.encode_text(CAPTIONS)
    video, audio = model.encode_video(videos), model.encode_audio(audios)
    for embedding in (text, video, audio):
        assert embedding.shape == (4, 64) and torch.allclose(embedding.norm(dim=1), torch.ones(4), atol=1e-5)
    volume = gram.volume(text, video, audio)  # (4 captions, 4 clips): smaller = better match
    assert volume.shape == (4, 4) and bool((volume >= 0).all()) and bool((volume <= 1 + 1e-5).all())
    assert not torch.allclose(video[0], video[1]) and not torch.allclose(audio[0], audio[2])
    best = volume.argmin(dim=1)
    assert best.shape == (4,) and int(best.max()) < 4
    assert os.path.basename(videos[int(best[0])]).startswith("video")


def test_weights_of_the_converted_file_are_the_source_s(converted, source):
    state = load_file(str(converted / ckpt.WEIGHTS))
    assert torch.equal(state["model.projections.subtitle.weight"], source.projections["subtitle"].weight.detach())
    assert not any(".depth" in k for k in state)


# ------------------------------------------------------------------------------------------- zero-shot experiments
PUBLISHED = {  # the reference description's tables (paper zero-shot rows, README model zoo)
    "zeroshot_msrvtt_tvas": {"t2v_r1": 54.8, "v2t_r1": 52.9}, "zeroshot_msrvtt_tvasd": {"t2v_r1": 55.3},
    "zeroshot_vatex_tvas": {"t2v_r1": 83.5, "v2t_r1": 82.7}, "zeroshot_didemo_tvas": {"t2v_r1": 54.2, "v2t_r1": 52.2},
    "zeroshot_activitynet_tvas": {"t2v_r1": 59.0, "v2t_r1": 50.4}, "zeroshot_vatex_tvasd": None,
    "zeroshot_didemo_tvasd": None, "zeroshot_activitynet_tvasd": None}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_zero_shot_experiments_evaluate_a_converted_checkpoint(name):
    from gram.main import to_dataclass

    assert (CONFIGS / "experiment" / f"{name}.yaml").is_file()
    cfg = to_dataclass(compose_config(f"experiment={name}"))
    assert cfg.mode == "test" and cfg.checkpoint.endswith("tvasd" if name.endswith("tvasd") else "tvas")
    assert cfg.reproduction.get("expected") == PUBLISHED[name]
    dataset = name.split("_")[1]
    assert cfg.data.name == f"{dataset}_ret"
    with_subtitles = dataset in ("msrvtt", "vatex")
    assert cfg.eval.modalities == (["video", "audio", "subtitle"] if with_subtitles else ["video", "audio"])


def test_a_missing_vocabulary_never_costs_the_checkpoint(tmp_path, caplog):
    config = {"model": {}, "data": {"tokenizer": str(tmp_path / "gone")}}
    written = ckpt.write_config(tmp_path, config)
    assert json.loads((tmp_path / "config.json").read_text()) == written == config
    assert "gone" in caplog.text and not (tmp_path / "tokenizer").exists()
