"""Record formats: detect one per dataset from its keys, and turn a record into (input_ids, loss_mask).

loss_mask[t] == 1 means token t is a training target (it is predicted from position t - 1); the
shift to next-token labels happens later, in packing.py.

  messages            {"messages": [{"role", "content"}, ...]}  chat template; loss on assistant turns
  prompt_completion   {"prompt", "completion"}                  loss on the completion only
  text                {"text"}                                  loss on every token
  tokens              {"input_ids", "loss_mask"?}               pre-tokenized, taken as-is

Extra keys (ids, metadata) are ignored. `check_record` checks one record's field types first.
"""

from jinja2 import TemplateError

from megatron_bdlora.errors import InputError

FORMATS = ("messages", "prompt_completion", "text", "tokens")
_FORMAT_HELP = ('{"messages": [...]} | {"prompt", "completion"} | {"text"} | '
                '{"input_ids", "loss_mask"?}')


def detect_format(keys) -> str:
    """The record format from a dataset's column names; InputError when none fits."""
    keys = set(keys)
    # Most specific first: pre-tokenized data may also carry its source text.
    if "input_ids" in keys:
        return "tokens"
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise InputError(f"cannot tell the record format from keys {sorted(keys)}; "
                     f"expected one of {_FORMAT_HELP}")


# The tokenize_* functions take (record, 0-based index, tokenizer, ...) after check_record passed.
REQUIRED = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
            "text": ("text",), "tokens": ("input_ids",)}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_record(record, fmt: str, number: int, vocab_size: int | None = None) -> None:
    """InputError naming record `number` (1-based) and the fix when a field has the wrong type,
    a loss_mask is not a list of 0/1 as long as input_ids, or a token id is outside the vocab."""
    def bad(what):
        raise InputError(f"record {number}: {what}; fix the record ({fmt} format)")

    for field in REQUIRED[fmt]:
        if record.get(field) is None:
            bad(f"no {field!r} field")
    if fmt in ("text", "prompt_completion"):
        for field in REQUIRED[fmt]:
            if not isinstance(record[field], str):
                bad(f"field {field!r} must be a string, got {type(record[field]).__name__}")
    elif fmt == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            bad("'messages' must be a non-empty list")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                   and isinstance(m.get("content"), str) for m in messages):
            bad("each message needs string 'role' and 'content'")
    else:
        ids, mask = record["input_ids"], record.get("loss_mask")
        if not isinstance(ids, list) or not ids or not all(_is_int(i) for i in ids):
            bad("'input_ids' must be a non-empty list of ints")
        if vocab_size is not None and not all(0 <= i < vocab_size for i in ids):
            bad(f"token id {next(i for i in ids if not 0 <= i < vocab_size)} is outside the "
                f"model's vocabulary [0, {vocab_size})")
        if mask is not None:
            if not isinstance(mask, list) or not all(m in (0, 1) and not isinstance(m, float)
                                                     for m in mask):
                bad(f"'loss_mask' must be a list of 0/1 ints, got {type(mask).__name__} "
                    f"{str(mask)[:20]!r}")
            if len(mask) != len(ids):
                bad(f"loss_mask has {len(mask)} entries but input_ids has {len(ids)}")


def tokenize_text(record, index, tokenizer, **_):
    ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
    mask = [1] * len(ids)
    if ids and ids[0] == tokenizer.bos_token_id:
        mask[0] = 0  # BOS is not text: an empty text then has no targets and is dropped
    return ids, mask


def tokenize_prompt_completion(record, index, tokenizer, prompt_template=None, **_):
    prompt, completion = record["prompt"], record["completion"]
    if prompt_template is not None:
        # str.replace, not str.format: prompts may contain braces (code, JSON).
        prompt = prompt_template.replace("{prompt}", prompt)
    # Tokenized apart, exactly as at inference, where generation starts from the prompt's tokens.
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return p + c, [0] * len(p) + [1] * len(c)


def tokenize_tokens(record, index, tokenizer=None, **_):
    ids, mask = record["input_ids"], record.get("loss_mask")
    return list(ids), [1] * len(ids) if mask is None else [int(m) for m in mask]


def render_chat(tokenizer, messages, add_generation_prompt):
    """The conversation as text, by the tokenizer's own chat template (training and eval); a
    conversation the template refuses (e.g. roles out of order) is one InputError."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:  # the template's raise_exception(...), or a broken template
        said = " ".join(str(e).split())[:100]
        roles = "/".join(str(m.get("role"))[:20] for m in messages)
        raise InputError(f"the tokenizer's chat template refuses roles {roles} ({said}); fix the "
                         "record's roles or use a tokenizer whose template accepts them") from None


def assistant_char_spans(tokenizer, messages, full):
    """Character spans of `full` (the rendered conversation) that the assistant writes.

    Each assistant turn i spans from the end of render(messages[:i], generation prompt) to the
    end of render(messages[:i + 1]): its content plus the template's end-of-turn marker, so the
    model learns to stop. This holds whenever each rendering is a prefix of the full one (true
    for Llama/ChatML-style templates); otherwise fall back to locating the content text itself.
    """
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = render_chat(tokenizer, messages[:i], True) if i else None
            upto = render_chat(tokenizer, messages[: i + 1], False)
        except Exception:  # some templates refuse partial conversations
            before = upto = None
        if before is not None and full.startswith(before) and full.startswith(upto) \
                and len(upto) >= len(before) >= cursor:
            spans.append((len(before), len(upto)))
            cursor = len(upto)
            continue
        start = full.find(m["content"], cursor)
        if start < 0:
            raise InputError(f"cannot locate assistant turn {i} in the chat template's output; "
                             f"the template rewrites message content")
        end = start + len(m["content"])
        eos = tokenizer.eos_token or ""
        if eos and full.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
        cursor = end
    return spans


def tokenize_messages(record, index, tokenizer, **_):
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    full = render_chat(tokenizer, messages, False)
    spans = assistant_char_spans(tokenizer, messages, full)
    # The template writes BOS itself, as apply_chat_template(tokenize=True) assumes.
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        # A token is a target when it starts inside a span; a token straddling the span start
        # also holds prompt text, and at inference the model never has to produce it.
        mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
        return ids, mask
    # Slow tokenizers have no offsets: tokenize the text up to each span boundary instead.
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    mask = [0] * len(ids)
    for s, e in spans:
        a = len(tokenizer(full[:s], add_special_tokens=False)["input_ids"])
        b = len(tokenizer(full[:e], add_special_tokens=False)["input_ids"])
        mask[a:b] = [1] * (b - a)
    return ids, mask


TOKENIZE = {"messages": tokenize_messages, "prompt_completion": tokenize_prompt_completion,
            "text": tokenize_text, "tokens": tokenize_tokens}


def check_tokenizer(tokenizer, record_format):
    if record_format == "messages" and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"chat records need a tokenizer with a chat template, and "
                         f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')!r} has none; "
                         f"use an instruct tokenizer or convert the data to prompt/completion")
    if record_format != "tokens" and tokenizer is None:
        raise InputError(f"{record_format} records need a tokenizer; pass --tokenizer DIR")
