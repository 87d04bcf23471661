"""gram.inference: a checkpoint loads strictly, and the API embeds exactly what the training-time evaluation does."""

from __future__ import annotations

import json
import shutil
import warnings

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import gram
from gram import checkpoint_format as ckpt
from gram.config import without_pretrained
from gram.data.audio import load_waveform, silent_clips
from gram.data.dataset import Collator
from gram.data.tokenizer import load_tokenizer
from gram.data.video import decode_frames
from gram.eval.retrieval import embed_items, embed_texts
from gram.inference import SilentAudioWarning, TokenizerNotFoundError, load_model
from gram.main import build_model, datasets, run, to_dataclass
from gram.train.task import GramTask
from tests.conftest import compose_config, sample_overrides, shared_path

ATOL = 1e-5


@pytest.fixture(scope="module")
def trained(sample_root, tmp_path_factory):
    """A few-step run: any weights do for parity, and the embeddings must not be those of an initialisation."""
    out = tmp_path_factory.mktemp("inference_run")
    run(compose_config(*sample_overrides(sample_root, "trainer.max_steps=3"), output_dir=out))
    return out


@pytest.fixture(scope="module")
def predictor(trained):
    return load_model(trained, device="cpu")


@pytest.fixture(scope="module")
def reference(trained, sample_root):
    """Test-set embeddings through the training-time path: main's model building, strict task loading,
    VideoTextDataset + Collator + embed_items/embed_texts."""
    cfg = to_dataclass(compose_config(*sample_overrides(sample_root, "mode=test", f"checkpoint={trained}")))
    cfg.model = without_pretrained(cfg.model)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    task = GramTask(build_model(cfg.model, tokenizer), cfg.loss)
    ckpt.load_weights(task, trained, strict=True)
    task.eval()
    _, test = datasets(cfg, training=False)
    collate = Collator(tokenizer, cfg.data.max_text_len, cfg.data.max_subtitle_len)
    items = embed_items(task.model, test, collate, ["video", "audio"], 5, 0, torch.device("cpu"))
    captions = [r.captions[0] for r in test.records]
    text = embed_texts(task.model, collate, captions, 7, torch.device("cpu"))
    return {"dataset": test, "captions": captions, "text": text, **items}


@pytest.mark.slow
def test_model_is_ready(predictor):
    assert not predictor.model.training
    assert predictor.modalities == ("video", "audio")
    assert predictor.device == torch.device("cpu")
    assert predictor.data.test_num_frames == 4 and predictor.data.audio_target_length == 256


def test_text_matches_training_path(predictor, reference):
    text = predictor.encode_text(reference["captions"])
    assert text.shape == (24, predictor.embed_dim)
    assert torch.allclose(text, reference["text"], atol=ATOL)


def test_video_and_audio_match_training_path(predictor, reference):
    media = reference["dataset"].media_paths
    videos = [p.video for p in media]
    audios = [p.audio or p.video for p in media]  # separate file, else the video's own track (as the dataset)
    assert any(p.audio is None for p in media) and any(p.audio is not None for p in media)
    assert torch.allclose(predictor.encode_video(videos), reference["video"], atol=ATOL)
    assert torch.allclose(predictor.encode_audio(audios), reference["audio"], atol=ATOL)


def test_embed_split_matches_training_path(predictor, reference, sample_root):
    split = reference["dataset"].split
    out = predictor.embed_split(split, limit=10)
    for key in ("text", "video", "audio"):
        assert torch.allclose(out[key], reference[key][:10], atol=ATOL), key


def test_embeddings_are_normalised_and_item_specific(predictor, reference):
    video = predictor.encode_video([p.video for p in reference["dataset"].media_paths[:4]])
    assert torch.allclose(video.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.cdist(video, video).triu(1)[torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)].min() > 1e-4


def test_results_do_not_depend_on_batch_size(trained, reference):
    small = load_model(trained, batch_size=2)
    videos = [p.video for p in reference["dataset"].media_paths[:5]]
    assert torch.allclose(small.encode_video(videos), reference["video"][:5], atol=ATOL)
    assert torch.allclose(small.encode_text(reference["captions"][:5]), reference["text"][:5], atol=ATOL)


