"""Channels and dtypes that keep tensor cores busy (issue 17), checked on the CPU.

A bf16 matmul runs at full speed on tensor cores when every matrix it reads or writes has a leading dimension that is
a multiple of 8 elements (16 bytes; cuBLAS/cuDNN otherwise fall back to less aligned, slower kernels), and the fused
attention kernels need a head dim that is a multiple of 8 and at most 256 (PyTorch's flash and memory-efficient SDPA
backends; flash pads other sizes with a copy, memory-efficient refuses them). What is checked here:

* shapes: the full-size model of ``experiment=finetune_msrvtt_tvas`` (EVA01-CLIP-g/14, BEATs, BERT-base with
  cross-attention) is built on the meta device (no memory, no weight file) and a forward and backward at the
  paper's input shapes is traced there: every linear layer's sizes, every head dim and the leading dimensions of
  every GEMM and convolution, with the deliberate exceptions named in ``GEMM_EXCEPTIONS``;
* dtypes: the tiny model (configs/model/tiny.yaml) under CPU bf16 autocast, as the trainer runs it: every
  matmul-class op of the forward and backward (mm, addmm, bmm, convolution, the SDPA kernels) reads bf16;
* memory format: the convolutions are patchify convs (stride == kernel) and a Conv1d, a negligible share of the
  FLOPs, so ``channels_last`` is not worth a code path (bench/README.md, "Tensor cores").

The GRAM loss (gram/losses) is deliberately float32 with autocast disabled and is not traced here. What only a GPU
can show (which kernels run) is in bench/README.md, section "Tensor cores: shapes, dtypes, memory format".
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from gram.config import without_pretrained
from gram.models.gram_model import GramModel
from tests.conftest import compose_config

ALIGN = 8  # bf16 elements in 16 bytes
MAX_FUSED_HEAD_DIM = 256
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm"}
CONV_OPS = {"convolution", "convolution_backward"}
# Linear layers whose sizes are deliberately not multiples of 8, and why they may stay so.
LINEAR_EXCEPTIONS = {
    "match_head.linear2": "the 2-way match/no-match logits of the DAM head: one (pairs x 768) @ (768 x 2) GEMM",
}
# Softmax statistics that every fused attention kernel keeps in float32 by design (not a matmul operand).
FP32_BY_DESIGN = {"logsumexp"}


def full_config():
    """The typed config of the paper's finetune (T-VAS on MSR-VTT) with no weight files."""
    cfg = OmegaConf.to_object(compose_config("experiment=finetune_msrvtt_tvas", "init_from=null"))
    without_pretrained(cfg.model)
    return cfg


def tiny_config():
    """The sample run's tiny model (configs/model/tiny.yaml) with the finetune's modalities (T-VAS)."""
    cfg = OmegaConf.to_object(compose_config("experiment=sample"))
    cfg.model.modalities = ["video", "audio", "subtitle"]
    return cfg


def paper_batch(cfg, batch_size: int, device: str | torch.device) -> dict:
    """A training batch at the data config's shapes (random values; shapes only on the meta device)."""
    data = cfg.data
    gen = None if str(device) == "meta" else torch.Generator().manual_seed(0)

    def tokens(length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(5, cfg.model.text.vocab_size, (batch_size, length), generator=gen, device=device)
        mask = torch.ones(batch_size, length, dtype=torch.long, device=device)
        mask[0, length // 2:] = 0  # one padded caption
        return {"input_ids": ids * mask, "attention_mask": mask}

    batch = {"text": tokens(data.max_text_len), "subtitle": tokens(data.max_subtitle_len),
             "video": torch.randn(batch_size, data.num_frames, 3, data.image_size, data.image_size, generator=gen,
                                  device=device),
             "audio": torch.randn(batch_size, data.num_audio_clips, data.audio_target_length, data.audio_mel_bins,
                                  generator=gen, device=device)}
    return {m: batch[m] for m in ("text", *cfg.model.modalities)}


def forward_backward(model: GramModel, batch: dict) -> None:
    """Embeddings of every modality and the matching head's logits, then a backward through all of them."""
    out = model(batch)
    logits = model.match(batch["text"]["input_ids"], batch["text"]["attention_mask"], out["condition"])
    outputs = [*out["embeddings"].values(), logits]
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])


