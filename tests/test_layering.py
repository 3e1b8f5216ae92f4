"""The package's layering (docs/design.md §0): no package-level import cycle, few lazy imports of
our own modules (each commented), and no Megatron-Core where start-up speed or the environment
forbids it (the launcher's one-line errors; the vLLM plugin and its benchmark run without it)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_cycle_and_few_commented_lazy_imports():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "import_layers.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_launcher_and_vllm_side_import_no_megatron_core():
    code = ("import sys\n"
            "import megatron_bdlora.launch.cli, megatron_bdlora.benchmarks.vllm_serving\n"
            "import megatron_bdlora.serving.vllm_plugin, megatron_bdlora.serving.adapter_check\n"
            "assert 'megatron.core' not in sys.modules, 'Megatron-Core imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": ROOT})
