"""Command line: `jeidnn train | evaluate | predict | export | prune`; the library never imports this
package.
"""
