"""
checkpoint_files.py — the JSON files of a checkpoint folder, read and type-checked in one place,
and atomic writes (temporary file + rename) for everything saved into one.

A checkpoint folder is input like any other: config.json and the weight index (read by mimovl.py),
tokenizer_config.json, chat_template.json, preprocessor_config.json and generation_config.json (read
by processor.py) all go through read_json_file and check_json_fields, so a wrong type is one clear
error that names the file, the key and the value, never a traceback deep inside the model.
Writers (mimovl.save_checkpoint, Processor.save_pretrained) go through write_file_atomic, so a
crash never leaves a half-written file under the real name.

This file imports only the standard library: the model (mimovl.py) and the data modules
(processor.py) both build on it without depending on each other.
"""

import json
import math
import os
import secrets
from pathlib import Path


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


JSON_KINDS = {
    "integer": _is_int,
    "positive integer": lambda v: _is_int(v) and v > 0,
    "integer >= 0": lambda v: _is_int(v) and v >= 0,
    "number": _is_number,
    "positive number": lambda v: _is_number(v) and v > 0,
    "number >= 0": lambda v: _is_number(v) and v >= 0,
    "number in (0, 1]": lambda v: _is_number(v) and 0 < v <= 1,
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "list of integers": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "list of 3 numbers": lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v),
    "token id or list of token ids": lambda v: (_is_int(v) and v >= 0) or (
        isinstance(v, list) and v and all(_is_int(x) and x >= 0 for x in v)),
    "token (a string or {\"content\": string})": lambda v: isinstance(v, str) or (
        isinstance(v, dict) and isinstance(v.get("content"), str)),
    "list of tokens": lambda v: isinstance(v, list) and all(
        isinstance(x, str) or (isinstance(x, dict) and isinstance(x.get("content"), str)) for x in v),
    "chat template (a string or a list of {\"name\", \"template\"})": lambda v: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in v)),
}


def read_json_file(path, required=False):
    """A checkpoint's JSON file as a dict; {} when it is absent (unless required). Not JSON, not
    UTF-8 or not a JSON object: a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download or write it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object {{...}}, not a {type(data).__name__}")
    return data


def check_json_fields(data, path, kinds, prefix=""):
    """Raise a ValueError naming `path` and the key when a present, non-null key of `data` is not of
    its kind in `kinds` ({key: a JSON_KINDS name}). Returns `data`."""
    for key, kind in kinds.items():
        value = data.get(key)
        if value is not None and not JSON_KINDS[kind](value):
            raise ValueError(f"{path}: {prefix}{key}={json.dumps(value)[:80]} must be a {kind}")
    return data



def write_file_atomic(path, write):
    """Call write(temporary path) in the target's folder, then rename onto `path`: a crash never
    leaves a half-written file under the real name. The file gets the usual permissions (0644
    under umask 022) even when the writer creates it private (safetensors writes 0600)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    umask = os.umask(0o022)   # reading the umask means setting it; put it straight back
    os.umask(umask)
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path, obj):
    write_file_atomic(path, lambda tmp: Path(tmp).write_text(
        json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))
