"""Which remote backends a gateway fronts: `--backend URL` flags and `--backends FILE`.

A backends file lists one backend per line, with optional labels:

    # URL                      labels (all optional)
    http://127.0.0.1:8001      model=llama-8b gpu=a100
    http://127.0.0.1:8002/v1   model=llama-8b,llama-8b-chat

`model` restricts the backend to those names (each must be in its own
`/v1/models`); without it the backend serves every model it lists. `gpu` is a
free-form label shown by `/admin/instances`. `role` may only be `mixed`:
prefill/decode disaggregation needs KV transfer, which remote backends do not
offer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from shunter.errors import CLIError

LABELS = ("model", "gpu", "role")


@dataclass(frozen=True)
class BackendSpec:
    """One backend: its base URL (no trailing `/v1`) and labels."""

    url: str
    models: tuple[str, ...] = ()
    gpu: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


def normalize_url(text: str) -> str:
    """`http://host:port[/v1][/]` -> `http://host:port`; CLIError naming it if it is not an http(s) URL."""
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CLIError(f"backend {text!r} is not an http(s) URL (e.g. http://127.0.0.1:8001)")
    try:
        parts.port
    except ValueError:
        raise CLIError(f"backend {text!r} has a bad port") from None
    return url.removesuffix("/v1")


def parse_line(line: str, where: str = "") -> BackendSpec | None:
    """One line of a backends file (None for a blank or comment line); CLIError naming a bad label."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    url, *pairs = text.split()
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in LABELS or not value:
            raise CLIError(f"{where}{pair!r}: labels are {', '.join(k + '=VALUE' for k in LABELS)}")
        labels[key] = value
    if labels.get("role", "mixed") != "mixed":
        raise CLIError(f"{where}role={labels['role']}: remote backends can only be mixed (prefill/decode "
                       f"disaggregation moves KV caches between instances, which remote backends cannot do)")
    models = tuple(m for m in labels.get("model", "").split(",") if m)
    return BackendSpec(normalize_url(url), models, labels.get("gpu"), labels)


def read_backends(urls: list[str] | None, path: str | None) -> list[BackendSpec]:
    """The backends of `--backend URL ...` and `--backends FILE`, in that order; CLIError on a duplicate."""
    specs = [BackendSpec(normalize_url(u)) for u in urls or []]
    if path is not None:
        try:
            with open(path) as f:
                lines = f.readlines()
        except OSError as exc:
            raise CLIError(f"cannot read --backends {path}: {exc.strerror}") from None
        for number, line in enumerate(lines, 1):
            spec = parse_line(line, f"{path}:{number}: ")
            if spec is not None:
                specs.append(spec)
    seen: set[str] = set()
    for spec in specs:
        if spec.url in seen:
            raise CLIError(f"backend {spec.url} is listed twice")
        seen.add(spec.url)
    if not specs:
        raise CLIError(f"--backends {path} lists no backend")
    return specs
