"""teecloud: a decentralized TEE cloud for unchanged docker-compose apps."""

__version__ = "0.1.0"
