"""Cross-attention BERT: reference vectors, independent composition of transformers' modules, HF folders."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from gram.models.text import (
    TextConfig,
    TextEncoder,
    additive_mask,
    build_text_encoder,
    reference_bert_state,
    text_tiny_config,
)

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "vectors"
# bert-base-uncased without pooler (reference §2.1: embeddings 23.84M + encoder 113.42M, 28.4M of it cross-attention).
BERT_BASE_XATTN_PARAMS = 137_258_496
BERT_BASE_XATTN_CROSS_PARAMS = 12 * (4 * (768 * 768 + 768) + 2 * 768)


@pytest.fixture(scope="module")
def reference():
    if not (VECTORS / "bert_xattn_tiny_io.safetensors").is_file():
        pytest.skip(f"reference vectors not found under {VECTORS}")
    return load_file(VECTORS / "bert_xattn_tiny_state_dict.safetensors"), load_file(
        VECTORS / "bert_xattn_tiny_io.safetensors"
    )


def _reference_encoder(state, attn_implementation: str = "sdpa") -> TextEncoder:
    encoder = TextEncoder(text_tiny_config(100, attn_implementation=attn_implementation))
    encoder.load_state_dict(reference_bert_state(state), strict=True)
    return encoder.eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_matches_reference_text_only_and_cross(reference, attn_implementation):
    """All positions, padded ones included (they attend the valid tokens as in the reference)."""
    state, io = reference
    encoder = _reference_encoder(state, attn_implementation)
    with torch.no_grad():
        text_only = encoder(io["input_ids"], io["attention_mask"])
        cross = encoder(io["input_ids"], io["attention_mask"], io["encoder_hidden_states"])
    torch.testing.assert_close(text_only, io["text_only"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cross, io["cross"], atol=1e-5, rtol=1e-4)


def test_reference_state_drops_only_buffer_and_mlm_head(reference):
    state, _ = reference
    mapped = reference_bert_state(state)
    assert len(mapped) == len(state) - 1 - sum(k.startswith("cls.") for k in state)
    assert set(mapped) == set(TextEncoder(text_tiny_config(100)).state_dict())


def _composed_by_hand(stock: BertModel, ids, mask, condition) -> torch.Tensor:
    """One pass through transformers' own submodules, each called directly: embeddings, then per layer
    BertSelfAttention -> BertSelfOutput -> BertCrossAttention -> BertSelfOutput -> BertIntermediate -> BertOutput,
    with a non-causal (B, 1, 1, L) padding mask and no mask on the condition."""
    self_mask = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # (B, 1, 1, L)
    hidden = stock.embeddings(input_ids=ids)  # (B, L, H)
    for layer in stock.encoder.layer:
        context, _ = layer.attention.self(hidden, attention_mask=self_mask)
        attended = layer.attention.output(context, hidden)
        context, _ = layer.crossattention.self(attended, encoder_hidden_states=condition, attention_mask=None)
        crossed = layer.crossattention.output(context, attended)
        hidden = layer.output(layer.intermediate(crossed), crossed)
    return hidden


def _stock_decoder(state) -> BertModel:
    """transformers' BertModel with cross-attention, carrying the reference weights (eager attention)."""
    config = BertConfig.from_dict(json.loads((VECTORS / "bert_xattn_tiny_cfg.json").read_text()))
    config._attn_implementation = "eager"
    stock = BertModel(config, add_pooling_layer=False).eval()
    stock.load_state_dict(reference_bert_state(state), strict=True)
    return stock


def test_cross_attention_equals_independent_composition_of_library_modules(reference):
    state, io = reference
    stock = _stock_decoder(state)
    encoder = _reference_encoder(state)
    torch.manual_seed(0)
    condition = torch.randn(3, 7, 64)
    with torch.no_grad():
        expected = _composed_by_hand(stock, io["input_ids"], io["attention_mask"], condition)
        got = encoder(io["input_ids"], io["attention_mask"], condition)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (got - encoder(io["input_ids"], io["attention_mask"])).abs().max() > 1e-2  # the condition matters


def test_stock_decoder_would_be_causal(reference):
    """Why the layer is wired here: the stock decoder path differs from the reference's bidirectional one."""
    state, io = reference
    with torch.no_grad():
        stock = _stock_decoder(state)(
            io["input_ids"], io["attention_mask"], encoder_hidden_states=io["encoder_hidden_states"]
        ).last_hidden_state
    assert (stock - io["cross"]).abs().max() > 1e-2


def test_condition_mask_equals_dropping_masked_condition_tokens():
    torch.manual_seed(0)
    encoder = TextEncoder(text_tiny_config(50)).eval()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    condition = torch.randn(2, 9, 64)
    condition_mask = torch.ones(2, 9, dtype=torch.long)
    condition_mask[:, 5:] = 0
    with torch.no_grad():
        masked = encoder(ids, mask, condition, condition_mask)
        dropped = encoder(ids, mask, condition[:, :5])
    torch.testing.assert_close(masked, dropped, atol=1e-5, rtol=1e-4)


