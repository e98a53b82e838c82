"""Federated training on Flower: thin ClientApp/ServerApp adapters over plain-Python round logic."""
