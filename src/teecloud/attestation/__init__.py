"""teecloud.attestation"""