# ------------------------------------------------------------------------------------------------ shapes
@dataclass
class SdpaCall:
    encoder: str
    query: tuple[int, ...]
    key: tuple[int, ...]
    value: tuple[int, ...]


class ShapeTrace(TorchFunctionMode):
    """Records each SDPA call's shapes (per encoder) and runs a GEMM-free stand-in for it.

    On the meta device SDPA decomposes into the math path's bmm over (tokens x tokens) scores, which a GPU never
    runs (it takes a fused kernel); the stand-in keeps the trace to the GEMMs the GPU does run, with gradients
    still flowing to q, k, v and the mask.
    """

    def __init__(self, model: GramModel) -> None:
        super().__init__()
        self.calls: list[SdpaCall] = []
        self.encoder = "?"
        self.handles = []
        for name, encoder in model.encoders.items():
            self.handles.append(encoder.register_forward_pre_hook(lambda *_, name=name: self._enter(name)))
            self.handles.append(encoder.register_forward_hook(lambda *_: self._enter("?")))

    def _enter(self, name: str) -> None:
        self.encoder = name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value = args[:3]
        self.calls.append(SdpaCall(self.encoder, tuple(query.shape), tuple(key.shape), tuple(value.shape)))
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        out = query + key.mean(-2, keepdim=True) + value.mean(-2, keepdim=True)
        return out if mask is None else out + mask.mean(-1, keepdim=True)

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return super().__exit__(*exc)


class OpTrace(TorchDispatchMode):
    """Records every op in ``names`` with its arguments by schema name (and its output)."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names
        self.ops: list[tuple[str, dict[str, object], object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in self.names or "scaled_dot_product" in name or "attention" in name:
            named = {a.name: v for a, v in zip(func._schema.arguments, args)}
            self.ops.append((name, {**named, **kwargs}, out))
        return out


def describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)}/{t.stride()}+{t.storage_offset()}"


def misaligned(t: torch.Tensor) -> str | None:
    """Why cuBLAS could not read ``t``'s last two dims as a 16-byte aligned matrix, or None if it can."""
    rows, cols = t.shape[-2:]
    row_stride, col_stride = t.stride()[-2:]
    if t.storage_offset() % ALIGN:
        return "start not 16-byte aligned"
    if t.dim() == 3 and t.shape[0] > 1 and t.stride(0) % ALIGN:
        return f"batch stride {t.stride(0)}"
    if rows == 1 or cols == 1:
        return None  # a vector: no leading dimension
    if col_stride == 1:
        return None if row_stride % ALIGN == 0 else f"leading dim {row_stride}"
    if row_stride == 1:
        return None if col_stride % ALIGN == 0 else f"leading dim {col_stride}"
    return "neither dim contiguous (a copy first)"


@pytest.fixture(scope="module")
def full_model():
    cfg = full_config()
    with torch.device("meta"):
        model = GramModel(cfg.model).train()
    for encoder in model.encoders.values():
        encoder.set_grad_checkpointing(False)  # same GEMMs; without it the backward does not re-run the forward
    return cfg, model


@pytest.fixture(scope="module")
def full_trace(full_model):
    """One training forward + backward of the full model on the meta device at the paper's shapes (batch 3)."""
    cfg, model = full_model
    ops = OpTrace(GEMM_OPS | CONV_OPS)
    with ShapeTrace(model) as sdpa, ops:
        forward_backward(model, paper_batch(cfg, 3, "meta"))
    return sdpa.calls, ops.ops


def test_the_full_model_is_built_on_meta_without_memory_or_weight_files(full_model):
    cfg, model = full_model
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} <= {"meta"}
    count = sum(p.numel() for p in model.parameters())
    assert 1.2e9 < count < 1.3e9, count  # EVA-g ~1.0 B + BEATs ~90 M + BERT with cross-attention ~137 M
    assert (cfg.model.vision.width, cfg.model.vision.depth, cfg.model.vision.mlp_hidden) == (1408, 40, 6144)


