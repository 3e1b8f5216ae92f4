"""The typed flag home (training/flags.py): argparse, YAML and the tools read one table; Megatron-LM
flag names accepted with their meaning or refused in one line; the exit conditions, timers and
throughput pieces the trainer's loop calls. No ranks: a second at most."""

import os
import signal

import pytest

from megatron_bdlora.errors import EXIT_RESUME, InputError
from megatron_bdlora.training import flags
from megatron_bdlora.training.arguments import build_parser, parse_args, recompute_config
from megatron_bdlora.training.exit_conditions import ExitConditions, exit_status
from megatron_bdlora.training.timers import Timers

BASE = ["--model-preset", "tiny", "--data-path", os.__file__]


def test_parser_is_the_flag_table():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    for _, f in flags.all_fields():
        a = actions[f.name]
        assert a.option_strings[0] == flags.flag_name(f) and a.default == flags.default_of(f)
        assert a.choices in (None, f.metadata["choices"])
    # the constant tuples are the modules' own (written once)
    from megatron_bdlora.adapters.layout import LAYOUTS
    from megatron_bdlora.te.guard import IMPLS

    assert actions["lora_layout"].choices is LAYOUTS and actions["transformer_impl"].choices is IMPLS


def test_attention_names_match_the_model():
    from megatron_bdlora.models.attention import BACKENDS, KERNELS

    assert flags.ATTENTION_BACKENDS == BACKENDS
    assert set(flags.SDPA_KERNELS) == {"auto", *KERNELS}


@pytest.mark.parametrize("flag", sorted(flags.REFUSED))
def test_refused_megatron_flags_say_why(flag, tmp_path):
    with pytest.raises(InputError) as e:
        parse_args([*BASE, flag])
    assert str(e.value) == f"{flag}: {flags.REFUSED[flag]}" and "\n" not in str(e.value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{flag[2:]}: 1\n")
    with pytest.raises(InputError, match=flags.REFUSED[flag][:20].replace("(", r"\(")):
        parse_args([*BASE, "--config", cfg])


def test_docs_list_the_refused_flags():
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "megatron_flags.md")) as f:
        doc = f.read()
    assert all(f"`{name}`" in doc for name in flags.REFUSED)
    assert all(d in doc for d in flags.megatron_differences([]))


def test_megatron_names_and_meanings(tmp_path):
    a = parse_args([*BASE, "--valid-data-path", os.__file__, "--recompute-activations",
                    "--lr-decay-iters", "50", "--lr-warmup-fraction", "0.1", "--adam-eps", "1e-6"])
    assert a.eval_data_path == os.__file__ and recompute_config(a) == {
        "recompute_granularity": "selective"}
    a = parse_args([*BASE, "--recompute-granularity", "full", "--recompute-method", "uniform",
                    "--recompute-num-layers", "1"])
    assert recompute_config(a) == {"recompute_granularity": "full", "recompute_method": "uniform",
                                   "recompute_num_layers": 1}
    for bad, says in ((["--recompute-granularity", "full"], "needs --recompute-method"),
                      (["--recompute-activations", "--recompute-granularity", "full"], "selective"),
                      (["--optimizer", "sgd"], "Adam only"),
                      (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"], "not both")):
        with pytest.raises(InputError, match=says):
            parse_args([*BASE, *bad])
    # the signal handler is on by default; off from the command line or YAML
    assert parse_args(BASE).exit_signal_handler
    assert not parse_args([*BASE, "--no-exit-signal-handler"]).exit_signal_handler
    cfg = tmp_path / "c.yaml"
    cfg.write_text("exit-signal-handler: false\nexit-duration-in-mins: 30\n")
    a = parse_args([*BASE, "--config", cfg])
    assert not a.exit_signal_handler and a.exit_duration_in_mins == 30
    # the start-up line names each default that differs from Megatron-LM's, unless given
    diffs = flags.megatron_differences(["weight_decay"])
    assert "--lr-decay-style cosine (Megatron-LM: linear)" in diffs
    assert "--eval-iters 10 (Megatron-LM: 100)" in diffs
    assert not any(d.startswith("--weight-decay") for d in diffs)


class _Args:
    exit_signal_handler, exit_duration_in_mins, exit_interval, exit_after_iters = True, None, None, None


def test_exit_conditions():
    args = _Args()
    now = [0.0]
    args.exit_duration_in_mins = 1
    ec = ExitConditions(args, clock=lambda: now[0])
    try:
        assert ec.should_stop(1) is None
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal; a second one changes nothing
        os.kill(os.getpid(), signal.SIGUSR1)
        assert ec.signals.count == 2 and ec.should_stop(2) == "SIGTERM"
        ec.signals.signum = 0
        now[0] = 61
        assert ec.should_stop(3) == "exit-duration-in-mins"
    finally:
        ec.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    args = _Args()
    args.exit_signal_handler, args.exit_interval, args.exit_after_iters = False, 4, 6
    ec = ExitConditions(args)
    assert [ec.should_stop(s) for s in (3, 4, 5, 6)] == [None, "exit-interval", None,
                                                         "exit-after-iters"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # no handler when off
    assert exit_status("SIGTERM") == exit_status("exit-interval") == EXIT_RESUME
    assert exit_status(None) == exit_status("exit-after-iters") == 0
    assert exit_status("SIGTERM", saved=False) == 143 and exit_status("exit-interval", saved=False) == 0


def test_timers_and_throughput():
    t = Timers(level=1)
    with t("data"):
        pass
    with t("eval"):  # level 2: not timed
        pass
    out = t.collect()
    assert set(out) == {"time_data_ms"} and out["time_data_ms"] >= 0 and t.collect() == {}

    from megatron_bdlora.adapters.config import AdapterConfig
    from megatron_bdlora.analytic.cost_model import training_flops
    from megatron_bdlora.models.presets import get_preset
    from megatron_bdlora.training.throughput import Throughput

    hf = get_preset("tiny")
    cfg = AdapterConfig(method="bdlora", rank=4, nblocks=2)
    tp = Throughput(hf, cfg, global_batch=4, seq=32, world_size=2, bf16=False)
    assert tp.step_flops == training_flops(hf, 4, 32, cfg)["total"]
    m = tp.metrics(0.5)
    assert m == {"tflops_per_gpu": tp.step_flops / 0.5 / 2 / 1e12}  # no MFU without a known GPU
    full = training_flops(hf, 4, 32, None, full_finetune=True)
    assert full["total"] == 1.5 * training_flops(hf, 4, 32)["total"]
