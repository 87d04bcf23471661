"""EVA vision tower: parity with the reference vectors, every weight layout, resizing, checkpointing, meta build."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gram.models.vision import (
    VisionConfig,
    VisionEncoder,
    build_vision_encoder,
    load_eva_visual_state,
    vision_tiny_config,
)

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "vectors"
# Reference §2.1: elements of `vision_encoder.visual` (EVA01-CLIP-g/14 with its 1408 -> 1024 head).
EVA_G_PARAMS_WITH_HEAD = 1_012_588_928
EVA_G_HEAD_PARAMS = 1408 * 1024 + 1024


def _need_vectors() -> None:
    if not (VECTORS / "eva_tiny_io.safetensors").is_file():
        pytest.skip(f"reference vectors not found under {VECTORS}")


def _tiny_reference_config(head_dim: int = 0) -> VisionConfig:
    """Translate the reference's EVA-CLIP tiny json (head_width, mlp_ratio) into a VisionConfig."""
    vision = json.loads((VECTORS / "eva_tiny_cfg.json").read_text())["vision_cfg"]
    return VisionConfig(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        width=vision["width"],
        depth=vision["layers"],
        num_heads=vision["width"] // vision["head_width"],
        mlp_hidden=int(vision["width"] * vision["mlp_ratio"]),
        drop_path_rate=vision["drop_path_rate"],
        head_dim=head_dim,
    )


@pytest.fixture(scope="module")
def reference():
    _need_vectors()
    return load_file(VECTORS / "eva_tiny_visual_state_dict.safetensors"), load_file(
        VECTORS / "eva_tiny_io.safetensors"
    )


