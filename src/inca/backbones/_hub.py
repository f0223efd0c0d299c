"""Hub access without the wait: fail fast with the hint when the Hugging Face Hub is off.

``huggingface_hub`` retries a download whose file is not in the local cache five times,
with back-off (about 45 s) before it gives up. Offline that only delays the error, so a
backbone source asks first: when ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set, or
one quick request to the hub fails, it loads in the hub's offline mode, where a file is
either in the local cache or missing at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

_TRUE = {"1", "on", "yes", "true"}


def offline_requested() -> bool:
    """Whether the environment asks for the hub's offline mode (read now, not at import)."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - every hub source installs it
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One request to the hub's endpoint, no retries, through the hub library's own session
    (so its proxies and endpoint apply): whether any answer came back."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - no answer, whatever the reason, is "not reachable"
        return False
    return True


def hub_offline() -> bool:
    """Whether to load from the local cache only: asked for, or the hub did not answer."""
    return offline_requested() or not hub_reachable()


@contextmanager
def offline_mode(enabled: bool = True) -> Iterator[None]:
    """Within the block, ``huggingface_hub`` (and timm and transformers through it) reads
    the local cache only: a file that is not there fails at once instead of after retries."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def is_hub_error(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) is a failure to fetch from a hub: a
    file missing from the local cache, no connection, offline mode."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if (name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError",
                     "ConnectionError", "URLError", "HfHubHTTPError", "RepositoryNotFoundError",
                     "GatedRepoError")
                or isinstance(e, ConnectionError | TimeoutError)):
            return True
        text = str(e)
        if "local cache" in text or "offline mode" in text.lower() or "huggingface.co" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def offline_hint(what: str, offline: bool) -> str:
    """The fix of a hub failure: local weights, another backbone, or going online."""
    why = ("the hub is not reachable (offline: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set, or "
           "no connection) and the weights are not in the local cache" if offline else
           "the hub could not be reached")
    return (f"{why}. Fix: {what}; or use a bundled backbone (inca backbones); or run once "
            "online to fill the cache")


__all__ = ["hub_offline", "hub_reachable", "is_hub_error", "offline_hint", "offline_mode",
           "offline_requested"]