def test_every_linear_layer_has_sizes_that_are_multiples_of_8(full_model):
    _, model = full_model
    sizes, offenders = defaultdict(int), []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        sizes[(re.sub(r"\.\d+\.", ".N.", name), module.in_features, module.out_features)] += 1
        if (module.in_features % ALIGN or module.out_features % ALIGN) and name not in LINEAR_EXCEPTIONS:
            offenders.append(f"{name}: {module.in_features} -> {module.out_features}")
    assert not offenders, "linear layers with sizes that are not multiples of 8:\n" + "\n".join(offenders)
    for name in LINEAR_EXCEPTIONS:  # the exceptions exist and still need to be exceptions
        module = model.get_submodule(name)
        assert module.in_features % ALIGN or module.out_features % ALIGN, name
    # The real sizes, pinned: EVA-g qkv 1408 -> 3 x 1408 and MLP 6144, BEATs 768/3072 with its 512-d patch
    # embedding and 64 -> 8 relative-position gate, BERT 768/3072.
    expected = {
        ("encoders.vision.trunk.blocks.N.attn.qkv", 1408, 4224): 40,
        ("encoders.vision.trunk.blocks.N.attn.proj", 1408, 1408): 40,
        ("encoders.vision.trunk.blocks.N.mlp.fc1", 1408, 6144): 40,
        ("encoders.vision.trunk.blocks.N.mlp.fc2", 6144, 1408): 40,
        ("encoders.audio.post_extract_proj", 512, 768): 1,
        ("encoders.audio.encoder.layers.N.self_attn.grep_linear", 64, 8): 12,
        ("encoders.audio.encoder.layers.N.fc1", 768, 3072): 12,
        ("encoders.audio.encoder.layers.N.fc2", 3072, 768): 12,
        ("encoders.text.encoder.layer.N.intermediate.dense", 768, 3072): 12,
        ("encoders.text.encoder.layer.N.output.dense", 3072, 768): 12,
        ("projections.video", 1408, 512): 1,
        ("condition_projections.video.0", 1408, 768): 1,
    }
    assert {k: sizes[k] for k in expected} == expected
    square = {k for k in sizes if k[1:] == (768, 768)}
    assert sum(sizes[k] for k in square) == 4 * 12 + 8 * 12 + 3  # BEATs q/k/v/out, BERT self + cross, audio/subtitle
    # condition projections and the match head's hidden layer


def test_every_head_dim_fits_the_fused_attention_kernels(full_trace):
    calls, _ = full_trace
    offenders = [c for c in calls if not (c.query[-1] == c.key[-1] == c.value[-1]
                                          and c.query[-1] % ALIGN == 0 and c.query[-1] <= MAX_FUSED_HEAD_DIM)]
    assert not offenders, "SDPA calls whose head dim the fused kernels cannot take:\n" + "\n".join(map(str, offenders))
    head_dims = defaultdict(set)
    for call in calls:
        head_dims[call.encoder].add(call.query[-1])
    assert dict(head_dims) == {"vision": {88}, "audio": {64}, "text": {64}}  # 1408 / 16, 768 / 12, 768 / 12
    counts = defaultdict(int)
    for call in calls:
        counts[call.encoder, call.query[1], call.query[2], call.key[2]] += 1
    # (encoder, heads, query tokens, key tokens): 4 frames x 257 EVA tokens (16 x 16 patches + CLS), 256 BEATs
    # tokens (1024 frames x 64 mel bins / 16 x 16 patches), 40-token captions and 70-token subtitles through BERT,
    # and the matching head's cross-attention over 4 x 257 + 256 + 70 = 1354 condition tokens.
    assert dict(counts) == {("vision", 16, 257, 257): 40, ("audio", 12, 256, 256): 12, ("text", 12, 40, 40): 24,
                            ("text", 12, 70, 70): 12, ("text", 12, 40, 1354): 12}


def _is_match_logits(tensors: list[torch.Tensor], model: GramModel) -> bool:
    out_features, width = model.match_head.linear2.weight.shape
    return any(t.dim() == 2 and tuple(t.shape) in {(out_features, width), (width, out_features)} for t in tensors)