def test_text_only_path_ignores_cross_attention_weights():
    torch.manual_seed(0)
    encoder = TextEncoder(text_tiny_config(50)).eval()
    ids, mask = torch.randint(1, 50, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        before = encoder(ids, mask)
        for name, param in encoder.named_parameters():
            if ".crossattention." in name:
                param.add_(1.0)
        torch.testing.assert_close(encoder(ids, mask), before)


def test_additive_mask_values():
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(additive_mask(mask, torch.float32), torch.tensor([[[[0.0, 0.0, -10000.0]]]]))
    assert additive_mask(None, torch.float32) is None


def _tiny_hf_model(tmp_path: Path) -> tuple[BertModel, Path]:
    """A stock transformers BertModel (with pooler) saved the way HF folders are."""
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=50,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    model = BertModel(config).eval()
    with torch.no_grad():  # move LayerNorms and biases off 1/0 so a wrong mapping cannot pass
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "bert")
    return model, tmp_path / "bert"


def _ids_and_mask():
    ids = torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 3, 0, 0, 0]])
    return ids, (ids != 0).long()


def test_loads_hf_folder_and_reproduces_text_only_outputs(tmp_path):
    hf, folder = _tiny_hf_model(tmp_path)
    encoder = TextEncoder(text_tiny_config(50))
    report = encoder.load_pretrained(folder)
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).last_hidden_state
        got = encoder.eval()(ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert report.initialised == [k for k in encoder.state_dict() if ".crossattention." in k]
    assert any(k.startswith("pooler.") for k in report.dropped)
    cross_q = encoder.encoder.layer[0].crossattention.self.query.weight
    assert 0.017 < cross_q.std().item() < 0.023  # left at BERT's N(0, 0.02) init


def test_loads_legacy_gamma_beta_pytorch_bin_with_heads(tmp_path):
    """Old bert-base-uncased files: pytorch_model.bin, `bert.` prefix, LayerNorm gamma/beta, MLM/NSP heads."""
    hf, folder = _tiny_hf_model(tmp_path)
    legacy = {}
    for key, value in hf.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[f"bert.{key}"] = value.clone()
    legacy["cls.predictions.bias"] = torch.zeros(50)
    legacy["cls.seq_relationship.weight"] = torch.zeros(2, 64)
    (folder / "model.safetensors").unlink()
    torch.save(legacy, folder / "pytorch_model.bin")
    encoder = TextEncoder(text_tiny_config(50))
    report = encoder.load_pretrained(folder)
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.eval()(ids, mask), hf(ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-4
        )
    assert "cls.seq_relationship.weight" in report.dropped


def test_hf_folder_with_other_sizes_is_rejected(tmp_path):
    _, folder = _tiny_hf_model(tmp_path)
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        TextEncoder(text_tiny_config(50, num_layers=3)).load_pretrained(folder)


def test_unexpected_key_in_hf_folder_is_listed(tmp_path):
    hf, folder = _tiny_hf_model(tmp_path)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["encoder.layer.0.adapter.weight"] = torch.zeros(4)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(KeyError, match=r"encoder\.layer\.0\.adapter\.weight"):
        TextEncoder(text_tiny_config(50)).load_pretrained(folder)


def test_missing_folder_names_readme(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_weights/README.md, section BERT"):
        TextEncoder(text_tiny_config(50)).load_pretrained(tmp_path / "bert-base-uncased")


def _output_and_grads(encoder: TextEncoder, ids, mask, condition):
    out = encoder(ids, mask, condition)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}


def test_grad_checkpointing_same_output_and_grads_and_recomputes():
    torch.manual_seed(0)
    encoder = TextEncoder(text_tiny_config(50, hidden_dropout=0.0, attention_dropout=0.0)).train()
    ids, mask = _ids_and_mask()
    condition = torch.randn(2, 5, 64)
    out_plain, grads_plain = _output_and_grads(encoder, ids, mask, condition)
    encoder.zero_grad()
    calls = []
    encoder.encoder.layer[0].register_forward_pre_hook(lambda *_: calls.append(1))
    encoder.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _output_and_grads(encoder, ids, mask, condition)
    assert len(calls) == 2  # the layer started again during backward: checkpointing is really on
    torch.testing.assert_close(out_ckpt, out_plain)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_full_size_on_meta_has_reference_parameter_count():
    encoder = build_text_encoder(TextConfig(), device="meta")
    assert sum(p.numel() for p in encoder.parameters()) == BERT_BASE_XATTN_PARAMS
    cross = sum(p.numel() for n, p in encoder.named_parameters() if ".crossattention." in n)
    assert cross == BERT_BASE_XATTN_CROSS_PARAMS
    assert encoder.embeddings.word_embeddings.weight.is_meta


def test_without_cross_attention_has_no_cross_blocks_and_rejects_a_condition():
    encoder = TextEncoder(text_tiny_config(50, cross_attention=False))
    assert not any(".crossattention." in k for k in encoder.state_dict())
    ids, mask = _ids_and_mask()
    with pytest.raises(ValueError, match="cross_attention"):
        encoder(ids, mask, torch.zeros(2, 3, 64))


def test_too_long_input_is_rejected():
    encoder = TextEncoder(text_tiny_config(50))
    with pytest.raises(ValueError, match="64"):
        encoder(torch.ones(1, 65, dtype=torch.long), torch.ones(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_heads", 5), ("hidden_dropout", 1.0), ("attn_implementation", "flash"), ("num_layers", 0)],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        text_tiny_config(50, **{field: value})
