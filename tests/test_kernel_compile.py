"""The Triton kernels compile for an H100/H200 (sm_90) ahead of time, with no GPU.

The interpreter (TRITON_INTERPRET=1, how the other tests run the kernels on the CPU) checks what the kernels
compute, not that the compiler accepts them; this test runs the real compiler down to PTX and a cubin for
every kernel and specialization the launchers use. It runs in a subprocess because TRITON_INTERPRET must be
unset before triton is imported.
"""
import os
import subprocess
import sys
import textwrap

import pytest

CODE = textwrap.dedent('''
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastrlhf.kernels import batch_entropy as BE, policy_loss as P, token_logprobs as K

    FLOATS = {"inv_temp", "clip_low", "clip_high", "dual_clip", "adv_coeff", "kl_coef", "entropy_coef"}
    INT64 = {"stride_x", "stride_dz", "stride_b", "stride_t", "numel"}

    def signature(fn, constexprs, dtype):
        sig = {}
        for name in inspect.signature(fn.fn).parameters:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in ("x_ptr", "dz_ptr"):
                sig[name] = "*" + dtype                  # the logits and their gradient
            elif name == "labels_ptr":
                sig[name] = "*i64"
            elif name.endswith("_ptr"):
                sig[name] = "*fp32"                      # per-row statistics and coefficients
            else:
                sig[name] = "fp32" if name in FLOATS else "i64" if name in INT64 else "i32"
        return sig

    PPO = dict(IS_PPO=True, HAS_DUAL=True, KL_EST=2, HAS_KL=True, HAS_ENT=True, WRITE_GRAD=True)
    APA = dict(IS_PPO=False, HAS_DUAL=False, KL_EST=1, HAS_KL=True, HAS_ENT=False, WRITE_GRAD=False)
    cases = [
        (K._logprobs_entropy_fwd_kernel, dict(BLOCK_N=1, BLOCK_V=4096)),
        (K._logprobs_entropy_fwd_kernel, dict(BLOCK_N=8, BLOCK_V=512)),
        (K._logprobs_entropy_bwd_kernel, dict(BLOCK_N=1, BLOCK_V=4096)),
        (P._policy_rows_kernel, dict(PPO, BLOCK_N=1, BLOCK_V=4096)),
        (P._policy_rows_kernel, dict(APA, BLOCK_N=4, BLOCK_V=1024)),
        (P._scale_kernel, dict(BLOCK=4096)),
        (BE._batch_mean_kernel, dict(HAS_TARGET=False, BLOCK_V=4096)),
        (BE._batch_mean_kernel, dict(HAS_TARGET=True, BLOCK_V=4096)),      # a mini-batch's p̄ given
        (BE._batch_entropy_bwd_kernel, dict(BLOCK_N=1, BLOCK_V=4096)),
    ]
    target = GPUTarget("cuda", 90, 32)
    for dtype in ("bf16", "fp16", "fp32"):
        for fn, constexprs in cases:
            src = ASTSource(fn=fn, signature=signature(fn, constexprs, dtype), constexprs=constexprs)
            compiled = triton.compile(src, target=target, options={"num_warps": 8})
            assert "cubin" in compiled.asm and ".target sm_90" in compiled.asm["ptx"], fn.fn.__name__
    print("compiled", 3 * len(cases))
''')


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled 27" in out.stdout
