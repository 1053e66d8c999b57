"""RESTCONF (RFC 8040) front end of an agent: a second protocol on the NETCONF datastores."""
