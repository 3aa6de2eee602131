"""neuroinit.experiments"""
