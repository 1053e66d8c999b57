"""The agent's NETCONF server: SSH transport, sessions and framing, the operations, notifications (RFC 5277), monitoring (RFC 6022) and rpc-errors."""
