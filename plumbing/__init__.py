"""The plumbing the six top-level files call and a reader of the method may skip: loading, checkpoints, collectives, logging, image decoding, hub data sets, caches, speed levers, plots."""
