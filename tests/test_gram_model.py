"""The full-size GramModel on the meta device: builds without weights or memory, and has the reference's parameter
counts (reference spec §2.1 and the shipped key list)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gram.config import ModelConfig
from gram.models import convert as C
from gram.models.gram_model import GramModel, building_on_meta
from tests.conftest import shared_path

ALL = ["video", "audio", "subtitle", "depth"]
# Reference spec §2.1: unique parameters of the whole reference GRAM, and of the EVA visual tower incl. its head.
REFERENCE_UNIQUE_PARAMS = 1_373_858_094
REFERENCE_EVA_VISUAL = 1_012_588_928
EVA_HEAD = 1408 * 1024 + 1024  # visual.head (1408 -> 1024), unused by GRAM and not built here


@pytest.fixture(scope="module")
def full():
    """gram_base with every modality, pointing at weight files that do not exist: meta must not read them."""
    cfg = ModelConfig(modalities=ALL)
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, weights="absent/EVA01_CLIP_g_14_psz14_s11B.pt"),
        audio=dataclasses.replace(cfg.audio, weights="absent/BEATs_iter3_plus_AS2M.pt"),
        text=dataclasses.replace(cfg.text, weights="absent/bert-base-uncased"))
    with torch.device("meta"):
        assert building_on_meta()
        return GramModel(cfg)


def tsv_elements(prefix: str, exclude: tuple[str, ...] = ()) -> int:
    keys = C.read_key_list(shared_path("reference", "gram-checkpoint-keys.tsv"))
    return sum(math.prod(shape) for k, (shape, _) in keys.items() if k.startswith(prefix) and not k.startswith(exclude))


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a shared tensor once


def test_meta_build_reads_no_file_and_allocates_nothing(full):
    assert not building_on_meta()
    assert all(p.device.type == "meta" for p in full.parameters())
    assert full.encoders["vision"].trunk.pos_embed.shape == (1, 257, 1408)


def test_vision_tower_count_matches_the_reference_spec(full):
    assert params(full.encoders["vision"]) + EVA_HEAD == REFERENCE_EVA_VISUAL


def test_audio_and_text_counts_match_the_key_list(full):
    # The key list repeats BEATs' shared relative-position table (320 x 12) under each of the 12 layers.
    assert params(full.encoders["audio"]) == tsv_elements("audio_encoder.") - 11 * 320 * 12
    # The reference's BERT state dict also holds the position_ids buffer (1, 512).
    assert params(full.encoders["text"]) == tsv_elements("multimodal_encoder.bert.") - 512


def test_total_matches_the_reference_minus_the_dropped_parts(full):
    """Ours + the temperature (in the loss) - depth's copies of the vision condition tensors == the reference's
    unique parameters minus the parts the key map drops (EVA text tower, logit scale, EVA head, fused heads, MLM
    head; the MLM decoder weight and bias are tied to the word embeddings and the head bias)."""
    tied = 30522 * 768 + 30522
    dropped = (tsv_elements("vision_encoder.text.") + 1 + EVA_HEAD + tsv_elements("contra_head_v", ("contra_head_v.",))
               + tsv_elements("multimodal_encoder.cls.") - tied)
    depth_copies = (params(full.condition_projections["depth"]) + full.frame_embeddings["depth"].numel()
                    + full.type_embeddings["depth"].numel())
    assert params(full) + 1 - depth_copies == REFERENCE_UNIQUE_PARAMS - dropped


def test_meta_and_cpu_builds_have_the_same_state_dict_layout():
    from gram.models.beats import beats_tiny_config
    from gram.models.text import text_tiny_config
    from gram.models.vision import vision_tiny_config

    cfg = ModelConfig(modalities=ALL, embed_dim=16, max_frames=3, vision=vision_tiny_config(),
                      audio=beats_tiny_config(), text=text_tiny_config(50))
    with torch.device("meta"):
        meta = GramModel(cfg).state_dict()
    cpu = GramModel(cfg).state_dict()
    assert {k: v.shape for k, v in meta.items()} == {k: v.shape for k, v in cpu.items()}
    assert all(v.is_meta for v in meta.values()) and not any(v.is_meta for v in cpu.values())
