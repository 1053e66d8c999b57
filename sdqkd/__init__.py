"""sdqkd: a software-defined QKD network stack (ETSI GS QKD 015/014/004, NETCONF, TAPI)."""

__version__ = "0.1.0"