def _run(encoder: VisionEncoder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval()(x)


def test_evaclip_layout_matches_reference_all_tokens(reference, tmp_path):
    state, io = reference
    path = tmp_path / "eva_visual.safetensors"
    save_file(state, path)
    encoder = VisionEncoder(_tiny_reference_config())
    encoder.load_pretrained(path)
    torch.testing.assert_close(_run(encoder, io["x"]), io["all_tokens"], atol=1e-5, rtol=1e-4)


def test_head_is_loaded_strictly_when_kept(reference, tmp_path):
    state, io = reference
    path = tmp_path / "eva_visual.safetensors"
    save_file(state, path)
    encoder = VisionEncoder(_tiny_reference_config(head_dim=32))
    encoder.load_pretrained(path)
    with torch.no_grad():
        head_cls = encoder.eval().trunk(io["x"])  # final norm -> CLS -> head, EVA-CLIP's image embedding
    torch.testing.assert_close(head_cls, io["head_cls"], atol=1e-5, rtol=1e-4)


def test_original_evaclip_pt_wrapped_with_text_tower(reference, tmp_path):
    """EVA-CLIP .pt: state under `module`, DDP `module.` prefix, text tower and logit_scale beside `visual.*`."""
    state, io = reference
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped["module.text.token_embedding.weight"] = torch.zeros(100, 32)
    wrapped["module.logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "EVA01_CLIP_g_14_psz14_s11B.pt"
    torch.save({"module": wrapped, "epoch": 3}, path)
    encoder = VisionEncoder(_tiny_reference_config())
    encoder.load_pretrained(path)
    torch.testing.assert_close(_run(encoder, io["x"]), io["all_tokens"], atol=1e-5, rtol=1e-4)


def test_open_clip_layout(reference, tmp_path):
    """open_clip EVA01-g-14 wraps timm's Eva as `visual.trunk`; its checkpoints sit under `state_dict`."""
    state, io = reference
    layout = {k.replace("visual.", "visual.trunk.", 1): v for k, v in state.items()}
    layout["text.positional_embedding"] = torch.zeros(16, 32)
    layout["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "open_clip_model.pt"
    torch.save({"state_dict": layout}, path)
    encoder = VisionEncoder(_tiny_reference_config())
    encoder.load_pretrained(path)
    torch.testing.assert_close(_run(encoder, io["x"]), io["all_tokens"], atol=1e-5, rtol=1e-4)


def test_timm_layout(reference, tmp_path):
    state, io = reference
    path = tmp_path / "timm_eva.safetensors"
    save_file({k.removeprefix("visual."): v for k, v in state.items()}, path)
    encoder = VisionEncoder(_tiny_reference_config())
    encoder.load_pretrained(path)
    torch.testing.assert_close(_run(encoder, io["x"]), io["all_tokens"], atol=1e-5, rtol=1e-4)


def test_pos_embed_is_resized_bicubically_for_a_larger_image(reference):
    state, _ = reference
    cfg = _tiny_reference_config()
    cfg.image_size = 84  # 6x6 patches instead of 4x4
    encoder = VisionEncoder(cfg)
    resized = load_eva_visual_state(state, encoder.trunk)["pos_embed"]
    old = state["visual.pos_embed"]  # (1, 1 + 16, 64)
    grid = old[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)  # (1, 64, 4, 4)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)  # (1, 64, 6, 6)
    expected = torch.cat([old[:, :1], expected.permute(0, 2, 3, 1).reshape(1, 36, 64)], dim=1)
    torch.testing.assert_close(resized, expected)


def test_load_pretrained_resizes_for_a_larger_image(reference, tmp_path):
    state, _ = reference
    path = tmp_path / "eva_visual.safetensors"
    save_file(state, path)
    cfg = _tiny_reference_config()
    cfg.image_size = 84
    encoder = VisionEncoder(cfg)
    encoder.load_pretrained(path)
    torch.testing.assert_close(encoder.trunk.cls_token, state["visual.cls_token"])
    assert _run(encoder, torch.randn(1, 3, 84, 84)).shape == (1, 37, 64)


def test_missing_file_names_path_and_readme(tmp_path):
    missing = tmp_path / "nope" / "EVA01_CLIP_g_14_psz14_s11B.pt"
    with pytest.raises(FileNotFoundError, match="pretrained_weights/README.md, section EVA-CLIP") as err:
        VisionEncoder(vision_tiny_config()).load_pretrained(missing)
    assert str(missing) in str(err.value)


def test_strict_report_lists_offending_keys(reference, tmp_path):
    state, _ = reference
    broken = dict(state)
    del broken["visual.blocks.1.mlp.fc2.bias"]
    broken["visual.blocks.1.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(broken, path)
    with pytest.raises(KeyError, match=r"blocks\.1\.mlp\.fc2\.bias.*blocks\.1\.extra\.weight"):
        VisionEncoder(_tiny_reference_config()).load_pretrained(path)


def test_unknown_layout_is_rejected():
    with pytest.raises(KeyError, match="pos_embed"):
        load_eva_visual_state({"encoder.weight": torch.zeros(2)})


def _output_and_grads(encoder: VisionEncoder, x: torch.Tensor):
    out = encoder(x)
    (out.square().mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}


def test_grad_checkpointing_same_output_and_grads_and_recomputes():
    torch.manual_seed(0)
    encoder = VisionEncoder(vision_tiny_config()).train()
    x = torch.randn(2, 3, 64, 64)
    out_plain, grads_plain = _output_and_grads(encoder, x)
    encoder.zero_grad()
    calls = []
    encoder.trunk.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    encoder.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _output_and_grads(encoder, x)
    assert len(calls) == 2  # the block started again during backward: checkpointing is really on
    torch.testing.assert_close(out_ckpt, out_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_config_flag_enables_checkpointing():
    assert VisionEncoder(vision_tiny_config(grad_checkpointing=True)).trunk.grad_checkpointing


def test_full_size_on_meta_has_reference_parameter_count():
    with_head = build_vision_encoder(VisionConfig(head_dim=1024), device="meta")
    without = build_vision_encoder(VisionConfig(), device="meta")
    assert sum(p.numel() for p in with_head.parameters()) == EVA_G_PARAMS_WITH_HEAD
    assert sum(p.numel() for p in without.parameters()) == EVA_G_PARAMS_WITH_HEAD - EVA_G_HEAD_PARAMS
    assert with_head.trunk.pos_embed.shape == (1, 257, 1408)
    assert with_head.trunk.blocks[0].mlp.fc1.out_features == 6144
    assert with_head.trunk.pos_embed.is_meta


def test_tiny_forward_shape():
    cfg = vision_tiny_config()
    encoder = VisionEncoder(cfg)
    assert encoder.width == 64
    assert _run(encoder, torch.randn(3, 3, 64, 64)).shape == (3, cfg.num_tokens, 64)


@pytest.mark.parametrize(
    ("field", "value"),
    [("image_size", 60), ("num_heads", 3), ("drop_path_rate", 1.5), ("depth", 0), ("head_dim", -1)],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        vision_tiny_config(**{field: value})
