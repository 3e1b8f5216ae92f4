"""Load records with HF `datasets`, tokenize them once (cached on disk), and wrap them as rows.

Truncation policy: an example longer than `seq_length` tokens (EOS included) is cut from the right,
keeping the start of the prompt; it is counted in `DataStats.num_truncated`. An example left with
no target tokens (nothing to learn: empty completion, no assistant turn, prompt longer than
`seq_length`) is dropped and counted in `DataStats.num_dropped`; a dataset with no targets at all
is an error.
"""

import glob
import hashlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from megatron_bdlora.data.formats import FORMATS, TOKENIZE, check_record, check_tokenizer, detect_format
from megatron_bdlora.data.packing import RowDataset
from megatron_bdlora.data.tokenizer import tokenizer_fingerprint
from megatron_bdlora.errors import InputError, InputFileNotFound

EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
              ".arrow": "arrow"}
# Bump when tokenisation logic changes, so that old cache files are not reused.
CACHE_VERSION = 2  # 2: no EOS appended after a chat template's last turn


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.environ.get("BDLORA_DATA_CACHE", os.path.join(base, "megatron_bdlora", "data"))


def looks_local(path: str) -> bool:
    return (path.startswith(("/", "./", "../", "~")) or os.path.splitext(path)[1] in EXTENSIONS
            or os.path.exists(path))


def local_files(path: str) -> list:
    """The data files behind a local path: the file itself, or every data file under a directory."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise InputFileNotFound(f"data not found: {path} (check the path, or pass a hub dataset "
                                f"name like 'owner/name')")
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(d, f) for d, dirs, names in os.walk(path) for f in names
                       if os.path.splitext(f)[1] in EXTENSIONS and not f.startswith("."))
        if not files:
            raise InputFileNotFound(f"no data files ({', '.join(EXTENSIONS)}) in directory {path}")
    kinds = {EXTENSIONS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds:
        raise InputError(f"unsupported data file {path}; use one of {', '.join(EXTENSIONS)}")
    if len(kinds) > 1:
        raise InputError(f"{path} mixes data file types {sorted(kinds)}; keep one type per dataset")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise InputError(f"data file {empty[0]} is empty")
    return files


def load_records(path_or_hub_name: str, split: str = "train", cache_dir: str = None):
    """Records as a `datasets.Dataset`.

    A local .json/.jsonl/.parquet/.csv/.arrow file, or a directory of them (all files form one
    dataset; `split` is ignored), or a hub dataset name (the only case that touches the network).
    """
    import datasets

    name = os.fspath(path_or_hub_name)
    try:
        if looks_local(name):
            files = local_files(name)
            kind = EXTENSIONS[os.path.splitext(files[0])[1]]
            ds = datasets.load_dataset(kind, data_files=files, split="train", cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except (FileNotFoundError, InputError):
        raise
    except Exception as e:  # datasets wraps parse errors in long multi-line chains; a file of
        # blank lines or an empty JSON list is a ValueError ("... corresponds to no data")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot read records from {name}: {msg}") from e
    if len(ds) == 0:
        raise InputError(f"{name} contains no records")
    return ds


def _source_fingerprint(source, records, split) -> str:
    """What the cached tokens depend on, on the data side: files with sizes and mtimes, or the
    hub dataset's own fingerprint."""
    if isinstance(source, (str, os.PathLike)) and looks_local(os.fspath(source)):
        files = local_files(os.fspath(source))
        return json.dumps([(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns)
                           for f in files])
    return json.dumps([str(source) if isinstance(source, (str, os.PathLike)) else "dataset",
                       split, getattr(records, "_fingerprint", None)])


@dataclass
class DataStats:
    source: str
    record_format: str
    num_records: int        # records read
    num_examples: int       # records kept (the rest had no target tokens)
    num_dropped: int
    num_truncated: int      # kept examples cut to seq_length
    num_tokens: int         # tokens in kept examples, after truncation
    num_target_tokens: int  # tokens that carry loss
    num_rows: int           # rows of seq_length the model sees (after packing)
    packing_efficiency: float  # non-padding share of row tokens
    cache_hit: bool
    cache_file: str

    def summary(self) -> str:
        return (f"{self.source}: {self.num_examples}/{self.num_records} {self.record_format} "
                f"examples ({self.num_dropped} dropped without targets, {self.num_truncated} "
                f"truncated), {self.num_tokens} tokens ({self.num_target_tokens} targets), "
                f"{self.num_rows} rows, {self.packing_efficiency:.0%} full, "
                f"cache {'hit' if self.cache_hit else 'miss'}")

    def to_dict(self) -> dict:
        return asdict(self)


