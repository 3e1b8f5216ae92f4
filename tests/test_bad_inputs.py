"""Bad inputs through the real launcher and the converter: exit status 2, exactly one error line,
no traceback, nothing written or changed (the directories involved are listed and hashed).
Hostile files (issue 27: names leading out of their directory, a `latest` linked to the process
environment, NaN in a config, absurd sizes) and the machine's faults (disk full, read-only) too.

The table runs in-process through the launcher's own entry point (`launch.cli.main`, what
finetune_llama.sh execs) and the converter's `main`: the checks are the launcher's pre-flight, so
no rank starts (a case that passed pre-flight would fail the test instead of training). A few
cases also run as the literal `bash pretrain_scripts/finetune_llama.sh ...` subprocess. The two
data-loss cases (export --overwrite; orphaned ranks + a second writer) are tests of their own.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from examples.run_commands import LAUNCHER, alive, clean_env, descendants
from megatron_bdlora.checkpoint.adapter_checkpoint import AdapterCheckpoint, list_checkpoints


def _snapshot(*dirs) -> dict:
    """{path: sha256} of every file (and every directory, as None) under `dirs`."""
    out = {}
    for top in dirs:
        for d, subdirs, files in os.walk(top):
            out[d] = None
            for f in files:
                path = os.path.join(d, f)
                if os.path.islink(path):  # a hostile link (to /proc/self/environ): its target
                    out[path] = "link:" + os.readlink(path)
                    continue
                with open(path, "rb") as fh:
                    out[path] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def work(work, launch, together, tmp_path_factory):
    """(conftest's `work` (the demo data) with two 1-step checkpoints and the bad files, a data
    cache outside it)."""
    d = work
    cache = str(tmp_path_factory.mktemp("cache"))
    one_step = ["--model-preset", "tiny", "--tokenizer", "data/tokenizer", "--data-path",
                "data/train.jsonl", "--seq-length", 32, "--micro-batch-size", 4, "--train-iters", 1,
                "--data-cache-dir", cache]
    # LoRA r=4, and BD-LoRA N=2 at TP=1, r=8 (resumed at TP=4; exported for vLLM at rank 4)
    together(lambda: launch([*one_step, "--lora-rank", 4, "--save", "ckpt"], d),
             lambda: launch([*one_step, "--lora-rank", 8, "--bd-nblocks", 2, "--save", "ckpt_n2"], d))
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
    _write_hostile_files(d)


def _write_hostile_files(d):
    """Issue 27's cases: absurd sizes, chat roles a template refuses, files with no records, and
    damaged copies of the trained checkpoint `ckpt`."""
    from megatron_bdlora.models.presets import get_preset

    os.makedirs(d / "hugehf", exist_ok=True)
    (d / "hugehf" / "config.json").write_text(
        json.dumps({**get_preset("tiny"), "num_hidden_layers": 7}).replace('"num_hidden_layers": 7',
                                                                       '"num_hidden_layers": 1e11'))
    shutil.copytree(d / "data" / "tokenizer", d / "stricttok")
    (d / "stricttok" / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}")
    shutil.copytree(d / "data" / "tokenizer", d / "notemplate")
    os.remove(d / "notemplate" / "chat_template.jinja")
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    _jsonl(d / "roles.jsonl", [chat] * 8)
    (d / "blank.jsonl").write_text("\n\n")
    (d / "emptylist.json").write_text("[]\n")

    def damaged(name, edit):
        shutil.copytree(d / "ckpt", d / name, symlinks=True)
        edit(d / name, d / name / "step_00000001")

    def edit_config(**changes):
        def edit(root, step):
            cfg = json.loads((step / "config.json").read_text())
            cfg.update(changes)
            (step / "config.json").write_text(json.dumps(cfg))
        return edit

    def relink_latest(root, step):
        os.remove(root / "latest")
        os.symlink("/proc/self/environ", root / "latest")

    damaged("ckpt_emptystate", lambda root, step: (step / "trainer_state.json").write_text(""))
    damaged("ckpt_truncopt", lambda root, step: (step / "optimizer.json").write_text(
        (step / "optimizer.json").read_text()[:8]))
    damaged("ckpt_step", edit_config(step=2.5))
    damaged("ckpt_version", edit_config(format_version="1"))
    damaged("ckpt_manifest", edit_config(files=["../../bad.parquet", "adapter.safetensors"]))
    damaged("ckpt_files_kind", edit_config(files="adapter.safetensors"))
    damaged("ckpt_environ", relink_latest)
    damaged("ckpt_envcopy", lambda root, step: (root / "latest").write_text(
        "WANDB_API_KEY=sekrit-key-1234\0HOME=/root\0"))


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
    # issue 27: sizes bounded before anything is allocated by them, hostile or damaged checkpoints
    ("hf-layers-1e11", [*B[2:], "--hf-checkpoint", "hugehf"], 1,
     "num_hidden_layers is 100000000000, not a whole number in [1, 4096]"),
    ("hf-is-adapter-step-dir", [*B[2:], "--hf-checkpoint", "ckpt/step_00000001"], 1,
     "is an adapter checkpoint of this project, not a Hugging Face model"),
    ("hf-is-adapter-root", [*B[2:], "--hf-checkpoint", "ckpt"], 1, "pass it as --load"),
    ("load-zero-byte-trainer-state", [*B, "--load", "ckpt_emptystate"], 1,
     "trainer_state.json is empty"),
    ("load-truncated-optimizer-json", [*B, "--load", "ckpt_truncopt"], 1,
     "optimizer.json is not valid JSON"),
    ("load-step-not-integer", [*B, "--load", "ckpt_step"], 1, "step is 2.5, not a whole number"),
    ("load-version-not-integer", [*B, "--load", "ckpt_version"], 1,
     "format_version is '1', not a whole number"),
    ("load-manifest-outside", [*B, "--load", "ckpt_manifest"], 1, "which is outside"),
    ("load-latest-links-to-environ", [*B, "--load", "ckpt_environ"], 1,
     "latest is a symbolic link out of"),
    ("data-cache-dir-is-a-file", [*B, "--data-cache-dir", "afile"], 1,
     "--data-cache-dir afile is a file"),
    ("chat-roles-refused", [*B, "--data-path", "roles.jsonl", "--tokenizer", "stricttok"], 1,
     "roles.jsonl record 1: the tokenizer's chat template refuses roles system/user/assistant"),
    ("eval-file-no-records", [*B, "--eval-data-path", "blank.jsonl", "--eval-interval", "1"], 1,
     "blank.jsonl holds no records"),
    ("eval-file-empty-list", [*B, "--eval-data-path", "emptylist.json", "--eval-interval", "1"], 1,
     "emptylist.json holds no records"),
    ("match-rank-with-plain-lora", [*B, "--adapter", "lora", "--match-lora-rank-params", "8"], 1,
     "--match-lora-rank-params sets a BD-LoRA rank; with --adapter lora it would be ignored"),
    ("seq-length-above-positions", [*B, "--seq-length", "512"], 1,
     "--seq-length 512 is above the model's max_position_embeddings 256"),
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
    cache_flag = [] if "--data-cache-dir" in argv else ["--data-cache-dir", cache]
    status, err = _run_launcher([*argv, *cache_flag], nproc, monkeypatch, capsys)
    line = _assert_one_error_line(status, err, needle)
    assert os.environ["PATH"] not in line, "a file's contents (the environment) were echoed"
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


def test_launcher_script_bad_inputs_one_line(work, launch, together):
    """The literal shell command: one line on stderr, status 2, for a flag and a data error."""
    d, cache = work
    cases = (([*B, "--keep-last", "0"], "--keep-last: must be >= 1"),
             ([*B, "--data-path", "maskstr.jsonl"], "'loss_mask' must be a list"))
    runs = together(*[lambda argv=argv: launch([*argv, "--data-cache-dir", cache], d, nproc=2,
                                               check=False, timeout=120) for argv, _ in cases])
    for r, (_, needle) in zip(runs, cases):
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
    ("export-inside-checkpoint", ["export", "--load", "ckpt", "--format", "hf-peft", "--out",
                                  "ckpt/step_00000001/peft"], "is inside the checkpoint being exported"),
    ("inspect-latest-holds-environment", ["inspect", "ckpt_envcopy"],
     "characters, not shown>, which is not a complete checkpoint"),
    ("inspect-latest-links-to-environ", ["inspect", "ckpt_environ"], "is a symbolic link out of"),
    ("inspect-step-not-integer", ["inspect", "ckpt_step"], "step is 2.5"),
    ("inspect-manifest-not-a-list", ["inspect", "ckpt_files_kind"],
     "'files' is a JSON str, not the expected kind"),
    ("load-is-a-file", ["export", "--load", "afile", "--format", "hf-peft", "--out", "o"],
     "checkpoint afile is a file; pass the run's checkpoint directory"),
    ("import-hf-is-adapter-checkpoint", ["import", "--peft", "data", "--hf-checkpoint",
                                         "ckpt/step_00000001", "--out", "o"],
     "is an adapter checkpoint of this project, not a Hugging Face model"),
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
    assert "sekrit" not in line and os.environ["PATH"] not in line, line
    assert _snapshot(d) == before
    with capsys.disabled():
        print(f"\n[bad input] convert_checkpoint {name}: {line}")


# ---- issue 27: hostile HF / PEFT files, the machine's faults, the tools' own flags ---------------
@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_base):
    """A LoRA checkpoint on the tiny HF base (written in-process, no rank) and its PEFT export."""
    import torch

    from megatron_bdlora.adapters import AdapterConfig
    from megatron_bdlora.adapters.layout import expected_global_shapes
    from megatron_bdlora.checkpoint.adapter_checkpoint import build_config, write_checkpoint
    from megatron_bdlora.checkpoint.export import export
    from megatron_bdlora.checkpoint.hf_import import read_hf_config
    from megatron_bdlora.models.info import BaseModelInfo

    d = tmp_path_factory.mktemp("hostile")
    cfg = AdapterConfig(method="lora", rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    hf = read_hf_config(tiny_base)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=gen) * 0.1
               for k, shape in expected_global_shapes(hf, cfg).items()}
    info = BaseModelInfo(hf, tiny_base, None, cfg)
    write_checkpoint(str(d / "ckpt"), build_config(info, 1, {}, tensors, 1), tensors, {"step": 1})
    export(str(d / "ckpt"), "hf-peft", str(d / "peft"))
    return d, tiny_base


def _convert(argv, capsys):
    from tools import convert_checkpoint

    status = convert_checkpoint.main([str(a) for a in argv])
    return status, capsys.readouterr().err


def test_hostile_index_writes_nothing_outside_the_export(hostile, capsys):
    """Bug 1: an HF index naming ../victim/model.safetensors (or an absolute path) made
    `export --format hf-merged` overwrite the victim's weights and exit 0."""
    d, base = hostile
    victim = d / "victim"
    for name, target in (("relative", "../victim/model.safetensors"),
                         ("absolute", str(victim / "model.safetensors"))):
        b = d / f"base-{name}"
        shutil.copytree(base, b)
        os.makedirs(victim, exist_ok=True)
        shutil.move(b / "model.safetensors", victim / "model.safetensors")
        from safetensors import safe_open

        with safe_open(victim / "model.safetensors", "pt") as f:
            keys = list(f.keys())
        (b / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: target for k in keys}}))
        before = _snapshot(victim, b)
        status, err = _convert(["export", "--load", d / "ckpt", "--format", "hf-merged",
                                "--hf-checkpoint", b, "--out", d / f"out-{name}"], capsys)
        _assert_one_error_line(status, err, "which is outside")
        assert _snapshot(victim, b) == before and not os.path.exists(d / f"out-{name}")
        shutil.rmtree(victim)


