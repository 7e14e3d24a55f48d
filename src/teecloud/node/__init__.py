"""teecloud.node"""
