"""bench/trace_kernels.py: kernel names are put in the right class, and the CPU smoke run writes its trace."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import trace_kernels  # noqa: E402  (bench/trace_kernels.py)


@pytest.mark.parametrize("name, label", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
     "__5x_cublas", "GEMM bf16 (tensor cores)"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", "GEMM bf16 (tensor cores)"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "GEMM bf16 (tensor cores)"),
    ("ampere_sgemm_64x32_sliced1x4_tn", "GEMM fp32/tf32 (not bf16)"),
    ("sm80_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x16_stage4_warpsize2x2x1_tensor16x8x8_kernel",
     "GEMM fp32/tf32 (not bf16)"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4, false, false, "
     "cutlass::bfloat16_t, Flash_kernel_traits<96, 128, 64, 4, cutlass::bfloat16_t> >, false, false>"
     "(pytorch_flash::Flash_fwd_params)", "attention: flash"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
     "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)", "attention: memory-efficient"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<cutlass::arch::Sm80, "
     "cutlass::bfloat16_t, true, false, true, 64, 64, 64, false>::Params)", "attention: memory-efficient"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0",
     "attention: cuDNN"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, "
     "(cudnnKernelDataType_t)2>(cudnn::engines_precompiled::nchw2nhwc_params_t<float>, __nv_bfloat16 const*, "
     "__nv_bfloat16*)", "layout: NCHW<->NHWC"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_"
     "g1_execute_kernel__5x_cudnn", "convolution"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
     "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)",
     "softmax (the loss's, or attention's math fallback)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
     "at::native::GeluType)::{lambda()#2}::operator()() const::{lambda(c10::BFloat16)#1}, "
     "std::array<char*, 2ul> >(int, at::native::GeluCUDAKernelImpl, std::array<char*, 2ul>)", trace_kernels.OTHER),
])
def test_kernel_names_are_classified(name, label):
    assert trace_kernels.classify(name) == label


def test_classes_sum_to_the_whole():
    rows = [{"class": "a", "ms": 3.0}, {"class": "b", "ms": 1.0}, {"class": "a", "ms": 4.0}]
    assert trace_kernels.summary(rows) == {"a": {"ms": 7.0, "share": 0.875}, "b": {"ms": 1.0, "share": 0.125}}


def test_the_smoke_run_profiles_a_step_and_writes_the_trace_and_summary(tmp_path, capsys):
    assert trace_kernels.main(["--smoke", "--warmup", "0", "--steps", "1", "--out-dir", str(tmp_path)]) == 0
    summary = json.loads(next(tmp_path.glob("kernels-*[0-9].json")).read_text())
    trace = json.loads(next(tmp_path.glob("kernels-*.trace.json")).read_text())
    assert summary["device"] == "cpu" and summary["steps"] == 1
    names = {row["name"] for row in summary["kernels"]}
    assert {"aten::addmm", "aten::convolution_backward"} <= names  # the step's forward and backward were profiled
    assert abs(sum(c["share"] for c in summary["classes"].values()) - 1.0) < 1e-3
    assert any(e.get("name") == "aten::addmm" for e in trace["traceEvents"])
    assert "| class | ms | share |" in capsys.readouterr().out
