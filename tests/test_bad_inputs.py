"""Bad inputs through the real launcher and the converter: exit status 2, exactly one error line,
no traceback, nothing written or changed (the directories involved are listed and hashed).

The table runs in-process through the launcher's own entry point (`launch.cli.main`, what
finetune_llama.sh execs) and the converter's `main`: the checks are the launcher's pre-flight, so
no rank starts (a case that passed pre-flight would fail the test instead of training). A few
cases also run as the literal `bash pretrain_scripts/finetune_llama.sh ...` subprocess. The two
data-loss cases (export --overwrite; orphaned ranks + a second writer) are tests of their own.
"""

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from examples.run_commands import LAUNCHER, alive, clean_env, descendants, make_demo_data
from megatron_bdlora.checkpoint.adapter_checkpoint import AdapterCheckpoint, list_checkpoints


def _snapshot(*dirs) -> dict:
    """{path: sha256} of every file (and every directory, as None) under `dirs`."""
    out = {}
    for top in dirs:
        for d, subdirs, files in os.walk(top):
            out[d] = None
            for f in files:
                with open(os.path.join(d, f), "rb") as fh:
                    out[os.path.join(d, f)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory, launch):
    d = tmp_path_factory.mktemp("bad")
    make_demo_data(d, num_train=48, num_eval=16, num_pretrain=16)
    cache = str(tmp_path_factory.mktemp("cache"))
    one_step = ["--model-preset", "tiny", "--tokenizer", "data/tokenizer", "--data-path",
                "data/train.jsonl", "--seq-length", 32, "--micro-batch-size", 4, "--train-iters", 1,
                "--data-cache-dir", cache]
    launch([*one_step, "--lora-rank", 4, "--save", "ckpt"], d)
    # BD-LoRA N=2 at TP=1, r=8 (resumed at TP=4; exported for vLLM at --max-lora-rank 4)
    launch([*one_step, "--lora-rank", 8, "--bd-nblocks", 2, "--save", "ckpt_n2"], d)
    _write_bad_files(d)
    return d, cache


