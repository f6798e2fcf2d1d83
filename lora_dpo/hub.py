"""The Hugging Face Hub on a machine that may be offline.

On a machine without a network, every hub access (a model id, a tokenizer, a hub data set) first retries for ~25 s
before it fails. Before the first one, lora-dpo asks the resolver for the hub's host name (no connection is made);
when it cannot be resolved, this process switches to the libraries' offline mode: cached files load at once and
missing ones fail at once with lora-dpo's one-line error. HF_HUB_OFFLINE=1 skips the check, as does a proxy
(which resolves names itself).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_checked = False
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline_if_unreachable() -> bool:
    """→ True when this process is (now) in offline mode. Checks at most once per process."""
    global _checked
    import huggingface_hub.constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        return True
    if _checked or any(os.environ.get(v) for v in PROXY_VARS):
        return False
    _checked = True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        return False
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # for processes started from here
    hub_constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config as datasets_config

        datasets_config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    if os.environ.get("RANK", "0") == "0":
        print(f"{host} cannot be resolved: working offline (hub ids load from the local cache only)", flush=True)
    return True


def could_be_hub_id(name: str) -> bool:
    """`owner/name` that is no local path: what lora-dpo looks up on the hub (for a model, a data set's rules are
    its own: data_sources.source_kind)."""
    from pathlib import Path

    return not Path(name).expanduser().exists() and not name.startswith((".", "/", "~")) and name.count("/") == 1
