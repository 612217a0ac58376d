"""symbiote.actors"""
