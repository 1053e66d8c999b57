"""The node's LKMS: key store, ETSI GS QKD 014 and 004 interfaces, forwarding module."""
