"""Hugging Face Hub ids, resolved through ``huggingface_hub`` and its standard cache.

    repo = parse_hub_id("hf-hub:openai/clip-vit-base-patch32")   # HubId("openai/clip-vit-base-patch32", None)
    path = resolve_repo(repo)             # local snapshot directory holding the config, weights, tokenizer

Ids: ``"hf-hub:org/name"`` or ``"hf-hub:org/name@revision"``; a plain ``"org/name"`` is read as a hub
id when it is not an existing local path. Files are fetched with ``hf_hub_download`` into the cache
that ``HF_HOME`` / ``HF_HUB_CACHE`` select (``models--org--name/snapshots/<commit>/...``); with
``HF_HUB_OFFLINE=1`` only the cache is read, and a repo that is not there raises one
:class:`HubError` naming the repo, the files needed and the cache directory. Ids are checked against
the Hub's naming rules before use; they are only ever passed to ``huggingface_hub`` (never turned into
URLs, paths or shell commands here). File names read from a repo's shard index are checked the same way.

Repo formats: open_clip (``open_clip_config.json`` + ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``) and transformers CLIP/SigLIP (``config.json`` + ``model.safetensors``,
``pytorch_model.bin`` or a sharded index, ``preprocessor_config.json``), with tokenizer files.
"""

from __future__ import annotations

import json
import os
import re
from typing import NamedTuple

HUB_PREFIX = "hf-hub:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_CONFIG = "config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "added_tokens.json",
)
PREPROCESSOR_CONFIG = "preprocessor_config.json"

# The Hub's rules for a repo id: two parts of letters, digits, "-", "_", "." (no "--" or ".." and no
# leading/trailing "-" or "."), at most 96 characters each.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"({_PART})/({_PART})")
_REV_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class HubError(ValueError):
    """A hub id that cannot be resolved: not in the cache while offline, no such repo, or no model files."""


class HubId(NamedTuple):
    repo_id: str
    revision: str | None

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(name) -> HubId | None:
    """``HubId`` for ``"hf-hub:org/name[@rev]"``, or for a plain ``"org/name[@rev]"`` that is not an
    existing local path; None for anything else. A ``"hf-hub:"`` id that breaks the Hub's naming rules
    raises ``ValueError``."""
    if not isinstance(name, str):
        return None
    explicit = name.startswith(HUB_PREFIX)
    if not explicit and (os.path.exists(name) or name.count("/") != 1):
        return None
    body = name[len(HUB_PREFIX) :] if explicit else name
    repo, _, rev = body.partition("@")
    ok = _REPO_RE.fullmatch(repo) and "--" not in repo and ".." not in repo
    ok = ok and (not rev or (_REV_RE.fullmatch(rev) and ".." not in rev))
    if not ok:
        if explicit:
            raise ValueError(
                f"name: expected a hub id 'hf-hub:org/name' or 'hf-hub:org/name@revision' (letters, digits, "
                f"'-', '_', '.'), got {name!r}"
            )
        return None
    return HubId(repo, rev or None)


