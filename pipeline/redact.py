"""The redactor: secrets hidden from every text before it is cut, stored or printed.

    redactor = Redactor([api_key])
    redactor.scrub("Incorrect API key provided: sk-...")    # "Incorrect API key provided: [key]"
    redactor.cut(message, 500)                             # scrub first, then cut
    redactor.scrub_record({"error": "...sk-..."})         # a new dict, every text value scrubbed

Why scrub before cutting: a provider that echoes the key in a long message may have it
straddle the cut, and half a key left after a cut is no longer found by a scrub that comes later.
A secret is hidden in the forms a message can carry it in: as is, JSON-escaped (a body echoed in
an error text) and percent-encoded (a URL), hex digits of either case. A text that ends with the
first characters of a secret (someone upstream cut it) has that tail hidden too.

Presigned URLs carry secrets no list can name ahead (a signature per URL, a session token): the
values of their signing query parameters (`X-Amz-Signature`, `X-Amz-Credential`,
`X-Amz-Security-Token`, SigV2's `Signature` and `AWSAccessKeyId`, GCS's `X-Goog-*`, Azure's SAS
`sig`) are hidden in every text, whatever secrets were given, and however the URL is escaped there
(HTML's &amp;, JSON's \u0026, percent-encoded inside another URL once or twice).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

__all__ = ["Redactor", "KEY_PLACEHOLDER", "MIN_PARTIAL", "SECRET_WORDS", "CREDENTIAL_OPTIONS", "secret_name",
           "option_secrets", "storage_secrets"]

KEY_PLACEHOLDER = "[key]"
MIN_PARTIAL = 6  # a text ending with this many first characters of a secret has them hidden
SIGNED_PLACEHOLDER = "[signed]"
# A presigned URL's signing parameters, after its separator, up to the next one: the name is kept
# (a reader sees a URL was signed), the value hidden. The URL may be escaped as text carries it:
# "?"/"&", JSON's \u0026, HTML's &amp;, or percent-encoded inside another URL's query (%3F, %26,
# %3D; %253F... when encoded twice).
_SIGNED = re.compile(
    r"(?:\?|&(?:amp;)*|\\u0026|%(?:25)*(?:3[Ff]|26))"
    r"(?i:X-Amz-(?:Signature|Credential|Security-Token)|X-Goog-(?:Signature|Credential)|Signature|AWSAccessKeyId|"
    r"GoogleAccessId|sig)(?:=|%(?:25)*3[Dd])(?P<value>(?:(?!%(?:25)*26)[^&\s\"'<>\\])+)")
# The first characters those separators can have. Most texts hold none, or a few: matching at each
# (str.find is memchr) costs about a microsecond, where a regex search of a 1 KB answer costs ~10 us
# (~35 us substituting), and an answer that echoes a signed URL (presign mode) pays little more.
_SEPARATORS = ("?", "&", "%", "\\")


def _unsigned(text: str) -> str:
    """`text` with the values of presigned URLs' signing parameters hidden."""
    # A parameter's "=", or its %3D: most texts hold neither (a one-character `in` is memchr, ~25 ns
    # a KB, where `"%3D" in text` costs ~1.5 us); with no "=", only a percent-encoded URL can.
    separators: tuple[str, ...]
    if "=" in text:
        separators = _SEPARATORS
    elif "%" in text:
        separators = ("%",)
    else:
        return text
    values: list[tuple[int, int]] = []
    for sep in separators:
        at = text.find(sep)
        while at >= 0:
            m = _SIGNED.match(text, at)
            if m is not None:
                values.append(m.span("value"))
            at = text.find(sep, m.end() if m is not None else at + 1)
    if not values:
        return text
    out, done = [], 0
    for start, end in sorted(values):
        if start >= done:  # (one value cannot hold another's start; kept safe all the same)
            out += [text[done:start], SIGNED_PLACEHOLDER]
            done = end
    out.append(text[done:])
    return "".join(out)


# Names (compared lower-cased) whose values are secrets wherever a name is free to choose: an
# [endpoint] header, a storage option's header, a setting shown in the report.
SECRET_WORDS = ("key", "token", "auth", "secret", "password", "cookie", "signature", "credential")
# Storage options that hold credentials, by name (lower-cased), at any depth of `storage_options`:
# s3fs (username and password are its aliases of key and secret), botocore's client_kwargs,
# s3_additional_kwargs' SSE-C key, a gcsfs token given as a dict, adlfs. Every other option is a
# setting (acl, a cache type, a region, a signature version): hiding its value would rewrite any
# answer that holds the word ("private", "none").
CREDENTIAL_OPTIONS = frozenset({
    "key", "secret", "token", "username", "password", "passwd",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "session_token", "ssecustomerkey",
    "access_key", "access_key_id", "secret_key", "secret_access_key", "api_key",
    "private_key", "private_key_id", "client_secret", "refresh_token", "access_token", "id_token",
    "account_key", "sas_token", "connection_string", "credential", "credentials",
})
# gcsfs `token` values that name a way to authenticate, not a credential.
TOKEN_METHODS = frozenset({"anon", "google_default", "cache", "browser", "cloud"})
# Credentials the storage backends read from the environment: hidden too, should a message echo one.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY",
              "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET")
