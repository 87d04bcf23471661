"""Released-checkpoint conversion: the key map on the shipped key list (meta device), and a tiny checkpoint built in
the reference's layout that must convert into a model giving exactly the source model's outputs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from gram.checkpoint_format import WEIGHTS, load_weights, read_config
from gram.config import ModelConfig
from gram.losses import LossConfig
from gram.main import run
from gram.models import convert as C
from gram.models.gram_model import GramModel
from gram.models.hub import model_config_from_dict
from gram.train.task import GramTask
from tests.conftest import ROOT, compose_config, sample_overrides, shared_path

ALL = ["video", "audio", "subtitle", "depth"]
LETTER = {"text": "t", "video": "v", "audio": "a", "subtitle": "s", "depth": "d"}
REF_NAME = {"video": "vision", "audio": "audio", "subtitle": "subtitle"}
TAU = 0.0432


def _script():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "scripts" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()


def tiny_config(modalities=ALL) -> ModelConfig:
    cfg = SCRIPT.base_model_config(str(ROOT / "configs" / "model" / "tiny.yaml"), None)
    return dataclasses.replace(cfg, modalities=list(modalities))


def tsv_state():
    return C.meta_state(C.read_key_list(shared_path("reference", "gram-checkpoint-keys.tsv")))


def meta_task(cfg: ModelConfig) -> GramTask:
    with torch.device("meta"):
        return GramTask(GramModel(cfg), LossConfig())


# ------------------------------------------------------------------------------------------- the shipped key list
def test_every_shipped_key_maps_onto_the_full_model_with_equal_shapes():
    state = tsv_state()
    task = meta_task(ModelConfig(modalities=ALL))
    out, report = C.convert_state_dict(state, task)
    assert report.ok, report.summary()
    assert set(report.mapped) | set(report.dropped) == set(state) and not report.skipped
    own = task.state_dict()
    for ref_key, targets in report.mapped.items():
        for target in targets:
            assert tuple(own[target].shape) == tuple(out[target].shape), (ref_key, target)
    assert set(out) == set(own)  # every key of ours filled, aliases included (the reference lists all 12 copies)


def test_shipped_key_list_drops_only_the_documented_parts():
    _, report = C.convert_state_dict(tsv_state(), meta_task(ModelConfig(modalities=ALL)))
    prefixes = {k.split(".")[0] if not k.startswith("vision_encoder") else ".".join(k.split(".")[:2])
                for k in report.dropped}
    assert prefixes == {"vision_encoder.text", "vision_encoder.logit_scale", "vision_encoder.visual",
                        "contra_head_va", "contra_head_vs", "contra_head_vas", "multimodal_encoder"}
    assert {k for k in report.dropped if k.startswith("vision_encoder.visual")} == {
        "vision_encoder.visual.head.weight", "vision_encoder.visual.head.bias"}
    assert report.mapped["vision_frame_embedding"] == ["model.frame_embeddings.video", "model.frame_embeddings.depth"]
    assert report.mapped["contra_temp"] == ["loss.temperature_param"]


def test_config_inferred_from_the_shipped_shapes_is_gram_base():
    shapes = {k: tuple(v.shape) for k, v in C.unwrap_reference(tsv_state()).items()}
    assert C.infer_model_config(shapes, ModelConfig(), ALL) == ModelConfig(modalities=ALL)


def test_check_keys_cli_passes_on_the_shipped_list(capsys):
    assert SCRIPT.main(["--check-keys", str(shared_path("reference", "gram-checkpoint-keys.tsv"))]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("line, offending", [
    ("bogus_head.weight\t(2, 3)\ttorch.float32", "bogus_head.weight"),
    ("contra_head_t.linear.weight\t(256, 768)\ttorch.float32", "model.projections.text.weight"),
])
def test_check_keys_cli_fails_and_names_bad_keys(tmp_path, capsys, line, offending):
    lines = shared_path("reference", "gram-checkpoint-keys.tsv").read_text().splitlines()
    lines = [x for x in lines if not x.startswith(line.split("\t")[0] + "\t")] + [line]
    bad = tmp_path / "keys.tsv"
    bad.write_text("\n".join(lines) + "\n")
    assert SCRIPT.main(["--check-keys", str(bad)]) == 1
    assert offending in capsys.readouterr().out


def test_check_keys_cli_fails_on_a_missing_key(tmp_path, capsys):
    lines = shared_path("reference", "gram-checkpoint-keys.tsv").read_text().splitlines()
    bad = tmp_path / "keys.tsv"
    bad.write_text("\n".join(x for x in lines if not x.startswith("itm_head.linear2.bias")) + "\n")
    assert SCRIPT.main(["--check-keys", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "missing (1)" in out and "model.match_head.linear2.bias" in out


# ------------------------------------------------------------------------------------------- tiny reference layout
def reference_layout(model: GramModel, tau: float) -> dict[str, torch.Tensor]:
    """The reference GRAM state dict of ``model``, written independently of the key map, plus unused parts."""
    sd = {f"vision_encoder.visual.{k}": v for k, v in model.encoders["vision"].trunk.state_dict().items()}
    sd |= {f"audio_encoder.{k}": v for k, v in model.encoders["audio"].state_dict().items()}
    sd |= {f"multimodal_encoder.bert.{k}": v for k, v in model.encoders["text"].state_dict().items()}
    sd["multimodal_encoder.bert.embeddings.position_ids"] = torch.arange(128)[None]
    for modality, letter in LETTER.items():
        sd[f"contra_head_{letter}.linear.weight"] = model.projections[modality].weight
    for modality, name in REF_NAME.items():
        sd |= {f"hidden_trans_{name}_multimodal.{k}": v
               for k, v in model.condition_projections[modality].state_dict().items()}
        sd[f"{name}_type_embeddings"] = model.type_embeddings[modality]
    sd["vision_frame_embedding"] = model.frame_embeddings["video"]
    sd["audio_frame_embedding"] = model.frame_embeddings["audio"]
    sd |= {f"itm_head.{k}": v for k, v in model.match_head.state_dict().items()}
    sd["contra_temp"] = torch.tensor(tau)
    unused = {"vision_encoder.text.token_embedding.weight": (50, 8), "vision_encoder.logit_scale": (),
              "vision_encoder.visual.head.weight": (32, 64), "contra_head_va.weight": (64, 128),
              "contra_head_va.bias": (64,), "multimodal_encoder.cls.predictions.bias": (1000,)}
    sd |= {k: torch.randn(shape) for k, shape in unused.items()}
    return {k: v.detach().clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def source():
    """A random tiny model whose depth stream shares the video condition tensors, as in the reference."""
    torch.manual_seed(0)
    model = GramModel(tiny_config()).eval()
    with torch.no_grad():
        model.condition_projections["depth"].load_state_dict(model.condition_projections["video"].state_dict())
        model.frame_embeddings["depth"].copy_(model.frame_embeddings["video"])
        model.type_embeddings["depth"].copy_(model.type_embeddings["video"])
    return model


def inputs(cfg: ModelConfig) -> dict:
    g = torch.Generator().manual_seed(1)
    size = cfg.vision.image_size
    text = {"input_ids": torch.randint(1, 1000, (2, 7), generator=g), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    text["attention_mask"][1, 5:] = 0
    return {"text": text, "subtitle": {k: v.flip(0) for k, v in text.items()},
            "video": torch.randn(2, cfg.max_frames, 3, size, size, generator=g),
            "depth": torch.randn(2, cfg.max_frames, 3, size, size, generator=g),
            "audio": torch.randn(2, cfg.max_audio_clips, 64, 32, generator=g)}


def outputs(model: GramModel, batch: dict) -> dict[str, torch.Tensor]:
    """Every embedding, the condition tokens and the match logits of the first text against its condition."""
    with torch.no_grad():
        out = model(batch)
        text = batch["text"]
        logits = model.match(text["input_ids"], text["attention_mask"], out["condition"])
    return {**out["embeddings"], "condition": out["condition"], "match": logits}


def write_vocabulary(folder) -> str:
    """A small real WordPiece vocabulary (every character, so no word is [UNK]) that fits the tiny text encoder."""
    from gram.data.tokenizer import train_wordpiece_vocab

    texts = ["A dog is barking", "A dog is howling", "A red cat is meowing", "A black cat is meowing",
             "a blue square moves left while a low tone plays 0123456789"]
    return str(train_wordpiece_vocab(texts, folder, vocab_size=200).parent)


def convert_file(tmp_path, state, *extra: str):
    path, out = tmp_path / "model_step_10.pt", tmp_path / "converted"
    torch.save(state, path)
    code = SCRIPT.main([str(path), str(out), "--model-config", str(ROOT / "configs/model/tiny.yaml"),
                        "--tokenizer", write_vocabulary(tmp_path / "vocab"), *extra])
    return code, out


def load_converted(out) -> GramTask:
    saved = read_config(out)
    task = GramTask(GramModel(model_config_from_dict(saved["model"])), LossConfig(**saved["loss"])).eval()
    load_weights(task, out)  # strict
    return task


def test_converted_tiny_checkpoint_gives_the_source_outputs(tmp_path, source):
    state = {"module." + k: v for k, v in reference_layout(source, TAU).items()}  # saved from DDP
    code, out = convert_file(tmp_path, state, "--modalities", *ALL)
    assert code == 0
    task = load_converted(out)
    assert task.model.cfg.max_frames == source.cfg.max_frames and task.model.modalities == tuple(ALL)
    batch = inputs(source.cfg)
    expected, got = outputs(source, batch), outputs(task.model, batch)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert task.loss.temperature_param.item() == pytest.approx(math.log(TAU), abs=1e-7)
    assert task.loss.temperature().item() == pytest.approx(TAU, rel=1e-6)


def test_legacy_vast_names_nested_under_model_convert(tmp_path, source):
    renamed = {k.replace("vision_encoder.", "evaclip_model.").replace("vision_frame", "video_frame"): v
               for k, v in reference_layout(source, TAU).items()}
    code, out = convert_file(tmp_path, {"model": renamed}, "--modalities", *ALL)
    assert code == 0
    got = load_file(str(out / WEIGHTS))
    assert torch.equal(got["model.frame_embeddings.video"], source.frame_embeddings["video"].detach())
    assert torch.equal(got["model.encoders.vision.trunk.pos_embed"], source.encoders["vision"].trunk.pos_embed.detach())


def test_default_modalities_skip_subtitle_and_depth_explicitly(tmp_path, source, capsys):
    code, out = convert_file(tmp_path, reference_layout(source, TAU))
    assert code == 0
    assert "skipped" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["modalities"] == ["video", "audio"]
    assert "contra_head_s.linear.weight" in saved["converted_from"]["skipped"]
    assert not any(".depth" in k or ".subtitle" in k for k in load_file(str(out / WEIGHTS)))
    task = load_converted(out)
    batch = inputs(source.cfg)
    assert torch.equal(outputs(task.model, batch)["video"], outputs(source, batch)["video"])


def test_frame_embedding_is_nearest_resized_to_the_model(source):
    state = reference_layout(source, TAU)
    state["vision_frame_embedding"] = torch.arange(2 * 64, dtype=torch.float32).view(1, 2, 64)
    task = meta_task(tiny_config())  # max_frames 4
    out, report = C.convert_checked(state, task, "test")
    frames = out["model.frame_embeddings.video"]
    assert frames.shape == (1, 4, 64)
    for i in range(4):  # nearest: output frame i reads input frame floor(i * 2 / 4)
        assert torch.equal(frames[0, i], state["vision_frame_embedding"][0, i // 2])


def test_raw_temperature_parametrisation_keeps_tau(source):
    out, _ = C.convert_checked(reference_layout(source, TAU), meta_task(tiny_config()), "test", "raw")
    assert out["loss.temperature_param"].item() == pytest.approx(TAU)


def test_non_positive_temperature_is_refused(source):
    with pytest.raises(ValueError, match="contra_temp=-0.1"):
        C.convert_state_dict(reference_layout(source, -0.1), meta_task(tiny_config()))


def test_errors_list_every_offending_key(source):
    state = reference_layout(source, TAU)
    del state["itm_head.linear1.bias"]
    state["itm_head.extra.weight"] = torch.zeros(3)
    state["some_new_head.weight"] = torch.zeros(3)
    state["contra_head_a.linear.weight"] = torch.zeros(7, 64)
    with pytest.raises(C.CheckpointConversionError) as err:
        C.convert_checked(state, meta_task(tiny_config()), "ckpt.pt")
    message = str(err.value)
    for key in ("ckpt.pt", "model.match_head.linear1.bias", "model.match_head.extra.weight", "some_new_head.weight",
                "model.projections.audio.weight: checkpoint (7, 64) vs model (64, 64)"):
        assert key in message


def test_allow_list_accepts_only_the_named_missing_keys(source):
    state = reference_layout(source, TAU)
    del state["contra_head_d.linear.weight"]
    _, report = C.convert_state_dict(state, meta_task(tiny_config()), allow_missing=["model.projections.depth.*"])
    assert report.ok and report.allowed_missing == ["model.projections.depth.weight"]


@pytest.mark.slow
def test_converted_checkpoint_runs_in_test_mode(tmp_path, sample_root, source):
    """`run.py mode=test checkpoint=OUT` rebuilds the converted model from its config.json alone and evaluates."""
    code, out = convert_file(tmp_path, reference_layout(source, TAU))  # default modalities: video, audio
    assert code == 0
    result = run(compose_config(*sample_overrides(sample_root, "mode=test", f"checkpoint={out}"),
                                output_dir=tmp_path / "eval"))["sample"]
    assert result["checkpoint"] == str(out) and result["n_queries"] == 24
    assert 1 <= result["t2v_medr"] <= 24 and 0 <= result["t2v_r1"] <= result["t2v_r10"] <= 100
