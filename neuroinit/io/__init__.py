"""neuroinit.io"""
