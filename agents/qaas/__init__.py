"""Quantum as a service: the HTTPS APIs a node offers users outside the ETSI interfaces
(entropy, one-call keys, QKD-keyed TLS and IPsec), built on the LKMS and the QRNG.

Each service is a module with `add_routes(app, ctx)` and `OPENAPI` (its part of the
OpenAPI document); `api.add_routes` mounts them all on the node's key-delivery HTTPS
server, next to ETSI 014 and 004, and serves the assembled document at /openapi.json.
"""
