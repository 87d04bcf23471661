"""BEATs: config handling, strict loading of the official layout, parity with the reference vectors, training."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from gram.models.beats import (
    BEATs,
    BeatsConfig,
    beats_tiny_config,
    build_beats,
    load_beats_checkpoint,
    relative_position_bucket,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = SHARED / "reference" / "vectors"
ATOL, RTOL = 1e-5, 1e-4  # vectors README §5: encoders


def _vector_file(name: str) -> Path:
    path = VECTORS / name
    if not path.is_file():
        pytest.skip(f"reference vectors not available: {path}")
    return path


@pytest.fixture(scope="module")
def official_cfg() -> dict:
    return json.loads(_vector_file("beats_tiny_cfg.json").read_text())


@pytest.fixture(scope="module")
def official_state() -> dict:
    from safetensors.torch import load_file

    return load_file(_vector_file("beats_tiny_state_dict.safetensors"))


@pytest.fixture(scope="module")
def io() -> dict:
    from safetensors.torch import load_file

    return load_file(_vector_file("beats_tiny_io.safetensors"))


@pytest.fixture(scope="module")
def reference_model(official_cfg, official_state) -> BEATs:
    model = BEATs(BeatsConfig.from_dict(official_cfg)).eval()
    model.load_state_dict(official_state, strict=True)
    return model


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------- config


def test_tiny_preset_is_the_vectors_config(official_cfg):
    assert BeatsConfig.from_dict(official_cfg) == beats_tiny_config()


def test_default_preset_is_iter3_plus_base():
    cfg = BeatsConfig()
    assert (cfg.encoder_embed_dim, cfg.encoder_layers, cfg.encoder_attention_heads, cfg.encoder_ffn_embed_dim,
            cfg.embed_dim, cfg.conv_pos, cfg.conv_pos_groups, cfg.num_buckets, cfg.max_distance) == (
        768, 12, 12, 3072, 512, 128, 16, 320, 800)
    assert cfg.gru_rel_pos and cfg.deep_norm and cfg.relative_position_embedding and not cfg.layer_norm_first


def test_from_dict_rejects_unknown_fields_and_fills_official_defaults(official_cfg):
    with pytest.raises(ValueError, match="encoder_lyers"):
        BeatsConfig.from_dict({**official_cfg, "encoder_lyers": 3})
    partial = {k: v for k, v in official_cfg.items() if k not in ("gru_rel_pos", "max_distance")}
    cfg = BeatsConfig.from_dict(partial)
    # The official BEATsConfig defaults, not our iter3+ ones, apply to fields a checkpoint omits.
    assert cfg.gru_rel_pos is False and cfg.max_distance == 1280
    assert BeatsConfig.from_dict(dataclasses.asdict(beats_tiny_config())) == beats_tiny_config()


@pytest.mark.parametrize(
    "bad",
    [dict(encoder_attention_heads=5), dict(layer_norm_first=True), dict(activation_fn="glu"),
     dict(dropout=1.0), dict(num_buckets=320, max_distance=80), dict(conv_pos_groups=3)],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        beats_tiny_config(**bad)


# ----------------------------------------------------------------------------------------------- parity


def test_strict_load_and_key_set_round_trip(official_state):
    model = BEATs(beats_tiny_config())
    model.load_state_dict(official_state, strict=True)
    assert set(model.state_dict()) == set(official_state)
    layers = model.encoder.layers
    assert layers[1].self_attn.relative_attention_bias is layers[0].self_attn.relative_attention_bias


def test_final_outputs_match_reference(reference_model, io):
    with torch.no_grad():
        _close(reference_model(io["x_fbank64"]), io["y_fbank64"])
        _close(reference_model(io["x_fbank128"]), io["y_fbank128"])


def test_intermediates_match_reference(reference_model, io):
    encoder = reference_model.encoder
    with torch.no_grad():
        _close(reference_model.embed_patches(io["x_fbank64"]), io["encoder_input_fbank64"])
        _close(encoder.embed_positions(io["encoder_input_fbank64"]), io["layer0_input_fbank64"])
        bias = encoder.relative_position_bias(128)
        _close(bias, io["rel_pos_bias_raw_128"])
        _close(encoder.layers[0](io["layer0_input_fbank64"], bias), io["layer0_output_fbank64"])
        _close(encoder.layers[1](io["layer0_output_fbank64"], bias), io["y_fbank64"])


def test_relative_position_buckets_exact(io):
    offsets = io["rel_pos_offsets"].long()
    assert torch.equal(relative_position_bucket(offsets, 320, 800), io["rel_pos_buckets_by_offset"].long())
    positions = torch.arange(128)
    grid = relative_position_bucket(positions[None, :] - positions[:, None], 320, 800)
    assert torch.equal(grid, io["rel_pos_buckets_128"].long())


def test_buckets_against_t5_formula():
    # Independent scalar form of the bidirectional T5 bucket (half per direction, half exact, log above).
    def bucket(offset: int, num_buckets: int = 320, max_distance: int = 800) -> int:
        half, dist = num_buckets // 2, abs(offset)
        exact = half // 2
        if dist < exact:
            inner = dist
        else:
            inner = min(half - 1, exact + int(math.log(dist / exact) / math.log(max_distance / exact) * (half - exact)))
        return (half if offset > 0 else 0) + inner

    offsets = torch.tensor([-2000, -800, -799, -81, -80, -79, -1, 0, 1, 79, 80, 81, 200, 799, 800, 5000])
    assert relative_position_bucket(offsets, 320, 800).tolist() == [bucket(int(o)) for o in offsets]


# ----------------------------------------------------------------------------------------------- checkpoints


def _write_official(path: Path, cfg: dict, state: dict) -> Path:
    torch.save({"cfg": cfg, "model": state}, path)
    return path


def test_from_pretrained_official_layout(tmp_path, official_cfg, official_state, io):
    path = _write_official(tmp_path / "BEATs_tiny.pt", official_cfg, official_state)
    model = BEATs.from_pretrained(path).eval()
    assert model.cfg.weights == str(path)
    assert set(model.state_dict()) == set(official_state)
    with torch.no_grad():
        _close(model(io["x_fbank64"]), io["y_fbank64"])
    built = build_beats(dataclasses.replace(beats_tiny_config(), weights=str(path), grad_checkpointing=True))
    assert built.cfg.grad_checkpointing
    torch.testing.assert_close(built.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_finetuned_checkpoint_drops_the_classifier(tmp_path, official_cfg, official_state):
    cfg = {**official_cfg, "finetuned_model": True}
    state = {**official_state, "predictor.weight": torch.zeros(527, 64), "predictor.bias": torch.zeros(527)}
    _, loaded = load_beats_checkpoint(_write_official(tmp_path / "ft.pt", cfg, state))
    assert set(loaded) == set(official_state)


def test_missing_checkpoint_names_file_and_readme(tmp_path):
    missing = tmp_path / "BEATs_iter3_plus_AS2M.pt"
    with pytest.raises(FileNotFoundError, match="BEATs_iter3_plus_AS2M.pt") as err:
        BEATs.from_pretrained(missing)
    assert 'pretrained_weights/README.md, section "BEATs"' in str(err.value)


def test_bad_checkpoints_raise(tmp_path, official_cfg, official_state):
    torch.save({"state_dict": official_state}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'cfg' and 'model'"):
        load_beats_checkpoint(tmp_path / "other.pt")
    key = "encoder.layers.1.self_attn.relative_attention_bias.weight"
    state = {**official_state, key: official_state[key] + 1}
    with pytest.raises(ValueError, match="relative_attention_bias"):
        load_beats_checkpoint(_write_official(tmp_path / "split.pt", official_cfg, state))


def test_full_size_builds_on_meta_with_reference_size():
    with torch.device("meta"):
        model = BEATs(BeatsConfig())
    d, ffn, layers, heads, c = 768, 3072, 12, 12, 512
    per_layer = 4 * (d * d + d) + (64 * 8 + 8) + heads + 320 * heads + 4 * d + (d * ffn + ffn) + (ffn * d + d)
    expected = c * 256 + 2 * c + (c * d + d) + (128 + d * 48 * 128 + d) + 2 * d + layers * per_layer
    assert sum(t.numel() for t in model.state_dict().values()) == expected
    assert round(expected / 1e6, 2) == 90.35  # the reference's audio_encoder state_dict size (§2.1)
    unique = sum(p.numel() for p in model.parameters())
    assert unique == expected - (layers - 1) * 320 * heads  # one shared relative-position table
    assert model.width == 768


# ----------------------------------------------------------------------------------------------- training


def _train_step(model: BEATs, fbank: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    model.zero_grad()
    out = model(fbank)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    plain = BEATs(beats_tiny_config()).train()  # dropout on: checkpointing must replay the same masks
    ckpt = BEATs(beats_tiny_config(grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for model in (plain, ckpt):
        model.encoder.layers[0].fc1.register_forward_hook(lambda *_, m=model: calls.append(m is ckpt))
    fbank = torch.randn(2, 64, 32)
    out_a, grads_a = _train_step(plain, fbank, seed=5)
    out_b, grads_b = _train_step(ckpt, fbank, seed=5)
    assert calls == [False, True, True]  # the checkpointed layer really re-ran in the backward pass
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(grads_b, grads_a, rtol=1e-5, atol=1e-7)
    ckpt.set_grad_checkpointing(False)
    calls.clear()
    _train_step(ckpt, fbank, seed=5)
    assert calls == [True] and not ckpt.cfg.grad_checkpointing  # one forward, no recompute


def test_every_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    model = BEATs(beats_tiny_config()).train()
    out, grads = _train_step(model, torch.randn(3, 48, 64), seed=1)
    assert out.shape == (3, 3 * 4, 64) and torch.isfinite(out).all()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_layer_wise_gradient_decay_scales_early_gradients():
    torch.manual_seed(0)
    base = BEATs(beats_tiny_config()).eval()
    decayed = BEATs(beats_tiny_config(layer_wise_gradient_decay_ratio=0.5)).eval()
    decayed.load_state_dict(base.state_dict())
    fbank = torch.randn(1, 32, 32)
    out_a, grads_a = _train_step(base, fbank, seed=0)
    out_b, grads_b = _train_step(decayed, fbank, seed=0)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    # The gradient multiplier sits before each of the 2 layers, so the patch embedding sees 0.5 ** 2.
    torch.testing.assert_close(grads_b["patch_embedding.weight"], grads_a["patch_embedding.weight"] * 0.25)
    torch.testing.assert_close(grads_b["encoder.layers.1.fc1.weight"], grads_a["encoder.layers.1.fc1.weight"])


def test_pre_ln_variant_runs():
    model = BEATs(beats_tiny_config(deep_norm=False, layer_norm_first=True, gru_rel_pos=False)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 32, 64))
    assert out.shape == (1, 8, 64) and torch.isfinite(out).all()
    assert "encoder.layers.0.self_attn.grep_a" not in model.state_dict()


def test_own_model_saved_in_official_layout_round_trips(tmp_path):
    torch.manual_seed(0)
    model = BEATs(beats_tiny_config(encoder_layers=3)).eval()
    cfg = model.cfg.to_official_dict()
    assert BeatsConfig.from_dict(cfg) == model.cfg
    path = _write_official(tmp_path / "own.pt", cfg, model.state_dict())
    reloaded = BEATs.from_pretrained(path).eval()
    fbank = torch.randn(2, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(fbank), model(fbank), rtol=0, atol=0)


def test_gram_clip_shape_and_silent_input():
    from gram.data.audio import silent_clips

    model = BEATs(beats_tiny_config()).eval()
    with torch.no_grad():
        out = model(silent_clips(2, 1024, 64))  # GRAM's (b * n_a, 1024, 64) clips
    assert out.shape == (2, (1024 // 16) * (64 // 16), model.width) and torch.isfinite(out).all()
