"""teecloud.kms"""
