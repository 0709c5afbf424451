"""Hugging Face hub access that fails fast.

With the hub unreachable, `datasets` and `huggingface_hub` retry each request for tens of seconds before they give
up. One short probe decides instead: when the hub cannot be reached (or HF_HUB_OFFLINE=1 is set) both libraries
are switched to offline mode, so cached names still load and anything else fails at once with one line.
"""

from __future__ import annotations

import os
import sys
import threading

PROBE_TIMEOUT_S = 5.0
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
_probe_result: bool | None = None


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_by_env() -> bool:
    return any(os.environ.get(k, "").upper() in TRUE_VALUES for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _probe() -> bool:
    """One HEAD request through huggingface_hub's own HTTP session (so proxies apply), in a thread so a slow DNS
    lookup cannot block for longer than the timeout either."""
    result: list[bool] = []

    def attempt():
        try:
            from huggingface_hub.utils import get_session

            get_session().head(endpoint(), timeout=PROBE_TIMEOUT_S)
            result.append(True)
        except Exception:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1)
    return bool(result and result[0])


def go_offline() -> None:
    """Switch huggingface_hub and datasets to cache-only mode, whether or not they are imported yet."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True


def offline_reason() -> str:
    """Empty when the hub can be asked; otherwise why only the local cache is used (and offline mode is on)."""
    global _probe_result
    if offline_by_env():
        go_offline()  # HF_DATASETS_OFFLINE alone does not stop huggingface_hub
        return "offline mode (HF_HUB_OFFLINE=1)"
    if _probe_result is None:
        _probe_result = _probe()
    if not _probe_result:
        go_offline()
        return f"the hub ({endpoint()}) is unreachable"
    return ""


def one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
