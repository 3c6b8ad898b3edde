"""The commands of the command line beyond its parsing: each composes the lower layers (recipe, data, model,
stages) for one command (validate's preflight checks, train, merge, data inspect / synth, chat, init, plot)."""
