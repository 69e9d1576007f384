"""mpo.models"""
