"""What both stages share: the error type, the one config loader, provenance, temporary
files, run locks, the device choice and the relative-L2 error.

Nothing here imports from psfgen's stage-1 modules or from psfcvae, so the import graph
runs one way: cli -> psfcvae -> psfgen -> psfgen.shared.
"""
