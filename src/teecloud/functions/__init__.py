"""teecloud.functions: attested off-chain functions (docs/functions.md)."""