def cache_dir() -> str:
    """The hub cache directory huggingface_hub uses (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def is_offline() -> bool:
    from huggingface_hub import constants

    fn = getattr(constants, "is_offline_mode", None)
    return bool(fn() if fn is not None else constants.HF_HUB_OFFLINE)


PROBE_TIMEOUT_S = 3.0  # a connection to the Hub (or the proxy) that takes longer counts as unreachable


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub endpoint (``HF_ENDPOINT``, through the ``https_proxy`` / ``http_proxy`` proxy when one
    applies) cannot be reached, or None when a TCP connection to it opens within ``timeout`` seconds.

    huggingface_hub retries an unreachable host 5 times with back-off (~20 s per file) before it falls back
    to the cache; one connection attempt tells the same in milliseconds (a name that does not resolve, a
    refused or timed-out connection)."""
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None  # not a URL this check understands: leave it to huggingface_hub
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if not p.hostname:
            return None
        host, port = p.hostname, p.port or (443 if p.scheme == "https" else 80)
    # Name resolution has no timeout of its own (a resolver that never answers blocks for minutes): it
    # runs in a daemon thread that is given up on after ``timeout``.
    found: dict = {}

    def resolve():
        try:
            found["addrs"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            found["error"] = exc

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return f"no connection to {host}:{port}: the name did not resolve within {timeout:g} s"
    if "error" in found or not found.get("addrs"):
        exc = found.get("error")
        return f"no connection to {host}:{port}: {getattr(exc, 'strerror', None) or exc or 'no address'}"
    last = None
    for family, kind, proto, _, address in found["addrs"]:
        try:
            with socket.socket(family, kind, proto) as conn:
                conn.settimeout(timeout)
                conn.connect(address)
            return None
        except OSError as exc:
            last = exc
    return f"no connection to {host}:{port}: {getattr(last, 'strerror', None) or last}"


class _Fetcher:
    """hf_hub_download of single files; remembers whether a miss was "not cached" (offline or
    unreachable) or "not in the repo" (the Hub answered 404). With ``HF_HUB_OFFLINE`` set, or when one
    connection attempt shows the Hub unreachable (:func:`hub_unreachable`), files are looked up in the cache
    only: huggingface_hub would retry each unreachable request for ~20 s."""

    def __init__(self, hub: HubId):
        self.hub = hub
        self.unreachable = is_offline()
        self.why_unreachable = None
        self._probed = self.unreachable

    def _probe(self) -> None:
        if not self._probed:
            self._probed = True
            self.why_unreachable = hub_unreachable()
            self.unreachable = self.why_unreachable is not None

    def cached_first(self, names) -> list[str]:
        """``names`` with the ones already in the cache first (so that an unreachable Hub costs no retries
        for a repo that is cached), otherwise in the given order of preference."""
        from huggingface_hub import try_to_load_from_cache

        def cached(name):
            return isinstance(try_to_load_from_cache(self.hub.repo_id, name, revision=self.hub.revision), str)

        return sorted(names, key=lambda n: not cached(n))

    def __call__(self, filename: str) -> str | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if not _FILE_RE.fullmatch(filename) or ".." in filename:
            raise HubError(f"{self.hub}: refusing the file name {filename!r} (expected a plain file name)")
        self._probe()
        try:
            return hf_hub_download(
                self.hub.repo_id, filename, revision=self.hub.revision, local_files_only=self.unreachable
            )
        except LocalEntryNotFoundError:
            self.unreachable = True
            return None
        except EntryNotFoundError:
            return None
        except RevisionNotFoundError as exc:
            raise HubError(f"{self.hub}: the Hub has no revision {self.hub.revision!r} of this repo") from exc
        except RepositoryNotFoundError as exc:
            raise HubError(
                f"{self.hub}: the Hub has no such model repo, or it is private or gated "
                "(log in with `hf auth login` and accept its terms)"
            ) from exc
        except OSError as exc:  # other HTTP errors (huggingface_hub's errors are OSErrors)
            raise HubError(f"{self.hub}: could not fetch {filename} ({type(exc).__name__}: {exc})") from exc

    def missing(self, needed: str) -> HubError:
        if self.unreachable:
            why = "downloads are off (HF_HUB_OFFLINE=1)" if is_offline() else "the Hub could not be reached"
            if self.why_unreachable and not is_offline():
                why += f" ({self.why_unreachable})"
            return HubError(
                f"{self.hub}: not in the Hugging Face cache {cache_dir()} and {why}; needed files: {needed}. "
                f"Fetch them where there is internet (`hf download {self.hub.repo_id}` with the same HF_HUB_CACHE) "
                "or point HF_HUB_CACHE / HF_HOME at a cache that holds them"
                + ("." if is_offline() else " (HF_HUB_OFFLINE=1 skips the network).")
            )
        return HubError(f"{self.hub}: the repo has no {needed}")


_MODEL_NEEDED = (
    f"{OPEN_CLIP_CONFIG} + {' or '.join(OPEN_CLIP_WEIGHTS)} (open_clip), "
    f"or {HF_CONFIG} + {' or '.join(HF_WEIGHTS)} (transformers)"
)


def resolve_repo(hub: HubId, *, weights: bool = True, tokenizer: bool = True) -> str:
    """Fetch (or find in the cache) what a model repo needs and return its local snapshot directory:
    the config (``open_clip_config.json``, else ``config.json``), with ``weights`` one weights file
    (safetensors preferred, shards of an index included), with ``tokenizer`` the tokenizer files the
    repo has, and ``preprocessor_config.json`` for transformers repos."""
    if not isinstance(hub, HubId):
        raise TypeError(f"hub: expected a HubId (see parse_hub_id), got {type(hub).__name__}")
    fetch = _Fetcher(hub)
    config = None
    for name in fetch.cached_first([OPEN_CLIP_CONFIG, HF_CONFIG]):
        config, kind = fetch(name), ("open_clip" if name == OPEN_CLIP_CONFIG else "transformers")
        if config is not None:
            break
    if config is None:
        raise fetch.missing(_MODEL_NEEDED if weights else f"{OPEN_CLIP_CONFIG} or {HF_CONFIG}")
    directory = os.path.dirname(config)
    if weights:
        for name in fetch.cached_first(OPEN_CLIP_WEIGHTS if kind == "open_clip" else HF_WEIGHTS):
            path = fetch(name)
            if path is None:
                continue
            if name.endswith(".index.json"):
                from fastclip.models.jsonfile import read_json_object
                from fastclip.models.weights import shard_files

                weight_map = read_json_object(path, "a shard index object").get("weight_map", {})
                try:
                    shards = shard_files(f"{hub}: {name}", weight_map)
                except ValueError as exc:
                    raise HubError(str(exc)) from None
                lost = [s for s in shards if fetch(s) is None]
                if lost or not shards:
                    raise fetch.missing(f"{name} and its shards {', '.join(lost or ['(none listed)'])}")
            break
        else:
            raise fetch.missing(_MODEL_NEEDED)
    if kind == "transformers":
        fetch(PREPROCESSOR_CONFIG)
    if tokenizer:
        for name in fetch.cached_first(TOKENIZER_FILES):
            fetch(name)
    return directory


def resolve_tokenizer_repo(hub: HubId) -> str:
    """Fetch (or find in the cache) a repo's tokenizer files; returns the snapshot directory.
    Needs ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``, or ``spiece.model``."""
    fetch = _Fetcher(hub)
    got = {name: fetch(name) for name in fetch.cached_first(TOKENIZER_FILES)}
    usable = got["tokenizer.json"] or (got["vocab.json"] and got["merges.txt"]) or got["spiece.model"]
    if not usable:
        raise fetch.missing(
            "tokenizer.json (or vocab.json + merges.txt, or spiece.model), with tokenizer_config.json and "
            "special_tokens_map.json"
        )
    return os.path.dirname(next(p for p in got.values() if p))


def list_cached_models() -> list[str]:
    """``"hf-hub:org/name"`` of every model repo in the local cache whose cached snapshot holds a
    CLIP/SigLIP config (open_clip_config.json, or config.json of model_type clip/siglip) and weights."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir())
    except Exception:  # no cache directory yet (CacheNotFound) or an unreadable one: nothing cached
        return []
    out = set()
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            names = {f.file_name: f.file_path for f in rev.files}
            if OPEN_CLIP_CONFIG in names and any(w in names for w in OPEN_CLIP_WEIGHTS):
                out.add(f"{HUB_PREFIX}{repo.repo_id}")
            elif HF_CONFIG in names and any(w in names for w in HF_WEIGHTS):
                try:
                    with open(names[HF_CONFIG]) as f:
                        kind = json.load(f).get("model_type")
                except (OSError, ValueError):
                    continue
                if kind in ("clip", "siglip"):
                    out.add(f"{HUB_PREFIX}{repo.repo_id}")
    return sorted(out)
