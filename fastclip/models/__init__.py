"""fastclip.models"""
