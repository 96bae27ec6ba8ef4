"""gRPC API: proto <-> engine types, validation, the servicer logic behind the Serve ingress."""