PEFT_NUMBERS = [  # (id, adapter_config.json text edit, needle)
    ("alpha-nan", lambda t: t.replace('"lora_alpha": 8', '"lora_alpha": NaN'), "non-finite number"),
    ("alpha-infinity", lambda t: t.replace('"lora_alpha": 8', '"lora_alpha": -Infinity'),
     "non-finite number"),
    ("alpha-overflow", lambda t: t.replace('"lora_alpha": 8', '"lora_alpha": 1e400'),
     "a number overflows to inf"),
    ("alpha-absurd", lambda t: t.replace('"lora_alpha": 8', '"lora_alpha": 1e300'),
     "lora_alpha is 1e+300, not a number in [-1e+06, 1e+06)"),
    ("alpha-string", lambda t: t.replace('"lora_alpha": 8', '"lora_alpha": "8"'), "lora_alpha is '8'"),
    ("rank-fraction", lambda t: t.replace('"r": 4', '"r": 4.5'), "r is 4.5, not a whole number"),
    ("rank-absurd", lambda t: t.replace('"r": 4', '"r": 1e12'), "r is 1000000000000, not a whole number in [1, 65536]"),
    ("empty-config", lambda t: "", "adapter_config.json is empty"),
]


@pytest.mark.parametrize("case", PEFT_NUMBERS, ids=[c[0] for c in PEFT_NUMBERS])
def test_peft_import_refuses_non_finite_or_absurd_numbers(hostile, case, tmp_path, capsys):
    """Bug 3: `lora_alpha: NaN` imported as a checkpoint with alpha=nan (exit 0)."""
    d, base = hostile
    name, edit, needle = case
    peft = tmp_path / "peft"
    shutil.copytree(d / "peft", peft)
    cfg = peft / "adapter_config.json"
    text = json.dumps(json.loads(cfg.read_text()))
    assert edit(text) != text
    cfg.write_text(edit(text))
    status, err = _convert(["import", "--peft", peft, "--hf-checkpoint", base, "--out",
                            tmp_path / "out"], capsys)
    _assert_one_error_line(status, err, needle)
    assert os.listdir(tmp_path) == ["peft"], "a refused import wrote something"