MIN_OPTION = 4  # a shorter value ("s3", "v4") is no credential, and hiding it would garble every text


def secret_name(name: str) -> bool:
    """Whether a freely named value (a header, a setting) is a secret: its name holds a SECRET_WORD."""
    low = name.lower()
    return any(word in low for word in SECRET_WORDS)


def option_secrets(options: Any) -> list[str]:
    """The credentials among fsspec storage options: the values named in CREDENTIAL_OPTIONS (a
    gcsfs token's way to authenticate aside) and secret headers (client_kwargs' `headers`)."""
    found: list[str] = []

    def walk(value: Any, key: str, in_headers: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k), key.lower() == "headers")  # a header, by its own name
        elif isinstance(value, str) and len(value) >= MIN_OPTION:
            low = key.lower()
            if (low in CREDENTIAL_OPTIONS and value not in TOKEN_METHODS) or (in_headers and secret_name(key)):
                found.append(value)

    walk(options, "", False)
    return found


def storage_secrets(options: Any) -> list[str]:
    """What a storage backend must never show: the credentials in `options` and in SECRET_ENV."""
    found = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)] + option_secrets(options or {})
    return sorted(set(found), key=len, reverse=True)  # a secret inside a longer one: the longer first


def _forms(secret: str) -> set[str]:
    """The spellings of `secret` a message may hold."""
    escaped = json.dumps(secret)[1:-1]
    quoted = {quote(secret, safe=""), quote_plus(secret, safe="")}
    lower_hex = {re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), q) for q in quoted}  # a cut start too
    return {secret, escaped, escaped.replace("/", "\\/"), json.dumps(secret, ensure_ascii=False)[1:-1],
            *quoted, *lower_hex}


def _pattern(form: str) -> str:
    """A regex for one form; the hex digits of a %XX escape match in either case."""
    out: list[str] = []
    i = 0
    while i < len(form):
        if form[i] == "%" and re.fullmatch(r"[0-9A-F]{2}", form[i + 1 : i + 3]):
            out.append("%" + "".join(f"[{c}{c.lower()}]" if c.isalpha() else c for c in form[i + 1 : i + 3]))
            i += 3
        else:
            out.append(re.escape(form[i]))
            i += 1
    return "".join(out)


class Redactor:
    """Hides `secrets` (empty or None ones are ignored) behind `placeholder`."""

    def __init__(self, secrets: Iterable[str | None] = (), placeholder: str = KEY_PLACEHOLDER) -> None:
        forms = {form for s in secrets if s for form in _forms(s)}
        self.placeholder = placeholder
        # Longest first: a secret inside a longer one must not leave the longer one's rest behind.
        self._forms = sorted(forms, key=len, reverse=True)
        self._regex = re.compile("|".join(_pattern(f) for f in self._forms)) if self._forms else None
        # Every match, whole or a trailing start, holds a form's first MIN_PARTIAL characters (the
        # hex digits of a %XX escape in either case: compared lowercased). Most texts hold none:
        # a substring test per form costs ~0.2 us a KB, the regex's scan ~1.5 us per form.
        # (ASCII only: lowercasing elsewhere may hang on context, as Greek's final sigma does.)
        starts = {f[:MIN_PARTIAL].lower() for f in self._forms}
        self._starts = sorted(starts) if all(s.isascii() for s in starts) else None

    def __bool__(self) -> bool:
        return True  # signed URLs are scrubbed even when no secret was given

    def __repr__(self) -> str:  # never the secrets themselves
        return f"Redactor({len(self._forms)} forms)"

    def scrub(self, text: str) -> str:
        """`text` with every form of every secret, and a trailing start of one, replaced."""
        if not text:
            return text
        text = _unsigned(text)
        if self._regex is None:
            return text
        if self._starts is not None:
            low = text.lower()
            if not any(start in low for start in self._starts):
                return text
        text = self._regex.sub(self.placeholder, text)
        return self._hide_partial_tail(text)

    def _hide_partial_tail(self, text: str) -> str:
        for form in self._forms:
            start = text.rfind(form[:MIN_PARTIAL], max(0, len(text) - len(form)))
            if start >= 0 and form.startswith(text[start:]):
                return text[:start] + self.placeholder
        return text

    def cut(self, text: str, limit: int) -> str:
        """Scrubbed, then at most `limit` characters: a cut can never split a secret."""
        return self.scrub(text)[:limit]

    def scrub_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A copy of `record` with every text in it (nested lists and dicts too) scrubbed."""
        return {k: self._scrub_value(v) for k, v in record.items()}

    def _scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._scrub_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrub_value(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self._scrub_value(v) for v in value)
        return value
