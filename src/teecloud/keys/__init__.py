"""teecloud.keys"""