def test_disk_full_or_read_only_during_a_save(hostile, tmp_path, monkeypatch, capsys):
    """A save (checkpoint, export) the disk refuses: one line naming the directory and its free
    space; nothing half-written, the last good checkpoint intact."""
    import megatron_bdlora.checkpoint.adapter_checkpoint as ac
    import megatron_bdlora.checkpoint.export as ex
    from megatron_bdlora.checkpoint.adapter_checkpoint import AdapterCheckpoint, write_checkpoint
    from megatron_bdlora.errors import CheckpointError

    d, _ = hostile
    root = tmp_path / "run"
    shutil.copytree(d / "ckpt", root)
    ckpt = AdapterCheckpoint(str(root))
    before = _snapshot(root)

    def refuse(code):
        def write(*a, **k):
            raise OSError(code, os.strerror(code))
        return write

    for code in (errno.ENOSPC, errno.EROFS):
        with monkeypatch.context() as m:
            m.setattr(ac, "write_tensors", refuse(code))
            config = {**ckpt.config, "step": 2}
            with pytest.raises(CheckpointError) as e:
                write_checkpoint(str(root), config, ckpt.tensors, {"step": 2}, keep_last=1)
        line = str(e.value)
        assert line.startswith(f"cannot write to {root}: {os.strerror(code)} (") and \
            "MiB free" in line and "--save" in line and "\n" not in line, line
        assert _snapshot(root) == before and AdapterCheckpoint(str(root)).step == 1
    monkeypatch.setattr(ex, "write_tensors", refuse(errno.ENOSPC))
    status, err = _convert(["export", "--load", root, "--format", "hf-peft", "--out",
                            tmp_path / "exp"], capsys)
    _assert_one_error_line(status, err, f"cannot write to {tmp_path}: No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_read_only_save_dir_refused_before_the_ranks(work, monkeypatch, capsys):
    d, cache = work
    monkeypatch.chdir(d)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("rodir")
                        else access(p, mode))
    os.makedirs(d / "rodir", exist_ok=True)
    status, err = _run_launcher([*B, "--save", "rodir", "--data-cache-dir", cache], 1,
                                monkeypatch, capsys)
    _assert_one_error_line(status, err, "--save rodir is not writable")


