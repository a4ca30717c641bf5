"""Run configuration: typed dataclasses that YAML files mirror, their validation and the parser that reads
them.
"""
