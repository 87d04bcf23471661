"""Hugging Face hub layout: export -> reload (local folders only) gives identical outputs; loading is strict."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

from gram.config import ModelConfig
from gram.losses import LossConfig
from gram.models.beats import beats_tiny_config
from gram.models.gram_model import GramModel
from gram.models.hub import (
    GramPretrained,
    HubLoadError,
    checkpoint_to_hub,
    model_config_from_dict,
    model_config_to_dict,
    save_hub_layout,
)
from gram.models.text import text_tiny_config
from gram.models.vision import vision_tiny_config
from gram.train.task import GramTask

SHARED_TABLE = "encoders.audio.encoder.layers.{}.self_attn.relative_attention_bias.weight"


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(modalities=["video", "audio"], embed_dim=32, max_frames=2,
                  vision=vision_tiny_config(weights="absent/eva.pt"), audio=beats_tiny_config(dropout=0.0),
                  text=text_tiny_config(100))
    return ModelConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GramModel(tiny_cfg(vision=vision_tiny_config())).eval()


def batch(cfg: ModelConfig) -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (3, 6), generator=g)
    return {"text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            "video": torch.randn(3, cfg.max_frames, 3, 64, 64, generator=g),
            "audio": torch.randn(3, 1, 48, 32, generator=g)}


def outputs(m: GramModel, x: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        out = m(x)
        match = m.match(x["text"]["input_ids"], x["text"]["attention_mask"], out["condition"])
    return [*out["embeddings"].values(), out["condition"], match]


def test_save_and_reload_gives_identical_outputs(tmp_path, model):
    save_hub_layout(model, tmp_path)
    loaded = GramPretrained.from_pretrained(tmp_path)
    assert not loaded.training and loaded.cfg == model_config_from_dict(model_config_to_dict(model.cfg))
    x = batch(model.cfg)
    for a, b in zip(outputs(model, x), outputs(loaded, x)):
        assert torch.equal(a, b)


def test_config_json_has_no_weight_paths_and_round_trips(tmp_path):
    cfg = tiny_cfg()  # names an EVA file that does not exist: it must neither be read nor exported
    with torch.device("meta"):
        meta = GramModel(cfg)
    config = {"format": "gram", "format_version": 1, "model": model_config_to_dict(cfg)}
    assert config["model"]["vision"]["weights"] is None
    restored = model_config_from_dict(config["model"])
    assert restored.vision == vision_tiny_config() and restored.audio == cfg.audio
    assert sum(p.numel() for p in meta.parameters()) > 0


def test_mixin_save_pretrained_writes_the_layout_and_a_card(tmp_path, model):
    hub_model = GramPretrained(model.cfg)
    hub_model.load_state_dict(model.state_dict())
    hub_model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "gram" and config["model"]["embed_dim"] == 32
    x = batch(model.cfg)
    for a, b in zip(outputs(model, x), outputs(GramPretrained.from_pretrained(tmp_path), x)):
        assert torch.equal(a, b)


def test_shared_beats_table_is_stored_once_and_retied(tmp_path, model):
    save_hub_layout(model, tmp_path)
    stored = [k for k in load_file(str(tmp_path / "model.safetensors")) if "relative_attention_bias" in k]
    assert len(stored) == 1
    loaded = GramPretrained.from_pretrained(tmp_path)
    layers = loaded.encoders["audio"].encoder.layers
    assert layers[0].self_attn.relative_attention_bias is layers[1].self_attn.relative_attention_bias
    assert torch.equal(layers[1].self_attn.relative_attention_bias.weight,
                       model.encoders["audio"].encoder.layers[1].self_attn.relative_attention_bias.weight)


def _rewrite(folder, edit) -> None:
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


@pytest.mark.parametrize("edit, offending", [
    (lambda s: s.pop("match_head.linear2.bias"), "missing=['match_head.linear2.bias']"),
    (lambda s: s.update({"projections.extra.weight": torch.zeros(2)}), "unexpected=['projections.extra.weight']"),
    (lambda s: s.update({"projections.video.weight": torch.zeros(3, 64)}),
     "projections.video.weight: file (3, 64) vs model (32, 64)"),
])
def test_strict_load_names_the_offending_key(tmp_path, model, edit, offending):
    save_hub_layout(model, tmp_path)
    _rewrite(tmp_path, edit)
    with pytest.raises(HubLoadError) as err:
        GramPretrained.from_pretrained(tmp_path)
    assert offending in str(err.value) and str(tmp_path) in str(err.value)


def test_allow_list_admits_only_named_absent_keys(tmp_path, model):
    save_hub_layout(model, tmp_path)
    _rewrite(tmp_path, lambda s: [s.pop(k) for k in ("match_head.linear2.bias", "match_head.linear2.weight")])
    loaded = GramPretrained.from_pretrained(tmp_path, allow_missing=["match_head.linear2.*"])
    assert torch.equal(loaded.projections["video"].weight, model.projections["video"].weight)
    with pytest.raises(HubLoadError, match="match_head.linear2.weight"):
        GramPretrained.from_pretrained(tmp_path, allow_missing=["match_head.linear2.bias"])


def test_all_aliases_absent_is_missing(tmp_path, model):
    save_hub_layout(model, tmp_path)
    _rewrite(tmp_path, lambda s: [s.pop(k) for k in list(s) if "relative_attention_bias" in k])
    with pytest.raises(HubLoadError, match=SHARED_TABLE.format(0).replace(".", r"\.")):
        GramPretrained.from_pretrained(tmp_path)


def test_foreign_config_is_refused(tmp_path, model):
    save_hub_layout(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 768}))
    with pytest.raises(ValueError, match="not a gram hub config"):
        GramPretrained.from_pretrained(tmp_path)


def test_training_checkpoint_exports_to_the_hub_layout(tmp_path, model):
    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    save_model(GramTask(model, LossConfig()), str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({"model": model_config_to_dict(model.cfg)}))
    hub = checkpoint_to_hub(ckpt, tmp_path / "hub")
    assert not any(k.startswith(("model.", "loss.")) for k in load_file(str(hub / "model.safetensors")))
    x = batch(model.cfg)
    for a, b in zip(outputs(model, x), outputs(GramPretrained.from_pretrained(hub), x)):
        assert torch.equal(a, b)