def test_tensor_inputs_match_files(predictor, reference):
    media = reference["dataset"].media_paths[0]
    frames = decode_frames(media.video, list(range(30))).permute(0, 3, 1, 2)  # (30, 3, H, W) uint8, the whole clip
    ready = predictor.video_input(media.video)  # (4, 3, S, S) float, model-ready
    by_path, by_frames, by_ready = predictor.encode_video([media.video, frames, ready])
    assert torch.allclose(by_frames, by_path, atol=ATOL) and torch.allclose(by_ready, by_path, atol=ATOL)
    source = media.audio or media.video
    wave = load_waveform(source)  # (T,) 16 kHz
    by_file, by_wave = predictor.encode_audio([source, wave])
    assert torch.allclose(by_wave, by_file, atol=ATOL)


def test_scoring_is_minus_volume(predictor, reference):
    t, v, a = reference["text"][:6], reference["video"][:6], reference["audio"][:6]
    assert torch.allclose(predictor.score(t, v, a), -gram.volume(t, v, a), atol=1e-6)
    assert torch.allclose(predictor.score(t, v, kind="cosine"), t @ v.T, atol=1e-6)


def write_silent_video(path, frames: int = 12, size: int = 32) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((size, size, 3), 20 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def test_file_without_audio_is_silence_with_a_warning(predictor, tmp_path):
    path = tmp_path / "mute.mp4"
    write_silent_video(path)
    d = predictor.data
    with pytest.warns(SilentAudioWarning, match="mute.mp4"):
        from_file = predictor.encode_audio([path])
    silence = predictor.encode_audio([silent_clips(d.num_audio_clips, d.audio_target_length, d.audio_mel_bins)])
    assert torch.allclose(from_file, silence, atol=ATOL)
    assert predictor.encode_video([path]).shape == (1, predictor.embed_dim)


def test_real_shared_media(predictor):
    video, audio = shared_path("data", "media", "video1.mp4"), shared_path("data", "media", "audio1.mp3")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SilentAudioWarning)  # these files do have sound
        out = torch.cat([predictor.encode_video([video]), predictor.encode_audio([audio, video])])
    assert out.shape == (3, predictor.embed_dim)
    assert torch.isfinite(out).all() and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_inputs_are_checked(predictor):
    with pytest.raises(TypeError, match="list"):
        predictor.encode_text("a single string")
    with pytest.raises(ValueError, match="subtitle"):
        predictor.encode_subtitle(["no subtitle encoder"])
    with pytest.raises(ValueError, match="model-ready"):
        predictor.encode_video([torch.zeros(4, 3, 10, 10)])
    with pytest.raises(ValueError, match="waveform"):
        predictor.encode_audio([torch.zeros(2, 3)])


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ckpt.CheckpointNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")


def copy_checkpoint(trained, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt.resolve_checkpoint(trained), folder)
    return folder


def test_relative_missing_tokenizer_is_explained(trained, tmp_path, monkeypatch):
    """A checkpoint written before the vocabulary moved inside names it relative to the run's directory."""
    folder = copy_checkpoint(trained, tmp_path)
    config = json.loads((folder / ckpt.CONFIG).read_text())
    vocab = str(shutil.copytree(folder / config["data"]["tokenizer"], tmp_path / "vocab"))
    shutil.rmtree(folder / "tokenizer")
    config["data"]["tokenizer"] = "data/sample/tokenizer"
    (folder / ckpt.CONFIG).write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TokenizerNotFoundError, match="relative") as err:
        load_model(folder)
    assert "data/sample/tokenizer" in str(err.value) and "tokenizer=" in str(err.value)
    assert load_model(folder, tokenizer=vocab).embed_dim == 64  # the override is honoured


