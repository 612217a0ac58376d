"""symbiote.schema"""
