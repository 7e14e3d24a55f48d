"""teecloud.agent"""
