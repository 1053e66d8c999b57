"""The controller's view of the network: an immutable snapshot of nodes, QKD interfaces and
links, fibres and switches, replaced whole when a southbound event changes something, so
path computation can read it from any thread without locks."""
