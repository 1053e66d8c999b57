"""The controller's southbound: NETCONF or RESTCONF sessions to the agents, edit operations, notifications."""
