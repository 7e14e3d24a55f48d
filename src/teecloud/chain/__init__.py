"""teecloud.chain"""
