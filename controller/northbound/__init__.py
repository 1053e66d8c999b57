"""gRPC northbound: sdqkd.proto (package sdqkd.v1), its generated modules
(codegen.py makes them), the servicer that translates calls to the Controller
and maps its errors to status codes, and the server with reflection."""
