"""tools/benchmark_vs_peft.py --smoke runs and writes the JSON the issue specifies."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vs_peft_smoke(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark_vs_peft.py"), "--smoke",
                           "--json", str(out), "--png", str(tmp_path / "r.png")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["hidden"] == 64 and result["config"]["dtype"] == "fp32"
    assert set(result["results"]) == {"lora", "bdlora"}
    for kind, r in result["results"].items():
        for key in ("speedup_vs_peft", "overhead_vs_base"):
            s = r[key]
            assert 0 < s["p10"] <= s["median"] <= s["p90"], (kind, key, s)
        assert 1 < r["flop_ratio"] < r["overhead_bound"] < 2
        assert r["ours"]["trainable_params"] == r["peft"]["trainable_params"] == r["adapter"]["params"]
        assert abs(r["ours"]["first_step_loss"] - r["peft"]["first_step_loss"]) < 1.0  # both ~ln(vocab)
    assert (tmp_path / "r.png").stat().st_size > 0
    assert "ours/PEFT" in proc.stdout
