"""fastclip.train"""
