"""The non-training commands: each composes the lower layers (recipe, data, model, stages) for one command
of the command line (validate's preflight checks, data inspect, data synth, chat)."""
