"""API-key authentication, the one rule both APIs apply: when keys are configured, every call but the
health checks must carry `authorization: Bearer <key>` (an HTTP header, or gRPC metadata) with one of
them; otherwise HTTP answers 401 and gRPC UNAUTHENTICATED. Keys are compared in constant time.

Keys come from a file, one per line (blank lines and `#` comments ignored): on Kubernetes, a Secret
mounted as a file (`serve.api_keys_file` in the Helm values).
"""

from __future__ import annotations

import hmac
from pathlib import Path

UNAUTHENTICATED = "a valid API key is required: send the header 'Authorization: Bearer <key>'"


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("api_keys_file: holds no key (one per line)")
        if any(len(k) < 16 or any(c.isspace() for c in k) for k in keys):
            raise ValueError("api_keys_file: every key must be at least 16 characters with no whitespace")
        self._keys = [k.encode() for k in keys]

    @staticmethod
    def from_file(path: str | Path) -> ApiKeys:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"api_keys_file: cannot read {path}: {e.strerror}") from None
        return ApiKeys([ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")])

    def allows(self, authorization: str | None) -> bool:
        """Whether an `authorization` value ("Bearer <key>") names one of the keys."""
        if not authorization:
            return False
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        given = key.strip().encode("utf-8", "replace")
        ok = False
        for k in self._keys:  # every key is compared: the time does not tell which one matched
            ok |= hmac.compare_digest(given, k)
        return ok


def authorization_of(metadata) -> str | None:
    """The `authorization` entry of gRPC invocation metadata (pairs of key, value), if any."""
    for k, v in metadata or ():
        if k.lower() == "authorization":
            return v.decode("latin-1") if isinstance(v, bytes) else v
    return None
