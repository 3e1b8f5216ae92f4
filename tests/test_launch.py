"""The launch lines users type: `torchrun ... pretrain_scripts/finetune_llama.sh FLAGS` (the file is
both the bash launcher and the Python entry torchrun runs), `torchrun --no-python ...`, and a
rank's one-line error. Two launchers acting as two nodes are tests/test_training.py's end to end
run. Tiny model, a few steps.
"""

import json
import os
import subprocess
import sys

from examples.run_commands import LAUNCHER, clean_env
from megatron_bdlora.checkpoint.adapter_checkpoint import AdapterCheckpoint
from megatron_bdlora.parallel.distributed import free_port

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def flags(work, *extra):
    return ["--model-preset", "tiny", "--tokenizer", "data/tokenizer", "--data-path",
            "data/train.jsonl", "--seq-length", "32", "--micro-batch-size", "2", "--lora-rank", "4",
            "--data-cache-dir", str(work / "cache"), "--log-interval", "1", *map(str, extra)]


def _run(cmd, cwd, env=None, timeout=300):
    r = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def test_torchrun_runs_the_script_as_typed(work, together):
    # exactly the documented line: torchrun executes the .sh file with its own Python; and
    # --no-python: torchrun execs the file (bash), which runs the rank on torchrun's interpreter
    # even with no python on PATH. Two independent runs, at the same time.
    no_python = clean_env(PATH="/usr/bin:/bin")
    del no_python["PYTHON"]
    ports = [str(free_port()), str(free_port())]
    together(lambda: _run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", ports[0], LAUNCHER,
                           *flags(work, "--tensor-model-parallel-size", 2, "--train-iters", 2,
                                  "--save", "tr2")], work),
             lambda: _run([*TORCHRUN, "--nproc-per-node", "1", "--master-port", ports[1],
                           "--no-python", LAUNCHER,
                           *flags(work, "--train-iters", 1, "--save", "np1")], work, env=no_python))
    assert AdapterCheckpoint(str(work / "np1")).step == 1
    ck = AdapterCheckpoint(str(work / "tr2"))
    assert ck.step == 2 and ck.config["saved_at_tp"] == 2 and ck.adapter_config.nblocks == 2
    umask = os.umask(0)
    os.umask(umask)
    for f in os.listdir(ck.dir):  # as the umask allows (safetensors alone writes 0600)
        assert os.stat(os.path.join(ck.dir, f)).st_mode & 0o777 == 0o666 & ~umask, f
    # --eval-only --load takes the base model and tokenizer recorded in the checkpoint
    r = _run(["bash", LAUNCHER, "--eval-only", "--load", "tr2", "--eval-data-path",
              "data/eval.jsonl", "--seq-length", "32", "--micro-batch-size", "2", "--eval-iters", "2",
              "--data-cache-dir", str(work / "cache")], work)
    result = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert result["tokens"] > 0 and 0 < result["loss"] < 20


RANK_ERROR = """
import sys, torch.distributed as dist
from megatron_bdlora.errors import InputError
from megatron_bdlora.launch.rank import run_rank

def main():
    dist.init_process_group("gloo")
    if dist.get_rank() == int(sys.argv[1]):
        raise InputError("the bad input, named with its fix")
    dist.barrier()  # the other ranks wait here, as they would in a collective

run_rank(main)
"""


def test_input_error_on_a_nonzero_rank_ends_every_rank_promptly(tmp_path):
    script = tmp_path / "rank_error.py"
    script.write_text(RANK_ERROR)
    r = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()),
                        str(script), "1"], env=clean_env(), capture_output=True,
                       text=True, timeout=120)  # not the 600 s collective timeout
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and ours == ["error: the bad input, named with its fix"], r.stderr
    # nothing of the project's after that line: no second traceback from the waiting rank
    after = r.stderr.split(ours[0], 1)[1]
    assert "megatron_bdlora" not in after and f'File "{script}"' not in after, after
