"""fastclip.bench"""
