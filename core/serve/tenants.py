"""Who is calling: API keys and the tenants they belong to.

A tenant is a namespace of conversations and saved sessions (see ``docs/serving.md``, "Threat
model"). ``--api-key KEY`` is one key of the default tenant (the one ``agent chat`` and
``agent sessions`` use); ``--api-keys FILE`` gives each key its own tenant. A key is never
logged or echoed; it is compared with every configured key in constant time (on SHA-256
digests, so neither the length nor the position of a match leaks through timing).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from hyperlex.agent.store import DEFAULT_TENANT
from hyperlex.errors import HyperlexError

TENANT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MIN_KEY_LENGTH = 8


@dataclass(frozen=True)
class Keyring:
    """The configured keys (as SHA-256 digests) and their tenants; no keys: open to all, as
    the default tenant."""

    digests: tuple[tuple[bytes, str], ...] = ()

    @classmethod
    def single(cls, key: str | None) -> Keyring:
        return cls(((_digest(key), DEFAULT_TENANT),)) if key else cls()

    @property
    def required(self) -> bool:
        return bool(self.digests)

    @property
    def tenants(self) -> list[str]:
        return sorted({tenant for _, tenant in self.digests})

    def tenant(self, token: str) -> str | None:
        """The tenant whose key is ``token``; None when no key matches. Every key is compared,
        whatever matched before."""
        given = _digest(token)
        found = None
        for digest, tenant in self.digests:
            if hmac.compare_digest(given, digest):
                found = tenant
        return found


def load_keys(path: Path) -> Keyring:
    """Read ``--api-keys FILE``: YAML ``{tenant: key}`` or ``{tenant: [key, ...]}``, or lines
    ``KEY TENANT`` (``#`` starts a comment). Errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HyperlexError(f"--api-keys {path}: cannot read it: {exc}") from None
    pairs = _yaml_pairs(path, text) if _looks_like_yaml(text) else _line_pairs(path, text)
    if not pairs:
        raise HyperlexError(f"--api-keys {path}: no keys in it")
    seen: dict[str, str] = {}
    for key, tenant, where in pairs:
        if not TENANT_NAME.match(tenant):
            raise HyperlexError(f"{where}: tenant {tenant!r}: use 1-64 letters, digits, '-' "
                                "or '_'")
        if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
            raise HyperlexError(f"{where}: a key must be at least {MIN_KEY_LENGTH} characters "
                                "with no spaces")
        if key in seen and seen[key] != tenant:
            raise HyperlexError(f"{where}: this key is already the key of tenant "
                                f"{seen[key]!r}")
        seen[key] = tenant
    return Keyring(tuple((_digest(key), tenant) for key, tenant in seen.items()))


def _looks_like_yaml(text: str) -> bool:
    first = next((line for line in text.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")), "")
    return first.rstrip().endswith(":") or ": " in first


def _yaml_pairs(path: Path, text: str) -> list[tuple[str, str, str]]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise HyperlexError(f"--api-keys {where}: not valid YAML: "
                            f"{getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise HyperlexError(f"--api-keys {path}: expected a mapping 'tenant: key' or "
                            "'tenant: [key, ...]'")
    pairs = []
    for tenant, keys in data.items():
        where = f"--api-keys {path}: tenant {tenant!r}"
        for key in keys if isinstance(keys, list) else [keys]:
            if not isinstance(key, str):
                raise HyperlexError(f"{where}: each key must be a string")
            pairs.append((key, str(tenant), where))
    return pairs


def _line_pairs(path: Path, text: str) -> list[tuple[str, str, str]]:
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"--api-keys {path}:{number}"
        if len(fields) != 2:
            raise HyperlexError(f"{where}: expected 'KEY TENANT', got {len(fields)} fields")
        pairs.append((fields[0], fields[1], where))
    return pairs


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
