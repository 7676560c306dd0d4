"""Clients for the loramux gRPC API."""