def test_every_gemm_of_the_step_reads_and_writes_16_byte_aligned_matrices(full_model, full_trace):
    _, model = full_model
    _, ops = full_trace
    offenders, exempted, gemms = [], 0, 0
    for name, args, out in ops:
        if name not in GEMM_OPS:
            continue
        gemms += 1
        # addmm/baddbmm's `self` is the bias: broadcast, not a matrix operand.
        bias = "self" if name.startswith(("add", "badd")) else None
        matrices = [t for k, t in (*args.items(), ("out", out))
                    if k != bias and isinstance(t, torch.Tensor) and t.dim() >= 2]
        problems = [f"{describe(t)}: {why}" for t in matrices if (why := misaligned(t))]
        if problems and _is_match_logits(matrices, model):
            exempted += 1
        elif problems:
            offenders.append(f"aten.{name} " + ", ".join(problems))
    assert gemms > 1000  # the whole forward and backward was traced
    assert not offenders, f"{len(offenders)} GEMMs with misaligned matrices:\n" + "\n".join(offenders[:40])
    assert exempted == 3  # the match head's 768 -> 2: forward, input gradient, weight gradient


def test_every_convolution_is_an_aligned_implicit_gemm_except_evas_rgb_patch_embedding(full_model, full_trace):
    _, model = full_model
    _, ops = full_trace
    rgb_patches = model.encoders["vision"].trunk.patch_embed.proj.weight.shape  # (1408, 3, 14, 14)
    seen, offenders = [], []
    for name, args, _ in ops:
        if name != "convolution":
            continue
        weight, groups = args["weight"], args["groups"]
        gemm_n, gemm_k = weight.shape[0] // groups, math.prod(weight.shape[1:])  # per group: C_out, C_in x kernel
        seen.append((tuple(weight.shape), groups, gemm_n, gemm_k))
        if (gemm_n % ALIGN or gemm_k % ALIGN) and weight.shape != rgb_patches:
            offenders.append(f"weight {tuple(weight.shape)}, groups {groups}: N={gemm_n}, K={gemm_k}")
    assert not offenders, "convolutions whose implicit GEMM is misaligned:\n" + "\n".join(offenders)
    # EVA's 14 x 14 patches of 3 channels: K = 588. BEATs' 16 x 16 fbank patches: K = 256 into 512 channels. BEATs'
    # positional conv: 16 groups of 48 channels, kernel 128 -> K = 6144.
    assert sorted(seen) == [((512, 1, 16, 16), 1, 512, 256), ((768, 48, 128), 16, 48, 6144),
                            ((1408, 3, 14, 14), 1, 1408, 588)]


def test_the_convolutions_are_a_negligible_share_of_the_flops_so_memory_format_does_not_matter(full_model):
    """channels_last would only matter for the convolutions; here they are two patchify convs (stride == kernel,
    one GEMM each) and a Conv1d (no channels_last for 3-D tensors), together well under 1 % of the forward."""
    cfg, model = full_model
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(paper_batch(cfg, 1, "meta"))
    flops = counter.get_flop_counts()["Global"]
    total = sum(flops.values())
    conv = sum(v for op, v in flops.items() if "convolution" in str(op))
    assert total > 1e12  # one sample: 4 frames through EVA-g alone is ~1 TFLOP
    assert 0 < conv / total < 0.01, f"convolutions are {conv / total:.2%} of {total:.3g} forward FLOPs"
    # BEATs' patch conv reads a 1-channel fbank, where NCHW and channels_last are the same memory.
    fbank = paper_batch(cfg, 1, "meta")["audio"].flatten(0, 1).unsqueeze(1)  # (clips, 1, frames, mel bins)
    assert fbank.is_contiguous() and fbank.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------ dtypes
@pytest.fixture
def bf16_math_sdpa():
    """Let aten's math SDPA fallback compute in bf16 (it upcasts to float32 by default).

    BEATs' attention adds a trainable relative-position bias, so in training its mask requires grad. The CPU fused
    kernel cannot return a mask gradient and aten falls back to the math path, which upcasts; on a GPU the
    memory-efficient kernel takes the mask and its gradient in bf16 (bench/README.md). The fallback's upcast is
    aten's choice, not the model's; the dtypes the model hands SDPA are still checked.
    """
    before = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    yield
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(before)


