"""The agent's NETCONF datastores (running, candidate, startup) and what edits them."""
