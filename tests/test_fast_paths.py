"""What keeps the full-size step fast on a GPU, checked on the CPU with the tiny model (issue 17):

* every encoder's attention is one ``F.scaled_dot_product_attention`` call per layer, never an explicit softmax
  (so the fused flash / memory-efficient kernels can run; bench/gpu.py checks the kernels on a GPU);
* AdamW is fused wherever PyTorch has the kernel (CUDA, CPU), and a non-finite step is then skipped on the device
  without a host sync (the trainer's whole step: tests/test_step_pipeline.py);
* the model's forward and the loss compile with ``torch.compile`` and match eager.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.overrides import TorchFunctionMode

from gram.config import ModelConfig, TrainerConfig
from gram.losses import LossConfig
from gram.models.beats import beats_tiny_config
from gram.models.gram_model import GramModel
from gram.models.text import text_tiny_config
from gram.models.vision import vision_tiny_config
from gram.train import engine as engine_module
from gram.train.engine import TorchEngine
from gram.train.optim import build_optimizer
from gram.train.task import GramTask


def tiny_model(**changes) -> GramModel:
    torch.manual_seed(0)
    cfg = ModelConfig(modalities=["video", "audio", "subtitle"], embed_dim=16, max_frames=2,
                      vision=vision_tiny_config(image_size=32), audio=beats_tiny_config(),
                      text=text_tiny_config(60, hidden_dropout=0.0, attention_dropout=0.0), **changes)
    return GramModel(cfg)


def tiny_batch(batch_size: int = 3) -> dict:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch_size, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return {"text": {"input_ids": torch.randint(5, 60, (batch_size, 7), generator=gen) * mask, "attention_mask": mask},
            "subtitle": {"input_ids": torch.randint(5, 60, (batch_size, 9), generator=gen),
                         "attention_mask": torch.ones(batch_size, 9, dtype=torch.long)},
            "video": torch.randn(batch_size, 2, 3, 32, 32, generator=gen),
            "audio": torch.randn(batch_size, 1, 64, 64, generator=gen)}


class CallCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("modality, layers", [("video", "vision"), ("audio", "audio"), ("text", "text")])
def test_every_encoder_attends_through_sdpa_without_an_explicit_softmax(modality, layers):
    model = tiny_model().eval()
    depth = {"vision": model.cfg.vision.depth, "audio": model.cfg.audio.encoder_layers,
             "text": model.cfg.text.num_layers}[layers]
    with torch.no_grad(), CallCounter() as counter:
        model.encode_tokens(modality, tiny_batch()[modality])
    assert counter.names.count("scaled_dot_product_attention") == depth
    assert not [name for name in counter.names if "softmax" in name]


def test_the_matching_cross_encoder_attends_through_sdpa_too():
    model = tiny_model().eval()
    batch = tiny_batch()
    with torch.no_grad():
        condition = model.condition_tokens({m: model.encode_tokens(m, batch[m]) for m in model.modalities})
        with CallCounter() as counter:
            model.match(batch["text"]["input_ids"], batch["text"]["attention_mask"], condition)
    assert counter.names.count("scaled_dot_product_attention") == 2 * model.cfg.text.num_layers  # self + cross
    assert not [name for name in counter.names if "softmax" in name]


def test_timm_eva_attention_takes_the_fused_path():
    model = tiny_model()
    attentions = [m for m in model.encoders["vision"].modules() if hasattr(m, "fused_attn")]
    assert len(attentions) == model.cfg.vision.depth and all(m.fused_attn for m in attentions)


def test_adamw_is_fused_exactly_when_every_parameter_has_a_fused_kernel():
    cfg = TrainerConfig()
    assert build_optimizer(torch.nn.Linear(3, 2), cfg).defaults["fused"]  # CPU has the kernel
    with torch.device("meta"):
        meta = torch.nn.Linear(3, 2)
    assert not build_optimizer(meta, cfg).defaults.get("fused")
    assert not build_optimizer(torch.nn.Linear(3, 2), cfg, fused=False).defaults.get("fused")


def _engine(monkeypatch, fused: bool, grad_clip: float = 1.0) -> TorchEngine:
    """The trainer's engine on the tiny task, with the fused AdamW forced (CPU has a fused kernel too)."""
    monkeypatch.setattr(engine_module, "build_optimizer", lambda task, cfg: build_optimizer(task, cfg, fused=fused))
    task = GramTask(tiny_model(), LossConfig())
    cfg = TrainerConfig(precision="fp32", grad_clip=grad_clip, max_steps=10, warmup_ratio=0.0)
    return TorchEngine(task, cfg, torch.device("cpu"))


