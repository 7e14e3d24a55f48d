"""teecloud.cloud"""
