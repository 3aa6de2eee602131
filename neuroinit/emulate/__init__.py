"""neuroinit.emulate"""