def _snapshot(engine: TorchEngine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.task.parameters()]


class NoHostSync(TorchFunctionMode):
    """Fails on what would wait for the GPU: reading a tensor's value on the host, or an op whose output shape
    depends on the values (nonzero, boolean-mask indexing, unique). Autograd's backward is out of its reach
    (tests/test_step_pipeline.py patches the tensor methods for that)."""

    READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
    VALUE_SHAPED = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name in ("__getitem__", "__setitem__") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in self.READS or name in self.VALUE_SHAPED or boolean_index:
            raise AssertionError(f"host sync in the step: {name}")
        return func(*args, **(kwargs or {}))


def test_a_non_finite_step_is_skipped_on_the_device_without_a_host_sync(monkeypatch):
    engine = _engine(monkeypatch, fused=True)
    engine.forward_backward(tiny_batch(), 1, last=True)
    before = _snapshot(engine)
    with NoHostSync():
        engine.step(torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(engine)))
    steps = [s["step"] for s in engine.optimizer.state.values()]
    assert steps and all(float(s) == 0 for s in steps)  # the step count did not advance either
    assert all(p.grad is None for p in engine.task.parameters())
    assert engine.scheduler.last_epoch == 1  # the schedule advances, as for a skipped step on the host path


def test_a_finite_device_step_equals_the_host_checked_unfused_step(monkeypatch):
    engines = {fused: _engine(monkeypatch, fused) for fused in (True, False)}
    for fused, engine in engines.items():
        torch.manual_seed(5)  # the same dropout masks and DAM negatives in both
        engine.forward_backward(tiny_batch(), 1, last=True)
        with NoHostSync() if fused else torch.no_grad():
            engine.step(torch.tensor(True) if fused else True)
    fused, plain = (_snapshot(engines[f]) for f in (True, False))
    assert any(not torch.equal(a, b) for a, b in zip(fused, [p.detach() for p in tiny_model().parameters()]))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _compile_or_skip():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    from torch import _dynamo

    _dynamo.reset()


@pytest.mark.slow
def test_the_model_forward_and_the_loss_compile_and_match_eager():
    """aot_eager traces what inductor would compile (forward and backward graphs) without generating code, which
    takes minutes on a small CPU; bench/gpu.py compiles with inductor on the GPU. Eval mode: no dropout, so both
    paths compute the same function (gradients still flow)."""
    _compile_or_skip()
    task = GramTask(tiny_model(), dataclasses.replace(LossConfig(), dam_weight=0.0)).eval()
    batch = tiny_batch()
    eager = task(batch)["loss"]
    eager_grads = torch.autograd.grad(eager, [p for p in task.parameters() if p.requires_grad], allow_unused=True)
    compiled_forward = torch.compile(task.model.forward, backend="aot_eager")
    compiled_loss = torch.compile(task.loss, backend="aot_eager")
    out = compiled_forward(batch)
    loss = compiled_loss(out["embeddings"], task.model.modalities)["loss"]
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, [p for p in task.parameters() if p.requires_grad], allow_unused=True)
    assert sum(a is not None and bool(a.abs().sum() > 0) for a in grads) > 10
    for a, b, p in zip(grads, eager_grads, [p for p in task.parameters() if p.requires_grad]):
        # An unused parameter (the matching head without DAM) gets None eagerly and may get zeros compiled.
        a, b = (torch.zeros_like(p) if g is None else g for g in (a, b))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