def _encode(record, index, *, record_format, tokenizer, seq_length, add_eos, prompt_template,
            source):
    try:
        check_record(record, record_format, index + 1)
    except InputError as e:
        raise InputError(f"{source} {e}") from None
    try:
        ids, mask = TOKENIZE[record_format](record, index, tokenizer=tokenizer,
                                            prompt_template=prompt_template)
    except InputError as e:
        raise InputError(f"{source} record {index + 1}: {e}") from None
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    # Pre-tokenized data is taken as the user built it, and a chat template ends each turn
    # itself (ChatML: "<|im_end|>\n"; an EOS after that would be a target no rendering has).
    # Elsewhere EOS teaches the model to stop; it is a target only when it ends a target span.
    if add_eos and record_format not in ("tokens", "messages") and eos is not None and ids and \
            ids[-1] != eos:
        ids, mask = ids + [eos], mask + [mask[-1]]
    raw_len = len(ids)
    ids, mask = ids[:seq_length], mask[:seq_length]  # right truncation: keep the prompt start
    # Position 0 has no previous token, so it is never a target.
    return {"input_ids": ids, "loss_mask": mask, "num_tokens": len(ids), "raw_tokens": raw_len,
            "num_targets": int(sum(mask[1:]))}


def build_dataset(source, tokenizer, seq_length: int, *, split: str = "train",
                  pack_sequences: bool = False, prompt_template: str = None,
                  record_format: str = None, add_eos: bool = True, cache_dir: str = None,
                  num_proc: int = None) -> RowDataset:
    """Tokenized rows of `seq_length` tokens, ready for the model (see packing.RowDataset).

    source: a path or hub name (see load_records) or a `datasets.Dataset`. Tokenisation runs
    once: the result is cached under `cache_dir` in a file keyed by a hash of the data files
    (paths, sizes, mtimes), the tokenizer's content, the format options and seq_length. On a
    multi-rank run, let one rank build first (then a barrier) so the others read the cache.
    Examples longer than seq_length are truncated from the right (the prompt start is kept) and
    counted; examples without target tokens are dropped and counted. The result's `.stats`
    (DataStats) says what was kept, dropped, truncated and cached.
    """
    import datasets

    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2, got {seq_length}")
    if prompt_template is not None and "{prompt}" not in prompt_template:
        raise InputError(f"--prompt-template {prompt_template!r} has no {{prompt}} placeholder")
    cache_dir = os.path.expanduser(cache_dir or default_cache_dir())
    os.makedirs(cache_dir, exist_ok=True)

    if isinstance(source, datasets.Dataset):
        records, name = source, "<dataset>"
        if len(records) == 0:
            raise InputError("the dataset contains no records")
    else:
        name = os.fspath(source)
        records = load_records(name, split, cache_dir=os.path.join(cache_dir, "raw"))
    fmt = record_format or detect_format(records.column_names)
    if fmt not in FORMATS:
        raise InputError(f"unknown record format {fmt!r}; choose from {FORMATS}")
    check_tokenizer(tokenizer, fmt)

    key = hashlib.sha256(json.dumps([
        CACHE_VERSION, _source_fingerprint(source, records, split),
        tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        fmt, prompt_template, add_eos, seq_length]).encode()).hexdigest()[:20]
    cache_file = os.path.join(cache_dir, f"tokens-{key}.arrow")
    # With num_proc, datasets writes one shard per process, suffixed: tokens-<key>_00000_of_00004.
    cache_hit = bool(glob.glob(glob.escape(cache_file[:-len(".arrow")]) + "*.arrow"))
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_mask": datasets.Sequence(datasets.Value("int8")),
        "num_tokens": datasets.Value("int32"), "raw_tokens": datasets.Value("int32"),
        "num_targets": datasets.Value("int32")})
    tokens = records.map(
        _encode, with_indices=True, remove_columns=records.column_names, features=features,
        cache_file_name=cache_file, load_from_cache_file=True, num_proc=num_proc,
        desc=f"tokenizing {name}",
        fn_kwargs=dict(record_format=fmt, tokenizer=tokenizer, seq_length=seq_length,
                       add_eos=add_eos, prompt_template=prompt_template, source=name))

    num_targets = np.asarray(tokens["num_targets"])
    keep = np.flatnonzero(num_targets > 0)
    if len(keep) == 0:
        raise InputError(f"no target tokens in any of the {len(tokens)} {fmt} records of {name} "
                         f"(loss masks all 0: empty completions, no assistant turns, or prompts "
                         f"longer than seq_length {seq_length})")
    if len(keep) < len(tokens):
        tokens = tokens.select(keep)
    lengths = np.asarray(tokens["num_tokens"])
    pad_id = _pad_id(tokenizer)
    rows = RowDataset(tokens, lengths, seq_length, pad_id, pack=pack_sequences)
    rows.stats = DataStats(
        source=name, record_format=fmt, num_records=len(records), num_examples=len(keep),
        num_dropped=len(records) - len(keep),
        num_truncated=int((np.asarray(tokens["raw_tokens"]) > seq_length).sum()),
        num_tokens=int(lengths.sum()), num_target_tokens=int(num_targets.sum()),
        num_rows=len(rows), packing_efficiency=float(lengths.sum()) / (len(rows) * seq_length),
        cache_hit=cache_hit, cache_file=cache_file)
    return rows


def _pad_id(tokenizer) -> int:
    # The pad token's value never matters (padding is masked), only that it is a valid id.
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if value is not None:
            return int(value)
    return 0
