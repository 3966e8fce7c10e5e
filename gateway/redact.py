"""What ``GET /v1/config`` shows: the configuration as written, every credential masked — by value and by
position, not only by key name.

People read ``/v1/config`` to see how a gateway is set up: which backends, which models and options, which
hosts, and *where* each secret comes from. They never need a credential itself, and the endpoint may be
reachable by more people than the credentials should be. So, on the raw document (``${VAR}`` text as
written, nothing interpolated):

1. ``${VAR}`` references are shown as written: where a secret comes from is useful, its value never is,
   and the raw document never holds it. In a secret position (rule 4) a reference's default
   (``${VAR:-literal}``) is masked, since it is the secret when the variable is unset.
2. Every value the config took from the environment (``Config.secrets``) is masked wherever it appears,
   should it also be written literally somewhere (a description, a URL). Values under 6 characters are
   left alone: no credential is that short, and masking ``1`` or ``us`` everywhere would garble the view.
3. URLs anywhere: the userinfo (``https://user:pass@host``) is masked, and so are query parameters with
   credential-like names (``?api_key=...``, ``sig=``, ``token=``), unless they are only ``${...}`` text.
4. Secret positions, where literal text is masked (a value that uses a ``${...}`` reference is shown: its
   literal parts are formatting such as ``Bearer ``):
   a. a key whose name says credential (``api_key``, ``token``, ``password``, ``authorization``...), at any
      depth, except names of a header or prefix (``api_key_header: Authorization``);
   b. every value of a header map (``headers``, ``extra_headers``, any ``*headers`` key): a header set on a
      backend is there to authenticate more often than not, whatever its name (``X-Org-Id``), and a header
      whose value matters for debugging is rare.
5. Free-form maps forwarded verbatim to an upstream (``extra_body``, ``extra_input``, ``input``,
   ``parameters``, route ``options``): users put model options there (style, LoRA scale, safety flags) and
   expect to see them, but sometimes credentials too (a provider that takes a key in the body, a webhook
   secret). Values are shown unless rule 4a applies or the value looks like a credential: a known key
   prefix (``sk-``, ``r8_``, ``hf_``, ``ghp_``, ``AKIA``, ``Bearer ``...) or a random-looking token (20+
   characters without spaces whose letters and digits switch class often, as random text does and names
   like ``flux-1.1-pro-ultra`` do not). A false positive (a long random id) is masked, which is the safe
   side. Outside these maps, values are typed settings (model names, versions, URLs) and are shown.

``redact_config`` is pure and only runs for ``/v1/config``; nothing here is on the request path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

REDACTED = "[redacted]"
# The ``${VAR}`` / ``${VAR:-default}`` syntax of gateway.config's interpolation.
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_NAME = re.compile(r"(?i)(key|token|secret|passw(or)?d|authorization|credential|cookie)")
_NOT_SECRET_NAME = re.compile(r"(?i)(_header|_prefix)$")
_HEADER_MAP = re.compile(r"(?i)headers$")
_FREE_FORM = frozenset({"extra_body", "extra_input", "input", "parameters", "options"})
_MIN_SECRET = 6
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^/@\s?#]+)@")
_QUERY_SECRET = re.compile(r"(?i)([?&])([^=&#\s]*(?:key|token|secret|passw|sig|auth|credential)[^=&#\s]*)=([^&#\s]*)")
_PREFIXED = re.compile(
    r"(?i)^(sk-|sk_|rk_|pk_live|r8_|hf_|ghp_|gho_|ghs_|github_pat_|glpat-|xox[abprs]-|AKIA|ASIA|AIza"
    r"|bearer\s|basic\s|token\s)"
)
_TOKENISH = re.compile(r"^[A-Za-z0-9_\-.:+=/]{20,}$")


def redact_config(raw: Any, secrets: tuple[str, ...] = ()) -> Any:
    """The raw config document with every credential masked (see the module docstring). Pure."""
    known = tuple(s for s in secrets if len(s) >= _MIN_SECRET)
    return _walk(raw, known, free=False)


def _walk(value: Any, known: tuple[str, ...], *, free: bool) -> Any:
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            name = str(key)
            if _SECRET_NAME.search(name) and not _NOT_SECRET_NAME.search(name):
                out[key] = _secret(item, known)
            elif _HEADER_MAP.search(name) and isinstance(item, Mapping):
                out[key] = {header: _secret(v, known) for header, v in item.items()}
            else:
                out[key] = _walk(item, known, free=free or name in _FREE_FORM)
        return out
    if isinstance(value, list):
        return [_walk(item, known, free=free) for item in value]
    if isinstance(value, str):
        text = _by_value(value, known)
        if free and not _REF.search(text) and looks_like_credential(text):
            return REDACTED
        return text
    return value


def _secret(value: Any, known: tuple[str, ...]) -> Any:
    """A value in a secret position: only ``${...}`` references survive (their defaults masked)."""
    if isinstance(value, Mapping):
        return {k: _secret(v, known) for k, v in value.items()}
    if isinstance(value, list):
        return [_secret(v, known) for v in value]
    if isinstance(value, str) and _REF.search(value):
        masked = _REF.sub(lambda m: m.group(0) if m.group(2) is None else f"${{{m.group(1)}:-{REDACTED}}}", value)
        return _by_value(masked, known)
    if value is None or isinstance(value, bool) or value == "":
        return value  # unset / a switch: nothing to hide, and "not set" is worth seeing
    return REDACTED


def _by_value(text: str, known: tuple[str, ...]) -> str:
    """Rules 2 and 3: known secret values, URL userinfo and credential query parameters."""
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "@" in text:
        text = _USERINFO.sub(lambda m: m.group(0) if _only_refs(m.group(2)) else f"{m.group(1)}{REDACTED}@", text)
    if "=" in text and ("?" in text or "&" in text):
        text = _QUERY_SECRET.sub(
            lambda m: m.group(0) if _only_refs(m.group(3)) else f"{m.group(1)}{m.group(2)}={REDACTED}", text
        )
    return text


def _only_refs(text: str) -> bool:
    """Whether ``text`` is nothing but ``${...}`` references (and the ``:`` between user and password)."""
    return bool(_REF.search(text)) and not _REF.sub("", text).replace(":", "")


def looks_like_credential(text: str) -> bool:
    """A known key prefix, or a random-looking token (rule 5 of the module docstring)."""
    if _PREFIXED.match(text):
        return True
    if not _TOKENISH.match(text) or "://" in text:
        return False
    classes = [_class(c) for c in text if c.isalnum()]
    if not any(c == "digit" for c in classes) or all(c == "digit" for c in classes):
        return False
    switches = sum(a != b for a, b in pairwise(classes))
    # Random base62 switches class at ~60% of positions, hex at ~45%; names and slugs far less often.
    return switches * 5 >= len(text)


def _class(char: str) -> str:
    if char.isdigit():
        return "digit"
    return "upper" if char.isupper() else "lower"
