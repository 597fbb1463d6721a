"""The contracts every stage shares, and nothing else: the typed messages between stages, the KV page hash, the
model facts and layer-type names, the engine errors, the KV-event sink interface and the strict base of config
sections. Torch-free and stage-free (import-linter enforces it): stages import this package, it imports no stage.
"""