def test_weights_load_strictly(trained, tmp_path):
    folder = copy_checkpoint(trained, tmp_path)
    state = load_file(str(folder / ckpt.WEIGHTS))
    dropped = next(k for k in state if k.startswith("model.projections"))
    save_file({k: v for k, v in state.items() if k != dropped}, str(folder / ckpt.WEIGHTS))
    with pytest.raises(RuntimeError, match="projections"):
        load_model(folder)


# ---------------------------------------------------------------------------------------------- self-contained
def test_every_checkpoint_carries_its_vocabulary(trained, sample_root):
    for folder in ckpt.list_checkpoints(trained):
        config = json.loads((folder / ckpt.CONFIG).read_text())
        assert config["data"]["tokenizer"] == "tokenizer"  # relative to the checkpoint folder
        assert (folder / "tokenizer" / "vocab.txt").read_bytes() == \
            (sample_root / "tokenizer" / "vocab.txt").read_bytes()


def test_load_model_from_another_directory_without_the_dataset(trained, predictor, tmp_path, monkeypatch):
    folder = copy_checkpoint(trained, tmp_path / "moved")  # the run's own paths play no part
    monkeypatch.chdir(tmp_path)
    moved = load_model(folder)
    captions = ["a red circle moves left", "a low tone"]
    assert torch.equal(moved.encode_text(captions), predictor.encode_text(captions))


def test_tokenize_gives_what_the_model_encodes(predictor):
    captions = ["a red circle moves left", "a big blue square"]
    tokens = predictor.tokenize(captions)
    assert tokens["input_ids"].shape == (2, predictor.data.max_text_len)
    with torch.no_grad():
        direct = predictor.model.encode("text", tokens)
    assert torch.equal(direct, predictor.encode_text(captions))
    assert not hasattr(predictor.model, "encode_text")  # one name, one thing: encode_text takes strings
    with pytest.raises(ValueError, match="'text' or 'subtitle'"):
        predictor.tokenize(captions, modality="video")


def test_hub_export_round_trips_through_load_model(trained, predictor, tmp_path, monkeypatch):
    from gram.models.hub import GramPretrained, checkpoint_to_hub

    hub = checkpoint_to_hub(trained, tmp_path / "hub")
    assert (hub / "tokenizer" / "vocab.txt").is_file()
    config = json.loads((hub / "config.json").read_text())
    assert config["data"]["tokenizer"] == "tokenizer" and config["data"]["test_num_frames"] == 4
    assert "train" not in config["data"] and "test" not in config["data"]
    monkeypatch.chdir(tmp_path)
    loaded = load_model(hub)
    captions = ["a red circle moves left"]
    assert torch.equal(loaded.encode_text(captions), predictor.encode_text(captions))
    video = [torch.randint(0, 255, (6, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))]
    assert torch.equal(loaded.encode_video(video), predictor.encode_video(video))
    again = GramPretrained.from_pretrained(hub)  # the mixin's save keeps the preprocessing and the vocabulary
    again.save_pretrained(tmp_path / "hub2")
    assert torch.equal(load_model(tmp_path / "hub2").encode_text(captions), predictor.encode_text(captions))


def test_hub_folder_without_preprocessing_says_how_to_fix(trained, tmp_path):
    from gram.models.hub import save_hub_layout

    bare = save_hub_layout(load_model(trained).model, tmp_path / "bare")
    with pytest.raises(ckpt.CheckpointNotFoundError, match="checkpoint_to_hub"):
        load_model(bare)


@pytest.mark.slow
def test_mode_test_evaluates_a_hub_folder(trained, sample_root, tmp_path):
    from gram.models.hub import checkpoint_to_hub

    hub = checkpoint_to_hub(trained, tmp_path / "hub")
    from_run = run(compose_config(*sample_overrides(sample_root, "mode=test", f"checkpoint={trained}"),
                                  output_dir=tmp_path / "a"))["sample"]
    from_hub = run(compose_config(*sample_overrides(sample_root, "mode=test", f"checkpoint={hub}"),
                                  output_dir=tmp_path / "b"))["sample"]
    assert from_hub["t2v_r1"] == from_run["t2v_r1"] and from_hub["scorings"] == from_run["scorings"]