ESTIMATE_CASES = [
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size: must be >= 1, got 0"),
    (["--micro-batch-size", "0"], "--micro-batch-size: must be >= 1, got 0"),
    (["--seq-length", "-4"], "--seq-length: must be >= 2, got -4"),
    (["--config", "toplist.yaml"], "must be a mapping"),
    (["--config", "rankfloat.yaml"], "lora-rank: invalid int value: '8.5'"),
    (["--config", "syntax.yaml"], "is not valid YAML"),
]


@pytest.mark.parametrize("case", ESTIMATE_CASES, ids=[" ".join(c[0]) for c in ESTIMATE_CASES])
def test_estimate_memory_bad_flags_one_line(work, case, monkeypatch):
    from tools import estimate_memory

    monkeypatch.chdir(work[0])
    argv, needle = case
    with pytest.raises(SystemExit) as exc:
        estimate_memory.main(argv)
    text = str(exc.value.code)
    assert text.startswith("error: ") and needle in text and "\n" not in text, text


def test_tools_refuse_wrong_inputs_in_one_line(work, capsys):
    """eval_accuracy: chat records without a chat template, a file with no records (before any
    model loads); prepare_smollm2: --out a file."""
    from types import SimpleNamespace

    from megatron_bdlora.errors import InputError
    from tools import eval_accuracy, prepare_smollm2

    d, _ = work
    for tok, data, needle in (("notemplate", "roles.jsonl", "chat records need a tokenizer with a "
                               "chat template"),
                              ("data/tokenizer", "blank.jsonl", "cannot read records from")):
        args = SimpleNamespace(hf_checkpoint=str(d), tokenizer=str(d / tok), data_path=str(d / data))
        with pytest.raises(InputError, match=needle) as e:
            eval_accuracy.read_inputs(args)
        assert "\n" not in str(e.value)
    assert prepare_smollm2.main(["--out", str(d / "afile")]) == 2
    _assert_one_error_line(2, capsys.readouterr().err, "afile is a file; pass a directory")


def test_save_lock_file_never_trusted(tmp_path):
    """A .lock that is not an object is stale (was an AttributeError); a live owner's fields are
    quoted only when they look like a host, a pid and a time."""
    from megatron_bdlora.checkpoint.save_lock import LOCK, check_unlocked
    from megatron_bdlora.errors import InputError

    (tmp_path / LOCK).write_text("[1, 2]")
    check_unlocked(str(tmp_path))
    (tmp_path / LOCK).write_text(json.dumps({"host": "WANDB_API_KEY=sekrit", "pid": 1}))
    with pytest.raises(InputError, match=r"in use by another job \(host \?, pid 1, since \?\)"):
        check_unlocked(str(tmp_path))


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
