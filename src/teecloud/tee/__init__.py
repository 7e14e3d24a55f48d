"""teecloud.tee"""
