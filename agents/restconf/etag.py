"""Entity-tags and Last-Modified of the running datastore (RFC 8040 3.4.1.1, 3.4.1.2): the
tag is a digest of running's canonical XML, so NETCONF commits change it as RESTCONF edits
do; the time is the last commit's (the agent tells us, `changed()`)."""
from __future__ import annotations

import hashlib
import threading
import time
from email.utils import formatdate, parsedate_to_datetime

from lxml import etree

from sdqkd.agents.datastore.model import Config


class Versions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: Config | None = None
        self._tag = ""
        self._modified = time.time()

    def changed(self) -> None:
        with self._lock:
            self._modified = time.time()

    def current(self, cfg: Config) -> tuple[str, float]:
        """(ETag, Last-Modified as epoch seconds) of running as `cfg` holds it."""
        with self._lock:
            if cfg is not self._seen:
                digest = hashlib.sha256(b"".join(etree.tostring(e, method="c14n") for e in cfg.elements)).hexdigest()[:32]
                tag = f'"{digest}"'
                if self._seen is not None and tag != self._tag and time.time() - self._modified > 1.0:
                    self._modified = time.time()  # changed without a commit hook (a rollback)
                self._seen, self._tag = cfg, tag
            return self._tag, self._modified


def http_date(t: float) -> str:
    return formatdate(t, usegmt=True)


def parse_date(text: str) -> float | None:
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def tag_matches(header: str, tag: str) -> bool:
    """If-Match / If-None-Match: '*' or a list of tags (weak ones compared weakly)."""
    header = header.strip()
    if header == "*":
        return True
    return any(t.strip().removeprefix("W/") == tag for t in header.split(","))
