"""What a user is told about each model in the catalog, wherever models are chosen (CLI
`models list`, the Slicer model menu, the web demo): what it can do (its backend's
``describe(entry)``: no weights loaded), licence, size, CPU/GPU need, whether it is on disk and
how to get it, and a demo model's measured limits."""

from __future__ import annotations

from dataclasses import dataclass

DEVICE_TEXT = {"cpu": "CPU", "gpu-recommended": "CPU or GPU (GPU recommended)", "gpu": "GPU required"}


@dataclass
class ModelChoice:
    spec: str                # what Engine.load(model=...) takes: catalog id or a folder path
    label: str               # what the combo box shows
    available: bool          # usable offline now (embedded, downloaded or local folder)
    description: str = ""
    license: str = ""
    can_do: tuple = ()       # Capabilities.summary() of its backend(s)
    size: int | None = None  # bytes (download or on disk)
    device: str = ""         # Capabilities.device
    where: str = ""          # embedded | downloaded | not downloaded | local folder | weights present ...
    notice: str = ""         # a demo model's measured limits (what the loaded model's info says)
    hint: str = ""           # how to get the weights when they are not on disk
    downloadable: bool = False   # CTLanguage can download what is missing (catalog.fetch)
    consent_download: bool = False  # a member's package downloads its weights once the user agrees
    missing: tuple = ()      # ids of the member models whose weights are not on disk

    def details(self, notice: bool = True) -> str:
        """Several lines for the panel (and the combo's tool tip): what it can do, licence, size,
        CPU/GPU need, whether it is on disk, then (``notice``) the demo notice."""
        size = f"{self.size / 1e6:.1f} MB" if self.size else "size unknown"
        device = DEVICE_TEXT.get(self.device, self.device or "CPU")
        lines = [f"Can do: {', '.join(self.can_do) or 'unknown'}",
                 f"Licence: {self.license or 'unknown'} · {size} · runs on: {device}",
                 f"On disk: {self.where}" + ("" if self.available or not self.hint else f" — {self.hint}")]
        return "\n".join(lines + ([self.notice] if self.notice and notice else []))


def _members(entry, entries) -> list:
    """The catalog entries a choice runs: itself, or a pipeline's member models."""
    if not entry.pipeline:
        return [entry]
    from .catalog import find_entry

    found = (find_entry(mid, catalog=entries) for mid in dict.fromkeys(entry.pipeline.values()))
    return [m for m in found if m is not None]


def _describe(members) -> list:
    """Capabilities of each member (its backend's ``describe``: no weights loaded)."""
    from . import backends

    return [backends.backend_module(m.backend).describe(m) for m in members]


def _notice(members) -> str:
    """The demo notice the loaded model would carry (``ModelInfo.notice``), from the catalog."""
    from .backends.grounded import demo_model_notice

    return " ".join(n for n in (demo_model_notice(m) for m in members if (m.backend or "grounded") == "grounded") if n)


def entry_choice(entry, entries) -> ModelChoice:
    """What the menu says about one catalog entry (a model or a pipeline)."""
    from . import catalog as cat
    from .errors import CTLanguageError

    members = _members(entry, entries)
    try:
        caps = _describe(members)
    except CTLanguageError as exc:  # an optional backend family that is not installed
        caps, hint = [], str(exc)
    else:
        hint = " ".join(c.weights_hint for c in caps if not c.weights_present and c.weights_hint)
    absent = [(m, c) for m, c in zip(members, caps) if not c.weights_present]
    can_do = tuple(dict.fromkeys(s for c in caps for s in c.summary()))
    device = max((c.device for c in caps), key=lambda d: list(DEVICE_TEXT).index(d) if d in DEVICE_TEXT else 0,
                 default="cpu")
    try:
        path, _ = cat.resolve_model(entry.id, catalog=entries)
        available = path is not None or (bool(caps) and all(c.weights_present for c in caps))
    except CTLanguageError as exc:
        available, hint = False, hint or str(exc)
    grounded = not entry.pipeline and (entry.backend or "grounded") == "grounded"
    where = ("embedded" if entry.embedded else "downloaded" if grounded and available
             else "weights present" if available else "not on disk")
    if grounded and not available:
        hint = f"download it first (`ctlanguage models download {entry.id}`, or Manage models… in Slicer)"
    return ModelChoice(spec=entry.id, label=f"{entry.id} {entry.version} ({where})", available=available,
                       description=entry.description, license=entry.license, can_do=can_do, size=entry.size,
                       device=device, where=where, notice=_notice(members), hint=hint,
                       downloadable=(grounded and not entry.embedded and bool(entry.url)) or any(
                           cat.fetchable(m) for m, c in absent if not c.fetches_own_weights),
                       consent_download=any(c.fetches_own_weights for _m, c in absent),
                       missing=tuple(m.id for m, _c in absent))


def catalog_choices(entries=None) -> list:
    """A ModelChoice per catalog entry (the embedded default first)."""
    from . import catalog

    entries = catalog.load_catalog() if entries is None else entries
    return [entry_choice(e, entries) for e in entries]