def test_every_matmul_of_the_tiny_models_step_runs_in_bf16_under_autocast(bf16_math_sdpa):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = GramModel(cfg.model).train()
    batch = paper_batch(cfg, 2, "cpu")
    ops = OpTrace(GEMM_OPS | CONV_OPS)
    with ops:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what gram.train.engine.autocast_context gives for bf16
            out = model(batch)
            logits = model.match(batch["text"]["input_ids"], batch["text"]["attention_mask"], out["condition"])
        outputs = [*out["embeddings"].values(), logits]
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    offenders, kinds = [], defaultdict(int)
    for name, args, _ in ops.ops:
        kinds[name] += 1
        wrong = {k: (v.dtype, tuple(v.shape)) for k, v in args.items()
                 if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.bfloat16
                 and k not in FP32_BY_DESIGN}
        if wrong:
            offenders.append(f"aten.{name}: {wrong}")
    assert not offenders, "matmul-class ops not in bf16 under autocast:\n" + "\n".join(offenders)
    # Forward and backward of every kind ran: linear layers, both patch convs and the positional conv, attention.
    assert kinds["addmm"] and kinds["mm"] and kinds["bmm"], dict(kinds)
    assert kinds["convolution"] == kinds["convolution_backward"] == 3, dict(kinds)
    assert kinds["_scaled_dot_product_flash_attention_for_cpu"] == kinds[
        "_scaled_dot_product_flash_attention_for_cpu_backward"] > 0, dict(kinds)
    # Every parameter got its gradient (accumulated in float32, the parameters' dtype).
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_the_model_hands_sdpa_bf16_queries_keys_and_values_under_autocast():
    """At the ``F.scaled_dot_product_attention`` call, above autocast: what a GPU's fused kernel is given. (BERT's
    additive mask is still float32 there; autocast casts it, which the kernel-level test above sees.)"""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = GramModel(cfg.model).train()
    batch = paper_batch(cfg, 2, "cpu")
    seen = []

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                seen.append(tuple(t.dtype for t in args[:3]))
            return func(*args, **(kwargs or {}))

    with Calls(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        model.match(batch["text"]["input_ids"], batch["text"]["attention_mask"], out["condition"])
    assert len(seen) == cfg.model.vision.depth + cfg.model.audio.encoder_layers + 4 * cfg.model.text.num_layers
    offenders = [dtypes for dtypes in seen if set(dtypes) != {torch.bfloat16}]
    assert not offenders, f"SDPA calls with non-bf16 q/k/v: {offenders}"


# ------------------------------------------------------------------------------------------------ report
def report() -> None:
    """Print the numbers bench/README.md quotes ("Tensor cores"): sizes, head dims and forward FLOP shares."""
    cfg = full_config()
    with torch.device("meta"):
        model = GramModel(cfg.model).train()
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    for name, encoder in model.encoders.items():
        print(f"  encoders.{name}: {sum(p.numel() for p in encoder.parameters()):,}")
    sizes = defaultdict(int)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            sizes[re.sub(r"\.\d+\.", ".N.", name), module.in_features, module.out_features] += 1
    for (name, fan_in, fan_out), count in sizes.items():
        print(f"  {count:3d} x {name}: {fan_in} -> {fan_out}")
    with ShapeTrace(model) as sdpa, torch.no_grad():
        out = model(paper_batch(cfg, 1, "meta"))
        model.match(*paper_batch(cfg, 1, "meta")["text"].values(), out["condition"])
    for call in sorted({(c.encoder, c.query, c.key) for c in sdpa.calls}):
        print(f"  SDPA {call[0]}: q {call[1]}, k {call[2]} (head dim {call[1][-1]})")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(paper_batch(cfg, 1, "meta"))
    flops = counter.get_flop_counts()
    total = sum(flops["Global"].values())
    print(f"forward FLOPs of one training sample (encoders and projections, no matching pass): {total / 1e12:.3f} T")
    for name, per_op in flops.items():
        if name.count(".") == 2 or name.endswith(("patch_embed.proj", "patch_embedding", "pos_conv.0")):
            print(f"  {name}: {sum(per_op.values()) / 1e9:.2f} G ({sum(per_op.values()) / total:.3%})")


if __name__ == "__main__":
    report()
