"""SDN controller: discovery, topology, path computation, transactional provisioning, gRPC."""
