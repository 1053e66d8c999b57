"""The controller's NETCONF side: sessions to the agents, edit operations, notifications."""
