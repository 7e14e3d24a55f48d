"""teecloud.gateway"""
