"""bench/gpu_e2e.sh DRY=1 (python -m bench.e2e --dry): the GPU check's steps on the CPU with tiny-xl, and the
rows it appends, ending with the summary row."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_appends_every_run_and_the_summary_row(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = dict(os.environ, DRY="1", OUT=str(out), BENCH_TMP=str(tmp_path / "work"), OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_e2e.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("run") for r in rows[:-1]] == ["build_cache", "bench", "raw", "cached"]
    assert all(r["rc"] == 0 for r in rows[:-1])
    summary = rows[-1]
    assert {"mode", "model", "gpu", "bench_pairs_per_s", "raw_pairs_per_s", "cached_pairs_per_s",
            "peak_mem_GiB"} <= summary.keys()
    assert summary["mode"] == "e2e" and summary["model"] == "tiny-xl" and summary["gpu"] == "cpu"
    assert {"torch", "diffusers"} <= summary.keys() and all(r["gpu"] == "cpu" for r in rows)
    for name in ("bench", "raw", "cached"):
        assert summary[f"{name}_pairs_per_s"] > 0
        assert summary["runs"][name] == [rows[1 + ("bench", "raw", "cached").index(name)]["pairs_per_s"]]
    assert summary["raw_over_bench"] == round(summary["raw_pairs_per_s"] / summary["bench_pairs_per_s"], 3)
    assert summary["peak_mem_GiB"] is None  # (CUDA's peak; none on the CPU)
    assert summary["raw_num_workers"] == 0
    assert json.loads(p.stdout.strip().splitlines()[-1]) == summary
