"""Generated gRPC stubs for loramux.v1 (`make proto`)."""
