"""The extension's build, loading, fallback and composition with torch.compile."""
import os
import subprocess
import sys
import time

import pytest
import torch

import fastrlhf
from fastrlhf import ops, ref


def _reset_dispatch(monkeypatch):
    monkeypatch.setattr(ops, "_loaded", {})
    monkeypatch.setattr(ops, "_warned", set())


def test_fallback_when_extension_cannot_be_imported(monkeypatch):
    _reset_dispatch(monkeypatch)
    monkeypatch.setitem(sys.modules, "fastrlhf.extension", None)  # import now raises ImportError
    r, v = torch.randn(3, 9), torch.randn(3, 9)
    m = (torch.arange(9)[None] < torch.tensor([[9], [4], [0]])).float()
    with pytest.warns(RuntimeWarning, match="gae: ext backend unavailable .*running the PyTorch reference"):
        got = fastrlhf.gae(r, v, m, gamma=0.9, lam=0.7)
    torch.testing.assert_close(got, ref.gae(r, v, m, gamma=0.9, lam=0.7), rtol=0, atol=0)
    logits = torch.randn(4, 20)
    with pytest.warns(RuntimeWarning, match="sample_tokens: ext backend unavailable"):
        tokens, lp = fastrlhf.sample_tokens(logits, temperature=0.0)
    assert torch.equal(tokens, logits.argmax(-1))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per op, not one per call
        fastrlhf.gae(r, v, m)


def test_status_and_operators_registered():
    import fastrlhf.extension as ext
    st = ext.status()
    assert st["cpu"] is True and os.path.exists(st["library"])
    assert st["cuda"] == (st["cuda_reason"] is None)
    assert st["cuda"] or not torch.cuda.is_available() or st["cuda_reason"]
    assert hasattr(torch.ops.fastrlhf, "gae") and hasattr(torch.ops.fastrlhf, "sample_tokens")


def test_composes_with_torch_compile():
    import fastrlhf.extension as ext

    def step(rewards, values, mask, logits):
        adv, ret = ext.gae(rewards, values, mask, gamma=1.0, lam=0.95)
        tokens, lp = ext.sample_tokens(logits, temperature=0.0)
        return adv * 2, ret, tokens, lp

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    args = (torch.randn(2, 6), torch.randn(2, 6), torch.ones(2, 6), torch.randn(2, 11))
    for got, want in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _python(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


@pytest.mark.slow
def test_builds_from_a_clean_cache(tmp_path):
    start = time.perf_counter()
    out = _python("import fastrlhf.extension as e; print(e.status()['library'])", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(tmp_path))
    print(f"clean build + load: {time.perf_counter() - start:.1f} s")


def test_failed_build_raises_with_the_fix_and_ops_fall_back(tmp_path):
    code = ("import warnings, torch, fastrlhf\n"
            "try:\n    import fastrlhf.extension\nexcept ImportError as e:\n    print('IMPORT-ERROR', e)\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    fastrlhf.gae(torch.ones(1, 3), torch.ones(1, 3), torch.ones(1, 3))\n"
            "print('WARN', [str(x.message) for x in w])\n")
    out = _python(code, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORT-ERROR fastrlhf extension: the CPU build failed" in out.stdout
    assert "to fix: install a C++ compiler" in out.stdout
    assert "gae: ext backend unavailable" in out.stdout and "running the PyTorch reference" in out.stdout


def test_info_reports_every_backend_with_a_reason(capsys):
    from fastrlhf.info import info, main
    report = info()
    keys = ("gpu", "triton", "cpu_extension", "cuda_extension", "flash_attn", "bitsandbytes")
    for key in keys:
        entry = report[key]
        assert set(entry) == {"available", "version", "detail"}
        assert entry["available"] or entry["detail"], f"{key}: missing without a reason"
    assert report["cpu_extension"]["available"]
    assert report["gpu"]["available"] == torch.cuda.is_available()
    assert main([]) == 0
    assert "CPU extension   yes" in capsys.readouterr().out
