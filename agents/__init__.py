"""SD-QKD node agent: NETCONF server over the ETSI GS QKD 015 datastore, drivers, LKMS."""
