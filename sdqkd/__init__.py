"""sdqkd: a software-defined QKD network stack (ETSI GS QKD 015/014/004, NETCONF, TAPI)."""
import sys as _sys

__version__ = "0.1.0"


class _FastBindings:
    """Installs sdqkd.fastbind just before sdqkd.bindings is first imported (the
    generated modules bind pyangbind's factories by name when they load)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "sdqkd.bindings":
            _sys.meta_path.remove(self)
            from sdqkd import fastbind

            fastbind.install()
        return None


if not any(isinstance(f, _FastBindings) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _FastBindings())