def _jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _write_bad_files(d):
    pc = [{"prompt": f"copy {c} =>", "completion": f" {c}"} for c in "abcdefgh"]
    _jsonl(d / "badjson.jsonl", pc[:2] + ['{"prompt": "x", "completion": '] + pc[2:])
    _jsonl(d / "maskstr.jsonl", [{"input_ids": [1, 5, 6, 7, 8, 9], "loss_mask": "000000"}] * 8)
    _jsonl(d / "masklen.jsonl", [{"input_ids": [1, 5, 6, 7], "loss_mask": [0, 1]}] * 8)
    _jsonl(d / "compint.jsonl", pc[:4] + [{"prompt": "x", "completion": 5}] + pc[4:])
    _jsonl(d / "vocab.jsonl", [{"input_ids": [1, 5, 6, 7]}] * 3 + [{"input_ids": [1, 99999]}])
    _jsonl(d / "notargets.jsonl", [{"prompt": f"copy {c} =>", "completion": ""} for c in "abcdefgh"])
    _jsonl(d / "notobject.jsonl", pc[:1] + ["[1, 2, 3]"] + pc[1:])
    _jsonl(d / "missingfield.jsonl", pc[:3] + [{"prompt": "x"}] + pc[3:])
    _jsonl(d / "few.jsonl", pc[:2])
    (d / "empty.jsonl").write_text("")
    (d / "afile").write_text("not a directory")
    (d / "bad.parquet").write_bytes(b"PAR1" + os.urandom(64))
    os.makedirs(d / "mixed", exist_ok=True)
    _jsonl(d / "mixed" / "a.jsonl", pc)
    _jsonl(d / "mixed" / "b.jsonl", [{"text": r["prompt"]} for r in pc])
    os.makedirs(d / "yarnhf", exist_ok=True)
    (d / "yarnhf" / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_attention_heads": 4,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    os.makedirs(d / "brokenhf", exist_ok=True)
    (d / "brokenhf" / "config.json").write_text("{not json")
    for name, text in {"bf16str": 'bf16: "false"\n', "rankfloat": "lora-rank: 8.5\n",
                       "unknownkey": "learning-rate: 0.1\n", "toplist": "- lr\n- 0.1\n",
                       "badchoice": "adapter: dora\n", "syntax": "lr: [0.1\n",
                       "listscalar": "lr: [0.1, 0.2]\n", "nested": "lora-target-modules: [[linear_qkv]]\n"
                       }.items():
        (d / f"{name}.yaml").write_text(text)


B = ["--model-preset", "tiny", "--tokenizer", "data/tokenizer", "--data-path", "data/train.jsonl",
     "--seq-length", "32", "--micro-batch-size", "4", "--train-iters", "2", "--lora-rank", "4"]

# (id, launcher argv, NPROC, what the one line must say)
LAUNCH_CASES = [
    ("global-batch-0", [*B, "--global-batch-size", "0"], 1, "--global-batch-size: must be >= 1"),
    ("train-iters-0", [*B, "--train-iters", "0"], 1, "--train-iters: must be >= 1"),
    ("eval-iters-0", [*B, "--eval-iters", "0"], 1, "--eval-iters: must be >= 1"),
    ("micro-batch-negative", [*B, "--micro-batch-size", "-4"], 1, "--micro-batch-size: must be >= 1, got -4"),
    ("keep-last-0", [*B, "--keep-last", "0"], 1, "--keep-last: must be >= 1"),
    ("save-interval-0", [*B, "--save-interval", "0"], 1, "--save-interval: must be >= 1"),
    ("log-interval-0", [*B, "--log-interval", "0"], 1, "--log-interval: must be >= 1"),
    ("lr-0", [*B, "--lr", "0"], 1, "--lr: must be > 0"),
    ("lr-nan", [*B, "--lr", "nan"], 1, "--lr: must be > 0"),
    ("dropout-1.5", [*B, "--lora-dropout", "1.5"], 1, "--lora-dropout: must be in [0, 1)"),
    ("beta1-1", [*B, "--adam-beta1", "1"], 1, "--adam-beta1: must be in [0, 1)"),
    ("lr-not-a-number", [*B, "--lr", "fast"], 1, "invalid float value: 'fast'"),
    ("tp-0", [*B, "--tensor-model-parallel-size", "0"], 1, "--tensor-model-parallel-size: must be >= 1"),
    ("seq-length-1", [*B, "--seq-length", "1"], 1, "--seq-length: must be >= 2"),
    ("rank-not-multiple-of-blocks", [*B, "--tensor-model-parallel-size", "2", "--lora-rank", "3"], 2,
     "--lora-rank 3 is not divisible by --bd-nblocks 2"),
    ("batch-not-divisible", [*B, "--global-batch-size", "6"], 1, "--global-batch-size 6 is not divisible"),
    ("tp-not-dividing-world", [*B, "--tensor-model-parallel-size", "2"], 3, "does not divide the world size 3"),
    ("unknown-flag", [*B, "--no-such-flag", "1"], 1, "unrecognized arguments: --no-such-flag"),
    ("bad-choice", [*B, "--adapter", "dora"], 1, "invalid choice: 'dora'"),
    ("model-twice", [*B, "--hf-checkpoint", "ckpt"], 1, "not both"),
    ("no-model", B[2:], 1, "give --hf-checkpoint DIR"),
    ("eval-only-no-load", [*B, "--eval-only"], 1, "--eval-only needs --load"),
    ("eval-interval-no-data", [*B, "--eval-interval", "2"], 1, "--eval-interval needs --eval-data-path"),
    ("min-lr-above-lr", [*B, "--min-lr", "0.1", "--lr", "0.01"], 1, "--min-lr 0.1 is above --lr 0.01"),
    ("template-no-placeholder", [*B, "--prompt-template", "Q:"], 1, "has no {prompt} placeholder"),
    ("data-not-hub", [*B, "--data-path", "traindata"], 1, "--data-path traindata does not exist"),
    ("data-missing", [*B, "--data-path", "data/nope.jsonl"], 1, "data/nope.jsonl does not exist"),
    ("hf-missing", [*B[2:], "--hf-checkpoint", "nomodel"], 1, "--hf-checkpoint nomodel does not exist"),
    ("hf-broken-config", [*B[2:], "--hf-checkpoint", "brokenhf"], 1, "config.json is not valid JSON"),
    ("tokenizer-missing", [*B, "--tokenizer", "./tok"], 1, "--tokenizer ./tok does not exist"),
    ("unknown-preset", [*B, "--model-preset", "llama9"], 1, "unknown --model-preset 'llama9'"),
    ("node-rank", ["--nnodes", "1", "--node-rank", "1", *B], 1, "--node-rank 1 must be below --nnodes 1"),
    ("yaml-bool-string", [*B, "--config", "bf16str.yaml"], 1, "bf16: 'false' is not a boolean"),
    ("yaml-rank-float", [*B, "--config", "rankfloat.yaml"], 1, "invalid int value: '8.5'"),
    ("yaml-unknown-key", [*B, "--config", "unknownkey.yaml"], 1, "unknown key 'learning-rate'"),
    ("yaml-not-mapping", [*B, "--config", "toplist.yaml"], 1, "must be a mapping"),
    ("yaml-bad-choice", [*B, "--config", "badchoice.yaml"], 1, "invalid choice: 'dora'"),
    ("yaml-syntax", [*B, "--config", "syntax.yaml"], 1, "is not valid YAML"),
    ("yaml-list-for-scalar", [*B, "--config", "listscalar.yaml"], 1, "one value expected"),
    ("yaml-nested-list", [*B, "--config", "nested.yaml"], 1, "is not a valid value"),
    ("yaml-missing", [*B, "--config", "none.yaml"], 1, "--config none.yaml does not exist"),
    ("data-bad-json", [*B, "--data-path", "badjson.jsonl"], 1, "badjson.jsonl line 3: not valid JSON"),
    ("data-loss-mask-string", [*B, "--data-path", "maskstr.jsonl"], 1,
     "maskstr.jsonl line 1: 'loss_mask' must be a list of 0/1 ints, got str"),
    ("data-loss-mask-length", [*B, "--data-path", "masklen.jsonl"], 1, "loss_mask has 2 entries"),
    ("data-field-type", [*B, "--data-path", "compint.jsonl"], 1,
     "compint.jsonl line 5: field 'completion' must be a string, got int"),
    ("data-token-outside-vocab", [*B, "--data-path", "vocab.jsonl"], 1,
     "vocab.jsonl line 4: token id 99999 is outside the model's vocabulary [0, 512)"),
    ("data-no-targets", [*B, "--data-path", "notargets.jsonl"], 1, "no target tokens"),
    ("data-not-object", [*B, "--data-path", "notobject.jsonl"], 1, "notobject.jsonl line 2: a record must be a JSON object"),
    ("data-missing-field", [*B, "--data-path", "missingfield.jsonl"], 1, "missingfield.jsonl line 4: no 'completion' field"),
    ("data-fewer-than-a-batch", [*B, "--data-path", "few.jsonl"], 1, "fewer than one global batch of 4"),
    ("data-empty-file", [*B, "--data-path", "empty.jsonl"], 1, "empty.jsonl is empty"),
    ("load-missing", [*B, "--load", "nockpt"], 1, "nockpt does not exist"),
    ("load-adapter-mismatch", [*B, "--lora-rank", "8", "--load", "ckpt"], 1,
     "--lora-rank 8 conflicts with the checkpoint"),
    ("load-other-method", [*B, "--adapter", "lora", "--load", "ckpt"], 1,
     "--adapter lora conflicts with the checkpoint"),
    ("load-bd-n2-at-tp4", [*B, "--load", "ckpt_n2", "--tensor-model-parallel-size", "4"], 4,
     "has BD-LoRA with N=2 blocks: it runs at --tensor-model-parallel-size in [1, 2], not 4"),
    ("data-corrupt-parquet", [*B, "--data-path", "bad.parquet"], 1,
     "bad.parquet is not a readable parquet file"),
    ("data-mixed-formats", [*B, "--data-path", "mixed"], 1,
     "different record formats (prompt_completion: a.jsonl; text: b.jsonl)"),
    ("hf-rope-yarn", [*B[2:], "--hf-checkpoint", "yarnhf"], 1, "RoPE scaling 'yarn' is not supported"),
    ("save-is-a-file", [*B, "--save", "afile"], 1, "--save afile is a file"),
]


def _run_launcher(argv, nproc, monkeypatch, capsys):
    from megatron_bdlora.launch import cli

    def started(*a, **k):
        raise AssertionError("the bad input passed pre-flight and would have started the ranks")

    monkeypatch.setattr(cli, "_torchrun", started)
    monkeypatch.setenv("NPROC", str(nproc))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    status = cli.main(argv)
    return status, capsys.readouterr().err


def _assert_one_error_line(status, err, needle):
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert status == 2, (status, err[-2000:])
    assert len(errors) == 1 and errors[0].startswith("error: "), err[-2000:]
    assert needle in errors[0], (needle, errors[0])
    assert "Traceback" not in err and "usage:" not in err, err[-2000:]
    return errors[0]


@pytest.mark.parametrize("case", LAUNCH_CASES, ids=[c[0] for c in LAUNCH_CASES])
def test_launcher_bad_input(work, case, monkeypatch, capsys):
    d, cache = work
    name, argv, nproc, needle = case
    monkeypatch.chdir(d)
    before = _snapshot(d)
    status, err = _run_launcher([*argv, "--data-cache-dir", cache], nproc, monkeypatch, capsys)
    line = _assert_one_error_line(status, err, needle)
    assert _snapshot(d) == before, "a refused run wrote or changed files"
    with capsys.disabled():
        print(f"\n[bad input] finetune_llama.sh {name}: {line}")


def test_load_takes_the_checkpoint_adapter_for_flags_not_given(work, monkeypatch):
    """--load of a BD-LoRA r=8 N=2 checkpoint with no adapter flag: the checkpoint's adapter
    (not the default N = TP) is what the run builds, at TP=2 as at TP=1; a given flag that agrees
    with it is kept."""
    from megatron_bdlora.launch.preflight import preflight
    from megatron_bdlora.training.arguments import parse_args

    d, cache = work
    monkeypatch.chdir(d)
    argv = [*B[:-2], "--lora-alpha", "16", "--load", "ckpt_n2", "--data-cache-dir", cache]
    for tp in (1, 2):
        args = parse_args([*argv, "--tensor-model-parallel-size", str(tp)], world_size=tp)
        preflight(args, check_lock=False)
        assert (args.adapter, args.lora_rank, args.bd_nblocks) == ("bdlora", 8, 2), vars(args)
        assert "lora_rank" not in args.given and "lora_alpha" in args.given


def test_yaml_values_typed_like_the_cli(work, tmp_path):
    """A valid YAML: booleans, a one-value list flag, numbers; the command line wins."""
    from megatron_bdlora.training.arguments import parse_args

    cfg = tmp_path / "ok.yaml"
    cfg.write_text("bf16: false\nlora-rank: 8\nlora_target_modules: linear_qkv\nlr: 1e-3\n"
                   "prompt-template: '-> {prompt}'\nsequence-parallel: true\n"
                   "tensor_model_parallel_size: 2\n")
    args = parse_args(["--config", str(cfg), "--model-preset", "tiny", "--data-path",
                       str(work[0] / "data" / "train.jsonl"), "--lora-rank", "16"], world_size=2)
    assert args.bf16 is False and args.sequence_parallel is True
    assert args.lora_target_modules == ["linear_qkv"] and args.lr == 1e-3
    assert args.lora_rank == 16 and args.prompt_template == "-> {prompt}"


def test_launcher_script_bad_inputs_one_line(work, launch):
    """The literal shell command: one line on stderr, status 2, for a flag and a data error."""
    d, cache = work
    for argv, needle in (([*B, "--keep-last", "0"], "--keep-last: must be >= 1"),
                         ([*B, "--data-path", "maskstr.jsonl"], "'loss_mask' must be a list")):
        r = launch([*argv, "--data-cache-dir", cache], d, nproc=2, check=False, timeout=120)
        _assert_one_error_line(r.returncode, r.stderr, needle)


CONVERT_CASES = [
    ("format-choice", ["export", "--load", "ckpt", "--format", "safetensors", "--out", "o"],
     "invalid choice: 'safetensors'"),
    ("load-missing", ["export", "--load", "nockpt", "--format", "hf-peft", "--out", "o"],
     "nockpt does not exist"),
    ("out-is-checkpoint", ["export", "--load", "ckpt", "--format", "hf-peft", "--out", "ckpt",
                           "--overwrite"], "is (or contains) the checkpoint"),
    ("out-exists", ["export", "--load", "ckpt", "--format", "hf-peft", "--out", "data"],
     "already exists; pass --overwrite"),
    ("overwrite-non-export", ["export", "--load", "ckpt", "--format", "hf-peft", "--out", "data",
                              "--overwrite"], "not an export written by this tool"),
    ("inspect-missing", ["inspect", "nockpt"], "nockpt does not exist"),
    ("vllm-rank-above-max", ["export", "--load", "ckpt_n2", "--format", "vllm", "--max-lora-rank",
                             "4", "--out", "o"], "rank r=8 is above --max-lora-rank 4"),
    ("no-subcommand", [], "the following arguments are required"),
]


@pytest.mark.parametrize("case", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_converter_bad_input(work, case, monkeypatch, capsys):
    from tools import convert_checkpoint

    d, _ = work
    name, argv, needle = case
    monkeypatch.chdir(d)
    before = _snapshot(d)
    status = convert_checkpoint.main(argv)
    line = _assert_one_error_line(status, capsys.readouterr().err, needle)
    assert _snapshot(d) == before
    with capsys.disabled():
        print(f"\n[bad input] convert_checkpoint {name}: {line}")


# ---- data loss 1: export --overwrite ---------------------------------------------------------
def test_export_overwrite_never_deletes_the_checkpoint_or_its_parent(work, tmp_path, capsys):
    import shutil

    from tools import convert_checkpoint

    run = tmp_path / "runs"
    shutil.copytree(work[0] / "ckpt", run / "job1")
    (run / "job2").mkdir()
    (run / "job2" / "notes.txt").write_text("another run")
    before = _snapshot(run)
    for out in (run / "job1", run, run / "job1" / "step_00000001", tmp_path):
        status = convert_checkpoint.main(["export", "--load", str(run / "job1"), "--format",
                                          "hf-peft", "--out", str(out), "--overwrite"])
        _assert_one_error_line(status, capsys.readouterr().err, "is (or contains) the checkpoint")
    assert _snapshot(run) == before
    # a previous export of this tool is replaced, and only that
    out = str(tmp_path / "export")
    for fmt in ("vllm", "hf-peft"):
        assert convert_checkpoint.main(["export", "--load", str(run / "job1"), "--format", fmt,
                                        "--out", out, "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(out, "bd")) and AdapterCheckpoint(str(run / "job1")).step == 1
    assert _snapshot(run) == before


# ---- data loss 2: orphaned ranks, a second writer ----------------------------------------------
def test_ranks_die_with_launcher_and_a_second_writer_is_refused(work, monkeypatch, capsys, launch):
    d, cache = work
    monkeypatch.chdir(d)
    save = d / "shared_save"

    def job(iters, *extra):
        return [*B[:-4], "--lora-rank", "4", "--train-iters", str(iters), "--save-interval", "1",
                "--global-batch-size", "8",
                "--keep-last", "2", "--save", str(save), "--data-cache-dir", cache, *extra]

    long_run = job(100000)
    p = subprocess.Popen(["bash", LAUNCHER, *long_run], cwd=d, env=clean_env(NPROC="2"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list_checkpoints(str(save)):
            time.sleep(0.2)
        assert list_checkpoints(str(save)), "the job saved nothing"
        ranks = descendants(p.pid)
        assert len(ranks) >= 2
        lock = json.loads((save / ".lock").read_text())
        assert lock["pid"] in ranks
        # a second job on the same directory: one line naming the first, nothing touched
        status, err = _run_launcher(long_run, 1, monkeypatch, capsys)
        _assert_one_error_line(status, err, f"pid {lock['pid']}")
        assert "in use by another job" in err
    finally:
        os.kill(p.pid, signal.SIGKILL)  # kill -9 of the launcher only
        p.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(r) for r in ranks):
        time.sleep(0.1)
    assert not any(alive(r) for r in ranks), "ranks outlived their launcher"
    # the dead job's lock is stale: a new run takes it over and resumes
    step = AdapterCheckpoint(str(save)).step
    launch(job(step + 1, "--load", str(save)), d)
    assert AdapterCheckpoint(str(save)).step == step + 1 and not (save / ".lock").exists()
    steps = [json.loads(line)["step"] for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after the resume"


def test_wandb_config_keeps_non_secrets():
    from megatron_bdlora.training.metrics import scrub

    kept = scrub({"tokenizer_path": "t", "tokenizer": "t", "lr": 1, "hf_token": "x",
                  "wandb_api_key": "x", "password": "x", "keep_last": 3})
    assert kept == {"tokenizer_path": "t", "tokenizer": "t", "lr": 1, "keep_last": 3}


def test_nonfinite_step_stops_or_skips():
    from types import SimpleNamespace

    from megatron_bdlora.errors import DivergedError, InputError
    from megatron_bdlora.training.nonfinite import skip_step

    assert not skip_step(3, 1.5, SimpleNamespace(skip_nonfinite=False))
    assert skip_step(3, float("nan"), SimpleNamespace(skip_nonfinite=True))
    assert not issubclass(DivergedError, InputError)  # exit status 3, not bad input's 2
    with pytest.raises(DivergedError, match="step 7: the gradient norm is inf"):
        skip_step(7, float("inf"), SimpleNamespace(skip_nonfinite=False))
