"""Tokenizer loading, and a tiny trainable tokenizer for tests and the CPU demo."""

import hashlib
import json
import os

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron_bdlora.errors import InputFileNotFound

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"

# Llama-3-like: a header per turn, each turn closed by EOS, and a generation prompt that opens an
# assistant header. Every turn's rendering is a prefix of the next one's, which is what lets
# formats.py find assistant spans by rendering the conversation incrementally.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def load_tokenizer(path_or_name: str):
    """AutoTokenizer from a local directory or a hub name. Remote code is never trusted: a
    tokenizer that needs it is refused by transformers with its own message."""
    looks_local = path_or_name.startswith(("/", "./", "../", "~")) or os.path.exists(path_or_name)
    if looks_local and not os.path.isdir(os.path.expanduser(path_or_name)):
        raise InputFileNotFound(f"tokenizer directory not found: {path_or_name} (pass a directory "
                                f"saved with save_pretrained, or a hub name like 'owner/name')")
    tok = AutoTokenizer.from_pretrained(os.path.expanduser(path_or_name), trust_remote_code=False)
    # Llama tokenizers ship without a pad token; padding positions are masked anyway, so any id works.
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def build_tiny_tokenizer(out_dir: str, texts, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (no unknown bytes ever) on `texts` and save it to `out_dir` as a
    PreTrainedTokenizerFast directory that AutoTokenizer.from_pretrained loads.

    The vocabulary is padded with unused tokens to a multiple of 8 (embedding-friendly) and is at
    most `vocab_size`. Tokenizing adds BOS (like Llama); the chat template writes BOS itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size % 8:
        raise ValueError(f"vocab_size must be a multiple of 8, got {vocab_size}")
    specials = [BOS, EOS, PAD, UNK, HEADER_START, HEADER_END]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Role names join the corpus so chat headers tokenize to a few tokens, not letter by letter.
    tok.train_from_iterator(list(texts) + ["system user assistant"], trainer=trainer)
    # A small corpus yields fewer merges than asked for: pad up to the next multiple of 8.
    n = tok.get_vocab_size()
    tok.add_special_tokens([f"<extra_{i}>" for i in range((-n) % 8)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK,
                                   additional_special_tokens=[HEADER_START, HEADER_END])
    fast.chat_template = TINY_CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    # The class name every transformers version knows (v5 saves its own alias otherwise).
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return fast


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash that changes whenever tokenisation could: vocab/merges, specials, template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    # Content only, not name_or_path: the same tokenizer saved elsewhere reuses the cache.
    extras = [getattr(tokenizer, "chat_template", None),
              tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
              type(tokenizer).__name__]
    h.update(json.dumps(extras, default=str).encode())
    return h.hexdigest()[:16]
