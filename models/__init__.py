"""Model adapters and their contracts (models/roles.py): one interface per role, every backend
of a role behind it. Which backend a config names is resolved by stages/registry.py."""
