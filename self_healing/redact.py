"""Secrets never written: tokens and credentials are replaced by `[REDACTED]` in everything the
plugin writes (the postmortem, the crash journal, trackio alerts and run config, its own resume
checkpoints' `training_args.bin`) and in every line the `self_healing` logger emits.

Three nets, applied together:

- **by name**: in a mapping, the value under a key such as `hub_token`, `*_token`, `*_key`,
  `*secret*`, `password`, `authorization`, `credentials`, `cookie` (the tokenizer's special tokens
  `pad_token`, `eos_token`... are not secrets and are kept);
- **by shape**: in any string, Hugging Face (`hf_...`, `api_org_...`), OpenAI/Anthropic (`sk-...`),
  W&B (40 hex digits), GitHub, AWS, Slack, JWT and `Bearer` tokens, `user:password@` in URLs,
  `?token=`/`&key=`-style query parameters and `name=value` / `"name": "value"` pairs whose name
  looks secret;
- **by value**: any value of a secret-looking environment variable (`HF_TOKEN`, `WANDB_API_KEY`,
  `OPENAI_API_KEY`, `*_TOKEN`, `*_KEY`, `*SECRET*`, `*PASSWORD*`...) or registered with
  `register_secret()` (the Trainer's `hub_token` is, on attach) is replaced wherever it appears,
  whatever its shape.

Pure standard library: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

REDACTED = "[REDACTED]"

_NOT_SECRET_NAMES = frozenset({
    "pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token",
    "additional_special_tokens", "chat_template_token", "image_token", "video_token", "audio_token",
    "max_new_token", "num_tokens", "token_type_ids",
})
_SECRET_EXACT = frozenset({
    "token", "password", "passwd", "pwd", "pass", "secret", "apikey", "api_key", "authorization", "auth",
    "credentials", "credential", "cookie", "set-cookie", "private_key", "access_key", "secret_key",
})
_SECRET_SUFFIXES = ("_token", "-token", "_key", "-key", "_password", "-password", "_passwd", "_pwd",
                    "_credentials", "_credential", "_auth", "apikey", "accesstoken", "authtoken")


def is_secret_key(name: Any) -> bool:
    """True for a mapping key whose value must not be written (`hub_token`, `*_key`, `*secret*`...)."""
    if not isinstance(name, str):
        return False
    n = name.strip().lower()
    if n in _NOT_SECRET_NAMES:
        return False
    if n in _SECRET_EXACT or "secret" in n or "password" in n or "passwd" in n:
        return True
    return n.endswith(_SECRET_SUFFIXES)


# --- shapes ------------------------------------------------------------------------------------
_SHAPES: list[tuple[re.Pattern[str], str]] = [
    # credentials inside URLs: scheme://user:password@host and scheme://token@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]{1,20}://)[^\s/@:'\"]+(?::[^\s/@'\"]*)?@"), r"\1" + REDACTED + "@"),
    # Authorization headers and bare bearer/basic tokens
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/\-]{8,}=*"), r"\1 " + REDACTED),
    # query parameters with a secret-looking name
    (re.compile(r"(?i)([?&;](?:[a-z0-9_\-]*(?:token|key|secret|password|passwd|signature|sig|auth)"
                r"[a-z0-9_\-]*)=)[^&\s#'\"]+"), r"\1" + REDACTED),
    # Hugging Face user/org tokens
    (re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{20,}\b"), REDACTED),
    # OpenAI / Anthropic style keys (sk-..., sk-proj-..., sk-ant-...)
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"), REDACTED),
    # GitHub tokens
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})\b"), REDACTED),
    # AWS access key ids
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
    # Slack tokens
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{10,}"), REDACTED),
    # JSON web tokens
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"), REDACTED),
    # Weights & Biases API keys (40 hex digits; also matches SHA-1 digests, which is harmless here)
    (re.compile(r"\b[0-9a-f]{40}\b"), REDACTED),
    # PEM private keys
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S), REDACTED),
]
# name=value, name: value, "name": "value", --name value is not covered (no separator)
_PAIR = re.compile(
    r"(?i)(?P<name>\b[A-Za-z0-9_.\-]*?(?:token|_key|-key|apikey|secret[A-Za-z0-9_\-]*|password|passwd|pwd|"
    r"credentials?|authorization)\b)(?P<sep>['\"]?\s*[:=]\s*)(?P<quote>['\"]?)(?!\[REDACTED\])"
    r"(?P<value>[^\s'\",;}&)\]]+)")
_KEEP_VALUES = frozenset({"none", "null", "nil", "true", "false", "", REDACTED.lower(), "<hub_token>", "***",
                          "bearer", "basic"})

_ENV_SECRET = re.compile(r"(?i)(token|_key$|^key$|apikey|api_key|secret|password|passwd|credential|_pat$|auth)")
_MIN_LITERAL = 8
_registered: set[str] = set()
_literal_cache: tuple[frozenset[str], re.Pattern[str] | None] = (frozenset(), None)


def register_secret(value: Any) -> None:
    """Redact this exact value wherever it appears from now on (values shorter than 8 characters
    are ignored: too likely to be ordinary words)."""
    if isinstance(value, str) and len(value.strip()) >= _MIN_LITERAL and value.strip() != REDACTED:
        _registered.add(value.strip())


def _env_secrets() -> set[str]:
    out = set()
    for k, v in os.environ.items():
        if v and len(v) >= _MIN_LITERAL and _ENV_SECRET.search(k) and k.upper() not in _ENV_NOT_SECRET:
            out.add(v)
    return out


_ENV_NOT_SECRET = frozenset({"TOKENIZERS_PARALLELISM", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN_PATH",
                             "SSH_AUTH_SOCK", "KRB5CCNAME", "GIT_ASKPASS", "SSH_ASKPASS"})


def _literal_pattern() -> re.Pattern[str] | None:
    global _literal_cache
    values = frozenset(_registered | _env_secrets())
    if values != _literal_cache[0]:
        pat = None
        if values:  # longest first, so a secret that contains another is replaced whole
            pat = re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))
        _literal_cache = (values, pat)
    return _literal_cache[1]


def _pair_sub(m: re.Match[str]) -> str:
    name, value = m.group("name"), m.group("value")
    if value.lower() in _KEEP_VALUES or name.lower().split(".")[-1] in _NOT_SECRET_NAMES:
        return m.group(0)
    return f"{name}{m.group('sep')}{m.group('quote')}{REDACTED}"


def redact_text(text: Any, _literals: re.Pattern[str] | None | bool = True) -> Any:
    """`text` with every secret-shaped substring replaced by `[REDACTED]`; non-strings unchanged."""
    if not isinstance(text, str) or not text:
        return text
    lit = _literal_pattern() if _literals is True else _literals
    if lit is not None:
        text = lit.sub(REDACTED, text)
    for pat, repl in _SHAPES:
        text = pat.sub(repl, text)
    return _PAIR.sub(_pair_sub, text)


def redact(obj: Any, _depth: int = 0, _lit: Any = True) -> Any:
    """A copy of nested data (dicts, lists, tuples, sets, strings) with secrets redacted: values
    under secret-looking keys replaced whole, secret-shaped substrings in every string. Numbers,
    booleans and None are returned as they are; other objects unchanged."""
    if _lit is True:
        _lit = _literal_pattern()
    if _depth > 200:  # a self-referencing or absurdly deep structure: stop, do not recurse forever
        return REDACTED
    if isinstance(obj, str):
        return redact_text(obj, _lit)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if is_secret_key(k) and v is not None and not isinstance(v, bool) and v != "":
                out[k] = REDACTED
            else:
                out[redact_text(k, _lit) if isinstance(k, str) else k] = redact(v, _depth + 1, _lit)
        return out
    if isinstance(obj, list):
        return [redact(v, _depth + 1, _lit) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v, _depth + 1, _lit) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return [redact(v, _depth + 1, _lit) for v in obj]
    if isinstance(obj, bytes):
        try:
            return redact_text(obj.decode("utf-8"), _lit).encode("utf-8")
        except UnicodeDecodeError:
            return obj
    return obj


def _scrubbed_attrs(obj: Any) -> dict[str, Any]:
    """The attributes of an object (TrainingArguments, a config) that carry a secret, with their
    redacted values: a secret-named string whole, secrets inside other strings and containers."""
    out: dict[str, Any] = {}
    for n, v in list(getattr(obj, "__dict__", {}).items()):
        if is_secret_key(n) and isinstance(v, str) and v and v != REDACTED:
            out[n] = REDACTED
        elif isinstance(v, (str, dict, list, tuple)):
            try:
                new = redact(v)
                if new != v:
                    out[n] = new
            except Exception:  # noqa: BLE001 - an odd attribute is left as it is
                pass
    return out


def secret_fields(obj: Any) -> list[str]:
    """Names of an object's attributes that carry a secret (`hub_token`, a URL with a password...)."""
    return list(_scrubbed_attrs(obj))


