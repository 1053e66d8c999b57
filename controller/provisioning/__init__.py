"""Plans -> agents, as one NETCONF transaction."""
