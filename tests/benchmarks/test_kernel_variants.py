"""benchmarks/kernel_variants.py on the CPU interpreter (--tiny): the sweep's own code path end to end (variant run,
comparison with the default configs and with fp64, timing, report files), for the default and the single-pass
backward; the speed numbers are the GPU run's business."""

from __future__ import annotations

import json

import pytest

from benchmarks import kernel_variants


def test_tiny_sweep_runs_checks_and_reports(tmp_path, capsys):
    args = ["--tiny", "--variants", "sp-64x128-swap", "--prewarm", "1", "--out", str(tmp_path)]
    assert kernel_variants.main(args) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["prewarm"] == {"default": "ok", "sp-64x128-swap": "ok"}  # one worker process ran both
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["default", "sp-64x128-swap"]  # the reference is always run first
    for r in rows.values():
        assert "error" not in r and r["ok"], r
        assert r["vs_fp64_small"]["rel"] < 1e-4
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["x_cudnn_fwdbwd"] > 0
    assert rows["sp-64x128-swap"]["vs_default"]["rel"] < 1e-4
    assert rows["sp-64x128-swap"]["configs"]["single"]["dq_reduce"] == "atomic_swap"
    assert report["dense"]["tiny"]["fwdbwd_ms"] > 0
    best = report["best"]["tiny"]
    assert best["fwd"]["variant"] == "default" and best["two_pass"]["variant"] == "default"
    assert best["single_pass"]["variant"] == "sp-64x128-swap"
    table = (tmp_path / "table.md").read_text()
    assert "| tiny | sp-64x128-swap |" in table and "reference" in table
    assert "| tiny | sp-64x128-swap |" in capsys.readouterr().out


def test_unknown_variant_is_one_error_line(tmp_path, capsys):
    assert kernel_variants.main(["--tiny", "--variants", "nope", "--out", str(tmp_path / "kv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --variants: unknown ['nope']")
    assert not (tmp_path / "kv").exists()  # nothing written


def test_parse_prewarm_marks_crashes_and_timeouts():
    out = "noise\nPREWARM-START a\nPREWARM-END a ok\nPREWARM-START b\nPREWARM-END b error: X: y\nPREWARM-START c\n"
    assert kernel_variants.parse_prewarm(out, True) == {"a": "ok", "b": "error: X: y", "c": "crashed"}
    assert kernel_variants.parse_prewarm(out, False)["c"] == "timeout"


def test_variant_names_unique_and_configs_valid():
    from sparse_attn.kernels.block_sparse import _check_config

    names = [v.name for v in kernel_variants.VARIANTS]
    assert len(names) == len(set(names)) and names[0] == "default"
    for v in kernel_variants.VARIANTS:
        for cfg in (v.fwd, v.dkdv, v.dq, v.single):
            if cfg is not None:
                _check_config(cfg, 128, v.name)
        assert v.single is None or (v.dkdv is None and v.dq is None), v.name  # single replaces both


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