def register_secrets_of(obj: Any) -> None:
    """Register the values of an object's secret-named string attributes (e.g. `args.hub_token`),
    so they are redacted wherever they show up later, whatever their shape."""
    for n, v in list(getattr(obj, "__dict__", {}).items()):
        if is_secret_key(n) and isinstance(v, str):
            register_secret(v)


def redacted_copy(obj: Any) -> Any:
    """A shallow copy of an object with every secret-carrying attribute redacted (for pickling
    TrainingArguments into a checkpoint without the hub token)."""
    import copy

    out = copy.copy(obj)
    for n, v in _scrubbed_attrs(obj).items():
        try:
            setattr(out, n, v)
        except (AttributeError, TypeError):
            pass
    return out


def scrub_training_args(path: Any, args: Any) -> bool:
    """Rewrite a checkpoint's `training_args.bin` (the Trainer pickles its TrainingArguments whole,
    `hub_token` included) with the secret fields redacted, atomically. Nothing to do (False) when
    no secret field is set or the file is absent."""
    from pathlib import Path

    p = Path(path)
    if not secret_fields(args) or not p.is_file():
        return False
    import io

    import torch

    from .io import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(redacted_copy(args), buf)
    atomic_write_bytes(p, buf.getvalue())
    return True


# --- logging ------------------------------------------------------------------------------------
class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and its formatted traceback) with secrets redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
            clean = redact_text(msg)
            if clean != msg:
                record.msg, record.args = clean, ()
            if record.exc_info and not record.exc_text:
                record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
            elif record.exc_text:
                record.exc_text = redact_text(record.exc_text)
            if record.stack_info:
                record.stack_info = redact_text(record.stack_info)
        except Exception:  # noqa: BLE001 - a log line must never raise; an unformattable one passes as is
            pass
        return True


def install_log_filter(name: str = "self_healing") -> RedactingFilter:
    """Install (once) the redacting filter on the named logger and return it."""
    lg = logging.getLogger(name)
    for f in lg.filters:
        if isinstance(f, RedactingFilter):
            return f
    f = RedactingFilter()
    lg.addFilter(f)
    return f


def redact_trackio_run_config() -> bool:
    """Redact the current trackio run's config in place, before its first log writes it (the
    Trainer's `TrackioCallback` puts `args.to_dict()` and the model config there). No-op when
    trackio was never imported or no run is active. True when a run was cleaned."""
    import sys

    trackio = sys.modules.get("trackio")
    if trackio is None:
        return False
    try:
        run = trackio.context_vars.current_run.get()
    except (AttributeError, LookupError):
        return False
    cfg = getattr(run, "config", None)
    if not isinstance(cfg, dict):
        return False
    clean = redact(cfg)
    cfg.clear()
    cfg.update(clean)
    return True


install_log_filter()

__all__ = ["REDACTED", "redact", "redact_text", "is_secret_key", "register_secret", "register_secrets_of",
           "redacted_copy", "scrub_training_args", "RedactingFilter", "install_log_filter", "redact_trackio_run_config"]
